//! Badly timed restarts, signals and operators, through the real binary: a crash during
//! teardown, a stop while GitLab is answering, a drain before gitlab-runner starts, a keep file
//! created during the failure delay, a half-written runner.json, a state directory that cannot
//! be written.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, ResponseTemplate};

#[tokio::test(flavor = "multi_thread")]
async fn crashes_during_teardown_without_runner_json_never_register_twice() {
    let mut h = Harness::new().await;
    // The first deletion hangs, so that the second run is killed in the middle of it.
    Mock::given(method("DELETE"))
        .and(path(MANAGERS))
        .respond_with(ResponseTemplate::new(204).set_delay(Duration::from_secs(60)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&h.server)
        .await;
    let runner = h.start_glrt(json!({}), FakeRunner::job(60), &[]).await;
    h.wait_for_job().await;
    let system_id = h.system_id_file();
    h.crash(&runner).await;

    // runner.json is gone (the config disk was detached, or it is what made the agent crash):
    // the restarted agent must not wait for it, nor register again.
    std::fs::remove_file(h.config_path()).unwrap();
    h.start(&runner, &[]);
    h.wait_until("the second run's deregistration", |h| {
        h.in_phase("deregistering")
    })
    .await;
    while h.requests("DELETE", MANAGERS).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.crash(&runner).await;

    // The third start still knows, from the state directory alone, that this boot registered.
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.count("POST", VERIFY).await, 1);
    assert_eq!(h.runner_invocations().len(), 1, "a second gitlab-runner");
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 2, "{}", h.log());
    for d in &deleted {
        assert_eq!(body(d), json!({"token": TOKEN, "system_id": system_id}));
    }
    assert!(h.powered_off());
    let st = h.status();
    assert_eq!(st["deregistered"], true);
    assert_eq!(st["runner_started"], true);
    assert_eq!(st["gitlab_url"], h.server.uri().as_str());
    // The timeline keeps every run of this boot.
    let p = h.phases();
    assert_eq!(p.first().map(String::as_str), Some("waiting-for-config"));
    assert!(h.went_through("running"), "{p:?}");
    assert_eq!(p.last().map(String::as_str), Some("powering-off"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_verify_is_in_flight_still_deletes_the_manager() {
    let mut h = Harness::new().await;
    Mock::given(method("POST"))
        .and(path(VERIFY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": 7, "token": TOKEN}))
                .set_delay(Duration::from_secs(60)),
        )
        .with_priority(1)
        .mount(&h.server)
        .await;
    let runner = h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    let _ = runner;
    while h.requests("POST", VERIFY).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_signal(h.agent_pid(), 15);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(
        deleted.len(),
        1,
        "the manager verify created is left:\n{}",
        h.log()
    );
    assert_eq!(body(&deleted[0])["system_id"], h.system_id_file().as_str());
    assert!(h.runner_invocations().is_empty());
    assert!(!h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_while_verify_is_in_flight_is_deregistered_by_the_restart() {
    let mut h = Harness::new().await;
    Mock::given(method("POST"))
        .and(path(VERIFY))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .with_priority(1)
        .mount(&h.server)
        .await;
    let runner = h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    while h.requests("POST", VERIFY).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let system_id = h.system_id_file();
    h.crash(&runner).await;
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.count("POST", VERIFY).await, 1);
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 1, "{}", h.log());
    assert_eq!(body(&deleted[0])["system_id"], system_id.as_str());
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_gitlab_creates_the_runner_waits_for_it_and_deletes_it() {
    let mut h = Harness::new().await;
    let created = "glrt-t3_created.while.stopping";
    Mock::given(method("POST"))
        .and(path("/api/v4/user/runners"))
        .respond_with(
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": 9172, "token": created}))
                .set_delay(Duration::from_secs(2)),
        )
        .mount(&h.server)
        .await;
    h.mount_runner_deletion().await;
    h.write_config(
        json!({"access_token": "glpat-AcCeSsToKeNvAlUe12345", "runner_type": "instance_type"}),
    );
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    while h.requests("POST", "/api/v4/user/runners").await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_signal(h.agent_pid(), 15);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.count("POST", "/api/v4/user/runners").await, 1);
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(deleted.len(), 1, "the created runner is left:\n{}", h.log());
    assert_eq!(body(&deleted[0]), json!({"token": created}));
    assert!(h.runner_invocations().is_empty());
    assert!(!h.powered_off());
    assert!(!h.all_output().contains("created.while.stopping"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_before_gitlab_runner_starts_starts_none_and_tears_down() {
    let mut h = Harness::new().await;
    Mock::given(method("POST"))
        .and(path(VERIFY))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": 7, "token": TOKEN}))
                .set_delay(Duration::from_secs(2)),
        )
        .with_priority(1)
        .mount(&h.server)
        .await;
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    while h.requests("POST", VERIFY).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.drain();
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        h.runner_invocations().is_empty(),
        "gitlab-runner was started"
    );
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
    let st = h.status();
    assert!(st["last_error"].is_null(), "a drain is not a failure: {st}");
    assert_eq!(
        h.phases(),
        [
            "waiting-for-config",
            "registering",
            "deregistering",
            "powering-off"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_while_waiting_for_runner_json_powers_off_without_registering() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--config-wait", "60"]);
    h.wait_until("waiting", |h| h.in_phase("waiting-for-config"))
        .await;
    send_signal(h.agent_pid(), 10);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.server.received_requests().await.unwrap().is_empty());
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keep_file_created_during_the_failure_delay_holds_the_vm() {
    let mut h = Harness::new().await;
    h.mount_rejected_token().await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--failure-delay", "3"]);
    h.wait_until("the failure delay", |h| h.in_phase("powering-off"))
        .await;
    std::fs::write(h.keep_file(), "").unwrap();
    h.wait_until("the hold", |h| h.in_phase("holding")).await;
    // Well past the failure delay, the VM is still up.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!h.powered_off(), "{}", h.log());
    assert_eq!(h.phase().as_deref(), Some("holding"));
    std::fs::remove_file(h.keep_file()).unwrap();
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert_eq!(
        h.phases(),
        [
            "waiting-for-config",
            "registering",
            "failed",
            "powering-off",
            "holding",
            "powering-off"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_written_runner_json_is_waited_for() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let whole = json!({"name": "vm-test", "url": h.server.uri(), "token": TOKEN}).to_string();
    let (first, rest) = whole.split_at(whole.len() / 2);
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::fs::write(h.config_path(), first).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(h.config_path())
        .unwrap()
        .write_all(rest.as_bytes())
        .unwrap();
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.status()["last_error"].is_null(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.powered_off());
}

/// A writer that pauses twice mid-file: the agent keeps waiting through each pause (one watch
/// for the whole wait, made only once the file is seen incomplete).
#[tokio::test(flavor = "multi_thread")]
async fn a_runner_json_written_in_three_pieces_is_waited_for() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let whole = json!({"name": "vm-test", "url": h.server.uri(), "token": TOKEN}).to_string();
    let (first, rest) = whole.split_at(whole.len() / 3);
    let (second, third) = rest.split_at(rest.len() / 2);
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::fs::write(h.config_path(), first).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    use std::io::Write;
    for piece in [second, third] {
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(h.runner_invocations().is_empty(), "{}", h.log());
        std::fs::OpenOptions::new()
            .append(true)
            .open(h.config_path())
            .unwrap()
            .write_all(piece.as_bytes())
            .unwrap();
    }
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.status()["last_error"].is_null(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_json_that_cannot_be_written_starts_no_gitlab_runner() {
    let mut h = Harness::new().await;
    // status.json is written through this temporary name: a directory there fails every write.
    std::fs::create_dir_all(h.state_dir().join(".status.json.tmp")).unwrap();
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.runner_invocations().is_empty(), "{}", h.log());
    assert!(h.log().contains("that gitlab-runner starts"), "{}", h.log());
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn relative_paths_mean_the_same_files_to_gitlab_runner() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    h.write_fake_runner(FakeRunner::default());
    let mut cmd = h.command_without_paths();
    cmd.current_dir(h.dir.path()).args([
        "--state-dir",
        "state",
        "--config",
        "runner-info/runner.json",
        "--keep-file",
        "etc/keep-runner",
        "--gitlab-runner",
        "./gitlab-runner",
    ]);
    h.agent = Some(cmd.spawn().unwrap());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    // gitlab-runner runs in its user's home, and still found the files the agent wrote.
    assert_eq!(
        h.read("runner-system-id").unwrap(),
        h.system_id_file(),
        "{}",
        h.log()
    );
    let invocation = &h.runner_invocations()[0];
    assert!(
        invocation.contains(&format!("-c {}/config.toml", h.state_dir().display())),
        "{invocation}"
    );
}

#[test]
fn durations_beyond_ten_years_are_refused_on_the_command_line() {
    // Should a value be accepted, the agent must not touch this machine's real paths.
    let dir = tempfile::tempdir().unwrap();
    let harmless = |cmd: &mut std::process::Command| {
        cmd.arg("run")
            .arg("--state-dir")
            .arg(dir.path())
            .arg("--config")
            .arg(dir.path().join("none.json"))
            .arg("--keep-file")
            .arg(dir.path().join("keep"))
            .args(["--config-wait", "0", "--no-poweroff"])
            .env(flag_env("failure-delay"), "0");
    };
    for flag in [
        "hold-max",
        "hold-extend",
        "register-timeout",
        "stop-timeout",
    ] {
        let env = flag_env(flag);
        let mut cmd = std::process::Command::new(BIN);
        harmless(&mut cmd);
        let out = cmd
            .arg(format!("--{flag}"))
            .arg("18446744073709551615")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("maximum 315360000 s"), "{flag}: {err}");
        let mut cmd = std::process::Command::new(BIN);
        harmless(&mut cmd);
        let out = cmd.env(env, "315360001").output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{env}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_log_line_carries_its_phase_runner_and_system_id_once() {
    let mut h = Harness::new().await;
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let log = h.log();
    let system_id = h.system_id_file();
    let mut forwarded = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert_eq!(line.matches("agent{").count(), 1, "{line}\n{log}");
        assert!(line.contains("phase="), "{line}");
        if line.contains("gitlab-runner: fake gitlab-runner") {
            forwarded += 1;
            assert!(line.contains("phase=\"running\""), "{line}");
            assert!(line.contains("runner=\"vm-test\""), "{line}");
            assert!(line.contains(&system_id), "{line}");
        }
    }
    assert!(forwarded >= 2, "{log}");
}
