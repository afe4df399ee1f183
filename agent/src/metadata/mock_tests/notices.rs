//! The notice watches (`aws`, `gce`, started by `watch_notices`) against a fake metadata service
//! on loopback (a fresh wiremock server per test): what they send, how often, and that nothing
//! but a real notice becomes one.

use std::time::Duration;

use tokio::sync::watch;
use wiremock::matchers::{header, method, path, query_param, query_param_is_missing};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use crate::metadata::{Platform, watch_notices as start};
use crate::preemption::{Notice, NoticeKind, Watcher};

const PREEMPTED: &str = "/computeMetadata/v1/instance/preempted";
const MAINTENANCE: &str = "/computeMetadata/v1/instance/maintenance-event";
const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// An answer as GCE's metadata service gives it: with `Metadata-Flavor: Google`.
fn gce(status: u16) -> ResponseTemplate {
    ResponseTemplate::new(status).insert_header("Metadata-Flavor", "Google")
}

async fn answer(server: &MockServer, m: &str, p: &str, r: ResponseTemplate) {
    Mock::given(method(m))
        .and(path(p))
        .respond_with(r)
        .mount(server)
        .await;
}

/// IMDSv2's session token, handed out on every `PUT /latest/api/token`.
async fn imdsv2_token(server: &MockServer, token: &str) {
    answer(
        server,
        "PUT",
        "/latest/api/token",
        ResponseTemplate::new(200).set_body_string(token),
    )
    .await;
}

async fn requests(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

fn query(r: &Request, key: &str) -> Option<String> {
    r.url
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// The first notice within `within`, if any.
async fn notice_within(
    rx: &mut watch::Receiver<Option<Notice>>,
    within: Duration,
) -> Option<Notice> {
    tokio::time::timeout(within, rx.wait_for(Option::is_some))
        .await
        .ok()
        .and_then(|r| r.ok().map(|n| n.clone()))
        .flatten()
}

/// No notice within `within`, and the watch still going (trouble is never the end of it).
async fn assert_no_notice_and_still_watching(mut w: Watcher, within: Duration) {
    assert_eq!(notice_within(&mut w.notices, within).await, None);
    assert!(!w.task.is_finished());
    w.task.abort();
}

/// A maintenance-event key that never changes (its long poll runs out after a while).
async fn quiet_maintenance(server: &MockServer) {
    answer(
        server,
        "GET",
        MAINTENANCE,
        gce(200)
            .insert_header("ETag", "m1")
            .set_body_string("NONE")
            .set_delay(Duration::from_millis(300)),
    )
    .await;
}

#[tokio::test]
async fn gce_reads_the_value_then_long_polls_from_its_etag() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path(PREEMPTED))
        .and(query_param_is_missing("wait_for_change"))
        .respond_with(
            gce(200)
                .insert_header("ETag", "e1")
                .set_body_string("FALSE"),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(PREEMPTED))
        .and(query_param("wait_for_change", "true"))
        .and(query_param("last_etag", "e1"))
        .respond_with(
            gce(200)
                .insert_header("ETag", "e2")
                .set_body_string("TRUE")
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&server)
        .await;
    quiet_maintenance(&server).await;

    let mut w = start(Platform::Gce, &server.uri()).unwrap();
    let n = notice_within(&mut w.notices, Duration::from_secs(10))
        .await
        .expect("the preemption notice");
    assert_eq!(n.kind, NoticeKind::Preemption);
    assert_eq!(n.platform, "gce");
    let deadline = n.deadline.unwrap().duration_since(n.received).unwrap();
    assert_eq!(deadline, Duration::from_secs(30));

    let asked = requests(&server, PREEMPTED).await;
    assert_eq!(asked.len(), 2, "{asked:?}");
    assert_eq!(query(&asked[0], "wait_for_change"), None);
    assert_eq!(query(&asked[1], "wait_for_change").as_deref(), Some("true"));
    assert_eq!(query(&asked[1], "last_etag").as_deref(), Some("e1"));
    assert_eq!(query(&asked[1], "timeout_sec").as_deref(), Some("300"));
    for r in server.received_requests().await.unwrap() {
        assert_eq!(
            r.headers.get("metadata-flavor").unwrap(),
            "Google",
            "{}",
            r.url
        );
    }
    w.task.abort();
}

#[tokio::test]
async fn a_gce_service_that_ignores_wait_for_change_is_asked_at_most_once_a_second() {
    let server = MockServer::start().await;
    for key in [PREEMPTED, MAINTENANCE] {
        let value = if key == PREEMPTED { "FALSE" } else { "NONE" };
        answer(
            &server,
            "GET",
            key,
            gce(200)
                .insert_header("ETag", "same")
                .set_body_string(value),
        )
        .await;
    }
    let mut w = start(Platform::Gce, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(3500)).await,
        None
    );
    for key in [PREEMPTED, MAINTENANCE] {
        let n = requests(&server, key).await.len();
        // One at once, then one a second: 4 in 3.5 s (5 tolerates a slow start).
        assert!((2..=5).contains(&n), "{key}: {n} requests in 3.5 s");
    }
    w.task.abort();
}

#[tokio::test]
async fn aws_asks_with_an_imdsv2_token_no_more_often_than_every_5_s() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .and(header("X-aws-ec2-metadata-token-ttl-seconds", "21600"))
        .respond_with(ResponseTemplate::new(200).set_body_string("tok-1"))
        .mount(&server)
        .await;
    answer(&server, "GET", INSTANCE_ACTION, ResponseTemplate::new(404)).await;
    answer(&server, "GET", REBALANCE, ResponseTemplate::new(404)).await;

    let mut w = start(Platform::Aws, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(6500)).await,
        None,
        "a 404 is no notice"
    );
    for p in [INSTANCE_ACTION, REBALANCE] {
        let asked = requests(&server, p).await;
        // At 0 s and 5 s: never a third within 6.5 s.
        assert_eq!(asked.len(), 2, "{p}");
        for r in &asked {
            assert_eq!(r.headers.get("x-aws-ec2-metadata-token").unwrap(), "tok-1");
        }
    }
    // One token serves every request.
    assert_eq!(requests(&server, "/latest/api/token").await.len(), 1);

    // The notice comes at the next poll.
    Mock::given(method("GET"))
        .and(path(INSTANCE_ACTION))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(r#"{"action": "terminate", "time": "2026-11-30T17:02:00Z"}"#),
        )
        .with_priority(1)
        .mount(&server)
        .await;
    let n = notice_within(&mut w.notices, Duration::from_secs(8))
        .await
        .expect("the spot notice");
    assert_eq!(n.kind, NoticeKind::SpotInterruption);
    assert_eq!(n.detail, "terminate at 2026-11-30T17:02:00.000Z");
    w.task.abort();
}

#[tokio::test]
async fn garbage_redirects_and_huge_answers_are_no_notice_and_do_not_stop_the_watch() {
    let server = MockServer::start().await;
    answer(
        &server,
        "GET",
        PREEMPTED,
        gce(302).insert_header("Location", "/elsewhere"),
    )
    .await;
    answer(
        &server,
        "GET",
        "/elsewhere",
        gce(200).set_body_string("TRUE"),
    )
    .await;
    answer(
        &server,
        "GET",
        MAINTENANCE,
        gce(200).set_body_bytes(vec![b'T'; 100 * 1024]),
    )
    .await;
    let mut w = start(Platform::Gce, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(3500)).await,
        None
    );
    assert!(requests(&server, "/elsewhere").await.is_empty(), "followed");
    // Still watching, backing off: 1 s, 2 s...
    for key in [PREEMPTED, MAINTENANCE] {
        let n = requests(&server, key).await.len();
        assert!((2..=3).contains(&n), "{key}: {n}");
    }
    assert!(!w.task.is_finished());
    w.task.abort();

    let server = MockServer::start().await;
    imdsv2_token(&server, "tok-1").await;
    answer(
        &server,
        "GET",
        INSTANCE_ACTION,
        ResponseTemplate::new(200)
            .insert_header("Content-Type", "text/html")
            .set_body_string("<html><body>terminate</body></html>"),
    )
    .await;
    answer(
        &server,
        "GET",
        REBALANCE,
        ResponseTemplate::new(200).set_body_bytes(b"\xff\xfe{\"noticeTime\"".to_vec()),
    )
    .await;
    let w = start(Platform::Aws, &server.uri()).unwrap();
    assert_no_notice_and_still_watching(w, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn an_unreachable_service_is_no_notice() {
    // A port nobody listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let w = start(Platform::Aws, &url).unwrap();
    assert_no_notice_and_still_watching(w, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_stalled_endpoint_times_out_and_the_watch_goes_on() {
    let server = MockServer::start().await;
    imdsv2_token(&server, "tok-1").await;
    answer(
        &server,
        "GET",
        INSTANCE_ACTION,
        ResponseTemplate::new(200)
            .set_body_string(r#"{"action": "terminate", "time": "2026-11-30T17:02:00Z"}"#)
            .set_delay(Duration::from_secs(120)),
    )
    .await;
    answer(&server, "GET", REBALANCE, ResponseTemplate::new(404)).await;
    let mut w = start(Platform::Aws, &server.uri()).unwrap();
    // The stalled answer is given up after 5 s (never read as a notice); the next endpoint
    // is asked then.
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_secs(7)).await,
        None
    );
    assert_eq!(requests(&server, REBALANCE).await.len(), 1);
    assert!(!w.task.is_finished());
    w.task.abort();
}

#[tokio::test]
async fn a_gce_answer_without_metadata_flavor_is_no_notice() {
    // Something else on the address (a proxy, a captive portal) that says TRUE.
    let server = MockServer::start().await;
    answer(
        &server,
        "GET",
        PREEMPTED,
        ResponseTemplate::new(200)
            .insert_header("ETag", "p1")
            .set_body_string("TRUE"),
    )
    .await;
    quiet_maintenance(&server).await;
    let mut w = start(Platform::Gce, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(3500)).await,
        None
    );
    // Asked afresh (never a long poll from its ETag), backing off: 1 s, 2 s...
    let asked = requests(&server, PREEMPTED).await;
    assert!((2..=3).contains(&asked.len()), "{}", asked.len());
    assert!(asked.iter().all(|r| query(r, "wait_for_change").is_none()));
    assert!(!w.task.is_finished());
    w.task.abort();
}

#[tokio::test]
async fn a_gce_etag_goes_into_the_long_poll_url_encoded() {
    let server = MockServer::start().await;
    let etag = "a+b&timeout_sec=1#c d/%";
    Mock::given(method("GET"))
        .and(path(PREEMPTED))
        .and(query_param_is_missing("wait_for_change"))
        .respond_with(
            gce(200)
                .insert_header("ETag", etag)
                .set_body_string("FALSE"),
        )
        .mount(&server)
        .await;
    answer(
        &server,
        "GET",
        PREEMPTED,
        gce(200)
            .insert_header("ETag", etag)
            .set_body_string("FALSE")
            .set_delay(Duration::from_millis(300)),
    )
    .await;
    quiet_maintenance(&server).await;
    let mut w = start(Platform::Gce, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(1500)).await,
        None
    );
    let asked = requests(&server, PREEMPTED).await;
    assert!(asked.len() >= 2, "{asked:?}");
    let poll = &asked[1];
    assert_eq!(query(poll, "last_etag").as_deref(), Some(etag));
    let pairs: Vec<_> = poll.url.query_pairs().collect();
    assert_eq!(pairs.len(), 3, "{pairs:?}");
    assert_eq!(query(poll, "timeout_sec").as_deref(), Some("300"));
    w.task.abort();
}

#[tokio::test]
async fn without_an_imdsv2_token_no_notice_is_asked_for_until_the_next_poll() {
    let server = MockServer::start().await;
    answer(
        &server,
        "PUT",
        "/latest/api/token",
        ResponseTemplate::new(403),
    )
    .await;
    answer(&server, "GET", INSTANCE_ACTION, ResponseTemplate::new(404)).await;
    answer(&server, "GET", REBALANCE, ResponseTemplate::new(404)).await;
    let mut w = start(Platform::Aws, &server.uri()).unwrap();
    assert_eq!(
        notice_within(&mut w.notices, Duration::from_millis(6500)).await,
        None
    );
    // One PUT, no GET without a token, and the next try only after the back-off (10 s).
    assert_eq!(requests(&server, "/latest/api/token").await.len(), 1);
    assert!(requests(&server, INSTANCE_ACTION).await.is_empty());
    assert!(requests(&server, REBALANCE).await.is_empty());
    assert!(!w.task.is_finished());
    w.task.abort();
}
