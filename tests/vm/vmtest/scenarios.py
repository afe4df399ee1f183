"""The scenarios, and running one: build the guest's disks, start the fake GitLab, the evidence
collector and qemu, drive the VM from outside as the scenario says (the power button, waits with
time bounds), and keep everything for the expectations (tests/vm/test_scenarios.py) to judge."""

import json
import os
import secrets
import shutil
import string
import time
from dataclasses import dataclass, field

from . import image
from .config import (AFTER_FAILURE_OBSERVE, BOOT_TO_JOB_MAX, CONFIG_DISK_LATE, FAILURE_DELAY,
                     GITLAB_ADDR, GRACE,
                     HOLD_OBSERVE, HOSTILE_JOB, HOSTILE_JOB_MAX, JOB_SECONDS, LONG_JOB_SECONDS,
                     PHASES, POWERDOWN_AFTER_JOB_START, POWEROFF_MAX, REGISTRY_MIRRORS, REPO, RUNS,
                     log)
from .evidence import Collector, Evidence
from .fake_gitlab import (FakeGitLab, is_deregistration, is_job_end, is_job_start, is_verify,
                          mask_in_text)
from .qemu import VM


@dataclass
class Scenario:
    key: str
    title: str
    verify_status: int = 200
    job_seconds: int = JOB_SECONDS
    keep_file: bool = False
    failure_delay: bool = False
    poweroff_disabled: bool = False
    powerdown_in_job: bool = False
    expect_phases: list = field(default_factory=list)
    forbid_phases: list = field(default_factory=list)
    # The job's script (lines of .gitlab-ci.yml's `script:`); None: sleep job_seconds.
    job_script: list = None
    # The hostile job's image: its stand-ins, the metadata firewall (vmtest/image.py).
    hostile: bool = False
    # gitlabRunnerVm.runner.jobsCanBecomeRoot: the job user has passwordless sudo.
    jobs_can_become_root: bool = False
    # The metadata firewall's backend (nixos-modules/metadata-firewall.sh): f iptables, g nftables.
    firewall_backend: str = "iptables"
    # The config disk is hot-plugged CONFIG_DISK_LATE s after the guest is up (item 8 of issue
    # 19: a disk slower than a device timeout), not attached at boot.
    config_disk_late: bool = False
    # A blank scratch disk (serial scratch), formatted and mounted by runner-scratch; the other
    # scenarios have none, and their boots must not wait for one.
    scratch_disk: bool = False
    # runner.json's `registry_mirrors` (scenario a: written to Podman's drop-in, which `podman
    # info` then shows; the guest has no Docker).
    registry_mirrors: list = None
    # runner.json's `cache` (None: none). Scenario f: S3 with the instance's role, for which
    # the agent admits gitlab-runner's cgroup (never the job's) through the metadata firewall.
    cache: dict = None

    def __post_init__(self):
        # A misspelt (or renamed) phase fails here, not as a forbidden phase that is never seen.
        unknown = [p for p in self.expect_phases + self.forbid_phases if p not in PHASES]
        if unknown:
            raise ValueError(f"scenario {self.key}: {unknown} are not phases of the agent "
                             f"(agent/facts.json: {PHASES})")

    @property
    def accepted(self):
        """Whether GitLab accepts the token (else it rejects it with 403)."""
        return self.verify_status == 200


SCENARIOS = {
    "a": Scenario("a", "happy path: one job, deregistration, power-off by the VM itself; "
                  "Podman reads the registry mirrors of runner.json",
                  scratch_disk=True, registry_mirrors=REGISTRY_MIRRORS,
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
    # Issue 17, the trust boundary: a job that tries every path to the runner token (config.toml,
    # the system id, runner.json, the state directory, /proc of gitlab-runner and the agent, the
    # journal, a Docker socket, the metadata address) gets nothing...
    "f": Scenario("f", "hostile job: every path to the runner token and out of the VM refused, "
                  "then deregistration and power-off as usual",
                  job_seconds=HOSTILE_JOB_MAX, job_script=[HOSTILE_JOB], hostile=True,
                  cache={"Type": "s3", "Path": "vmtest",
                         "s3": {"BucketName": "vmtest-cache", "BucketLocation": "eu-west-1"}},
                  expect_phases=["registering", "running", "deregistering", "powering-off"],
                  forbid_phases=["failed", "holding", "stopping"]),
    # ...and the same job where the job user may become root (jobsCanBecomeRoot) gets the token
    # through sudo: what the option costs, and the proof that f's checks can fail.
    "g": Scenario("g", "job with root (jobsCanBecomeRoot): the same hostile job gets the token "
                  "and the metadata service through sudo",
                  job_seconds=HOSTILE_JOB_MAX, job_script=[HOSTILE_JOB], hostile=True,
                  jobs_can_become_root=True, firewall_backend="nftables",
                  expect_phases=["registering", "running", "deregistering", "powering-off"],
                  forbid_phases=["failed", "holding", "stopping"]),
    # A config disk that comes after boot (a slow node, a slow attach): mounted when it appears,
    # the agent reads runner.json from it within --config-wait, and the rest is scenario a.
    "h": Scenario("h", "config disk attached after boot: mounted when it appears, then the "
                  "happy path", config_disk_late=True,
                  expect_phases=["waiting-for-config", "registering", "running", "deregistering",
                                 "powering-off"],
                  forbid_phases=["failed", "holding", "stopping"]),
}


class Run:
    """One scenario's VM, from boot to its end, and everything it left: the requests the fake
    GitLab saw, the guest's evidence, and the outcome of each step driven from outside."""

    def __init__(self, sc):
        self.sc = sc
        self.out = os.path.join(RUNS, sc.key)
        self.name = f"vmtest-{sc.key}-{secrets.token_hex(3)}"
        self.token = "glrt-vmtest" + "".join(secrets.choice(string.ascii_letters + string.digits)
                                             for _ in range(16))
        self.steps = {}              # step -> (ok, what, detail), in the order they were taken
        self.config_disk_at = None   # scenario h: host time of the config disk's hot-plug
        self.image_seconds = None
        self.vm = self.gitlab = self.collector = self.evidence = None

    @property
    def runner_json(self):
        config = {"name": self.name, "url": f"http://{GITLAB_ADDR}", "token": self.token,
                  "executor": "shell", "max_jobs": 1, "idle_timeout": 600}
        if self.sc.cache:
            config["cache"] = self.sc.cache
        if self.sc.registry_mirrors:
            config["registry_mirrors"] = self.sc.registry_mirrors
        return config

    # -- a step driven from outside: recorded now, judged by its test -------------------------

    def step(self, key, ok, what, detail=""):
        self.steps[key] = (bool(ok), what, detail)
        print(f"    [{'ok  ' if ok else 'FAIL'}] {what}" + (f"  ({detail})" if detail else ""), flush=True)
        return bool(ok)

    def step_result(self, key):
        """(ok, what, detail) of a step, or a failure naming the step that stopped the run
        before it."""
        if key in self.steps:
            return self.steps[key]
        failed = [what for ok, what, _ in self.steps.values() if not ok]
        return False, key, "not reached" + (f": the run stopped after '{failed[0]}' failed" if failed else "")

    # -- what the fake GitLab saw ---------------------------------------------------------------

    @property
    def requests(self):
        return self.gitlab.requests

    def all(self, pred):
        return [r for r in self.requests if pred(r)]

    def first(self, pred):
        return next((r for r in self.requests if pred(r)), None)

    @property
    def system_id(self):
        """The system id of the first verify, as GitLab saw it."""
        verify = self.all(is_verify)
        return verify[0]["body"].get("system_id") if verify else None

    def execute(self, base, kvm):
        shutil.rmtree(self.out, ignore_errors=True)
        os.makedirs(self.out)
        sc = self.sc
        log(f"scenario {sc.key}: {sc.title}")
        t = time.time()
        root_image = image.build_root_image(base, sc, self.out)
        iso = image.build_config_iso(self.runner_json, self.out)
        scratch = image.build_scratch_disk(self.out) if sc.scratch_disk else None
        self.image_seconds = time.time() - t
        self.gitlab = FakeGitLab(os.path.join(self.out, "gitlab-requests.jsonl"), self.token,
                                 verify_status=sc.verify_status, job_seconds=sc.job_seconds,
                                 job_script=sc.job_script)
        self.collector = Collector(os.path.join(self.out, "evidence"))
        try:
            self.vm = VM(self.out, base, root_image, iso, self.gitlab.port, self.collector.port, kvm,
                         config_disk_late=sc.config_disk_late, scratch=scratch)
            log(f"  qemu started ({'KVM' if kvm else 'TCG, emulated'}); images built in "
                f"{self.image_seconds:.1f} s")
            drive(self)
        finally:
            if self.vm:
                self.vm.close()
            self.gitlab.close()
            self.collector.close()
            # The evidence upload ends before power-off; give the last bytes a moment to land.
            self.collector.done.wait(2)
            for path in (root_image, iso, scratch):
                if path:
                    os.unlink(path)
        self.evidence = Evidence(self.collector.outdir)
        if sc.hostile:
            with open(os.path.join(self.out, "hostile-report.jsonl"), "w") as f:
                for line in self.hostile_report():
                    f.write(mask_in_text(json.dumps(line), self.token) + "\n")
        self.print_requests()
        log(f"scenario {sc.key}: VM done in {self.seconds:.0f} s; evidence in "
            f"{os.path.relpath(self.out, REPO)}")

    @property
    def seconds(self):
        if self.vm is None:
            return 0
        return (self.vm.t_exit or time.time()) - self.vm.t_start

    def print_requests(self):
        print("  what the fake GitLab saw:", flush=True)
        for r in self.requests:
            state = r["body"].get("state", "")
            print(f"    {r['t'] - self.vm.t_start:7.2f} s  {r['method']:6} {r['path']} -> {r['status']}"
                  f"{'  ' + state if state else ''}", flush=True)

    def job_trace(self):
        """Everything the job printed (its trace, as the fake gitlab-runner sent it), unmasked:
        compare with it, never print it."""
        return "".join(self.gitlab.traces.values()) if self.gitlab else ""

    def hostile_report(self):
        """The hostile job's JSON lines, from its trace (unmasked: may hold the token)."""
        report = []
        for line in self.job_trace().splitlines():
            line = line.strip()
            if line.startswith("{") and '"hostile"' in line:
                try:
                    report.append(json.loads(line))
                except ValueError:
                    continue
        return report

    def agent_status_json(self):
        if self.evidence is None or not self.evidence.present:
            return None
        try:
            return json.loads(self.evidence.text("status-command.json"))
        except ValueError:
            return self.evidence.text("status-command.json")[:2000]

    def guest_clock_drift(self):
        offsets = self.collector.offsets() if self.collector else []
        return round(offsets[-1] - offsets[0], 3) if len(offsets) > 1 else None


def drive(run):
    """What happens to the running VM from outside, per scenario, with the time bounds."""
    sc, vm, gitlab = run.sc, run.vm, run.gitlab
    if sc.config_disk_late and not attach_config_disk_late(run):
        return
    if not sc.accepted:
        verify = gitlab.wait_for(is_verify, BOOT_TO_JOB_MAX, vm)
        if not run.step("verify", verify is not None, "the agent called POST /runners/verify"):
            return
        if sc.poweroff_disabled:
            observe = FAILURE_DELAY + AFTER_FAILURE_OBSERVE
            up = not vm.wait(observe)
            if not run.step("stayed up", up, f"the VM was still up {observe} s after the "
                            "rejected verify (power-off disabled)"):
                return
            vm.powerdown()
            stopped = vm.wait(GRACE)
            run.step("power button", stopped, f"system_powerdown stopped the VM within {GRACE} s",
                     f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else "destroyed")
            return
        bound = FAILURE_DELAY + POWEROFF_MAX
        exited = vm.wait(bound)
        after = vm.t_exit - verify["t"] if exited else None
        run.step("powered off", exited and FAILURE_DELAY <= after <= bound,
                 f"the VM powered itself off between the failure delay ({FAILURE_DELAY} s) "
                 f"and {bound} s after the rejected verify",
                 f"{after:.1f} s" if exited else f"still up after {bound} s")
        return

    job_start = gitlab.wait_for(is_job_start, BOOT_TO_JOB_MAX, vm)
    if not run.step("job started", job_start is not None, "a job started (PUT /jobs/:id state=running)",
                    f"{job_start['t'] - vm.t_start:.1f} s after qemu start" if job_start else
                    f"none within {BOOT_TO_JOB_MAX} s"):
        return

    if sc.powerdown_in_job:
        time.sleep(POWERDOWN_AFTER_JOB_START)
        run.step("job running at the power button", not gitlab.find("PUT", job_start["path"], is_job_end),
                 "the job was still running when the power button was pressed")
        vm.powerdown()
        stopped = vm.wait(GRACE)
        run.step("power button", stopped, f"the VM stopped within the grace period ({GRACE} s) "
                 "after system_powerdown", f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else
                 "destroyed after the grace period, as KubeVirt would")
        return

    dereg = gitlab.wait_for(is_deregistration, sc.job_seconds + POWEROFF_MAX, vm)
    if not run.step("deregistered", dereg is not None, "the agent called DELETE /runners/managers"):
        return
    if sc.keep_file:
        still_up = not vm.wait(HOLD_OBSERVE)
        if not run.step("held", still_up, f"the VM was still running {HOLD_OBSERVE} s after "
                        "deregistration (held by /etc/keep-runner)"):
            return
        vm.powerdown()
        stopped = vm.wait(GRACE)
        run.step("power button", stopped, f"system_powerdown stopped the held VM within {GRACE} s",
                 f"{vm.t_exit - vm.t_powerdown:.1f} s" if stopped else "destroyed")
        return
    exited = vm.wait(POWEROFF_MAX)
    run.step("powered off", exited, f"the VM powered itself off within {POWEROFF_MAX} s of "
             "deregistration", f"{vm.t_exit - dereg['t']:.1f} s" if exited else "")


def attach_config_disk_late(run):
    """Scenario h: once the guest is up (its hello, sent just before the agent starts) and
    CONFIG_DISK_LATE s more, the config disk is hot-plugged."""
    vm, collector = run.vm, run.collector
    deadline = time.time() + BOOT_TO_JOB_MAX
    while collector.hello is None and not vm.exited() and time.time() < deadline:
        time.sleep(0.2)
    if not run.step("guest up", collector.hello is not None, "the guest said hello (booted, "
                    "without its config disk)", f"{collector.hello[0] - vm.t_start:.1f} s after qemu "
                    "start" if collector.hello else f"none within {BOOT_TO_JOB_MAX} s"):
        return False
    time.sleep(max(0.0, collector.hello[0] + CONFIG_DISK_LATE - time.time()))
    early = run.first(is_verify)
    ok, detail = vm.attach_config_disk()
    run.config_disk_at = time.time()
    return run.step("config disk attached", ok and early is None,
                    f"the config disk was hot-plugged {CONFIG_DISK_LATE} s after the guest was up, "
                    "with no verify before it", f"{run.config_disk_at - vm.t_start:.1f} s after qemu "
                    f"start; {detail}" + ("; a verify came first" if early else ""))
