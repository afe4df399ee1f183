//! Lifecycle promises through the real binary (issue 18, items 1, 3 and 4): a notice or a drain
//! ends registration's retries at once; a restarted agent keeps a hold's start and a notice it
//! received; a rebalance recommendation lets the VM do its first job. A fake GitLab, a fake
//! metadata service (AWS IMDSv2 or GCE) and a fake gitlab-runner that says when it takes a job.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use common::metadata::*;
use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const USER_RUNNERS: &str = "/api/v4/user/runners";

/// A gitlab-runner that waits `idle_seconds` for a job, says it received one (as run-single
/// does), runs it for `job_seconds` and says it succeeded. SIGQUIT is recorded and the job goes
/// on; SIGTERM is recorded and aborts it.
fn write_runner(h: &Harness, idle_seconds: u32, job_seconds: u32) -> PathBuf {
    let dir = h.dir.path().display();
    let script = format!(
        r#"#!/bin/sh
# SIGQUIT before a job (as run-single): no job is taken. During one: it goes on.
trap 'if [ -f {dir}/runner-job ]; then echo QUIT >> {dir}/runner-signals; else echo QUIT-before-a-job >> {dir}/runner-signals; quit=1; fi' QUIT
trap 'echo TERM >> {dir}/runner-signals; kill $job 2>/dev/null; exit 1' TERM
quit=0
echo "$*" >> {dir}/runner-invocations
echo started > {dir}/runner-started
sleep {idle_seconds} &
job=$!
while kill -0 $job 2>/dev/null && [ $quit = 0 ]; do wait $job; done
if [ $quit = 1 ]; then echo "fake gitlab-runner: drained before a job"; exit 0; fi
echo "Checking for jobs... received                      job=5150 repo_url=https://gitlab.example.com/g/p.git runner=abc123"
echo received > {dir}/runner-job
sleep {job_seconds} &
job=$!
while kill -0 $job 2>/dev/null; do wait $job; done
echo "Job succeeded                                      job=5150 project=1 runner=abc123"
echo "fake gitlab-runner: job done"
exit 0
"#
    );
    h.write_script("gitlab-runner", &script)
}

/// The metadata service's token and quiet notice endpoints, for both platforms.
async fn quiet_metadata(meta: &MockServer) {
    imds_token(meta).await;
    quiet_aws(meta).await;
    quiet_gce(meta).await;
}

fn parse_time(v: &Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("{v}"))).unwrap()
}

async fn wait_for_requests(h: &Harness, m: &str, p: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while h.count(m, p).await < n {
        assert!(Instant::now() < deadline, "no {m} {p}:\n{}", h.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The notice an endpoint announces: (platform, path, body, seconds to the deadline).
fn notices() -> Vec<(&'static str, &'static str, String, u64)> {
    let spot = |action: &str, secs: u64| {
        let time = rfc3339(SystemTime::now() + Duration::from_secs(secs));
        format!(r#"{{"action": "{action}", "time": "{time}"}}"#)
    };
    vec![
        ("aws", INSTANCE_ACTION, spot("terminate", 27), 27),
        ("aws", INSTANCE_ACTION, spot("stop", 45), 45),
        ("gce", PREEMPTED, "TRUE".into(), 30),
    ]
}

// ---- 1: a notice or a drain ends registration's retries at once ----

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_while_verify_is_retried_stops_the_retries_and_deletes_the_manager_in_time() {
    for (platform, endpoint, body, warning) in notices() {
        let mut h = Harness::new().await;
        let meta = MockServer::start().await;
        quiet_metadata(&meta).await;
        mount(&h.server, "POST", VERIFY, ResponseTemplate::new(503)).await;
        mount(&h.server, "DELETE", MANAGERS, ResponseTemplate::new(204)).await;
        h.write_config(json!({"token": TOKEN}));
        let runner = write_runner(&h, 0, 0);
        // Without the fix the retries would go on for two minutes, past every deadline.
        h.start_on(&runner, platform, &meta, &["--register-timeout", "120"]);
        wait_for_requests(&h, "POST", VERIFY, 2).await;
        let deadline = SystemTime::now() + Duration::from_secs(warning);
        announce(&meta, endpoint, body).await;
        let status = h.wait_exit().await;
        let exited = SystemTime::now();
        assert!(status.success(), "{platform}: {status:?}\n{}", h.log());
        assert!(
            exited < deadline,
            "{platform}: after the deadline\n{}",
            h.log()
        );
        assert!(
            h.runner_invocations().is_empty(),
            "{platform}: gitlab-runner"
        );
        let deleted = h.requests("DELETE", MANAGERS).await;
        assert_eq!(deleted.len(), 1, "{platform}:\n{}", h.log());
        assert_eq!(
            body_of(&deleted[0])["system_id"],
            h.system_id_file().as_str()
        );
        assert!(h.powered_off(), "{platform}");
        let st = h.status();
        assert!(st["preemption"]["deadline"].is_string(), "{st}");
        assert!(st["last_error"].is_null(), "a notice is no failure: {st}");
        assert_eq!(
            h.phases(),
            [
                "waiting-for-config",
                "registering",
                "deregistering",
                "powering-off"
            ],
            "{platform}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_while_verify_is_retried_stops_the_retries_without_a_failure() {
    for (answer, retries_before) in [(503, 1), (429, 2)] {
        let mut h = Harness::new().await;
        let reply = ResponseTemplate::new(answer).insert_header("Retry-After", "1");
        mount(&h.server, "POST", VERIFY, reply).await;
        mount(&h.server, "DELETE", MANAGERS, ResponseTemplate::new(204)).await;
        h.write_config(json!({"token": TOKEN}));
        let runner = write_runner(&h, 0, 0);
        h.start(
            &runner,
            &["--register-timeout", "300", "--failure-delay", "300"],
        );
        wait_for_requests(&h, "POST", VERIFY, retries_before + 1).await;
        send_signal(h.agent_pid(), 10);
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert!(h.runner_invocations().is_empty());
        assert_eq!(h.count("DELETE", MANAGERS).await, 1, "{}", h.log());
        assert!(h.powered_off());
        let st = h.status();
        assert!(st["last_error"].is_null(), "a drain is no failure: {st}");
        assert!(st["poweroff_at"].is_string(), "{st}");
        let poweroff = parse_time(&st["poweroff_at"]);
        let since = parse_time(&st["since"]);
        assert!(
            poweroff <= since + Duration::from_secs(5),
            "no failure delay: {st}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_while_gitlab_creates_the_runner_waits_for_it_and_deletes_it_in_time() {
    // The second create is in flight when the notice comes (within about 3 s) and answers
    // later, with a runner or (None) another 503: the agent waits for that answer, within the
    // warning, makes no further attempt (a third would create a runner), and deletes what the
    // second created.
    for (delay_ms, created) in [
        (5000, Some("glrt-t3_created.during.notice")),
        (7000, Some("glrt-t3_other.one.xyz")),
        (6000, None),
    ] {
        let mut h = Harness::new().await;
        let meta = MockServer::start().await;
        quiet_metadata(&meta).await;
        Mock::given(method("POST"))
            .and(path(USER_RUNNERS))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&h.server)
            .await;
        let second = match created {
            Some(token) => {
                ResponseTemplate::new(201).set_body_json(json!({"id": 9172, "token": token}))
            }
            None => ResponseTemplate::new(503),
        };
        Mock::given(method("POST"))
            .and(path(USER_RUNNERS))
            .respond_with(second.set_delay(Duration::from_millis(delay_ms)))
            .up_to_n_times(1)
            .with_priority(2)
            .mount(&h.server)
            .await;
        let later = json!({"id": 9173, "token": "glrt-t3_a.later.one"});
        mount(
            &h.server,
            "POST",
            USER_RUNNERS,
            ResponseTemplate::new(201).set_body_json(later),
        )
        .await;
        h.mount_runner_deletion().await;
        h.write_config(
            json!({"access_token": "glpat-AcCeSsToKeNvAlUe12345", "runner_type": "instance_type"}),
        );
        let runner = write_runner(&h, 0, 0);
        let args = ["--stop-timeout", "20", "--register-timeout", "120"];
        h.start_on(&runner, "gce", &meta, &args);
        wait_for_requests(&h, "POST", USER_RUNNERS, 2).await;
        let deadline = SystemTime::now() + Duration::from_secs(30);
        announce(&meta, PREEMPTED, "TRUE".into()).await;
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert!(SystemTime::now() < deadline, "{}", h.log());
        assert_eq!(h.count("POST", USER_RUNNERS).await, 2, "{}", h.log());
        let deleted = h.requests("DELETE", "/api/v4/runners").await;
        match created {
            Some(token) => {
                assert_eq!(deleted.len(), 1, "the created runner is left:\n{}", h.log());
                assert_eq!(body_of(&deleted[0]), json!({"token": token}));
                let output = h.all_output();
                assert!(!output.contains(&token[10..]), "a token in the output");
            }
            None => assert!(deleted.is_empty(), "{}", h.log()),
        }
        assert!(h.runner_invocations().is_empty());
        assert!(h.powered_off());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_between_create_attempts_creates_nothing_more_and_deletes_nothing() {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        USER_RUNNERS,
        ResponseTemplate::new(429).insert_header("Retry-After", "2"),
    )
    .await;
    h.mount_runner_deletion().await;
    h.write_config(
        json!({"access_token": "glpat-AcCeSsToKeNvAlUe12345", "runner_type": "instance_type"}),
    );
    let runner = write_runner(&h, 0, 0);
    h.start(&runner, &["--register-timeout", "300"]);
    wait_for_requests(&h, "POST", USER_RUNNERS, 1).await;
    send_signal(h.agent_pid(), 10);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let creates = h.count("POST", USER_RUNNERS).await;
    assert!(creates <= 2, "{creates}\n{}", h.log());
    assert_eq!(h.count("DELETE", "/api/v4/runners").await, 0);
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
    assert!(h.status()["last_error"].is_null());
    assert_eq!(
        h.phases(),
        ["waiting-for-config", "registering", "powering-off"]
    );
}

// ---- 3: a restarted agent keeps a hold's start and a notice it received ----

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_the_holds_start_and_its_ceiling() {
    for hold_max in ["9", "13"] {
        let mut h = Harness::new().await;
        std::fs::write(h.keep_file(), "").unwrap();
        let runner = h
            .start_glrt(json!({}), FakeRunner::default(), &["--hold-max", hold_max])
            .await;
        h.wait_until("the hold", |h| h.in_phase("holding")).await;
        h.wait_until("its deadline", |h| h.status()["hold_deadline"].is_string())
            .await;
        let first = h.status();
        let deadline = parse_time(&first["hold_deadline"]);
        let started = parse_time(&first["hold_started"]);
        assert_eq!(
            deadline.duration_since(started).unwrap(),
            Duration::from_secs(hold_max.parse().unwrap())
        );
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            h.crash(&runner).await;
            // The keep file touched meanwhile: still no later than the first ceiling.
            std::fs::write(h.keep_file(), "again").unwrap();
            h.start(&runner, &["--hold-max", hold_max]);
            h.wait_until("the hold again", |h| {
                h.in_phase("holding") && h.status()["pid"] == h.agent_pid()
            })
            .await;
            let st = h.status();
            assert_eq!(parse_time(&st["hold_started"]), started, "{st}");
            assert_eq!(parse_time(&st["hold_deadline"]), deadline, "{st}");
        }
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert!(h.powered_off());
        assert!(SystemTime::now() >= deadline);
        assert!(
            h.log().contains("hold ended: its deadline passed"),
            "{}",
            h.log()
        );
        assert_eq!(h.count("POST", VERIFY).await, 1);
        assert_eq!(h.runner_invocations().len(), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_keeps_a_notice_already_received() {
    let maintenance = "TERMINATE_ON_HOST_MAINTENANCE".to_string();
    let far = rfc3339(SystemTime::now() + Duration::from_secs(900));
    let spot = format!(r#"{{"action": "stop", "time": "{far}"}}"#);
    // (platform, endpoint, body, kind, extra flags): a notice far enough ahead that the job
    // still runs (drained) when the agent is killed.
    let cases = [
        ("aws", INSTANCE_ACTION, spot, "spot-interruption", vec![]),
        (
            "gce",
            MAINTENANCE,
            maintenance,
            "host-maintenance",
            vec!["--stop-timeout", "35"],
        ),
    ];
    for (platform, endpoint, body, kind, extra) in cases {
        let mut h = Harness::new().await;
        let meta = MockServer::start().await;
        quiet_metadata(&meta).await;
        h.prepare_glrt(json!({})).await;
        // A hold asked for: the VM is going away, so there must be none, restart or not.
        std::fs::write(h.keep_file(), "").unwrap();
        let runner = write_runner(&h, 0, 120);
        h.start_on(&runner, platform, &meta, &extra);
        h.wait_until("the job", |h| h.read("runner-job").is_some())
            .await;
        announce(&meta, endpoint, body).await;
        h.wait_until("the drain", |h| h.in_phase("draining")).await;
        let notice = h.status()["preemption"].clone();
        assert_eq!(notice["kind"], kind, "{}", h.log());
        h.crash(&runner).await;
        // The metadata service says nothing more (or not yet): only status.json remembers.
        meta.reset().await;
        mount(&meta, "GET", "/", ResponseTemplate::new(500)).await;
        h.start(
            &runner,
            &["--config-source", platform, "--metadata-url", &meta.uri()],
        );
        assert!(h.wait_exit().await.success(), "{platform}: {}", h.log());
        assert!(h.powered_off(), "{platform}");
        let st = h.status();
        assert_eq!(st["preemption"], notice, "{platform}: {st}");
        assert!(!h.went_through("holding"), "{platform}: {:?}", h.phases());
        assert_eq!(h.count("DELETE", MANAGERS).await, 1, "{platform}");
        assert_eq!(h.runner_invocations().len(), 1, "{platform}");
        assert!(
            h.log().contains("before the agent was restarted"),
            "{platform}: {}",
            h.log()
        );
    }
}

// ---- 4: a rebalance recommendation lets the VM do its first job ----

#[tokio::test(flavor = "multi_thread")]
async fn a_rebalance_recommendation_at_boot_still_runs_the_first_job_then_drains() {
    for (idle, job, max_jobs, verify_ms) in [(1, 2, 1, 2500), (2, 1, 5, 1500)] {
        let mut h = Harness::new().await;
        let meta = MockServer::start().await;
        quiet_metadata(&meta).await;
        let now = rfc3339(SystemTime::now() - Duration::from_secs(60));
        announce(&meta, REBALANCE, format!(r#"{{"noticeTime": "{now}"}}"#)).await;
        // The verify takes a while: the recommendation is known before gitlab-runner starts.
        Mock::given(method("POST"))
            .and(path(VERIFY))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"id": 7, "token": TOKEN}))
                    .set_delay(Duration::from_millis(verify_ms)),
            )
            .with_priority(1)
            .mount(&h.server)
            .await;
        h.prepare_glrt(json!({"max_jobs": max_jobs})).await;
        let runner = write_runner(&h, idle, job);
        // A failure would delay the power-off by ten minutes.
        h.start_on(&runner, "aws", &meta, &["--failure-delay", "600"]);
        assert!(h.wait_exit().await.success(), "{}", h.log());
        assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
        assert!(
            h.log().contains("fake gitlab-runner: job done"),
            "{}",
            h.log()
        );
        // No new job after the first: SIGQUIT once the job was received.
        assert_eq!(h.runner_signals(), "QUIT\n", "{}", h.log());
        assert!(h.powered_off());
        let st = h.status();
        assert!(st["last_error"].is_null(), "{st}");
        assert_eq!(st["preemption"]["kind"], "rebalance-recommendation");
        assert_eq!(st["boot_record"]["jobs"], 1, "{st}");
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
        assert!(
            h.console()
                .contains("draining: aws rebalance-recommendation")
        );
    }
}

fn body_of(r: &wiremock::Request) -> Value {
    body(r)
}
