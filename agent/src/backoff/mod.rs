//! Retry timing: exponential back-off with full jitter, and GitLab's own hints (`Retry-After`,
//! `RateLimit-ResetTime`, and the `RateLimit-Observed` / `RateLimit-Limit` pair of its throttle).
//! Pure functions; the caller supplies the random number and the clock.
//!
//! Three rules hold for every wait:
//! - never shorter than `MIN_WAIT`: a reset time in the past (clock skew) or `Retry-After: 0`
//!   must not turn into a tight loop;
//! - never before the server's reset: a request sent earlier is rejected for sure;
//! - randomised: VMs that were rejected together must not come back together.
//!
//! A boot storm against GitLab's throttle (Rack::Attack: a fixed window of `limit` requests per
//! `period`, one budget for all of a fleet's VMs) is the case that shapes the rest. If every
//! rejected VM retried at the reset, about `N - limit` would be rejected again in each window.
//! The throttle counts every request of its window, rejected ones included, and tells each
//! rejected client its count (`RateLimit-Observed`) and the rate (`RateLimit-Limit`, per
//! minute). So a client rejected as the c-th request of its window knows that `c - 1` requests
//! came before it, and takes its turn after them: `(c - 1) / rate` from the start of the window,
//! of which the window itself served about one period. The retries of one window count on a
//! third of the rate (`RETRY_SHARE`): a third stays for the call each of them makes next (the
//! deregistration after a verify), and a third for requests that are not retries (VMs that
//! boot later) and for collisions, because clients cannot see the turns that the rejected of
//! other windows took. Within its turn each client picks a random moment, over one period and
//! one more per earlier rejection of the same call, so that turns interleave and a client
//! rejected again moves further out.
//! Without those two headers (a migration back-off, an older GitLab, a proxy), the only hint is
//! the reset: the retry then falls at a random moment in a span of `SPREAD_PERIODS` periods per
//! attempt after the reset (up to `CAP`). That spreads a storm less evenly (see BENCHMARKS.md).

use std::time::{Duration, SystemTime};

pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(60);
/// No wait is shorter than this.
pub const MIN_WAIT: Duration = Duration::from_secs(1);
/// Server hints beyond this are taken as this: an absurd `Retry-After` (such as
/// `18446744073709551615`) must neither overflow a clock nor park the agent for years. GitLab's
/// longest throttle period is one hour by default.
pub const MAX_HINT: Duration = Duration::from_secs(3600);
/// With `RateLimit-Observed`: the turn after the requests counted before this one is this many
/// times their share of the rate, i.e. retries count on `1 / RETRY_SHARE` of the rate (see the
/// module documentation; tuned with `cargo bench --bench storm`).
pub const RETRY_SHARE: u32 = 3;
/// Without `RateLimit-Observed`: how many periods (estimated from the hint) the retries after a
/// throttle's reset spread over, per attempt so far.
pub const SPREAD_PERIODS: u32 = 6;

/// The ceiling of "full jitter" before retry number `attempt` (0 for the first retry):
/// `min(CAP, BASE * 2^attempt)`.
fn ceiling(attempt: u32) -> Duration {
    BASE.checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(CAP)
        .min(CAP)
}

/// A uniformly random duration in `[0, span]`, in whole milliseconds.
fn uniform(span: Duration, random: u64) -> Duration {
    let millis = u64::try_from(span.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(random % millis.saturating_add(1))
}

/// What a server said about when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// Until the reset (`RateLimit-ResetTime`, else `Retry-After`), at most `MAX_HINT`; zero
    /// when the reset is already past.
    pub reset_in: Duration,
    /// GitLab's throttle: this request's count in its window, and the limit per minute.
    pub queue: Option<Queue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queue {
    pub observed: u64,
    pub limit_per_minute: u64,
}

/// The raw header values a hint is made of.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub retry_after: Option<&'a str>,
    pub ratelimit_reset_time: Option<&'a str>,
    pub ratelimit_observed: Option<&'a str>,
    pub ratelimit_limit: Option<&'a str>,
}

/// The server's own answer to "when may I retry?", if it gave one. `RateLimit-ResetTime` (an
/// HTTP date) wins over `Retry-After` (seconds, or an HTTP date), as in gitlab-runner.
pub fn server_hint(headers: &Headers<'_>, now: SystemTime) -> Option<Hint> {
    let until = |date: &str| {
        crate::timestamp::http_date(date).map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
    };
    let reset_in = match headers.ratelimit_reset_time.and_then(until) {
        Some(wait) => wait,
        None => {
            let value = headers.retry_after?.trim();
            match value.parse::<u64>() {
                Ok(secs) => Duration::from_secs(secs.min(MAX_HINT.as_secs())),
                Err(_) => until(value)?,
            }
        }
    };
    let number = |v: Option<&str>| v.and_then(|v| v.trim().parse::<u64>().ok());
    let queue = match (
        number(headers.ratelimit_observed),
        number(headers.ratelimit_limit),
    ) {
        (Some(observed), Some(limit_per_minute)) if limit_per_minute > 0 => Some(Queue {
            observed,
            limit_per_minute,
        }),
        _ => None,
    };
    Some(Hint {
        reset_in: reset_in.min(MAX_HINT),
        queue,
    })
}

/// When to retry: at a uniformly random moment in `[earliest, earliest + spread]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub earliest: Duration,
    pub spread: Duration,
}

/// The plan for retry number `attempt` (0 for the first retry) after an answer with `hint`.
pub fn plan(attempt: u32, hint: Option<&Hint>) -> Plan {
    let Some(hint) = hint else {
        // No hint: "full jitter" on top of the floor, a uniformly random duration up to a
        // doubling ceiling, so a fleet of VMs that failed together does not retry together.
        return Plan {
            earliest: MIN_WAIT,
            spread: ceiling(attempt),
        };
    };
    let reset = hint.reset_in.clamp(MIN_WAIT, MAX_HINT);
    // The throttle's period is unknown; the time to its reset is at most one period, and a
    // lower estimate only makes the turn below later.
    let period = reset.min(CAP);
    match hint.queue {
        Some(q) => {
            let ahead = Duration::try_from_secs_f64(
                q.observed.saturating_sub(1) as f64 * 60.0 / q.limit_per_minute as f64,
            )
            .unwrap_or(MAX_HINT)
            .min(MAX_HINT);
            let turn = ahead.saturating_sub(period).saturating_mul(RETRY_SHARE);
            Plan {
                earliest: reset.saturating_add(turn).min(MAX_HINT),
                spread: period.saturating_mul(attempt.saturating_add(1)).min(CAP),
            }
        }
        None => Plan {
            earliest: reset,
            spread: period
                .saturating_mul(SPREAD_PERIODS)
                .saturating_mul(attempt.saturating_add(1))
                .min(CAP),
        },
    }
}

impl Plan {
    /// The wait, if the retry can start within `room`: the spread shrinks to fit, `earliest`
    /// never moves. None when even `earliest` is beyond `room`.
    pub fn pick(&self, random: u64, room: Duration) -> Option<Duration> {
        let free = room.checked_sub(self.earliest)?;
        Some(self.earliest + uniform(self.spread.min(free), random))
    }
}

/// The random number a wait is picked with: every client that retries (GitLab's, the metadata
/// service's) spreads its retries the same way.
pub fn random_u64() -> u64 {
    // getrandom only fails when the kernel has no entropy source at all; a fixed value then
    // still gives a valid (if not spread) back-off.
    getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests;
