//! Retry timing: exponential back-off with full jitter, and GitLab's own hints (`Retry-After`,
//! `RateLimit-Reset`, `RateLimit-ResetTime`, and the `RateLimit-Observed` / `RateLimit-Limit`
//! pair of its throttle). Pure functions; the caller supplies the random number, the clock and
//! the `Memory` of one call's earlier answers.
//!
//! Three rules hold for every wait:
//! - never shorter than `MIN_WAIT`: a reset time in the past (clock skew) or `Retry-After: 0`
//!   must not turn into a tight loop;
//! - never before the server's reset (the latest of the three headers that say when): a
//!   request sent earlier is rejected for sure;
//! - randomised: VMs that were rejected together must not come back together.
//!
//! A boot storm against GitLab's throttle is the case that shapes the rest. GitLab's
//! Rack::Attack throttle (lib/gitlab/rack_attack.rb, the rack-attack gem's `Throttle`) is a
//! fixed window of `limit` requests per `period` seconds, aligned to the epoch, one budget for
//! all of a fleet's VMs; it counts every request of its window, rejected ones included, and
//! tells each rejected client its count (`RateLimit-Observed`), the rate (`RateLimit-Limit`,
//! per minute, rounded up) and the reset (`Retry-After` = `period - now % period`).
//!
//! With the counts, a client rejected as the c-th request of its window knows that `c - 1 -
//! limit` rejected requests came before it: it takes a turn after them, as in a queue. Each of
//! those will need two requests (its verify, then its deregistration), so the turn is
//! `TURN_COST × (c - 1 - limit) / rate` after the reset, picked within one request's share of
//! the rate: the queue fills each window and no more, and the last turn is close to where an
//! ideal schedule would put it. The window's `limit` needs the period, which GitLab does not
//! send; `PeriodClues` narrows it with every answer (it is at least each `Retry-After`, divides
//! every reset, is below what the count allows and gives a whole limit for the rate) and takes
//! the smallest candidate left: one answer rarely settles it (see `PeriodClues`), and a
//! shorter guess makes a turn later, never earlier. VMs that boot over several windows form
//! several queues that cannot see each other and overlap; a client whose turn is rejected (its
//! window was wanted by another queue too) takes a new turn after the rejected requests before
//! it, counted at `LOSER_TURN_COST`, plus `LOSER_CARRY` of its first turn: the queue it
//! collided with probably goes on about as far.
//!
//! Without the counts (a proxy, an older GitLab, a migration back-off), the only hint is the
//! reset: the retry falls at a random moment within `BLIND_SPREAD_PERIODS` periods per throttled
//! attempt after the reset, at most `BLIND_SPREAD_CAP`. That spreads a storm less evenly and
//! costs more rejected requests (BENCHMARKS.md).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(60);
/// No wait is shorter than this.
pub const MIN_WAIT: Duration = Duration::from_secs(1);
/// Server hints beyond this are taken as this: an absurd `Retry-After` (such as
/// `18446744073709551615`) must neither overflow a clock nor park the agent for years. GitLab's
/// longest throttle period is one hour by default.
pub const MAX_HINT: Duration = Duration::from_secs(3600);
/// With `RateLimit-Observed`: how many requests each rejected request before this one will need
/// (its verify and the deregistration that follows).
pub const TURN_COST: f64 = 2.0;
/// With `RateLimit-Observed`, for a client whose turn was rejected: the cost of each rejected
/// request before it, and the share of its first turn added (see the module documentation;
/// tuned with `cargo bench --bench storm`).
pub const LOSER_TURN_COST: f64 = 4.0;
pub const LOSER_CARRY: f64 = 0.25;
/// Without `RateLimit-Observed`: how many periods after a throttle's reset the retries spread
/// over, per throttled attempt so far, and at most how long.
pub const BLIND_SPREAD_PERIODS: u32 = 4;
pub const BLIND_SPREAD_CAP: Duration = Duration::from_secs(40);

/// The rule's constants in one value: `plan` uses `TUNING`; the storm model (`storm_model.rs`)
/// measures the alternatives, the trade-offs BENCHMARKS.md tabulates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// `LOSER_TURN_COST` and `LOSER_CARRY`: with the counts, how far a client whose turn was
    /// rejected goes (further: fewer rejected requests, a longer storm).
    pub loser_turn_cost: f64,
    pub loser_carry: f64,
    /// `BLIND_SPREAD_PERIODS` and `BLIND_SPREAD_CAP`: without the counts, one compromise between
    /// short and long storms (a longer spread costs the short ones time, a shorter one costs the
    /// long ones rejected requests).
    pub blind_spread_periods: u32,
    pub blind_spread_cap: Duration,
}

pub const TUNING: Tuning = Tuning {
    loser_turn_cost: LOSER_TURN_COST,
    loser_carry: LOSER_CARRY,
    blind_spread_periods: BLIND_SPREAD_PERIODS,
    blind_spread_cap: BLIND_SPREAD_CAP,
};

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
    /// Until the latest reset the answer names, at most `MAX_HINT`; zero when it is past.
    pub reset_in: Duration,
    /// That reset as Unix time in whole seconds, when an absolute header (`RateLimit-Reset`,
    /// `RateLimit-ResetTime`, or `Retry-After` as an HTTP date) named it: GitLab's throttle
    /// period divides it.
    pub reset_at: Option<u64>,
    /// `Retry-After` in seconds, as sent (`period - now % period` at GitLab), when it is at most
    /// `MAX_HINT`: unlike a wait computed from an absolute time, it does not depend on the two
    /// clocks agreeing.
    pub retry_after_s: Option<u32>,
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
    pub ratelimit_reset: Option<&'a str>,
    pub ratelimit_reset_time: Option<&'a str>,
    pub ratelimit_observed: Option<&'a str>,
    pub ratelimit_limit: Option<&'a str>,
}

/// Below this, a `RateLimit-Reset` is a number of seconds (as in the IETF draft) rather than
/// GitLab's Unix time.
const UNIX_TIME_FLOOR: u64 = 1_000_000_000;

/// The server's own answer to "when may I retry?", if it gave one: the latest of the resets
/// that `Retry-After` (seconds, or an HTTP date), `RateLimit-Reset` (Unix time, or seconds) and
/// `RateLimit-ResetTime` (an HTTP date) name; values that cannot be read are left out.
pub fn server_hint(headers: &Headers<'_>, now: SystemTime) -> Option<Hint> {
    let until = |at: SystemTime| at.duration_since(now).unwrap_or(Duration::ZERO);
    let number = |v: Option<&str>| v.and_then(|v| v.trim().parse::<u64>().ok());
    let clamp_secs = |secs: u64| Duration::from_secs(secs.min(MAX_HINT.as_secs()));
    let unix_secs = |at: SystemTime| at.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());

    let retry_after = headers.retry_after.and_then(|v| {
        let v = v.trim();
        match v.parse::<u64>() {
            Ok(secs) => Some((clamp_secs(secs), None)),
            Err(_) => crate::timestamp::http_date(v).map(|at| (until(at), unix_secs(at))),
        }
    });
    let reset = number(headers.ratelimit_reset).map(|v| {
        if v >= UNIX_TIME_FLOOR {
            let at = UNIX_EPOCH.checked_add(Duration::from_secs(v));
            (at.map_or(MAX_HINT, until), Some(v))
        } else {
            (clamp_secs(v), None)
        }
    });
    let reset_time = headers
        .ratelimit_reset_time
        .and_then(crate::timestamp::http_date)
        .map(|at| (until(at), unix_secs(at)));
    let (reset_in, _) = [retry_after, reset, reset_time]
        .into_iter()
        .flatten()
        .max_by_key(|(wait, _)| *wait)?;
    // The absolute reset that the period divides: GitLab's RateLimit-Reset and -ResetTime name
    // the same second.
    let reset_at = [reset, reset_time, retry_after]
        .into_iter()
        .flatten()
        .find_map(|(_, at)| at);
    let retry_after_s = headers
        .retry_after
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|s| u64::from(*s) <= MAX_HINT.as_secs());
    let queue = match (
        number(headers.ratelimit_observed),
        number(headers.ratelimit_limit),
    ) {
        (Some(observed), Some(limit_per_minute)) if limit_per_minute > 0 && observed > 0 => {
            Some(Queue {
                observed,
                limit_per_minute,
            })
        }
        _ => None,
    };
    Some(Hint {
        reset_in: reset_in.min(MAX_HINT),
        reset_at,
        retry_after_s,
        queue,
    })
}

/// What one call (a verify, a deletion) has learnt from the throttle's earlier answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    period: PeriodClues,
    /// The first turn given after a reset (with the counts), and how many throttled answers
    /// came so far.
    first_turn: Option<Duration>,
    throttled: u32,
}

/// What the answers say about the throttle's period, which GitLab does not send. Each rule
/// holds for GitLab's fixed windows aligned to the epoch (`lib/gitlab/rack_attack.rb`):
/// - `Retry-After` is `period - now % period`, so the period is at least every wait seen;
/// - every reset is a multiple of the period, so the period divides their greatest common
///   divisor (two resets a window apart differ by exactly one period);
/// - `RateLimit-Limit` is `ceil(limit × 60 / period)` and a rejected request's count is above
///   the window's limit, so `(RateLimit-Limit - 1) × period / 60 < limit < RateLimit-Observed`.
///
/// One answer rarely settles it: the 245th request of a window, answered `Retry-After: 2`,
/// `RateLimit-Reset: 1765000010`, `RateLimit-Limit: 1200`, gets exactly these headers from a
/// throttle of 40 per 2 s, 100 per 5 s or 200 per 10 s, and 204, 144 or 44 rejected requests
/// came before it. A second answer from another window usually does (the common divisor of two
/// resets a window apart is the period).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PeriodClues {
    /// The longest wait to a reset seen, in whole seconds rounded up (at least 1).
    at_least_s: u64,
    /// The largest period the counts allow (0: no bound yet).
    at_most_s: u64,
    /// The greatest common divisor of the resets seen (0: none yet).
    resets_gcd: u64,
    /// The last `RateLimit-Limit`.
    limit_per_minute: Option<u64>,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Whether a window of `period_s` seconds can have a whole-number limit whose rate per minute,
/// rounded up, is `limit_per_minute`; and that limit.
fn window_limit(limit_per_minute: u64, period_s: u64) -> Option<u64> {
    let limit = u128::from(limit_per_minute) * u128::from(period_s) / 60;
    (limit >= 1 && (limit * 60).div_ceil(u128::from(period_s)) == u128::from(limit_per_minute))
        .then(|| u64::try_from(limit).unwrap_or(u64::MAX))
}

impl PeriodClues {
    /// Adds one answer's clues.
    fn learn(&mut self, hint: &Hint) {
        let wait = hint.reset_in.min(MAX_HINT);
        let wait_s = hint
            .retry_after_s
            .map(u64::from)
            .unwrap_or(wait.as_secs() + u64::from(wait.subsec_nanos() > 0));
        self.at_least_s = self.at_least_s.max(wait_s).max(1);
        if let Some(at) = hint.reset_at.filter(|at| *at > 0) {
            // A reset that shares no candidate with the earlier ones (the period was changed,
            // or an answer is not GitLab's): start again from this one.
            let shared = gcd(self.resets_gcd, at);
            self.resets_gcd =
                if (self.at_least_s..=MAX_HINT.as_secs()).any(|d| shared.is_multiple_of(d)) {
                    shared
                } else {
                    at
                };
        }
        if let Some(q) = hint.queue {
            if self.limit_per_minute != Some(q.limit_per_minute) {
                // A new rate: the old bound was for another limit.
                self.at_most_s = 0;
                self.limit_per_minute = Some(q.limit_per_minute);
            }
            // period × (limit per minute - 1) < 60 × (observed - 1)
            if q.limit_per_minute > 1 && q.observed > 1 {
                let most =
                    (u128::from(q.observed - 1) * 60 - 1) / u128::from(q.limit_per_minute - 1);
                let most = u64::try_from(most).unwrap_or(u64::MAX);
                self.at_most_s = if self.at_most_s == 0 {
                    most
                } else {
                    self.at_most_s.min(most)
                };
            }
        }
    }

    /// The period, as well as the clues tell: the smallest that fits them all; the longest
    /// wait seen when none does (no absolute reset, or answers that contradict each other).
    fn period_s(&self) -> u64 {
        let least = self.at_least_s.max(1);
        if self.resets_gcd == 0 {
            return least;
        }
        let most = match self.at_most_s {
            0 => MAX_HINT.as_secs(),
            most => most.min(MAX_HINT.as_secs()),
        };
        let fits = |d: &u64| {
            self.resets_gcd.is_multiple_of(*d)
                && self
                    .limit_per_minute
                    .is_none_or(|lpm| window_limit(lpm, *d).is_some())
        };
        // One answer rarely settles it (a reset at 1,765,000,010 fits a period of 2, 5 or 10
        // s alike): the smallest candidate makes a turn later, never earlier, than it would be.
        (least..=most)
            .find(fits)
            .or_else(|| (least..=MAX_HINT.as_secs()).find(|d| self.resets_gcd.is_multiple_of(*d)))
            .unwrap_or(least)
    }
}

impl Memory {
    fn period(&mut self, hint: &Hint) -> u64 {
        self.period.learn(hint);
        self.period.period_s()
    }
}

/// When to retry: at a uniformly random moment in `[earliest, earliest + spread]`, and never
/// before `not_before` (the server's reset, or the floor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub not_before: Duration,
    pub earliest: Duration,
    pub spread: Duration,
}

/// The plan for retry number `attempt` (0 for the first retry) after an answer with `hint`;
/// `memory` is the same call's, updated with this answer.
pub fn plan(attempt: u32, hint: Option<&Hint>, memory: &mut Memory) -> Plan {
    plan_with(attempt, hint, memory, &TUNING)
}

/// `plan` with other constants: the storm model measures the alternatives.
pub(crate) fn plan_with(
    attempt: u32,
    hint: Option<&Hint>,
    memory: &mut Memory,
    tuning: &Tuning,
) -> Plan {
    let Some(hint) = hint else {
        // No hint: "full jitter" on top of the floor, a uniformly random duration up to a
        // doubling ceiling, so a fleet of VMs that failed together does not retry together.
        return Plan {
            not_before: MIN_WAIT,
            earliest: MIN_WAIT,
            spread: ceiling(attempt),
        };
    };
    let reset = hint.reset_in.clamp(MIN_WAIT, MAX_HINT);
    let period_s = memory.period(hint);
    memory.throttled = memory.throttled.saturating_add(1);
    let (earliest, spread) = match hint.queue {
        Some(q) => {
            let rate = q.limit_per_minute as f64 / 60.0;
            let per_window = (q.limit_per_minute.saturating_mul(period_s) / 60).max(1);
            let before = q.observed.saturating_sub(1).saturating_sub(per_window) as f64;
            let seconds = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(MAX_HINT);
            let turn = match memory.first_turn {
                None => {
                    let turn = seconds(TURN_COST * before / rate).min(MAX_HINT);
                    memory.first_turn = Some(turn);
                    turn
                }
                Some(first) => seconds(tuning.loser_turn_cost * before / rate)
                    .min(MAX_HINT)
                    .saturating_add(first.mul_f64(tuning.loser_carry)),
            };
            // One request's share of the rate: turns next to each other interleave.
            (reset.saturating_add(turn), seconds(1.0 / rate).min(CAP))
        }
        None => (
            reset,
            Duration::from_secs(period_s)
                .saturating_mul(tuning.blind_spread_periods)
                .saturating_mul(memory.throttled)
                .min(tuning.blind_spread_cap),
        ),
    };
    Plan {
        not_before: reset,
        earliest: earliest.min(MAX_HINT),
        spread: spread.max(Duration::from_millis(1)),
    }
}

impl Plan {
    /// The wait, if the retry can start within `room`: a turn beyond it moves back to the end
    /// of the room (one last try rather than none) and the spread shrinks to fit, but never
    /// before `not_before`. None when even `not_before` is beyond `room`.
    pub fn pick(&self, random: u64, room: Duration) -> Option<Duration> {
        if room < self.not_before {
            return None;
        }
        let start = self.earliest.max(self.not_before).min(room);
        Some(start + uniform(self.spread.min(room - start), random))
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
mod storm_model;
#[cfg(test)]
mod tests;
