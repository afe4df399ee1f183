//! The record of this boot: exactly what status.json shows (with the means to delete this VM
//! from GitLab, which it shows as two flags), and the one place that tells the
//! outside world what happened (status.json, systemd's `STATUS=`, the journal in the phase's
//! span, the console, the boot record's milestones). Steps change it; the context they read
//! (`Context`) they never do.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::interrupt::Interrupts;
use crate::boot_record::{self, BootRecord};
use crate::config::CredentialKind;
use crate::console::Console;
use crate::lifecycle::{Lifecycle, Phase, Registration};
use crate::registration::Registered;
use crate::status::{self, Published, Status};
use crate::{secret, systemd};

/// What status.json shows of the configuration: from runner.json, or from the previous run's
/// status.json when a restarted agent resumes a teardown without it.
#[derive(Debug, Clone, Default)]
pub(super) struct Shown {
    pub(super) runner: Option<String>,
    pub(super) credential: Option<CredentialKind>,
    pub(super) gitlab_url: Option<String>,
}

/// Something that happened, told once: `Record::note` writes it to each place that shows it.
pub(super) enum Event {
    /// A step of the run done: the journal (info) and the console say the same line; `mark`
    /// times it in the boot record first.
    Done {
        text: String,
        mark: Option<fn(&mut BootRecord, u64)>,
    },
    /// Worth the operator's attention, the run goes on as planned: the journal (warn) and the
    /// console (`warning: ...`).
    Warning(String),
    /// Gone wrong, the run goes on or ends after it: the journal (warn, or error when it ends
    /// the run), the console's failure line, and status.json's last error.
    Trouble { text: String, ends_the_run: bool },
}

/// What GitLab knows of this VM, with what deleting it takes: the one account of this boot's
/// registration, which teardown reads and status.json shows (as `registered` and
/// `deregistered`: `lifecycle::Registration`).
pub(super) enum GitLabKnows {
    /// Nothing of this boot.
    Nothing,
    /// This VM, or may (a verify sent, a runner created or handed over by the broker):
    /// teardown deletes it with this. None: the token or GitLab's url of this boot is lost
    /// (config.toml missing or unreadable after a restart); it must be deleted by hand.
    ThisVm(Option<Registered>),
    /// Deleted from GitLab, or found gone.
    NoMore,
}

impl GitLabKnows {
    /// A restarted agent's account: what status.json said, and what config.toml still names.
    pub(super) fn resumed(shown: Registration, means: Option<Registered>) -> Self {
        match shown {
            Registration::None => GitLabKnows::Nothing,
            Registration::Registered => GitLabKnows::ThisVm(means),
            Registration::Deregistered => GitLabKnows::NoMore,
        }
    }

    /// Whether teardown starts with a deregistration.
    pub(super) fn needs_deregistration(&self) -> bool {
        matches!(self, GitLabKnows::ThisVm(_))
    }

    /// The means to delete this VM, when GitLab knows it and they are not lost.
    pub(super) fn means(&self) -> Option<&Registered> {
        match self {
            GitLabKnows::ThisVm(means) => means.as_ref(),
            _ => None,
        }
    }

    /// What status.json shows of it.
    pub(super) fn shown(&self) -> Registration {
        match self {
            GitLabKnows::Nothing => Registration::None,
            GitLabKnows::ThisVm(_) => Registration::Registered,
            GitLabKnows::NoMore => Registration::Deregistered,
        }
    }
}

pub(super) struct Record {
    pub(super) lc: Lifecycle,
    pub(super) gitlab: GitLabKnows,
    pub(super) boot_id: String,
    pub(super) shown: Shown,
    pub(super) system_id: Option<String>,
    pub(super) last_error: Option<String>,
    pub(super) hold_deadline: Option<SystemTime>,
    /// When this boot's hold began (kept across restarts: `--hold-max` counts from it).
    pub(super) hold_started: Option<SystemTime>,
    pub(super) poweroff_at: Option<SystemTime>,
    pub(super) token_expires_at: Option<SystemTime>,
    pub(super) token_warning: Option<String>,
    /// Milestones and failures, one line each, for reading from outside the VM.
    pub(super) console: Console,
    /// When each milestone of this boot happened; shared with the forwarding of gitlab-runner's
    /// output, which sees jobs start and end.
    pub(super) boot: Arc<Mutex<BootRecord>>,
    pub(super) published: Published,
    /// Where status.json is, for the warning when it cannot be written.
    status_path: std::path::PathBuf,
    /// For the preemption notice status.json shows.
    interrupts: Interrupts,
}

impl Record {
    pub(super) fn new(state_dir: &Path, interrupts: Interrupts) -> Self {
        let mut boot = BootRecord::default();
        boot.agent_started(boot_record::now_ms());
        Record {
            lc: Lifecycle::new(SystemTime::now()),
            gitlab: GitLabKnows::Nothing,
            boot_id: boot_id(),
            shown: Shown::default(),
            system_id: None,
            last_error: None,
            hold_deadline: None,
            hold_started: None,
            poweroff_at: None,
            token_expires_at: None,
            token_warning: None,
            console: Console::default(),
            boot: Arc::new(Mutex::new(boot)),
            published: Published::new(state_dir),
            status_path: status::path_in(state_dir),
            interrupts,
        }
    }

    pub(super) fn publish(&mut self, detail: &str) {
        let text = format!("{}: {detail}", self.lc.phase());
        systemd::status(&secret::scrub(&text));
        let _in_phase = self.span().entered();
        tracing::info!("{text}");
        self.write_status();
    }

    /// The span of the current phase: PHASE, RUNNER and SYSTEM_ID on every entry logged in it
    /// (empty until known).
    pub(super) fn span(&self) -> tracing::Span {
        self.span_in(self.lc.phase())
    }

    pub(super) fn span_in(&self, phase: Phase) -> tracing::Span {
        // A root span: created inside another step's span it would otherwise be its child, and
        // journald would get every field twice.
        tracing::info_span!(
            parent: None,
            "agent",
            phase = phase.as_str(),
            runner = secret::scrub(self.shown.runner.as_deref().unwrap_or("")),
            system_id = self.system_id.as_deref().unwrap_or(""),
        )
    }

    pub(super) fn write_status(&self) {
        if let Err(e) = self.try_write_status() {
            tracing::warn!("cannot write {}: {e}", self.status_path.display());
        }
    }

    /// Records a milestone of this boot at the boot clock's now.
    pub(super) fn mark(&self, milestone: impl FnOnce(&mut BootRecord, u64)) {
        let mut record = self.boot.lock().unwrap_or_else(PoisonError::into_inner);
        milestone(&mut record, boot_record::now_ms());
    }

    /// Tells what happened to the journal (in the phase's span), the console, the boot record
    /// and status.json, as the event calls for.
    pub(super) fn note(&mut self, event: Event) {
        let _in_phase = self.span().entered();
        match event {
            Event::Done { text, mark } => {
                if let Some(mark) = mark {
                    self.mark(mark);
                }
                tracing::info!("{text}");
                self.console.milestone(&text);
            }
            Event::Warning(text) => {
                tracing::warn!("{text}");
                self.console.milestone(&format!("warning: {text}"));
            }
            Event::Trouble { text, ends_the_run } => {
                if ends_the_run {
                    tracing::error!("{text}");
                } else {
                    tracing::warn!("{text}");
                }
                self.console.failure(&text);
                self.last_error = Some(text);
            }
        }
        self.write_status();
    }

    /// A milestone's line on the console (the journal has its own, longer line).
    pub(super) fn milestone(&self, text: &str) {
        self.console.milestone(text);
    }

    pub(super) fn try_write_status(&self) -> std::io::Result<()> {
        self.published.write(|| self.status())
    }

    pub(super) fn status(&self) -> Status {
        Status {
            phase: self.lc.phase(),
            since: self.lc.since(),
            pid: std::process::id(),
            boot_id: self.boot_id.clone(),
            runner: self.shown.runner.clone(),
            system_id: self.system_id.clone(),
            credential: self.shown.credential,
            gitlab_url: self.shown.gitlab_url.clone(),
            registered: self.gitlab.shown().ever_registered(),
            deregistered: self.gitlab.shown().deregistered(),
            runner_started: self.lc.runner_started,
            timeline: self.lc.timeline.clone(),
            timeline_dropped: self.lc.timeline_dropped,
            last_error: self.last_error.clone(),
            hold_deadline: self.hold_deadline,
            hold_started: self.hold_started,
            poweroff_at: self.poweroff_at,
            preemption: self.interrupts.notice(),
            boot_record: self
                .boot
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            token_expires_at: self.token_expires_at,
            token_warning: self.token_warning.clone(),
        }
    }

    /// The one way a restarted agent takes this boot's record back from its earlier run's
    /// status.json: the flags, the timeline, what was shown, the hold's start, the token's
    /// expiry and the boot record go on (what GitLab must be told, the caller rebuilds).
    pub(super) fn resume(&mut self, prev: Status) {
        self.lc.runner_started = prev.runner_started;
        // A failure of the earlier run still delays the power-off from when it happened.
        self.lc.failed_at = prev
            .timeline
            .iter()
            .rev()
            .find(|e| e.phase == Phase::Failed)
            .map(|e| e.at);
        // The earlier runs' timeline stays (bounded), so status shows the restart.
        self.lc
            .continue_timeline(prev.timeline, prev.timeline_dropped);
        self.shown = Shown {
            runner: prev.runner,
            credential: prev.credential,
            gitlab_url: prev.gitlab_url,
        };
        self.last_error = prev.last_error;
        // The hold goes on from when it began, not from this restart.
        self.hold_started = prev.hold_started;
        self.token_expires_at = prev.token_expires_at;
        self.token_warning = prev.token_warning;
        // The boot's record goes on; jobs that ran are over (gitlab-runner is not ours anymore).
        let mut record = prev.boot_record;
        record.running_jobs.clear();
        if let Some(started) = self.boot.lock().ok().and_then(|r| r.boot_to_agent_ms) {
            record.agent_started(started);
        }
        *self.boot.lock().unwrap_or_else(PoisonError::into_inner) = record;
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
