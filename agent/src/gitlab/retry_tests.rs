//! `with_retries` in paused time, with scripted answers instead of a server: how often, how
//! long and until when each kind of endpoint is retried.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::backoff::{Hint, Queue};
use crate::gitlab::{Deletion, Endpoint};

fn status(endpoint: Endpoint, status: u16) -> ApiError {
    ApiError::Status {
        endpoint,
        status,
        message: "x".into(),
        retry_hint: None,
    }
}

fn throttled(endpoint: Endpoint, reset_s: u64) -> ApiError {
    ApiError::Status {
        endpoint,
        status: 429,
        message: "Retry later".into(),
        retry_hint: Some(Hint {
            reset_in: Duration::from_secs(reset_s),
            queue: None,
        }),
    }
}

/// A call whose n-th attempt (from 1) answers `answer(n)`.
fn scripted<T>(
    endpoint: Endpoint,
    calls: &AtomicU32,
    answer: impl Fn(u32) -> Result<T, ApiError>,
) -> impl FnMut() -> Call<std::future::Ready<Result<T, ApiError>>> {
    move || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        Call::new(endpoint, std::future::ready(answer(n)))
    }
}

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

#[tokio::test(start_paused = true)]
async fn permanent_error_stops_at_once() {
    let calls = AtomicU32::new(0);
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(300),
        scripted(Endpoint::Verify, &calls, |_| {
            Err(status(Endpoint::Verify, 403))
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(matches!(err, RetryError::Permanent(_)));
}

#[tokio::test(start_paused = true)]
async fn deadline_bounds_the_retries() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(20),
        scripted(Endpoint::Verify, &calls, |_| {
            Err(status(Endpoint::Verify, 502))
        }),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
    assert!(started.elapsed() <= Duration::from_secs(20));
    // A server hint beyond the deadline gives up at once rather than sleeping past it.
    let started = Instant::now();
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(20),
        scripted(Endpoint::Verify, &calls, |_| {
            Err(throttled(Endpoint::Verify, 60))
        }),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        RetryError::DeadlineExceeded { attempts: 1, .. }
    ));
    assert_eq!(started.elapsed(), Duration::ZERO);
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

#[tokio::test(start_paused = true)]
async fn attempts_are_bounded_whatever_the_deadline() {
    let calls = AtomicU32::new(0);
    let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let err = with_retries::<(), _, _>(
        "test",
        far,
        scripted(Endpoint::Verify, &calls, |_| {
            Err(status(Endpoint::Verify, 503))
        }),
    )
    .await
    .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
    assert!(
        matches!(err, RetryError::DeadlineExceeded { attempts, .. } if attempts == MAX_ATTEMPTS)
    );
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

/// Issue item 17: deletions that ran out of --deregister-timeout in a storm left managers.
#[tokio::test(start_paused = true)]
async fn a_throttled_deletion_keeps_going_past_its_deadline() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let result = with_retries(
        "test",
        Instant::now() + Duration::from_secs(30),
        scripted(Endpoint::DeleteManager, &calls, |n| {
            if n <= 3 {
                Err(throttled(Endpoint::DeleteManager, 20))
            } else {
                Ok(Deletion::Deleted)
            }
        }),
    )
    .await;
    assert_eq!(result.unwrap(), Deletion::Deleted);
    assert!(started.elapsed() >= Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn a_throttled_deletion_gives_up_at_the_limit() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(30),
        scripted(Endpoint::DeleteRunner, &calls, |_| {
            Err(throttled(Endpoint::DeleteRunner, 30))
        }),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
    assert!(calls.load(Ordering::SeqCst) > 2);
    let elapsed = started.elapsed();
    assert!(
        elapsed > Duration::from_secs(30) && elapsed <= THROTTLED_DELETION_LIMIT,
        "{elapsed:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn past_the_deadline_only_throttling_keeps_a_deletion_going() {
    let calls = AtomicU32::new(0);
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(30),
        scripted(Endpoint::DeleteManager, &calls, |n| {
            if n == 1 {
                Err(throttled(Endpoint::DeleteManager, 29))
            } else {
                Err(status(Endpoint::DeleteManager, 503))
            }
        }),
    )
    .await
    .unwrap_err();
    let RetryError::DeadlineExceeded { last, .. } = err else {
        panic!("{err:?}")
    };
    assert!(
        matches!(last, ApiError::Status { status: 503, .. }),
        "{last:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn verify_does_not_ride_out_throttling() {
    let calls = AtomicU32::new(0);
    let started = Instant::now();
    let err = with_retries::<(), _, _>(
        "test",
        Instant::now() + Duration::from_secs(30),
        scripted(Endpoint::Verify, &calls, |_| {
            Err(throttled(Endpoint::Verify, 10))
        }),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
    assert!(started.elapsed() <= Duration::from_secs(30));
}

#[tokio::test(start_paused = true)]
async fn a_create_in_flight_is_never_cut_at_the_deadline() {
    let slow = |endpoint| {
        move || {
            Call::new(endpoint, async {
                tokio::time::sleep(Duration::from_secs(25)).await;
                Ok::<_, ApiError>(7)
            })
        }
    };
    let deadline = || Instant::now() + Duration::from_secs(10);
    let created = with_retries("test", deadline(), slow(Endpoint::CreateUserRunner)).await;
    assert_eq!(created.unwrap(), 7);
    let verified = with_retries("test", deadline(), slow(Endpoint::Verify)).await;
    assert!(matches!(
        verified,
        Err(RetryError::DeadlineExceeded {
            last: ApiError::NoAnswer,
            ..
        })
    ));
}
