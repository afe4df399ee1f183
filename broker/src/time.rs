//! Wall-clock seconds and the one date format the broker writes.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `1970-01-02T00:00:00Z` for 86400: the form GitLab takes for `token_expires_at`.
pub fn iso8601(unix: u64) -> String {
    jiff::Timestamp::from_second(unix as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_utc_iso8601() {
        assert_eq!(super::iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::iso8601(1_709_210_096), "2024-02-29T12:34:56Z");
    }
}
