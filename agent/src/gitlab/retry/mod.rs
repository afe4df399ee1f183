//! The retry policy around the runner API's calls: `with_retries` calls until success, a
//! permanent error, `MAX_ATTEMPTS`, or the deadline, waiting as `backoff::plan` says. How a
//! call may be retried follows from its endpoint (see `Endpoint`): a call that creates a runner
//! is never cut short, a throttled deletion rides out the throttle past its deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{ApiError, Call};
use crate::{backoff, http};

/// No call is tried more often than this, whatever its deadline.
pub const MAX_ATTEMPTS: u32 = 50;
/// How long after it started a deletion keeps going while GitLab throttles it (429 with a reset
/// time), even past its deadline (`--deregister-timeout`): in a boot storm the deletions share
/// GitLab's budget with every VM's registration, and a deletion given up leaves a runner
/// manager behind. Past this, or at any other error past the deadline, it gives up.
pub const THROTTLED_DELETION_LIMIT: Duration = Duration::from_secs(600);

/// Why a retried call gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("{0}")]
    Permanent(ApiError),
    #[error("gave up after {attempts} attempts in {elapsed_s} s: {last}")]
    DeadlineExceeded {
        attempts: u32,
        elapsed_s: u64,
        last: ApiError,
    },
    /// Asked to make no more attempts (a drain, a preemption notice, a stop) while no request
    /// that may create a runner was in flight: nothing of this call was created.
    #[error("interrupted after {attempts} attempt(s): no more are made")]
    Interrupted { attempts: u32 },
}

/// Calls `op` until it succeeds, fails permanently, or the next retry could not start before
/// `deadline`; at most `MAX_ATTEMPTS` times. Waits follow `backoff::plan`: never shorter than
/// `backoff::MIN_WAIT`, never before the server's reset, always randomised.
///
/// How a call may be retried is a property of its endpoint, so the caller need not know:
/// - a call that creates a runner is never cut short at the deadline (its answer is the only way
///   to learn the token of a runner it may have created; `REQUEST_TIMEOUT` bounds it), and
///   ambiguous failures come back as the permanent `ApiError::MaybeCreated`;
/// - a deletion that GitLab throttles (429 with a reset time) keeps going past `deadline`, up to
///   `THROTTLED_DELETION_LIMIT` after it started, as long as the answers stay such 429s.
pub async fn with_retries<T, F, Fut>(what: &str, deadline: Instant, op: F) -> Result<T, RetryError>
where
    F: FnMut() -> Call<Fut>,
    Fut: Future<Output = Result<T, ApiError>>,
{
    with_retries_until(what, deadline, std::future::pending(), op).await
}

/// `with_retries`, until `give_up` resolves: from then on no attempt is made and a wait between
/// attempts ends at once (`RetryError::Interrupted`). A request in flight that may create a
/// runner is not dropped: its answer is the only way to learn the token of what it created, so
/// the call ends with that answer (bounded by the request's timeout, and by the caller).
pub async fn with_retries_until<T, F, Fut>(
    what: &str,
    deadline: Instant,
    give_up: impl Future<Output = ()>,
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut() -> Call<Fut>,
    Fut: Future<Output = Result<T, ApiError>>,
{
    tokio::pin!(give_up);
    let started = Instant::now();
    let throttled_limit = started
        .checked_add(THROTTLED_DELETION_LIMIT)
        .map_or(deadline, |limit| limit.max(deadline));
    // Where the current attempt and the next wait must end.
    let mut limit = deadline;
    let mut attempt: u32 = 0;
    // What GitLab's throttle said in this call's earlier answers.
    let mut memory = backoff::Memory::default();
    loop {
        // `give_up` is polled only until it resolves: every select below returns when it does.
        tokio::select! {
            biased;
            _ = &mut give_up => return Err(RetryError::Interrupted { attempts: attempt }),
            _ = std::future::ready(()) => {}
        }
        let call = op();
        let endpoint = call.endpoint;
        attempt += 1;
        let gave_up = |last| RetryError::DeadlineExceeded {
            attempts: attempt,
            elapsed_s: started.elapsed().as_secs(),
            last,
        };
        let outcome = if endpoint.creates_runner() {
            call.future.await
        } else {
            let remaining = limit.saturating_duration_since(Instant::now());
            tokio::select! {
                biased;
                _ = &mut give_up => return Err(RetryError::Interrupted { attempts: attempt }),
                answer = tokio::time::timeout(remaining, call.future) => match answer {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(gave_up(ApiError::NoAnswer)),
                },
            }
        };
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_retryable() => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        if attempt >= MAX_ATTEMPTS {
            return Err(gave_up(error));
        }
        limit = if endpoint.rides_out_throttling() && error.is_throttle_with_reset() {
            throttled_limit
        } else {
            deadline
        };
        let now = Instant::now();
        let Some(wait) = http::wait_before_retry(attempt, error.retry_hint(), &mut memory, limit)
        else {
            return Err(gave_up(error));
        };
        let past_deadline = now.checked_add(wait).is_none_or(|at| at > deadline);
        tracing::warn!(
            "{what}: {error}; retry {attempt} in {:.1} s{}",
            wait.as_secs_f64(),
            if past_deadline {
                format!(
                    " (past the deadline: a throttled deletion keeps trying for up to {} s)",
                    THROTTLED_DELETION_LIMIT.as_secs()
                )
            } else {
                String::new()
            }
        );
        tokio::select! {
            biased;
            _ = &mut give_up => return Err(RetryError::Interrupted { attempts: attempt }),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wait_tests;
