//! The retry policy around the runner API's calls: `with_retries` runs `http::retry` (until
//! success, a permanent error, `MAX_ATTEMPTS`, or the deadline, waiting as `backoff::plan`
//! says) with the rules of the call's endpoint (see `Endpoint`): a call that creates a runner
//! is never cut short, a throttled deletion rides out the throttle past its deadline.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{ApiError, Call, Endpoint};
use crate::{backoff, http};

/// No call is tried more often than this, whatever its deadline.
pub const MAX_ATTEMPTS: u32 = 50;
/// How long after it started a deletion keeps going while GitLab throttles it (429 with a reset
/// time), even past its deadline (`--deregister-timeout`): in a boot storm the deletions share
/// GitLab's budget with every VM's registration, and a deletion given up leaves a runner
/// manager behind. Past this, or at any other error past the deadline, it gives up.
pub const THROTTLED_DELETION_LIMIT: Duration = Duration::from_secs(600);

/// Why a retried call gave up. `Interrupted` comes only while no request that may create a
/// runner was in flight: nothing of the call was created.
pub type RetryError = http::Stopped<ApiError>;

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
    let attempts = || {
        let call = op();
        (call.endpoint, call.future)
    };
    let policy = ByEndpoint { what };
    http::retry(deadline, MAX_ATTEMPTS, &policy, give_up, attempts, || {
        ApiError::NoAnswer
    })
    .await
}

/// The rules of a call to GitLab, from its endpoint.
struct ByEndpoint<'a> {
    what: &'a str,
}

impl http::Policy<Endpoint, ApiError> for ByEndpoint<'_> {
    fn what(&self) -> Option<&str> {
        Some(self.what)
    }

    fn may_cut(&self, endpoint: Endpoint) -> bool {
        !endpoint.creates_runner()
    }

    fn overtime(&self, endpoint: Endpoint, error: &ApiError) -> Option<http::Overtime> {
        (endpoint.rides_out_throttling() && error.is_throttle_with_reset()).then_some(
            http::Overtime {
                up_to: THROTTLED_DELETION_LIMIT,
                who: "a throttled deletion",
            },
        )
    }
}

impl http::Retryable for ApiError {
    fn is_retryable(&self) -> bool {
        ApiError::is_retryable(self)
    }

    fn retry_hint(&self) -> Option<&backoff::Hint> {
        ApiError::retry_hint(self)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod wait_tests;
