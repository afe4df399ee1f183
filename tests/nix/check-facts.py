#!/usr/bin/env python3
"""Asserts what the evaluated configurations do (the JSON of tests/nix/facts.nix).

Usage: check-facts.py FACTS.json

Every check reads values that NixOS computed from the modules (file systems, the unit's
environment, users, image file names...), never how the source spells them. Two checks look
beyond Nix: the README's build table against the images' evaluated file names and systems, and
the agent's `run --help` (when the binary is built) against the variables the module sets.
Prints one line per check and a closing "N passed, N failed" line; exits 1 if any failed.
"""

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
UNIT = ROOT / "agent" / "dist" / "gitlab-runner-vm.service"
SYSTEMS = ("x86_64-linux", "aarch64-linux")
ENV_PREFIX = "GITLAB_RUNNER_VM_"
# Image packages and their file extensions (what `nix build .#<name>` leaves in result/).
EXTENSIONS = {
    "nixos-base": "qcow2",
    "nixos-runner": "qcow2",
    "nixos-runner-broker": "qcow2",
    "default": "qcow2",
    "runner-amazon": "vhd",
    "circleci-amazon": "vhd",
    "runner-gce": "raw.tar.gz",
    "circleci-gce": "raw.tar.gz",
    "amazon": "vhd",
    "runner-digital-ocean": "qcow2.gz",
    "digital-ocean": "qcow2.gz",
    "proxmox-template": "vma.zst",
    "runner-proxmox": "qcow2",
}
X86_ONLY = {"digital-ocean", "runner-digital-ocean", "proxmox-template", "runner-proxmox"}
KUBEVIRT = {"nixos-base", "nixos-runner", "nixos-runner-broker", "default"}
# The KubeVirt runner with no runner.json anywhere: the broker's answer, for the pod's token on
# KubeVirt's serviceAccount disk (serial `identity`, as examples/kubevirt/broker/pool.yaml sets it).
BROKER_IMAGES = {"nixos-runner-broker"}
IDENTITY_DEVICE = "/dev/disk/by-id/virtio-identity"
# What makes a KubeVirt ISO disk root's only whatever its Rock Ridge modes say.
ROOT_ONLY_ISO = {"ro", "nofail", "overriderockperm", "mode=0400", "dmode=0500"}
# The cloud runner images: where the agent fetches runner.json (no cloud-init).
CLOUD_SOURCES = {"runner-amazon": "aws", "runner-gce": "gce", "runner-digital-ocean": "digitalocean"}
# The unit that sets each cloud's host name, which the agent names the runner after.
CLOUD_HOSTNAME_UNITS = {"runner-amazon": "apply-ec2-data.service", "runner-digital-ocean": "digitalocean-set-hostname.service"}
SSH_KEYS_DIR = "/run/ssh-keys"
# The config disk's line in the VM system test's /etc/fstab (tests/vm/vmtest/image.py).
GUEST_FSTAB = ROOT / "tests" / "vm" / "guest" / "runner-info.fstab"
# The scratch unit the VM system test runs, with the module's script (scenario a has the disk).
GUEST_SCRATCH_UNIT = ROOT / "tests" / "vm" / "guest" / "runner-scratch.service"
# The runner images and the disks their scratch unit looks for (first match wins): a KubeVirt
# emptyDisk by serial; AWS instance-store NVMe (systemd's 60-persistent-storage.rules name an
# NVMe disk nvme-<model>_<serial>, the model being "Amazon EC2 NVMe Instance Storage"); GCE
# local SSD as google-guest-configs' 65-gce-disk-naming.rules names it (NVMe, model nvme_card:
# google-local-nvme-ssd-N; SCSI: google-local-ssd-N); DigitalOcean has no local disk.
SCRATCH_DEVICES = {
    "nixos-runner": ["/dev/disk/by-id/virtio-scratch"],
    "nixos-runner-broker": ["/dev/disk/by-id/virtio-scratch"],
    "default": ["/dev/disk/by-id/virtio-scratch"],
    "runner-amazon": ["/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*"],
    "runner-gce": ["/dev/disk/by-id/google-local-nvme-ssd-*", "/dev/disk/by-id/google-local-ssd-*"],
    "runner-digital-ocean": [],
    "runner-proxmox": ["/dev/disk/by-id/virtio-scratch"],
}
# The config disk's device where it is not the virtio disk with serial runner-info: Proxmox VE's
# CD-ROM, by its ISO 9660 label.
CONFIG_DEVICES = {"runner-proxmox": "/dev/disk/by-label/cfgdata"}
# The longest runner-scratch lets udev finish naming the kernel's block devices before it looks.
SETTLE_MAX = 10
# Groups that make a user root (wheel: sudo; docker and podman: their root sockets) or let it
# read the whole journal (systemd-journald's ACLs name wheel and adm; systemd-journal owns it).
ROOT_GROUPS = {"wheel", "docker", "podman"}
JOURNAL_GROUPS = {"wheel", "adm", "systemd-journal"}
OPERATOR = "operator"


class Skip(Exception):
    """A check that cannot run here (says why)."""


def env_name(flag):
    return ENV_PREFIX + flag.upper().replace("-", "_")


def env_value(value):
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_images(facts):
    problems = []
    images = facts["images"]
    for system in SYSTEMS:
        names = set(images[system])
        expected = set(EXTENSIONS) - (X86_ONLY if system != "x86_64-linux" else set())
        if names != expected:
            problems.append(f"{system}: image packages {sorted(names)}, expected {sorted(expected)}")
        for name, image in sorted(images[system].items()):
            ext = EXTENSIONS.get(name)
            if ext is None:
                continue
            base = "nixos-runner" if name == "default" else name
            if name == "proxmox-template":
                pattern = rf"vzdump-qemu-.+\.{re.escape(ext)}"
            else:
                pattern = rf"{re.escape(base)}-{re.escape(image['label'])}-{system}\.{re.escape(ext)}"
            if not re.fullmatch(pattern, image["filePath"]):
                problems.append(f"{system} {name}: file {image['filePath']!r} is not {pattern}")
            if image["system"] != system:
                problems.append(f"{system} {name}: built for {image['system']}")
    assert not problems, "\n".join(problems)


def readme_build_table():
    """Rows of the README's `nix build .#...` table: (names, result glob or None, systems)."""
    rows = []
    in_table = False
    for line in README.read_text().splitlines():
        if line.startswith("| `nix build .#...`"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set(cells[0]) <= {"-"}:
                continue
            names = re.findall(r"`([^`]+)`", cells[0])
            result = re.match(r"`result/([^`]+)`", cells[2])
            systems = {s.strip() + "-linux" for s in cells[3].split(",")}
            rows.append((names, result.group(1) if result else None, systems))
    return rows


def check_readme_table(facts):
    rows = readme_build_table()
    assert rows, "README.md has no `nix build .#...` table"
    problems = []
    listed = set()
    for names, glob, systems in rows:
        for name in names:
            listed.add(name)
            built = {s for s in SYSTEMS if name in facts["packages"][s]}
            if built != systems:
                problems.append(f"README: {name} for {sorted(systems)}, the flake builds it for {sorted(built)}")
            for system in sorted(built):
                image = facts["images"][system].get(name)
                if glob and image and not fnmatch.fnmatch(image["filePath"], glob):
                    problems.append(f"README: {name} leaves result/{glob}, the image's file is {image['filePath']}")
    missing = set(facts["packages"]["x86_64-linux"]) - listed - {"default"}
    if missing:
        problems.append(f"README: packages missing from the build table: {sorted(missing)}")
    assert not problems, "\n".join(problems)


def check_firmware_and_clouds(facts):
    problems = []
    for system in SYSTEMS:
        aarch64 = system == "aarch64-linux"
        for name, image in facts["images"][system].items():
            def need(ok, message):
                if not ok:
                    problems.append(f"{system} {name}: {message}")

            if name in KUBEVIRT:
                need(image["partitionTableType"] == ("efi" if aarch64 else "hybrid"), f"partition table {image['partitionTableType']}")
                need(image["cloudInitDatasources"] == ["NoCloud", "ConfigDrive", "None"], f"cloud-init probes {image['cloudInitDatasources']} (None last, or a VM without a cloud-init volume boots degraded)")
            if name == "amazon" or name.endswith("-amazon"):
                need(image["amazonInit"] is False, "amazon-init runs user-data")
                need(image["ec2Efi"] is aarch64, f"ec2.efi is {image['ec2Efi']}")
            if name.endswith("-gce"):
                need(image["gceEfi"] is aarch64, f"googleComputeImage.efi is {image['gceEfi']}")
                # gVNIC (C4A, T2A, C3...): the image is registered with GVNIC (docs/gce.md).
                need("gve" in image["initrdModules"], "the gVNIC driver gve is not in the image")
            if name in ("digital-ocean", "runner-digital-ocean"):
                need(image["doRebuildFromUserData"] is False, "rebuilds the system from user-data")
            if name in CLOUD_SOURCES:
                need(not image["cloudInitUnits"], f"cloud-init units {image['cloudInitUnits']}")
                need(image["configSource"] == CLOUD_SOURCES[name], f"the agent's config source is {image['configSource']}, not {CLOUD_SOURCES[name]}")
                if name in CLOUD_HOSTNAME_UNITS:
                    need(CLOUD_HOSTNAME_UNITS[name] in image["agentAfter"], f"the agent may name the runner before {CLOUD_HOSTNAME_UNITS[name]} sets the host name")
            if name in ("nixos-runner", "default"):
                need(image["configSource"] == "file", f"the KubeVirt runner's config source is {image['configSource']}")
            if name in BROKER_IMAGES:
                need(image["configSource"] == "broker", f"the broker runner's config source is {image['configSource']}")
    assert not problems, "\n".join(problems)


def runner_problems(where, runner, kubevirt=True, config_device=None, broker=False):
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(f"{where}: {message}")

    agent, unit, mounts = runner["agent"], runner["agent"]["unit"], runner["mounts"]
    config_disk, scratch_disk = runner["configDisk"], runner["scratchDisk"]
    identity_disk, identity = runner["identityDisk"], mounts["identity"]
    if broker:
        # No runner.json on any disk: the agent writes the broker's answer to a root-only tmpfs.
        need(not config_disk["enable"] and mounts["config"] == {}, f"a config disk is mounted: {mounts['config']}")
        need(runner["runnerInfoTmpfiles"] == ["d /run/runner-info 0700 root root -"], f"/run/runner-info is not root's only: {runner['runnerInfoTmpfiles']}")
        need(identity_disk["enable"] and identity.get("device") == IDENTITY_DEVICE and identity.get("fsType") == "iso9660",
             f"the serviceAccount disk is not mounted from {IDENTITY_DEVICE}: {identity}")
        # The pod's token proves the VM to the broker: a job that read it could ask in its name.
        need(ROOT_ONLY_ISO <= set(identity.get("options", [])),
             f"serviceAccount disk options {identity.get('options')}: the pod's token must be root's only, whatever Rock Ridge says")
        need(agent["settings"]["config-source"] == "broker", f"the agent's config source is {agent['settings']['config-source']}")
        need(agent["settings"].get("broker-token-file") == identity_disk["mountPoint"] + "/token",
             f"the agent reads the pod's token from {agent['settings'].get('broker-token-file')}, the disk is at {identity_disk['mountPoint']}")
    else:
        need(not identity_disk["enable"] and identity == {},
             f"the serviceAccount disk is mounted without the broker: {identity}")
    if kubevirt and not broker:
        need(config_disk["enable"], "no config disk")
        device = config_device or f"/dev/disk/by-id/virtio-{config_disk['serial']}"
        need(mounts["config"].get("device") == device, f"config disk device {mounts['config'].get('device')}, not {device}")
        need(mounts["config"].get("fsType") == "iso9660", "config disk is not iso9660")
        need(ROOT_ONLY_ISO <= set(mounts["config"].get("options", [])),
             f"config disk options {mounts['config'].get('options')}: runner.json must be root's only, whatever Rock Ridge says")
        if config_device is None:
            # The VM system test mounts the disk from this very fstab line, through the guest's own
            # systemd-fstab-generator: what it proves (a disk attached late is mounted) is what the
            # image does.
            lines = [line for line in (GUEST_FSTAB.read_text().splitlines() if GUEST_FSTAB.exists() else [])
                     if line.strip() and not line.lstrip().startswith("#")]
            fields = lines[0].split() if len(lines) == 1 else lines
            shipped = [mounts["config"].get("device"), config_disk["mountPoint"], mounts["config"].get("fsType"),
                       ",".join(mounts["config"].get("options", []))]
            need(fields[:4] == shipped, f"{GUEST_FSTAB.relative_to(ROOT)} says {fields[:4]}, the image's fstab {shipped}")
    elif not kubevirt:
        # No disk to wait for: the agent writes runner.json from user-data into a root-only tmpfs directory.
        need(not config_disk["enable"] and mounts["config"] == {}, f"a config disk is mounted on a cloud: {mounts['config']}")
        need(runner["runnerInfoTmpfiles"] == ["d /run/runner-info 0700 root root -"], f"/run/runner-info is not root's only: {runner['runnerInfoTmpfiles']}")
    # runner-scratch mounts the scratch disk itself (check_what_each_boot_waits_for): no fstab
    # entry, whose device timeout every boot without the disk would wait out.
    need(scratch_disk["enable"] and mounts["scratch"] == {}, f"the scratch disk is an fstab mount: {mounts['scratch']}")
    need(runner["dockerDataRoot"] == scratch_disk["mountPoint"] + "/docker", f"Docker keeps its data in {runner['dockerDataRoot']}")
    need(agent["enable"] and agent["powerOff"] and agent["packageName"] == "gitlab-runner-vm", "the agent is not enabled with power-off")
    need(agent["unitFromPackage"], "the unit does not come from the package (systemd.packages)")
    need(agent["gitlabRunner"], "the agent does not start the module's gitlab-runner package")
    need(agent["poweroffCommand"].endswith("/bin/systemctl poweroff"), f"power-off command {agent['poweroffCommand']!r}")
    settings = agent["settings"]
    expected_config = config_disk["mountPoint"] + "/runner.json" if kubevirt and not broker else "/run/runner-info/runner.json"
    need(settings["config"] == expected_config, f"the agent reads {settings['config']}, not {expected_config}")
    need(settings["job-user"] == runner["ciUser"], f"jobs run as {settings['job-user']}, the CI user is {runner['ciUser']}")
    user = runner["users"].get(settings["job-user"], {})
    need(user.get("isNormalUser"), f"job user {settings['job-user']}: {user}")
    problems += trust_problems(where, runner["trust"], kubevirt)
    env = unit["environment"]
    need(env.get(env_name("job-user")) == runner["ciUser"], f"the unit's {env_name('job-user')} is {env.get(env_name('job-user'))!r}, not {runner['ciUser']!r}")
    need(env_name("runner-user") not in env, f"the unit still sets {env_name('runner-user')}, which the agent no longer reads")
    for flag, value in settings.items():
        need(env.get(env_name(flag)) == env_value(value), f"setting {flag} = {value!r} is {env_name(flag)}={env.get(env_name(flag))!r}")
    need(env_name("no-poweroff") not in env, "power-off is disabled")
    need(all(k.startswith(ENV_PREFIX) for k in env), f"unexpected variables {sorted(k for k in env if not k.startswith(ENV_PREFIX))}")
    need("multi-user.target" in unit["wantedBy"], "the unit is not wanted by multi-user.target")
    need(("runner\\x2dinfo.mount" in unit["after"]) == (kubevirt and not broker) and "runner-scratch.service" in unit["after"]
         and ("runner\\x2didentity.mount" in unit["after"]) == broker, f"the unit is ordered after {unit['after']}")
    need({"docker.service", "podman.socket"} <= set(unit["after"]), f"the agent is not stopped before Docker and Podman: after {unit['after']}")
    need({"gitlab-runner", "git", "docker"} <= set(unit["path"]), f"the unit's path {unit['path']}")
    need(set(runner["services"]) == {"runner-scratch"}, f"services {runner['services']}")
    c = runner["cloudInit"]
    need(not c["enable"] and not c["units"] and not c["packages"] and not c["unitsRunningIt"], f"cloud-init is in the system: {c}")
    # Python stays: the CI tool set carries python3 for jobs (base/tools.nix); nothing else runs it.
    need(not c["unitsRunningPython"], f"units run Python: {c['unitsRunningPython']}")
    keys = runner["sshKeys"]
    if kubevirt:
        need(not runner["platformSshKeys"] and keys["unit"] == {}, f"KubeVirt's keys come from the guest agent, not {keys['unit']}")
    else:
        need(runner["platformSshKeys"], "the platform's SSH keys do not reach the CI user")
        need(ssh_keys_problems(keys, settings["config-source"], [OPERATOR]) == [], ssh_keys_problems(keys, settings["config-source"], [OPERATOR]))
    need(runner["paths"] == ["/tmp", "/var/tmp", "/var/lib/containers", runner["users"][runner["ciUser"]]["home"]], f"on the scratch disk: {runner['paths']}")
    su = runner["scratchUnit"]
    need(su.get("DefaultDependencies") is False and "local-fs.target" in su.get("before", []) and "local-fs.target" in su.get("wantedBy", []),
         f"the scratch binds are not made before local-fs.target: {su}")
    need({"docker.service", "podman.socket", "gitlab-runner-vm.service"} <= set(su.get("before", [])), f"runner-scratch before {su.get('before')}")
    need(runner["docker"] == {"logDriver": "local", "logOpts": {"max-size": "10m", "max-file": "2"}}, f"Docker logs {runner['docker']}")
    n = runner["nix"]
    need(n["trustedUsers"] and set(n["trustedUsers"]) == {"root"}, f"Nix trusted users {n['trustedUsers']}")
    need(n["sourceIsSet"] and not n["registryNixpkgs"] and n["nixPath"] == [] and not n["registryRefersToSource"] and not n["nixPathRefersToSource"],
         f"the image's nixpkgs is pinned (and in its closure) although pinNixpkgs is false: {n}")
    a = runner["access"]
    need(a["PermitRootLogin"] == "no", f"PermitRootLogin {a['PermitRootLogin']}")
    fw = a["firewall"]
    need(fw["enable"] and not fw["nftables"] and fw["allowedTCPPorts"] == [22] and a["sshPorts"] == [22]
         and not (fw["allowedUDPPorts"] or fw["allowedTCPPortRanges"] or fw["allowedUDPPortRanges"]), f"firewall {({k: v for k, v in fw.items() if 'Commands' not in k})}")
    need(a["ssmAgent"] is False, "amazon-ssm-agent runs")
    need(a["osLogin"] is False, "OS Login is on")
    need(a["gceStartupScripts"] in (None, False), "GCE startup scripts run")
    need(runner["qemuGuest"] or not kubevirt, "no QEMU guest agent (KubeVirt readiness and SSH keys need it)")
    need(runner["ssh"] == {"enable": True, "PasswordAuthentication": False, "KbdInteractiveAuthentication": False}, f"SSH {runner['ssh']}")
    need(runner["nixChannel"] is False, "the image has a nixpkgs channel")
    need(runner["machineId"] is False, "the image bakes in /etc/machine-id")
    need(not runner["failedAssertions"], f"failed assertions: {runner['failedAssertions']}")
    need(not runner["warnings"], f"warnings: {runner['warnings']}")
    return problems


def systemd_escape_path(path):
    """`systemd-escape -p PATH` for the plain ASCII paths used here."""
    out = []
    for i, ch in enumerate(path.strip("/")):
        if ch == "/":
            out.append("-")
        elif ch.isalnum() or ch in ":_" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append("\\x%02x" % ord(ch))
    return "".join(out)


def scratch_arguments(script):
    """The --device patterns and the --udev-timeout that runner-scratch passes its script."""
    words = shlex.split(script.split("\nif ", 1)[0].replace("\\\n", " "))
    devices = [words[i + 1] for i, w in enumerate(words) if w == "--device"]
    settle = [words[i + 1] for i, w in enumerate(words) if w == "--udev-timeout"]
    return devices, settle


def check_what_each_boot_waits_for(facts):
    """Per runner image and system: the config disk is mounted when it appears (wanted by its
    device, no device timeout) and only on KubeVirt; the scratch unit looks for the platform's
    own disks once udev has named the block devices there are, waits for no device or mount
    unit, and nothing on a cloud
    image refers to a virtio serial."""
    problems = []
    seen = set()
    for system in SYSTEMS:
        for name, image in sorted(facts["images"][system].items()):
            d = image.get("disks")
            if d is None:
                continue
            seen.add(name)

            def need(ok, message):
                if not ok:
                    problems.append(f"{system} {name}: {message}")

            cloud = name in CLOUD_SOURCES
            need(d["deviceTimeouts"] == [], f"fstab device timeouts {d['deviceTimeouts']}: a boot waits them out when the disk is absent")
            if cloud:
                need(d["configMount"] == {}, f"a config disk is mounted on a cloud: {d['configMount']}")
                need(d["virtioFileSystems"] == [] and d["virtioUnits"] == [] and not any("virtio" in p for p in d["scratchDevices"]),
                     f"waits for a virtio serial: file systems {d['virtioFileSystems']}, units {d['virtioUnits']}, scratch {d['scratchDevices']}")
            else:
                disk = d["identityMount"] if name in BROKER_IMAGES else d["configMount"]
                if name in BROKER_IMAGES:
                    need(d["configMount"] == {}, f"a config disk is mounted where runner.json comes from the broker: {d['configMount']}")
                device = disk.get("device", "")
                options = disk.get("options", [])
                wanted_by = f"x-systemd.wanted-by={systemd_escape_path(device)}.device"
                expected_device = IDENTITY_DEVICE if name in BROKER_IMAGES else CONFIG_DEVICES.get(name, "/dev/disk/by-id/virtio-runner-info")
                need(device == expected_device and wanted_by in options and "nofail" in options,
                     f"the {'identity' if name in BROKER_IMAGES else 'config'} disk is not mounted whenever it appears ({wanted_by}, nofail): {disk}")
                need(not any(o.startswith(("noauto", "x-systemd.automount")) for o in options), f"config disk options {options}")
                need(d["virtioUnits"] == [], f"units wait for a virtio disk: {d['virtioUnits']}")
            need(d["scratchMount"] == {}, f"the scratch disk is an fstab mount: {d['scratchMount']}")
            need(d["scratchDevices"] == SCRATCH_DEVICES.get(name), f"scratch disks {d['scratchDevices']}, expected {SCRATCH_DEVICES.get(name)}")
            unit = d["scratchUnit"] or {}
            waits = [u for u in unit.get("after", []) + unit.get("wants", []) + unit.get("requires", []) + unit.get("bindsTo", [])
                     if u.endswith((".device", ".mount"))]
            need(unit and not waits, f"runner-scratch waits for {waits or 'nothing: it does not exist'}")
            need({"systemd-udev-trigger.service", "local-fs-pre.target"} <= set(unit.get("after", [])) and "local-fs.target" in unit.get("before", []),
                 f"runner-scratch is not between udev's coldplug and local-fs.target: after {unit.get('after')}, before {unit.get('before')}")
            devices, settle = scratch_arguments(unit.get("script", ""))
            need(devices == d["scratchDevices"], f"runner-scratch looks for {devices}, the option says {d['scratchDevices']}")
            need(len(settle) == 1 and 0 < int(settle[0]) <= SETTLE_MAX, f"udev timeout {settle}, at most {SETTLE_MAX} s expected")
            if name == "nixos-runner":
                # The VM system test boots this unit with the same script: it must look as the image's does.
                guest = {}
                for line in GUEST_SCRATCH_UNIT.read_text().splitlines():
                    if "=" in line and not line.startswith("#"):
                        key, value = line.split("=", 1)
                        guest.setdefault(key, []).extend(value.split())
                guest_devices, guest_settle = scratch_arguments(" ".join(guest.get("ExecStart", [])))
                need((guest_devices, guest_settle) == (devices, settle), f"{GUEST_SCRATCH_UNIT.relative_to(ROOT)} looks for "
                     f"{guest_devices} (udev timeout {guest_settle}), the image for {devices} (udev timeout {settle})")
                need(set(guest.get("After", [])) == set(unit.get("after", [])) and "local-fs.target" in guest.get("Before", [])
                     and guest.get("DefaultDependencies") == ["no"],
                     f"{GUEST_SCRATCH_UNIT.relative_to(ROOT)} is ordered after {guest.get('After')}, the image's after {unit.get('after')}")
            need(d["nixBuildDir"] == "/var/lib/scratch/nix-builds", f"Nix builds in {d['nixBuildDir']}, not on the scratch disk")
            need("install -d -m 0755 /var/lib/scratch/nix-builds" in unit.get("script", ""), "runner-scratch does not make Nix's build directory")
            need(isinstance(d["nixMinFree"], int) and isinstance(d["nixMaxFree"], int) and 0 < d["nixMinFree"] < d["nixMaxFree"],
                 f"the store is not collected when the root runs low: min-free {d['nixMinFree']}, max-free {d['nixMaxFree']}")
    expected = set(SCRATCH_DEVICES)
    assert seen == expected, f"runner images with disk facts {sorted(seen)}, expected {sorted(expected)}"
    assert not problems, "\n".join(problems)


def trust_problems(where, t, kubevirt):
    """The job user cannot become root or read the journal, has rootless Podman; operators log
    in as a user of their own; sshd reads no job-writable authorized_keys."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(f"{where}: {message}")

    job, op, sshd = t["jobUser"], t["operator"], t["sshd"]
    need(not (set(job["groups"]) & (ROOT_GROUPS | JOURNAL_GROUPS)), f"the job user {job['name']} is in {sorted(set(job['groups']) & (ROOT_GROUPS | JOURNAL_GROUPS))}")
    need(job["sudoRules"] == [], f"sudo rules name the job user or its groups: {job['sudoRules']}")
    need(t["sudo"]["execWheelOnly"], "sudo is executable by every user, not only wheel")
    need(not t["sudo"]["sudoRs"], "sudo-rs is on (its rules are not checked here)")
    need(t["podman"] and job["autoSubUidGidRange"] and job["linger"], f"no rootless Podman for the job user: podman {t['podman']}, {job}")
    need(job["homeMode"] == "700", f"the job user's home is {job['homeMode']}")
    need(t["warnings"] == [], f"warns that jobs can become root: {t['warnings']}")
    need(op["name"] == OPERATOR and op["name"] != job["name"], f"operator user {op['name']}, job user {job['name']}")
    need(op["isNormalUser"] and op["createHome"] and op["homeMode"] == "700" and "wheel" in op["groups"], f"operator user {op}")
    need(any("wheel" in r["groups"] for r in op["sudoRules"]), f"the operator has no sudo: {op['sudoRules']}")
    need(sshd["authorizedKeysInHomedir"] is False, "sshd reads every user's ~/.ssh/authorized_keys")
    need(sshd["authorizedKeysCommand"] == "none", f"AuthorizedKeysCommand {sshd['authorizedKeysCommand']}")
    need(not any("%h" in f or ".ssh" in f or "~" in f for f in sshd["authorizedKeysFiles"]), f"AuthorizedKeysFile {sshd['authorizedKeysFiles']} is in a home")
    need(len(sshd["globalAuthorizedKeysFile"]) == 1 and "%h" not in sshd["globalAuthorizedKeysFile"][0] and ".ssh" not in sshd["globalAuthorizedKeysFile"][0],
         f"sshd's global {sshd['globalAuthorizedKeysFile']}")
    if kubevirt:
        # KubeVirt's accessCredentials: the QEMU guest agent writes ~/.ssh/authorized_keys of the
        # user they name; sshd reads it for the operator only.
        expected = [f"Match User {OPERATOR}", "  AuthorizedKeysFile %h/.ssh/authorized_keys " + " ".join(sshd["authorizedKeysFiles"])]
        need(sshd["match"] == expected, f"sshd's Match blocks {sshd['match']}, expected {expected}")
    else:
        need(sshd["match"] == [], f"sshd's Match blocks on a cloud: {sshd['match']}")
        need(f"{SSH_KEYS_DIR}/%u" in sshd["authorizedKeysFiles"], f"AuthorizedKeysFile {sshd['authorizedKeysFiles']}")
    return problems


def ssh_keys_problems(keys, source, users):
    """The SSH keys unit fetches the platform's keys for exactly `users` into /run/ssh-keys/<user>."""
    problems = []
    unit = keys["unit"]
    if not unit:
        return ["no gitlab-runner-vm-ssh-keys unit"]
    expected = [f"ssh-keys --user {u} --config-source {source} --authorized-keys-dir {SSH_KEYS_DIR}" for u in users]
    got = [re.sub(r"^/nix/store/[a-z0-9]{32}-gitlab-runner-vm-[^/]+/bin/gitlab-runner-vm ", "", e) for e in unit["execStart"]]
    if got != expected:
        problems.append(f"the unit runs {unit['execStart']}, expected gitlab-runner-vm {expected}")
    sc = unit["serviceConfig"]
    if (sc.get("Type"), sc.get("RuntimeDirectory"), sc.get("RuntimeDirectoryMode"), sc.get("User", "root")) != ("oneshot", "ssh-keys", "0755", "root"):
        problems.append(f"not a oneshot as root writing a 0755 /run/ssh-keys (sshd's StrictModes): {sc}")
    if "network-online.target" not in unit["after"] or "multi-user.target" not in unit["wantedBy"]:
        problems.append(f"not run at boot once the network is up: after {unit['after']}, wanted by {unit['wantedBy']}")
    if "sshd.service" in unit["before"]:
        problems.append("sshd waits for the metadata service")
    if f"{SSH_KEYS_DIR}/%u" not in keys["authorizedKeysFiles"]:
        problems.append(f"sshd does not read {SSH_KEYS_DIR}/%u: AuthorizedKeysFile {keys['authorizedKeysFiles']}")
    return problems


def check_runner_image(facts):
    problems = []
    for system in SYSTEMS:
        problems += runner_problems(f"nixos-runner {system}", facts["runner"][system])
    assert not problems, "\n".join(problems)


def check_broker_runner_image(facts):
    """nixos-runner-broker: the KubeVirt runner without runner.json: the serviceAccount disk
    mounted root's only where the agent reads the pod's token, runner.json from the broker's
    answer on a root-only tmpfs."""
    problems = []
    for system in SYSTEMS:
        problems += runner_problems(f"nixos-runner-broker {system}", facts["runnerBroker"][system], broker=True)
    assert not problems, "\n".join(problems)


def check_broker_container_image(facts):
    """broker-image: the broker's own package as the entry point, as nobody (65534, what
    examples/kubevirt/broker/broker.yaml's securityContext runs it as), CA certificates for
    GitLab's TLS, its port; the manifest names where to push it."""
    problems = []
    manifest = (ROOT / "examples" / "kubevirt" / "broker" / "broker.yaml").read_text()
    for system in SYSTEMS:
        b = facts["brokerImage"][system]
        c = b["imageConfig"]

        def need(ok, message):
            if not ok:
                problems.append(f"{system}: {message}")

        need(b["imageName"] == "gitlab-runner-vm-broker" and b["brokerName"] == "gitlab-runner-vm-broker" and b["sameBroker"],
             f"image {b['imageName']} of {b['brokerName']} (the flake's broker package: {b['sameBroker']})")
        need(c["Entrypoint"] == [b["brokerExe"]], f"the entry point is {c['Entrypoint']}, not {b['brokerExe']}")
        need(c["User"] == "65534:65534", f"runs as {c['User']}")
        need(any(e.startswith("SSL_CERT_FILE=/nix/store/") and e.endswith("/etc/ssl/certs/ca-bundle.crt") for e in c["Env"]),
             f"no CA certificates for GitLab's TLS: {c['Env']}")
        need(list(c["ExposedPorts"]) == ["8080/tcp"] and "--listen=0.0.0.0:8080" in manifest, f"ports {c['ExposedPorts']}")
    if "nix build .#broker-image" not in manifest:
        problems.append("broker.yaml does not say how its image is built (nix build .#broker-image)")
    assert not problems, "\n".join(problems)


def check_proxmox_runner_image(facts):
    """runner-proxmox: the runner with runner.json from a CD-ROM found by its ISO 9660 label,
    `cfgdata` (what examples/proxmox/runner-fleet.sh writes), mounted as KubeVirt's config disk."""
    problems = runner_problems("runner-proxmox", facts["runnerProxmox"], config_device="/dev/disk/by-label/cfgdata")
    script = open("examples/proxmox/runner-fleet.sh").read()
    if "-V cfgdata" not in script:
        problems.append("examples/proxmox/runner-fleet.sh does not label its ISO cfgdata")
    page = open("docs/proxmox.md").read()
    gib = facts["runnerProxmoxDiskMiB"] // 1024
    if f"a compressed qcow2 of a {gib} GiB disk" not in page:
        problems.append(f"docs/proxmox.md does not give the image's disk size, {gib} GiB")
    assert not problems, "\n".join(problems)


def check_jobs_cannot_reach_the_metadata_service(facts):
    """The metadata firewall runs in every runner image, by cgroup and never by uid; its rules,
    allowed units and nftables variant are checked by check-firewall.py (firewall-facts.nix)."""
    problems = []
    for where, runner in [("runner-amazon", facts["runnerAmazon"]), ("runner-gce", facts["runnerGce"]),
                          ("runner-digital-ocean", facts["runnerDo"]), ("runner-proxmox", facts["runnerProxmox"]),
                          ("nixos-runner", facts["runner"]["x86_64-linux"])]:
        fw = runner["access"]["firewall"]
        if not re.search(r"/bin/gitlab-runner-vm-metadata-firewall setup$", fw["extraCommands"], re.M):
            problems.append(f"{where}: the firewall does not set up the metadata firewall: {fw['extraCommands']}")
        if "--uid-owner" in fw["extraCommands"]:
            problems.append(f"{where}: a uid is exempt from the metadata firewall")
    assert not problems, "\n".join(problems)


def check_cloud_runner_images(facts):
    problems = []
    for name in ("runnerAmazon", "runnerGce", "runnerDo"):
        problems += runner_problems(name, facts[name], kubevirt=False)
    h = facts["runnerGce"]["gceSetHostname"]
    if "gitlab-runner-vm.service" not in h.get("before", []) or "network-online.target" not in h.get("after", []):
        problems.append(f"runner-gce: the agent may name the runner before gce-set-hostname sets the host name: {h}")
    g = facts["runnerGce"]["access"]["gceInstanceConfigs"]
    if "accounts_daemon = false" not in g or "startup = false" not in g:
        problems.append(f"runner-gce: the guest agent makes users or runs scripts from metadata:\n{g}")
    assert not problems, "\n".join(problems)


def check_host_key_fingerprints_reach_the_console(facts):
    """GCE and DigitalOcean images print the SSH host keys' fingerprints on the console once
    sshd-keygen made them (nothing else does there); EC2 images have nixpkgs' own unit."""
    problems = []
    for system, images in facts["images"].items():
        for name, image in images.items():
            unit = image["hostKeyFingerprints"]
            cloud = image["gceEfi"] is not None or image["doRebuildFromUserData"] is not None
            if not cloud:
                if unit is not None:
                    problems.append(f"{system} {name}: prints host key fingerprints but is no GCE or DigitalOcean image")
                continue
            if unit is None:
                problems.append(f"{system} {name}: a GCE/DigitalOcean image without print-host-key-fingerprints")
                continue
            exec_start = " ".join(unit["ExecStart"]) if isinstance(unit["ExecStart"], list) else unit["ExecStart"]
            # The agent's console prefix, handed over from the agent's facts, not written again.
            prefix = json.loads((ROOT / "agent" / "facts.json").read_text())["console_prefix"]
            if ("sshd-keygen.service" not in unit["after"] or "multi-user.target" not in unit["wantedBy"]
                    or unit["StandardOutput"] != "file:/dev/console" or unit["Type"] != "oneshot"
                    or f"host-key-fingerprints.sh '{prefix}' " not in exec_start
                    or "/bin/ssh-keygen /etc/ssh" not in exec_start):
                problems.append(f"{system} {name}: print-host-key-fingerprints is not what it should be: {unit}")
        for name, image in images.items():
            if image["amazonInit"] is not None and not image["ec2PrintHostKey"]:
                problems.append(f"{system} {name}: an EC2 image without nixpkgs' print-host-key unit")
    assert not problems, "\n".join(problems)


def check_options_open_what_runner_images_close(facts):
    o = facts["opened"]
    assert o["amazon"]["ssmAgent"] and o["amazon"]["PermitRootLogin"] == "prohibit-password", o["amazon"]
    problems = ssh_keys_problems(o["amazon"]["sshKeys"], "aws", [OPERATOR, "root"])
    assert not problems, f"rootLogin = true: root does not get the platform's keys: {problems}"
    assert o["gce"]["osLogin"] and o["gce"]["gceStartupScripts"] and "accounts_daemon = true" in o["gce"]["gceInstanceConfigs"], o["gce"]
    c = o["kubevirtCloudInit"]
    assert c["enable"] is True, "gitlabRunnerVm.kubevirt.cloudInit = true does not turn cloud-init on"
    # A runner image that runs cloud-init keeps it data-only, its keys for the CI user.
    assert c["allowUserdata"] is False and "scripts-user" not in c["modules"], f"cloud-init interprets user-data: {c}"
    assert (c["users"], c["disableRoot"], c["defaultUser"]) == (["default"], True, OPERATOR), f"cloud-init's keys go to {c}"
    assert c["datasources"] == ["NoCloud", "ConfigDrive", "None"], f"cloud-init probes {c['datasources']}"
    assert "runner" in o["trusted"], f"nixTrustedUser = true: trusted users {o['trusted']}"
    p = o["pinned"]
    assert p["registryNixpkgs"] and p["nixPath"] and p["registryRefersToSource"] and p["nixPathRefersToSource"], f"pinNixpkgs = true pins nothing: {p}"
    b = facts["baseImage"]
    assert b["circleciAmazonSsm"] and b["circleciGceStartupScripts"], f"the CircleCI images lost their platform agents: {b}"
    assert b["access"]["cloudInit"]["enable"], "the KubeVirt base image has no cloud-init"


def check_user_overrides_without_mkforce(facts):
    o = facts["overridden"]
    expected = {
        "docker": False, "podman": False, "sudoPassword": True, "nixLd": False, "swappiness": 60,
        "man": True, "passwordAuthentication": True, "dockerExecutor": False, "ciUserGroups": [],
        "failedAssertions": [],
    }
    wrong = {k: o[k] for k, v in expected.items() if o[k] != v}
    assert not wrong, f"a user's plain definitions did not win: {wrong}"
    env = o["environment"]
    assert env[env_name("job-user")] == "jobs" and env[env_name("config")] == "/etc/gitlab-runner-vm/runner.json", env


def check_removed_user_data_options_say_what_to_do(facts):
    messages = facts["removedUserData"]
    assert len(messages) == 1 and "gitlabRunnerVm.runner.userData" in messages[0] and "config-source" in messages[0], messages


def check_old_option_names(facts):
    o = facts["oldNames"]
    assert (o["ciUser"], o["scratch"], o["compress"], o["failureDelay"], o["runnerUser"]) == ("ci", False, False, 7, "ci"), o
    assert not o["failedAssertions"], o["failedAssertions"]
    for old in ("baseImage", "runnerImage", "kubevirtImage", "services.gitlab-runner-vm.failureDelay", "services.gitlab-runner-vm.runnerUser"):
        assert any(f"`{old}'" in w and "renamed" in w for w in o["warnings"]), f"no rename warning for {old}: {o['warnings']}"
    s = o["setting"]
    assert s["jobUser"] == "ci" and not s["failedAssertions"], s
    assert s["environment"].get(env_name("job-user")) == "ci" and env_name("runner-user") not in s["environment"], s["environment"]
    assert any("`services.gitlab-runner-vm.settings.runner-user'" in w and "renamed" in w and "job-user" in w for w in s["warnings"]), s["warnings"]


def check_jobs_can_become_root_only_when_asked(facts):
    """jobsCanBecomeRoot = true: wheel, sudo and docker for the job user, and a warning that says
    what it costs; the same user made root by hand warns too. (The default is checked for every
    runner image in runner_problems: no root group, no sudo rule, no warning.)"""
    problems = []
    for system, t in facts["opened"]["jobsCanBecomeRoot"].items():
        job = t["jobUser"]
        if not {"wheel", "docker"} <= set(job["groups"]):
            problems.append(f"{system}: jobsCanBecomeRoot = true, but the job user is in {job['groups']}")
        if not any("wheel" in r["groups"] and r["commands"] == ["ALL"] for r in job["sudoRules"]) or t["sudo"]["wheelNeedsPassword"]:
            problems.append(f"{system}: jobsCanBecomeRoot = true, but no passwordless sudo: {job['sudoRules']}, {t['sudo']}")
        w = " ".join(" ".join(t["warnings"]).split())
        for words in ("jobs can become root", "jobsCanBecomeRoot", "runner token", "one `sudo` away", "trusts the others", "dies with the VM"):
            if words not in w:
                problems.append(f"{system}: the warning does not say {words!r}: {t['warnings']}")
    by_hand = facts["opened"]["byHand"]
    if len(by_hand["warnings"]) != 1 or "in wheel" not in by_hand["warnings"][0]:
        problems.append(f"the job user put in wheel by hand: warnings {by_hand['warnings']}")
    assert not problems, "\n".join(problems)


def check_settings(facts):
    s = facts["settings"]
    env = s["unit"]["environment"]
    expected = {
        "NO_POWEROFF": "true", "STOP_TIMEOUT": "100", "SOME_FUTURE_FLAG": "a value",
        "A_FUTURE_SWITCH": "true", "A_FUTURE_COUNT": "3",
    }
    wrong = {k: env.get(ENV_PREFIX + k) for k, v in expected.items() if env.get(ENV_PREFIX + k) != v}
    assert not wrong, f"settings became {wrong}, expected {expected}"
    assert ENV_PREFIX + "A_FUTURE_DEFAULT" not in env, "a null setting was passed on"
    assert env[ENV_PREFIX + "POWEROFF_COMMAND"] == s["poweroff-command"] and s["poweroff-command"].endswith("systemctl poweroff"), (
        "powerOff = false must set --no-poweroff, not replace the power-off command"
    )
    assert s["unit"]["serviceConfig"].get("TimeoutStopSec") == "150s", f"TimeoutStopSec {s['unit']['serviceConfig']} (100 + 30 + 20 s expected)"
    assert "hello" in s["unit"]["path"], f"extraPackages are not on the unit's path: {s['unit']['path']}"
    assert not s["failedAssertions"], s["failedAssertions"]


def check_standalone_module(facts):
    s = facts["standalone"]
    assert not s["failedAssertions"], s["failedAssertions"]
    assert s["toplevel"].endswith(".drv"), s["toplevel"]
    assert s["unitFromPackage"] and s["packageName"] == "gitlab-runner-vm", s
    env = s["unit"]["environment"]
    assert env[env_name("config")] == "/runner-info/runner.json" and env[env_name("job-user")] == "runner", env
    assert "multi-user.target" in s["unit"]["wantedBy"], s["unit"]


def check_circleci_and_base(facts):
    c = facts["circleci"]
    # CircleCI's machine images promise sudo and Docker to the circleci user.
    assert c["ciUser"] == "circleci" and {"wheel", "docker"} <= set(c["circleciGroups"]), c
    assert any("wheel" in r["groups"] and r["commands"] == ["ALL"] for r in c["circleciSudoRules"]) and not c["wheelNeedsPassword"], c
    assert "runner" not in c["users"] and not c["agent"], c
    assert c["display"] == ":99", c["display"]
    xvfb = c["xvfb"]["serviceConfig"]
    assert re.search(r"/bin/Xvfb :99 -screen 0 \S+ -nolisten tcp$", xvfb["ExecStart"]) and xvfb["User"] == "circleci", xvfb
    b = facts["base"]
    assert b == {"agent": False, "ciUser": "runner"}, b


def check_proxmox(facts):
    p = facts["proxmox"]
    assert p["adminUser"] == "admin" and p["users"] == ["admin"] and p["defaultUser"] == "admin", p
    assert p["cloudInit"] == {"enable": True, "network": True} and p["permitRootLogin"] == "no", p


def check_one_package(facts):
    p = facts["package"]
    paths = {k: p[k] for k in ("overlay", "check", "image", "standalone")}
    assert len(set(paths.values())) == 1, f"the agent's package differs: {paths}"


def check_package_installs_the_unit(facts):
    """The package's evaluated install step, run here with a stand-in for stdenv's substituteInPlace."""
    if shutil.which("bash") is None:
        raise Skip("no bash")
    stub = r'''
substituteInPlace() {
  local file=$1; shift
  while [ $# -gt 0 ]; do
    [ "$1" = --replace-fail ] || { echo "stand-in substituteInPlace: $1 is not supported" >&2; return 1; }
    grep -qF -- "$2" "$file" || { echo "substituteInPlace: '$2' not found in $file" >&2; return 1; }
    python3 -c 'import sys; p, a, b = sys.argv[1:]; s = open(p).read(); open(p, "w").write(s.replace(a, b))' "$file" "$2" "$3"
    shift 3
  done
}
'''
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "agent" / "dist").mkdir(parents=True)
        shutil.copy(UNIT, src / "agent" / "dist")
        out = Path(tmp) / "out"
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", stub + facts["package"]["postInstall"]],
                             cwd=src, env={**os.environ, "out": str(out)}, capture_output=True, text=True)
        assert run.returncode == 0, f"postInstall failed: {run.stderr}"
        unit = out / "lib" / "systemd" / "system" / "gitlab-runner-vm.service"
        assert unit.is_file(), "no lib/systemd/system/gitlab-runner-vm.service"
        execs = re.findall(r"^ExecStart=(.*)$", unit.read_text(), re.M)
        assert execs == [f"{out}/bin/gitlab-runner-vm run"], f"ExecStart {execs}"


def check_system_is_a_default(facts):
    assert facts["moved"].endswith("-aarch64-linux.qcow2"), facts["moved"]


def agent_binary():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    found = [p for p in (target / "debug" / "gitlab-runner-vm", target / "release" / "gitlab-runner-vm") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def check_the_agent_reads_every_variable_the_module_sets(facts):
    binary = agent_binary()
    if binary is None:
        raise Skip("no built gitlab-runner-vm in target/ (tests/run builds it with cargo test first)")
    help_text = subprocess.run([str(binary), "run", "--help"], capture_output=True, text=True, check=True).stdout
    known = set(re.findall(r"\[env: (GITLAB_RUNNER_VM_[A-Z0-9_]+)=", help_text))
    assert known, "`gitlab-runner-vm run --help` names no environment variables"
    unknown = sorted(set(facts["runner"]["x86_64-linux"]["agent"]["unit"]["environment"]) - known)
    assert not unknown, f"the module sets variables the agent does not read: {unknown}"


def check_the_module_keeps_the_agents_defaults(facts):
    """Every whole-number setting the module gives the runner image (the timeouts and holds) is
    the agent's own default: the clap definitions are the one place defaults are decided."""
    binary = agent_binary()
    if binary is None:
        raise Skip("no built gitlab-runner-vm in target/ (tests/run builds it with cargo test first)")
    help_text = subprocess.run([str(binary), "run", "--help"], capture_output=True, text=True, check=True).stdout
    # One line in short help, two in long help (which clap prints for every flag once one flag
    # documents its possible values, as --config-source does).
    defaults = dict(re.findall(r"\[env: (GITLAB_RUNNER_VM_[A-Z0-9_]+)=\]\s*\[default: (\d+)\]", help_text))
    assert defaults, "`gitlab-runner-vm run --help` shows no numeric defaults"
    env = facts["runner"]["x86_64-linux"]["agent"]["unit"]["environment"]
    differ = {k: (env[k], defaults[k]) for k in defaults if k in env and env[k] != defaults[k]}
    assert not differ, f"module value != agent default: {differ}"
    missing = sorted(k for k in defaults if k not in env)
    assert not missing, f"the module does not document these flags' defaults: {missing}"


def caches_problems(where, caches, mirrors):
    """dockerd reads /etc/docker/daemon.json (where the agent merges runner.json's
    registry_mirrors), which holds the image's settings and its mirrors; Podman's drop-in names
    the same mirrors; the agent's flags keep their defaults (the paths the image uses)."""
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(f"{where}: {message}")

    exec_start = caches["dockerExecStart"] or []
    need(any("--config-file=/etc/docker/daemon.json" in line for line in exec_start),
         f"dockerd does not read /etc/docker/daemon.json: {exec_start}")
    need(not any("--config-file=/nix/store/" in line for line in exec_start),
         f"dockerd reads a daemon.json in the store: {exec_start}")
    etc = json.loads(caches["etcDaemonJson"] or "null")
    need(etc == caches["dockerSettings"], f"/etc/docker/daemon.json is not the image's settings: {etc} != {caches['dockerSettings']}")
    need((etc or {}).get("registry-mirrors", []) == mirrors, f"daemon.json's registry-mirrors: {(etc or {}).get('registry-mirrors')} != {mirrors}")
    podman = caches["podmanMirrors"]
    if mirrors:
        hosts = [m.split("://", 1)[1].rstrip("/") for m in mirrors]
        found = re.findall(r'^location = "([^"]+)"', podman or "", re.M)
        need(found == ["docker.io"] + hosts, f"Podman's drop-in mirrors: {found}")
        need(('insecure = true' in (podman or "")) == any(m.startswith("http://") for m in mirrors), "Podman's drop-in: insecure for plain http")
    else:
        need(podman is None, f"a Podman mirror drop-in without mirrors: {podman}")
    need(caches["agentSettings"] == {}, f"the agent's daemon paths are set: {caches['agentSettings']}")
    need("!include /etc/nix/gitlab-runner-vm.conf" in caches["nixExtraOptions"].splitlines(),
         f"nix.conf does not include the fleet's substituters (the agent's --nix-conf): {caches['nixExtraOptions']!r}")
    need(set(caches["trusted-users"]) == {"root"}, f"trusted users besides root: {caches['trusted-users']}")
    need(caches["trustedSubstituters"] == [], f"the image trusts substituters for users: {caches['trustedSubstituters']}")
    return problems


def check_caches_registry_mirrors_and_substituters_land_in_the_daemons_settings(facts):
    problems = []
    for where, runner in [("runner-amazon", facts["runnerAmazon"]), ("runner-gce", facts["runnerGce"]),
                          ("runner-digital-ocean", facts["runnerDo"]), ("runner-proxmox", facts["runnerProxmox"])] \
            + [(f"nixos-runner {s}", facts["runner"][s]) for s in SYSTEMS]:
        problems += caches_problems(where, runner["caches"], [])
    for system in SYSTEMS:
        with_caches = facts["withCaches"][system]
        problems += caches_problems(f"registryMirrors set, {system}", with_caches,
                                    ["https://mirror.gcr.io", "http://registry-cache.ci.svc.cluster.local:5000"])
        if "https://nix-cache.example.com" not in with_caches["substituters"] \
                or "nix-cache.example.com-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=" not in with_caches["trusted-public-keys"]:
            problems.append(f"gitlabRunnerVm.base.substituters, {system}: not in nix.conf: "
                            f"{with_caches['substituters']}, {with_caches['trusted-public-keys']}")
    for where, runner in [("runner-amazon", facts["runnerAmazon"]), (f"nixos-runner {SYSTEMS[1]}", facts["runner"][SYSTEMS[1]])]:
        # nixpkgs adds its own default (with a trailing /) to the image's.
        if {s.rstrip("/") for s in runner["caches"]["substituters"]} != {"https://cache.nixos.org"}:
            problems.append(f"{where}: the image's substituters are not the default: {runner['caches']['substituters']}")
    assert not problems, "\n".join(problems)


def main():
    facts = json.loads(Path(sys.argv[1]).read_text())
    checks = [(name[len("check_"):].replace("_", " "), fn) for name, fn in globals().items() if name.startswith("check_") and callable(fn)]
    passed = failed = skipped = 0
    for name, fn in checks:
        try:
            fn(facts)
        except Skip as e:
            skipped += 1
            print(f"skip  {name}: {e}")
        except Exception as e:  # an assertion, or a fact missing from the JSON
            failed += 1
            message = str(e) or type(e).__name__
            print(f"FAIL  {name}\n      " + message.replace("\n", "\n      "))
        else:
            passed += 1
            print(f"ok    {name}")
    print(f"evaluated configurations: {passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
