//! What reaches the console (one line per milestone, the failure with its fix, never a token),
//! the boot record (journal, console, status.json) and the runner token's expiry, through the
//! real binary.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::{Value, json};
use wiremock::ResponseTemplate;

/// A fake gitlab-runner that prints what the real one prints around a job (its default log
/// format, colours included) on stderr, as gitlab-runner does.
fn write_job_printing_runner(h: &Harness, job_seconds: u32, outcome_line: &str) -> PathBuf {
    let dir = h.dir.path().display();
    let script = format!(
        r#"#!/bin/sh
echo "$*" >> {dir}/runner-invocations
echo $$ > {dir}/runner-pid
printf 'Runtime platform                                    \033[0;m  arch\033[0;m=amd64 os\033[0;m=linux\n' >&2
printf 'Checking for jobs... received                       \033[0;m  job\033[0;m=4242 repo_url\033[0;m=https://gitlab.example.com/g/p.git runner\033[0;m=abcdefgh\n' >&2
touch {dir}/job-started
sleep {job_seconds}
printf '{outcome_line}\n' >&2
exit 0
"#
    );
    h.write_script("gitlab-runner", &script)
}

const SUCCEEDED: &str = "Job succeeded                                       \\033[0;m  duration_s\\033[0;m=1.01 job\\033[0;m=4242 project\\033[0;m=1";

fn console_lines(h: &Harness) -> Vec<String> {
    h.console().lines().map(str::to_owned).collect()
}

fn assert_in_order(lines: &[String], expected: &[String]) {
    let mut rest = lines.iter();
    for want in expected {
        assert!(
            rest.any(|l| l.starts_with(want)),
            "no line starting {want:?} (in this order) among:\n{}",
            lines.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_run_shows_each_milestone_on_the_console_and_records_the_boot() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = write_job_printing_runner(&h, 1, SUCCEEDED);
    h.start(&runner, &[]);

    // status.json carries the job's start while it runs.
    h.wait_until("the job's start in status.json", |h| {
        h.in_phase("running") && h.status()["boot_record"]["first_job_start_ms"].is_u64()
    })
    .await;
    let running = h.status();
    assert_eq!(running["boot_record"]["jobs"], 1, "{running}");
    assert_eq!(
        running["boot_record"]["running_jobs"][0]["job"], 4242,
        "{running}"
    );

    assert!(h.wait_exit().await.success(), "{}", h.log());
    let lines = console_lines(&h);
    let system_id = h.system_id_file();
    assert_in_order(
        &lines,
        &[
            console_line(&format!(
                "registered runner vm-test (system {system_id}) at {}",
                h.server.uri()
            )),
            console_line("job 4242 started"),
            console_line("job 4242 succeeded after "),
            console_line(&format!("deregistered: runner manager {system_id} deleted")),
            console_line("powering off"),
            console_line("boot record: boot_to_agent_ms="),
        ],
    );
    assert!(
        lines.iter().all(|l| l.starts_with(&console_line(""))),
        "{lines:?}"
    );
    assert!(!h.console().contains(&TOKEN[5..]), "{}", h.console());

    // The record: every milestone, in the order they happen, in status.json, the journal's
    // stand-in (stderr) and the console.
    let record = &h.status()["boot_record"];
    let at = |key: &str| {
        record[key]
            .as_u64()
            .unwrap_or_else(|| panic!("no {key} in {record}"))
    };
    let order = [
        "boot_to_agent_ms",
        "config_found_ms",
        "registered_ms",
        "first_job_start_ms",
        "last_job_end_ms",
        "deregistered_ms",
        "poweroff_ms",
    ];
    for pair in order.windows(2) {
        assert!(at(pair[0]) <= at(pair[1]), "{pair:?} in {record}");
    }
    assert!(at("boot_to_agent_ms") > 0, "{record}");
    assert_eq!(record["jobs"], 1);
    assert_eq!(record["jobs_failed"], 0);
    assert!(record["failed_ms"].is_null(), "{record}");
    assert_eq!(record["ended_by"], "poweroff");
    assert!(record.get("running_jobs").is_none(), "{record}");
    let log = h.log();
    let entry = log
        .lines()
        .find(|l| l.contains("boot record: "))
        .unwrap_or_else(|| panic!("no boot record in the log:\n{log}"));
    for key in order {
        assert!(
            entry.contains(&format!("{key}={}", at(key))),
            "{key} in {entry}"
        );
    }
    let console_record = lines.iter().find(|l| l.contains("boot record:")).unwrap();
    assert!(
        console_record.contains(&format!("first_job_start_ms={}", at("first_job_start_ms"))),
        "{console_record}"
    );

    // `status` shows it to a person too.
    let out = std::process::Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(h.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("boot record:    boot_to_agent_ms="), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_job_and_a_system_failure_are_told_apart() {
    for (line, shown, failed) in [
        (
            "\\033[0;33mWARNING: Job failed: exit code 1\\033[0;m  \\033[0;33mjob\\033[0;m=4242",
            "job 4242 failed after ",
            1,
        ),
        (
            "\\033[31;1mERROR: Job failed (system failure): aborted\\033[0;m  \\033[31;1mjob\\033[0;m=4242",
            "job 4242 failed (system failure) after ",
            1,
        ),
    ] {
        let mut h = Harness::new().await;
        h.prepare_glrt(json!({})).await;
        let runner = write_job_printing_runner(&h, 0, line);
        h.start(&runner, &[]);
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert_in_order(&console_lines(&h), &[console_line(shown)]);
        assert_eq!(h.status()["boot_record"]["jobs_failed"], failed);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_token_is_one_failure_line_with_its_fix_and_no_token() {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(403).set_body_json(json!({
            "message": format!("403 Forbidden\n\x1b[31mtoken {TOKEN} is invalid\r\n")
        })),
    )
    .await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let console = h.console();
    let registration_failed = console_line("failed: registration failed: ");
    let failure: Vec<&str> = console
        .lines()
        .filter(|l| l.starts_with(&registration_failed))
        .collect();
    assert_eq!(failure.len(), 1, "{console}");
    assert!(failure[0].contains("403"), "{console}");
    assert!(failure[0].contains("; fix: "), "{console}");
    assert!(!failure[0].contains('\x1b'), "{console:?}");
    assert!(
        !console.contains(&TOKEN[5..]),
        "token on the console:\n{console}"
    );
    assert_in_order(
        &console_lines(&h),
        &[
            console_line("failed: "),
            console_line("powering off"),
            console_line("boot record: "),
        ],
    );
    let record = &h.status()["boot_record"];
    assert!(record["failed_ms"].is_u64(), "{record}");
    assert!(record["registered_ms"].is_null(), "{record}");
    assert_eq!(record["jobs"], 0);
}

/// A console nobody reads (a serial port stopped by flow control): the FIFO is full before the
/// agent starts, so every write of the agent would block. The run goes on as usual.
#[tokio::test(flavor = "multi_thread")]
async fn a_console_nobody_reads_does_not_hold_the_agent_up() {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let mut h = Harness::new().await;
    let fifo = h.path("stuck-console");
    nix::unistd::mkfifo(&fifo, Mode::S_IRWXU).unwrap();
    let _reader = open(&fifo, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()).unwrap();
    let writer = open(&fifo, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty()).unwrap();
    while nix::unistd::write(&writer, &[b'x'; 4096]).is_ok() {}

    h.prepare_glrt(json!({})).await;
    let runner = write_job_printing_runner(&h, 0, SUCCEEDED);
    let mut cmd = h.command(&runner, &[]);
    cmd.env(flag_env("console"), &fifo);
    let started = Instant::now();
    h.agent = Some(cmd.spawn().unwrap());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off(), "{}", h.log());
    assert!(
        h.log().contains("took no output"),
        "the stuck console is reported:\n{}",
        h.log()
    );
    // Generous: a blocked agent would not end at all; the flushes before power-off are
    // bounded (2 s) and skipped once the console is known to be stuck.
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn console_off_writes_nothing() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let mut cmd = h.command(&runner, &["--console", "off"]);
    cmd.env(flag_env("console"), h.path("console"));
    h.agent = Some(cmd.spawn().unwrap());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.console(), "");
    assert!(!h.log().contains("console"), "{}", h.log());
}

/// The verify answer's token_expires_at, `offset` from now (None: null).
async fn run_with_expiry(expires: Value, config: Value) -> Harness {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": 7, "token": TOKEN, "token_expires_at": expires})),
    )
    .await;
    mount(&h.server, "DELETE", MANAGERS, ResponseTemplate::new(204)).await;
    let mut config = config;
    config["token"] = Value::from(TOKEN);
    h.write_config(config);
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    h
}

fn iso(t: SystemTime) -> String {
    // GitLab's form: milliseconds and a zone; +01:00 as on an instance outside UTC.
    let local = utc(t + Duration::from_secs(3600));
    format!("{}+01:00", local.trim_end_matches('Z'))
}

/// RFC 3339 with milliseconds in UTC, as status.json shows times.
fn utc(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_expires_within_a_day_is_a_warning_and_the_job_runs() {
    let soon = SystemTime::now() + Duration::from_secs(2 * 3600);
    let h = run_with_expiry(Value::from(iso(soon)), json!({})).await;
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    let warning = "the runner token expires at ";
    assert!(h.log().contains(warning), "{}", h.log());
    assert!(
        h.console()
            .contains(&console_line(&format!("warning: {warning}"))),
        "{}",
        h.console()
    );
    let status = h.status();
    assert!(
        status["token_warning"]
            .as_str()
            .unwrap()
            .contains("rotate it in GitLab"),
        "{status}"
    );
    assert_eq!(status["token_expires_at"], utc(soon).as_str(), "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_outlives_the_vm_by_far_is_no_warning_unless_max_lifetime_reaches_it() {
    let in_two_days = Value::from(iso(SystemTime::now() + Duration::from_secs(2 * 86_400)));
    let h = run_with_expiry(in_two_days.clone(), json!({})).await;
    assert!(h.status()["token_warning"].is_null(), "{}", h.status());
    assert!(h.status()["token_expires_at"].is_string());
    assert!(!h.log().contains("expires at"), "{}", h.log());

    let h = run_with_expiry(in_two_days, json!({"max_lifetime": 3 * 86_400})).await;
    assert!(
        h.status()["token_warning"].is_string(),
        "a VM that may live 3 days: {}",
        h.status()
    );
    assert_eq!(h.runner_invocations().len(), 1);

    let h = run_with_expiry(Value::Null, json!({})).await;
    assert!(h.status()["token_expires_at"].is_null());
    assert!(h.status()["token_warning"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_fails_before_any_job_with_the_fix() {
    let past = SystemTime::now() - Duration::from_secs(60);
    let h = run_with_expiry(Value::from(iso(past)), json!({})).await;
    assert!(h.runner_invocations().is_empty(), "{}", h.log());
    let status = h.status();
    let error = status["last_error"].as_str().unwrap();
    assert!(error.contains("expired at"), "{error}");
    assert!(
        error.contains("rotate the runner token in GitLab"),
        "{error}"
    );
    assert!(
        h.console().contains(&console_line(
            "failed: GitLab accepted the runner token, but it expired"
        )),
        "{}",
        h.console()
    );
    // The manager verify created is removed.
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert_eq!(status["registered"], true);
    assert_eq!(status["deregistered"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_garbage_expiry_is_a_warning_not_a_failure() {
    for garbage in [json!("next tuesday"), json!(1_700_000_000), json!({"a": 1})] {
        let h = run_with_expiry(garbage.clone(), json!({})).await;
        assert_eq!(h.runner_invocations().len(), 1, "{garbage}: {}", h.log());
        let warning = h.status()["token_warning"].as_str().unwrap().to_string();
        assert!(warning.contains("not an ISO 8601 date"), "{warning}");
        assert!(h.status()["token_expires_at"].is_null());
    }
}

/// A runner created for this VM whose token has already expired (by this VM's clock): no job,
/// and the runner is deleted again.
#[tokio::test(flavor = "multi_thread")]
async fn a_created_runners_expired_token_fails_and_the_runner_is_deleted() {
    let mut h = Harness::new().await;
    let created = "glrt-t3_created.by.access.token";
    let past = iso(SystemTime::now() - Duration::from_secs(3600));
    mount(
        &h.server,
        "POST",
        "/api/v4/user/runners",
        ResponseTemplate::new(201)
            .set_body_json(json!({"id": 9171, "token": created, "token_expires_at": past})),
    )
    .await;
    h.mount_runner_deletion().await;
    h.write_config(
        json!({"access_token": "glpat-AcCeSsToKeNvAlUe12345", "runner_type": "instance_type"}),
    );
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.runner_invocations().is_empty());
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(deleted.len(), 1);
    assert_eq!(body(&deleted[0])["token"], created);
    assert!(h.last_error().contains("expired at"), "{}", h.status());
    assert!(!h.all_output().contains("created.by.access"));
}

/// An agent killed mid-job and restarted by systemd: the record of the boot goes on (its first
/// start, registration and job stay), the job that died with it is no longer running.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_keeps_the_boots_record() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = write_job_printing_runner(&h, 60, SUCCEEDED);
    h.start(&runner, &[]);
    h.wait_until("the job's start in status.json", |h| {
        h.in_phase("running") && h.status()["boot_record"]["first_job_start_ms"].is_u64()
    })
    .await;
    let before = h.status()["boot_record"].clone();
    // As systemd would: the agent dies at once, then the rest of the unit.
    send_signal(h.agent_pid(), 9);
    h.wait_exit().await;
    let runner_pid: i32 = h.read("runner-pid").unwrap().trim().parse().unwrap();
    send_signal(runner_pid, 9);

    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let after = &h.status()["boot_record"];
    for key in [
        "boot_to_agent_ms",
        "config_found_ms",
        "registered_ms",
        "first_job_start_ms",
        "jobs",
    ] {
        assert_eq!(after[key], before[key], "{key}: {before} then {after}");
    }
    assert!(after.get("running_jobs").is_none(), "{after}");
    assert!(after["deregistered_ms"].is_u64(), "{after}");
    assert!(after["poweroff_ms"].is_u64(), "{after}");
    assert_eq!(h.runner_invocations().len(), 1);
    assert_in_order(
        &console_lines(&h),
        &[
            console_line("job 4242 started"),
            console_line("deregistered: "),
            console_line("boot record: "),
        ],
    );
}

/// A job gitlab-runner never reports the end of, because the VM is stopped, or because it ends
/// without saying: the record ends it (failed), and the console says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_an_end_line_ends_in_the_record() {
    // Stopped (SIGTERM) mid-job.
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = write_job_printing_runner(&h, 60, SUCCEEDED);
    h.start(&runner, &[]);
    h.wait_until("the job", |h| h.read("job-started").is_some())
        .await;
    h.wait_until("the job's start in status.json", |h| {
        h.status()["boot_record"]["jobs"] == 1
    })
    .await;
    send_signal(h.agent_pid(), 15);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_in_order(
        &console_lines(&h),
        &[
            console_line("job 4242 started"),
            console_line("stopping: "),
            console_line("job 4242 aborted by the stop, after "),
            console_line("boot record: "),
        ],
    );
    let record = &h.status()["boot_record"];
    assert_eq!(record["jobs_failed"], 1, "{record}");
    assert!(record["last_job_end_ms"].is_u64(), "{record}");
    assert_eq!(record["ended_by"], "stop");

    // gitlab-runner exits after a job it never reported the end of.
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = write_job_printing_runner(&h, 0, "gitlab-runner: something else");
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_in_order(
        &console_lines(&h),
        &[console_line(
            "job 4242 gitlab-runner ended without reporting its end, after ",
        )],
    );
    assert_eq!(h.status()["boot_record"]["jobs_failed"], 1);
}

/// A power-off command that fails is told once, the same everywhere: the journal, the console's
/// failure line and status.json's last error; the agent exits non-zero so that systemd restarts
/// it (and a restarted agent tries the power-off again).
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_power_off_is_said_on_the_console_and_in_status_json() {
    let mut h = Harness::new().await;
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--poweroff-command", "exit 3"],
    )
    .await;
    let status = h.wait_exit().await;
    assert!(!status.success(), "{status:?}\n{}", h.log());
    let failure = h.status()["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        failure.starts_with("power-off failed: ") && failure.contains("exit 3"),
        "{failure}"
    );
    assert!(
        console_lines(&h)
            .iter()
            .any(|l| l.contains("power-off failed: ") && l.contains("exit 3")),
        "{}",
        h.console()
    );
    assert!(h.log().contains("power-off failed: "), "{}", h.log());
}
