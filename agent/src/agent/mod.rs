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
//! The steps live beside this file: `waiting` (runner.json from `sources`; then
//! `fleet_settings`, the daemons and the firewall as runner.json asks), `registering` (and the
//! start of gitlab-runner), `jobs` (running, draining), `teardown` (deregistering, holding,
//! powering-off, failed, stopping) and `resume` (what a restarted agent takes up). A
//! preemption notice is `Interrupt::Preempted`, one rule of the lifecycle's decisions. Steps
//! read the `Context`, write the `Record` (whose `GitLabKnows` is the one account of the VM's
//! registration) and return a `Next`.

mod error;
mod fleet_settings;
mod interrupt;
mod jobs;
mod record;
mod registering;
mod resume;
mod sources;
mod state;
mod teardown;
mod waiting;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use tokio::time::Instant;
use tracing::Instrument;

use crate::boot_record::BootRecord;
use crate::cli::RunArgs;
use crate::console::{self, Console};
use crate::lifecycle::{self, Phase, StartDecision};
use crate::metadata::{self, Platform};
use crate::status;
use crate::{preemption, systemd};
use interrupt::{Interrupt, Interrupts};
use record::Record;
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
    let ctx = Context {
        args,
        platform,
        runner_cgroup,
    };
    let mut agent = Agent::new(ctx, interrupts);
    agent.notices = notices;
    agent.watcher = watcher.map(|w| w.task);
    systemd::spawn_watchdog();
    let mut state = agent.start()?;
    loop {
        // Every journal entry of a step carries the phase, runner and system id it runs in.
        let span = agent.rec.span();
        let next = match state {
            State::WaitingForConfig => agent.wait_for_config().instrument(span).await,
            State::Registering(setup) => agent.register(setup).instrument(span).await,
            State::Running(job) => agent.run_jobs(job).instrument(span).await,
            State::Draining(job) => agent.finish_jobs(job).instrument(span).await,
            State::Deregistering => agent.deregister().instrument(span).await,
            State::Holding(t) => agent.hold(t).instrument(span).await,
            State::PoweringOff(t) => agent.power_off(t).instrument(span).await,
            State::Failed(error) => agent.after_failure(error),
            State::Stopping(stop) => agent.stop(stop).instrument(span).await,
            State::Exit(code) => return Ok(code),
        };
        state = agent.enter(next)?;
    }
}

/// What every step reads and none changes: the flags, the platform, where gitlab-runner goes.
struct Context {
    args: RunArgs,
    /// The platform from `--config-source` (recognised from DMI/SMBIOS with `auto`).
    platform: Option<Platform>,
    /// Where gitlab-runner and the jobs go (`--separate-cgroups`); None: the agent's own.
    runner_cgroup: Option<crate::cgroup::RunnerCgroup>,
}

/// What every step shares: the context it reads, the record it writes, and the interrupts
/// that cut its waits short.
struct Agent {
    ctx: Context,
    rec: Record,
    interrupts: Interrupts,
    /// The preemption watcher's task, ended with the run.
    watcher: Option<tokio::task::JoinHandle<()>>,
    /// Where notices are published (the watcher's channel): a restart restores one here.
    notices: Arc<tokio::sync::watch::Sender<Option<preemption::Notice>>>,
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
    fn new(ctx: Context, interrupts: Interrupts) -> Self {
        Agent {
            rec: Record::new(&ctx.args.state_dir, interrupts.clone()),
            ctx,
            interrupts,
            watcher: None,
            notices: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    /// The first state. Decided before the first write: status.json of an earlier run in this
    /// boot is the crash protection, and it needs nothing but the state directory.
    fn start(&mut self) -> anyhow::Result<State> {
        if let Some(path) = console::target(&self.ctx.args.console) {
            self.rec.console = self
                .rec
                .span()
                .in_scope(|| Console::open(path, std::path::Path::new(console::KMSG)));
        }
        std::fs::create_dir_all(&self.ctx.args.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                self.ctx.args.state_dir.display()
            )
        })?;
        match status::find(&self.ctx.args.state_dir, &self.rec.boot_id) {
            status::Found::Nothing => {}
            status::Found::Status(prev) => {
                if prev.boot_id == self.rec.boot_id
                    && let Some(notice) = prev.preemption.clone()
                {
                    // A notice this boot received before the restart still holds (its
                    // deadline included): the platform may not announce it again in time.
                    self.rec
                        .span()
                        .in_scope(|| preemption::restore(&self.notices, notice));
                }
                let previous_run = lifecycle::Previous {
                    boot_id: &prev.boot_id,
                    phase: prev.phase,
                    registered: prev.registered && !prev.deregistered,
                    runner_started: prev.runner_started,
                };
                if lifecycle::on_start(Some(previous_run), &self.rec.boot_id)
                    == StartDecision::TearDown
                {
                    self.rec.span().in_scope(|| self.resume(*prev));
                    let next = self.teardown();
                    return self.enter(next);
                }
            }
            status::Found::Unreadable { error, whose } if !whose.may_be_this_boot() => {
                tracing::warn!(
                    "{} cannot be read ({error}); {}: starting afresh, and it is replaced",
                    status::path_in(&self.ctx.args.state_dir).display(),
                    whose.describe()
                );
            }
            // Fail closed: this boot may have registered and run a job already.
            status::Found::Unreadable { error, whose } => {
                self.rec.span().in_scope(|| self.fail_closed());
                let next = state::failed(error::AgentError::StatusUnreadable {
                    path: status::path_in(&self.ctx.args.state_dir),
                    detail: error,
                    whose: whose.describe(),
                });
                return self.enter(next);
            }
        }
        self.rec
            .publish(&format!("waiting for {}", self.ctx.args.config.display()));
        Ok(State::WaitingForConfig)
    }

    /// Moves to the next state's phase (a checked transition), then publishes it:
    /// status.json, systemd `STATUS=`, one log line.
    fn enter(
        &mut self,
        Next {
            state,
            detail,
            console,
        }: Next,
    ) -> anyhow::Result<State> {
        let Some(phase) = state.phase() else {
            return Ok(state);
        };
        self.rec.lc.transition(phase, SystemTime::now())?;
        if phase == Phase::Registering {
            self.rec.mark(BootRecord::config_found);
        }
        if let State::Failed(error) = &state {
            let line = error.with_fix();
            // Entered, not given as `parent:`: journald takes the fields of the entered span.
            let _in_phase = self.rec.span().entered();
            tracing::error!("{line}");
            self.rec.mark(BootRecord::failed);
            self.rec
                .console
                .failure(&console::failure_text(&error.to_string(), &error.fix()));
            self.rec.last_error = Some(line);
        }
        self.rec.publish(&detail);
        if let Some(line) = console {
            self.rec.milestone(&line);
        }
        if phase.is_started() {
            systemd::ready();
        }
        Ok(state)
    }

    fn interrupt(&self) -> Interrupt {
        self.interrupts.current()
    }
}

/// The preemption watcher `--watch-preemption` asks for, started for the whole run (a notice
/// during registering means gitlab-runner never starts; during a hold, the hold ends).
fn watch_preemption(args: &RunArgs, platform: Option<Platform>) -> Option<preemption::Watcher> {
    let (watched, warning) =
        metadata::watched_platform(args.watch_preemption, args.config_source, platform);
    if let Some(warning) = warning {
        tracing::warn!("{warning}");
    }
    metadata::watch_notices(watched?, &args.metadata_url)
}

/// `now + wait`, or a deadline far beyond any VM's life when that overflows the clock.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
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
