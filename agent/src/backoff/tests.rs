//! The back-off rules on fixed numbers: full jitter, every header form and the latest of them,
//! the floor, the reset, the throttle's period read from the reset, turns in a throttle's queue
//! (first and after a rejected turn), the spread without the counts, and how a plan fits the
//! room left.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;

fn fresh(attempt: u32, hint: Option<&Hint>) -> Plan {
    plan(attempt, hint, &mut Memory::default())
}

/// The random part of the wait without a hint.
fn full_jitter(attempt: u32, random: u64) -> Duration {
    fresh(attempt, None).pick(random, Duration::MAX).unwrap() - MIN_WAIT
}

fn hint(h: &Headers<'_>) -> Option<Hint> {
    server_hint(h, UNIX_EPOCH)
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

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// GitLab's 429 for the c-th request of a window of `limit` per `period_s` seconds, `elapsed`
/// into the window that ends at the Unix second `reset_at`.
fn gitlab(observed: u64, limit: u64, period_s: u64, reset_at: u64, elapsed: Duration) -> Hint {
    Hint {
        reset_in: secs(period_s) - elapsed,
        reset_at: Some(reset_at),
        retry_after_s: u32::try_from(period_s - elapsed.as_secs()).ok(),
        queue: Some(Queue {
            observed,
            limit_per_minute: (limit * 60).div_ceil(period_s),
        }),
    }
}

/// A reset second that 6 divides, and no number from 7 to 11 does: 1,765,000,806 = 6 × 294,166,801.
const RESET_6: u64 = 1_765_000_806;

#[test]
fn jitter_stays_within_the_doubling_ceiling() {
    assert_eq!(
        full_jitter(0, u64::MAX),
        Duration::from_millis(u64::MAX % 1001)
    );
    for attempt in 0..10 {
        let ceiling = secs(1 << attempt).min(CAP);
        for r in [0, 1, 999, 12_345, u64::MAX / 3, u64::MAX] {
            assert!(full_jitter(attempt, r) <= ceiling, "attempt {attempt}");
        }
    }
    assert_eq!(full_jitter(0, 0), Duration::ZERO);
    assert_eq!(full_jitter(3, 8000), secs(8));
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
            reset_in: secs(60),
            reset_at: None,
            retry_after_s: Some(60),
            queue: None
        })
    );
    assert_eq!(reset_in(&retry_after(" 2 "), UNIX_EPOCH), Some(secs(2)));
    assert_eq!(hint(&Headers::default()), None);
    for garbage in ["soon", "-5", "1.5", "", "30s", "<html>429</html>"] {
        assert_eq!(hint(&retry_after(garbage)), None, "{garbage:?}");
    }
}

#[test]
fn the_latest_of_the_three_resets_wins() {
    let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
    let unix = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(
        reset_in(&retry_after("Sun, 22 Nov 2026 10:00:30 GMT"), now),
        Some(secs(30))
    );
    let (in_5, in_9) = ((unix + 5).to_string(), (unix + 9).to_string());
    let all = |after, reset, reset_time| Headers {
        retry_after: Some(after),
        ratelimit_reset: Some(reset),
        ratelimit_reset_time: Some(reset_time),
        ..Headers::default()
    };
    // Each of the three can be the latest.
    let date_5 = "Sun, 22 Nov 2026 10:00:05 GMT";
    let date_9 = "Sun, 22 Nov 2026 10:00:09 GMT";
    assert_eq!(reset_in(&all("7", &in_5, date_5), now), Some(secs(7)));
    assert_eq!(reset_in(&all("2", &in_9, date_5), now), Some(secs(9)));
    assert_eq!(reset_in(&all("2", &in_5, date_9), now), Some(secs(9)));
    // A reset in the past counts as now (the floor comes later, in `plan`); one that cannot be
    // read is left out.
    let past = "Sun, 22 Nov 2026 09:00:00 GMT";
    assert_eq!(reset_in(&all("0", "1700000000", past), now), Some(secs(0)));
    assert_eq!(reset_in(&all("7", "-3", "garbage"), now), Some(secs(7)));
    assert_eq!(reset_in(&all("soon", "x", date_5), now), Some(secs(5)));
    // RateLimit-Reset alone, as GitLab's Unix time or as the IETF draft's seconds.
    let reset = |v| Headers {
        ratelimit_reset: Some(v),
        ..Headers::default()
    };
    assert_eq!(reset_in(&reset(&in_9), now), Some(secs(9)));
    assert_eq!(reset_in(&reset("42"), now), Some(secs(42)));
    // The absolute reset is kept for the period; Retry-After alone has none.
    assert_eq!(
        server_hint(&reset(&in_9), now).unwrap().reset_at,
        Some(unix + 9)
    );
    let date_only = Headers {
        ratelimit_reset_time: Some(date_5),
        ..Headers::default()
    };
    assert_eq!(
        server_hint(&date_only, now).unwrap().reset_at,
        Some(unix + 5)
    );
    assert_eq!(server_hint(&retry_after("3"), now).unwrap().reset_at, None);
}

#[test]
fn absurd_hints_are_clamped() {
    let now = UNIX_EPOCH;
    assert_eq!(
        reset_in(&retry_after("18446744073709551615"), now),
        Some(MAX_HINT)
    );
    let far = Headers {
        ratelimit_reset_time: Some("Fri, 31 Dec 9999 23:59:59 GMT"),
        ratelimit_reset: Some("18446744073709551615"),
        ..Headers::default()
    };
    assert_eq!(reset_in(&far, now), Some(MAX_HINT));
    // And a plan made from them stays within MAX_HINT, whatever the counts say.
    let huge = Hint {
        reset_in: MAX_HINT,
        reset_at: Some(u64::MAX),
        retry_after_s: None,
        queue: Some(Queue {
            observed: u64::MAX,
            limit_per_minute: 1,
        }),
    };
    let mut memory = Memory::default();
    for attempt in [0, 1, u32::MAX] {
        let p = plan(attempt, Some(&huge), &mut memory);
        assert!(p.earliest <= MAX_HINT && p.spread <= CAP, "{p:?}");
        assert!(p.pick(u64::MAX, Duration::MAX).unwrap() <= MAX_HINT + CAP);
    }
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
        (Some("0"), Some("60")),
        (Some("-5"), Some("60")),
        (Some("5"), Some("many")),
    ] {
        let h = Headers {
            retry_after: Some("1"),
            ratelimit_observed: observed,
            ratelimit_limit: limit,
            ..Headers::default()
        };
        assert_eq!(hint(&h).unwrap().queue, None, "{observed:?} {limit:?}");
    }
}

#[test]
fn no_wait_is_shorter_than_the_floor() {
    for h in [
        None,
        Some(Hint {
            reset_in: Duration::ZERO,
            reset_at: None,
            retry_after_s: None,
            queue: None,
        }),
        Some(Hint {
            reset_in: Duration::ZERO,
            reset_at: Some(0),
            retry_after_s: None,
            queue: Some(Queue {
                observed: 1,
                limit_per_minute: 60,
            }),
        }),
    ] {
        let mut memory = Memory::default();
        for attempt in [0, 1, 5] {
            let p = plan(attempt, h.as_ref(), &mut memory);
            assert!(p.not_before >= MIN_WAIT && p.earliest >= MIN_WAIT, "{h:?}");
            assert!(p.spread > Duration::ZERO, "{h:?}: no jitter");
            for r in [0, 7, u64::MAX] {
                assert!(p.pick(r, secs(300)).unwrap() >= MIN_WAIT);
            }
        }
    }
}

#[test]
fn never_before_the_reset_whatever_the_counts() {
    for reset in [1, 3, 60, 3600] {
        for queue in [
            None,
            Some(Queue {
                observed: 1,
                limit_per_minute: 60,
            }),
            Some(Queue {
                observed: 10_000,
                limit_per_minute: 1,
            }),
        ] {
            let h = Hint {
                reset_in: secs(reset),
                reset_at: Some(RESET_6),
                retry_after_s: None,
                queue,
            };
            let mut memory = Memory::default();
            for attempt in 0..5 {
                let p = plan(attempt, Some(&h), &mut memory);
                for (r, room) in [
                    (0, Duration::MAX),
                    (u64::MAX, Duration::MAX),
                    (1, secs(reset)),
                ] {
                    let wait = p.pick(r, room).unwrap();
                    assert!(wait >= secs(reset), "{wait:?} < {reset} s");
                }
                assert_eq!(p.pick(0, secs(reset) - Duration::from_millis(1)), None);
            }
        }
    }
}

#[test]
fn the_period_is_the_smallest_divisor_of_the_reset_at_least_the_longest_wait() {
    let at = |reset_in: Duration, reset_at| Hint {
        reset_in,
        reset_at,
        retry_after_s: None,
        queue: None,
    };
    let mut m = Memory::default();
    // 5.2 s to a reset that 6 divides: 6.
    assert_eq!(m.period(&at(Duration::from_millis(5200), Some(RESET_6))), 6);
    // Later, 0.3 s before a reset: still 6, the longest wait seen counts.
    assert_eq!(
        m.period(&at(Duration::from_millis(300), Some(RESET_6 + 6))),
        6
    );
    // Alone, 0.3 s before a reset that 6 divides: 1 divides it too (a shorter guess only makes
    // turns later).
    assert_eq!(
        Memory::default().period(&at(Duration::from_millis(300), Some(RESET_6))),
        1
    );
    // An hourly window, 3,550 s before its reset: 3,600 divides 1,765,000,800 and nothing from
    // 3,550 up does before it.
    assert_eq!(
        Memory::default().period(&at(secs(3550), Some(1_765_000_800))),
        3600
    );
    // Without an absolute reset, or with one no number up to an hour divides: the wait.
    assert_eq!(
        Memory::default().period(&at(Duration::from_millis(4100), None)),
        5
    );
    assert_eq!(
        Memory::default().period(&at(secs(5), Some(1_000_000_007))),
        5
    );
    assert_eq!(Memory::default().period(&at(secs(5), Some(0))), 5);
}

#[test]
fn a_rejected_client_takes_its_turn_after_the_rejected_before_it() {
    // 50 per 6 s (500 per minute), 0.5 s into the window.
    let h = |observed| gitlab(observed, 50, 6, RESET_6, Duration::from_millis(500));
    // The 51st: the first one rejected, right at the reset, within one request's share of the
    // rate (0.12 s).
    assert_eq!(
        fresh(0, Some(&h(51))),
        Plan {
            not_before: Duration::from_millis(5500),
            earliest: Duration::from_millis(5500),
            spread: Duration::from_millis(120),
        }
    );
    // The 251st: 200 rejected before it, each to make two requests at 500 per minute: 48 s.
    let p = fresh(0, Some(&h(251)));
    assert_eq!(p.earliest, Duration::from_millis(5500 + 48_000));
    assert_eq!(p.not_before, Duration::from_millis(5500));
    // Turns next to each other are one request's share apart at most twice: they interleave.
    let next = fresh(0, Some(&h(252)));
    assert_eq!(next.earliest - p.earliest, Duration::from_millis(240));
}

#[test]
fn a_client_whose_turn_was_rejected_goes_further() {
    let mut memory = Memory::default();
    let first = plan(
        0,
        Some(&gitlab(251, 50, 6, RESET_6, Duration::from_millis(500))),
        &mut memory,
    );
    let first_turn = first.earliest - Duration::from_millis(5500);
    assert_eq!(first_turn, secs(48));
    // At its turn, 9 windows later, the 71st of its window, 5.9 s into it: 20 rejected before
    // it counted at four requests each (9.6 s) and a quarter of its first turn (12 s).
    let again = plan(
        1,
        Some(&gitlab(
            71,
            50,
            6,
            RESET_6 + 54,
            Duration::from_millis(5900),
        )),
        &mut memory,
    );
    assert_eq!(again.not_before, Duration::from_secs(1));
    assert_eq!(
        again.earliest,
        secs(1) + Duration::from_millis(9600) + first_turn / 4
    );
    // Rejected right after the limit: a quarter of its first turn, no more.
    let mut memory = Memory::default();
    plan(
        0,
        Some(&gitlab(251, 50, 6, RESET_6, Duration::ZERO)),
        &mut memory,
    );
    let p = plan(
        1,
        Some(&gitlab(51, 50, 6, RESET_6, Duration::ZERO)),
        &mut memory,
    );
    assert_eq!(p.earliest, secs(6) + secs(12));
}

#[test]
fn without_the_counts_the_spread_grows_with_each_throttled_answer() {
    let h = Hint {
        reset_in: Duration::from_millis(5200),
        reset_at: Some(RESET_6),
        retry_after_s: None,
        queue: None,
    };
    let mut memory = Memory::default();
    let plans: Vec<_> = (0..5).map(|a| plan(a, Some(&h), &mut memory)).collect();
    // Four periods of 6 s per throttled answer, at most 40 s, all from the reset.
    assert_eq!(plans[0].spread, secs(24));
    assert_eq!(plans[1].spread, BLIND_SPREAD_CAP);
    assert!(
        plans
            .iter()
            .all(|p| p.earliest == Duration::from_millis(5200))
    );
    assert!(plans.iter().all(|p| p.spread <= BLIND_SPREAD_CAP));
    // GitLab's migration back-off answers Retry-After: 60 alone: it spreads over at most 40 s.
    let migration = Hint {
        reset_in: secs(60),
        reset_at: None,
        retry_after_s: None,
        queue: None,
    };
    assert_eq!(
        fresh(0, Some(&migration)),
        Plan {
            not_before: secs(60),
            earliest: secs(60),
            spread: BLIND_SPREAD_CAP
        }
    );
}

#[test]
fn pick_shrinks_the_spread_to_the_room_left_and_moves_a_late_turn_back() {
    let p = Plan {
        not_before: secs(2),
        earliest: secs(5),
        spread: secs(10),
    };
    assert_eq!(
        p.pick(u64::MAX, secs(100)),
        Some(secs(5) + uniform(secs(10), u64::MAX))
    );
    for r in [0, 1, 4000, u64::MAX] {
        let w = p.pick(r, secs(7)).unwrap();
        assert!(w >= secs(5) && w <= secs(7));
    }
    // A turn beyond the room: one try at its end rather than none; never before the reset.
    assert_eq!(p.pick(12_345, secs(4)), Some(secs(4)));
    assert_eq!(p.pick(0, secs(2)), Some(secs(2)));
    assert_eq!(p.pick(0, Duration::from_millis(1999)), None);
}

#[test]
fn every_answer_gives_a_wait_between_its_reset_and_its_bounds() {
    // A sweep of plausible and odd header combinations, through the parser and the plan.
    let now = UNIX_EPOCH + secs(RESET_6 - 4);
    let values = [
        None,
        Some("0"),
        Some("4"),
        Some("-1"),
        Some("999999999999"),
        Some("1765000806"),
        Some("Sun, 22 Nov 2026 10:00:05 GMT"),
        Some("<html><body>Retry later</body></html>"),
    ];
    let counts = [None, Some("1"), Some("51"), Some("100000"), Some("x")];
    for after in values {
        for reset in values {
            for observed in counts {
                let headers = Headers {
                    retry_after: after,
                    ratelimit_reset: reset,
                    ratelimit_reset_time: None,
                    ratelimit_observed: observed,
                    ratelimit_limit: Some("500"),
                };
                let h = server_hint(&headers, now);
                let mut memory = Memory::default();
                for attempt in 0..3 {
                    let p = plan(attempt, h.as_ref(), &mut memory);
                    let wait = p.pick(attempt as u64 * 7919, Duration::MAX).unwrap();
                    let reset = h.map_or(Duration::ZERO, |h| h.reset_in);
                    assert!(wait >= reset.max(MIN_WAIT), "{headers:?}: {wait:?}");
                    assert!(wait <= MAX_HINT + CAP, "{headers:?}: {wait:?}");
                }
            }
        }
    }
}

/// The period after each of `answers`, in one call's memory.
fn periods(answers: &[Hint]) -> Vec<u64> {
    let mut memory = Memory::default();
    answers.iter().map(|h| memory.period(h)).collect()
}

/// A 429 of a window of `period_s` seconds that ends at `reset_at`, answered `retry_after_s`
/// before it (as `Retry-After`), with the counts when `observed` is not 0.
fn answer(reset_at: u64, retry_after_s: u64, observed: u64, limit_per_minute: u64) -> Hint {
    Hint {
        reset_in: secs(retry_after_s),
        reset_at: Some(reset_at),
        retry_after_s: u32::try_from(retry_after_s).ok(),
        queue: (observed > 0).then_some(Queue {
            observed,
            limit_per_minute,
        }),
    }
}

#[test]
fn two_resets_a_window_apart_give_the_period() {
    // 7 s windows; a reset that 2 and 7 divide, and 3, 4 and 5 do not.
    let first: u64 = 1_765_000_006;
    assert_eq!(
        [2, 3, 4, 5, 7].map(|d| first.is_multiple_of(d)),
        [true, false, false, false, true]
    );
    // 1 s before the first reset: 1 and 2 divide it, so alone it says 1.
    assert_eq!(periods(&[answer(first, 1, 0, 0)]), [1]);
    // The next window's reset, 7 s later, shares only 7 (and 1) with it: 7 from then on.
    assert_eq!(
        periods(&[answer(first, 1, 0, 0), answer(first + 7, 2, 0, 0)]),
        [1, 7]
    );
    // Two windows later: their greatest common divisor is 7 × gcd(m, m + 2), 7 or 14; at
    // least the longest wait (5 s) and dividing both: 7.
    assert_eq!(
        periods(&[answer(first, 5, 0, 0), answer(first + 14, 1, 0, 0)]),
        [7, 7]
    );
}

#[test]
fn retry_after_bounds_the_period_whatever_the_clocks() {
    // A 5 s window whose reset 1,765,000,010 that 10 divides too. The agent's clock is 3 s
    // behind GitLab's: the absolute reset looks 8 s away, Retry-After says 5.
    let skewed = Hint {
        reset_in: secs(8),
        reset_at: Some(1_765_000_010),
        retry_after_s: Some(5),
        queue: None,
    };
    assert_eq!(periods(&[skewed]), [5]);
    // Without Retry-After the wait is all there is, and 10 is the smallest divisor above 8.
    assert_eq!(
        periods(&[Hint {
            retry_after_s: None,
            ..skewed
        }]),
        [10]
    );
}

#[test]
fn the_counts_bound_the_period_and_the_rate_rules_periods_out() {
    // 50 per 6 s: 500 per minute, at a reset that 2, 3, 6, 9 and 18 divide, and 4 and 5 do
    // not.
    let reset: u64 = 1_765_000_026;
    assert_eq!(
        [2, 3, 4, 5, 6, 9, 18].map(|d| reset.is_multiple_of(d)),
        [true, true, false, false, true, true, true]
    );
    // Alone (no counts): 1 divides it.
    assert_eq!(periods(&[answer(reset, 1, 0, 0)]), [1]);
    // 500 per minute rules out 1 and 2 (no whole limit per window gives 500 rounded up), and
    // leaves 3 (25 per 3 s).
    assert_eq!(periods(&[answer(reset, 1, 200, 500)]), [3]);
    // The 51st: period × 499 < 60 × 50, so at most 6; with a wait of 4 s, 6 it is.
    assert_eq!(periods(&[answer(reset, 4, 51, 500)]), [6]);
    // The bound holds across answers, and a new rate starts it again.
    assert_eq!(
        periods(&[answer(reset, 4, 51, 500), answer(reset + 6, 4, 500, 500)]),
        [6, 6]
    );
    let mut memory = Memory::default();
    memory.period(&answer(reset, 4, 51, 500));
    assert_eq!(memory.period(&answer(reset + 6, 4, 300, 100)), 6);
}

#[test]
fn odd_and_hostile_headers_never_break_the_period() {
    let now = UNIX_EPOCH + secs(1_765_000_007);
    let period = |h: &Headers<'_>| {
        server_hint(h, now).map(|hint| {
            let mut memory = Memory::default();
            let p = memory.period(&hint);
            // And a plan is made from it, within its bounds.
            let plan = plan(0, Some(&hint), &mut memory);
            assert!(
                plan.not_before >= MIN_WAIT && plan.earliest <= MAX_HINT,
                "{h:?}"
            );
            p
        })
    };
    let gitlab = |after, reset, observed, limit| Headers {
        retry_after: Some(after),
        ratelimit_reset: Some(reset),
        ratelimit_reset_time: None,
        ratelimit_observed: Some(observed),
        ratelimit_limit: Some(limit),
    };
    // GitLab's own: 100 per 5 s, the 101st, 3 s before the reset.
    assert_eq!(period(&gitlab("3", "1765000010", "101", "1200")), Some(5));
    // Negative, non-numeric, fractional: left out, the rest still read.
    assert_eq!(period(&gitlab("-3", "1765000010", "101", "1200")), Some(5));
    assert_eq!(period(&gitlab("3", "-1765000010", "101", "1200")), Some(3));
    assert_eq!(period(&gitlab("3", "1765000010", "x", "1200")), Some(5));
    assert_eq!(period(&gitlab("3", "1765000010", "101", "-1")), Some(5));
    assert_eq!(period(&gitlab("3.5", "1765000010", "101", "1200")), Some(5));
    assert_eq!(period(&gitlab("3", "1765000010.0", "101", "1200")), Some(3));
    // Huge: a Retry-After beyond an hour is clamped to an hour, the wait and so the period
    // (the agent waits that hour anyway); a reset far in the future or a count or rate near
    // u64::MAX neither overflows nor panics.
    assert_eq!(
        period(&gitlab("99999999999", "1765000010", "101", "1200")),
        Some(3600)
    );
    let max = u64::MAX.to_string();
    assert!(period(&gitlab("3", &max, &max, &max)).unwrap() >= 3);
    assert!(period(&gitlab(&max, &max, "101", "1200")).unwrap() <= 3600);
    // A reset in the past still names a second the period divides; the wait is the floor.
    assert_eq!(period(&gitlab("0", "1765000000", "101", "1200")), Some(1));
    // Retry-After as an HTTP date: an absolute reset, 1,765,000,010 (3 s from now).
    let date = httpdate::fmt_http_date(UNIX_EPOCH + secs(1_765_000_010));
    let date_only = Headers {
        retry_after: Some(&date),
        ..Headers::default()
    };
    assert_eq!(
        server_hint(&date_only, now).unwrap().reset_at,
        Some(1_765_000_010)
    );
    assert_eq!(period(&date_only), Some(5));
    // A reset that nothing from 2 to 3,600 divides (not GitLab's): the wait.
    assert_eq!(period(&gitlab("3", "1765000007", "101", "1200")), Some(3));
    // Answers that contradict each other (a reset no candidate of the earlier ones divides):
    // start again from the latest.
    let mut memory = Memory::default();
    assert_eq!(memory.period(&answer(1_765_000_010, 5, 0, 0)), 5);
    assert_eq!(memory.period(&answer(1_765_000_013, 5, 0, 0)), 7);
}
