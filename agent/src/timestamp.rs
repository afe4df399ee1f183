//! Every date-time the agent receives, read in one place and with one library (jiff): AWS's
//! notice times, GitLab's `token_expires_at` and HTTP dates, GCE's `google-ssh` `expireOn`.
//! Pure: text in, `SystemTime` out, `None` for anything that is not a date of the expected form
//! (the caller decides what an unreadable date means: a notice that is no notice, a token whose
//! expiry is not checked, a key that counts as expired).
//!
//! Offsets are honoured as written (`+01:00` is an hour ahead of UTC); a date outside what
//! `SystemTime` holds is unreadable.

use std::time::{Duration, SystemTime};

use jiff::civil::DateTime;
use jiff::fmt::temporal::Pieces;

/// RFC 3339 offsets are at most 23:59 either way (jiff reads up to 25:59:59).
const MAX_OFFSET: i32 = 24 * 3600 - 1;

/// `civil`, a local time `offset` seconds east of UTC, as a `SystemTime`. Civil arithmetic,
/// so every date jiff's civil types hold (years 1 to 9999, beyond `jiff::Timestamp`'s span)
/// is read; what `SystemTime` cannot hold is `None`.
fn at_offset(civil: DateTime, offset: i32) -> Option<SystemTime> {
    if offset.abs() > MAX_OFFSET {
        return None;
    }
    const EPOCH: DateTime = jiff::civil::date(1970, 1, 1).at(0, 0, 0, 0);
    let since = civil
        .duration_since(EPOCH)
        .checked_sub(jiff::SignedDuration::from_secs(i64::from(offset)))?;
    let magnitude: Duration = since.unsigned_abs();
    if since.is_negative() {
        SystemTime::UNIX_EPOCH.checked_sub(magnitude)
    } else {
        SystemTime::UNIX_EPOCH.checked_add(magnitude)
    }
}

/// A date, a time and maybe an offset (`default_offset` when there is none), as jiff's
/// RFC 3339 / ISO 8601 parser reads them: `T`, `t` or a space between date and time, a
/// fraction of a second, `Z`, `±hh:mm`, `±hhmm` or `±hh`. A bare date, a zone name without an
/// offset, or anything after the text is unreadable.
fn parse_iso(text: &str, default_offset: Option<i32>) -> Option<SystemTime> {
    let pieces = Pieces::parse(text.trim()).ok()?;
    let time = pieces.time()?;
    let offset = match pieces.to_numeric_offset() {
        Some(offset) => offset.seconds(),
        None if pieces.time_zone_annotation().is_some() => return None,
        None => default_offset?,
    };
    at_offset(pieces.date().to_datetime(time), offset)
}

/// An RFC 3339 / ISO 8601 instant with its offset: `2026-12-01T10:00:00.123Z`,
/// `2026-12-01T11:00:00.123+01:00`, `...+0100`, `...+01`, `t` or a space for `T`. GitLab's
/// `token_expires_at` (Rails renders times in the instance's zone). A date without an offset is
/// not an instant: unreadable.
pub fn instant(text: &str) -> Option<SystemTime> {
    parse_iso(text, None)
}

/// `instant`, or a date and time without an offset read as UTC: AWS's instance metadata writes
/// its notice times in UTC (`2026-11-30T17:02:00Z`), and a `Z` left out by a proxy or an older
/// service must not turn a real notice into noise.
pub fn instant_utc_by_default(text: &str) -> Option<SystemTime> {
    parse_iso(text, Some(0))
}

/// An HTTP date (`Retry-After`, GitLab's `RateLimit-ResetTime`), in the three forms RFC 9110
/// section 5.6.7 says a recipient must accept: IMF-fixdate `Sun, 06 Nov 1994 08:49:37 GMT`
/// (what Rails and Rack::Attack send), the obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT`
/// and asctime `Sun Nov  6 08:49:37 1994`; all in GMT.
pub fn http_date(text: &str) -> Option<SystemTime> {
    // One space between words: asctime pads a one-digit day with a second one ("Nov  6").
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    [
        "%a, %d %b %Y %H:%M:%S GMT",
        "%A, %d-%b-%y %H:%M:%S GMT",
        "%a %b %d %H:%M:%S %Y",
    ]
    .iter()
    .find_map(|format| {
        let civil = jiff::fmt::strtime::parse(format, &text)
            .ok()?
            .to_datetime()
            .ok()?;
        at_offset(civil, 0)
    })
}

/// GCE's `google-ssh` `expireOn`, in exactly the two forms Google's guest agent reads
/// (`CheckExpired` in GoogleCloudPlatform/guest-agent `utils/ssh.go` and
/// google-guest-agent `internal/utils/ssh/ssh.go`): Go's `time.RFC3339`
/// (`2026-11-30T18:00:00Z`, `2026-11-30T18:00:00-02:30`) and `2006-01-02T15:04:05-0700`
/// (`2026-11-30T18:00:00+0000`, what gcloud and the Cloud console write and Google's "Add SSH
/// keys to VMs" documents), each with an optional fraction of a second after the seconds (Go
/// reads one where the layout has none). Anything else is `None`: the guest agent treats such
/// a key as expired.
pub fn gce_expire_on(text: &str) -> Option<SystemTime> {
    // Go parses the value as it is: no white space, an upper-case `T`, two-digit fields.
    let b = text.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let shape = digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
        && b.get(10) == Some(&b'T')
        && digits(11..13)
        && b.get(13) == Some(&b':')
        && digits(14..16)
        && b.get(16) == Some(&b':')
        && digits(17..19);
    if !shape {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let n = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 9 {
            return None;
        }
        rest = &fraction[n..];
    }
    // The zone: `Z` or `±hh:mm` (RFC 3339), or `±hhmm` (the second layout, which has no `Z`).
    let zone_ok = match rest.as_bytes() {
        [b'Z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] | [b'+' | b'-', h1, h2, m1, m2] => {
            let all_digits = [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit());
            // Go refuses an offset of 24 hours or more, or 60 minutes or more.
            all_digits && (*h1 - b'0') * 10 + (*h2 - b'0') < 24 && *m1 < b'6'
        }
        _ => false,
    };
    // Go refuses a 60th second; jiff would read it as the 59th.
    if !zone_ok || &text[17..19] == "60" {
        return None;
    }
    instant(text)
}

/// A time as the agent writes it (status.json, `status`, messages): RFC 3339 in UTC, to the
/// millisecond.
pub fn fmt_time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

pub mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::fmt_time(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(D::Error::custom)
    }
}

pub mod rfc3339_opt {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use std::time::SystemTime;

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&super::fmt_time(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => humantime::parse_rfc3339(&text)
                .map(Some)
                .map_err(D::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn utc(text: &str) -> SystemTime {
        humantime::parse_rfc3339(text).unwrap()
    }

    #[test]
    fn instants_with_every_offset_form() {
        let at = utc("2026-12-01T10:00:00.123Z");
        for text in [
            "2026-12-01T10:00:00.123Z",
            "2026-12-01T11:00:00.123+01:00",
            "2026-12-01T05:30:00.123-04:30",
            "2026-12-01T11:00:00.123+0100",
            "2026-12-01t10:00:00.123z",
            " 2026-12-01 10:00:00.123Z\n",
        ] {
            assert_eq!(instant(text), Some(at), "{text:?}");
        }
        // Far past and far future.
        assert_eq!(
            instant("1970-01-01T00:00:00Z"),
            Some(SystemTime::UNIX_EPOCH)
        );
        assert_eq!(
            instant("9999-12-31T23:59:59Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_799))
        );
        assert_eq!(
            instant("1969-12-31T23:59:59Z"),
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(1))
        );
        for garbage in [
            "",
            "soon",
            "2026-12-01",
            "2026-13-01T10:00:00Z",
            "2026-02-30T10:00:00Z",
            "2026-12-01T24:00:01Z",
            "2026-12-01T10:00:00+26:00",
            "2026-12-01T10:00:00+1",
            "2026-12-01T10:00:00",
            "1700000000",
            "2026-12-01T10:00:00.000Zjunk",
        ] {
            assert_eq!(instant(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn aws_times_without_an_offset_are_utc() {
        let at = utc("2026-11-30T17:02:00Z");
        assert_eq!(instant_utc_by_default("2026-11-30T17:02:00Z"), Some(at));
        assert_eq!(instant_utc_by_default("2026-11-30T17:02:00"), Some(at));
        assert_eq!(instant_utc_by_default("2026-11-30 17:02:00"), Some(at));
        assert_eq!(
            instant_utc_by_default("2026-11-30T18:02:00+01:00"),
            Some(at)
        );
        assert_eq!(instant_utc_by_default("2026-11-30T17:02:00+99:00"), None);
        assert_eq!(instant_utc_by_default("in two minutes"), None);
    }

    #[test]
    fn http_dates_in_the_three_forms() {
        let at = utc("1994-11-06T08:49:37Z");
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(at));
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(at));
        assert_eq!(http_date("Sun Nov  6 08:49:37 1994"), Some(at));
        assert_eq!(
            http_date(" Sun, 22 Nov 2026 10:00:00 GMT "),
            Some(utc("2026-11-22T10:00:00Z"))
        );
        for garbage in ["", "120", "tomorrow", "Sun, 32 Nov 1994 08:49:37 GMT"] {
            assert_eq!(http_date(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn gce_expire_on_reads_what_the_guest_agent_reads() {
        let at = |s: &str| gce_expire_on(s).map(|t| humantime::format_rfc3339(t).to_string());
        let cases = [
            ("2026-11-30T18:00:00+0000", "2026-11-30T18:00:00Z"),
            ("2026-11-30T18:00:00+0100", "2026-11-30T17:00:00Z"),
            ("2026-11-30T18:00:00-0230", "2026-11-30T20:30:00Z"),
            ("2026-11-30T18:00:00Z", "2026-11-30T18:00:00Z"),
            ("2026-11-30T18:00:00+05:30", "2026-11-30T12:30:00Z"),
            ("2026-11-30T18:00:00-02:30", "2026-11-30T20:30:00Z"),
            ("2026-11-30T18:00:00.5Z", "2026-11-30T18:00:00.500000000Z"),
            (
                "2026-11-30T18:00:00.123456789+0000",
                "2026-11-30T18:00:00.123456789Z",
            ),
            ("2020-04-23T12:34:56+0000", "2020-04-23T12:34:56Z"),
            ("2095-04-23T12:34:56+0000", "2095-04-23T12:34:56Z"),
        ];
        for (text, expected) in cases {
            assert_eq!(at(text).as_deref(), Some(expected), "{text:?}");
        }
        for garbage in [
            "",
            "soon",
            "never",
            "2026-11-30",
            "2026-11-30T18:00:00",
            "2026-11-30T18:00:00+01",
            "2026-11-30T18:00:00+01000",
            "2026-11-30T18:00:00+24:00",
            "2026-11-30T18:00:00+0060",
            "2026-11-30T18:00:00z",
            "2026-11-30t18:00:00Z",
            "2026-11-30 18:00:00Z",
            " 2026-11-30T18:00:00Z",
            "2026-11-30T18:00:00Z ",
            "2026-11-30T18:00:60Z",
            "2026-13-30T18:00:00Z",
            "2026-02-30T18:00:00Z",
            "2026-11-30T18:00:00.Z",
            "2026-11-30T18:00:00+00:00:00",
            "11/30/2026",
            "1764525600",
            "2026-11-30T18:00:00Zjunk",
        ] {
            assert_eq!(at(garbage), None, "{garbage:?}");
        }
    }
}
