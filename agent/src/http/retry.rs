//! The one retry loop of the agent's clients: `retry` tries a call until it succeeds, fails for
//! good, runs out of attempts or of time, or is interrupted; a caller's `Policy` says which
//! attempts may be cut and when a retry may go past the deadline. `retry_until` is the plain
//! call of the clients that need no policy.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::backoff;

/// A retry is not started unless this much of the deadline is left for the request itself.
const RETRY_SLACK: Duration = Duration::from_millis(500);

/// The wait before the next try after failed attempt `attempt` (1 for the first), picked by
/// the project's back-off from the server's hint; None when no wait leaves a request its
/// `RETRY_SLACK` before `limit`.
fn wait_before_retry(
    attempt: u32,
    hint: Option<&backoff::Hint>,
    memory: &mut backoff::Memory,
    limit: Instant,
) -> Option<Duration> {
    let room = limit
        .saturating_duration_since(Instant::now())
        .saturating_sub(RETRY_SLACK);
    backoff::plan(attempt.saturating_sub(1), hint, memory).pick(backoff::random_u64(), room)
}

/// What the retry loop needs to know of a client's errors.
pub trait Retryable: std::fmt::Display {
    /// Whether another attempt may succeed (a network error, 408, 429, 5xx).
    fn is_retryable(&self) -> bool;
    /// The server's word on when to come back (`Retry-After`, GitLab's RateLimit headers).
    fn retry_hint(&self) -> Option<&backoff::Hint>;
}

/// An error that can also say that `retry_until` gave up: the metadata service's and the
/// broker's, whose callers see one error type.
pub trait RetryError: Retryable + Sized {
    /// Giving up after `attempts` tries and `seconds`, with the last error.
    fn gave_up(attempts: u32, seconds: u64, last: Self) -> Self;
}

/// Why a call that `retry` made ended without an answer.
#[derive(Debug, thiserror::Error)]
pub enum Stopped<E> {
    /// An error another attempt would not mend.
    #[error("{0}")]
    Permanent(E),
    /// The attempts ran out, the next one had no room before the limit, or one was cut at it
    /// (`last` is then the caller's no-answer error).
    #[error("gave up after {attempts} attempts in {elapsed_s} s: {last}")]
    DeadlineExceeded {
        attempts: u32,
        elapsed_s: u64,
        last: E,
    },
    /// Asked to make no more attempts (a drain, a preemption notice, a stop) while no attempt
    /// that must not be cut was in flight.
    #[error("interrupted after {attempts} attempt(s): no more are made")]
    Interrupted { attempts: u32 },
}

/// Leave to keep retrying past the deadline.
pub struct Overtime {
    /// Up to this long after the call started (never less than to the deadline).
    pub up_to: Duration,
    /// Who keeps trying, for the log line of a retry past the deadline.
    pub who: &'static str,
}

/// What a caller adds to the retry loop for attempts of kind `K` (GitLab's: the endpoint)
/// that fail with `E`. The defaults are `Plain`'s: every attempt may be cut at the deadline,
/// none goes past it, and the error alone is the log line.
pub trait Policy<K, E> {
    /// Named at the start of each retry's log line.
    fn what(&self) -> Option<&str> {
        None
    }
    /// Whether the deadline or an interrupt may drop an attempt of `kind` in flight: not when
    /// its answer is the only way to learn what it created.
    fn may_cut(&self, _kind: K) -> bool {
        true
    }
    /// Whether the next wait and attempt may go past the deadline, after an attempt of `kind`
    /// failed with `error`.
    fn overtime(&self, _kind: K, _error: &E) -> Option<Overtime> {
        None
    }
}

/// Every attempt cut at the deadline, nothing past it.
pub struct Plain;

impl<K, E> Policy<K, E> for Plain {}

/// The one retry loop: `attempt_once` (an attempt's kind and its request) until it succeeds,
/// fails for good, has been tried `max_attempts` times, or no wait leaves the next try room
/// before the limit (the deadline, or the `policy`'s overtime); an attempt cut at the limit is
/// `no_answer`. Once `give_up` resolves no attempt is made, a wait ends at once, and an
/// attempt in flight is dropped unless the policy says it may not be cut (then its answer
/// ends the call, or the wait after it is interrupted). The waits follow `backoff::plan` (at
/// least a second, never before a server's hint, randomised, its memory kept across the
/// call's attempts); each is said in the journal.
pub async fn retry<K, T, E, Fut>(
    deadline: Instant,
    max_attempts: u32,
    policy: &impl Policy<K, E>,
    give_up: impl Future<Output = ()>,
    mut attempt_once: impl FnMut() -> (K, Fut),
    no_answer: impl Fn() -> E,
) -> Result<T, Stopped<E>>
where
    K: Copy,
    E: Retryable,
    Fut: Future<Output = Result<T, E>>,
{
    tokio::pin!(give_up);
    let started = Instant::now();
    // Where the current attempt and the next wait must end.
    let mut limit = deadline;
    let mut attempt: u32 = 0;
    // What the server's throttle said in this call's earlier answers.
    let mut memory = backoff::Memory::default();
    loop {
        // `give_up` is polled only until it resolves: every select below returns when it does.
        tokio::select! {
            biased;
            _ = &mut give_up => return Err(Stopped::Interrupted { attempts: attempt }),
            _ = std::future::ready(()) => {}
        }
        let (kind, request) = attempt_once();
        attempt += 1;
        let gave_up = |last| Stopped::DeadlineExceeded {
            attempts: attempt,
            elapsed_s: started.elapsed().as_secs(),
            last,
        };
        let outcome = if policy.may_cut(kind) {
            let remaining = limit.saturating_duration_since(Instant::now());
            tokio::select! {
                biased;
                _ = &mut give_up => return Err(Stopped::Interrupted { attempts: attempt }),
                answer = tokio::time::timeout(remaining, request) => match answer {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(gave_up(no_answer())),
                },
            }
        } else {
            request.await
        };
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_retryable() => return Err(Stopped::Permanent(e)),
            Err(e) => e,
        };
        if attempt >= max_attempts {
            return Err(gave_up(error));
        }
        let overtime = policy.overtime(kind, &error);
        limit = match &overtime {
            Some(o) => started
                .checked_add(o.up_to)
                .map_or(deadline, |l| l.max(deadline)),
            None => deadline,
        };
        let now = Instant::now();
        let Some(wait) = wait_before_retry(attempt, error.retry_hint(), &mut memory, limit) else {
            return Err(gave_up(error));
        };
        let past_deadline =
            overtime.filter(|_| now.checked_add(wait).is_none_or(|at| at > deadline));
        let line = retry_line(policy.what(), &error, attempt, wait, past_deadline.as_ref());
        tracing::warn!("{line}");
        tokio::select! {
            biased;
            _ = &mut give_up => return Err(Stopped::Interrupted { attempts: attempt }),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// The journal's line for retry number `attempt` after `error`, in `wait`; `past_deadline`
/// when the wait ends past the deadline.
fn retry_line(
    what: Option<&str>,
    error: &dyn std::fmt::Display,
    attempt: u32,
    wait: Duration,
    past_deadline: Option<&Overtime>,
) -> String {
    let what = what.map(|w| format!("{w}: ")).unwrap_or_default();
    let past_deadline = past_deadline
        .map(|o| {
            let up_to = o.up_to.as_secs();
            format!(
                " (past the deadline: {} keeps trying for up to {up_to} s)",
                o.who
            )
        })
        .unwrap_or_default();
    format!(
        "{what}{error}; retry {attempt} in {:.1} s{past_deadline}",
        wait.as_secs_f64()
    )
}

/// `retry` with the `Plain` policy and no interrupt, for a caller whose one error type also
/// says that it gave up.
pub async fn retry_until<T, E, F, Fut>(
    deadline: Instant,
    max_attempts: u32,
    mut attempt_once: F,
    no_answer: impl Fn() -> E,
) -> Result<T, E>
where
    E: RetryError,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let attempts = || ((), attempt_once());
    let never = std::future::pending();
    match retry(deadline, max_attempts, &Plain, never, attempts, no_answer).await {
        Ok(value) => Ok(value),
        Err(Stopped::Permanent(e)) => Err(e),
        Err(Stopped::DeadlineExceeded {
            attempts,
            elapsed_s,
            last,
        }) => Err(E::gave_up(attempts, elapsed_s, last)),
        Err(Stopped::Interrupted { .. }) => unreachable!("nothing interrupts retry_until"),
    }
}

#[cfg(test)]
mod tests;
