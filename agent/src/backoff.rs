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
        httpdate::parse_http_date(date.trim())
            .ok()
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The random part of the wait without a hint.
    fn full_jitter(attempt: u32, random: u64) -> Duration {
        plan(attempt, None).pick(random, Duration::MAX).unwrap() - MIN_WAIT
    }

    fn hint(h: &Headers<'_>) -> Option<Hint> {
        server_hint(h, SystemTime::UNIX_EPOCH)
    }

    fn reset_in(h: &Headers<'_>, now: SystemTime) -> Option<Duration> {
        server_hint(h, now).map(|h| h.reset_in)
    }

    fn retry_after(v: &str) -> Headers<'_> {
        Headers {
            retry_after: Some(v),
            ..Headers::default()
        }
    }

    #[test]
    fn jitter_stays_within_the_doubling_ceiling() {
        assert_eq!(
            full_jitter(0, u64::MAX),
            Duration::from_millis(u64::MAX % 1001)
        );
        for attempt in 0..10 {
            let ceiling = Duration::from_secs(1 << attempt).min(CAP);
            for r in [0, 1, 999, 12_345, u64::MAX / 3, u64::MAX] {
                assert!(full_jitter(attempt, r) <= ceiling, "attempt {attempt}");
            }
        }
        assert_eq!(full_jitter(0, 0), Duration::ZERO);
        assert_eq!(full_jitter(3, 8000), Duration::from_secs(8));
    }

    #[test]
    fn jitter_is_capped_at_sixty_seconds_even_for_huge_attempts() {
        assert_eq!(full_jitter(6, 60_000), CAP);
        assert_eq!(full_jitter(40, 60_000), CAP);
        assert_eq!(full_jitter(u32::MAX, 60_000), CAP);
        assert!(full_jitter(u32::MAX, u64::MAX) <= CAP);
    }

    #[test]
    fn jitter_spreads_over_the_range() {
        let waits: std::collections::BTreeSet<_> =
            (0..100u64).map(|r| full_jitter(4, r * 163)).collect();
        assert!(waits.len() > 90);
    }

    #[test]
    fn retry_after_seconds() {
        assert_eq!(
            hint(&retry_after("60")),
            Some(Hint {
                reset_in: Duration::from_secs(60),
                queue: None
            })
        );
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            reset_in(&retry_after(" 2 "), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(hint(&Headers::default()), None);
        assert_eq!(hint(&retry_after("soon")), None);
    }

    #[test]
    fn retry_after_http_date_and_ratelimit_reset_time() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(
            reset_in(&retry_after("Sun, 22 Nov 2026 10:00:30 GMT"), now),
            Some(Duration::from_secs(30))
        );
        // RateLimit-ResetTime wins over Retry-After.
        let both = |reset: &'static str| Headers {
            retry_after: Some("7"),
            ratelimit_reset_time: Some(reset),
            ..Headers::default()
        };
        assert_eq!(
            reset_in(&both("Sun, 22 Nov 2026 10:00:05 GMT"), now),
            Some(Duration::from_secs(5))
        );
        // A reset time in the past means "now" (the floor comes later, in `plan`).
        assert_eq!(
            reset_in(&both("Sun, 22 Nov 2026 09:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        // An unparsable reset time falls back to Retry-After.
        assert_eq!(
            reset_in(&both("garbage"), now),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn absurd_hints_are_clamped() {
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            reset_in(&retry_after("18446744073709551615"), now),
            Some(MAX_HINT)
        );
        let far = Headers {
            ratelimit_reset_time: Some("Fri, 31 Dec 9999 23:59:59 GMT"),
            ..Headers::default()
        };
        assert_eq!(reset_in(&far, now), Some(MAX_HINT));
        // And a plan made from them stays within MAX_HINT, whatever the counts say.
        let huge = Hint {
            reset_in: MAX_HINT,
            queue: Some(Queue {
                observed: u64::MAX,
                limit_per_minute: 1,
            }),
        };
        let p = plan(u32::MAX, Some(&huge));
        assert!(p.earliest <= MAX_HINT && p.spread <= CAP, "{p:?}");
        assert!(p.pick(u64::MAX, Duration::MAX).unwrap() <= MAX_HINT + CAP);
    }

    #[test]
    fn the_throttle_counts_are_read_when_both_are_there() {
        let h = Headers {
            retry_after: Some("1"),
            ratelimit_observed: Some("187"),
            ratelimit_limit: Some("1200"),
            ..Headers::default()
        };
        assert_eq!(
            hint(&h).unwrap().queue,
            Some(Queue {
                observed: 187,
                limit_per_minute: 1200
            })
        );
        for (observed, limit) in [
            (Some("187"), None),
            (None, Some("1200")),
            (Some("5"), Some("0")),
        ] {
            let h = Headers {
                retry_after: Some("1"),
                ratelimit_observed: observed,
                ratelimit_limit: limit,
                ..Headers::default()
            };
            assert_eq!(hint(&h).unwrap().queue, None);
        }
    }

    #[test]
    fn no_wait_is_shorter_than_the_floor() {
        for h in [
            None,
            Some(Hint {
                reset_in: Duration::ZERO,
                queue: None,
            }),
            Some(Hint {
                reset_in: Duration::ZERO,
                queue: Some(Queue {
                    observed: 1,
                    limit_per_minute: 60,
                }),
            }),
        ] {
            for attempt in [0, 1, 5] {
                let p = plan(attempt, h.as_ref());
                assert!(p.earliest >= MIN_WAIT, "{h:?}");
                assert!(p.spread > Duration::ZERO, "{h:?}: no jitter");
                for r in [0, 7, u64::MAX] {
                    assert!(p.pick(r, Duration::from_secs(300)).unwrap() >= MIN_WAIT);
                }
            }
        }
    }

    #[test]
    fn never_before_the_reset() {
        for reset in [1, 3, 60] {
            let h = Hint {
                reset_in: Duration::from_secs(reset),
                queue: None,
            };
            for r in [0, 1, u64::MAX] {
                let wait = plan(0, Some(&h)).pick(r, Duration::MAX).unwrap();
                assert!(wait >= Duration::from_secs(reset));
            }
        }
    }

    #[test]
    fn a_rejected_client_takes_its_turn_after_those_counted_before_it() {
        // 20 per 1 s (1200 per minute), reset in 1 s.
        let h = |observed| Hint {
            reset_in: Duration::from_secs(1),
            queue: Some(Queue {
                observed,
                limit_per_minute: 1200,
            }),
        };
        // The 21st: the first one rejected, right at the reset.
        assert_eq!(
            plan(0, Some(&h(21))),
            Plan {
                earliest: Duration::from_secs(1),
                spread: Duration::from_secs(1)
            }
        );
        // The 201st: 180 were rejected before it, 9 s at the full rate; retries count on a
        // share of it.
        assert_eq!(
            plan(0, Some(&h(201))).earliest,
            Duration::from_secs(1 + 9 * RETRY_SHARE as u64)
        );
        // Rejected again, the same count brings the same turn, with a wider spread.
        let (first, again) = (plan(0, Some(&h(201))), plan(2, Some(&h(201))));
        assert_eq!(first.earliest, again.earliest);
        assert_eq!(again.spread, first.spread * 3);
    }

    #[test]
    fn without_the_counts_the_spread_grows_with_each_attempt() {
        let h = Hint {
            reset_in: Duration::from_secs(1),
            queue: None,
        };
        let spreads: Vec<_> = (0..30).map(|a| plan(a, Some(&h)).spread).collect();
        assert_eq!(spreads[0], Duration::from_secs(SPREAD_PERIODS as u64));
        assert!(spreads.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(spreads[29], CAP);
        // A long period (GitLab's migration back-off answers Retry-After: 60) spreads over at
        // most CAP.
        let migration = Hint {
            reset_in: Duration::from_secs(60),
            queue: None,
        };
        assert_eq!(
            plan(0, Some(&migration)),
            Plan {
                earliest: Duration::from_secs(60),
                spread: CAP
            }
        );
    }

    #[test]
    fn pick_shrinks_the_spread_to_the_room_left() {
        let p = Plan {
            earliest: Duration::from_secs(5),
            spread: Duration::from_secs(10),
        };
        assert_eq!(
            p.pick(u64::MAX, Duration::from_secs(100)),
            Some(Duration::from_secs(5) + uniform(Duration::from_secs(10), u64::MAX))
        );
        for r in [0, 1, 4000, u64::MAX] {
            let w = p.pick(r, Duration::from_secs(7)).unwrap();
            assert!(w >= Duration::from_secs(5) && w <= Duration::from_secs(7));
        }
        assert_eq!(p.pick(0, Duration::from_secs(4)), None);
    }
}
