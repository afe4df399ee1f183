"""The guest's disks: the cached Debian root file system (build-rootfs), the root disk made
from it for one scenario, and runner.json on an ISO 9660 disk as KubeVirt presents a Secret."""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time

from .config import (AGENT_BIN, BUILD_ROOTFS, CACHE, FACTS, FAILURE_DELAY, GUEST_AGENT,
                     GUEST_FILES, GUEST_FIREWALL, GUEST_FIREWALL_AGENT, GUEST_SCRATCH_DISK, GUEST_UNIT,
                     METADATA_FIREWALL,
                     REPO, ROOT_LABEL, SCRATCH_DISK_SCRIPT, SCRATCH_MIB, UNIT, UNIT_PLACEHOLDER,
                     STATE_DIR, UNIT_SRC, log)


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
    return "".join(out) or "-"


# ---- the cached root file system -------------------------------------------------------------

def base_key():
    with open(BUILD_ROOTFS, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def ensure_base():
    """The cached tree for the current build-rootfs, built if missing. Returns (dir, seconds
    spent building it or None when it was cached)."""
    os.makedirs(CACHE, exist_ok=True)
    dest = os.path.join(CACHE, f"base-{base_key()}")
    with open(os.path.join(CACHE, "base.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(os.path.join(dest, "rootfs")):
            return dest, None
        log(f"cold cache: building the Debian root file system into {os.path.relpath(dest, REPO)}")
        started = time.time()
        subprocess.run([BUILD_ROOTFS, dest], check=True)
        seconds = time.time() - started
        log(f"root file system built in {seconds:.0f} s")
        for old in os.listdir(CACHE):
            if old.startswith("base-") and old != os.path.basename(dest):
                shutil.rmtree(os.path.join(CACHE, old), ignore_errors=True)
        return dest, seconds


# ---- the guest's root disk -------------------------------------------------------------------

class Tree:
    """A hard-link copy of the cached tree that files are added to. Every write replaces the
    directory entry instead of writing through it, so the cache is never modified."""

    def __init__(self, base_rootfs, path):
        self.path = path
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["cp", "-al", base_rootfs, path], check=True)

    def _target(self, guest_path):
        full = os.path.join(self.path, guest_path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full):
            os.unlink(full)
        return full

    def put(self, guest_path, data, mode=0o644, owner=(0, 0)):
        full = self._target(guest_path)
        with open(full, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode())
        os.chown(full, *owner)
        os.chmod(full, mode)

    def put_file(self, guest_path, host_path, mode):
        with open(host_path, "rb") as f:
            self.put(guest_path, f.read(), mode)

    def link(self, guest_path, target):
        os.symlink(target, self._target(guest_path))

    def enable(self, unit, unit_path, target):
        self.link(f"/etc/systemd/system/{target}.wants/{unit}", unit_path)


def installed_unit_text():
    """The canonical unit with only the Nix package's substitution (nix/package.nix)."""
    with open(UNIT_SRC) as f:
        text = f.read()
    if UNIT_PLACEHOLDER not in text:
        raise SystemExit(f"{UNIT_SRC} no longer mentions {UNIT_PLACEHOLDER}: update tests/vm/vmtest")
    return text.replace(UNIT_PLACEHOLDER, GUEST_AGENT)


# Guest scripts that name the agent's state directory say @STATE_DIR@, filled in from
# agent/facts.json as they are installed, so that none of them copies it.
STATE_DIR_PLACEHOLDER = "@STATE_DIR@"


def guest_script_text(name):
    """tests/vm/guest/NAME as the guest gets it: the agent's state directory filled in."""
    with open(os.path.join(GUEST_FILES, name)) as f:
        return f.read().replace(STATE_DIR_PLACEHOLDER, STATE_DIR)


POWEROFF_REAL = "/bin/systemctl poweroff"
# The agent's flags that nixos-modules/gitlab-runner-vm.nix declares as typed settings with the
# agent's own defaults (`flagOption`), which it therefore always puts in the unit's environment.
MODULE_SETTINGS = ["config", "config-source", "keep-file", "failure-delay", "config-wait",
                   "register-timeout", "deregister-timeout", "stop-timeout", "hold-max",
                   "hold-extend", "daemon-reload-timeout"]


def metadata_firewall():
    """nixos-modules/metadata-firewall.sh when the repository has it, else None."""
    return METADATA_FIREWALL if os.path.exists(METADATA_FIREWALL) else None


def agent_dropin(scenario):
    """What the NixOS module (nixos-modules/gitlab-runner-vm.nix) adds to the unit: its ordering
    after the config mount and the agent's flags as environment variables, module defaults
    except for a short failure delay where a scenario waits for it; in the hostile-job
    scenarios also the metadata firewall's admission of the agent's cgroup, as runner.nix
    declares it (ExecStartPre=+, before the agent moves itself into `agent`), its revocation
    with `runner` and `jobs` (ExecStopPost=+), and the script the agent runs to admit
    gitlab-runner's `runner` for a cache with the instance's identity (scenario f)."""
    mount = systemd_escape_path("/runner-info") + ".mount"
    flags = FACTS["run_flags"]
    # The settings the module declares, at the agent's defaults (agent/facts.json)...
    env = {flags[name]["env"]: str(flags[name]["default"]) for name in MODULE_SETTINGS}
    # ...and the module's own values where it has them.
    env.update({
        flags["state-dir"]["env"]: STATE_DIR,
        flags["gitlab-runner"]["env"]: "/usr/local/bin/gitlab-runner",
        flags["job-user"]["env"]: "runner",
        flags["poweroff-command"]["env"]: POWEROFF_REAL,
    })
    if scenario.failure_delay:
        env[flags["failure-delay"]["env"]] = str(FAILURE_DELAY)
    if scenario.poweroff_disabled:
        # services.gitlab-runner-vm.powerOff = false (debug images) sets the agent's --no-poweroff.
        env[flags["no-poweroff"]["env"]] = "true"
    lines = ["# As nixos-modules/gitlab-runner-vm.nix and runner.nix configure the unit.",
             "[Unit]", f"After={mount}", "", "[Service]"]
    lines += [f'Environment="{k}={v}"' for k, v in env.items()]
    if scenario.hostile and metadata_firewall():
        # nixos-modules/metadata-firewall.nix's hooks for the agent's unit (allowedSubgroups
        # agent, extraSubgroups runner), the backend baked in as there.
        fw = f"{GUEST_FIREWALL} --backend {scenario.firewall_backend}"
        lines += [f"ExecStartPre=+{fw} mkdir-self runner jobs", f"ExecStartPre=+{fw} allow-self agent",
                  f"ExecStopPost=+{fw} revoke-self agent", f"ExecStopPost=+{fw} revoke-self runner",
                  f"ExecStopPost=+{fw} revoke-self jobs",
                  # settings.metadata-firewall: the script with its backend baked in, as Nix does.
                  f'Environment="GITLAB_RUNNER_VM_METADATA_FIREWALL={GUEST_FIREWALL_AGENT}"']
    return "\n".join(lines) + "\n"


def build_root_image(base, scenario, workdir):
    """The guest's root disk: the cached tree plus the agent, its unit and the test's files."""
    tree = Tree(os.path.join(base, "rootfs"), os.path.join(workdir, "tree"))
    sysd = "/etc/systemd/system"
    # The agent, as a package installs it (systemd.packages: the unit in lib/systemd/system),
    # wanted by multi-user.target and configured by a drop-in, as the NixOS module does.
    tree.put_file(GUEST_AGENT, AGENT_BIN, 0o755)
    tree.put(GUEST_UNIT, installed_unit_text())
    tree.enable(UNIT, GUEST_UNIT, "multi-user.target")
    tree.put(f"{sysd}/{UNIT}.d/overrides.conf", agent_dropin(scenario))
    # /runner-info, as the NixOS runner module writes it to /etc/fstab (guest/runner-info.fstab):
    # the guest's systemd-fstab-generator makes the mount unit, wanted by the disk's device.
    with open(os.path.join(tree.path, "etc", "fstab")) as f:
        fstab = f.read()
    with open(os.path.join(GUEST_FILES, "runner-info.fstab")) as f:
        fstab += f.read()
    tree.put("/etc/fstab", fstab)
    # The scratch disk's unit and script, as the NixOS runner module runs them.
    tree.put_file(GUEST_SCRATCH_DISK, SCRATCH_DISK_SCRIPT, 0o755)
    tree.put_file(f"{sysd}/runner-scratch.service", os.path.join(GUEST_FILES, "runner-scratch.service"), 0o644)
    tree.enable("runner-scratch.service", f"{sysd}/runner-scratch.service", "local-fs.target")
    # The fake gitlab-runner, and the evidence helpers.
    tree.put_file("/usr/local/bin/gitlab-runner", os.path.join(GUEST_FILES, "gitlab-runner"), 0o755)
    for helper in ("vmtest-status-watch", "vmtest-evidence"):
        tree.put(f"/usr/local/libexec/vmtest/{helper}", guest_script_text(helper), 0o755)
        tree.put_file(f"{sysd}/{helper}.service", os.path.join(GUEST_FILES, f"{helper}.service"), 0o644)
        tree.enable(f"{helper}.service", f"{sysd}/{helper}.service", "multi-user.target")
    if scenario.keep_file:
        tree.put("/etc/keep-runner", "Held by the VM system test (scenario b).\n")
    # The fake gitlab-runner's job runner (the executors), in every scenario.
    tree.put_file("/usr/local/libexec/vmtest/vmtest-job-runner",
                  os.path.join(GUEST_FILES, "vmtest-job-runner"), 0o755)
    if scenario.hostile:
        add_hostile_job(tree, scenario)

    image = os.path.join(workdir, "root.img")
    used = int(subprocess.run(["du", "-sk", tree.path], check=True, capture_output=True,
                              text=True).stdout.split()[0])
    size_mb = max(1024, used // 1024 * 2)
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", tree.path, image], check=True)
    shutil.rmtree(tree.path)
    return image


def add_hostile_job(tree, scenario):
    """Scenarios f, g: the hostile job, the stand-ins it goes for (a metadata service at
    169.254.169.254 on a dummy interface, a Docker socket), the probe that asks the metadata
    stand-in from the agent's cgroup, the metadata firewall (nixos-modules/metadata-firewall.sh,
    `setup` at boot, as runner.nix runs it) and, for jobsCanBecomeRoot, the job user's sudo
    rule."""
    sysd = "/etc/systemd/system"
    for name in ("hostile-job", "vmtest-standin"):
        tree.put(f"/usr/local/libexec/vmtest/{name}", guest_script_text(name), 0o755)
    for unit in ("vmtest-metadata.service", "vmtest-docker.service", "vmtest-metadata-probe.service"):
        tree.put_file(f"{sysd}/{unit}", os.path.join(GUEST_FILES, unit), 0o644)
        tree.enable(unit, f"{sysd}/{unit}", "multi-user.target")
    for ext in ("netdev", "network"):
        tree.put_file(f"/etc/systemd/network/10-vmtest-md.{ext}",
                      os.path.join(GUEST_FILES, f"vmtest-md.{ext}"), 0o644)
    firewall = metadata_firewall()
    if firewall:
        tree.put_file(GUEST_FIREWALL, firewall, 0o755)
        tree.put(GUEST_FIREWALL_AGENT, "#!/bin/sh\n# The script as the agent runs it (--metadata-firewall), "
                 "its backend baked in as writeShellApplication's runtimeEnv does on NixOS.\n"
                 f'exec {GUEST_FIREWALL} --backend {scenario.firewall_backend} "$@"\n', mode=0o755)
        tree.put(f"{sysd}/vmtest-metadata-firewall.service",
                 FIREWALL_UNIT.format(fw=f"{GUEST_FIREWALL} --backend {scenario.firewall_backend}"))
        tree.enable("vmtest-metadata-firewall.service", f"{sysd}/vmtest-metadata-firewall.service",
                    "multi-user.target")
    if scenario.jobs_can_become_root:
        # gitlabRunnerVm.runner.jobsCanBecomeRoot: the job user in wheel with passwordless sudo;
        # on Debian a sudoers rule of its own says the same.
        tree.put("/etc/sudoers.d/vmtest-jobs-can-become-root",
                 "# gitlabRunnerVm.runner.jobsCanBecomeRoot = true (scenario g)\n"
                 "runner ALL=(ALL:ALL) NOPASSWD: ALL\n", mode=0o440)


FIREWALL_UNIT = """# The metadata firewall, set up at boot and torn down at shutdown as
# nixos-modules/metadata-firewall.nix does it with the firewall's rules (scenarios f, g).
# Not as early as NixOS's firewall.service (DefaultDependencies=no, before network-pre.target):
# under TCG its iptables or nft commands would compete with udev and the config disk's mount.
# Before the agent is what matters here.
[Unit]
Description=VM system test: the metadata firewall (nixos-modules/metadata-firewall.sh)
After=runner\\x2dinfo.mount
Before=gitlab-runner-vm.service vmtest-metadata.service vmtest-docker.service
# Torn down after the evidence upload, which keeps the rules and their counters.
Before=vmtest-evidence.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={fw} setup
ExecStop={fw} teardown

[Install]
WantedBy=multi-user.target
"""


def build_scratch_disk(workdir):
    """A blank scratch disk, as a KubeVirt emptyDisk starts (sparse: nothing is written)."""
    path = os.path.join(workdir, "scratch.img")
    with open(path, "wb") as f:
        f.truncate(SCRATCH_MIB << 20)
    return path


def build_config_iso(runner_json, workdir):
    """runner.json as KubeVirt presents a Secret: one file per key at the root of an ISO 9660
    image (Joliet + Rock Ridge), volume label cfgdata (virt-launcher's default)."""
    src = os.path.join(workdir, "secret")
    os.makedirs(src)
    with open(os.path.join(src, "runner.json"), "w") as f:
        json.dump(runner_json, f, indent=2)
    # 0644 is the mode a Kubernetes secret volume gives its files by default (defaultMode).
    os.chmod(os.path.join(src, "runner.json"), 0o644)
    iso = os.path.join(workdir, "runner-info.iso")
    subprocess.run(["xorrisofs", "-quiet", "-output", iso, "-follow-links", "-volid", "cfgdata",
                    "-joliet", "-rock", src], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    shutil.rmtree(src)
    return iso
