"""Evidence from inside the guest: the collector on the host that receives the guest's clock at
boot and its evidence at shutdown (guest/vmtest-evidence sends both), and readers of that
evidence: the journal, `systemctl show`, the recorded StatusText changes, the state files."""

import io
import json
import os
import re
import tarfile
import threading
import time

from .config import UNIT
from .fake_gitlab import http_server

AGENT_IDENTIFIER = "gitlab-runner-vm"


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


# The key under which a journal entry (as Evidence reads it) holds {field: [values]} for its
# fields that came with more than one value (journalctl -o json prints those as arrays); the
# field itself keeps its first value.
MULTI = "_VMTEST_MULTI_VALUED"


def is_binary(value):
    """journalctl -o json prints a field that is not valid UTF-8 as an array of byte values."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, int) for v in value)


def field_text(value):
    if isinstance(value, list):
        if is_binary(value):
            return bytes(value).decode("utf-8", "replace")
        return field_text(value[0]) if value else ""
    return value


def read_entry(entry):
    out = {k: field_text(v) for k, v in entry.items()}
    multi = {k: [field_text(x) for x in v] for k, v in entry.items()
             if isinstance(v, list) and not is_binary(v) and len(v) > 1}
    if multi:
        out[MULTI] = multi
    return out


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
                    self.journal.append(read_entry(entry))
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
        return [e for e in self.journal if e.get("SYSLOG_IDENTIFIER") == AGENT_IDENTIFIER]

    def agent_process_entries(self):
        """Every journal entry of the unit from an agent process: entries whose _SYSTEMD_UNIT
        is the unit and whose _PID is that of an entry the agent logged itself (its
        SYSLOG_IDENTIFIER). That takes in what it logs through the journal's socket and what
        reaches its stdout and stderr streams (journald credits a stream, and so whatever a
        child writes to it, to the process that connected it), and leaves out systemd's own
        messages about the unit (_PID 1) and any other program of the unit that logs itself."""
        pids = {e.get("_PID") for e in self.journal
                if e.get("_SYSTEMD_UNIT") == UNIT and e.get("SYSLOG_IDENTIFIER") == AGENT_IDENTIFIER}
        return [e for e in self.journal if e.get("_SYSTEMD_UNIT") == UNIT and e.get("_PID") in pids]

    def journal_phases(self):
        """The agent's phases in the order its journal entries carry them (PHASE field)."""
        seq = []
        for e in self.agent_entries():
            phase = e.get("PHASE")
            if phase and (not seq or seq[-1] != phase):
                seq.append(phase)
        return seq

    def unit_message(self, message_id, unit=UNIT):
        for e in self.journal:
            if e.get("MESSAGE_ID") == message_id and e.get("UNIT") == unit and e.get("_PID") == "1":
                return e
        return None

    def first(self, pred):
        for e in self.journal:
            if pred(e):
                return e
        return None

    def first_agent(self, pred):
        return self.first(lambda e: e.get("SYSLOG_IDENTIFIER") == AGENT_IDENTIFIER and pred(e))

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

    def state_files(self):
        """{file name: [mode, user, group, size]} of the agent's state directory."""
        files = {}
        for line in self.text("state-files.txt").splitlines():
            parts = line.split()
            if len(parts) == 5:
                files[os.path.basename(parts[0])] = parts[1:]
        return files

    def fake_runner_output(self):
        """The fake gitlab-runner's lines, as they reached the journal."""
        return [e.get("MESSAGE", "") for e in self.journal
                if "fake-gitlab-runner:" in (e.get("MESSAGE") or "")]


def is_subsequence(needles, haystack):
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)
