//! `gitlab-runner-vm run`: the lifecycle as a loop over states. Each state carries what its
//! step needs; a step does that phase's work (waiting, HTTP, the child process, the hold,
//! power-off) and returns the next state, and `lifecycle` checks every move. A VM's life:
//!
//! ```text
//! waiting-for-config -> registering -> running (-> draining) -> deregistering
//!                     -> holding (while the keep file exists) -> powering-off
//! any failure: -> failed -> the same teardown;   SIGTERM anywhere: -> stopping
//! ```
//!
//! The steps live beside this file: `waiting` (runner.json; then `fleet_settings`, the daemons
//! and the firewall as runner.json asks), `registering` (and the start of
//! gitlab-runner), `jobs` (running, draining), `teardown` (deregistering, holding,
//! powering-off, failed, stopping, and the resumption of a restarted agent).

mod error;
mod fleet_settings;
mod interrupt;
mod jobs;
mod registering;
mod state;
mod teardown;
mod waiting;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::time::Instant;
use tracing::Instrument;

use crate::boot_record::{self, BootRecord};
use crate::cli::RunArgs;
use crate::config::CredentialKind;
use crate::console::{self, Console};
use crate::lifecycle::{self, Lifecycle, Phase, StartDecision};
use crate::metadata::Platform;
use crate::status::{self, Published, Status};
use crate::{preemption, secret, systemd};
use interrupt::{Interrupt, Interrupts};
use state::{Next, State};

pub async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let args = absolute_paths(args)?;
    // First, before any thread or child: the agent in `agent`, gitlab-runner later in `runner`.
    let runner_cgroup = args.separate_cgroups.then(separate_cgroups).flatten();
    let mut interrupts = Interrupts::listen()?;
    // Read once: DMI/SMBIOS does not change while the VM runs.
    let platform = args.config_source.platform(&args.dmi_dir);
    let watcher = watch_preemption(&args, platform);
    // Notices come from the watcher, or from status.json of this boot's earlier run (restored
    // by `start` even when nothing is watched now).
    let notices = match &watcher {
        Some(w) => w.sender.clone(),
        None => Arc::new(tokio::sync::watch::channel(None).0),
    };
    interrupts = interrupts.with_notices(notices.subscribe());
    let mut agent = Agent::new(args, interrupts);
    agent.notices = notices;
    agent.runner_cgroup = runner_cgroup;
    agent.platform = platform;
    agent.watcher = watcher.map(|w| w.task);
    systemd::spawn_watchdog();
    let mut state = agent.start()?;
    loop {
        // Every journal entry of a step carries the phase, runner and system id it runs in.
        let span = agent.span();
        let next = match state {
            State::WaitingForConfig => agent.wait_for_config().instrument(span).await,
            State::Registering(setup) => agent.register(setup).instrument(span).await,
            State::Running(job) => agent.run_jobs(job).instrument(span).await,
            State::Draining(job) => agent.finish_jobs(job).instrument(span).await,
            State::Deregistering(t) => agent.deregister(t).instrument(span).await,
            State::Holding(t) => agent.hold(t).instrument(span).await,
            State::PoweringOff(t) => agent.power_off(t).instrument(span).await,
            State::Failed(error, t) => agent.after_failure(error, t),
            State::Stopping(stop) => agent.stop(stop).instrument(span).await,
            State::Exit(code) => return Ok(code),
        };
        state = agent.enter(next)?;
    }
}

/// What status.json shows of the configuration: from runner.json, or from the previous run's
/// status.json when a restarted agent resumes a teardown without it.
#[derive(Debug, Clone, Default)]
struct Shown {
    runner: Option<String>,
    credential: Option<CredentialKind>,
    gitlab_url: Option<String>,
}

/// What every step shares: the flags, the lifecycle record and what status.json shows.
struct Agent {
    args: RunArgs,
    lc: Lifecycle,
    boot_id: String,
    interrupts: Interrupts,
    shown: Shown,
    system_id: Option<String>,
    last_error: Option<String>,
    hold_deadline: Option<SystemTime>,
    /// When this boot's hold began (kept across restarts: `--hold-max` counts from it).
    hold_started: Option<SystemTime>,
    poweroff_at: Option<SystemTime>,
    /// The platform from `--config-source` (recognised from DMI/SMBIOS with `auto`).
    platform: Option<Platform>,
    /// The preemption watcher's task, ended with the run.
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Where notices are published (the watcher's channel): a restart restores one here.
    notices: Arc<tokio::sync::watch::Sender<Option<preemption::Notice>>>,
    /// Milestones and failures, one line each, for reading from outside the VM.
    console: Console,
    /// When each milestone of this boot happened; shared with the forwarding of gitlab-runner's
    /// output, which sees jobs start and end.
    record: Arc<Mutex<BootRecord>>,
    published: Published,
    token_expires_at: Option<SystemTime>,
    token_warning: Option<String>,
    /// Where gitlab-runner and the jobs go (`--separate-cgroups`); None: the agent's own.
    runner_cgroup: Option<crate::cgroup::RunnerCgroup>,
}

/// `--separate-cgroups`: the agent in `agent`, gitlab-runner and the jobs in `runner`. A
/// failure is said and the run goes on: the metadata firewall admits the `agent` cgroup only,
/// so it then refuses the agent and jobs alike (closed, not open).
fn separate_cgroups() -> Option<crate::cgroup::RunnerCgroup> {
    match crate::cgroup::separate_self() {
        Ok(runner) => {
            tracing::debug!(
                "gitlab-runner and its jobs will run in {}",
                runner.path.display()
            );
            Some(runner)
        }
        Err(why) => {
            tracing::warn!(
                "gitlab-runner and its jobs stay in the agent's cgroup: {why}; the metadata firewall, which admits only the agent's `agent` cgroup, then refuses the agent too (the unit needs Delegate=yes)"
            );
            None
        }
    }
}

impl Agent {
    fn new(args: RunArgs, interrupts: Interrupts) -> Self {
        let mut record = BootRecord::default();
        record.agent_started(boot_record::now_ms());
        Agent {
            published: Published::new(&args.state_dir),
            console: Console::default(),
            record: Arc::new(Mutex::new(record)),
            token_expires_at: None,
            token_warning: None,
            runner_cgroup: None,
            args,
            lc: Lifecycle::new(SystemTime::now()),
            boot_id: boot_id(),
            interrupts,
            shown: Shown::default(),
            system_id: None,
            last_error: None,
            hold_deadline: None,
            hold_started: None,
            poweroff_at: None,
            watcher: None,
            notices: Arc::new(tokio::sync::watch::channel(None).0),
            platform: None,
        }
    }

    /// The first state. Decided before the first write: status.json of an earlier run in this
    /// boot is the crash protection, and it needs nothing but the state directory.
    fn start(&mut self) -> anyhow::Result<State> {
        if let Some(path) = console::target(&self.args.console) {
            self.console = self
                .span()
                .in_scope(|| Console::open(path, std::path::Path::new(console::KMSG)));
        }
        std::fs::create_dir_all(&self.args.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                self.args.state_dir.display()
            )
        })?;
        match status::find(&self.args.state_dir, &self.boot_id) {
            status::Found::Nothing => {}
            status::Found::Status(prev) => {
                if prev.boot_id == self.boot_id
                    && let Some(notice) = prev.preemption.clone()
                {
                    // A notice this boot received before the restart still holds (its
                    // deadline included): the platform may not announce it again in time.
                    self.span()
                        .in_scope(|| preemption::restore(&self.notices, notice));
                }
                let previous_run = lifecycle::Previous {
                    boot_id: &prev.boot_id,
                    phase: prev.phase,
                    registered: prev.registered && !prev.deregistered,
                    runner_started: prev.runner_started,
                };
                if lifecycle::on_start(Some(previous_run), &self.boot_id) == StartDecision::TearDown
                {
                    let teardown = self.span().in_scope(|| self.resume(*prev));
                    let next = self.teardown(teardown);
                    return self.enter(next);
                }
            }
            status::Found::Unreadable { error, whose } if !whose.may_be_this_boot() => {
                tracing::warn!(
                    "{} cannot be read ({error}); {}: starting afresh, and it is replaced",
                    status::path_in(&self.args.state_dir).display(),
                    whose.describe()
                );
            }
            // Fail closed: this boot may have registered and run a job already.
            status::Found::Unreadable { error, whose } => {
                let teardown = self.span().in_scope(|| self.fail_closed());
                let next = state::failed(
                    error::AgentError::StatusUnreadable {
                        path: status::path_in(&self.args.state_dir),
                        detail: error,
                        whose: whose.describe(),
                    },
                    teardown,
                );
                return self.enter(next);
            }
        }
        self.publish(&format!("waiting for {}", self.args.config.display()));
        Ok(State::WaitingForConfig)
    }

    /// Moves to the next state's phase (a checked transition), then publishes it:
    /// status.json, systemd `STATUS=`, one log line.
    fn enter(&mut self, (state, detail): Next) -> anyhow::Result<State> {
        let Some(phase) = state.phase() else {
            return Ok(state);
        };
        self.lc.transition(phase, SystemTime::now())?;
        if phase == Phase::Registering {
            self.mark(BootRecord::config_found);
        }
        if let State::Failed(error, _) = &state {
            let line = error.with_fix();
            // Entered, not given as `parent:`: journald takes the fields of the entered span.
            let _in_phase = self.span().entered();
            tracing::error!("{line}");
            self.mark(BootRecord::failed);
            self.console
                .failure(&console::failure_text(&error.to_string(), &error.fix()));
            self.last_error = Some(line);
        }
        self.publish(&detail);
        if phase.is_started() {
            systemd::ready();
        }
        Ok(state)
    }

    fn publish(&mut self, detail: &str) {
        let text = format!("{}: {detail}", self.lc.phase());
        systemd::status(&secret::scrub(&text));
        let _in_phase = self.span().entered();
        tracing::info!("{text}");
        self.write_status();
    }

    /// The span of the current phase: PHASE, RUNNER and SYSTEM_ID on every entry logged in it
    /// (empty until known).
    fn span(&self) -> tracing::Span {
        self.span_in(self.lc.phase())
    }

    fn span_in(&self, phase: Phase) -> tracing::Span {
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

    fn write_status(&self) {
        if let Err(e) = self.try_write_status() {
            tracing::warn!(
                "cannot write {}: {e}",
                status::path_in(&self.args.state_dir).display()
            );
        }
    }

    /// Records a milestone of this boot at the boot clock's now.
    fn mark(&self, milestone: impl FnOnce(&mut BootRecord, u64)) {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        milestone(&mut record, boot_record::now_ms());
    }

    /// A milestone's line on the console (the journal has its own, longer line).
    fn milestone(&self, text: &str) {
        self.console.milestone(text);
    }

    fn try_write_status(&self) -> std::io::Result<()> {
        self.published.write(|| self.status())
    }

    fn status(&self) -> Status {
        Status {
            phase: self.lc.phase(),
            since: self.lc.since(),
            pid: std::process::id(),
            boot_id: self.boot_id.clone(),
            runner: self.shown.runner.clone(),
            system_id: self.system_id.clone(),
            credential: self.shown.credential,
            gitlab_url: self.shown.gitlab_url.clone(),
            registered: self.lc.registered,
            deregistered: self.lc.deregistered,
            runner_started: self.lc.runner_started,
            timeline: self.lc.timeline.clone(),
            timeline_dropped: self.lc.timeline_dropped,
            last_error: self.last_error.clone(),
            hold_deadline: self.hold_deadline,
            hold_started: self.hold_started,
            poweroff_at: self.poweroff_at,
            preemption: self.interrupts.notice(),
            boot_record: self
                .record
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            token_expires_at: self.token_expires_at,
            token_warning: self.token_warning.clone(),
        }
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupts.current()
    }
}

/// The preemption watcher `--watch-preemption` asks for, started for the whole run (a notice
/// during registering means gitlab-runner never starts; during a hold, the hold ends).
fn watch_preemption(args: &RunArgs, platform: Option<Platform>) -> Option<preemption::Watcher> {
    let (watched, warning) =
        preemption::watched_platform(args.watch_preemption, args.config_source, platform);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    preemption::start(watched?, &args.metadata_url)
}

/// `now + wait`, or a deadline far beyond any VM's life when that overflows the clock.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// gitlab-runner runs in the runner user's home: a relative path given to the agent must mean
/// the same file there as here. A bare program name is looked up in PATH instead.
fn absolute_paths(mut args: RunArgs) -> anyhow::Result<RunArgs> {
    let bare_program =
        args.gitlab_runner.components().count() == 1 && !args.gitlab_runner.starts_with(".");
    let mut paths: Vec<&mut PathBuf> =
        vec![&mut args.config, &mut args.state_dir, &mut args.keep_file];
    if !bare_program {
        paths.push(&mut args.gitlab_runner);
    }
    for path in paths {
        *path = std::path::absolute(&*path)
            .with_context(|| format!("cannot make {} absolute", path.display()))?;
    }
    Ok(args)
}
