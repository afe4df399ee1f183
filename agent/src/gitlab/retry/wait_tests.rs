//! `with_retries` in paused time: how long it waits between attempts. Never before the
//! server's reset, never less than the floor, doubling from the base without a hint, random,
//! bounded whatever the hint; and what the log says about each retry.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use super::tests::{scripted, status, throttled};
use super::*;
use crate::backoff::{Hint, Queue};
use crate::gitlab::{Deletion, Endpoint};

#[tokio::test(start_paused = true)]
async fn retries_until_success_and_honours_the_hint() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let result = with_retries(
        "test",
        Instant::now() + Duration::from_secs(300),
        scripted(Endpoint::Verify, &calls, |n| match n {
            1 => Err(throttled(Endpoint::Verify, 7)),
            2 => Err(status(Endpoint::Verify, 503)),
            _ => Ok(n),
        }),
    )
    .await
    .unwrap();
    assert_eq!(result, 3);
    // Never before the reset (7 s), then at least the floor after the 503.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(8) && elapsed <= Duration::from_secs(60),
        "{elapsed:?}"
    );
}

/// Issue item 2: `RateLimit-ResetTime` in the past or `Retry-After: 0` gave 0 s waits and
/// 1,822 requests in 3 s.
#[tokio::test(start_paused = true)]
async fn a_zero_hint_never_becomes_a_tight_loop() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let result = with_retries(
        "test",
        Instant::now() + Duration::from_secs(3),
        scripted(Endpoint::Verify, &calls, |n| {
            // A way out for the old behaviour, which never let paused time advance.
            if n > 100 {
                Ok(n)
            } else {
                Err(throttled(Endpoint::Verify, 0))
            }
        }),
    )
    .await;
    assert!(result.is_err(), "{result:?}");
    assert!(calls.load(Ordering::SeqCst) <= 3, "{calls:?} calls in 3 s");
    assert!(started.elapsed() <= Duration::from_secs(3));
}

/// Issue item 4: `Instant + Duration` panicked on `Retry-After: 18446744073709551615`.
#[tokio::test(start_paused = true)]
async fn an_absurd_hint_neither_overflows_nor_parks_the_agent() {
    let calls = AtomicU32::new(0);
    let answer = |n| {
        if n == 1 {
            Err(ApiError::Status {
                endpoint: Endpoint::Verify,
                status: 429,
                message: "m".into(),
                retry_hint: Some(Hint {
                    reset_in: Duration::MAX,
                    reset_at: None,
                    retry_after_s: None,
                    queue: Some(Queue {
                        observed: u64::MAX,
                        limit_per_minute: 1,
                    }),
                }),
            })
        } else {
            Ok(n)
        }
    };
    // A deadline near the end of time: waits clamp, nothing overflows.
    let started = Instant::now();
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let result = with_retries("test", far, scripted(Endpoint::Verify, &calls, answer)).await;
    assert_eq!(result.unwrap(), 2);
    assert!(started.elapsed() <= backoff::MAX_HINT + backoff::CAP);
    // A normal deadline: gives up at once.
    calls.store(0, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(300);
    let result = with_retries("test", deadline, scripted(Endpoint::Verify, &calls, answer));
    assert!(matches!(
        result.await,
        Err(RetryError::DeadlineExceeded { attempts: 1, .. })
    ));
    // And a deletion riding out the throttle is bounded by its limit too.
    calls.store(0, Ordering::SeqCst);
    let started = Instant::now();
    let result = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(30),
        scripted(Endpoint::DeleteManager, &calls, |_| {
            Err(throttled(Endpoint::DeleteManager, u64::MAX))
        }),
    );
    assert!(result.await.is_err());
    assert!(started.elapsed() <= THROTTLED_DELETION_LIMIT);
}

/// The times of a call's attempts, in paused time: `failures` 503s without a hint, then success.
async fn attempt_times(failures: u32) -> Vec<Instant> {
    let times = std::sync::Mutex::new(Vec::new());
    let calls = AtomicU32::new(0);
    let op = scripted(Endpoint::Verify, &calls, |n| {
        times.lock().unwrap().push(Instant::now());
        if n <= failures {
            Err(status(Endpoint::Verify, 503))
        } else {
            Ok(())
        }
    });
    with_retries("test", Instant::now() + Duration::from_secs(3600), op)
        .await
        .unwrap();
    times.into_inner().unwrap()
}

/// Without a hint, retry n waits the floor plus at most `BASE * 2^(n-1)`, up to `CAP`: the
/// documented 1 s base, not a later step of the doubling.
#[tokio::test(start_paused = true)]
async fn without_a_hint_the_jitter_doubles_from_the_base() {
    for _ in 0..4 {
        let times = attempt_times(6).await;
        for (n, pair) in times.windows(2).enumerate() {
            let ceiling = backoff::BASE.saturating_mul(1 << n).min(backoff::CAP);
            let wait = pair[1] - pair[0];
            assert!(
                wait >= backoff::MIN_WAIT && wait <= backoff::MIN_WAIT + ceiling,
                "retry {}: {wait:?}",
                n + 1
            );
        }
    }
}

/// VMs that failed together must not come back together: the waits are random.
#[tokio::test(start_paused = true)]
async fn waits_are_randomised() {
    let mut first_waits = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let times = attempt_times(1).await;
        first_waits.insert(times[1] - times[0]);
    }
    assert!(first_waits.len() > 1, "{first_waits:?}");
}

/// The log line of a retry says when it goes past the deadline, and only then.
#[tokio::test(start_paused = true)]
async fn a_retry_past_the_deadline_says_so() {
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let logged = || String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();

    let calls = AtomicU32::new(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let within = scripted(Endpoint::Verify, &calls, |n| {
        if n == 1 {
            Err(throttled(Endpoint::Verify, 5))
        } else {
            Ok(())
        }
    });
    with_retries("verify", deadline, within).await.unwrap();
    let log = logged();
    assert!(log.contains("verify: GitLab answered 429"), "{log}");
    assert!(log.contains("; retry 1 in "), "{log}");
    assert!(!log.contains("past the deadline"), "{log}");

    let calls = AtomicU32::new(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let past = scripted(Endpoint::DeleteManager, &calls, |n| {
        if n == 1 {
            Err(throttled(Endpoint::DeleteManager, 40))
        } else {
            Ok(Deletion::Deleted)
        }
    });
    with_retries("deregister", deadline, past).await.unwrap();
    let log = logged();
    assert!(
        log.contains(" s (past the deadline: a throttled deletion keeps trying for up to 600 s)"),
        "{log}"
    );
    assert_eq!(log.matches("past the deadline").count(), 1, "{log}");
}
