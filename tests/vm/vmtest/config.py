"""Paths, guest constants and the time bounds of the scenarios."""

import json
import os
import re
import time

PACKAGE = os.path.dirname(os.path.abspath(__file__))
HERE = os.path.dirname(PACKAGE)                     # tests/vm
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(HERE, ".cache")
RUNS = os.path.join(CACHE, "runs")
PREPARED = os.path.join(CACHE, "prepare.json")
GUEST_FILES = os.path.join(HERE, "guest")
BUILD_ROOTFS = os.path.join(HERE, "build-rootfs")
AGENT_BIN = os.path.join(REPO, "target", "release", "gitlab-runner-vm")
UNIT_SRC = os.path.join(REPO, "agent", "dist", "gitlab-runner-vm.service")
METADATA_FIREWALL = os.path.join(REPO, "nixos-modules", "metadata-firewall.sh")
SCRATCH_DISK_SCRIPT = os.path.join(REPO, "nixos-modules", "runner-scratch-disk.sh")

ROOT_LABEL = "vmtest-root"
# Where the binary goes in the guest: a path of its own, like the Nix store path that the Nix
# package substitutes for /usr/bin/gitlab-runner-vm in the unit.
GUEST_AGENT = "/opt/gitlab-runner-vm/bin/gitlab-runner-vm"
UNIT_PLACEHOLDER = "/usr/bin/gitlab-runner-vm"
GUEST_UNIT = "/usr/lib/systemd/system/gitlab-runner-vm.service"
GUEST_FIREWALL = "/usr/local/libexec/vmtest/metadata-firewall.sh"
GUEST_FIREWALL_AGENT = "/usr/local/libexec/vmtest/metadata-firewall"
GUEST_SCRATCH_DISK = "/usr/local/libexec/vmtest/runner-scratch-disk"
SCRATCH_SERIAL = "scratch"
SCRATCH_MIB = 64          # scenario a's blank scratch disk (sparse)
HOSTILE_JOB = "/usr/local/libexec/vmtest/hostile-job"
UNIT = "gitlab-runner-vm.service"
GITLAB_ADDR = "10.0.2.100"
COLLECTOR_ADDR = "10.0.2.101"
CONFIG_SERIAL = "runner-info"

# What the agent is (`gitlab-runner-vm facts`, checked in and kept current by its tests):
# its flags with their environment variables and defaults, its phases, its state directory.
FACTS_FILE = os.path.join(REPO, "agent", "facts.json")
with open(FACTS_FILE, encoding="utf-8") as _facts:
    FACTS = json.load(_facts)
PHASES = FACTS["phases"]
STATE_DIR = FACTS["state_dir"]
SYSTEM_ID = re.compile(r"r_[0-9A-Za-z]{12}")
# systemd's catalog ids: a unit starting, a start job done (for Type=notify: READY=1 received).
MSG_UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
MSG_UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"

# Bounds. Generous: under TCG the guest is 10-50x slower than the host and shares 2 cores.
GRACE = 30               # KubeVirt's default terminationGracePeriodSeconds
BOOT_TO_JOB_MAX = 300    # qemu start to the job's start (or to the rejected verify)
POWEROFF_MAX = 120       # deregistration (or the failure) to qemu's exit, besides any delay
HOLD_OBSERVE = 20        # scenario b: how long the VM must stay up after deregistration
FAILURE_DELAY = 5        # scenarios d, e: GITLAB_RUNNER_VM_FAILURE_DELAY
AFTER_FAILURE_OBSERVE = 30   # scenario e: how long the VM must stay up after the failure
JOB_SECONDS = 5          # length of the fake job in a, b
LONG_JOB_SECONDS = 600   # scenario c: a job that only SIGTERM ends
HOSTILE_JOB_MAX = 300    # scenarios f, g: the hostile job's bound (python3 under TCG, /proc/*/mem)
POWERDOWN_AFTER_JOB_START = 3
# Scenario a: runner.json's registry_mirrors (nothing answers there: Podman only has to read them).
REGISTRY_MIRRORS = ["https://mirror.vmtest.invalid", "http://10.0.2.2:5000"]
# Scenario h: the config disk is hot-plugged this long after the guest said hello (booted, its
# network up, the agent about to start): longer than the 10 s device timeout the mount once had,
# which then ran out on every such boot and left the agent waiting for a file that never came.
CONFIG_DISK_LATE = 15


def log(msg):
    print(f"[vmtest {time.strftime('%H:%M:%S')}] {msg}", flush=True)
