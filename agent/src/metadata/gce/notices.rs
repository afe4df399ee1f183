//! GCE's notices: `instance/preempted` and `instance/maintenance-event`, each a long poll
//! (`wait_for_change` from the last ETag).

use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metadata::notices::{self, REQUEST_TIMEOUT, WatchTask};
use crate::metadata::{Answer, MetadataClient};
use crate::preemption::{Complaints, Notice, NoticeKind, NoticeSender, Reading, next_wait, offer};

/// GCE stops a preempted VM about 30 s after `preempted` turns TRUE.
pub const PREEMPTION_WARNING: Duration = Duration::from_secs(30);
/// GCE changes `maintenance-event` 60 s before the maintenance starts.
pub const MAINTENANCE_WARNING: Duration = Duration::from_secs(60);
/// Between two requests for one notice key, whatever the server does (a service that ignores
/// `wait_for_change` must not turn the long poll into a busy loop).
pub const FLOOR: Duration = Duration::from_secs(1);
/// A long poll's `timeout_sec`.
pub const LONG_POLL_SECONDS: u64 = 300;
/// A long poll's answer may come this much after its `timeout_sec` before it is a failure.
const GRACE: Duration = Duration::from_secs(10);
/// A longer ETag is not used (the next long poll then waits for any change).
const MAX_ETAG: usize = 128;

pub(super) fn watch_notices(client: MetadataClient, tx: NoticeSender) -> WatchTask {
    Box::pin(watch(client, tx))
}

async fn watch(client: MetadataClient, tx: NoticeSender) {
    tokio::join!(
        watch_key(&client, "preempted", preempted, &tx),
        watch_key(&client, "maintenance-event", maintenance_event, &tx),
    );
}

/// The path of a notice key: its current value (`known` None), or a long poll that answers once
/// the value differs from the one `known` ETag stands for (without one: once it changes).
pub fn notice_path(key: &str, known: Option<Option<&str>>) -> String {
    let mut path = format!("/computeMetadata/v1/instance/{key}");
    if let Some(etag) = known {
        path.push_str(&format!(
            "?wait_for_change=true&timeout_sec={LONG_POLL_SECONDS}"
        ));
        if let Some(etag) = etag {
            path.push_str("&last_etag=");
            path.push_str(&query_escape(etag));
        }
    }
    path
}

/// `value` for a URL query: unreserved characters as they are, every other byte as `%XX`.
fn query_escape(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One notice key: its current value, then long polls from its ETag. Ends once the key
/// announced that the VM goes away (it has nothing more to say).
async fn watch_key(
    client: &MetadataClient,
    key: &'static str,
    read: fn(&[u8], SystemTime) -> Reading,
    tx: &watch::Sender<Option<Notice>>,
) {
    let endpoint: &'static str = match key {
        "preempted" => "GET /computeMetadata/v1/instance/preempted",
        _ => "GET /computeMetadata/v1/instance/maintenance-event",
    };
    let mut complaints = Complaints::new(endpoint);
    // Some(etag): the value it stands for is known, so the next request waits for a change.
    let mut known: Option<Option<String>> = None;
    let mut last_info: Option<&'static str> = None;
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let path = notice_path(key, known.as_ref().map(Option::as_deref));
        let timeout = match known {
            None => REQUEST_TIMEOUT,
            Some(_) => Duration::from_secs(LONG_POLL_SECONDS) + GRACE,
        };
        let ok = match client.get_answer(&path, timeout).await {
            Ok(Some(Answer { body, etag })) => {
                let etag = etag.filter(|e| e.len() <= MAX_ETAG);
                match read(&body, SystemTime::now()) {
                    Reading::Quiet => {
                        last_info = None;
                        known = Some(etag);
                        true
                    }
                    Reading::Notice(notice) => {
                        let goes_away = notice.vm_goes_away();
                        offer(tx, notice);
                        if goes_away {
                            return;
                        }
                        known = Some(etag);
                        true
                    }
                    Reading::Info(text) => {
                        if last_info != Some(text) {
                            tracing::info!("{text}");
                        }
                        last_info = Some(text);
                        known = Some(etag);
                        true
                    }
                    Reading::Unrecognised(detail) => {
                        complaints
                            .complain("unrecognised", || format!("something else ({detail})"));
                        false
                    }
                }
            }
            Ok(None) => {
                complaints.complain("status 404", || "HTTP 404".into());
                false
            }
            Err(e) => {
                notices::trouble(&mut complaints, &e);
                false
            }
        };
        if !ok {
            // After trouble the current value is read afresh, not waited on.
            known = None;
        }
        failures = if ok { 0 } else { failures + 1 };
        tokio::time::sleep_until(started + next_wait(FLOOR, failures)).await;
    }
}

/// `GET /computeMetadata/v1/instance/preempted`: `TRUE` or `FALSE`.
pub fn preempted(body: &[u8], now: SystemTime) -> Reading {
    match plain_value(body).as_deref() {
        Some("FALSE") => Reading::Quiet,
        Some("TRUE") => Reading::Notice(Notice {
            platform: "gce".into(),
            kind: NoticeKind::Preemption,
            detail: "instance/preempted TRUE".into(),
            received: now,
            deadline: Some(now + PREEMPTION_WARNING),
        }),
        _ => Reading::unrecognised(body),
    }
}

/// `GET /computeMetadata/v1/instance/maintenance-event`: `NONE`,
/// `MIGRATE_ON_HOST_MAINTENANCE` or `TERMINATE_ON_HOST_MAINTENANCE`.
pub fn maintenance_event(body: &[u8], now: SystemTime) -> Reading {
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
            deadline: Some(now + MAINTENANCE_WARNING),
        }),
        _ => Reading::unrecognised(body),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::notices::tests::{secs, t0};

    #[test]
    fn gce_values_are_read_exactly() {
        let Reading::Notice(n) = preempted(b"TRUE", t0()) else {
            panic!("not a notice");
        };
        assert_eq!(
            (n.kind, n.deadline),
            (NoticeKind::Preemption, Some(t0() + secs(30)))
        );
        assert_eq!(preempted(b"FALSE\n", t0()), Reading::Quiet);
        assert_eq!(maintenance_event(b"NONE", t0()), Reading::Quiet);
        assert_eq!(maintenance_event(b"\"NONE\"", t0()), Reading::Quiet);
        assert!(matches!(
            maintenance_event(b"MIGRATE_ON_HOST_MAINTENANCE", t0()),
            Reading::Info(_)
        ));
        let Reading::Notice(n) = maintenance_event(b"TERMINATE_ON_HOST_MAINTENANCE", t0()) else {
            panic!("not a notice");
        };
        assert_eq!(
            (n.kind, n.deadline),
            (NoticeKind::HostMaintenance, Some(t0() + secs(60)))
        );
    }

    #[test]
    fn gce_paths_read_the_value_then_long_poll_with_the_etag_url_encoded() {
        let key = "/computeMetadata/v1/instance/preempted";
        assert_eq!(notice_path("preempted", None), key);
        assert_eq!(
            notice_path("preempted", Some(None)),
            format!("{key}?wait_for_change=true&timeout_sec=300")
        );
        assert_eq!(
            notice_path("preempted", Some(Some("Az09-._~ +&=#/%é"))),
            format!(
                "{key}?wait_for_change=true&timeout_sec=300&last_etag=Az09-._~%20%2B%26%3D%23%2F%25%C3%A9"
            )
        );
    }
}
