#!/usr/bin/env python3
"""nixos-modules/runner-scratch-disk.sh against stand-in udevadm, blkid, mkfs.ext4, mount and
mountpoint, and shellcheck: which disk it takes for each platform's patterns, that it formats
only a blank disk, that it never waits for a disk that is not there and never fails the boot.

Each case builds a fake /dev (files) and /dev/disk/by-id (links to them) in a temporary
directory; the patterns point there. The stand-ins log their arguments; blkid answers from a
file beside the disk (<disk>.probe: what it found; <disk>.unreadable: an error; neither: blank).
Prints one line per case; exits 1 if any failed.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.normpath(os.path.join(HERE, "..", "..", "nixos-modules", "runner-scratch-disk.sh"))

STANDINS = {
    "udevadm": 'echo "udevadm $*" >>"$LOG"; exit "${UDEVADM_STATUS:-0}"\n',
    "blkid": '''echo "blkid $*" >>"$LOG"
disk=${*: -1}
if [ -e "$disk.unreadable" ]; then echo "blkid: $disk: Input/output error" >&2; exit 4; fi
if [ -e "$disk.probe" ]; then cat "$disk.probe"; exit 0; fi
exit 2
''',
    "mkfs.ext4": 'echo "mkfs.ext4 $*" >>"$LOG"; exit "${MKFS_STATUS:-0}"\n',
    "mount": '''echo "mount $*" >>"$LOG"
[ "${MOUNT_STATUS:-0}" -eq 0 ] || { echo "mount: wrong fs type" >&2; exit "$MOUNT_STATUS"; }
touch "${*: -1}/.mounted"
''',
    "mountpoint": '[ -e "${*: -1}/.mounted" ]\n',
}


class Case:
    def __init__(self, root):
        self.root = root
        self.dev = os.path.join(root, "dev")
        self.by_id = os.path.join(self.dev, "disk", "by-id")
        self.bin = os.path.join(root, "bin")
        self.mount_point = os.path.join(root, "var", "lib", "scratch")
        self.log = os.path.join(root, "log")
        # The kernel's block devices (/sys/class/block): the root disk is always there.
        self.sys_block = os.path.join(root, "sys", "class", "block")
        os.makedirs(os.path.join(self.sys_block, "vda"))
        os.makedirs(self.by_id)
        os.makedirs(self.bin)
        for name, body in STANDINS.items():
            path = os.path.join(self.bin, name)
            with open(path, "w") as f:
                f.write("#!/usr/bin/env bash\n" + body)
            os.chmod(path, 0o755)
        open(self.log, "w").close()

    def disk(self, name, probe=None, unreadable=False):
        """A disk /dev/<name> (and /sys/class/block/<name>): blank unless probe (blkid's export
        lines) or unreadable."""
        path = os.path.join(self.dev, name)
        open(path, "w").close()
        os.makedirs(os.path.join(self.sys_block, name), exist_ok=True)
        if probe is not None:
            with open(path + ".probe", "w") as f:
                f.write(probe)
        if unreadable:
            open(path + ".unreadable", "w").close()
        return path

    def link(self, name, target):
        os.symlink(os.path.join("..", "..", target), os.path.join(self.by_id, name))

    def pattern(self, glob):
        return os.path.join(self.by_id, glob)

    def run(self, *args, env=None):
        started = time.monotonic()
        proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}",
                                   "LOG": self.log, **(env or {})})
        self.seconds = time.monotonic() - started
        self.out = proc.stdout + proc.stderr
        with open(self.log) as f:
            self.calls = [line.split(" ", 1) for line in f.read().splitlines()]
        return proc.returncode

    def called(self, tool):
        return [args for name, args in self.calls if name == tool]

    def scratch(self, *patterns, timeout="10", env=None):
        args = ["--mount-point", self.mount_point, "--udev-timeout", timeout, "--block-dir", self.sys_block]
        for p in patterns:
            args += ["--device", self.pattern(p)]
        return self.run(*args, env=env)


def expect(ok, message, case):
    if not ok:
        raise AssertionError(f"{message}\n  output: {case.out.strip()}\n  calls: {case.calls}")


def mounted(case, disk):
    expect(case.called("mount") == [f"-t ext4 -- {disk} {case.mount_point}"],
           f"mount calls {case.called('mount')}, expected {disk} on the scratch mount point", case)


def not_touched(case):
    expect(case.called("mkfs.ext4") == [] and case.called("mount") == [],
           f"formatted or mounted: mkfs {case.called('mkfs.ext4')}, mount {case.called('mount')}", case)


# ---- the cases --------------------------------------------------------------------------------

def case_no_patterns_no_wait(c):
    """a platform without scratch disks (DigitalOcean): no wait for udev, nothing touched"""
    status = c.run("--mount-point", c.mount_point)
    expect(status == 0 and c.calls == [], f"status {status}, calls {c.calls}", c)
    expect("no scratch disk on this platform" in c.out, "does not say why", c)


def case_absent_disk_is_not_waited_for(c):
    """no disk matches (a cloud instance type without local disks): one bounded wait for udev to
    name the block devices there are, nothing touched, done at once"""
    status = c.scratch("nvme-Amazon_EC2_NVMe_Instance_Storage_*")
    expect(status == 0 and c.called("udevadm") == [f"wait --timeout=10 -- {c.sys_block}/vda"], f"status {status}", c)
    not_touched(c)
    expect(c.seconds < 5, f"took {c.seconds:.1f} s", c)
    expect("jobs write to the root file system" in c.out, "does not say where jobs write", c)


def case_blank_disk_is_formatted_and_mounted(c):
    """a blank KubeVirt emptyDisk: formatted ext4 (no discard, no reserved blocks), mounted"""
    disk = c.disk("vdc")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch")
    expect(status == 0, f"status {status}", c)
    expect(c.called("mkfs.ext4") == [f"-q -F -m 0 -E nodiscard -L scratch -- {disk}"], f"mkfs {c.called('mkfs.ext4')}", c)
    mounted(c, disk)


def case_ext4_disk_is_mounted_as_it_is(c):
    """a disk that holds ext4 already (a reboot): mounted, not formatted again"""
    disk = c.disk("nvme1n1", probe="DEVNAME=/dev/nvme1n1\nUUID=1234\nTYPE=ext4\nUSAGE=filesystem\n")
    c.link("nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1234ABCD", "nvme1n1")
    status = c.scratch("nvme-Amazon_EC2_NVMe_Instance_Storage_*")
    expect(status == 0 and c.called("mkfs.ext4") == [], f"status {status}, mkfs {c.called('mkfs.ext4')}", c)
    mounted(c, disk)


def case_other_file_system_is_left_alone(c):
    """a disk with another file system (someone's XFS): left alone, the boot goes on"""
    c.disk("sdb", probe="TYPE=xfs\nUSAGE=filesystem\n")
    c.link("google-local-ssd-0", "sdb")
    status = c.scratch("google-local-nvme-ssd-*", "google-local-ssd-*")
    expect(status == 0, f"status {status}", c)
    not_touched(c)
    expect("holds xfs" in c.out and "left alone" in c.out, "does not say what it found", c)


def case_partitioned_disk_is_left_alone(c):
    """a disk with a partition table: left alone"""
    c.disk("vdc", probe="PTUUID=abcd\nPTTYPE=gpt\n")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch")
    expect(status == 0, f"status {status}", c)
    not_touched(c)
    expect("gpt partition table" in c.out, "does not say what it found", c)


def case_unreadable_disk_is_left_alone(c):
    """blkid cannot read the disk (an I/O error): never formatted"""
    c.disk("vdc", unreadable=True)
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch")
    expect(status == 0, f"status {status}", c)
    not_touched(c)
    expect("could not read" in c.out and "Input/output error" in c.out, "does not say why", c)


def case_partition_links_are_not_disks(c):
    """links to partitions (-partN) are skipped: the whole disk is taken, or none"""
    c.disk("nvme0n1p1")
    c.link("google-local-nvme-ssd-0-part1", "nvme0n1p1")
    status = c.scratch("google-local-nvme-ssd-*")
    expect(status == 0, f"status {status}", c)
    not_touched(c)
    whole = c.disk("nvme0n1")
    c.link("google-local-nvme-ssd-0", "nvme0n1")
    open(c.log, "w").close()
    c.scratch("google-local-nvme-ssd-*")
    mounted(c, whole)


def case_first_pattern_then_first_name(c):
    """the first pattern that matches wins, and within it the first name: NVMe local SSD
    before SCSI, ssd-0 before ssd-1; two names of one disk (nvme-…_AWS… and …_1) are one disk"""
    c.disk("sdb")
    c.link("google-local-ssd-0", "sdb")
    first = c.disk("nvme0n1")
    c.disk("nvme1n1")
    c.link("google-local-nvme-ssd-1", "nvme1n1")
    c.link("google-local-nvme-ssd-0", "nvme0n1")
    status = c.scratch("google-local-nvme-ssd-*", "google-local-ssd-*")
    expect(status == 0, f"status {status}", c)
    mounted(c, first)


def case_mkfs_failure_is_not_fatal(c):
    """mkfs.ext4 fails: not mounted, the boot goes on"""
    c.disk("vdc")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch", env={"MKFS_STATUS": "1"})
    expect(status == 0 and c.called("mount") == [], f"status {status}, mount {c.called('mount')}", c)
    expect("mkfs.ext4" in c.out and "failed" in c.out, "does not say what failed", c)


def case_mount_failure_is_not_fatal(c):
    """mount fails: the boot goes on, and says so"""
    c.disk("vdc", probe="TYPE=ext4\n")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch", env={"MOUNT_STATUS": "32"})
    expect(status == 0 and "mounting" in c.out and "failed" in c.out, f"status {status}", c)


def case_udev_not_done_in_time_is_not_fatal(c):
    """udev does not name every block device in time: the disks named so far are used"""
    disk = c.disk("vdc", probe="TYPE=ext4\n")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch", timeout="3", env={"UDEVADM_STATUS": "1"})
    expect(status == 0 and c.called("udevadm") == [f"wait --timeout=3 -- {c.sys_block}/vda {c.sys_block}/vdc"], f"status {status}", c)
    expect("did not name the 2 block devices within 3 s" in c.out, "does not say udev was not done", c)
    mounted(c, disk)


def case_no_block_devices_no_wait(c):
    """the kernel lists no block device (no /sys/class/block entries): no wait for udev at all"""
    os.rmdir(os.path.join(c.sys_block, "vda"))
    status = c.scratch("virtio-scratch")
    expect(status == 0 and c.called("udevadm") == [], f"status {status}, udevadm {c.called('udevadm')}", c)
    not_touched(c)


def case_already_mounted(c):
    """the unit restarted: an existing mount is kept, nothing probed or formatted"""
    os.makedirs(c.mount_point)
    open(os.path.join(c.mount_point, ".mounted"), "w").close()
    c.disk("vdc")
    c.link("virtio-scratch", "vdc")
    status = c.scratch("virtio-scratch")
    expect(status == 0 and c.calls == [], f"status {status}, calls {c.calls}", c)


def case_bad_arguments(c):
    """an unknown argument or no mount point: exit 2, naming it"""
    status = c.run("--mount-point", c.mount_point, "--devcie", "x")
    expect(status == 2 and "unknown argument '--devcie'" in c.out, f"status {status}", c)
    status = c.run("--device", "x")
    expect(status == 2 and "--mount-point is missing" in c.out, f"status {status}", c)


def check_shellcheck():
    if shutil.which("shellcheck") is None:
        return "shellcheck is missing (tests/nix/install-deps installs it)"
    run = subprocess.run(["shellcheck", SCRIPT], capture_output=True, text=True)
    return None if run.returncode == 0 else run.stdout + run.stderr


def main():
    failed = 0
    for name, fn in [(n, f) for n, f in globals().items() if n.startswith("case_")]:
        with tempfile.TemporaryDirectory(prefix="scratch-disk-") as root:
            try:
                fn(Case(root))
            except AssertionError as e:
                failed += 1
                print(f"FAIL  {fn.__doc__.split(chr(10))[0]}\n      {e}")
            else:
                print(f"ok    {fn.__doc__.split(chr(10))[0]}")
    problem = check_shellcheck()
    print(f"{'FAIL' if problem else 'ok  '}  shellcheck {os.path.relpath(SCRIPT)}" + (f"\n      {problem}" if problem else ""))
    failed += bool(problem)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
