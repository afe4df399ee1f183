//! The runner token's expiry, from `token_expires_at` in GitLab's verify or create answer (ISO
//! 8601 with milliseconds, or null when it never expires). An expired token is refused with
//! 403 exactly like a deleted one, so a fleet whose token expires fails all at once; the
//! agent warns while there is time to rotate it, and refuses to start jobs with a token this
//! VM's clock says has expired.

use std::time::{Duration, SystemTime};

/// Warn when the token expires within this time, even in a VM without `max_lifetime`.
pub const WARN_WITHIN: Duration = Duration::from_secs(86_400);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// GitLab gave no expiry (null or no field).
    Never,
    /// Later than a day from now and than this VM's `max_lifetime`.
    Later(SystemTime),
    /// Within a day, or before this VM's `max_lifetime` ends: warn.
    Soon(SystemTime),
    Expired(SystemTime),
    /// Not a date: warned about, not a failure.
    Unreadable(String),
}

/// Judges `token_expires_at` as GitLab sent it, at `now`, for a VM that lives at most
/// `max_lifetime`.
pub fn judge(raw: Option<&str>, now: SystemTime, max_lifetime: Option<Duration>) -> Expiry {
    let Some(raw) = raw else {
        return Expiry::Never;
    };
    let Some(at) = parse(raw) else {
        return Expiry::Unreadable(raw.chars().take(60).collect());
    };
    let horizon = max_lifetime.unwrap_or_default().max(WARN_WITHIN);
    match at.duration_since(now) {
        Err(_) | Ok(Duration::ZERO) => Expiry::Expired(at),
        Ok(left) if left <= horizon => Expiry::Soon(at),
        Ok(_) => Expiry::Later(at),
    }
}

impl Expiry {
    pub fn at(&self) -> Option<SystemTime> {
        match self {
            Expiry::Later(at) | Expiry::Soon(at) | Expiry::Expired(at) => Some(*at),
            Expiry::Never | Expiry::Unreadable(_) => None,
        }
    }

    /// The warning for the journal, the console and status.json, if any.
    pub fn warning(&self, now: SystemTime) -> Option<String> {
        match self {
            Expiry::Soon(at) => {
                let left = at.duration_since(now).unwrap_or_default();
                Some(format!(
                    "the runner token expires at {} (in {}), within a day or this VM's max_lifetime; rotate it in GitLab (Settings > CI/CD > Runners) and update runner.json before the fleet's VMs are refused",
                    crate::timestamp::fmt_time(*at),
                    humantime::format_duration(Duration::from_secs(left.as_secs()))
                ))
            }
            Expiry::Unreadable(raw) => Some(format!(
                "GitLab's token_expires_at \"{raw}\" is not an ISO 8601 date: the token's expiry is not checked"
            )),
            _ => None,
        }
    }
}

/// `2026-12-01T10:00:00.000Z`, `2026-12-01T11:00:00.000+01:00` (Rails renders times in the
/// instance's time zone), with or without fractions: `timestamp::instant`.
pub fn parse(text: &str) -> Option<SystemTime> {
    crate::timestamp::instant(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn gitlabs_formats_parse() {
        let at = t("2026-12-01T10:00:00.123Z");
        assert_eq!(parse("2026-12-01T10:00:00.123Z"), Some(at));
        assert_eq!(parse("2026-12-01T11:00:00.123+01:00"), Some(at));
        assert_eq!(parse("2026-12-01T05:30:00.123-04:30"), Some(at));
        assert_eq!(parse("2026-12-01T11:00:00.123+0100"), Some(at));
        assert_eq!(
            parse("2026-12-01T10:00:00Z"),
            Some(t("2026-12-01T10:00:00Z"))
        );
        for garbage in [
            "",
            "soon",
            "2026-12-01",
            "2026-13-01T10:00:00Z",
            "2026-12-01T10:00:00+25:00",
            "2026-12-01T10:00:00+1",
            "1700000000",
            "2026-12-01T10:00:00.000Zjunk",
        ] {
            assert_eq!(parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn warn_within_a_day_or_the_vms_lifetime_fail_when_expired() {
        let now = t("2026-12-01T00:00:00Z");
        let hours = |h: u64| Some(Duration::from_secs(h * 3600));
        assert_eq!(judge(None, now, None), Expiry::Never);
        let in_2h = "2026-12-01T02:00:00.000Z";
        assert_eq!(judge(Some(in_2h), now, None), Expiry::Soon(t(in_2h)));
        let in_2d = "2026-12-03T00:00:00.000Z";
        assert_eq!(judge(Some(in_2d), now, None), Expiry::Later(t(in_2d)));
        // A VM that may live three days sees the same token expire within its life.
        assert_eq!(judge(Some(in_2d), now, hours(72)), Expiry::Soon(t(in_2d)));
        assert_eq!(judge(Some(in_2d), now, hours(1)), Expiry::Later(t(in_2d)));
        let past = "2026-11-30T23:59:59.000Z";
        assert_eq!(judge(Some(past), now, None), Expiry::Expired(t(past)));
        assert_eq!(
            judge(Some("2026-12-01T00:00:00.000Z"), now, None),
            Expiry::Expired(now)
        );
        assert_eq!(
            judge(Some("next week"), now, None),
            Expiry::Unreadable("next week".into())
        );
    }

    #[test]
    fn warnings_say_when_and_what_to_do() {
        let now = t("2026-12-01T00:00:00Z");
        let soon = judge(Some("2026-12-01T02:00:00.000Z"), now, None);
        let text = soon.warning(now).unwrap();
        assert!(text.contains("2026-12-01T02:00:00.000Z (in 2h)"), "{text}");
        assert!(text.contains("rotate it in GitLab"), "{text}");
        assert!(
            judge(Some("x"), now, None)
                .warning(now)
                .unwrap()
                .contains("\"x\"")
        );
        assert_eq!(judge(None, now, None).warning(now), None);
        let later = judge(Some("2027-01-01T00:00:00Z"), now, None);
        assert_eq!(later.warning(now), None);
        assert_eq!(later.at(), Some(t("2027-01-01T00:00:00Z")));
    }
}
