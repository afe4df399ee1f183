#!/usr/bin/env python3
"""The VM system test of gitlab-runner-vm: the release binary under real systemd in a real VM.

    vmtest.py prepare              build or find the cached Debian root file system
    vmtest.py run [SCENARIO ...]   boot one VM per scenario (default: all, a to e), sequentially

A guest is the cached Debian bookworm tree (build-rootfs) plus, on every run: the agent's release
binary at GUEST_AGENT, the canonical unit agent/dist/gitlab-runner-vm.service with only the path
substitution the Nix package makes, a drop-in with the environment the NixOS module sets, the
/runner-info mount as the NixOS runner module declares it, the fake gitlab-runner (guest/) and two
helpers that collect evidence. runner.json reaches it as KubeVirt presents a Secret: an ISO 9660
image labelled cfgdata on a virtio disk with serial runner-info. The fake GitLab listens on the
host's loopback; the guest reaches it only through qemu's restricted user network (guestfwd
10.0.2.100:80), and sends its evidence through a second guestfwd (10.0.2.101:80).

Scenarios:
  a  happy path: verify, one job, manager deleted, the VM powers itself off
  b  /etc/keep-runner: manager deleted, VM held; an ACPI power-button press stops it cleanly
  c  ACPI power-button press during a job: gitlab-runner gets SIGTERM, manager deleted, the VM
     stops within KubeVirt's default grace period
  d  rejected token: no job, the VM powers off after the failure delay
  e  (only when named) power-off disabled as in NixOS debug images, rejected token: the agent
     ends once and is not restarted; the ACPI power button stops the VM

Everything a run produces is under tests/vm/.cache/runs/: per scenario the requests the fake
GitLab saw (gitlab-requests.jsonl), the guest's evidence (evidence/), the serial console, qemu's
output and result.json with the timeline; summary.json and timeline.md for the whole run.
Tokens are generated per run and never printed whole.
"""

import argparse
import fcntl
import hashlib
import io
import json
import os
import queue
import re
import secrets
import shutil
import socket
import string
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.path.join(HERE, ".cache")
RUNS = os.path.join(CACHE, "runs")
GUEST_FILES = os.path.join(HERE, "guest")
BUILD_ROOTFS = os.path.join(HERE, "build-rootfs")
AGENT_BIN = os.path.join(REPO, "target", "release", "gitlab-runner-vm")
UNIT_SRC = os.path.join(REPO, "agent", "dist", "gitlab-runner-vm.service")

ROOT_LABEL = "vmtest-root"
# Where the binary goes in the guest: a path of its own, like the Nix store path that the Nix
# package substitutes for /usr/bin/gitlab-runner-vm in the unit.
GUEST_AGENT = "/opt/gitlab-runner-vm/bin/gitlab-runner-vm"
UNIT_PLACEHOLDER = "/usr/bin/gitlab-runner-vm"
GUEST_UNIT = "/usr/lib/systemd/system/gitlab-runner-vm.service"
GITLAB_ADDR = "10.0.2.100"
COLLECTOR_ADDR = "10.0.2.101"
CONFIG_SERIAL = "runner-info"

PHASES = ["waiting-for-config", "registering", "running", "draining", "deregistering",
          "holding", "powering-off", "failed", "stopping"]
SYSTEM_ID = re.compile(r"r_[0-9A-Za-z]{12}")
# systemd's catalog ids: a unit starting, a start job done (for Type=notify: READY=1 received).
MSG_UNIT_STARTING = "7d4958e842da4a758f6c1cdc7b36dcc5"
MSG_UNIT_STARTED = "39f53479d3a045ac8e11786248231fbf"

# Bounds. Generous: under TCG the guest is 10-50x slower than the host and shares 2 cores.
GRACE = 30               # KubeVirt's default terminationGracePeriodSeconds
BOOT_TO_JOB_MAX = 300    # qemu start to the job's start (or to the rejected verify)
POWEROFF_MAX = 120       # deregistration (or the failure) to qemu's exit, besides any delay
HOLD_OBSERVE = 20        # scenario b: how long the VM must stay up after deregistration
FAILURE_DELAY = 5        # scenario d: GITLAB_RUNNER_VM_FAILURE_DELAY
JOB_SECONDS = 5          # length of the fake job in a, b
LONG_JOB_SECONDS = 600   # scenario c: a job that only SIGTERM ends
POWERDOWN_AFTER_JOB_START = 3


def log(msg):
    print(f"[vmtest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mask(token):
    """What a token may look like in test output: its kind and four characters."""
    if not isinstance(token, str):
        return token
    return token[:9] + "..." if len(token) > 9 else "..."


def masked(value):
    if isinstance(value, dict):
        return {k: (mask(v) if k == "token" else masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


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


# ---- the cached root file system -----------------------------------------------------------------

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


# ---- the guest's disks ---------------------------------------------------------------------------

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
        raise SystemExit(f"{UNIT_SRC} no longer mentions {UNIT_PLACEHOLDER}: update vmtest.py")
    return text.replace(UNIT_PLACEHOLDER, GUEST_AGENT)


POWEROFF_REAL = "/bin/systemctl poweroff"
# What the NixOS module set with services.gitlab-runner-vm.powerOff = false (debug images) until
# the agent had --no-poweroff; the module now sets GITLAB_RUNNER_VM_NO_POWEROFF=true instead.
POWEROFF_DISABLED = ("echo 'gitlab-runner-vm: power-off is disabled in this image "
                     "(services.gitlab-runner-vm.powerOff = false); the VM stays up'")


def agent_dropin(scenario):
    """What the NixOS module (nixos-modules/gitlab-runner-vm.nix) adds to the unit: its ordering
    after the config mount and the agent's flags as environment variables, module defaults
    except for a short failure delay where a scenario waits for it."""
    mount = systemd_escape_path("/runner-info") + ".mount"
    env = {
        "GITLAB_RUNNER_VM_CONFIG": "/runner-info/runner.json",
        "GITLAB_RUNNER_VM_STATE_DIR": "/run/gitlab-runner-vm",
        "GITLAB_RUNNER_VM_KEEP_FILE": "/etc/keep-runner",
        "GITLAB_RUNNER_VM_GITLAB_RUNNER": "/usr/local/bin/gitlab-runner",
        "GITLAB_RUNNER_VM_RUNNER_USER": "runner",
        "GITLAB_RUNNER_VM_POWEROFF_COMMAND": POWEROFF_DISABLED if scenario.poweroff_disabled else POWEROFF_REAL,
        "GITLAB_RUNNER_VM_FAILURE_DELAY": str(FAILURE_DELAY if scenario.failure_delay else 60),
        "GITLAB_RUNNER_VM_CONFIG_WAIT": "300",
        "GITLAB_RUNNER_VM_REGISTER_TIMEOUT": "300",
        "GITLAB_RUNNER_VM_DEREGISTER_TIMEOUT": "30",
        "GITLAB_RUNNER_VM_STOP_TIMEOUT": "40",
        "GITLAB_RUNNER_VM_HOLD_MAX": "14400",
        "GITLAB_RUNNER_VM_HOLD_EXTEND": "3600",
    }
    lines = ["# As nixos-modules/gitlab-runner-vm.nix and runner.nix configure the unit.",
             "[Unit]", f"After={mount}", "", "[Service]"]
    lines += [f'Environment="{k}={v}"' for k, v in env.items()]
    return "\n".join(lines) + "\n"


def build_root_image(base, scenario, workdir):
    """The guest's root disk: the cached tree plus the agent, its unit and the test's files."""
    tree = Tree(os.path.join(base, "rootfs"), os.path.join(workdir, "tree"))
    sysd = "/etc/systemd/system"
    # The agent, as a package installs it (systemd.packages: the unit in lib/systemd/system),
    # wanted by multi-user.target and configured by a drop-in, as the NixOS module does.
    tree.put_file(GUEST_AGENT, AGENT_BIN, 0o755)
    tree.put(GUEST_UNIT, installed_unit_text())
    tree.enable("gitlab-runner-vm.service", GUEST_UNIT, "multi-user.target")
    tree.put(f"{sysd}/gitlab-runner-vm.service.d/overrides.conf",
             agent_dropin(scenario))
    # /runner-info, as the NixOS runner module declares it (see guest/runner-info.mount).
    mount = systemd_escape_path("/runner-info") + ".mount"
    device = systemd_escape_path(f"/dev/disk/by-id/virtio-{CONFIG_SERIAL}") + ".device"
    tree.put_file(f"{sysd}/{mount}", os.path.join(GUEST_FILES, "runner-info.mount"), 0o644)
    tree.enable(mount, f"../{mount}", "local-fs.target")
    tree.put_file(f"{sysd}/{device}.d/50-device-timeout.conf",
                  os.path.join(GUEST_FILES, "runner-info.device-timeout.conf"), 0o644)
    # The fake gitlab-runner, and the evidence helpers.
    tree.put_file("/usr/local/bin/gitlab-runner", os.path.join(GUEST_FILES, "gitlab-runner"), 0o755)
    for helper in ("vmtest-status-watch", "vmtest-evidence"):
        tree.put_file(f"/usr/local/libexec/vmtest/{helper}", os.path.join(GUEST_FILES, helper), 0o755)
        tree.put_file(f"{sysd}/{helper}.service", os.path.join(GUEST_FILES, f"{helper}.service"), 0o644)
        tree.enable(f"{helper}.service", f"{sysd}/{helper}.service", "multi-user.target")
    if scenario.keep_file:
        tree.put("/etc/keep-runner", "Held by the VM system test (scenario b).\n")

    image = os.path.join(workdir, "root.img")
    used = int(subprocess.run(["du", "-sk", tree.path], check=True, capture_output=True,
                              text=True).stdout.split()[0])
    size_mb = max(1024, used // 1024 * 2)
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", tree.path, image], check=True)
    shutil.rmtree(tree.path)
    return image


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


# ---- the fake GitLab and the evidence collector ----------------------------------------------------

def http_server(respond):
    """A threaded HTTP/1.1 server on a free loopback port; respond(method, path, headers, raw)
    returns (status, json payload or bytes or None, extra headers)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def handle_any(self):
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, payload, headers = respond(self.command, self.path, self.headers, raw)
            if payload is None:
                data = b""
            elif isinstance(payload, bytes):
                data = payload
            else:
                data = json.dumps(payload).encode()
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            if data and not isinstance(payload, bytes):
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class FakeGitLab:
    """The runner API as far as the agent and the fake gitlab-runner use it (the reference is
    shared/reference/gitlab-runner-api.md). Every request is recorded, tokens masked, in memory
    and in a JSON-lines file."""

    def __init__(self, record_path, token, verify_status=200, job_seconds=JOB_SECONDS, jobs=1):
        self.token = token
        self.verify_status = verify_status
        self.job_seconds = job_seconds
        self.jobs_left = jobs
        self.managers = set()
        self.jobs = {}
        self.requests = []
        self.cond = threading.Condition()
        self.record_file = open(record_path, "w")
        self.server = http_server(self.respond)
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.record_file.close()

    def respond(self, method, path, headers, raw):
        now = time.time()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self.cond:
            status, payload, extra = self.route(method, path.split("?")[0], headers, body)
            entry = {
                "t": now, "method": method, "path": path, "status": status,
                "token_ok": isinstance(body, dict) and body.get("token") == self.token,
                # JSON objects in "body" (tokens masked); anything else, e.g. a trace, in "text".
                "body": masked(body) if isinstance(body, dict) else {},
                "user_agent": headers.get("User-Agent"),
            }
            if body is not None and not isinstance(body, dict):
                entry["text"] = body if isinstance(body, str) else json.dumps(body)
            self.requests.append(entry)
            self.record_file.write(json.dumps(entry) + "\n")
            self.record_file.flush()
            self.cond.notify_all()
        return status, payload, extra

    def route(self, method, path, headers, body):
        body_dict = body if isinstance(body, dict) else {}
        token_ok = body_dict.get("token") == self.token
        system_id = body_dict.get("system_id")
        forbidden = (403, {"message": "403 Forbidden - invalid token supplied"}, {})
        if method == "POST" and path == "/api/v4/runners/verify":
            if self.verify_status != 200 or not token_ok:
                return forbidden
            self.managers.add(system_id)
            return 200, {"id": 1, "token": self.token, "token_expires_at": None}, {}
        if method == "POST" and path == "/api/v4/jobs/request":
            if not token_ok:
                return forbidden
            self.managers.add(system_id)
            if self.jobs_left <= 0:
                return 204, None, {"X-GitLab-Last-Update": secrets.token_hex(8)}
            self.jobs_left -= 1
            job_id = len(self.jobs) + 1
            job_token = "glcbt-" + secrets.token_hex(10)
            self.jobs[job_id] = {"token": job_token, "states": []}
            return 201, job_payload(job_id, job_token, self.job_seconds), {}
        m = re.fullmatch(r"/api/v4/jobs/(\d+)(/trace)?", path)
        if m and int(m.group(1)) in self.jobs:
            job = self.jobs[int(m.group(1))]
            if m.group(2) and method == "PATCH":
                if headers.get("JOB-TOKEN") not in (None, job["token"]):
                    return forbidden
                return 202, None, {"Range": f"0-{len(body or '')}", "Job-Status": "running"}
            if not m.group(2) and method == "PUT":
                if body_dict.get("token") != job["token"]:
                    return forbidden
                job["states"].append(body_dict.get("state"))
                return 200, None, {"Job-Status": body_dict.get("state") or "running"}
        if method == "DELETE" and path == "/api/v4/runners/managers":
            if not token_ok:
                return forbidden
            if system_id not in self.managers:
                return 404, {"message": "404 Runner manager not found"}, {}
            self.managers.discard(system_id)
            return 204, None, {}
        if method == "DELETE" and path == "/api/v4/runners":
            # Deletes the whole runner of a token that a fleet shares: the agent must never.
            return (204, None, {}) if token_ok else forbidden
        return 404, {"message": "404 Not Found"}, {}

    def find(self, method, path, pred=lambda r: True):
        with self.cond:
            return [r for r in self.requests if r["method"] == method and r["path"] == path and pred(r)]

    def wait_for(self, pred, timeout, vm=None):
        """The first recorded request matching pred, waiting up to timeout (or until vm exits)."""
        deadline = time.time() + timeout
        with self.cond:
            while True:
                for r in self.requests:
                    if pred(r):
                        return r
                left = deadline - time.time()
                if left <= 0 or (vm is not None and vm.exited()):
                    return None
                self.cond.wait(min(left, 0.5))


def job_payload(job_id, job_token, seconds):
    """A job as GitLab hands it out (fields gitlab-runner decodes). The fake gitlab-runner reads
    id and token (the first two keys) and FAKE_JOB_SECONDS."""
    return {
        "id": job_id,
        "token": job_token,
        "allow_git_fetch": False,
        "job_info": {"id": job_id, "name": "vm-test", "stage": "test", "project_id": 1,
                     "project_name": "vmtest"},
        "git_info": {"repo_url": "http://gitlab.invalid/vmtest.git", "ref": "main",
                     "sha": "0" * 40, "before_sha": "0" * 40, "ref_type": "branch",
                     "refspecs": [], "depth": 0},
        "runner_info": {"timeout": 3600},
        "variables": [
            {"key": "FAKE_JOB_SECONDS", "value": str(seconds), "public": True, "masked": False},
            {"key": "GIT_STRATEGY", "value": "none", "public": True, "masked": False},
        ],
        "steps": [{"name": "script", "script": [f"sleep {seconds}"], "timeout": 3600,
                   "when": "on_success", "allow_failure": False}],
        "image": None, "services": [], "artifacts": [], "cache": [], "credentials": [],
        "dependencies": [], "features": {},
    }


class Collector:
    """Receives the guest's clock at boot (/hello) and its evidence at shutdown (/evidence)."""

    def __init__(self, outdir):
        self.outdir = outdir
        self.hellos = []            # [(host time, guest time)]: at boot, before the upload
        self.evidence_at = None
        self.done = threading.Event()
        self.server = http_server(self.respond)
        self.port = self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def respond(self, method, path, headers, raw):
        now = time.time()
        if method == "POST" and path == "/hello":
            self.hellos.append((now, float(raw.decode().strip())))
            return 200, b"ok\n", {}
        if method == "POST" and path == "/evidence":
            os.makedirs(self.outdir, exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
                for member in tar.getmembers():
                    name = os.path.basename(member.name)
                    if member.isfile() and re.fullmatch(r"[A-Za-z0-9._-]+", name):
                        with open(os.path.join(self.outdir, name), "wb") as f:
                            f.write(tar.extractfile(member).read())
            self.evidence_at = now
            self.done.set()
            return 200, b"ok\n", {}
        return 404, None, {}

    @property
    def hello(self):
        return self.hellos[0] if self.hellos else None

    def offsets(self):
        return [host - guest for host, guest in self.hellos]

    def guest_to_host(self, guest_time):
        """A guest wall-clock time on the host's clock. The guest has no NTP; the offset comes
        from the boot handshake, so it is late by that request's one-way latency (milliseconds)
        and the guest clock's drift since (the second handshake, at shutdown, shows it)."""
        if self.hello is None or guest_time is None:
            return None
        return guest_time + self.offsets()[0]


# ---- qemu ------------------------------------------------------------------------------------------

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
    def __init__(self, outdir, base, root_image, iso, gitlab_port, collector_port, kvm):
        self.outdir = outdir
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
            "-drive", f"file={iso},if=none,id=runnerinfo,format=raw,readonly=on",
            "-device", f"virtio-blk-pci,drive=runnerinfo,serial={CONFIG_SERIAL}",
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


# ---- evidence from inside the guest ---------------------------------------------------------------

def field_text(value):
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return bytes(value).decode("utf-8", "replace")
        return field_text(value[0]) if value else ""
    return value


class Evidence:
    def __init__(self, directory):
        self.dir = directory
        self.present = os.path.exists(os.path.join(directory, "journal.json"))
        self.journal = []
        if self.present:
            with open(os.path.join(directory, "journal.json"), errors="replace") as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    self.journal.append({k: field_text(v) for k, v in entry.items()})
        self.show = self._properties("show.txt")
        self.status_log = self._status_log()

    def text(self, name):
        path = os.path.join(self.dir, name)
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def _properties(self, name):
        props = {}
        for line in self.text(name).splitlines():
            key, sep, value = line.partition("=")
            if sep:
                props[key] = value
        return props

    def _status_log(self):
        """[(guest time, {ActiveState, SubState, StatusText})] after each change recorded by
        vmtest-status-watch: a `systemctl show` snapshot, then systemd's PropertiesChanged
        signals as `busctl monitor --json=short` prints them."""
        rows, state = [], {}
        for line in self.text("status.log").splitlines():
            t, kind, rest = (line.split("\t", 2) + ["", ""])[:3]
            try:
                t = float(t)
            except ValueError:
                continue
            if kind == "show":
                for prop in rest.split("\t"):
                    key, sep, value = prop.partition("=")
                    if sep:
                        state[key] = value
            elif kind == "dbus":
                try:
                    msg = json.loads(rest)
                    changed = msg["payload"]["data"][1]
                except (ValueError, KeyError, IndexError, TypeError):
                    continue
                # The socket's receive time, when sd-bus has it, is closer than the shell's.
                if msg.get("timestamp-realtime"):
                    t = msg["timestamp-realtime"] / 1e6
                for key in ("ActiveState", "SubState", "StatusText"):
                    if key in changed:
                        state[key] = changed[key].get("data")
            else:
                continue
            rows.append((t, dict(state)))
        return rows

    @staticmethod
    def rt(entry):
        return int(entry["__REALTIME_TIMESTAMP"]) / 1e6

    def agent_entries(self):
        return [e for e in self.journal if e.get("SYSLOG_IDENTIFIER") == "gitlab-runner-vm"]

    def journal_phases(self):
        """The agent's phases in the order its journal entries carry them (PHASE field)."""
        seq = []
        for e in self.agent_entries():
            phase = e.get("PHASE")
            if phase and (not seq or seq[-1] != phase):
                seq.append(phase)
        return seq

    def unit_message(self, message_id, unit="gitlab-runner-vm.service"):
        for e in self.journal:
            if e.get("MESSAGE_ID") == message_id and e.get("UNIT") == unit and e.get("_PID") == "1":
                return e
        return None

    def first(self, pred):
        for e in self.journal:
            if pred(e):
                return e
        return None

    def status_phases(self):
        """StatusText as systemd reported it, with consecutive repeats merged: [(t, text)]."""
        seq = []
        for t, props in self.status_log:
            text = props.get("StatusText", "")
            if text and (not seq or seq[-1][1] != text):
                seq.append((t, text))
        return seq

    def ready_time(self):
        """When systemd first showed the unit active (READY=1 received), guest clock."""
        for t, props in self.status_log:
            if props.get("ActiveState") == "active":
                return t
        return None


def is_subsequence(needles, haystack):
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


# ---- scenarios ---------------------------------------------------------------------------------------

@dataclass
class Scenario:
    key: str
    title: str
    verify_status: int = 200
    job_seconds: int = JOB_SECONDS
    keep_file: bool = False
    failure_delay: bool = False
    poweroff_disabled: bool = False
    default: bool = True
    powerdown_in_job: bool = False
    expect_phases: list = field(default_factory=list)
    forbid_phases: list = field(default_factory=list)


SCENARIOS = {
    "a": Scenario("a", "happy path: one job, deregistration, power-off by the VM itself",
                  expect_phases=["registering", "running", "deregistering", "powering-off"],
                  forbid_phases=["failed", "holding", "stopping"]),
    "b": Scenario("b", "/etc/keep-runner: held after deregistration, ACPI power button stops it",
                  keep_file=True,
                  expect_phases=["registering", "running", "deregistering", "holding", "stopping"],
                  forbid_phases=["failed", "powering-off"]),
    "c": Scenario("c", "ACPI power button during a job: SIGTERM, deregistration, stop within grace",
                  job_seconds=LONG_JOB_SECONDS, powerdown_in_job=True,
                  expect_phases=["registering", "running", "stopping"],
                  forbid_phases=["failed", "powering-off", "holding"]),
    "d": Scenario("d", "rejected token: no job, power-off after the failure delay",
                  verify_status=403, failure_delay=True,
                  expect_phases=["registering", "failed", "powering-off"],
                  forbid_phases=["running", "holding", "stopping"]),
    # The regression test for agents that exit before READY=1 after a failure: systemd then
    # records Result=protocol and Restart=on-failure starts the agent again, every RestartSec +
    # failure delay, with a new system id and a new registration.
    "e": Scenario("e", "power-off disabled (NixOS powerOff = false), rejected token: the agent "
                  "ends once and stays ended; the ACPI power button stops the VM",
                  verify_status=403, failure_delay=True, poweroff_disabled=True,
                  expect_phases=["registering", "failed", "powering-off"],
                  forbid_phases=["running", "holding"]),
}
AFTER_FAILURE_OBSERVE = 30   # scenario e: how long the VM must stay up after the failure


class Checks:
    def __init__(self, key):
        self.key = key
        self.results = []

    def check(self, ok, what, detail=""):
        self.results.append({"ok": bool(ok), "check": what, "detail": detail})
        mark = "ok  " if ok else "FAIL"
        print(f"    [{mark}] {what}" + (f"  ({detail})" if detail else ""), flush=True)
        return bool(ok)

    @property
    def passed(self):
        return all(r["ok"] for r in self.results)


def run_scenario(sc, base, kvm):
    out = os.path.join(RUNS, sc.key)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    log(f"scenario {sc.key}: {sc.title}")
    token = "glrt-vmtest" + "".join(secrets.choice(string.ascii_letters + string.digits)
                                    for _ in range(16))
    name = f"vmtest-{sc.key}-{secrets.token_hex(3)}"
    runner_json = {"name": name, "url": f"http://{GITLAB_ADDR}", "token": token,
                   "executor": "shell", "max_jobs": 1, "idle_timeout": 600}

    t = time.time()
    image = build_root_image(base, sc, out)
    iso = build_config_iso(runner_json, out)
    image_seconds = time.time() - t
    gitlab = FakeGitLab(os.path.join(out, "gitlab-requests.jsonl"), token,
                        verify_status=sc.verify_status, job_seconds=sc.job_seconds)
    collector = Collector(os.path.join(out, "evidence"))
    checks = Checks(sc.key)
    vm = VM(out, base, image, iso, gitlab.port, collector.port, kvm)
    log(f"  qemu started ({'KVM' if kvm else 'TCG, emulated'}); images built in {image_seconds:.1f} s")
    try:
        drive(sc, vm, gitlab, checks)
    finally:
        vm.close()
        gitlab.close()
        collector.close()
    # The evidence upload ends before power-off; give the last bytes a moment to land.
    collector.done.wait(2)
    result = analyse(sc, vm, gitlab, collector, checks, name)
    result["image_seconds"] = round(image_seconds, 1)
    for path in (image, iso):
        os.unlink(path)
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(f"scenario {sc.key}: {'PASSED' if checks.passed else 'FAILED'} "
        f"({result['seconds']:.0f} s; evidence in {os.path.relpath(out, REPO)})")
    return result


def is_job_start(r):
    return r["method"] == "PUT" and re.fullmatch(r"/api/v4/jobs/\d+", r["path"]) \
        and r["body"].get("state") == "running"


def is_job_end(r):
    return r["method"] == "PUT" and re.fullmatch(r"/api/v4/jobs/\d+", r["path"]) \
        and r["body"].get("state") in ("success", "failed")


def is_deregistration(r):
    return r["method"] == "DELETE" and r["path"] == "/api/v4/runners/managers"


def drive(sc, vm, gitlab, checks):
    """What happens to the running VM from outside, per scenario, with the checks on timing."""
    if sc.poweroff_disabled:
        verify = gitlab.wait_for(lambda r: r["path"] == "/api/v4/runners/verify", BOOT_TO_JOB_MAX, vm)
        checks.check(verify is not None, "the agent called POST /runners/verify")
        up = not vm.wait(FAILURE_DELAY + AFTER_FAILURE_OBSERVE)
        checks.check(up, f"the VM was still up {FAILURE_DELAY + AFTER_FAILURE_OBSERVE} s after the "
                     "rejected verify (power-off disabled)")
        if up:
            vm.powerdown()
            stopped = vm.wait(GRACE)
            checks.check(stopped, f"system_powerdown stopped the VM within {GRACE} s",
                         f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else "destroyed")
        return
    if sc.verify_status != 200:
        verify = gitlab.wait_for(lambda r: r["path"] == "/api/v4/runners/verify", BOOT_TO_JOB_MAX, vm)
        checks.check(verify is not None, "the agent called POST /runners/verify")
        bound = FAILURE_DELAY + POWEROFF_MAX
        exited = vm.wait(bound if verify else 1)
        if verify and exited:
            after = vm.t_exit - verify["t"]
            checks.check(FAILURE_DELAY <= after <= bound,
                         f"the VM powered itself off between the failure delay ({FAILURE_DELAY} s) "
                         f"and {bound} s after the rejected verify", f"{after:.1f} s")
        else:
            checks.check(False, f"the VM powered itself off within {bound} s of the rejected verify")
        return

    job_start = gitlab.wait_for(is_job_start, BOOT_TO_JOB_MAX, vm)
    if not checks.check(job_start is not None, "a job started (PUT /jobs/:id state=running)",
                        f"{job_start['t'] - vm.t_start:.1f} s after qemu start" if job_start else ""):
        return

    if sc.powerdown_in_job:
        time.sleep(POWERDOWN_AFTER_JOB_START)
        checks.check(not gitlab.find("PUT", job_start["path"], is_job_end),
                     "the job was still running when the power button was pressed")
        vm.powerdown()
        stopped = vm.wait(GRACE)
        checks.check(stopped, f"the VM stopped within the grace period ({GRACE} s) after "
                     "system_powerdown", f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else
                     "destroyed after the grace period, as KubeVirt would")
        return

    dereg = gitlab.wait_for(is_deregistration, sc.job_seconds + POWEROFF_MAX, vm)
    if not checks.check(dereg is not None, "the agent called DELETE /runners/managers"):
        return
    if sc.keep_file:
        still_up = not vm.wait(HOLD_OBSERVE)
        checks.check(still_up, f"the VM was still running {HOLD_OBSERVE} s after deregistration "
                     "(held by /etc/keep-runner)")
        if not still_up:
            return
        vm.powerdown()
        stopped = vm.wait(GRACE)
        checks.check(stopped, f"system_powerdown stopped the held VM within {GRACE} s",
                     f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else "destroyed")
        return
    exited = vm.wait(POWEROFF_MAX)
    checks.check(exited, f"the VM powered itself off within {POWEROFF_MAX} s of deregistration",
                 f"{vm.t_exit - dereg['t']:.1f} s" if exited else "")


def analyse(sc, vm, gitlab, collector, checks, name):
    """Checks on what the fake GitLab saw and on the guest's evidence, and the timeline."""
    reqs = gitlab.requests
    verify = [r for r in reqs if r["path"] == "/api/v4/runners/verify"]
    job_reqs = [r for r in reqs if r["path"] == "/api/v4/jobs/request"]
    job_start = next((r for r in reqs if is_job_start(r)), None)
    job_end = next((r for r in reqs if is_job_end(r)), None)
    dereg = [r for r in reqs if is_deregistration(r)]
    system_id = verify[0]["body"].get("system_id") if verify else None
    c = checks.check

    print("  what the fake GitLab saw:", flush=True)
    for r in reqs:
        state = r["body"].get("state", "")
        print(f"    {r['t'] - vm.t_start:7.2f} s  {r['method']:6} {r['path']} -> {r['status']}"
              f"{'  ' + state if state else ''}", flush=True)

    # -- the fake GitLab -------------------------------------------------------------------------
    c(len(verify) == 1 and verify[0]["token_ok"], "one POST /runners/verify with the runner's token",
      f"{len(verify)} seen")
    c(system_id and SYSTEM_ID.fullmatch(system_id), "verify carried a system id r_ + 12 alphanumerics",
      str(system_id))
    c(verify and isinstance(verify[0]["body"].get("info"), dict), "verify carried info {...}")
    c(not [r for r in reqs if r["method"] == "DELETE" and r["path"] == "/api/v4/runners"],
      "never DELETE /runners (it would remove the runner of the whole fleet)")
    if sc.verify_status == 200:
        c(verify and verify[0]["status"] == 200, "the token was accepted (200)")
        c(job_reqs and all(r["body"].get("system_id") == system_id and r["token_ok"] for r in job_reqs),
          "every job request came with the same token and system id as verify",
          f"{len(job_reqs)} request(s)")
        c(job_start and job_reqs and verify and job_reqs[0]["t"] >= verify[0]["t"],
          "the job was requested after verify")
        ok_dereg = [r for r in dereg if r["status"] == 204]
        c(len(ok_dereg) == 1 and ok_dereg[0]["body"].get("system_id") == system_id and ok_dereg[0]["token_ok"],
          "the manager was deleted (DELETE /runners/managers, same system id, 204)",
          ", ".join(str(r["status"]) for r in dereg) or "none")
        c(ok_dereg and job_end and ok_dereg[0]["t"] >= job_end["t"], "deregistration came after the job ended")
        extra = [r for r in dereg if r["status"] != 204]
        if extra:
            print(f"    note: {len(extra)} further DELETE /runners/managers answered "
                  f"{[r['status'] for r in extra]} (already gone)", flush=True)
        if sc.powerdown_in_job:
            c(job_end and job_end["body"].get("state") == "failed"
              and job_end["body"].get("failure_reason") == "runner_interrupted",
              "gitlab-runner got SIGTERM: the job was reported failed, runner_interrupted",
              str(job_end["body"] if job_end else None))
            c(ok_dereg and vm.t_powerdown and ok_dereg[0]["t"] >= vm.t_powerdown,
              "the manager was deleted after the power button was pressed")
        else:
            c(job_end and job_end["body"].get("state") == "success", "the job succeeded")
            c(len(job_reqs) == 1, "exactly one job request (--max-builds 1)", f"{len(job_reqs)}")
    else:
        c(verify and verify[0]["status"] == 403, "the token was rejected (403)")
        c(not job_reqs, "no job was requested", f"{len(job_reqs)} request(s)")
        c(all(r["status"] in (403, 404) for r in dereg),
          "no manager was deleted (any DELETE /runners/managers answered 403/404)",
          f"{len(dereg)} DELETE(s)")

    # -- the VM's own end ------------------------------------------------------------------------
    console = open(os.path.join(vm.outdir, "console.log"), errors="replace").read()
    t_shutdown, shutdown = vm.shutdown_event()
    c(not vm.destroyed and vm.proc.returncode == 0, "qemu exited by itself, status 0",
      "destroyed by the test" if vm.destroyed else f"status {vm.proc.returncode}")
    c(shutdown.get("guest") is True and shutdown.get("reason") == "guest-shutdown",
      "the guest shut itself down (QMP SHUTDOWN: guest-shutdown)", json.dumps(shutdown))
    c("reboot: Power down" in console, "the guest kernel powered off (serial console: 'reboot: Power down')")

    # -- evidence from inside the guest ----------------------------------------------------------
    ev = Evidence(collector.outdir)
    c(ev.present and collector.hello, "the guest sent its evidence (clock at boot, journal at shutdown)")
    timeline = build_timeline(sc, vm, gitlab, collector, ev)
    if not ev.present:
        return finish_result(sc, vm, checks, timeline, None, name, collector)

    expected_unit = installed_unit_text()
    unit_dump = ev.text("unit.txt")
    fragment = unit_dump.split("/systemd/system/gitlab-runner-vm.service\n", 1)[-1].split("\n# /etc/", 1)[0]
    c(fragment.strip() == expected_unit.strip(),
      "systemd ran agent/dist/gitlab-runner-vm.service unchanged but for the binary's path")
    # /lib is /usr/lib on Debian bookworm (merged /usr); systemd names the first in its path.
    c(ev.show.get("FragmentPath") in (GUEST_UNIT, GUEST_UNIT.replace("/usr/lib/", "/lib/"))
      and ev.show.get("DropInPaths", "").endswith("/gitlab-runner-vm.service.d/overrides.conf"),
      "the unit came from lib/systemd/system with the module-like drop-in",
      f"{ev.show.get('FragmentPath')} + {ev.show.get('DropInPaths')}")
    c(ev.show.get("Type") == "notify" and ev.show.get("KillMode") == "mixed", "Type=notify, KillMode=mixed")

    mounts = json.loads(ev.text("findmnt.json") or "{}").get("filesystems", [])
    m = mounts[0] if mounts else {}
    c(m.get("fstype") == "iso9660" and "ro" in (m.get("options") or "").split(","),
      "/runner-info is the ISO 9660 config disk, mounted read-only",
      f"{m.get('source')} {m.get('fstype')} {m.get('options')} label={m.get('label')}")
    c(ev.first(lambda e: e.get("UNIT") == "runner\\x2dinfo.mount" and e.get("MESSAGE_ID") == MSG_UNIT_STARTED),
      "the mount unit runner\\x2dinfo.mount mounted it")

    agent = ev.agent_entries()
    c(agent, "the agent logged to the journal (SYSLOG_IDENTIFIER=gitlab-runner-vm)", f"{len(agent)} entries")
    structured = [e for e in agent if e.get("PHASE") and e.get("RUNNER") and e.get("SYSTEM_ID")]
    c(structured, "the agent's journal entries carry PHASE, RUNNER and SYSTEM_ID",
      f"{len(structured)} of {len(agent)}")
    c(structured and all(e["RUNNER"] == name for e in structured), "RUNNER is the runner's name", name)
    c(structured and all(e["SYSTEM_ID"] == system_id for e in structured),
      "SYSTEM_ID is the system id GitLab saw", str(system_id))
    jphases = ev.journal_phases()
    c(is_subsequence(sc.expect_phases, jphases) and not set(sc.forbid_phases) & set(jphases),
      f"the journal's phases went {' -> '.join(sc.expect_phases)}", " -> ".join(jphases))

    sphases = ev.status_phases()
    names = [text.split(":", 1)[0] for _, text in sphases]
    c(sphases and all(n in PHASES and ": " in text for n, (_, text) in zip(names, sphases)),
      "every StatusText was '<phase>: <detail>' with a known phase", " | ".join(t for _, t in sphases))
    merged = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    key_phase = "failed" if sc.verify_status != 200 else "running"
    c(merged and is_subsequence(merged, jphases) and key_phase in merged,
      f"systemctl show -p StatusText followed the phases (including {key_phase})", " -> ".join(merged))
    ready = ev.ready_time()
    started_msg = ev.unit_message(MSG_UNIT_STARTED)
    if sc.verify_status == 200:
        c(ready is not None and started_msg is not None, "the unit reached READY (active; systemd logged 'Started')")
        first_running = ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "gitlab-runner-vm"
                                 and e.get("PHASE") == "running")
        c(first_running and started_msg and Evidence.rt(started_msg) >= Evidence.rt(first_running),
          "READY came once gitlab-runner was running")
    else:
        failed = ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "gitlab-runner-vm"
                          and e.get("PHASE") == "failed")
        c(failed and (started_msg is None or Evidence.rt(started_msg) >= Evidence.rt(failed)),
          "READY was not sent before the failure")
        err = ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "gitlab-runner-vm"
                       and e.get("PRIORITY") in ("0", "1", "2", "3") and "403" in e.get("MESSAGE", ""))
        c(err, "the agent logged an error naming the 403", (err or {}).get("MESSAGE", "")[:160])
    # A Type=notify service whose main process exits before READY=1 ends in Result=protocol,
    # even with status 0, and Restart=on-failure then starts the agent again.
    c(ev.show.get("Result") == "success" and ev.show.get("ExecMainStatus") == "0",
      "the unit ended cleanly: the agent exited 0 and systemd recorded Result=success",
      f"Result={ev.show.get('Result')} ExecMainCode={ev.show.get('ExecMainCode')} "
      f"ExecMainStatus={ev.show.get('ExecMainStatus')}")
    killed = ev.first(lambda e: e.get("UNIT") == "gitlab-runner-vm.service" and e.get("_PID") == "1"
                      and re.search(r"timed out|Killing process|SIGKILL", e.get("MESSAGE", "")))
    c(killed is None, "systemd never had to kill the agent", (killed or {}).get("MESSAGE", ""))

    # The agent's state files: written before any GitLab call, owned by the runner user.
    files = {}
    for line in ev.text("state-files.txt").splitlines():
        parts = line.split()
        if len(parts) == 5:
            files[os.path.basename(parts[0])] = parts[1:]
    sid = files.get(".runner_system_id")
    c(sid and sid[0] == "600" and sid[1] == "runner", ".runner_system_id is 0600 and the runner user's",
      " ".join(sid or ["missing"]))
    c(ev.text("runner_system_id") == system_id, ".runner_system_id holds the system id, no newline",
      repr(ev.text("runner_system_id")))
    cfg = files.get("config.toml")
    c(cfg and cfg[1] == "runner", "config.toml is the runner user's", " ".join(cfg or ["missing"]))

    fake = [e.get("MESSAGE", "") for e in ev.journal if "fake-gitlab-runner:" in (e.get("MESSAGE") or "")]
    if sc.verify_status == 200:
        c(any(f"-r {name} --max-builds 1 --wait-timeout 600" in m for m in fake),
          "gitlab-runner ran as run-single -c <state>/config.toml -r <name> --max-builds 1 --wait-timeout 600, "
          "its output in the agent's log",
          next((m for m in fake if "run-single" in m), "no output of the fake gitlab-runner in the journal"))
        c(any("user=runner " in m for m in fake), "gitlab-runner ran as the runner user")
        env_line = next((m for m in fake if "environment:" in m), "")
        names_seen = set(env_line.split("environment:", 1)[-1].split())
        allowed = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "PWD"}  # PWD: set by sh itself
        c(env_line and names_seen <= allowed, "gitlab-runner got a scrubbed environment",
          " ".join(sorted(names_seen)))
        if sc.keep_file:
            c(ev.text("keep-runner").strip() == "present", "/etc/keep-runner was still there at shutdown")
        if sc.keep_file or sc.powerdown_in_job:
            key = ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "systemd-logind"
                           and "Power key pressed" in e.get("MESSAGE", ""))
            c(key, "systemd-logind handled the ACPI power button", (key or {}).get("MESSAGE", ""))
    return finish_result(sc, vm, checks, timeline, ev, name, collector)


TIMELINE_ORDER = [
    "kernel started", "systemd started", "network online", "guest clock handshake",
    "unit starting", "agent phase waiting-for-config", "agent phase registering", "verify",
    "agent phase running", "READY (unit started)", "job start", "job end",
    "agent phase draining", "agent phase deregistering", "deregistered", "agent phase holding",
    "agent phase failed", "agent phase powering-off", "system_powerdown sent",
    "logind: power key", "agent phase stopping", "agent unit stopped", "evidence uploaded",
    "qemu exited", "qemu exited (destroyed)",
]


def build_timeline(sc, vm, gitlab, collector, ev):
    """Events on the host's clock, in seconds after qemu started."""
    events = []

    def add(label, host_t):
        if host_t is not None:
            events.append((label, round(host_t - vm.t_start, 2)))

    def guest(label, entry):
        if entry is not None:
            add(label, collector.guest_to_host(Evidence.rt(entry)))

    reqs = gitlab.requests
    if ev is not None and ev.present:
        any_entry = ev.journal[0] if ev.journal else None
        if any_entry:
            boot_rt = Evidence.rt(any_entry) - int(any_entry["__MONOTONIC_TIMESTAMP"]) / 1e6
            add("kernel started", collector.guest_to_host(boot_rt))
        guest("systemd started", ev.first(lambda e: "running in system mode" in e.get("MESSAGE", "")))
        guest("network online", ev.first(lambda e: e.get("UNIT") == "network-online.target" and e.get("MESSAGE_ID") == MSG_UNIT_STARTED))
        guest("unit starting", ev.unit_message(MSG_UNIT_STARTING))
        guest("READY (unit started)", ev.unit_message(MSG_UNIT_STARTED))
        for phase in PHASES:
            guest(f"agent phase {phase}", ev.first(lambda e, p=phase: e.get("SYSLOG_IDENTIFIER") == "gitlab-runner-vm" and e.get("PHASE") == p))
        guest("logind: power key", ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "systemd-logind" and "Power key pressed" in e.get("MESSAGE", "")))
        guest("agent unit stopped", ev.first(lambda e: e.get("UNIT") == "gitlab-runner-vm.service" and e.get("_PID") == "1" and re.search(r"Deactivated successfully|Failed with result", e.get("MESSAGE", ""))))
    if collector.hello:
        add("guest clock handshake", collector.hello[0])
    for label, pred in (("verify", lambda r: r["path"] == "/api/v4/runners/verify"),
                        ("job start", is_job_start), ("job end", is_job_end),
                        ("deregistered", lambda r: is_deregistration(r) and r["status"] == 204)):
        r = next((r for r in reqs if pred(r)), None)
        add(label, r["t"] if r else None)
    add("system_powerdown sent", vm.t_powerdown)
    add("evidence uploaded", collector.evidence_at)
    add("qemu exited" + (" (destroyed)" if vm.destroyed else ""), vm.t_exit)
    events.sort(key=lambda e: e[1])
    return events


def finish_result(sc, vm, checks, timeline, ev, name, collector):
    print("  timeline (seconds after qemu started; guest times via the boot clock handshake):", flush=True)
    for label, t in timeline:
        print(f"    {t:7.2f}  {label}", flush=True)
    status_json = None
    if ev is not None:
        try:
            status_json = json.loads(ev.text("status-command.json"))
        except ValueError:
            status_json = ev.text("status-command.json")[:2000]
    offsets = collector.offsets()
    return {
        "scenario": sc.key, "title": sc.title, "passed": checks.passed, "runner": name,
        "guest_clock_drift_seconds": round(offsets[-1] - offsets[0], 3) if len(offsets) > 1 else None,
        "seconds": (vm.t_exit or time.time()) - vm.t_start,
        "timeline": timeline, "checks": checks.results, "agent_status_json": status_json,
    }


# ---- entry points ----------------------------------------------------------------------------------

def timeline_markdown(results, accel_note, total, cache):
    """One table: events down, scenarios across, seconds after qemu started."""
    order = [label for label in TIMELINE_ORDER
             if any(label == l for r in results for l, _ in r["timeline"])]
    order += sorted({l for r in results for l, _ in r["timeline"]} - set(order))
    head = "| Event (s after qemu start) | " + " | ".join(r["scenario"] for r in results) + " |"
    lines = [f"VM system test, {time.strftime('%Y-%m-%d %H:%M')}, {accel_note}, {cache} cache, "
             f"{total:.0f} s for the scenarios.", "", head,
             "|---|" + "---|" * len(results)]
    for label in order:
        cells = []
        for r in results:
            t = dict(r["timeline"]).get(label)
            cells.append("" if t is None else f"{t:.1f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| **result** | " + " | ".join("passed" if r["passed"] else "FAILED" for r in results) + " |")
    return "\n".join(lines) + "\n"


PREPARED = os.path.join(CACHE, "prepare.json")


def cmd_prepare(_args):
    """tests/vm/run calls this in the background while cargo builds; it leaves a note so that
    the run that follows knows whether the cache was cold."""
    base, seconds = ensure_base()
    with open(PREPARED, "w") as f:
        json.dump({"at": time.time(), "base": base, "build_seconds": seconds}, f)
    if seconds is None:
        log(f"root file system cached: {os.path.relpath(base, REPO)}")


def cmd_run(args):
    started = time.time()
    keys = args.scenarios or [k for k, sc in SCENARIOS.items() if sc.default]
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s) {unknown}; known: {' '.join(SCENARIOS)}")
    if not os.access(AGENT_BIN, os.X_OK):
        raise SystemExit(f"{AGENT_BIN} is missing: cargo build --release --locked -p gitlab-runner-vm")
    base, build_seconds = ensure_base()
    if build_seconds is None and os.path.exists(PREPARED):
        with open(PREPARED) as f:
            note = json.load(f)
        if note.get("base") == base and time.time() - note.get("at", 0) < 3600:
            build_seconds = note.get("build_seconds")
    built = build_seconds is not None
    kvm, why = probe_kvm(os.path.join(base, "vmlinuz"))
    accel_note = "KVM" if kvm else "TCG (emulated: no usable KVM)"
    log(f"accelerator: {accel_note} ({why})")
    os.makedirs(RUNS, exist_ok=True)
    results = []
    for k in keys:
        try:
            results.append(run_scenario(SCENARIOS[k], base, kvm))
        except Exception as e:  # a broken harness or qemu: report it, go on with the next
            log(f"scenario {k}: ERROR {type(e).__name__}: {e}")
            results.append({"scenario": k, "title": SCENARIOS[k].title, "passed": False,
                             "seconds": 0, "timeline": [],
                             "checks": [{"ok": False, "check": "the scenario ran", "detail": repr(e)}]})
    total = time.time() - started
    summary = {"accelerator": "kvm" if kvm else "tcg", "cache": "cold" if built else "warm",
               "rootfs_build_seconds": build_seconds and round(build_seconds, 1),
               "seconds": round(total, 1), "results": results}
    with open(os.path.join(RUNS, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(RUNS, "timeline.md"), "w") as f:
        f.write(timeline_markdown(results, accel_note, total, summary["cache"]))
    print("", flush=True)
    for r in results:
        print(f"  scenario {r['scenario']}: {'passed' if r['passed'] else 'FAILED'} "
              f"in {r['seconds']:.0f} s  {r['title']}", flush=True)
        for chk in r["checks"]:
            if not chk["ok"]:
                print(f"      failed: {chk['check']}  ({chk['detail']})", flush=True)
    log(f"VM scenarios done in {total:.0f} s ({accel_note}, {'cold' if built else 'warm'} cache)")
    return 0 if all(r["passed"] for r in results) else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare", help="build or find the cached root file system")
    run = sub.add_parser("run", help="run scenarios")
    run.add_argument("scenarios", nargs="*", help=f"any of {' '.join(SCENARIOS)} (default: "
                     f"{' '.join(k for k, sc in SCENARIOS.items() if sc.default)})")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("the VM system test needs root (debootstrap, file ownership in the image)")
    sys.exit(cmd_prepare(args) if args.command == "prepare" else cmd_run(args))


if __name__ == "__main__":
    main()
