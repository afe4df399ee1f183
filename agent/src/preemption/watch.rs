//! The watcher's common loop: the channel that holds the most urgent notice so far, the task
//! that runs a platform's watch for the agent's whole run, and what every platform's watch does
//! alike: publish a notice only when it is more urgent (`offer`), log each kind of trouble once
//! per endpoint (`Complaints`), back off after failures (`next_wait`). What a platform asks, how
//! often and how it reads the answers is its provider's (`crate::metadata::{aws, gce}`, started
//! by `crate::metadata::watch_notices`). Whatever the metadata service answers, a watch never
//! ends the agent and never floods the journal.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::reading::Reading;
use super::{Notice, more_urgent};

/// After repeated failures the wait doubles up to this: a notice is still seen within it.
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// Where a platform's watch publishes what it reads (the most urgent notice so far; None: none
/// yet).
pub type NoticeSender = Arc<watch::Sender<Option<Notice>>>;

/// The running watcher: the most urgent notice so far (None: none yet), its sender (through
/// which a restarted agent restores a notice an earlier run received), and its task, which the
/// agent aborts at the end of its run.
pub struct Watcher {
    /// The agent subscribes to `sender` instead; the watcher's own tests read this.
    #[cfg_attr(not(test), allow(dead_code))]
    pub notices: watch::Receiver<Option<Notice>>,
    pub sender: NoticeSender,
    pub task: JoinHandle<()>,
}

/// Starts a platform's watch (given the sender it publishes on) as a task of its own.
pub fn start<W>(watch: impl FnOnce(NoticeSender) -> W) -> Watcher
where
    W: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = watch::channel(None);
    let sender = Arc::new(tx);
    let task = tokio::spawn(watch(sender.clone()));
    Watcher {
        notices: rx,
        sender,
        task,
    }
}

/// The wait before the next request after `failures` failures in a row: `floor`, doubled per
/// failure, capped at `RETRY_CAP` (never below `floor`).
pub fn next_wait(floor: Duration, failures: u32) -> Duration {
    let doubled = floor.saturating_mul(1u32 << failures.min(16));
    doubled.min(RETRY_CAP.max(floor))
}

/// Publishes `notice` if it is more urgent than the one published, and logs it then (only
/// then: the same notice read again is not logged again).
pub fn offer(tx: &watch::Sender<Option<Notice>>, notice: Notice) {
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
pub struct Complaints {
    endpoint: &'static str,
    seen: HashSet<String>,
}

impl Complaints {
    pub fn new(endpoint: &'static str) -> Self {
        Complaints {
            endpoint,
            seen: HashSet::new(),
        }
    }

    /// Logs `detail` unless this kind of trouble was logged for the endpoint already.
    pub fn complain(&mut self, kind: &str, detail: impl FnOnce() -> String) {
        if self.seen.insert(kind.to_string()) {
            tracing::warn!(
                "preemption watch: {} answered {}; taken as no notice, watching on (this kind of answer is logged once)",
                self.endpoint,
                crate::secret::scrub(&detail())
            );
        }
    }
}

/// Acts on a reading of a polled endpoint; false when it was not this endpoint's answer.
pub fn take(
    reading: Reading,
    complaints: &mut Complaints,
    tx: &watch::Sender<Option<Notice>>,
) -> bool {
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
