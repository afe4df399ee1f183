//! What an answer of the metadata service says: a notice, nothing, something to log, or
//! something that is not this endpoint's answer at all. Pure: the caller gives the body of a
//! 200 and the clock.

use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::{Notice, NoticeKind};

/// GCE stops a preempted VM about 30 s after `preempted` turns TRUE.
pub const GCE_PREEMPTION_WARNING: Duration = Duration::from_secs(30);
/// GCE changes `maintenance-event` 60 s before the maintenance starts.
pub const GCE_MAINTENANCE_WARNING: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Nothing is announced.
    Quiet,
    Notice(Notice),
    /// Worth one log line, not an action (a live migration: the VM keeps running).
    Info(&'static str),
    /// Not an answer this endpoint gives; never a notice. The text is safe to log.
    Unrecognised(String),
}

/// `GET /latest/meta-data/spot/instance-action` answered 200:
/// `{"action": "terminate|stop|hibernate", "time": "2026-11-30T17:02:00Z"}`.
pub fn aws_instance_action(body: &[u8], now: SystemTime) -> Reading {
    #[derive(Deserialize)]
    struct InstanceAction {
        action: String,
        time: String,
    }
    let Some(answer) = json::<InstanceAction>(body) else {
        return unrecognised(body);
    };
    let Some(time) = crate::timestamp::instant_utc_by_default(&answer.time) else {
        return unrecognised(body);
    };
    let action = match answer.action.as_str() {
        "terminate" => "terminate",
        "stop" => "stop",
        // Hibernation begins at once: no two-minute warning.
        "hibernate" => "hibernate",
        _ => return unrecognised(body),
    };
    let deadline = if action == "hibernate" {
        time.min(now)
    } else {
        time
    };
    Reading::Notice(Notice {
        platform: "aws".into(),
        kind: NoticeKind::SpotInterruption,
        detail: format!("{action} at {}", crate::timestamp::fmt_time(time)),
        received: now,
        deadline: Some(deadline),
    })
}

/// `GET /latest/meta-data/events/recommendations/rebalance` answered 200:
/// `{"noticeTime": "2026-11-30T17:00:00Z"}`.
pub fn aws_rebalance(body: &[u8], now: SystemTime) -> Reading {
    #[derive(Deserialize)]
    struct Rebalance {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let Some(answer) = json::<Rebalance>(body) else {
        return unrecognised(body);
    };
    let Some(time) = crate::timestamp::instant_utc_by_default(&answer.notice_time) else {
        return unrecognised(body);
    };
    Reading::Notice(Notice {
        platform: "aws".into(),
        kind: NoticeKind::RebalanceRecommendation,
        detail: format!("recommended at {}", crate::timestamp::fmt_time(time)),
        received: now,
        deadline: None,
    })
}

/// `GET /computeMetadata/v1/instance/preempted`: `TRUE` or `FALSE`.
pub fn gce_preempted(body: &[u8], now: SystemTime) -> Reading {
    match plain_value(body).as_deref() {
        Some("FALSE") => Reading::Quiet,
        Some("TRUE") => Reading::Notice(Notice {
            platform: "gce".into(),
            kind: NoticeKind::Preemption,
            detail: "instance/preempted TRUE".into(),
            received: now,
            deadline: Some(now + GCE_PREEMPTION_WARNING),
        }),
        _ => unrecognised(body),
    }
}

/// `GET /computeMetadata/v1/instance/maintenance-event`: `NONE`,
/// `MIGRATE_ON_HOST_MAINTENANCE` or `TERMINATE_ON_HOST_MAINTENANCE`.
pub fn gce_maintenance_event(body: &[u8], now: SystemTime) -> Reading {
    match plain_value(body).as_deref() {
        Some("NONE") => Reading::Quiet,
        Some("MIGRATE_ON_HOST_MAINTENANCE") => Reading::Info(
            "GCE live-migrates this VM in about 60 s (MIGRATE_ON_HOST_MAINTENANCE): jobs carry on",
        ),
        Some("TERMINATE_ON_HOST_MAINTENANCE") => Reading::Notice(Notice {
            platform: "gce".into(),
            kind: NoticeKind::HostMaintenance,
            detail: "TERMINATE_ON_HOST_MAINTENANCE".into(),
            received: now,
            deadline: Some(now + GCE_MAINTENANCE_WARNING),
        }),
        _ => unrecognised(body),
    }
}

/// An AWS answer's JSON, only when the whole body is UTF-8: serde_json checks the strings it
/// keeps but skips over the ones it ignores unchecked, so an answer with a mangled field
/// beside a well-formed `action` would otherwise be taken for a notice.
fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_str(std::str::from_utf8(body).ok()?).ok()
}

/// A bare value (`TRUE`, `NONE`), trimmed, optionally in double quotes (`?alt=json`).
fn plain_value(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?.trim();
    let text = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    Some(text.to_string())
}

fn unrecognised(body: &[u8]) -> Reading {
    Reading::Unrecognised(describe_body(body))
}

/// A body for the log: its size and, if it is text, its start, escaped and scrubbed.
pub fn describe_body(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Err(_) => format!("{} bytes, not UTF-8", body.len()),
        Ok(text) => {
            let start: String = text.chars().take(40).collect();
            let more = if start.len() < text.len() { "…" } else { "" };
            let shown = crate::secret::scrub(&start.escape_debug().to_string());
            format!("{} bytes: \"{shown}{more}\"", body.len())
        }
    }
}
