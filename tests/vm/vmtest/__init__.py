"""The VM system test of gitlab-runner-vm: the release binary under real systemd in a real VM.

A guest is the cached Debian bookworm tree (build-rootfs) plus, on every run: the agent's release
binary at GUEST_AGENT, the canonical unit agent/dist/gitlab-runner-vm.service with only the path
substitution the Nix package makes, a drop-in with the environment the NixOS module sets, the
/runner-info line of /etc/fstab as the NixOS runner module writes it, the fake gitlab-runner
(guest/) and two helpers that collect evidence. runner.json reaches it as KubeVirt presents a
Secret: an ISO 9660 image labelled cfgdata on a virtio disk with serial runner-info, attached at
boot or (scenario h) hot-plugged later. The fake GitLab listens on the
host's loopback; the guest reaches it only through qemu's restricted user network (guestfwd
10.0.2.100:80), and sends its evidence through a second guestfwd (10.0.2.101:80).

Modules:
  config       paths, guest constants and the time bounds of the scenarios
  image        the cached root file system, the guest's root disk and its runner.json ISO
  fake_gitlab  the fake GitLab (the runner API) that every request is recorded by
  qemu         the VM: qemu, its QMP socket, the KVM probe
  evidence     what the guest sends: its clock at boot, its journal and state at shutdown
  scenarios    the scenarios a to h, and running one: boot, drive from outside, collect
  timeline     the events of a run on the host's clock; timeline.md and summary.json

The expectations are pytest tests, one per expectation and scenario: tests/vm/test_scenarios.py,
with tests/vm/conftest.py booting each selected scenario's VM once per session. tests/vm/run
prepares the root file system (`python3 -m vmtest prepare`) and runs them.

Everything a run produces is under tests/vm/.cache/runs/: per scenario the requests the fake
GitLab saw (gitlab-requests.jsonl), the guest's evidence (evidence/), the serial console, qemu's
output and result.json with the timeline and every expectation's outcome; summary.json and
timeline.md for the whole run. Tokens are generated per run and never printed whole.
"""
