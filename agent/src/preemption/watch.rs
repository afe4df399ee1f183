//! The watchers: one task per platform that reads the notice endpoints for the agent's whole
//! run and publishes the most urgent notice in a `watch` channel. Whatever the metadata service
//! answers, a watcher never ends the agent, never floods the journal (each kind of trouble is
//! logged once per endpoint) and never asks more often than its floor: AWS every 5 s (more
//! after failures), each GCE key at most once a second (a service that ignores
//! `wait_for_change` must not turn the long poll into a busy loop).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::http::{AWS_TOKEN_TTL_SECONDS, Answer, MetadataHttp};
use super::parse::{self, Reading};
use super::{Notice, more_urgent};
use crate::metadata::Platform;

/// AWS recommends checking for interruption notices every 5 seconds; never more often.
pub const AWS_POLL: Duration = Duration::from_secs(5);
/// Between two requests for one GCE key, whatever the server does.
pub const GCE_FLOOR: Duration = Duration::from_secs(1);
/// A GCE long poll's `timeout_sec`.
pub const GCE_LONG_POLL_SECONDS: u64 = 300;
/// After repeated failures the wait doubles up to this: a notice is still seen within it.
pub const RETRY_CAP: Duration = Duration::from_secs(30);
/// A token is renewed this long before its TTL ends.
const TOKEN_MARGIN: Duration = Duration::from_secs(600);

/// The running watcher: the most urgent notice so far (None: none yet), and its task, which the
/// agent aborts at the end of its run.
pub struct Watcher {
    pub notices: watch::Receiver<Option<Notice>>,
    pub task: JoinHandle<()>,
}

/// Starts watching `platform`'s notices at `base_url`; None for a platform without notices, or
/// when no HTTP client can be made (logged).
pub fn start(platform: Platform, base_url: &str) -> Option<Watcher> {
    let http = match MetadataHttp::new(base_url) {
        Ok(http) => http,
        Err(e) => {
            tracing::warn!("{e:#}; preemption notices are not watched");
            return None;
        }
    };
    let (tx, rx) = watch::channel(None);
    let task = match platform {
        Platform::Aws => tokio::spawn(watch_aws(http, tx)),
        Platform::Gce => tokio::spawn(watch_gce(http, tx)),
        Platform::DigitalOcean => return None,
    };
    tracing::info!(
        "watching {platform}'s preemption and maintenance notices at {}",
        crate::secret::scrub(base_url)
    );
    Some(Watcher { notices: rx, task })
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
                detail()
            );
        }
    }

    /// A non-200 answer or a failed request, by kind.
    fn bad_answer(&mut self, result: &Result<Answer, String>) {
        match result {
            Ok(answer) if answer.status == 200 => self.complain("too large", || {
                format!("more than {} bytes", super::http::MAX_BODY)
            }),
            Ok(answer) => {
                let status = answer.status;
                self.complain(&format!("status {status}"), || format!("HTTP {status}"))
            }
            Err(e) => self.complain("unreachable", || format!("nothing ({e})")),
        }
    }
}

async fn watch_aws(http: MetadataHttp, tx: watch::Sender<Option<Notice>>) {
    let mut token: Option<(String, Instant)> = None;
    let mut token_trouble = Complaints::new("IMDSv2 PUT /latest/api/token");
    let mut endpoints = [
        (
            "spot/instance-action",
            Complaints::new("GET /latest/meta-data/spot/instance-action"),
            parse::aws_instance_action as fn(&[u8], SystemTime) -> Reading,
        ),
        (
            "events/recommendations/rebalance",
            Complaints::new("GET /latest/meta-data/events/recommendations/rebalance"),
            parse::aws_rebalance,
        ),
    ];
    let token_life = Duration::from_secs(AWS_TOKEN_TTL_SECONDS) - TOKEN_MARGIN;
    let mut failures = 0;
    loop {
        let started = Instant::now();
        let mut ok = true;
        if token
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() > token_life)
        {
            token = None;
            let result = http.aws_token().await;
            match &result {
                Ok(Answer {
                    status: 200,
                    body: Some(body),
                    ..
                }) if is_token(body) => {
                    let text = String::from_utf8_lossy(body).trim().to_string();
                    token = Some((text, Instant::now()));
                }
                Ok(Answer {
                    status: 200,
                    body: Some(body),
                    ..
                }) => token_trouble.complain("not a token", || {
                    format!("a 200 that is no token ({})", parse::describe_body(body))
                }),
                other => token_trouble.bad_answer(other),
            }
            ok = token.is_some();
        }
        if let Some((value, _)) = token.clone() {
            for (path, complaints, read) in endpoints.iter_mut() {
                let result = http.aws_get(path, &value).await;
                match &result {
                    Ok(Answer { status: 404, .. }) => {}
                    Ok(Answer {
                        status: 200,
                        body: Some(body),
                        ..
                    }) => {
                        if !take(read(body, SystemTime::now()), complaints, &tx) {
                            ok = false;
                        }
                    }
                    Ok(Answer { status: 401, .. }) => {
                        // The token expired or was revoked: a new one next time.
                        complaints.bad_answer(&result);
                        token = None;
                        ok = false;
                    }
                    other => {
                        complaints.bad_answer(other);
                        ok = false;
                    }
                }
            }
        }
        failures = if ok { 0 } else { failures + 1 };
        tokio::time::sleep_until(started + next_wait(AWS_POLL, failures)).await;
    }
}

/// An IMDSv2 token: short printable ASCII (it goes into a header).
fn is_token(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    !text.is_empty() && text.len() <= 1024 && text.bytes().all(|b| b.is_ascii_graphic())
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

async fn watch_gce(http: MetadataHttp, tx: watch::Sender<Option<Notice>>) {
    tokio::join!(
        watch_gce_key(&http, "preempted", parse::gce_preempted, &tx),
        watch_gce_key(
            &http,
            "maintenance-event",
            parse::gce_maintenance_event,
            &tx
        ),
    );
}

/// One GCE key: its current value, then long polls from its ETag. Ends once the key announced
/// that the VM goes away (it has nothing more to say).
async fn watch_gce_key(
    http: &MetadataHttp,
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
        let wait = known
            .as_ref()
            .map(|etag| (etag.as_deref(), GCE_LONG_POLL_SECONDS));
        let result = http.gce_get(key, wait).await;
        let ok = match &result {
            Ok(Answer {
                status: 200,
                body: Some(body),
                etag,
            }) => match read(body, SystemTime::now()) {
                Reading::Quiet => {
                    last_info = None;
                    known = Some(etag.clone());
                    true
                }
                Reading::Notice(notice) => {
                    let goes_away = notice.vm_goes_away();
                    offer(tx, notice);
                    if goes_away {
                        return;
                    }
                    known = Some(etag.clone());
                    true
                }
                Reading::Info(text) => {
                    if last_info != Some(text) {
                        tracing::info!("{text}");
                    }
                    last_info = Some(text);
                    known = Some(etag.clone());
                    true
                }
                Reading::Unrecognised(detail) => {
                    complaints.complain("unrecognised", || format!("something else ({detail})"));
                    false
                }
            },
            other => {
                complaints.bad_answer(other);
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
