"""pytest plumbing of the VM system test (tests/vm/run runs it; README: "The system test").

Each selected scenario's VM boots once per session: the `run` fixture is session-scoped and
parametrised by scenario, so pytest runs every expectation of scenario a, then of b, and so on,
booting each VM when its first expectation needs it. Each expectation in test_scenarios.py is
a test, parametrised by the scenarios it applies to (its `applies` predicate).

At the end the results go where tests/vm/run always left them: <scenario>/result.json with the
timeline and every expectation's outcome, summary.json and timeline.md (BENCHMARKS.md's table)
in tests/vm/.cache/runs/."""

import json
import os
import time

import pytest

from vmtest.config import AGENT_BIN, PREPARED, RUNS, log
from vmtest.image import ensure_base
from vmtest.qemu import probe_kvm
from vmtest.scenarios import SCENARIOS, Run
from vmtest.timeline import build_timeline, print_timeline, write_result, write_summary


def pytest_addoption(parser):
    parser.addoption("--scenario", action="append", default=[], metavar="KEY",
                     help=f"run this scenario (repeatable; any of {' '.join(SCENARIOS)}; default: all)")


def selected(config):
    keys = config.getoption("scenario") or list(SCENARIOS)
    unknown = [k for k in keys if k not in SCENARIOS]
    if unknown:
        raise pytest.UsageError(f"unknown scenario(s) {unknown}; known: {' '.join(SCENARIOS)}")
    return list(dict.fromkeys(keys))


class Session:
    """What the whole run shares: the accelerator, the root file system, each scenario's Run
    and the outcome of each expectation."""

    def __init__(self, keys):
        self.keys = keys
        self.started = time.time()
        self.base = self.kvm = self.accel_note = self.build_seconds = None
        self.runs = {}                              # key -> Run
        self.errors = {}                            # key -> why the scenario did not run
        self.checks = {k: [] for k in keys}         # key -> [{"ok", "check", "detail"}]


def pytest_configure(config):
    if os.geteuid() != 0 and not config.option.collectonly:
        raise pytest.UsageError("the VM system test needs root (debootstrap, file ownership in the image)")
    config.vmtest = Session(selected(config))


def pytest_generate_tests(metafunc):
    if "run" in metafunc.fixturenames:
        applies = getattr(metafunc.function, "applies", lambda sc: True)
        keys = [k for k in metafunc.config.vmtest.keys if applies(SCENARIOS[k])]
        metafunc.parametrize("run", keys, indirect=True, scope="session", ids=keys)


def pytest_collection_modifyitems(config, items):
    """An expectation that applies to none of the selected scenarios is left out, not skipped."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        uses_run = "run" in getattr(item, "fixturenames", ())
        key = callspec.params.get("run") if callspec else None
        (drop if uses_run and not isinstance(key, str) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def machine(pytestconfig):
    """The root file system (built if the cache is cold) and the accelerator (KVM if it works)."""
    s = pytestconfig.vmtest
    if s.base is None:
        if not os.access(AGENT_BIN, os.X_OK):
            pytest.exit(f"{AGENT_BIN} is missing: cargo build --release --locked -p gitlab-runner-vm",
                        returncode=1)
        base, build_seconds = ensure_base()
        if build_seconds is None and os.path.exists(PREPARED):
            with open(PREPARED) as f:
                note = json.load(f)
            if note.get("base") == base and time.time() - note.get("at", 0) < 3600:
                build_seconds = note.get("build_seconds")
        s.base, s.build_seconds = base, build_seconds
        s.kvm, why = probe_kvm(os.path.join(base, "vmlinuz"))
        s.accel_note = "KVM" if s.kvm else "TCG (emulated: no usable KVM)"
        log(f"accelerator: {s.accel_note} ({why})")
        os.makedirs(RUNS, exist_ok=True)
    return s


@pytest.fixture(scope="session")
def run(request, machine):
    """One scenario's VM, booted, driven and ended; its requests and evidence kept."""
    key = request.param
    print(flush=True)
    r = Run(SCENARIOS[key])
    machine.runs[key] = r
    try:
        r.execute(machine.base, machine.kvm)
    except Exception as e:  # a broken harness or qemu: every expectation of it errors
        log(f"scenario {key}: ERROR {type(e).__name__}: {e}")
        machine.errors[key] = repr(e)
        raise
    r.timeline = build_timeline(r)
    print_timeline(r.timeline)
    return r


@pytest.fixture
def expect(request):
    """expect(ok, detail, check=None): the expectation holds; `detail` is what was seen (kept
    in result.json either way), `check` replaces the test's docstring as its description."""
    def expect(ok, detail="", check=None):
        if check:
            request.node.user_properties.append(("check", check))
        request.node.user_properties.append(("detail", str(detail)))
        if not ok:
            pytest.fail(str(detail) or "not so", pytrace=False)
    return expect


def description(item):
    custom = [v for k, v in item.user_properties if k == "check"]
    if custom:
        return custom[-1]
    doc = (item.function.__doc__ or item.name).strip()
    return " ".join(doc.split("\n\n")[0].split())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Records each expectation's outcome for result.json: the call's, or the setup's when the
    scenario could not run."""
    outcome = yield
    report = outcome.get_result()
    callspec = getattr(item, "callspec", None)
    key = callspec.params.get("run") if callspec else None
    if key is None or not (report.when == "call" or (report.when == "setup" and report.failed)):
        return
    details = [v for k, v in item.user_properties if k == "detail"]
    detail = details[-1] if details else ""
    if not report.passed and not detail and report.longreprtext:
        detail = report.longreprtext.strip().splitlines()[-1]
    report.vmtest_result = {"ok": report.passed, "check": description(item), "detail": detail}
    item.config.vmtest.checks[key].append(report.vmtest_result)


def pytest_report_teststatus(report, config):
    result = getattr(report, "vmtest_result", None)
    if report.when == "call" and report.passed and result and result["detail"]:
        detail = result["detail"]
        detail = detail if len(detail) <= 100 else detail[:97] + "..."
        return "passed", ".", (f"PASSED  ({detail})", {"green": True})
    return None


def pytest_sessionfinish(session, exitstatus):
    s = getattr(session.config, "vmtest", None)
    if s is None or session.config.option.collectonly or not (s.runs or s.errors):
        return
    results = []
    for key in s.keys:
        if key not in s.runs and key not in s.errors:
            continue
        r = s.runs.get(key)
        checks = s.checks[key]
        if key in s.errors and not any(c["check"] == "the scenario ran" for c in checks):
            checks.insert(0, {"ok": False, "check": "the scenario ran", "detail": s.errors[key]})
        result = {
            "scenario": key, "title": SCENARIOS[key].title,
            "passed": bool(checks) and all(c["ok"] for c in checks) and key not in s.errors,
            "runner": r.name if r else None,
            "guest_clock_drift_seconds": r.guest_clock_drift() if r else None,
            "seconds": r.seconds if r else 0,
            "timeline": getattr(r, "timeline", []) if r else [],
            "checks": checks,
            "agent_status_json": r.agent_status_json() if r else None,
            "image_seconds": round(r.image_seconds, 1) if r and r.image_seconds is not None else None,
        }
        write_result(result)
        results.append(result)
    total = time.time() - s.started
    built = s.build_seconds is not None
    summary = {"accelerator": "kvm" if s.kvm else "tcg", "cache": "cold" if built else "warm",
               "rootfs_build_seconds": s.build_seconds and round(s.build_seconds, 1),
               "seconds": round(total, 1), "results": results}
    write_summary(summary, s.accel_note)
    print("", flush=True)
    for res in results:
        print(f"  scenario {res['scenario']}: {'passed' if res['passed'] else 'FAILED'} "
              f"in {res['seconds']:.0f} s  {res['title']}", flush=True)
        for chk in res["checks"]:
            if not chk["ok"]:
                print(f"      failed: {chk['check']}  ({chk['detail']})", flush=True)
    log(f"VM scenarios done in {total:.0f} s ({s.accel_note}, {'cold' if built else 'warm'} cache)")
