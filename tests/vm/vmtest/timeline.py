"""The events of a run on the host's clock, in seconds after qemu started, and the files a whole
run leaves: <scenario>/result.json, summary.json and timeline.md (the table in BENCHMARKS.md)."""

import json
import os
import re
import time

from .config import MSG_UNIT_STARTED, MSG_UNIT_STARTING, PHASES, RUNS, UNIT
from .evidence import Evidence
from .fake_gitlab import is_deregistration, is_job_end, is_job_start, is_verify

TIMELINE_ORDER = [
    "kernel started", "systemd started", "network online", "guest clock handshake",
    "unit starting", "agent phase waiting-for-config", "agent phase registering", "verify",
    "agent phase running", "READY (unit started)", "job start", "job end",
    "agent phase draining", "agent phase deregistering", "deregistered", "agent phase holding",
    "agent phase failed", "agent phase powering-off", "system_powerdown sent",
    "logind: power key", "agent phase stopping", "agent unit stopped", "evidence uploaded",
    "qemu exited", "qemu exited (destroyed)",
]


def build_timeline(run):
    """Events on the host's clock, in seconds after qemu started: [(label, seconds)]."""
    vm, collector, ev = run.vm, run.collector, run.evidence
    events = []

    def add(label, host_t):
        if host_t is not None:
            events.append((label, round(host_t - vm.t_start, 2)))

    def guest(label, entry):
        if entry is not None:
            add(label, collector.guest_to_host(Evidence.rt(entry)))

    if ev is not None and ev.present:
        any_entry = ev.journal[0] if ev.journal else None
        if any_entry:
            boot_rt = Evidence.rt(any_entry) - int(any_entry["__MONOTONIC_TIMESTAMP"]) / 1e6
            add("kernel started", collector.guest_to_host(boot_rt))
        guest("systemd started", ev.first(lambda e: "running in system mode" in e.get("MESSAGE", "")))
        guest("network online", ev.first(lambda e: e.get("UNIT") == "network-online.target"
                                          and e.get("MESSAGE_ID") == MSG_UNIT_STARTED))
        guest("unit starting", ev.unit_message(MSG_UNIT_STARTING))
        guest("READY (unit started)", ev.unit_message(MSG_UNIT_STARTED))
        for phase in PHASES:
            guest(f"agent phase {phase}", ev.first_agent(lambda e, p=phase: e.get("PHASE") == p))
        guest("logind: power key", ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "systemd-logind"
                                            and "Power key pressed" in e.get("MESSAGE", "")))
        guest("agent unit stopped", ev.first(
            lambda e: e.get("UNIT") == UNIT and e.get("_PID") == "1"
            and re.search(r"Deactivated successfully|Failed with result", e.get("MESSAGE", ""))))
    if collector.hello:
        add("guest clock handshake", collector.hello[0])
    for label, pred in (("verify", is_verify), ("job start", is_job_start), ("job end", is_job_end),
                        ("deregistered", lambda r: is_deregistration(r) and r["status"] == 204)):
        r = run.first(pred)
        add(label, r["t"] if r else None)
    add("system_powerdown sent", vm.t_powerdown)
    add("evidence uploaded", collector.evidence_at)
    add("qemu exited" + (" (destroyed)" if vm.destroyed else ""), vm.t_exit)
    events.sort(key=lambda e: e[1])
    return events


def print_timeline(timeline):
    print("  timeline (seconds after qemu started; guest times via the boot clock handshake):", flush=True)
    for label, t in timeline:
        print(f"    {t:7.2f}  {label}", flush=True)


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


def write_result(result):
    directory = os.path.join(RUNS, result["scenario"])
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "result.json"), "w") as f:
        json.dump(result, f, indent=2)


def write_summary(summary, accel_note):
    os.makedirs(RUNS, exist_ok=True)
    with open(os.path.join(RUNS, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(RUNS, "timeline.md"), "w") as f:
        f.write(timeline_markdown(summary["results"], accel_note, summary["seconds"], summary["cache"]))
