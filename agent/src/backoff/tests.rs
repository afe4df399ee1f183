//! The back-off rules on fixed numbers: full jitter, every header form, the floor, the reset,
//! turns in a throttle's queue, and how a plan fits the room left.

use std::time::{Duration, SystemTime};

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
