//! Hardening of the GitLab client, through the real binary: redirects, what counts as success,
//! absurd hints, throttled deregistration, and secrets in the log.

mod common;

use common::*;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn last_error(h: &Harness) -> String {
    h.status()["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn start_with_verify(h: &mut Harness, verify: ResponseTemplate) {
    mount(&h.server, "POST", VERIFY, verify).await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
}

/// Issue item 1: verify answers `308 Location: http://127.0.0.1:<other>/x`; the other port
/// received the token.
#[tokio::test(flavor = "multi_thread")]
async fn a_redirect_is_not_followed_and_the_token_stays_home() {
    let mut h = Harness::new().await;
    let elsewhere = MockServer::start().await;
    let location = format!("{}/x", elsewhere.uri());
    start_with_verify(
        &mut h,
        ResponseTemplate::new(308).insert_header("Location", location.as_str()),
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        elsewhere.received_requests().await.unwrap().is_empty(),
        "the redirect was followed"
    );
    assert!(
        h.runner_invocations().is_empty(),
        "gitlab-runner was started"
    );
    let error = last_error(&h);
    assert!(
        error.contains("308")
            && error.contains(&location)
            && error.contains(&format!("https://{}", elsewhere.address())),
        "{error}"
    );
    assert_eq!(
        h.count("POST", VERIFY).await,
        1,
        "a redirect is permanent: no retry"
    );
    assert!(h.powered_off());
}

/// Issue item 1: a `200 text/html` login page counted as "runner token accepted".
#[tokio::test(flavor = "multi_thread")]
async fn an_html_login_page_is_not_an_accepted_token() {
    let mut h = Harness::new().await;
    start_with_verify(
        &mut h,
        ResponseTemplate::new(200).set_body_raw("<html>Sign in</html>", "text/html"),
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        h.runner_invocations().is_empty(),
        "gitlab-runner was started"
    );
    let error = last_error(&h);
    assert!(
        error.contains("not JSON") && error.contains("login page"),
        "{error}"
    );
    assert!(
        h.requests("DELETE", MANAGERS).await.is_empty(),
        "nothing was registered"
    );
    assert!(h.powered_off());
}

/// Issue item 4: `Retry-After: 18446744073709551615` overflowed `Instant + Duration` and
/// aborted the agent.
#[tokio::test(flavor = "multi_thread")]
async fn an_absurd_retry_after_neither_aborts_nor_parks_the_agent() {
    let mut h = Harness::new().await;
    start_with_verify(
        &mut h,
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "18446744073709551615")
            .set_body_json(json!({"message": "Retry later"})),
    )
    .await;
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());
    let error = last_error(&h);
    assert!(error.contains("429"), "{error}");
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
}

/// Issue item 2: a reset time in the past (clock skew) gave 0 s waits: 1,822 verify requests in
/// 3 s.
#[tokio::test(flavor = "multi_thread")]
async fn a_reset_time_in_the_past_is_no_tight_loop() {
    let mut h = Harness::new().await;
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(429)
            .insert_header("RateLimit-ResetTime", "Sat, 01 Jan 2000 00:00:00 GMT")
            .insert_header("Retry-After", "0"),
    )
    .await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--register-timeout", "3"]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let sent = h.count("POST", VERIFY).await;
    assert!((1..=4).contains(&sent), "{sent} verify requests in 3 s");
    assert!(last_error(&h).contains("429"), "{}", last_error(&h));
}

/// Issue item 14: a body of any size was read whole (and here, accepted).
#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_answer_is_refused() {
    let mut h = Harness::new().await;
    start_with_verify(
        &mut h,
        ResponseTemplate::new(200).set_body_json(json!({"id": 7, "pad": "x".repeat(1 << 20)})),
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert!(
        h.runner_invocations().is_empty(),
        "gitlab-runner was started"
    );
    assert!(
        last_error(&h).contains("larger than 64 KiB"),
        "{}",
        last_error(&h)
    );
}

/// Issue item 15: a token placed in another field (here the runner's name) or echoed in an
/// error body reached the log whole, or cut to a piece that redaction no longer recognised.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_in_other_fields_and_error_bodies_never_reach_the_log() {
    let mut h = Harness::new().await;
    let echo = format!(
        "denied for glpat-fake.proxy.echo.xxxxxxxx {} {TOKEN}",
        "x".repeat(150)
    );
    mount(
        &h.server,
        "POST",
        VERIFY,
        ResponseTemplate::new(403).set_body_raw(echo, "text/plain"),
    )
    .await;
    h.write_config(json!({"token": TOKEN, "name": "vm-glrt-fake.name.token.xxxxxxxx"}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let log = h.log();
    for leak in ["fake.name.token", "fake.proxy.echo", &TOKEN[5..15]] {
        assert!(!log.contains(leak), "{leak} leaked:\n{log}");
    }
    assert!(log.contains("vm-glrt-…xxxx"), "{log}");
    assert!(log.contains("denied for glpat-…xxxx"), "{log}");
}

/// Issue item 17: with GitLab throttling, deregistration gave up at --deregister-timeout and
/// left the runner manager behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_throttled_deregistration_outlasts_the_deregister_timeout() {
    let mut h = Harness::new().await;
    Mock::given(method("DELETE"))
        .and(path(MANAGERS))
        .respond_with(
            ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .insert_header("RateLimit-Observed", "21")
                .insert_header("RateLimit-Limit", "1200")
                .set_body_raw("Retry later", "text/plain"),
        )
        .up_to_n_times(4)
        .with_priority(1)
        .mount(&h.server)
        .await;
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--deregister-timeout", "2"],
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.count("DELETE", MANAGERS).await, 5, "{}", h.log());
    let st = h.status();
    assert_eq!(st["deregistered"], true, "{}", h.log());
    assert!(h.log().contains("past the deadline"), "{}", h.log());
    assert!(h.started.elapsed() < PATIENCE);
    assert!(h.powered_off());
}
