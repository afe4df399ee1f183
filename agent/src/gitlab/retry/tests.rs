//! `with_retries` in paused time, with scripted answers instead of a server: when a call
//! stops (a permanent error, the deadline, `MAX_ATTEMPTS`) for each kind of endpoint. How long
//! it waits between attempts is in `wait_tests.rs`.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::backoff::Hint;
use crate::gitlab::{Deletion, Endpoint};

pub(super) fn status(endpoint: Endpoint, status: u16) -> ApiError {
    ApiError::Status {
        endpoint,
        status,
        message: "x".into(),
        retry_hint: None,
    }
}

pub(super) fn throttled(endpoint: Endpoint, reset_s: u64) -> ApiError {
    ApiError::Status {
        endpoint,
        status: 429,
        message: "Retry later".into(),
        retry_hint: Some(Hint {
            reset_in: Duration::from_secs(reset_s),
            reset_at: None,
            retry_after_s: None,
            queue: None,
        }),
    }
}

/// A call whose n-th attempt (from 1) answers `answer(n)`.
pub(super) fn scripted<T>(
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
    // A 503, or a 429 that does not say when the throttle resets, after a throttled attempt
    // that went past the deadline: no more attempts.
    for later in [503, 429] {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::DeleteManager, &calls, |n| {
                if n == 1 {
                    Err(throttled(Endpoint::DeleteManager, 29))
                } else {
                    Err(status(Endpoint::DeleteManager, later))
                }
            }),
        )
        .await
        .unwrap_err();
        let RetryError::DeadlineExceeded { last, attempts, .. } = err else {
            panic!("{err:?}")
        };
        assert!(
            matches!(last, ApiError::Status { status, .. } if status == later),
            "{last:?}"
        );
        assert_eq!((attempts, calls.load(Ordering::SeqCst)), (2, 2));
        assert!(started.elapsed() <= Duration::from_secs(29) + backoff::CAP);
    }
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
