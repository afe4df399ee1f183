//! The watchers: one task per platform that reads the notice endpoints for the agent's whole
//! run and publishes the most urgent notice in a `watch` channel. Whatever the metadata service
//! answers, a watcher never ends the agent, never floods the journal (each kind of trouble is
//! logged once per endpoint) and never asks more often than its floor: AWS every 5 s (more
//! after failures), each GCE key at most once a second (a service that ignores
//! `wait_for_change` must not turn the long poll into a busy loop).
//!
//! Requests go through the shared `MetadataClient`: it keeps the IMDSv2 session token (renewed
//! at the poll after a 401, never at once: see `watch_aws`), sends `Metadata-Flavor: Google` and refuses GCE answers without it,
//! follows no redirect and reads no body past `MAX_BODY`; what it refuses is trouble here.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::parse::{self, Reading};
use super::{Notice, more_urgent};
use crate::metadata::{Answer, MetadataClient, MetadataError, Platform};

/// AWS recommends checking for interruption notices every 5 seconds; never more often.
pub const AWS_POLL: Duration = Duration::from_secs(5);
/// Between two requests for one GCE key, whatever the server does.
pub const GCE_FLOOR: Duration = Duration::from_secs(1);
/// A GCE long poll's `timeout_sec`.
pub const GCE_LONG_POLL_SECONDS: u64 = 300;
/// A long poll's answer may come this much after its `timeout_sec` before it is a failure.
const GCE_GRACE: Duration = Duration::from_secs(10);
/// A request that is no long poll (the token's PUT included) and takes longer is a failure,
/// retried at the next poll.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Notices are a few dozen bytes; anything larger is not one.
pub const MAX_BODY: usize = 16 * 1024;
/// A longer ETag is not used (the next long poll then waits for any change).
const MAX_ETAG: usize = 128;
/// After repeated failures the wait doubles up to this: a notice is still seen within it.
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// The running watcher: the most urgent notice so far (None: none yet), its sender (through
/// which a restarted agent restores a notice an earlier run received), and its task, which the
/// agent aborts at the end of its run.
pub struct Watcher {
    /// The agent subscribes to `sender` instead; the watcher's own tests read this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub notices: watch::Receiver<Option<Notice>>,
    pub sender: Arc<watch::Sender<Option<Notice>>>,
    pub task: JoinHandle<()>,
}

/// Starts watching `platform`'s notices at `base_url`; None for a platform without notices, or
/// when no metadata client can be made (logged).
pub fn start(platform: Platform, base_url: &str) -> Option<Watcher> {
    if !matches!(platform, Platform::Aws | Platform::Gce) {
        return None;
    }
    let client = match MetadataClient::new(platform, base_url) {
        Ok(client) => client
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_body(MAX_BODY),
        Err(e) => {
            tracing::warn!("{e}; preemption notices are not watched");
            return None;
        }
    };
    let (tx, rx) = watch::channel(None);
    let sender = Arc::new(tx);
    let task = match platform {
        Platform::Gce => tokio::spawn(watch_gce(client, sender.clone())),
        _ => tokio::spawn(watch_aws(client, sender.clone())),
    };
    tracing::info!(
        "watching {platform}'s preemption and maintenance notices at {}",
        crate::secret::scrub(base_url)
    );
    Some(Watcher {
        notices: rx,
        sender,
        task,
    })
}

/// The wait before the next request after `failures` failures in a row: `floor`, doubled per
/// failure, capped at `RETRY_CAP` (never below `floor`).
pub fn next_wait(floor: Duration, failures: u32) -> Duration {
    let doubled = floor.saturating_mul(1u32 << failures.min(16));
    doubled.min(RETRY_CAP.max(floor))
}

/// Publishes `notice` if it is more urgent than the one published, and logs it then (only
/// then: the same notice read again is not logged again).
fn offer(tx: &watch::Sender<Option<Notice>>, notice: Notice) {
    let accepted = tx.send_if_modified(|current| {
        let replace = more_urgent(current.as_ref(), &notice);
        if replace {
            *current = Some(notice.clone());
        }
        replace
    });
    if accepted {
        let action = if notice.vm_goes_away() {
            "no new job; a job still running as the deadline nears is aborted and reported, in time to deregister"
        } else {
            "no new job; the current one may finish"
        };
        tracing::warn!("{}: {action}", notice.describe(SystemTime::now()));
    }
}

/// A notice an earlier run of this boot received (status.json), published again at the start
/// of a restarted agent: the platform announced it once, and the next poll may not repeat it
/// (or come too late). Kept unless a more urgent one is already known; true when published.
pub fn restore(tx: &watch::Sender<Option<Notice>>, notice: Notice) -> bool {
    let restored = tx.send_if_modified(|current| {
        let replace = more_urgent(current.as_ref(), &notice);
        if replace {
            *current = Some(notice.clone());
        }
        replace
    });
    if restored {
        tracing::warn!(
            "{} (received by this boot's earlier run, before the agent was restarted)",
            notice.describe(SystemTime::now())
        );
    }
    restored
}

/// Each kind of trouble with one endpoint is logged once.
struct Complaints {
    endpoint: &'static str,
    seen: HashSet<String>,
}

impl Complaints {
    fn new(endpoint: &'static str) -> Self {
        Complaints {
            endpoint,
            seen: HashSet::new(),
        }
    }

    fn complain(&mut self, kind: &str, detail: impl FnOnce() -> String) {
        if self.seen.insert(kind.to_string()) {
            tracing::warn!(
                "preemption watch: {} answered {}; taken as no notice, watching on (this kind of answer is logged once)",
                self.endpoint,
                crate::secret::scrub(&detail())
            );
        }
    }

    /// A failed request, by kind (an error status, a redirect, no answer...).
    fn trouble(&mut self, e: &MetadataError) {
        use MetadataError::*;
        let (kind, detail) = match e {
            Status { status, .. } => (format!("status {status}"), format!("HTTP {status}")),
            Redirect {
                status, location, ..
            } => (
                "redirect".into(),
                format!("HTTP {status}, a redirect to {location} (not followed)"),
            ),
            TooLarge { cap_kib, .. } => ("too large".into(), format!("more than {cap_kib} KiB")),
            NotMetadataService { detail, .. } => (
                "not the metadata service".into(),
                format!("as something else than the metadata service would ({detail})"),
            ),
            AwsTokenUnanswered { .. }
            | Unreachable {
                timed_out: true, ..
            } => ("unreachable".into(), "nothing (no answer in time)".into()),
            Unreachable { detail, .. } => ("unreachable".into(), format!("nothing ({detail})")),
            other => ("error".into(), format!("nothing usable ({other})")),
        };
        self.complain(&kind, || detail);
    }
}

async fn watch_aws(client: MetadataClient, tx: Arc<watch::Sender<Option<Notice>>>) {
    let mut token_trouble = Complaints::new("IMDSv2 PUT /latest/api/token");
    let mut endpoints = [
        (
            "/latest/meta-data/spot/instance-action",
            Complaints::new("GET /latest/meta-data/spot/instance-action"),
            parse::aws_instance_action as fn(&[u8], SystemTime) -> Reading,
        ),
        (
            "/latest/meta-data/events/recommendations/rebalance",
            Complaints::new("GET /latest/meta-data/events/recommendations/rebalance"),
            parse::aws_rebalance,
        ),
    ];
    let mut failures = 0;
    // A GET answered 401: the session token is renewed at the next poll, not at once (a
    // renewal and a second GET within milliseconds would ask each endpoint twice per poll).
    let mut token_refused = false;
    loop {
        let started = Instant::now();
        let mut ok = true;
        if std::mem::take(&mut token_refused) {
            client.forget_aws_token().await;
        }
        for (path, complaints, read) in endpoints.iter_mut() {
            match client.get_answer_once(path, REQUEST_TIMEOUT).await {
                // 404: nothing announced.
                Ok(None) => {}
                Ok(Some(Answer { body, .. })) => {
                    if !take(read(&body, SystemTime::now()), complaints, &tx) {
                        ok = false;
                    }
                }
                Err(e) if e.is_aws_token() => {
                    // No token, no GET: the next endpoint waits for the next poll.
                    token_trouble.trouble(&e);
                    ok = false;
                    break;
                }
                Err(e) => {
                    // The other endpoint is still asked this poll, with the same token: each
                    // endpoint and the token's PUT at most once per poll.
                    token_refused |= matches!(e, MetadataError::Status { status: 401, .. });
                    complaints.trouble(&e);
                    ok = false;
                }
            }
        }
        failures = if ok { 0 } else { failures + 1 };
        tokio::time::sleep_until(started + next_wait(AWS_POLL, failures)).await;
    }
}

/// Acts on a reading; false when it was not this endpoint's answer.
fn take(reading: Reading, complaints: &mut Complaints, tx: &watch::Sender<Option<Notice>>) -> bool {
    match reading {
        Reading::Quiet => true,
        Reading::Notice(notice) => {
            offer(tx, notice);
            true
        }
        Reading::Info(text) => {
            // Once per kind: AWS keeps answering what it announced.
            complaints.complain(text, || text.to_string());
            true
        }
        Reading::Unrecognised(detail) => {
            complaints.complain("unrecognised", || format!("something else ({detail})"));
            false
        }
    }
}

async fn watch_gce(client: MetadataClient, tx: Arc<watch::Sender<Option<Notice>>>) {
    tokio::join!(
        watch_gce_key(&client, "preempted", parse::gce_preempted, &tx),
        watch_gce_key(
            &client,
            "maintenance-event",
            parse::gce_maintenance_event,
            &tx
        ),
    );
}

/// The path of a GCE key: its current value (`known` None), or a long poll that answers once the
/// value differs from the one `known` ETag stands for (without one: once it changes).
pub fn gce_path(key: &str, known: Option<Option<&str>>) -> String {
    let mut path = format!("/computeMetadata/v1/instance/{key}");
    if let Some(etag) = known {
        path.push_str(&format!(
            "?wait_for_change=true&timeout_sec={GCE_LONG_POLL_SECONDS}"
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

/// One GCE key: its current value, then long polls from its ETag. Ends once the key announced
/// that the VM goes away (it has nothing more to say).
async fn watch_gce_key(
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
        let path = gce_path(key, known.as_ref().map(Option::as_deref));
        let timeout = match known {
            None => REQUEST_TIMEOUT,
            Some(_) => Duration::from_secs(GCE_LONG_POLL_SECONDS) + GCE_GRACE,
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
                complaints.trouble(&e);
                false
            }
        };
        if !ok {
            // After trouble the current value is read afresh, not waited on.
            known = None;
        }
        failures = if ok { 0 } else { failures + 1 };
        tokio::time::sleep_until(started + next_wait(GCE_FLOOR, failures)).await;
    }
}
