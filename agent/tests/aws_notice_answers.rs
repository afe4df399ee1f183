//! The AWS preemption watcher against metadata services that answer oddly, through the real
//! binary: a notice whose JSON carries bytes that are not UTF-8 is no notice, and a service
//! answering 401 is asked no more often than every 5 s, the token's PUT included.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use serde_json::json;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const TOKEN_PATH: &str = "/latest/api/token";
const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// A request as the fake metadata service saw it.
#[derive(Debug, Clone)]
struct Seen {
    what: String,
    at: Instant,
    token: Option<String>,
}

/// How the fake IMDS answers a request, given what it was asked before.
type Answer = dyn Fn(&Request, &[Seen]) -> ResponseTemplate + Send + Sync;

/// A fake IMDS that records every request with its time and answers through `answer`.
#[derive(Clone)]
struct Imds {
    seen: Arc<Mutex<Vec<Seen>>>,
    answer: Arc<Answer>,
}

impl Respond for Imds {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut seen = self.seen.lock().unwrap();
        let answer = (self.answer)(request, &seen);
        seen.push(Seen {
            what: format!("{} {}", request.method, request.url.path()),
            at: Instant::now(),
            token: request
                .headers
                .get("x-aws-ec2-metadata-token")
                .map(|v| v.to_str().unwrap_or("?").to_string()),
        });
        answer
    }
}

/// The fake IMDS: `answer` is given the request and what was asked before it.
async fn imds(
    answer: impl Fn(&Request, &[Seen]) -> ResponseTemplate + Send + Sync + 'static,
) -> (MockServer, Arc<Mutex<Vec<Seen>>>) {
    let server = MockServer::start().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    Mock::given(wiremock::matchers::any())
        .respond_with(Imds {
            seen: seen.clone(),
            answer: Arc::new(answer),
        })
        .mount(&server)
        .await;
    (server, seen)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The agent with runner.json on its config disk, watching AWS notices at `meta` for a job of
/// `job_seconds`.
async fn run_agent(meta: &MockServer, job_seconds: u32) -> Harness {
    let mut h = Harness::new().await;
    let url = meta.uri();
    h.start_glrt(
        json!({}),
        FakeRunner {
            job_seconds,
            exit_code: 0,
        },
        &["--config-source", "aws", "--metadata-url", &url],
    )
    .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    h
}

/// A body with `valid` JSON's fields and one more, ignored by the agent, whose value is `bad`
/// (bytes that are not UTF-8).
fn with_bad_bytes(valid: &str, key: &str, bad: &[u8]) -> Vec<u8> {
    let mut body = valid.trim_end_matches('}').as_bytes().to_vec();
    body.extend_from_slice(format!(r#", "{key}": ""#).as_bytes());
    body.extend_from_slice(bad);
    body.extend_from_slice(b"\"}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notice_with_bytes_that_are_not_utf8_in_an_ignored_field_is_no_notice() {
    let soon = rfc3339(SystemTime::now() + Duration::from_secs(12));
    let now = rfc3339(SystemTime::now());
    // Each run: (instance-action's answer, rebalance's answer); each alone, well-formed, is a
    // notice that would drain the VM (and the first abort its job).
    let runs: [(Vec<u8>, Vec<u8>); 2] = [
        (
            with_bad_bytes(
                &format!(r#"{{"action": "terminate", "time": "{soon}"}}"#),
                "note",
                b"\xff\xfe",
            ),
            with_bad_bytes(&format!(r#"{{"noticeTime": "{now}"}}"#), "x", b"\xc3\x28"),
        ),
        (
            // An overlong '/' and a UTF-16 surrogate written as UTF-8: both invalid.
            with_bad_bytes(
                &format!(r#"{{"time": "{soon}", "action": "stop"}}"#),
                "reason",
                b"ok \xc0\xaf",
            ),
            with_bad_bytes(
                &format!(r#"{{"noticeTime": "{now}"}}"#),
                "detail",
                b"\xed\xa0\x80 tail",
            ),
        ),
    ];
    let agents = runs.iter().map(|(action, rebalance)| {
        let (action, rebalance) = (action.clone(), rebalance.clone());
        async move {
            let (meta, _) = imds(move |r, _| match r.url.path() {
                TOKEN_PATH => ResponseTemplate::new(200).set_body_string("imds-token-1"),
                INSTANCE_ACTION => ResponseTemplate::new(200).set_body_bytes(action.clone()),
                REBALANCE => ResponseTemplate::new(200).set_body_bytes(rebalance.clone()),
                _ => ResponseTemplate::new(404),
            })
            .await;
            let h = run_agent(&meta, 7).await;
            let asked = meta.received_requests().await.unwrap_or_default();
            (h, asked)
        }
    });
    for (h, asked) in futures_join(agents).await {
        let log = h.log();
        assert!(
            asked.iter().any(|r| r.url.path() == INSTANCE_ACTION)
                && asked.iter().any(|r| r.url.path() == REBALANCE),
            "the watcher asked both endpoints: {log}"
        );
        assert_eq!(h.runner_signals(), "", "no drain, no abort: {log}");
        assert!(log.contains("fake gitlab-runner: job done"), "{log}");
        assert!(h.status()["preemption"].is_null(), "{log}");
        assert!(
            !h.status()["timeline"].to_string().contains("draining"),
            "{log}"
        );
        assert!(log.contains("not UTF-8"), "{log}");
        assert!(h.powered_off());
    }
}

/// Runs the futures at once (no futures crate here): each on its own task.
async fn futures_join<T: Send + 'static>(
    futures: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.unwrap());
    }
    out
}

/// Asserts that no endpoint (method and path) was asked twice within `floor`.
fn assert_spaced(seen: &[Seen], floor: Duration) {
    let mut whats: Vec<&str> = seen.iter().map(|s| s.what.as_str()).collect();
    whats.sort();
    whats.dedup();
    for what in whats {
        let times: Vec<Instant> = seen
            .iter()
            .filter(|s| s.what == what)
            .map(|s| s.at)
            .collect();
        for pair in times.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= floor,
                "{what} asked twice within {gap:?} (at least {floor:?} apart expected): {seen:#?}"
            );
        }
    }
}

fn count(seen: &[Seen], what: &str) -> usize {
    seen.iter().filter(|s| s.what == what).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_answering_401_is_asked_no_endpoint_more_than_every_5_s() {
    // Every GET refused, whatever the token: the watcher must not renew and retry at once.
    let (meta, seen) = imds(|r, _| match r.url.path() {
        TOKEN_PATH => ResponseTemplate::new(200).set_body_string("imds-token-1"),
        _ => ResponseTemplate::new(401),
    })
    .await;
    let h = run_agent(&meta, 12).await;
    let seen = seen.lock().unwrap().clone();
    // 4 s: a generous floor under the 5 s poll (the fix's spacing is 5 s and more).
    assert_spaced(&seen, Duration::from_secs(4));
    let ia = format!("GET {INSTANCE_ACTION}");
    assert!(count(&seen, &ia) >= 2, "still watching: {seen:#?}");
    assert!(count(&seen, &format!("GET {REBALANCE}")) >= 2, "{seen:#?}");
    assert_eq!(h.runner_signals(), "", "a 401 is no notice: {}", h.log());
    assert!(h.log().contains("HTTP 401"), "logged: {}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_is_renewed_at_the_next_poll_and_used_from_then_on() {
    // The first token stops working after its first use (it "expired"); the second works. Only
    // instance-action checks tokens: rebalance answers 404 to any.
    let (meta, seen) = imds(|r, seen| match r.url.path() {
        TOKEN_PATH => {
            let n = count(seen, &format!("PUT {TOKEN_PATH}")) + 1;
            ResponseTemplate::new(200).set_body_string(format!("imds-token-{n}"))
        }
        INSTANCE_ACTION => {
            let token = r
                .headers
                .get("x-aws-ec2-metadata-token")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let used = seen
                .iter()
                .filter(|s| s.token.as_deref() == Some(token) && s.what.starts_with("GET"))
                .count();
            if token == "imds-token-1" && used >= 1 {
                ResponseTemplate::new(401)
            } else {
                ResponseTemplate::new(404)
            }
        }
        _ => ResponseTemplate::new(404),
    })
    .await;
    let h = run_agent(&meta, 18).await;
    let seen = seen.lock().unwrap().clone();
    assert_spaced(&seen, Duration::from_secs(4));
    let ia: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.what == format!("GET {INSTANCE_ACTION}"))
        .collect();
    // Poll 1 with token 1 (404), poll 2 with token 1 (401), poll 3 renews: token 2.
    assert!(ia.len() >= 3, "{seen:#?}");
    assert_eq!(ia[0].token.as_deref(), Some("imds-token-1"));
    assert_eq!(ia[1].token.as_deref(), Some("imds-token-1"));
    assert_eq!(ia[2].token.as_deref(), Some("imds-token-2"), "{seen:#?}");
    assert_eq!(count(&seen, &format!("PUT {TOKEN_PATH}")), 2, "{seen:#?}");
    assert_eq!(h.runner_signals(), "", "{}", h.log());
}
