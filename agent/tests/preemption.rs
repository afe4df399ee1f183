//! Preemption and maintenance notices through the real binary: a fake GitLab, a fake
//! gitlab-runner that records its signals, and a fake metadata service on loopback (AWS IMDSv2
//! or GCE) that announces the VM's end in the middle of a job.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::metadata::*;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// A gitlab-runner whose job takes `job_seconds`: SIGQUIT is recorded and the job goes on (as
/// run-single finishes its job), SIGTERM is recorded and aborts it (exit 1, as a job reported
/// failed). The traps run between commands of the main loop, so both are seen in order.
fn write_runner(h: &Harness, job_seconds: u32) -> PathBuf {
    let dir = h.dir.path().display();
    let script = format!(
        r#"#!/bin/sh
trap 'echo QUIT >> {dir}/runner-signals' QUIT
trap 'echo TERM >> {dir}/runner-signals; kill $job 2>/dev/null; echo "fake gitlab-runner: job aborted"; exit 1' TERM
echo "$*" >> {dir}/runner-invocations
sleep {job_seconds} &
job=$!
# As gitlab-runner says it took a job (a rebalance recommendation drains only after one).
echo "Checking for jobs... received                      job=4242 repo_url=https://gitlab.example.com/g/p.git runner=abc123"
echo started > {dir}/runner-started
while kill -0 $job 2>/dev/null; do wait $job; done
echo "fake gitlab-runner: job done"
exit 0
"#
    );
    h.write_script("gitlab-runner", &script)
}

/// runner.json as the config disk and as the platform's user-data (a metadata source fetches
/// the latter), and the glrt- happy path in GitLab.
async fn set_up(h: &Harness, meta: &MockServer) {
    h.prepare_glrt(json!({})).await;
    let runner_json = std::fs::read_to_string(h.config_path()).unwrap();
    imds_token(meta).await;
    for p in [
        "/latest/user-data",
        "/computeMetadata/v1/instance/attributes/user-data",
    ] {
        mount(meta, "GET", p, ok(p).set_body_string(runner_json.clone())).await;
    }
}

/// The agent on `platform` (`--config-source`), started with `extra`, in a job of
/// `job_seconds`: set up as `set_up`, the platform's notices quiet. The metadata service, for
/// the test to announce on.
async fn agent_in_a_job(
    h: &mut Harness,
    platform: &str,
    job_seconds: u32,
    extra: &[&str],
) -> MockServer {
    let meta = MockServer::start().await;
    set_up(h, &meta).await;
    match platform {
        "gce" => quiet_gce(&meta).await,
        _ => quiet_aws(&meta).await,
    }
    let runner = write_runner(h, job_seconds);
    h.start_on(&runner, platform, &meta, extra);
    // The agent records `running` once the spawn returned, which may be after the script began.
    h.wait_until("the job", |h| {
        h.read("runner-started").is_some() && h.in_phase("running")
    })
    .await;
    meta
}

fn status_text(h: &Harness) -> String {
    let out = std::process::Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(h.state_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gce_preemption_mid_job_aborts_it_deregisters_and_powers_off_before_the_deadline() {
    let mut h = Harness::new().await;
    // A hold asked for: the VM is going away, so there is none.
    std::fs::write(h.keep_file(), "").unwrap();
    // --stop-timeout 20 plus the deregistration's 10 s fill GCE's 30 s: the abort is at once
    // (as with the longer default).
    let meta = agent_in_a_job(&mut h, "gce", 60, &["--stop-timeout", "20"]).await;

    announce(&meta, PREEMPTED, "TRUE".into()).await;
    let status = h.wait_exit().await;
    let exited = SystemTime::now();
    assert!(status.success(), "{status:?}\n{}", h.log());

    // SIGQUIT (no new job), then SIGTERM (abort and report): nothing else.
    assert_eq!(h.runner_signals(), "QUIT\nTERM\n", "{}", h.log());
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 1, "{}", h.log());
    assert_eq!(body(&deleted[0])["system_id"], h.system_id_file().as_str());
    assert!(h.powered_off());
    // Seen from outside the VM: the drain and the abort, each with its reason.
    let console = h.console();
    assert!(
        console.contains(&console_line("draining: gce preemption notice"))
            && console.contains(&console_line("aborting the job: gce preemption notice")),
        "{console}"
    );

    let st = h.status();
    let notice = &st["preemption"];
    assert_eq!(notice["platform"], "gce");
    assert_eq!(notice["kind"], "preemption");
    let received = humantime::parse_rfc3339(notice["received"].as_str().unwrap()).unwrap();
    let deadline = humantime::parse_rfc3339(notice["deadline"].as_str().unwrap()).unwrap();
    assert_eq!(
        deadline.duration_since(received).unwrap(),
        Duration::from_secs(30)
    );
    assert!(exited < deadline, "powered off after the deadline");
    assert_eq!(
        h.phases(),
        [
            "waiting-for-config",
            "registering",
            "running",
            "draining",
            "deregistering",
            "powering-off"
        ]
    );
    let text = status_text(&h);
    assert!(
        text.contains("notice:")
            && text
                .contains("gce preemption notice (instance/preempted TRUE): the VM goes away at"),
        "{text}"
    );
    let log = h.log();
    assert!(log.contains("gce preemption notice"), "{log}");
    assert!(log.contains("runner_system_failure"), "{log}");
    // At once (the QUIT-TERM gap aside): well over 20 s left when the abort began.
    let abort = log
        .lines()
        .find(|l| l.contains("aborting the job now"))
        .expect("the abort is logged");
    let left: u64 = abort
        .split("(in ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{abort}"));
    assert!(left > 20, "{abort}");
    // The abort's exit status is the abort, not a failure of the run.
    assert!(st["last_error"].is_null(), "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_aws_spot_notice_near_its_time_aborts_the_job_over_imdsv2() {
    let mut h = Harness::new().await;
    let meta = agent_in_a_job(&mut h, "aws", 60, &[]).await;
    // 10 s ahead: less than --stop-timeout (5 s here) plus the deregistration's 10 s.
    let time = rfc3339(SystemTime::now() + Duration::from_secs(10));
    announce(
        &meta,
        INSTANCE_ACTION,
        format!(r#"{{"action": "terminate", "time": "{time}"}}"#),
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals(), "QUIT\nTERM\n", "{}", h.log());
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
    let st = h.status();
    assert_eq!(st["preemption"]["kind"], "spot-interruption");
    assert_eq!(
        st["preemption"]["detail"],
        format!("terminate at {}", time.replace('Z', ".000Z"))
    );
    // Every metadata request carried the session token.
    for r in meta.received_requests().await.unwrap() {
        if r.url.path().starts_with("/latest/meta-data/") {
            assert_eq!(
                r.headers.get("x-aws-ec2-metadata-token").unwrap(),
                "imds-token-1"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_far_ahead_drains_and_lets_the_job_finish() {
    let mut h = Harness::new().await;
    std::fs::write(h.keep_file(), "").unwrap();
    let meta = agent_in_a_job(&mut h, "aws", 10, &[]).await;
    let time = rfc3339(SystemTime::now() + Duration::from_secs(600));
    announce(
        &meta,
        INSTANCE_ACTION,
        format!(r#"{{"action": "stop", "time": "{time}"}}"#),
    )
    .await;
    h.wait_until("the drain", |h| h.in_phase("draining")).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals(), "QUIT\n", "{}", h.log());
    assert!(h.log().contains("fake gitlab-runner: job done"));
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    // The VM goes away at the notice's time: no hold despite the keep file.
    assert!(h.powered_off());
    assert!(!h.went_through("holding"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_recommendation_only_drains() {
    let mut h = Harness::new().await;
    let meta = agent_in_a_job(&mut h, "aws", 10, &[]).await;
    let now = rfc3339(SystemTime::now());
    announce(&meta, REBALANCE, format!(r#"{{"noticeTime": "{now}"}}"#)).await;
    h.wait_until("the drain", |h| h.in_phase("draining")).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals(), "QUIT\n", "{}", h.log());
    assert!(h.log().contains("fake gitlab-runner: job done"));
    assert!(h.powered_off());
    let st = h.status();
    assert_eq!(st["preemption"]["kind"], "rebalance-recommendation");
    assert!(st["preemption"]["deadline"].is_null());
    assert!(status_text(&h).contains("aws rebalance-recommendation notice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_from_the_metadata_service_changes_nothing_and_is_logged_once() {
    let mut h = Harness::new().await;
    let meta = MockServer::start().await;
    set_up(&h, &meta).await;
    mount(
        &meta,
        "GET",
        PREEMPTED,
        ok(PREEMPTED).set_body_bytes(b"\xffTRUE\xfe".to_vec()),
    )
    .await;
    mount(
        &meta,
        "GET",
        MAINTENANCE,
        ResponseTemplate::new(503)
            .insert_header("Metadata-Flavor", "Google")
            .set_body_string("<html>TERMINATE_ON_HOST_MAINTENANCE</html>"),
    )
    .await;
    let runner = write_runner(&h, 7);
    h.start_on(&runner, "gce", &meta, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals(), "", "{}", h.log());
    assert!(h.log().contains("fake gitlab-runner: job done"));
    assert!(h.status()["preemption"].is_null());
    // Asked again and again (1 s, 2 s, 4 s...), logged once per endpoint.
    let log = h.log();
    for (p, what) in [
        (PREEMPTED, "instance/preempted answered"),
        (MAINTENANCE, "instance/maintenance-event answered"),
    ] {
        let asked = h_requests(&meta, p).await;
        assert!(asked >= 3, "{p}: {asked}");
        assert_eq!(log.matches(what).count(), 1, "{what}:\n{log}");
    }
    assert!(log.contains("HTTP 503"), "{log}");
    assert!(log.contains("not UTF-8"), "{log}");
}

async fn h_requests(meta: &MockServer, p: &str) -> usize {
    meta.received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|r| r.url.path() == p)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_before_gitlab_runner_starts_means_it_never_starts() {
    let mut h = Harness::new().await;
    let meta = MockServer::start().await;
    // The verify takes a while: the notice comes while registering.
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
    set_up(&h, &meta).await;
    announce(&meta, PREEMPTED, "TRUE".into()).await;
    mount(
        &meta,
        "GET",
        MAINTENANCE,
        ok(MAINTENANCE).set_body_string("NONE"),
    )
    .await;
    let runner = write_runner(&h, 60);
    h.start_on(&runner, "gce", &meta, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.runner_invocations().is_empty(), "{}", h.log());
    assert!(h.powered_off());
    // Whatever was registered is deleted.
    assert_eq!(
        h.count("POST", VERIFY).await,
        h.count("DELETE", MANAGERS).await
    );
    assert_eq!(h.status()["preemption"]["kind"], "preemption");
}

#[tokio::test(flavor = "multi_thread")]
async fn on_without_a_platform_warns_and_off_watches_nothing() {
    for (source, mode) in [("file", "on"), ("gce", "off")] {
        let mut h = Harness::new().await;
        let meta = MockServer::start().await;
        set_up(&h, &meta).await;
        announce(&meta, PREEMPTED, "TRUE".into()).await;
        let runner = write_runner(&h, 0);
        let url = meta.uri();
        h.start(
            &runner,
            &[
                "--config-source",
                source,
                "--metadata-url",
                &url,
                "--watch-preemption",
                mode,
            ],
        );
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert_eq!(h.runner_invocations().len(), 1);
        assert_eq!(h_requests(&meta, PREEMPTED).await, 0, "{source} {mode}");
        assert!(h.status()["preemption"].is_null());
        let warned = h
            .log()
            .contains("--watch-preemption on: no platform with notices");
        assert_eq!(warned, mode == "on", "{}", h.log());
        let _: Value = h.status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_during_a_drain_still_aborts_the_job_in_time() {
    let mut h = Harness::new().await;
    let meta = agent_in_a_job(&mut h, "gce", 60, &["--stop-timeout", "20"]).await;
    // An operator's drain first: the job may finish...
    send_signal(h.agent_pid(), 10);
    h.wait_until("the drain", |h| h.runner_signals() == "QUIT\n")
        .await;
    // ...until the VM is preempted: no second SIGQUIT, a SIGTERM.
    announce(&meta, PREEMPTED, "TRUE".into()).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_signals(), "QUIT\nTERM\n", "{}", h.log());
    assert_eq!(h.count("DELETE", MANAGERS).await, 1);
    assert!(h.powered_off());
    assert_eq!(h.status()["preemption"]["kind"], "preemption");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_ends_a_hold_under_way() {
    let mut h = Harness::new().await;
    let meta = MockServer::start().await;
    set_up(&h, &meta).await;
    quiet_gce(&meta).await;
    std::fs::write(h.keep_file(), "").unwrap();
    let runner = write_runner(&h, 0);
    h.start_on(&runner, "gce", &meta, &[]);
    h.wait_until("the hold", |h| h.in_phase("holding")).await;
    announce(&meta, PREEMPTED, "TRUE".into()).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(h.keep_file().exists(), "the keep file is the operator's");
    let p = h.phases();
    assert_eq!(&p[p.len() - 2..], ["holding", "powering-off"], "{p:?}");
    assert!(
        h.console().contains(&console_line("holding: ")),
        "the hold is said on the console: {}",
        h.console()
    );
    assert!(
        h.log().contains("hold ended: a preemption notice"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_ends_the_failure_delay() {
    let mut h = Harness::new().await;
    let meta = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(VERIFY))
        .respond_with(ResponseTemplate::new(403).set_body_json(json!({"message": "403 Forbidden"})))
        .with_priority(1)
        .mount(&h.server)
        .await;
    set_up(&h, &meta).await;
    quiet_gce(&meta).await;
    let runner = write_runner(&h, 0);
    // Without the notice the power-off would wait 10 minutes.
    h.start_on(&runner, "gce", &meta, &["--failure-delay", "600"]);
    h.wait_until("the failure delay", |h| h.in_phase("powering-off"))
        .await;
    announce(&meta, PREEMPTED, "TRUE".into()).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(h.runner_invocations().is_empty());
    assert!(h.last_error().contains("403"));
}

/// The rule of `Interrupt::Preempted`, applied where the next phase is chosen: the operator's
/// keep file holds no VM that the platform takes away (the hold would not last).
#[tokio::test(flavor = "multi_thread")]
async fn a_keep_file_holds_no_vm_that_the_platform_takes() {
    let mut h = Harness::new().await;
    std::fs::write(h.keep_file(), "").unwrap();
    let meta = agent_in_a_job(&mut h, "gce", 60, &[]).await;
    announce(&meta, PREEMPTED, "TRUE".into()).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(h.keep_file().exists(), "the keep file is the operator's");
    let p = h.phases();
    assert!(!h.went_through("holding"), "{p:?}");
    assert_eq!(p.last().map(String::as_str), Some("powering-off"), "{p:?}");
}
