//! Preemption and maintenance notices: the warning a cloud gives before it takes the VM away,
//! turned into a graceful stop instead of a job killed mid-flight.
//!
//! Each platform gives its own, read by its provider: AWS the Spot interruption (about two
//! minutes ahead) and the rebalance recommendation (no deadline), `crate::metadata::aws`; GCE
//! preemption (about 30 s ahead) and host maintenance (about 60 s), `crate::metadata::gce`;
//! DigitalOcean none.
//!
//! On a notice the agent drains at once (no new job; a rebalance recommendation only once the
//! VM received its first job: `drains_now`); when the deadline leaves no more time than
//! gitlab-runner's abort and the deregistration need (`plan`), gitlab-runner gets SIGTERM, so
//! that it reports the job as failed by the system (`runner_system_failure`, which a job can
//! `retry`), then the VM deregisters and powers off without a hold.
//!
//! What is not a notice stays none: a 404, an error status, HTML, a body that is not UTF-8 or
//! too large, an unknown value. A broken metadata service is no evidence that the VM goes away,
//! and acting on it would abort the jobs of a whole fleet; the platform's own shutdown still
//! reaches the agent as SIGTERM (stopping). Each kind of trouble is logged once per endpoint.
//!
//! This file holds the notice and the decisions (pure); `reading` what one answer says (pure);
//! `watch` the watcher's common loop (the channel, the task, what every platform's watch does
//! alike). What is each platform's (its endpoints, how they are asked, how their answers read)
//! is its provider's, in `crate::metadata::{aws, gce}`, which `crate::metadata::watch_notices`
//! starts: a provider knows this module, this module knows no platform.

mod reading;
mod watch;

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use reading::Reading;
// The cap is the providers' tests' (`crate::metadata::notices`).
#[cfg(test)]
pub use watch::RETRY_CAP;
pub use watch::{Complaints, NoticeSender, Watcher, next_wait, offer, restore, start, take};

/// Time kept at the end of a notice's warning for the deregistration (one DELETE to GitLab).
pub const DEREGISTER_RESERVE: Duration = Duration::from_secs(10);
/// gitlab-runner always gets at least this long to abort its job after SIGTERM, however close
/// the deadline: a job aborted and reported beats one that merely vanishes.
pub const MIN_ABORT: Duration = Duration::from_secs(3);
/// Between SIGQUIT and SIGTERM: run-single reads signals from an unbuffered channel, and a
/// SIGTERM that arrives while it is still logging the SIGQUIT would be dropped.
pub const QUIT_TERM_GAP: Duration = Duration::from_secs(1);

/// `--watch-preemption`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WatchPreemption {
    /// On when the platform (told by --config-source, or recognised) is aws or gce
    Auto,
    /// Watch the platform's notices (aws, gce); a warning elsewhere
    On,
    /// Never watch
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeKind {
    /// AWS Spot `instance-action`: terminate, stop or hibernate at a time.
    SpotInterruption,
    /// AWS rebalance recommendation: an elevated risk of interruption, no deadline.
    RebalanceRecommendation,
    /// GCE `preempted` TRUE: the VM stops in about 30 s.
    Preemption,
    /// GCE `maintenance-event` TERMINATE_ON_HOST_MAINTENANCE: the VM stops in about 60 s.
    HostMaintenance,
}

impl NoticeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::SpotInterruption => "spot-interruption",
            NoticeKind::RebalanceRecommendation => "rebalance-recommendation",
            NoticeKind::Preemption => "preemption",
            NoticeKind::HostMaintenance => "host-maintenance",
        }
    }
}

/// A notice as status.json shows it. `detail` is built from recognised values only, never
/// copied from the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub platform: String,
    pub kind: NoticeKind,
    pub detail: String,
    #[serde(with = "crate::timestamp::rfc3339")]
    pub received: SystemTime,
    /// When the VM goes away; None: no deadline (drain only).
    #[serde(with = "crate::timestamp::rfc3339_opt", default)]
    pub deadline: Option<SystemTime>,
}

impl Notice {
    /// The VM is going away: no hold, no failure delay.
    pub fn vm_goes_away(&self) -> bool {
        self.deadline.is_some()
    }

    /// One line for the journal and status: kind, platform, detail, deadline and how far it is.
    pub fn describe(&self, now: SystemTime) -> String {
        let head = format!(
            "{} {} notice ({})",
            self.platform,
            self.kind.as_str(),
            self.detail
        );
        match self.deadline {
            Some(deadline) => format!(
                "{head}: the VM goes away at {} ({})",
                crate::timestamp::fmt_time(deadline),
                seconds_left(deadline, now)
            ),
            None => format!("{head}: no deadline"),
        }
    }
}

/// "in N s", or "now" once it has passed.
pub fn seconds_left(deadline: SystemTime, now: SystemTime) -> String {
    match deadline.duration_since(now) {
        Ok(left) if left.as_secs() > 0 => format!("in {} s", left.as_secs()),
        _ => "now".into(),
    }
}

/// Whether `new` should replace `current` as the notice the agent acts on: any notice beats
/// none, a deadline beats none, an earlier deadline beats a later one. The same notice read
/// again (AWS keeps answering it) replaces nothing, so it is logged once.
pub fn more_urgent(current: Option<&Notice>, new: &Notice) -> bool {
    match (current.and_then(|c| c.deadline), new.deadline, current) {
        (_, _, None) => true,
        (None, Some(_), _) => true,
        (Some(old), Some(new), _) => new < old,
        (_, None, _) => false,
    }
}

/// Whether `notice` stops gitlab-runner from taking further jobs now, after `jobs_received` jobs:
/// a notice that the VM goes away always does; a rebalance recommendation (a risk, no deadline)
/// only once a job came. Draining a VM before its first job would have it power off at once,
/// and an Auto Scaling group launching into an at-risk pool would then cycle VMs as fast as it
/// can without running a single job.
pub fn drains_now(notice: &Notice, jobs_received: u32) -> bool {
    notice.vm_goes_away() || jobs_received > 0
}

/// What a notice asks of the running jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// No new job; the current one may finish (no deadline).
    Drain,
    /// No new job, and after `after` (zero: at once) SIGTERM to gitlab-runner, so that it
    /// aborts and reports the job and the VM deregisters before the deadline.
    DrainThenAbort { after: Duration },
}

/// `reserve`: what must be left before the deadline when the abort begins, i.e. gitlab-runner's
/// `--stop-timeout` plus `DEREGISTER_RESERVE`. A notice nearer than that (GCE's 30 s) aborts at
/// once; a farther one (AWS's two minutes with the default `--stop-timeout`) lets the job run on
/// until `deadline - reserve`, in case it finishes by then. A deadline already past (a clock
/// behind the platform's) aborts at once.
pub fn plan(notice: &Notice, now: SystemTime, reserve: Duration) -> Action {
    let Some(deadline) = notice.deadline else {
        return Action::Drain;
    };
    let left = deadline.duration_since(now).unwrap_or(Duration::ZERO);
    Action::DrainThenAbort {
        after: left.saturating_sub(reserve),
    }
}

/// How long gitlab-runner may take to abort after SIGTERM: `--stop-timeout`, but never so long
/// that the deregistration's reserve is eaten, and never less than `MIN_ABORT`.
pub fn abort_budget(notice: &Notice, now: SystemTime, stop_timeout: Duration) -> Duration {
    match notice.deadline {
        None => stop_timeout,
        Some(deadline) => {
            let left = deadline.duration_since(now).unwrap_or(Duration::ZERO);
            stop_timeout
                .min(left.saturating_sub(DEREGISTER_RESERVE))
                .max(MIN_ABORT.min(stop_timeout))
        }
    }
}

/// How long the deregistration may take: `--deregister-timeout`, within what is left before the
/// deadline (at least a few seconds: the VM may outlive its notice, and trying costs nothing).
pub fn deregister_budget(
    notice: Option<&Notice>,
    now: SystemTime,
    deregister_timeout: Duration,
) -> Duration {
    match notice.and_then(|n| n.deadline) {
        None => deregister_timeout,
        Some(deadline) => {
            let left = deadline.duration_since(now).unwrap_or(Duration::ZERO);
            deregister_timeout.min(left.max(MIN_ABORT))
        }
    }
}

#[cfg(test)]
mod tests;
