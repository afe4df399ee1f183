"""The expectations of the VM system test, one test each, parametrised by the scenarios they
apply to (vmtest/scenarios.py; each scenario's VM boots once, see conftest.py). The first ones
judge the steps driven from outside while the VM ran (with their time bounds), then what the
fake GitLab saw, how the VM ended, and the evidence from inside the guest."""

import json
import os
import re

import pytest

from vmtest.config import (FACTS, GUEST_AGENT, GUEST_UNIT, MSG_UNIT_STARTED, MSG_UNIT_STARTING,
                            PHASES, STATE_DIR, SYSTEM_ID, UNIT)
from vmtest.evidence import MULTI, Evidence, is_subsequence
from vmtest.fake_gitlab import (is_deregistration, is_job_end, is_job_request, is_job_start,
                                is_runner_deletion, is_verify, mask_in_text)
from vmtest.image import installed_unit_text


def applies(pred):
    """The scenarios an expectation applies to."""
    def mark(test):
        test.applies = pred
        return test
    return mark


def accepted(sc):
    return sc.accepted


def rejected(sc):
    return not sc.accepted


def one_job_to_its_end(sc):
    return sc.accepted and not sc.powerdown_in_job


def power_button(sc):
    return sc.keep_file or sc.powerdown_in_job or sc.poweroff_disabled


def late_config_disk(sc):
    return sc.config_disk_late


def scratch_disk(sc):
    return sc.scratch_disk


def no_scratch_disk(sc):
    return not sc.scratch_disk


SCRATCH_UNIT = "runner-scratch.service"


def scratch_messages(ev):
    return [e.get("MESSAGE") or "" for e in ev.journal if e.get("_SYSTEMD_UNIT") == SCRATCH_UNIT]


@pytest.fixture
def ev(run):
    """The guest's evidence; an expectation on it fails when there is none."""
    if not run.evidence.present:
        pytest.fail("no evidence from the guest (see test_the_guest_sent_its_evidence)", pytrace=False)
    return run.evidence


def step(run, expect, key):
    ok, what, detail = run.step_result(key)
    expect(ok, detail, check=what)


# ---- the steps driven from outside, with their time bounds -------------------------------------

@applies(accepted)
def test_a_job_started(run, expect):
    """a job started (PUT /jobs/:id state=running)"""
    step(run, expect, "job started")


@applies(lambda sc: sc.powerdown_in_job)
def test_the_job_was_still_running_at_the_power_button(run, expect):
    """the job was still running when the power button was pressed"""
    step(run, expect, "job running at the power button")


@applies(lambda sc: sc.accepted and not sc.powerdown_in_job)
def test_the_agent_deregistered_after_the_job(run, expect):
    """the agent called DELETE /runners/managers"""
    step(run, expect, "deregistered")


@applies(lambda sc: one_job_to_its_end(sc) and not sc.keep_file)
def test_the_vm_powered_itself_off_after_deregistration(run, expect):
    """the VM powered itself off after deregistration"""
    step(run, expect, "powered off")


@applies(lambda sc: sc.keep_file)
def test_the_keep_file_held_the_vm_after_deregistration(run, expect):
    """the VM was still running after deregistration (held by /etc/keep-runner)"""
    step(run, expect, "held")


@applies(rejected)
def test_the_agent_called_verify(run, expect):
    """the agent called POST /runners/verify"""
    step(run, expect, "verify")


@applies(lambda sc: rejected(sc) and not sc.poweroff_disabled)
def test_the_vm_powered_itself_off_after_the_failure_delay(run, expect):
    """the VM powered itself off after the failure delay"""
    step(run, expect, "powered off")


@applies(lambda sc: sc.poweroff_disabled)
def test_with_power_off_disabled_the_vm_stayed_up_after_the_failure(run, expect):
    """the VM was still up after the rejected verify (power-off disabled)"""
    step(run, expect, "stayed up")


@applies(power_button)
def test_the_power_button_stopped_the_vm_within_the_grace_period(run, expect):
    """system_powerdown stopped the VM within the grace period"""
    step(run, expect, "power button")


# ---- what the fake GitLab saw ------------------------------------------------------------------

def test_one_verify_with_the_runners_token(run, expect):
    """one POST /runners/verify with the runner's token"""
    verify = run.all(is_verify)
    expect(len(verify) == 1 and verify[0]["token_ok"], f"{len(verify)} seen")


def test_verify_carried_a_system_id(run, expect):
    """verify carried a system id r_ + 12 alphanumerics"""
    expect(run.system_id and SYSTEM_ID.fullmatch(run.system_id), str(run.system_id))


def test_verify_carried_info(run, expect):
    """verify carried info {...}"""
    verify = run.all(is_verify)
    expect(verify and isinstance(verify[0]["body"].get("info"), dict),
           json.dumps(verify[0]["body"].get("info")) if verify else "no verify")


def test_the_fleets_runner_was_never_deleted(run, expect):
    """never DELETE /runners (it would remove the runner of the whole fleet)"""
    deletions = run.all(is_runner_deletion)
    expect(not deletions, f"{len(deletions)} DELETE /runners")


@applies(accepted)
def test_the_token_was_accepted(run, expect):
    """the token was accepted (200)"""
    verify = run.all(is_verify)
    expect(verify and verify[0]["status"] == 200, str(verify[0]["status"]) if verify else "no verify")


@applies(accepted)
def test_every_job_request_came_with_the_token_and_system_id_of_verify(run, expect):
    """every job request came with the same token and system id as verify"""
    job_reqs = run.all(is_job_request)
    expect(job_reqs and all(r["body"].get("system_id") == run.system_id and r["token_ok"] for r in job_reqs),
           f"{len(job_reqs)} request(s)")


@applies(accepted)
def test_the_job_was_requested_after_verify(run, expect):
    """the job was requested after verify"""
    verify, job_reqs = run.all(is_verify), run.all(is_job_request)
    expect(run.first(is_job_start) and job_reqs and verify and job_reqs[0]["t"] >= verify[0]["t"],
           f"{len(job_reqs)} job request(s), {len(verify)} verify")


def successful_deregistrations(run):
    return [r for r in run.all(is_deregistration) if r["status"] == 204]


@applies(accepted)
def test_the_manager_was_deleted(run, expect):
    """the manager was deleted (DELETE /runners/managers, same system id, 204)"""
    dereg, ok = run.all(is_deregistration), successful_deregistrations(run)
    extra = [r["status"] for r in dereg if r["status"] != 204]
    if extra:
        print(f"    note: {len(extra)} further DELETE /runners/managers answered {extra} (already gone)")
    expect(len(ok) == 1 and ok[0]["body"].get("system_id") == run.system_id and ok[0]["token_ok"],
           ", ".join(str(r["status"]) for r in dereg) or "none")


@applies(accepted)
def test_deregistration_came_after_the_job_ended(run, expect):
    """deregistration came after the job ended"""
    ok, job_end = successful_deregistrations(run), run.first(is_job_end)
    expect(ok and job_end and ok[0]["t"] >= job_end["t"],
           f"{ok[0]['t'] - job_end['t']:.1f} s after" if ok and job_end else "no job end or no deletion")


@applies(lambda sc: sc.powerdown_in_job)
def test_gitlab_runner_got_sigterm_and_reported_the_job_interrupted(run, expect):
    """gitlab-runner got SIGTERM: the job was reported failed, runner_interrupted"""
    job_end = run.first(is_job_end)
    expect(job_end and job_end["body"].get("state") == "failed"
           and job_end["body"].get("failure_reason") == "runner_interrupted",
           str(job_end["body"] if job_end else None))


@applies(lambda sc: sc.powerdown_in_job)
def test_the_manager_was_deleted_after_the_power_button(run, expect):
    """the manager was deleted after the power button was pressed"""
    ok, pressed = successful_deregistrations(run), run.vm.t_powerdown
    expect(ok and pressed and ok[0]["t"] >= pressed,
           f"{ok[0]['t'] - pressed:.1f} s after" if ok and pressed else "no deletion or no press")


@applies(one_job_to_its_end)
def test_the_job_succeeded(run, expect):
    """the job succeeded"""
    job_end = run.first(is_job_end)
    expect(job_end and job_end["body"].get("state") == "success", str(job_end["body"] if job_end else None))


@applies(one_job_to_its_end)
def test_exactly_one_job_request(run, expect):
    """exactly one job request (--max-builds 1)"""
    expect(len(run.all(is_job_request)) == 1, f"{len(run.all(is_job_request))}")


@applies(rejected)
def test_the_token_was_rejected(run, expect):
    """the token was rejected (403)"""
    verify = run.all(is_verify)
    expect(verify and verify[0]["status"] == 403, str(verify[0]["status"]) if verify else "no verify")


@applies(rejected)
def test_no_job_was_requested(run, expect):
    """no job was requested"""
    expect(not run.all(is_job_request), f"{len(run.all(is_job_request))} request(s)")


@applies(rejected)
def test_no_manager_was_deleted(run, expect):
    """no manager was deleted (any DELETE /runners/managers answered 403/404)"""
    dereg = run.all(is_deregistration)
    expect(all(r["status"] in (403, 404) for r in dereg), f"{len(dereg)} DELETE(s)")


# ---- how the VM ended --------------------------------------------------------------------------

def test_qemu_exited_by_itself_with_status_0(run, expect):
    """qemu exited by itself, status 0"""
    vm = run.vm
    expect(not vm.destroyed and vm.proc.returncode == 0,
           "destroyed by the test" if vm.destroyed else f"status {vm.proc.returncode}")


def test_the_guest_shut_itself_down(run, expect):
    """the guest shut itself down (QMP SHUTDOWN: guest-shutdown)"""
    _, shutdown = run.vm.shutdown_event()
    expect(shutdown.get("guest") is True and shutdown.get("reason") == "guest-shutdown", json.dumps(shutdown))


def test_the_guest_kernel_powered_off(run, expect):
    """the guest kernel powered off (serial console: 'reboot: Power down')"""
    expect("reboot: Power down" in run.vm.console(), "")


# ---- the evidence from inside the guest: the unit and the config disk --------------------------

def test_the_guest_sent_its_evidence(run, expect):
    """the guest sent its evidence (clock at boot, journal at shutdown)"""
    expect(run.evidence.present and run.collector.hello,
           f"clock handshake: {'yes' if run.collector.hello else 'no'}, "
           f"journal: {'yes' if run.evidence.present else 'no'}")


def test_systemd_ran_the_canonical_unit_unchanged(ev, expect):
    """systemd ran agent/dist/gitlab-runner-vm.service unchanged but for the binary's path"""
    dump = ev.text("unit.txt")
    fragment = dump.split(f"/systemd/system/{UNIT}\n", 1)[-1].split("\n# /etc/", 1)[0]
    expect(fragment.strip() == installed_unit_text().strip(), "")


def test_the_unit_came_from_the_package_directory_with_the_module_like_dropin(ev, expect):
    """the unit came from lib/systemd/system with the module-like drop-in"""
    # /lib is /usr/lib on Debian bookworm (merged /usr); systemd names the first in its path.
    expect(ev.show.get("FragmentPath") in (GUEST_UNIT, GUEST_UNIT.replace("/usr/lib/", "/lib/"))
           and ev.show.get("DropInPaths", "").endswith(f"/{UNIT}.d/overrides.conf"),
           f"{ev.show.get('FragmentPath')} + {ev.show.get('DropInPaths')}")


def test_type_notify_and_killmode_mixed(ev, expect):
    """Type=notify, KillMode=mixed"""
    expect(ev.show.get("Type") == "notify" and ev.show.get("KillMode") == "mixed",
           f"Type={ev.show.get('Type')} KillMode={ev.show.get('KillMode')}")


def test_runner_info_is_the_read_only_iso_config_disk(ev, expect):
    """/runner-info is the ISO 9660 config disk, mounted read-only"""
    mounts = json.loads(ev.text("findmnt.json") or "{}").get("filesystems", [])
    m = mounts[0] if mounts else {}
    expect(m.get("fstype") == "iso9660" and "ro" in (m.get("options") or "").split(","),
           f"{m.get('source')} {m.get('fstype')} {m.get('options')} label={m.get('label')}")


def test_the_mount_unit_mounted_it(ev, expect):
    """the mount unit runner\\x2dinfo.mount mounted it"""
    expect(ev.first(lambda e: e.get("UNIT") == "runner\\x2dinfo.mount" and e.get("MESSAGE_ID") == MSG_UNIT_STARTED),
           "")


@applies(late_config_disk)
def test_the_config_disk_was_hot_plugged_after_the_guest_was_up(run, expect):
    """the config disk was hot-plugged after the guest was up, with no verify before it"""
    step(run, expect, "config disk attached")


@applies(late_config_disk)
def test_the_late_config_disk_was_mounted_when_it_appeared(run, ev, expect):
    """the config disk attached late was mounted then: runner\\x2dinfo.mount started after the
    hot-plug, though no unit waited for the disk"""
    started = ev.first(lambda e: e.get("UNIT") == "runner\\x2dinfo.mount" and e.get("MESSAGE_ID") == MSG_UNIT_STARTED)
    at = run.collector.guest_to_host(Evidence.rt(started)) if started else None
    expect(at is not None and run.config_disk_at is not None and at >= run.config_disk_at - 1,
           f"mounted {at - run.config_disk_at:.1f} s after the hot-plug" if at and run.config_disk_at
           else f"mounted at {at}, hot-plugged at {run.config_disk_at}")


@applies(late_config_disk)
def test_the_agent_registered_with_the_late_config_disk(run, expect):
    """the agent waited for runner.json and verified its token once the late disk was there"""
    verify = run.first(is_verify)
    expect(verify is not None and run.config_disk_at is not None and verify["t"] > run.config_disk_at,
           f"verify {verify['t'] - run.config_disk_at:.1f} s after the hot-plug" if verify and run.config_disk_at
           else f"verify {verify and verify['t']}, hot-plug {run.config_disk_at}")


# ---- the boot waits for no disk ----------------------------------------------------------------

def test_no_start_job_waited_out_a_disk(ev, expect):
    """no start job for a disk timed out: the boot waited for no disk that was not there"""
    hits = [m for m in (e.get("MESSAGE") or "" for e in ev.journal if e.get("_PID") == "1")
            if "timed out" in m.lower() and ("/dev/" in m or ".device" in m)]
    expect(not hits, "; ".join(hits[:3]) or "none timed out")


@applies(scratch_disk)
def test_the_blank_scratch_disk_was_formatted_and_mounted_before_local_fs(ev, expect):
    """runner-scratch found the blank scratch disk by its serial once udev had named it,
    formatted it ext4 and mounted it, before local-fs.target"""
    msgs = scratch_messages(ev)
    done = ev.first(lambda e: e.get("UNIT") == SCRATCH_UNIT and e.get("MESSAGE_ID") == MSG_UNIT_STARTED
                    and e.get("_PID") == "1")
    local_fs = ev.first(lambda e: e.get("UNIT") == "local-fs.target" and e.get("MESSAGE_ID") == MSG_UNIT_STARTED
                        and e.get("_PID") == "1")
    formatted = any(m.startswith("runner-scratch-disk: formatting the blank /dev/vd") for m in msgs)
    mounted = any(m.startswith("runner-scratch-disk: mounted /dev/vd") and m.endswith(" on /var/lib/scratch") for m in msgs)
    before = done is not None and local_fs is not None and Evidence.rt(done) <= Evidence.rt(local_fs)
    expect(formatted and mounted and before, " | ".join(msgs[-3:]) + f" | finished before local-fs.target: {before}")


@applies(no_scratch_disk)
def test_without_a_scratch_disk_nothing_waited_for_one(ev, expect):
    """without a scratch disk, runner-scratch found none once udev had settled, and went on"""
    msgs = scratch_messages(ev)
    started = ev.first(lambda e: e.get("UNIT") == SCRATCH_UNIT and e.get("MESSAGE_ID") == MSG_UNIT_STARTING
                       and e.get("_PID") == "1")
    done = ev.first(lambda e: e.get("UNIT") == SCRATCH_UNIT and e.get("MESSAGE_ID") == MSG_UNIT_STARTED
                    and e.get("_PID") == "1")
    took = f"{Evidence.rt(done) - Evidence.rt(started):.1f} s" if started and done else "never finished"
    expect(done is not None and any("no disk matches" in m for m in msgs), f"runner-scratch took {took}: " + " | ".join(msgs[-2:]))


# ---- the agent's journal -----------------------------------------------------------------------

def test_the_agent_logged_to_the_journal(ev, expect):
    """the agent logged to the journal (SYSLOG_IDENTIFIER=gitlab-runner-vm)"""
    agent = ev.agent_entries()
    expect(agent, f"{len(agent)} entries")


FIELDS = ("PHASE", "RUNNER", "SYSTEM_ID")


def show(entry):
    return f"[{entry.get('PHASE', '-')}] {(entry.get('MESSAGE') or '')[:100]!r}"


def field_problems(entry):
    """What is wrong with an entry's PHASE, RUNNER and SYSTEM_ID fields, as words."""
    problems = [f"no {f}" for f in FIELDS if f not in entry]
    problems += [f"{f} {len(values)} times ({', '.join(values)})"
                 for f, values in entry.get(MULTI, {}).items() if f in FIELDS]
    if "PHASE" in entry and entry["PHASE"] not in PHASES:
        problems.append(f"PHASE={entry['PHASE']!r}")
    return problems


def test_every_agent_journal_entry_carries_phase_runner_and_system_id(ev, expect):
    """every journal entry of the unit from the agent process carries PHASE (a known phase),
    RUNNER and SYSTEM_ID, each once

    The entries: _SYSTEMD_UNIT is the unit and _PID an agent process's (Evidence.
    agent_process_entries): what it logs and what reaches its stdout and stderr, forwarded
    gitlab-runner output and the power-off command's output included. A field given twice (two
    nested spans, say) is as wrong as a missing one: the entry names two phases. What the
    values must be is the next two tests' business."""
    entries = ev.agent_process_entries()
    bad = [(e, field_problems(e)) for e in entries if field_problems(e)]
    kinds = sorted({p.split(" (")[0].split("=")[0] for _, ps in bad for p in ps})
    expect(entries and not bad,
           f"{len(entries) - len(bad)} of {len(entries)} entries right" + (
               f"; {len(bad)} with {', '.join(kinds)}; first: {', '.join(bad[0][1])} in {show(bad[0][0])}"
               if bad else ""))


def test_runner_is_the_runners_name_once_runner_json_is_read(run, ev, expect):
    """RUNNER is the runner's name in every agent entry that has it, empty only while
    waiting-for-config (before runner.json is read)"""
    entries = [e for e in ev.agent_process_entries() if "RUNNER" in e]
    bad = [e for e in entries if e["RUNNER"] != run.name
           and not (e["RUNNER"] == "" and e.get("PHASE") == "waiting-for-config")]
    named = [e for e in entries if e["RUNNER"] == run.name]
    expect(named and not bad, f"{run.name} in {len(named)} of {len(entries)} entries" + (
        f"; {len(bad)} wrong, first: RUNNER={bad[0]['RUNNER']!r} {show(bad[0])}" if bad else ""))


def test_system_id_is_the_one_gitlab_saw_once_registering(run, ev, expect):
    """SYSTEM_ID is the system id GitLab saw in every agent entry that has it, empty only while
    waiting-for-config or registering (before the id is written)"""
    entries = [e for e in ev.agent_process_entries() if "SYSTEM_ID" in e]
    bad = [e for e in entries if e["SYSTEM_ID"] != run.system_id
           and not (e["SYSTEM_ID"] == "" and e.get("PHASE") in ("waiting-for-config", "registering"))]
    with_id = [e for e in entries if run.system_id and e["SYSTEM_ID"] == run.system_id]
    expect(with_id and not bad, f"{run.system_id} in {len(with_id)} of {len(entries)} entries" + (
        f"; {len(bad)} wrong, first: SYSTEM_ID={bad[0]['SYSTEM_ID']!r} {show(bad[0])}" if bad else ""))


def test_the_journals_phases_follow_the_scenario(run, ev, expect):
    """the journal's phases went the scenario's way"""
    sc, jphases = run.sc, ev.journal_phases()
    expect(is_subsequence(sc.expect_phases, jphases) and not set(sc.forbid_phases) & set(jphases),
           " -> ".join(jphases), check=f"the journal's phases went {' -> '.join(sc.expect_phases)}")


# ---- what systemd saw of the agent -------------------------------------------------------------

def status_names(ev):
    return [text.split(":", 1)[0] for _, text in ev.status_phases()]


def test_every_status_text_is_a_known_phase_and_its_detail(ev, expect):
    """every StatusText was '<phase>: <detail>' with a known phase"""
    sphases = ev.status_phases()
    expect(sphases and all(n in PHASES and ": " in text for n, (_, text) in zip(status_names(ev), sphases)),
           " | ".join(t for _, t in sphases))


def test_status_text_follows_the_phases(run, ev, expect):
    """systemctl show -p StatusText followed the phases"""
    names = status_names(ev)
    merged = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]
    key_phase = "running" if run.sc.accepted else "failed"
    expect(merged and is_subsequence(merged, ev.journal_phases()) and key_phase in merged,
           " -> ".join(merged),
           check=f"systemctl show -p StatusText followed the phases (including {key_phase})")


@applies(accepted)
def test_the_unit_reached_ready(ev, expect):
    """the unit reached READY (active; systemd logged 'Started')"""
    expect(ev.ready_time() is not None and ev.unit_message(MSG_UNIT_STARTED) is not None, "")


@applies(accepted)
def test_ready_came_once_gitlab_runner_was_running(ev, expect):
    """READY came once gitlab-runner was running"""
    started = ev.unit_message(MSG_UNIT_STARTED)
    first_running = ev.first_agent(lambda e: e.get("PHASE") == "running")
    expect(first_running and started and Evidence.rt(started) >= Evidence.rt(first_running),
           f"{Evidence.rt(started) - Evidence.rt(first_running):.2f} s after"
           if first_running and started else "")


@applies(rejected)
def test_ready_was_not_sent_before_the_failure(ev, expect):
    """READY was not sent before the failure"""
    started = ev.unit_message(MSG_UNIT_STARTED)
    failed = ev.first_agent(lambda e: e.get("PHASE") == "failed")
    expect(failed and (started is None or Evidence.rt(started) >= Evidence.rt(failed)),
           "no failed phase in the journal" if not failed else "")


@applies(rejected)
def test_the_agent_logged_an_error_naming_the_403(ev, expect):
    """the agent logged an error naming the 403"""
    err = ev.first_agent(lambda e: e.get("PRIORITY") in ("0", "1", "2", "3") and "403" in e.get("MESSAGE", ""))
    expect(err, (err or {}).get("MESSAGE", "")[:160])


def test_the_unit_ended_cleanly(ev, expect):
    """the unit ended cleanly: the agent exited 0 and systemd recorded Result=success"""
    # A Type=notify service whose main process exits before READY=1 ends in Result=protocol,
    # even with status 0, and Restart=on-failure then starts the agent again.
    expect(ev.show.get("Result") == "success" and ev.show.get("ExecMainStatus") == "0",
           f"Result={ev.show.get('Result')} ExecMainCode={ev.show.get('ExecMainCode')} "
           f"ExecMainStatus={ev.show.get('ExecMainStatus')}")


def test_systemd_never_had_to_kill_the_agent(ev, expect):
    """systemd never had to kill the agent nor gitlab-runner (a process that a job left behind is
    SIGKILLed with the unit, as KillMode=mixed says)"""
    def forced(message):
        left_over = re.match(r".*Killing process \d+ \(([^)]*)\) with signal SIGKILL", message)
        if left_over:
            return left_over.group(1).startswith("gitlab-runner")
        return bool(re.search(r"timed out|Killing process|SIGKILL", message))
    killed = ev.first(lambda e: e.get("UNIT") == UNIT and e.get("_PID") == "1"
                      and forced(e.get("MESSAGE", "")))
    expect(killed is None, (killed or {}).get("MESSAGE", ""))


# ---- the agent's state files: written before any GitLab call, root's (issue 17) ----------------

def test_the_state_directory_is_0700_and_roots(ev, expect):
    """the agent's state directory is 0700 and root's (RuntimeDirectoryMode=0700)"""
    d = ev.state_files().get(os.path.basename(STATE_DIR))
    expect(d and d[0] == "700" and d[1] == "root", " ".join(d or ["missing"]))


def test_runner_system_id_file_is_0600_and_roots(ev, expect):
    """.runner_system_id is 0600 and root's (gitlab-runner runs as root, jobs as the job user)"""
    sid = ev.state_files().get(".runner_system_id")
    expect(sid and sid[0] == "600" and sid[1] == "root", " ".join(sid or ["missing"]))


def test_runner_system_id_file_holds_the_system_id(run, ev, expect):
    """.runner_system_id holds the system id, no newline"""
    expect(ev.text("runner_system_id") == run.system_id, repr(ev.text("runner_system_id")))


def test_config_toml_is_0600_and_roots(ev, expect):
    """config.toml is 0600 and root's"""
    cfg = ev.state_files().get("config.toml")
    expect(cfg and cfg[0] == "600" and cfg[1] == "root", " ".join(cfg or ["missing"]))


@applies(accepted)
def test_config_toml_runs_shell_jobs_through_job_exec(ev, expect):
    """config.toml runs shell jobs with the custom executor, run_exec the agent's job-exec
    --job-user runner --cgroup <unit>/jobs (the unit runs the agent with --separate-cgroups),
    builds and cache in the job user's home"""
    import tomllib
    try:
        cfg = tomllib.loads(ev.text("config.toml"))
    except ValueError as e:
        expect(False, f"config.toml: {e}")
        return
    entry = (cfg.get("runners") or [{}])[0]
    custom = entry.get("custom") or {}
    expect(entry.get("executor") == "custom" and custom.get("run_exec") == GUEST_AGENT
           and custom.get("run_args") == ["job-exec", "--job-user", "runner", "--cgroup",
                                          f"/sys/fs/cgroup/system.slice/{UNIT}/jobs"]
           and entry.get("builds_dir") == "/home/runner/builds"
           and entry.get("cache_dir") == "/home/runner/cache",
           f"executor={entry.get('executor')} run_exec={custom.get('run_exec')} "
           f"run_args={custom.get('run_args')} builds_dir={entry.get('builds_dir')} "
           f"cache_dir={entry.get('cache_dir')}")


def registry_mirrors(sc):
    return bool(sc.registry_mirrors)


@applies(registry_mirrors)
def test_podman_reads_the_registry_mirrors_of_runner_json(run, ev, expect):
    """Podman reads runner.json's registry mirrors: `podman info` (Debian's podman, run as root
    once the agent has stopped) pulls Docker Hub's images from them first, the http one as
    insecure"""
    try:
        info = json.loads(ev.text("podman-info.json") or "{}")
    except ValueError as e:
        info = {"error": str(e)}
    hub = (info.get("registries") or {}).get("docker.io") or {}
    mirrors = [(m.get("Location"), bool(m.get("Insecure"))) for m in hub.get("Mirrors") or []]
    wanted = [(url.split("://", 1)[1], url.startswith("http://")) for url in run.sc.registry_mirrors]
    expect(mirrors == wanted and hub.get("Location") == "docker.io",
           f"docker.io mirrors {mirrors}" if hub else
           f"no docker.io in podman info: {(ev.text('podman-info.err') or '').strip()[:200] or info.get('error') or 'no output'}")


@applies(registry_mirrors)
def test_the_agent_wrote_the_registry_mirrors_before_registering(run, ev, expect):
    """the agent wrote Podman's drop-in before registering (its journal line comes before the
    first entry of the registering phase), and said that this VM has no Docker"""
    entries = ev.agent_entries()
    wrote = next((e for e in entries if (e.get("MESSAGE") or "").startswith("Podman's ")
                  and "names the registry mirrors" in (e.get("MESSAGE") or "")), None)
    registering = next((e for e in entries if e.get("PHASE") == "registering"), None)
    no_docker = any((e.get("MESSAGE") or "").startswith("no Docker here") for e in entries)
    message = (wrote or {}).get("MESSAGE") or ""
    expect(wrote is not None and registering is not None and Evidence.rt(wrote) <= Evidence.rt(registering)
           and message.endswith(", ".join(run.sc.registry_mirrors)) and no_docker,
           message or "no such line in the agent's journal")


# ---- gitlab-runner as the fake one saw itself started ------------------------------------------

@applies(accepted)
def test_gitlab_runner_ran_as_run_single_with_its_output_in_the_agents_log(run, ev, expect):
    """gitlab-runner ran as run-single -c <state>/config.toml -r <name> --max-builds 1
    --wait-timeout 600, its output in the agent's log"""
    fake = ev.fake_runner_output()
    expect(any(f"-r {run.name} --max-builds 1 --wait-timeout 600" in m for m in fake),
           next((m for m in fake if "run-single" in m), "no output of the fake gitlab-runner in the journal"))


@applies(accepted)
def test_gitlab_runner_ran_as_root(ev, expect):
    """gitlab-runner ran as root (the token's holder never runs as a job's user)"""
    fake = ev.fake_runner_output()
    expect(any("user=root " in m for m in fake), next((m for m in fake if "user=" in m), "no user= line"))


def test_the_guest_journal_never_shows_the_token(run, ev, expect):
    """the guest's journal never shows the runner token (nor its secret part)"""
    secret_part = run.token[len("glrt-"):]
    expect(secret_part not in ev.text("journal.json"),
           "token in the journal" if secret_part in ev.text("journal.json") else "")


@applies(accepted)
def test_gitlab_runner_got_a_scrubbed_environment(ev, expect):
    """gitlab-runner got a scrubbed environment"""
    env_line = next((m for m in ev.fake_runner_output() if "environment:" in m), "")
    names = set(env_line.split("environment:", 1)[-1].split())
    allowed = {"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "PWD"}  # PWD: set by sh itself
    expect(env_line and names <= allowed, " ".join(sorted(names)))


@applies(lambda sc: sc.accepted and sc.keep_file)
def test_the_keep_file_was_still_there_at_shutdown(ev, expect):
    """/etc/keep-runner was still there at shutdown"""
    expect(ev.text("keep-runner").strip() == "present", ev.text("keep-runner").strip())


@applies(lambda sc: sc.accepted and (sc.keep_file or sc.powerdown_in_job))
def test_logind_handled_the_power_button(ev, expect):
    """systemd-logind handled the ACPI power button"""
    key = ev.first(lambda e: e.get("SYSLOG_IDENTIFIER") == "systemd-logind"
                   and "Power key pressed" in e.get("MESSAGE", ""))
    expect(key, (key or {}).get("MESSAGE", ""))


# ---- the serial console: what an operator sees from outside the VM -----------------------------

CONSOLE_PREFIX = FACTS["console_prefix"]


def console_lines(run):
    """The agent's lines on the serial console (console.log), from their prefix on: a kernel
    message may have started the line before it."""
    return [line[line.index(CONSOLE_PREFIX):].rstrip("\r")
            for line in run.vm.console().splitlines() if CONSOLE_PREFIX in line]


def in_order(lines, starts):
    """Whether lines starting with each of `starts` come in that order."""
    rest = iter(lines)
    return all(any(line.startswith(s) for line in rest) for s in starts)


def job_id(run):
    start = run.first(is_job_start)
    return start["path"].rsplit("/", 1)[-1] if start else None


def test_the_console_never_shows_the_token(run, expect):
    """the serial console never shows the runner token (nor its secret part)"""
    console = run.vm.console()
    secret_part = run.token[len("glrt-"):]
    expect(console and secret_part not in console,
           "token on the console" if secret_part in console else f"{len(console_lines(run))} agent lines")


@applies(rejected)
def test_the_console_shows_the_rejected_token_with_its_fix(run, expect):
    """the serial console shows the failure: the rejected token (403) and its fix, on one line"""
    lines = console_lines(run)
    failed = [line for line in lines if line.startswith(CONSOLE_PREFIX + "failed: registration failed: ")]
    expect(len(failed) == 1 and "403" in failed[0] and "; fix: " in failed[0],
           failed[0][:200] if failed else " | ".join(lines) or "no agent line on the console")


@applies(one_job_to_its_end)
def test_the_console_shows_each_milestone_of_the_job(run, expect):
    """the serial console shows registered, job started, job succeeded and deregistered, in order"""
    lines, job = console_lines(run), job_id(run)
    starts = [f"{CONSOLE_PREFIX}registered runner {run.name} (system {run.system_id}) at ",
              f"{CONSOLE_PREFIX}job {job} started",
              f"{CONSOLE_PREFIX}job {job} succeeded after ",
              f"{CONSOLE_PREFIX}deregistered: runner manager {run.system_id} deleted"]
    starts += [f"{CONSOLE_PREFIX}holding: "] if run.sc.keep_file else \
        [f"{CONSOLE_PREFIX}powering off", f"{CONSOLE_PREFIX}boot record: "]
    expect(job and in_order(lines, starts), " | ".join(lines) or "no agent line on the console")


@applies(lambda sc: sc.powerdown_in_job)
def test_the_console_shows_the_boot_record_of_the_stop_with_the_aborted_job(run, expect):
    """the serial console shows the job's start, then the boot record of the stop (power
    button): ended_by=stop, the aborted job counted as failed

    Not the `stopping:` line, nor necessarily the `aborted` one: they are written right after
    SIGTERM, while systemd stops the serial getty and resets ttyS0, which discards output not
    yet sent (seen under TCG). The boot record comes after deregistration."""
    lines, job = console_lines(run), job_id(run)
    expect(lines and in_order(lines, [f"{CONSOLE_PREFIX}job {job} started",
                                      f"{CONSOLE_PREFIX}boot record: "])
           and "ended_by=stop" in lines[-1] and "jobs=1 jobs_failed=1" in lines[-1],
           " | ".join(lines[-3:]))


# ---- the boot record: one structured journal entry per boot ------------------------------------

RECORD_ORDER = ("BOOT_TO_AGENT_MS", "CONFIG_FOUND_MS", "REGISTERED_MS", "FIRST_JOB_START_MS",
                "LAST_JOB_END_MS", "DEREGISTERED_MS", "POWEROFF_MS")


def test_the_journal_has_one_boot_record_with_its_milestones_in_order(run, ev, expect):
    """the journal has one boot record entry (BOOT_TO_AGENT_MS ... POWEROFF_MS), its
    milestones in the order they happen, as status --json shows them"""
    records = [e for e in ev.agent_process_entries() if "BOOT_TO_AGENT_MS" in e]
    if len(records) != 1:
        expect(False, f"{len(records)} boot record entries")
        return
    rec = records[0]
    times = [int(rec[k]) for k in RECORD_ORDER if k in rec]
    needed = ["BOOT_TO_AGENT_MS", "CONFIG_FOUND_MS", "POWEROFF_MS"]
    needed += ["REGISTERED_MS", "FIRST_JOB_START_MS", "LAST_JOB_END_MS"] if one_job_to_its_end(run.sc) else ["FAILED_MS"] if rejected(run.sc) else []
    status = run.agent_status_json()
    shown = status.get("boot_record", {}) if isinstance(status, dict) else {}
    agree = all(shown.get(k.lower()) == int(rec[k]) for k in RECORD_ORDER if k in rec) if shown else True
    expect(times == sorted(times) and all(k in rec for k in needed) and agree,
           rec.get("MESSAGE", "")[:300] + ("" if agree else f"; status --json: {shown}"))


# ---- the hostile job (scenarios f, g; issue 17): what a job can reach -------------------------
# The job (guest/hostile-job) reports every attempt as a JSON line in its trace; `ok` means it
# got what it was after. Details mask the token; comparisons use it.

def hostile(sc):
    return sc.hostile


def unprivileged(sc):
    return sc.hostile and not sc.jobs_can_become_root


def with_root(sc):
    return sc.hostile and sc.jobs_can_become_root


@pytest.fixture
def report(run):
    lines = run.hostile_report()
    if not any(line.get("hostile") == "identity" for line in lines):
        pytest.fail(f"no report of the hostile job in its trace ({len(run.job_trace())} characters)",
                    pytrace=False)
    return lines


def attempts(report, what=None, via="job", role=None):
    return [a for a in report if a.get("via") == via and (what is None or a["hostile"] == what)
            and (role is None or a.get("role") == role)]


def say(run, attempt):
    """An attempt as a detail: what, where, result; the token masked."""
    where = attempt.get("path") or attempt.get("address") or ""
    text = f"{attempt['hostile']}{' ' + where if where else ''}: {attempt.get('result', '')}"
    return mask_in_text(text, run.token)


def refused(run, expect, found, check):
    got = [a for a in found if a["ok"]]
    expect(found and not got, "; ".join(say(run, a) for a in (got or found))[:300] or "not attempted",
           check=check)


@applies(hostile)
def test_the_hostile_job_reported_every_attempt(run, report, expect):
    """the hostile job ran to its end and reported its attempts"""
    done = attempts(report, "done")
    expect(done, f"{len(report)} lines, {len(attempts(report))} as the job user, "
           f"{len(attempts(report, via='sudo'))} through sudo")


@applies(hostile)
def test_the_job_ran_as_the_job_user(report, expect):
    """the job ran as the job user `runner` (not root, not the agent's user), not in docker, in
    the unit's `jobs` cgroup (job-exec moved it out of gitlab-runner's `runner`)"""
    me = attempts(report, "identity")[0]
    expect(me["user"] == "runner" and me["uid"] != 0 and me["euid"] != 0 and "docker" not in me["groups"]
           and (me.get("cgroup") or "").endswith("/gitlab-runner-vm.service/jobs"),
           f"{me['user']} uid {me['uid']} groups {','.join(me['groups'])} cgroup {me.get('cgroup')}")


@applies(hostile)
def test_gitlab_runner_and_the_agent_ran_as_root_in_their_cgroups(report, expect):
    """gitlab-runner ran as root in the `runner` cgroup, the agent as root in `agent`, and the
    job's job-exec (root until it drops to the job user) in `jobs`, never in `runner` (as the
    job saw them in /proc)"""
    procs = attempts(report, "process")
    runner = [p for p in procs if p["role"] == "gitlab-runner"]
    agent = [p for p in procs if p["role"] == "agent"]
    job_exec = [p for p in procs if p["role"] == "agent job-exec"]
    ok = (runner and agent and job_exec and all(p["uid"] == 0 for p in runner + agent)
          and all((p.get("cgroup") or "").endswith("/runner") for p in runner)
          and all((p.get("cgroup") or "").endswith("/agent") for p in agent)
          and all((p.get("cgroup") or "").endswith("/jobs") for p in job_exec))
    expect(ok, "; ".join(f"{p['role']} pid {p['pid']} uid {p['uid']} {p.get('cgroup')}"
                         for p in runner + agent + job_exec) or "none found")


@applies(unprivileged)
def test_the_jobs_output_never_shows_the_runner_token(run, report, expect):
    """nothing the job printed holds the runner token (nor its secret part)"""
    trace = run.job_trace()
    secret_part = run.token[len("glrt-"):]
    tokens = sorted({t for a in report for t in a.get("tokens", [])})
    expect(trace and secret_part not in trace and not tokens,
           f"{len(trace)} characters of output, token {'FOUND' if secret_part in trace else 'absent'}"
           f", {len(tokens)} token-like strings")


@applies(hostile)
def test_the_job_user_could_not_read_the_state_directory(run, report, expect):
    """as the job user: the state directory, config.toml and .runner_system_id unreadable"""
    found = (attempts(report, "list the state directory") + attempts(report, "read config.toml")
             + attempts(report, "read the system id") + attempts(report, "read a state file"))
    refused(run, expect, found, None)


@applies(hostile)
def test_the_job_user_could_not_run_the_agents_status_command(run, report, expect):
    """as the job user: `gitlab-runner-vm status --json` refused (the state directory is root's)"""
    refused(run, expect, attempts(report, "run the agent's status command"), None)


@applies(hostile)
def test_the_job_user_could_not_read_runner_json(run, report, expect):
    """as the job user: runner.json on the config disk unreadable"""
    refused(run, expect, attempts(report, "read runner.json on the config disk"), None)


@applies(hostile)
def test_the_job_user_could_not_read_proc_of_gitlab_runner_and_the_agent(run, report, expect):
    """as the job user: /proc/<pid>/environ, mem and root of gitlab-runner and the agent
    unreadable"""
    found = [a for a in attempts(report) if a.get("role") in ("gitlab-runner", "agent")
             and a["hostile"] != "process" and not a["hostile"].startswith("list /proc fds")]
    roles = {a["role"] for a in found}
    refused(run, expect, found if roles == {"gitlab-runner", "agent"} else [], None)


@applies(hostile)
def test_the_job_user_saw_none_of_the_agents_journal(run, report, expect):
    """as the job user: journalctl shows no entry of the agent's unit"""
    refused(run, expect, attempts(report, "read the journal"), None)


@applies(hostile)
def test_the_job_user_was_refused_by_the_docker_socket(run, report, expect):
    """as the job user: the Docker socket (root:docker 0660) refused the connection"""
    refused(run, expect, attempts(report, "connect to the Docker socket"), None)


@applies(hostile)
def test_the_job_user_could_not_reach_the_metadata_service(run, report, ev, expect):
    """as the job user: the metadata stand-in at 169.254.169.254 unreachable (the firewall:
    the stand-in answered the agent's cgroup)"""
    try:
        probe = json.loads(ev.text("metadata-from-agent.json") or "{}")
    except ValueError:
        probe = {}
    found = attempts(report, "reach the metadata service")
    if not probe.get("ok"):
        expect(False, "the stand-in did not answer the agent's cgroup either: the refusal proves nothing")
        return
    refused(run, expect, found, None)


@applies(unprivileged)
def test_sudo_refused_the_job(run, report, expect):
    """sudo -n refused the job user"""
    refused(run, expect, attempts(report, "sudo -n true"), None)


@applies(hostile)
def test_the_job_planted_an_ssh_key_in_its_home(run, report, expect):
    """the job could write ~/.ssh/authorized_keys in its home (reported: whether sshd reads it
    is the NixOS configuration's authorizedKeysInHomedir, asserted on the evaluated images)"""
    found = attempts(report, "plant an SSH key")
    expect(found, "; ".join(say(run, a) for a in found) or "not attempted")


def identity_cache(sc):
    return sc.hostile and bool(sc.cache)


def hostile_without_cache(sc):
    return sc.hostile and not sc.cache


RUNNER_ADMITTED = "the metadata firewall admits gitlab-runner's cgroup"


@applies(identity_cache)
def test_an_identity_cache_admitted_gitlab_runner_before_registering(ev, expect):
    """runner.json's S3 cache with the instance's role: the agent admitted gitlab-runner's
    `runner` cgroup through the real firewall script before registering (the job, in `jobs`,
    stays refused: test_the_job_user_could_not_reach_the_metadata_service)"""
    entries = ev.agent_entries()
    admitted = next((e for e in entries if RUNNER_ADMITTED in (e.get("MESSAGE") or "")), None)
    registering = next((e for e in entries if e.get("PHASE") == "registering"), None)
    message = (admitted or {}).get("MESSAGE") or ""
    expect(admitted is not None and message.endswith(f"system.slice/{UNIT}/runner (the jobs' cgroup stays refused)")
           and registering is not None and Evidence.rt(admitted) <= Evidence.rt(registering),
           message or "no such line in the agent's journal")


@applies(hostile_without_cache)
def test_without_an_identity_cache_gitlab_runner_was_not_admitted(ev, expect):
    """without a cache that uses the instance's identity, gitlab-runner's cgroup was not admitted"""
    found = [e.get("MESSAGE") for e in ev.agent_entries() if RUNNER_ADMITTED in (e.get("MESSAGE") or "")]
    expect(not found, "; ".join(found) or "not admitted")


@applies(hostile)
def test_the_agents_cgroup_reached_the_metadata_service(ev, expect):
    """a process in the agent's cgroup reached the metadata stand-in (the firewall admits the
    agent)"""
    try:
        probe = json.loads(ev.text("metadata-from-agent.json") or "{}")
    except ValueError:
        probe = {}
    expect(probe.get("ok") and (probe.get("joined") or "").endswith("/agent"),
           f"{probe.get('joined')}: {probe.get('result')}" if probe else "no probe result")


@applies(with_root)
def test_with_root_the_job_took_the_token_from_config_toml(run, report, expect):
    """with jobsCanBecomeRoot the job took the runner token from config.toml through sudo (what
    the option costs; the proof that scenario f's checks can fail)"""
    got = [a for a in attempts(report, "read config.toml", via="sudo") if a["ok"]]
    stolen = any(run.token in a.get("tokens", []) for a in got)
    expect(attempts(report, "sudo -n true") and attempts(report, "sudo -n true")[0]["ok"]
           and stolen and run.token in run.job_trace(),
           f"sudo: {say(run, attempts(report, 'sudo -n true')[0]) if attempts(report, 'sudo -n true') else 'not tried'}"
           f"; config.toml through sudo: {'the token' if stolen else 'no token'}"
           f"; token in the job's output: {'yes' if run.token in run.job_trace() else 'no'}")


@applies(with_root)
def test_with_root_the_job_reached_the_metadata_service(run, report, expect):
    """with jobsCanBecomeRoot the job reached the metadata stand-in through sudo (by leaving
    its cgroup for the agent's: a firewall inside the VM cannot stop root)"""
    found = [a for a in attempts(report, via="sudo") if a["hostile"].startswith("reach the metadata service")]
    expect(any(a["ok"] for a in found), "; ".join(say(run, a) for a in found) or "not attempted")


@applies(hostile)
def test_the_job_user_could_not_hold_the_vm(run, report, expect):
    """as the job user: /etc/keep-runner (which holds a VM after its jobs) could not be made"""
    refused(run, expect, attempts(report, "create the keep file"), None)


@applies(hostile)
def test_a_process_the_job_left_behind_did_not_keep_the_vm_up(run, report, expect):
    """a process the job left behind (a session of its own) did not keep the VM up: it powered
    itself off after deregistration"""
    left = attempts(report, "leave a process behind")
    ok, _, detail = run.step_result("powered off")
    expect(left and left[0]["ok"] and ok,
           f"{say(run, left[0]) if left else 'not attempted'}; power-off: {detail or ok}")
