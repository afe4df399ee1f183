//! `--config-source broker` through the real binary: a fake broker (wiremock on 127.0.0.1,
//! `--broker-url`) beside the fake GitLab, and the pod's token in a file of the test
//! (`--broker-token-file`, as KubeVirt's serviceAccount disk holds it).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The pod's bound service-account token (a JWT's shape; never shown whole).
const POD_TOKEN: &str =
    "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwb2QtdG9rZW4tc2VjcmV0In0.c2lnbmF0dXJlLXNlY3JldA";
/// The runner token the broker hands out (a runner of this boot's own).
const GRANTED: &str = "glrt-granted.by.the.broker.0123456789";

fn token_file(h: &Harness) -> PathBuf {
    h.path("identity/token")
}

fn write_pod_token(h: &Harness, bytes: &[u8]) {
    let file = token_file(h);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, bytes).unwrap();
}

/// The broker's answer for this harness's GitLab.
fn grant(h: &Harness) -> ResponseTemplate {
    ResponseTemplate::new(201).set_body_json(json!({
        "url": h.server.uri(),
        "token": GRANTED,
        "token_expires_at": null,
        "runner_id": 42,
    }))
}

async fn broker_answering(answer: ResponseTemplate) -> MockServer {
    let broker = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/runner"))
        .respond_with(answer)
        .mount(&broker)
        .await;
    broker
}

/// GitLab accepts the granted token and deletes the runner at the end.
async fn mount_gitlab(h: &Harness) {
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(200)
            .set_body_json(json!({"id": 42, "token": GRANTED, "token_expires_at": null})),
    )
    .await;
    h.mount_runner_deletion().await;
    mount(&h.server, "DELETE", MANAGERS, ResponseTemplate::new(204)).await;
}

fn start_with_broker(h: &mut Harness, broker: &MockServer, extra: &[&str]) {
    start_with_broker_running(h, broker, FakeRunner::default(), extra);
}

fn start_with_broker_running(
    h: &mut Harness,
    broker: &MockServer,
    fake: FakeRunner,
    extra: &[&str],
) {
    let runner = h.write_fake_runner(fake);
    let url = broker.uri();
    let file = token_file(h).display().to_string();
    let mut args = vec![
        "--config-source",
        "broker",
        "--broker-url",
        &url,
        "--broker-token-file",
        &file,
    ];
    args.extend_from_slice(extra);
    h.start(&runner, &args);
}

async fn broker_requests(broker: &MockServer) -> usize {
    broker.received_requests().await.unwrap_or_default().len()
}

fn assert_no_secret(h: &Harness) {
    let all = h.all_output();
    for secret in [POD_TOKEN, GRANTED, "c2lnbmF0dXJlLXNlY3JldA"] {
        assert!(!all.contains(secret), "{secret} leaked:\n{all}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_s_runner_runs_the_job_and_is_deleted_whole_at_the_end() {
    let mut h = Harness::new().await;
    mount_gitlab(&h).await;
    write_pod_token(&h, format!("{POD_TOKEN}\n").as_bytes());
    let broker = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/runner"))
        .and(header(
            "authorization",
            format!("Bearer {POD_TOKEN}").as_str(),
        ))
        .respond_with(grant(&h))
        .mount(&broker)
        .await;
    start_with_broker(&mut h, &broker, &[]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());

    assert_eq!(broker_requests(&broker).await, 1, "one request per boot");
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    let verify = h.requests("POST", VERIFY).await;
    assert_eq!(
        body(&verify[0])["token"],
        GRANTED,
        "the broker's token is used"
    );
    let config_toml = std::fs::read_to_string(h.state_dir().join("config.toml")).unwrap();
    assert!(config_toml.contains(GRANTED), "gitlab-runner runs with it");
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(
        deleted.len(),
        1,
        "the runner itself is deleted: {}",
        h.log()
    );
    assert_eq!(body(&deleted[0])["token"], GRANTED);
    assert!(
        h.requests("DELETE", MANAGERS).await.is_empty(),
        "not only its manager"
    );
    assert!(h.powered_off());
    let config = h.config_path();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(written, json!({"url": h.server.uri(), "token": GRANTED}));
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let log = h.log();
    assert!(log.contains("the broker granted runner 42"), "{log}");
    assert_no_secret(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_are_final_no_runner_starts_and_the_vm_powers_off() {
    let cases = [
        (
            409,
            "pod default/virt-launcher-x already got its runner 7",
            "already got its runner",
        ),
        (
            401,
            "the token is not valid (TokenReview: not authenticated)",
            "did not accept the pod's token",
        ),
        (
            403,
            "pod default/x is not of a selected VM",
            "--vm-selector",
        ),
    ];
    for (status, said, fix) in cases {
        let mut h = Harness::new().await;
        mount_gitlab(&h).await;
        write_pod_token(&h, POD_TOKEN.as_bytes());
        // The refusal quotes a token: it is masked.
        let message = format!("{said} (glrt-leaked.in.an.error.0123456789)");
        let broker = broker_answering(
            ResponseTemplate::new(status).set_body_json(json!({"error": message})),
        )
        .await;
        start_with_broker(&mut h, &broker, &["--config-wait", "60"]);
        let started = Instant::now();
        h.wait_exit().await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{status}: no retry until --config-wait"
        );
        assert_eq!(broker_requests(&broker).await, 1, "{status}: asked once");
        assert!(h.runner_invocations().is_empty(), "{status}");
        assert!(h.requests("POST", VERIFY).await.is_empty());
        assert!(h.powered_off(), "{status}");
        let st = h.status();
        assert_eq!(st["phase"], "powering-off", "{status}");
        let error = st["last_error"].as_str().unwrap();
        assert!(error.contains(&format!("answered {status}")), "{error}");
        assert!(error.contains(said), "the broker's words: {error}");
        assert!(error.contains(fix), "{status}: {error}");
        assert!(h.console().contains(said), "{}", h.console());
        assert!(!h.all_output().contains("leaked.in.an.error"), "{status}");
        assert_no_secret(&h);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_that_fails_for_a_while_is_asked_again() {
    let mut h = Harness::new().await;
    mount_gitlab(&h).await;
    write_pod_token(&h, POD_TOKEN.as_bytes());
    let broker = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/runner"))
        .respond_with(
            ResponseTemplate::new(503).set_body_json(json!({"error": "GitLab failed; try again"})),
        )
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&broker)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/runner"))
        .respond_with(grant(&h))
        .with_priority(2)
        .mount(&broker)
        .await;
    start_with_broker(&mut h, &broker, &["--config-wait", "60"]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(broker_requests(&broker).await, 3);
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.log().contains("GitLab failed; try again"), "{}", h.log());
    assert_eq!(h.count("DELETE", "/api/v4/runners").await, 1);
    assert_no_secret(&h);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_is_not_followed() {
    let mut h = Harness::new().await;
    write_pod_token(&h, POD_TOKEN.as_bytes());
    let elsewhere = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(201))
        .mount(&elsewhere)
        .await;
    let broker = broker_answering(
        ResponseTemplate::new(307).insert_header("location", format!("{}/steal", elsewhere.uri())),
    )
    .await;
    start_with_broker(&mut h, &broker, &[]);
    h.wait_exit().await;
    assert_eq!(
        broker_requests(&elsewhere).await,
        0,
        "the pod's token went elsewhere"
    );
    assert_eq!(broker_requests(&broker).await, 1);
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("follows no redirect"), "{error}");
    assert!(error.contains("--broker-url"), "{error}");
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_html_page_or_a_huge_answer_is_not_the_broker_s() {
    let cases = [
        (
            ResponseTemplate::new(201)
                .set_body_raw("<!doctype html><title>Sign in</title>", "text/html"),
            "an HTML or XML page",
        ),
        (
            ResponseTemplate::new(201).set_body_string("x".repeat(200 * 1024)),
            "larger than 64 KiB",
        ),
        (
            ResponseTemplate::new(201).set_body_raw(b"\xff\xfe{}".to_vec(), "application/json"),
            "not UTF-8",
        ),
    ];
    for (answer, what) in cases {
        let mut h = Harness::new().await;
        write_pod_token(&h, POD_TOKEN.as_bytes());
        let broker = broker_answering(answer).await;
        start_with_broker(&mut h, &broker, &[]);
        h.wait_exit().await;
        let error = h.status()["last_error"].as_str().unwrap().to_owned();
        assert!(error.contains(what), "{what}: {error}");
        assert!(error.contains("--broker-url"), "{error}");
        assert_eq!(broker_requests(&broker).await, 1, "{what}: not retried");
        assert!(h.runner_invocations().is_empty());
        assert!(!h.config_path().exists(), "{what}: nothing written");
        assert!(h.powered_off());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_that_is_not_a_token_is_refused_without_asking_the_broker() {
    for (bytes, what) in [
        (&b"\xff\xfe\x00token"[..], "not UTF-8"),
        (&b"\n\n"[..], "is empty"),
        (&b"two tokens"[..], "not one token"),
    ] {
        let mut h = Harness::new().await;
        write_pod_token(&h, bytes);
        let broker = broker_answering(grant(&h)).await;
        start_with_broker(&mut h, &broker, &[]);
        h.wait_exit().await;
        let error = h.status()["last_error"].as_str().unwrap().to_owned();
        assert!(error.contains(what), "{error}");
        assert!(error.contains("--broker-token-file"), "{error}");
        assert_eq!(broker_requests(&broker).await, 0);
        assert!(h.powered_off());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_token_file_is_waited_for_then_named_with_its_fix() {
    let mut h = Harness::new().await;
    let broker = broker_answering(grant(&h)).await;
    start_with_broker(&mut h, &broker, &["--config-wait", "2"]);
    h.wait_exit().await;
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("did not appear within 2 s"), "{error}");
    assert!(error.contains("serviceAccount"), "{error}");
    assert!(error.contains("--broker-token-file"), "{error}");
    assert_eq!(broker_requests(&broker).await, 0);
    assert!(h.powered_off());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_that_appears_later_is_used() {
    let mut h = Harness::new().await;
    mount_gitlab(&h).await;
    let broker = broker_answering(grant(&h)).await;
    start_with_broker(&mut h, &broker, &["--config-wait", "30"]);
    h.wait_until("the agent to wait for the token", |h| {
        h.log().contains("waiting for")
    })
    .await;
    // The disk arrives: its directory and file at once, as a mount does.
    let staged = h.path("staged");
    std::fs::create_dir_all(&staged).unwrap();
    std::fs::write(staged.join("token"), POD_TOKEN).unwrap();
    std::fs::rename(&staged, h.path("identity")).unwrap();
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_while_waiting_for_the_token_or_the_broker_stops_at_once() {
    for token_there in [false, true] {
        let mut h = Harness::new().await;
        if token_there {
            write_pod_token(&h, POD_TOKEN.as_bytes());
        }
        let broker =
            broker_answering(ResponseTemplate::new(503).set_body_json(json!({"error": "not yet"})))
                .await;
        start_with_broker(&mut h, &broker, &["--config-wait", "120"]);
        if token_there {
            let deadline = Instant::now() + PATIENCE;
            while broker_requests(&broker).await == 0 {
                assert!(Instant::now() < deadline, "{}", h.log());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        } else {
            h.wait_until("the wait for the token", |h| {
                h.log().contains("waiting for")
            })
            .await;
        }
        send_signal(h.agent_pid(), 15);
        let started = Instant::now();
        let status = h.wait_exit().await;
        assert!(status.success(), "{}", h.log());
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            !h.powered_off(),
            "SIGTERM: the VM is shut down from outside"
        );
        assert_eq!(h.status()["phase"], "stopping");
        assert!(h.runner_invocations().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_in_the_same_boot_asks_the_broker_nothing_again() {
    let mut h = Harness::new().await;
    mount_gitlab(&h).await;
    write_pod_token(&h, POD_TOKEN.as_bytes());
    let broker = broker_answering(grant(&h)).await;
    // An earlier run of this boot wrote runner.json from the broker's answer, then died before
    // registering.
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::fs::write(
        h.config_path(),
        json!({"url": h.server.uri(), "token": GRANTED}).to_string(),
    )
    .unwrap();
    start_with_broker(&mut h, &broker, &[]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(broker_requests(&broker).await, 0);
    assert_eq!(h.runner_invocations().len(), 1);
    assert_eq!(h.count("DELETE", "/api/v4/runners").await, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_while_the_broker_fails_tears_down_without_a_runner() {
    let mut h = Harness::new().await;
    write_pod_token(&h, POD_TOKEN.as_bytes());
    let broker =
        broker_answering(ResponseTemplate::new(503).set_body_json(json!({"error": "not yet"})))
            .await;
    start_with_broker(&mut h, &broker, &["--config-wait", "120"]);
    let deadline = Instant::now() + PATIENCE;
    while broker_requests(&broker).await == 0 {
        assert!(Instant::now() < deadline, "{}", h.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_signal(h.agent_pid(), 10); // SIGUSR1
    let started = Instant::now();
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(h.powered_off(), "a drained VM powers off");
    assert!(h.runner_invocations().is_empty());
    assert!(!h.config_path().exists());
    assert!(
        h.log().contains("drain requested before runner.json"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_during_the_job_deletes_the_broker_s_runner_when_restarted() {
    let mut h = Harness::new().await;
    mount_gitlab(&h).await;
    write_pod_token(&h, POD_TOKEN.as_bytes());
    let broker = broker_answering(grant(&h)).await;
    // A short job: the orphaned fake gitlab-runner ends by itself after the crash.
    let fake = FakeRunner::job(2);
    start_with_broker_running(&mut h, &broker, fake, &[]);
    h.wait_for_job().await;
    send_signal(h.agent_pid(), 9);
    h.wait_exit().await;
    assert!(h.requests("DELETE", "/api/v4/runners").await.is_empty());

    // The restart of this boot resumes the teardown from the state directory: the runner is
    // this boot's own (the broker's), so the runner itself is deleted, not only its manager.
    start_with_broker(&mut h, &broker, &[]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(
        broker_requests(&broker).await,
        1,
        "the broker is asked once per boot"
    );
    assert_eq!(h.runner_invocations().len(), 1, "no second gitlab-runner");
    let deleted = h.requests("DELETE", "/api/v4/runners").await;
    assert_eq!(deleted.len(), 1, "{}", h.log());
    assert_eq!(body(&deleted[0])["token"], GRANTED);
    assert!(h.requests("DELETE", MANAGERS).await.is_empty());
    assert!(h.powered_off());
    assert_no_secret(&h);
}
