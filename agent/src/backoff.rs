//! Retry timing: exponential back-off with full jitter, and GitLab's own hints (`Retry-After`,
//! `RateLimit-ResetTime`). Pure functions; the caller supplies the random number and the clock.

use std::time::{Duration, SystemTime};

pub const BASE: Duration = Duration::from_secs(1);
pub const CAP: Duration = Duration::from_secs(60);

/// The wait before retry number `attempt` (0 for the first retry): a uniformly random duration
/// in `[0, min(CAP, BASE * 2^attempt)]` ("full jitter"), so a fleet of VMs that failed together
/// does not retry together. `random` is any uniformly distributed u64.
pub fn full_jitter(attempt: u32, random: u64) -> Duration {
    let ceiling = BASE
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(CAP)
        .min(CAP);
    let millis = ceiling.as_millis() as u64;
    Duration::from_millis(random % (millis + 1))
}

/// The server's own answer to "when may I retry?", if it gave one. `RateLimit-ResetTime` (an
/// HTTP date) wins over `Retry-After` (seconds, or an HTTP date), as in gitlab-runner.
pub fn server_hint(
    retry_after: Option<&str>,
    ratelimit_reset_time: Option<&str>,
    now: SystemTime,
) -> Option<Duration> {
    let until = |date: &str| {
        httpdate::parse_http_date(date.trim())
            .ok()
            .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
    };
    if let Some(wait) = ratelimit_reset_time.and_then(until) {
        return Some(wait);
    }
    let value = retry_after?.trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => until(value),
    }
}

/// The wait before the next attempt: the server's hint when there is one, otherwise jittered
/// exponential back-off.
pub fn next_wait(attempt: u32, hint: Option<Duration>, random: u64) -> Duration {
    hint.unwrap_or_else(|| full_jitter(attempt, random))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let now = SystemTime::UNIX_EPOCH;
        assert_eq!(
            server_hint(Some("60"), None, now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            server_hint(Some(" 2 "), None, now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(server_hint(None, None, now), None);
        assert_eq!(server_hint(Some("soon"), None, now), None);
    }

    #[test]
    fn retry_after_http_date_and_ratelimit_reset_time() {
        let now = httpdate::parse_http_date("Sun, 22 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(
            server_hint(Some("Sun, 22 Nov 2026 10:00:30 GMT"), None, now),
            Some(Duration::from_secs(30))
        );
        // RateLimit-ResetTime wins over Retry-After.
        assert_eq!(
            server_hint(Some("60"), Some("Sun, 22 Nov 2026 10:00:05 GMT"), now),
            Some(Duration::from_secs(5))
        );
        // A reset time in the past means "now".
        assert_eq!(
            server_hint(None, Some("Sun, 22 Nov 2026 09:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        // An unparsable reset time falls back to Retry-After.
        assert_eq!(
            server_hint(Some("7"), Some("garbage"), now),
            Some(Duration::from_secs(7))
        );
    }

    #[test]
    fn next_wait_prefers_the_hint() {
        assert_eq!(
            next_wait(5, Some(Duration::from_secs(3)), 0),
            Duration::from_secs(3)
        );
        assert_eq!(next_wait(3, None, 8000), Duration::from_secs(8));
    }
}
