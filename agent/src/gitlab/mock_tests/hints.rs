//! When GitLab says to come back: every form of `Retry-After` (seconds, an HTTP date, garbage,
//! the past, the absurd), `RateLimit-Reset`, `RateLimit-ResetTime` (the latest of the three
//! wins) and the `RateLimit-Observed` / `-Limit` counts, read from real answers, and `with_retries` honouring them against a server.

use std::time::{Duration, SystemTime};

use crate::backoff::{Hint, MAX_HINT, MIN_WAIT, Queue};

use super::*;

fn date(offset_s: i64) -> String {
    let now = SystemTime::now();
    let at = if offset_s >= 0 {
        now + Duration::from_secs(offset_s as u64)
    } else {
        now - Duration::from_secs(offset_s.unsigned_abs())
    };
    httpdate::fmt_http_date(at)
}

/// The hint in the error of a verify answered `status` with `headers`.
async fn hint_of(status: u16, headers: &[(&str, &str)]) -> Option<Hint> {
    let gitlab = MockServer::start().await;
    let mut r = ResponseTemplate::new(status).set_body_json(json!({"message": "Retry later"}));
    for (name, value) in headers {
        r = r.insert_header(*name, *value);
    }
    answer(&gitlab, "POST", "/api/v4/runners/verify", r).await;
    let err = client(&gitlab)
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    match err {
        ApiError::Status { retry_hint, .. } => retry_hint,
        other => panic!("{other:?}"),
    }
}

async fn reset_in(headers: &[(&str, &str)]) -> Option<Duration> {
    hint_of(429, headers).await.map(|h| h.reset_in)
}

fn secs(s: u64) -> Option<Duration> {
    Some(Duration::from_secs(s))
}

/// Whether `got` is within a few seconds below `s` (the date was made a moment earlier and has
/// whole-second resolution).
fn about(got: Option<Duration>, s: u64) -> bool {
    got.is_some_and(|d| {
        d <= Duration::from_secs(s) && d + Duration::from_secs(3) >= Duration::from_secs(s)
    })
}

#[tokio::test]
async fn retry_after_in_seconds() {
    assert_eq!(reset_in(&[("Retry-After", "30")]).await, secs(30));
    assert_eq!(reset_in(&[("Retry-After", "0")]).await, secs(0));
    // The same on a 503, GitLab's migration back-off and proxies.
    let hint = hint_of(503, &[("Retry-After", "60")]).await;
    assert_eq!(hint.map(|h| h.reset_in), secs(60));
}

#[tokio::test]
async fn retry_after_as_an_http_date() {
    let future = date(120);
    assert!(about(reset_in(&[("Retry-After", &future)]).await, 120));
    // A date in the past (clock skew): the reset is now; the floor comes from the plan.
    let past = date(-3600);
    assert_eq!(reset_in(&[("Retry-After", &past)]).await, secs(0));
}

#[tokio::test]
async fn the_latest_reset_wins_and_garbage_is_left_out() {
    let reset = date(40);
    let both = [
        ("RateLimit-ResetTime", reset.as_str()),
        ("Retry-After", "7"),
    ];
    assert!(about(reset_in(&both).await, 40));
    let later = [
        ("RateLimit-ResetTime", reset.as_str()),
        ("Retry-After", "50"),
    ];
    assert_eq!(reset_in(&later).await, secs(50));
    // GitLab's RateLimit-Reset, in Unix time, counts as well; so does a reset in the past (as
    // now) next to a Retry-After.
    let unix = |offset: u64| {
        (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + offset)
            .to_string()
    };
    let in_90 = unix(90);
    let three = [
        ("RateLimit-ResetTime", reset.as_str()),
        ("RateLimit-Reset", in_90.as_str()),
        ("Retry-After", "7"),
    ];
    assert!(about(reset_in(&three).await, 90));
    let past = date(-10);
    let reset_past = [("RateLimit-ResetTime", past.as_str()), ("Retry-After", "7")];
    assert_eq!(reset_in(&reset_past).await, secs(7));
    let garbage = [
        ("RateLimit-ResetTime", "tomorrow"),
        ("RateLimit-Reset", "-1"),
        ("Retry-After", "7"),
    ];
    assert_eq!(reset_in(&garbage).await, secs(7));
    // Alone, RateLimit-ResetTime is enough, and so is RateLimit-Reset.
    assert!(about(
        reset_in(&[("RateLimit-ResetTime", &reset)]).await,
        40
    ));
    assert!(about(reset_in(&[("RateLimit-Reset", &in_90)]).await, 90));
}

#[tokio::test]
async fn garbage_is_no_hint_at_all() {
    for value in [
        "soon",
        "-5",
        "1.5",
        "",
        "30s",
        "Sun, 32 Nov 2026 10:00:00 GMT",
    ] {
        assert_eq!(reset_in(&[("Retry-After", value)]).await, None, "{value:?}");
    }
    assert_eq!(hint_of(429, &[]).await, None);
    // The counts alone say nothing about when.
    let counts = [("RateLimit-Observed", "5"), ("RateLimit-Limit", "60")];
    assert_eq!(hint_of(429, &counts).await, None);
}

#[tokio::test]
async fn absurd_hints_are_clamped() {
    for (value, expected) in [
        ("18446744073709551615", Some(MAX_HINT)),
        ("86400", Some(MAX_HINT)),
        ("Fri, 31 Dec 9999 23:59:59 GMT", Some(MAX_HINT)),
        // Too large for a number of seconds, and no date either.
        ("99999999999999999999999", None),
    ] {
        assert_eq!(
            reset_in(&[("Retry-After", value)]).await,
            expected,
            "{value}"
        );
    }
    let far = [("RateLimit-ResetTime", "Fri, 31 Dec 9999 23:59:59 GMT")];
    assert_eq!(reset_in(&far).await, Some(MAX_HINT));
}

#[tokio::test]
async fn the_throttle_counts_come_with_the_reset() {
    let hint = hint_of(
        429,
        &[
            ("Retry-After", "1"),
            ("RateLimit-Observed", "187"),
            ("RateLimit-Limit", "1200"),
            ("RateLimit-Remaining", "0"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        hint,
        Hint {
            reset_in: Duration::from_secs(1),
            reset_at: None,
            retry_after_s: Some(1),
            queue: Some(Queue {
                observed: 187,
                limit_per_minute: 1200
            }),
        }
    );
    let zero_limit = [
        ("Retry-After", "1"),
        ("RateLimit-Observed", "187"),
        ("RateLimit-Limit", "0"),
    ];
    assert_eq!(hint_of(429, &zero_limit).await.unwrap().queue, None);
}

#[tokio::test]
async fn headers_that_are_not_utf8_are_left_out_of_the_hint_and_the_period() {
    // GitLab's 429 for 100 per 5 s, with the reset, the count and the rate in bytes that are
    // not UTF-8: Retry-After alone is read, so the period is only known to be at least 3 s.
    let gitlab = MockServer::start().await;
    let bytes = |b: &'static [u8]| wiremock::http::HeaderValue::from_bytes(b).unwrap();
    let r = ResponseTemplate::new(429)
        .insert_header("Retry-After", "3")
        .insert_header("RateLimit-Reset", bytes(b"17650000\xff10"))
        .insert_header(
            "RateLimit-ResetTime",
            bytes(b"Sun, 22 Nov 2026 10:00:05 \xc3GMT"),
        )
        .insert_header("RateLimit-Observed", bytes(b"\xfe101"))
        .insert_header("RateLimit-Limit", bytes(b"1200\x80"))
        .set_body_raw("Retry later\n", "text/plain");
    answer(&gitlab, "POST", "/api/v4/runners/verify", r).await;
    let err = client(&gitlab)
        .verify(&secret(TOKEN), SYSTEM_ID, &info())
        .await
        .unwrap_err();
    let ApiError::Status { retry_hint, .. } = err else {
        panic!("{err:?}")
    };
    assert_eq!(
        retry_hint,
        Some(Hint {
            reset_in: Duration::from_secs(3),
            reset_at: None,
            retry_after_s: Some(3),
            queue: None,
        })
    );
}

/// Answers `first` once, then 200 to verify.
async fn throttled_once(first: ResponseTemplate) -> MockServer {
    let gitlab = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/api/v4/runners/verify"))
        .respond_with(first)
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&gitlab)
        .await;
    answer(
        &gitlab,
        "POST",
        "/api/v4/runners/verify",
        ResponseTemplate::new(200).set_body_json(json!({"id": 1})),
    )
    .await;
    gitlab
}

async fn verify_with_retries(gitlab: &MockServer, deadline_s: u64) -> Result<(), RetryError> {
    let c = client(gitlab);
    let (t, i) = (secret(TOKEN), info());
    let deadline = Instant::now() + Duration::from_secs(deadline_s);
    with_retries("verify", deadline, || c.verify(&t, SYSTEM_ID, &i))
        .await
        .map(drop)
}

/// `Retry-After: 1` with counts that put this client first in line: the retry falls within
/// a second after the reset, never before it.
#[tokio::test]
async fn a_throttled_call_is_retried_after_the_reset() {
    let gitlab = throttled_once(
        ResponseTemplate::new(429)
            .insert_header("Retry-After", "1")
            .insert_header("RateLimit-Observed", "1")
            .insert_header("RateLimit-Limit", "60"),
    )
    .await;
    let started = std::time::Instant::now();
    verify_with_retries(&gitlab, 60).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(gitlab.received_requests().await.unwrap().len(), 2);
}

/// Issue item 2: `Retry-After: 0` or a reset in the past made a tight loop.
#[tokio::test]
async fn a_zero_or_garbage_hint_still_waits_the_floor() {
    let zero = ResponseTemplate::new(429)
        .insert_header("Retry-After", "0")
        .insert_header("RateLimit-Observed", "1")
        .insert_header("RateLimit-Limit", "60");
    let garbage = ResponseTemplate::new(429).insert_header("Retry-After", "soon");
    for first in [zero, garbage] {
        let gitlab = throttled_once(first).await;
        let started = std::time::Instant::now();
        verify_with_retries(&gitlab, 60).await.unwrap();
        assert!(started.elapsed() >= MIN_WAIT);
        assert_eq!(gitlab.received_requests().await.unwrap().len(), 2);
    }
}

/// A reset beyond the deadline ends the call at once instead of sleeping past the deadline (or
/// overflowing the clock, issue item 4).
#[tokio::test]
async fn a_reset_beyond_the_deadline_gives_up_at_once() {
    for value in ["3600", "18446744073709551615"] {
        let gitlab =
            throttled_once(ResponseTemplate::new(429).insert_header("Retry-After", value)).await;
        let started = std::time::Instant::now();
        let err = verify_with_retries(&gitlab, 60).await.unwrap_err();
        assert!(
            matches!(
                err,
                RetryError::DeadlineExceeded {
                    attempts: 1,
                    last: ApiError::Status { status: 429, .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(gitlab.received_requests().await.unwrap().len(), 1);
    }
}
