"""The VM: qemu with the guest's disks and its restricted user network, its QMP socket (the
power button, the SHUTDOWN event), and the probe that decides between KVM and TCG."""

import json
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time

from .config import COLLECTOR_ADDR, CONFIG_SERIAL, GITLAB_ADDR, ROOT_LABEL, SCRATCH_SERIAL


class QMP:
    """A QMP client: commands and, in a reader thread, events with the host time they came."""

    def __init__(self, path, proc):
        deadline = time.time() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("qemu's QMP socket did not appear")
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())  # greeting
        self.events = []
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.command("qmp_capabilities")

    def _read(self):
        for line in self.file:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "event" in msg:
                self.events.append((time.time(), msg))
            else:
                self.replies.put(msg)

    def command(self, name, **arguments):
        msg = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        return self.replies.get(timeout=10)


def probe_kvm(kernel):
    """Whether KVM really runs a guest here: /dev/kvm may exist and open, yet fail on the first
    instructions it cannot emulate. Boots the kernel without a root disk: under working KVM it
    panics within seconds ("VFS: Unable to mount root fs") and, with panic=-1 and -no-reboot,
    qemu exits. Returns (usable, reason)."""
    forced = os.environ.get("VMTEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced == "kvm", f"VMTEST_ACCEL={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible"
    with tempfile.TemporaryDirectory(prefix="vmtest-kvm-") as tmp:
        console, output = os.path.join(tmp, "console"), os.path.join(tmp, "output")
        with open(output, "w") as out:
            proc = subprocess.Popen(
                ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
                 "-display", "none", "-no-reboot", "-kernel", kernel,
                 "-append", "console=ttyS0 panic=-1 root=/dev/vmtest-none",
                 "-serial", f"file:{console}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # A failing KVM either leaves qemu paused after "KVM internal error" or crawls without
        # printing anything; a working one prints at once and panics within seconds.
        started = time.time()
        while proc.poll() is None and time.time() < started + 30:
            if "error" in open(output, errors="replace").read().lower():
                break
            if time.time() > started + 8 and not (os.path.exists(console) and os.path.getsize(console)):
                break
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        text = open(console, errors="replace").read() if os.path.exists(console) else ""
        if proc.returncode == 0 and "Kernel panic" in text:
            return True, "KVM booted a kernel"
        reason = open(output, errors="replace").read().strip().splitlines()
        return False, "KVM does not run a guest here: " + (
            reason[0] if reason else f"no kernel output after {time.time() - started:.0f} s")


class VM:
    def __init__(self, outdir, base, root_image, iso, gitlab_port, collector_port, kvm,
                 config_disk_late=False, scratch=None):
        """config_disk_late: the config disk is not there at boot; attach_config_disk()
        hot-plugs it later into a PCIe root port kept free for it (q35's root bus takes none).
        scratch: a disk image attached with the scratch serial, or None."""
        self.outdir = outdir
        self.iso = iso
        self.sockdir = tempfile.mkdtemp(prefix="vmtest-qmp-")
        qmp_path = os.path.join(self.sockdir, "qmp.sock")
        fwd = "guestfwd=tcp:{}:80-cmd:socat STDIO TCP:127.0.0.1:{}"
        self.cmd = [
            "qemu-system-x86_64", "-name", "vmtest", "-machine", "q35",
            "-accel", "kvm" if kvm else "tcg", "-cpu", "host" if kvm else "qemu64",
            "-smp", "2", "-m", "1024", "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", os.path.join(base, "vmlinuz"), "-initrd", os.path.join(base, "initrd.img"),
            "-append", f"root=LABEL={ROOT_LABEL} rw console=ttyS0 loglevel=4 panic=-1",
            "-drive", f"file={root_image},if=none,id=root,format=raw",
            "-device", "virtio-blk-pci,drive=root",
            *(["-device", "pcie-root-port,id=configport,chassis=1"] if config_disk_late else
              ["-drive", f"file={iso},if=none,id=runnerinfo,format=raw,readonly=on",
               "-device", f"virtio-blk-pci,drive=runnerinfo,serial={CONFIG_SERIAL}"]),
            *(["-drive", f"file={scratch},if=none,id=scratch,format=raw",
               "-device", f"virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL}"] if scratch else []),
            "-netdev", ",".join(["user,id=net0,restrict=on",
                                 fwd.format(GITLAB_ADDR, gitlab_port),
                                 fwd.format(COLLECTOR_ADDR, collector_port)]),
            "-device", "virtio-net-pci,netdev=net0",
            "-device", "virtio-rng-pci",
            "-serial", f"file:{os.path.join(outdir, 'console.log')}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]
        self.t_start = time.time()
        self.qemu_log = open(os.path.join(outdir, "qemu.log"), "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.qemu_log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        self.qmp = QMP(qmp_path, self.proc)
        self.t_exit = None
        self.t_powerdown = None
        self.destroyed = False

    def exited(self):
        if self.proc.poll() is not None and self.t_exit is None:
            self.t_exit = time.time()
        return self.t_exit is not None

    def wait(self, timeout):
        """True when qemu exited within timeout (polled, so t_exit is accurate to 50 ms)."""
        deadline = time.time() + timeout
        while not self.exited():
            if time.time() > deadline:
                return False
            time.sleep(0.05)
        return True

    def powerdown(self):
        """What KubeVirt does on VMI deletion without a guest agent: an ACPI power-button press."""
        self.t_powerdown = time.time()
        return self.qmp.command("system_powerdown")

    def attach_config_disk(self):
        """Hot-plugs the config disk as KubeVirt would present it, late: the ISO as a read-only
        block node, then a virtio-blk-pci device with the config serial in the free root port.
        Returns (ok, detail)."""
        added = self.qmp.command("blockdev-add", **{
            "node-name": "runnerinfo", "driver": "raw", "read-only": True,
            "file": {"driver": "file", "filename": self.iso, "read-only": True}})
        if "error" in added:
            return False, f"blockdev-add: {added['error']}"
        plugged = self.qmp.command("device_add", driver="virtio-blk-pci", id="runnerinfo-disk",
                                   drive="runnerinfo", serial=CONFIG_SERIAL, bus="configport")
        if "error" in plugged:
            return False, f"device_add: {plugged['error']}"
        return True, "blockdev-add and device_add answered"

    def destroy(self):
        if not self.exited():
            self.destroyed = True
            self.proc.kill()
            self.proc.wait()
            self.exited()

    def close(self):
        self.destroy()
        self.qemu_log.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)

    def shutdown_event(self):
        for t, msg in self.qmp.events:
            if msg["event"] == "SHUTDOWN":
                return t, msg.get("data", {})
        return None, {}

    def console(self):
        path = os.path.join(self.outdir, "console.log")
        return open(path, errors="replace").read() if os.path.exists(path) else ""
