#!/usr/bin/env python3
"""What the platform images do, from their evaluated configurations (tests/nix/platforms.nix).

Usage: check-platforms.py PLATFORMS.json

1. The AMI builds keep nixpkgs' metadata: each image's postVM and nixpkgs' own amazon image's
   are run, for x86_64 and aarch64, against the same raw disk, with jq and a stand-in for
   qemu-img; both must write the same nix-support/hydra-build-products and image-info.json
   (but for the image's name and NixOS label), and image-info.json must hold every field that
   examples/aws/import-image.sh reads.
2. The plain images (`amazon`, `digital-ocean`) run no agent, no Docker, no CI user and no
   cloud-init, take SSH keys only, never execute user-data, and log root in with the
   platform's keys; `runner-digital-ocean` is the runner.
3. CircleCI's machine runner (with a stand-in binary), on both images and both systems, runs as
   `circleci` at boot, its token read by a root-only step into a 0700 runtime directory, after
   the EC2 user-data is fetched and after the unit that names the host (apply-ec2-data,
   gce-set-hostname: the runner's name is `uname -n`), with no SSM agent beside it on AWS;
   with singleTask, no restart and a power-off; off unless enabled.
4. A Proxmox clone rebuilds: the files of the template's /etc/nixos are laid out in a directory
   and evaluated as `nixos-rebuild switch` does (tests/nix/proxmox-clone.nix); the clone has
   the template's users, SSH, cloud-init, boot loader, file systems, packages and services, and
   an admin's edit takes effect. NIX_PATH names the channel and /etc/nixos/configuration.nix.
Prints one line per check and a closing "N passed, N failed" line; exits 1 if any failed.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
IMPORT_SCRIPT = ROOT / "examples" / "aws" / "import-image.sh"
STORE_TOOL = re.compile(r"/nix/store/[a-z0-9]{32}-[^/\s'\"]*/bin/(jq|qemu-img)")

# A stand-in for qemu-img: `convert ... SRC DST` copies, `info --output json FILE` gives its size.
QEMU_IMG = """#!/bin/sh
case $1 in
  convert) for last; do :; done; eval "src=\\${$(($# - 1))}"; cp "$src" "$last" ;;
  info) for last; do :; done; printf '{"virtual-size": %s}\\n' "$(stat -c %s "$last")" ;;
  *) echo "qemu-img stand-in: $*" >&2; exit 1 ;;
esac
"""


class Skip(Exception):
    pass


def run_post_vm(script, tmp, name):
    """Runs a build's postVM on a 1 MiB raw disk; returns {file: content} of $out."""
    work = Path(tmp) / name
    (work / "bin").mkdir(parents=True)
    qemu = work / "bin" / "qemu-img"
    qemu.write_text(QEMU_IMG)
    qemu.chmod(0o755)
    jq = shutil.which("jq")
    if not jq:
        raise AssertionError("jq is missing; run tests/nix/install-deps")
    script = STORE_TOOL.sub(lambda m: jq if m[1] == "jq" else str(qemu), script)
    out = work / "out"
    out.mkdir()
    disk = work / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "out": str(out), "diskImage": str(disk)})
    assert proc.returncode == 0, f"{name}: postVM failed:\n{proc.stderr}"
    files = {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            files[str(f.relative_to(out))] = f.read_text(errors="replace") if f.parent.name == "nix-support" else None
    return out, files


def normalise(files, out, image_file, version):
    """Names the disk file and the NixOS label the same way for every build."""
    text = json.dumps(files).replace(str(out), "$out").replace(image_file, "IMAGE").replace(version, "LABEL")
    return json.loads(text)


def check_post_vm(facts):
    fields = re.findall(r"jq -er '([^']+)'", IMPORT_SCRIPT.read_text())
    assert fields, f"no `jq -er '...'` in {IMPORT_SCRIPT}"
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        for system, builds in facts["postVM"].items():
            expected_mode = {"x86_64-linux": "legacy-bios", "aarch64-linux": "uefi"}[system]
            runs = {}
            for name, build in [("nixpkgs", builds["nixpkgs"]), *builds["ours"].items()]:
                out, files = run_post_vm(build["postVM"], tmp, f"{system}-{name}")
                images = [f for f in files if "/" not in f]
                if len(images) != 1:
                    problems.append(f"{system} {name}: $out holds {images}, not one disk image")
                    continue
                runs[name] = (normalise(files, out, images[0], build["version"]), out, images[0], build)
            reference = runs.pop("nixpkgs")[0]
            for name, (files, out, image, build) in runs.items():
                if files != reference:
                    problems.append(f"{system} {name}: writes {json.dumps(files, indent=1)}\n  nixpkgs' amazon image writes {json.dumps(reference, indent=1)}")
                info = json.loads((out / "nix-support" / "image-info.json").read_text())
                for field in fields:
                    value = info
                    for key in field.strip(".").split("."):
                        value = value.get(key) if isinstance(value, dict) else None
                    if value in (None, ""):
                        problems.append(f"{system} {name}: image-info.json has no {field}, which import-image.sh reads")
                if info.get("boot_mode") != expected_mode:
                    problems.append(f"{system} {name}: boot_mode {info.get('boot_mode')}, expected {expected_mode}")
                if info.get("system") != system or info.get("label") != build["version"]:
                    problems.append(f"{system} {name}: system/label {info.get('system')}/{info.get('label')}")
                if info["disks"]["root"]["file"] != str(out / image):
                    problems.append(f"{system} {name}: disks.root.file {info['disks']['root']['file']} is not the image")
    assert not problems, "\n".join(problems)


def check_plain_images(facts):
    problems = []
    plain = facts["plain"]
    for name, by_system in plain.items():
        for system, f in by_system.items():
            where = f"{name} ({system})"
            if name == "runner-digital-ocean":
                if not f["agent"]:
                    problems.append(f"{where}: the runner image runs no agent")
                continue
            if f["agent"] or "gitlab-runner-vm" in f["services"]:
                problems.append(f"{where}: runs the agent")
            if f["docker"]:
                problems.append(f"{where}: runs Docker")
            if f["users"]:
                problems.append(f"{where}: has users {sorted(f['users'])}; a plain image logs in root only")
            if f["cloudInit"]:
                problems.append(f"{where}: runs cloud-init")
            if f["channel"]:
                problems.append(f"{where}: has nix channels enabled but no channel in the image")
            ssh = f["ssh"]
            if not ssh["enable"] or ssh["PasswordAuthentication"] or ssh["KbdInteractiveAuthentication"]:
                problems.append(f"{where}: SSH is not keys only: {ssh}")
            if ssh["PermitRootLogin"] != "prohibit-password":
                problems.append(f"{where}: PermitRootLogin {ssh['PermitRootLogin']}, root must log in with keys")
            if f["hostPlatform"] != system:
                problems.append(f"{where}: built for {f['hostPlatform']}")
            for tool in ("git", "docker", "gcc", "python3", "gitlab-runner"):
                if tool in f["packages"]:
                    problems.append(f"{where}: carries {tool}, a CI tool")
            if name == "amazon":
                if f["amazonInit"] is not False:
                    problems.append(f"{where}: amazon-init would execute user-data")
                if "apply-ec2-data" not in f["services"] or "fetch-ec2-metadata" not in f["services"]:
                    problems.append(f"{where}: no apply-ec2-data/fetch-ec2-metadata: the key pair's key would not reach root")
            if name == "digital-ocean":
                if f["doRebuildFromUserData"] is not False:
                    problems.append(f"{where}: user-data would rebuild the system")
                if not f["doSshKeys"] or "digitalocean-ssh-keys" not in f["services"]:
                    problems.append(f"{where}: the Droplet's SSH keys would not reach root")
    assert "amazon" in plain and set(plain["amazon"]) == {"x86_64-linux", "aarch64-linux"}, plain.keys()
    assert "digital-ocean" in plain, plain.keys()
    assert not problems, "\n".join(problems)


def check_proxmox_clone(facts):
    p = facts["proxmox"]
    problems = []
    if "nixos-config=/etc/nixos/configuration.nix" not in p["nixPath"]:
        problems.append(f"NIX_PATH {p['nixPath']} names no nixos-config: nixos-rebuild would not find configuration.nix")
    if not any(e.startswith("nixpkgs=/nix/var/nix/profiles/per-user/root/channels") for e in p["nixPath"]):
        problems.append(f"NIX_PATH {p['nixPath']}: <nixpkgs> is not the root channel")
    if not p["defaultChannel"].endswith(f"/nixos-{p['channelRelease']}"):
        problems.append(f"the root channel is {p['defaultChannel']}, not the template's release {p['channelRelease']}")
    for file in ["configuration.nix", *p["etcNixos"]]:
        if not any(rule.startswith(f"C /etc/nixos/{file} ") for rule in p["tmpfiles"]):
            problems.append(f"no tmpfiles rule copies /etc/nixos/{file} (only where it does not exist)")
    assert not problems, "\n".join(problems)

    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone" / "etc" / "nixos"
        for file, source in p["etcNixos"].items():
            (clone / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, clone / file)
        (clone / "configuration.nix").write_text(p["configurationNix"])
        edited = Path(tmp) / "edited" / "etc" / "nixos"
        shutil.copytree(clone, edited)
        text = p["configurationNix"]
        assert "# services.nginx.enable = true;" in text, "configuration.nix has no example edit to make"
        (edited / "configuration.nix").write_text(text.replace("# services.nginx.enable = true;", "services.nginx.enable = true;"))
        env = dict(os.environ, CLONE_ETC_NIXOS=str(clone), CLONE_ETC_NIXOS_EDITED=str(edited))
        proc = subprocess.run([str(HERE / "eval-json"), str(HERE / "proxmox-clone.nix")], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, "a clone's configuration.nix does not evaluate:\n" + proc.stderr[-3000:]
    d = json.loads(proc.stdout)
    template, clone_facts, edited_facts = d["template"], d["clone"], d["edited"]
    # The toplevel differs by the NixOS label only: a flake build's comes from the flake's
    # revision, a channel's from its .version-suffix, which the template's channel copies.
    for f in (template, clone_facts, edited_facts):
        f.pop("toplevel")
    for key in template:
        if template[key] != clone_facts[key]:
            problems.append(f"{key}: template {template[key]}, clone {clone_facts[key]}")
    if not edited_facts["nginx"] or clone_facts["nginx"]:
        problems.append("the admin's edit (services.nginx.enable = true) does not take effect")
    assert not problems, "\n".join(problems)


# The unit that names the host after the VM on each platform's image (nixpkgs' EC2 module; this
# repository's GCE image): machine runner takes its name from `uname -n` after it.
HOST_NAME_UNIT = {"aws": "apply-ec2-data", "gce": "gce-set-hostname"}


def check_machine_runner(facts):
    m = facts["machineRunner"]
    problems = []
    if m["off"]:
        problems.append("circleci-amazon runs a machine runner without being asked to")
    for platform in ("aws", "gce"):
        for system, f in m[platform].items():
            name = f"{platform} ({system})"
            if f["hostPlatform"] != system:
                problems.append(f"{name}: evaluated for {f['hostPlatform']}")
            sc = f["serviceConfig"]
            if sc.get("User") != f["ciUser"] or f["ciUser"] != "circleci":
                problems.append(f"{name}: runs as {sc.get('User')}, not the CI user circleci")
            if not re.fullmatch(r"/nix/store/\S+/bin/circleci-runner machine -c /nix/store/\S+-circleci-runner-config\.yaml", sc.get("ExecStart", "")):
                problems.append(f"{name}: ExecStart {sc.get('ExecStart')} is not `circleci-runner machine -c CONFIG`")
            if not sc.get("ExecStartPre", "").startswith("+/nix/store/"):
                problems.append(f"{name}: the token is not read by a root-only ExecStartPre")
            if sc.get("EnvironmentFile") != "-/run/circleci-runner/env" or sc.get("RuntimeDirectoryMode") != "0700":
                problems.append(f"{name}: the token's file is not /run/circleci-runner/env in a 0700 directory")
            if "multi-user.target" not in f["wantedBy"] or f["display"] != ":99":
                problems.append(f"{name}: not started at boot, or without DISPLAY=:99")
            if "/run/wrappers" not in f["path"]:
                problems.append(f"{name}: jobs would have no sudo (no /run/wrappers/bin on PATH)")
            # The runner's name is the host name when the token step runs: after the unit that
            # sets it, which this image must have (else every runner has the built-in name).
            unit = HOST_NAME_UNIT[platform]
            if not f["hostNameUnits"][unit] or f["builtHostName"] != "":
                problems.append(f"{name}: the image has no {unit} naming the host (host name built in: {f['builtHostName']!r})")
            for field in ("after", "wants"):
                if f"{unit}.service" not in f[field]:
                    problems.append(f"{name}: the runner is not ordered ({field}) after {unit}, so it may register under the built-in host name")
                absent = [u for u, present in f["hostNameUnits"].items() if not present and f"{u}.service" in f[field]]
                if absent:
                    problems.append(f"{name}: {field} names host-name units this image does not have: {absent}")
        if platform == "aws":
            for system, f in m["aws"].items():
                if "fetch-ec2-metadata.service" not in f["after"]:
                    problems.append(f"aws ({system}): the runner may start before fetch-ec2-metadata wrote the user-data")
                if f["ssmAgent"] is not False:
                    problems.append(f"aws ({system}): amazon-ssm-agent runs beside the machine runner (SSM Run Command would be root on a VM holding the token)")
                if f["serviceConfig"].get("Restart") != "no" or not f["serviceConfig"].get("ExecStopPost", "").startswith("+/nix/store/"):
                    problems.append(f"single task ({system}): the runner must not restart, and the VM must power off after it")
        else:
            for system, f in m["gce"].items():
                if f["serviceConfig"].get("Restart") != "always" or "ExecStopPost" in f["serviceConfig"]:
                    problems.append(f"continuous ({system}): the runner must restart, and nothing powers the VM off")
    assert not problems, "\n".join(problems)


def main():
    facts = json.loads(Path(sys.argv[1]).read_text())
    passed = failed = 0
    for name, fn in [("the AMI builds write nixpkgs' image-info.json and hydra-build-products", check_post_vm),
                     ("the plain images log in root with the platform's keys, nothing else", check_plain_images),
                     ("CircleCI's machine runner: the CI user, a root-only token step, one job then power-off", check_machine_runner),
                     ("a Proxmox clone rebuilds from its /etc/nixos to the template plus the admin's edits", check_proxmox_clone)]:
        try:
            fn(facts)
        except AssertionError as e:
            failed += 1
            print(f"FAIL  {name}\n      " + (str(e) or "assertion failed").replace("\n", "\n      "))
        except Exception as e:  # a crash in a check is a failure of that check
            failed += 1
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
        else:
            passed += 1
            print(f"ok    {name}")
    print(f"platforms: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
