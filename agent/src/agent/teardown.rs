//! The end of a run: deregistering, holding (while the keep file exists), powering-off (after
//! the failure delay, during which the keep file still holds the VM), failed, stopping; and
//! the resumption of a teardown by an agent restarted in the same boot, from its state
//! directory alone.

use std::process::ExitCode;
use std::sync::PoisonError;
use std::time::{Duration, SystemTime};

use tokio::process::Child;

use super::Context;
use super::error::AgentError;
use super::interrupt::Interrupt;
use super::jobs::stop_child;
use super::record::Event;
use super::record::GitLabKnows;
use super::record::Record;
use super::state::{Hold, Next, PowerOff, State, Stop};
use super::{Agent, deadline_after};
use crate::boot_record::BootRecord;
use crate::config::CredentialKind;
use crate::gitlab::{Client, Deletion};
use crate::hold::{self, HoldEnd};
use crate::lifecycle::{self, Phase, Registration};
use crate::metadata::ConfigSource;
use crate::preemption;
use crate::registration::{Registered, Target, possibly_created};
use crate::status::Status;
use crate::{power, runner, systemd};

impl Agent {
    /// Where teardown starts: deregistration if GitLab (may) know this VM, else the hold if the
    /// keep file exists, else the power-off.
    pub(super) fn teardown(&mut self) -> Next {
        self.rec
            .end_running_jobs("gitlab-runner ended without reporting its end");
        if self.rec.gitlab.needs_deregistration() {
            return Next::to(State::Deregistering, "removing this VM from GitLab");
        }
        self.after_deregistration()
    }

    /// Once GitLab was told (or there was nothing to tell): hold while the keep file exists,
    /// else power off.
    fn after_deregistration(&mut self) -> Next {
        let keep_file = hold::keep_file_exists(&self.ctx.args.keep_file);
        match lifecycle::after_deregistration(keep_file, self.interrupt()) {
            Phase::Holding => self.holding(),
            _ => self.powering_off(),
        }
    }

    fn holding(&mut self) -> Next {
        // The first hold of this boot sets the start that `--hold-max` counts from; a
        // restarted agent read it back (`resume`), so a restart never grants a new ceiling.
        let started = *self.rec.hold_started.get_or_insert_with(SystemTime::now);
        // Shown from the hold's first status.json on, not only once its step has begun.
        self.rec.hold_deadline =
            hold::deadline(&self.ctx.args.keep_file, self.ctx.hold_limits(), started);
        let detail = format!(
            "{} exists: keeping the VM for debugging until it is removed (gitlab-runner-vm release)",
            self.ctx.args.keep_file.display()
        );
        let until = self
            .rec
            .hold_deadline
            .map(|at| format!(", {} at most", crate::timestamp::fmt_time(at)))
            .unwrap_or_default();
        let console = format!("holding: {detail}{until}");
        Next::to(State::Holding(Hold { started }), detail).on_console(console)
    }

    fn powering_off(&mut self) -> Next {
        let now = SystemTime::now();
        let wait = lifecycle::poweroff_wait(
            self.rec.lc.failed_at,
            Duration::from_secs(self.ctx.args.failure_delay),
            now,
            self.interrupt(),
        );
        let at = now.checked_add(wait);
        // status.json shows it; the step reads it from its state.
        self.rec.poweroff_at = at;
        let action = if self.ctx.args.no_poweroff {
            "exiting without power-off (--no-poweroff)".to_string()
        } else {
            format!("running `{}`", self.ctx.args.poweroff_command)
        };
        let detail = if wait.is_zero() {
            action
        } else {
            format!(
                "{action} in {} s (--failure-delay after the failure; creating {} holds the VM)",
                wait.as_millis().div_ceil(1000),
                self.ctx.args.keep_file.display()
            )
        };
        Next::to(State::PoweringOff(PowerOff { at }), detail)
    }

    pub(super) fn stopping(&self, child: Option<Child>) -> Next {
        let detail = "stop requested (SIGTERM): aborting, deregistering, exiting";
        Next::to(State::Stopping(Stop { child }), detail).on_console(format!("stopping: {detail}"))
    }

    /// failed: the error is recorded (by `enter`); the teardown follows, unless the VM is being
    /// shut down from outside anyway.
    pub(super) fn after_failure(&mut self, _error: AgentError) -> Next {
        if self.interrupt() == Interrupt::Stop {
            return self.stopping(None);
        }
        self.teardown()
    }

    /// deregistering: runs to its (bounded) end even when a stop arrives meanwhile.
    pub(super) async fn deregister(&mut self) -> Next {
        self.delete_from_gitlab().await;
        if self.interrupt() == Interrupt::Stop {
            return self.stopping(None);
        }
        self.after_deregistration()
    }

    async fn delete_from_gitlab(&mut self) {
        let Some(registered) = self.rec.gitlab.means().cloned() else {
            let message = "cannot deregister: the runner token or GitLab's url of this boot is lost (config.toml is missing or unreadable); delete this VM's runner or manager in GitLab by hand (Settings > CI/CD > Runners)";
            tracing::warn!("{message}");
            self.rec.last_error = Some(message.into());
            self.rec.write_status();
            return;
        };
        let what = registered.describe();
        let budget = preemption::deregister_budget(
            self.interrupts.notice().as_ref(),
            SystemTime::now(),
            Duration::from_secs(self.ctx.args.deregister_timeout),
        );
        let deadline = deadline_after(budget);
        match registered.deregister(deadline).await {
            Ok(deletion) => {
                self.rec.gitlab = GitLabKnows::NoMore;
                let how = match deletion {
                    Deletion::Deleted => "deleted from GitLab",
                    Deletion::AlreadyGone => "was already gone from GitLab",
                };
                self.rec.note(Event::Done {
                    text: format!("deregistered: {what} {how}"),
                    mark: Some(BootRecord::deregistered),
                });
            }
            Err(e) => self.rec.note(Event::Trouble {
                text: format!(
                    "could not delete {what} from GitLab ({e}); powering off anyway: GitLab removes managers it has not seen for 7 days, or delete it under Settings > CI/CD > Runners"
                ),
                ends_the_run: false,
            }),
        }
    }

    /// holding: until the keep file is removed, or `--hold-extend` after its last change (or the
    /// hold's start), and never past `--hold-max` after the hold's start.
    pub(super) async fn hold(&mut self, Hold { started }: Hold) -> Next {
        let keep_file = self.ctx.args.keep_file.clone();
        let limits = self.ctx.hold_limits();
        let held = hold::hold(&keep_file, limits, started, |deadline| {
            self.rec.hold_deadline = Some(deadline);
            tracing::info!(
                "the hold lasts until {} at most (touching {} extends it by --hold-extend, up to --hold-max after the hold began)",
                crate::timestamp::fmt_time(deadline),
                keep_file.display()
            );
            self.rec.write_status();
        });
        let interrupts = self.interrupts.clone();
        let Some(end) = interrupts.unless(Interrupt::Preempted, held).await else {
            self.rec.hold_deadline = None;
            return self.interrupted_hold();
        };
        self.rec.hold_deadline = None;
        match end {
            Ok(HoldEnd::Released) => tracing::info!("hold ended: keep file removed"),
            Ok(HoldEnd::Expired) => {
                tracing::info!("hold ended: its deadline passed (--hold-extend, --hold-max)")
            }
            Err(e) => tracing::error!("cannot watch {}: {e}; ending the hold", keep_file.display()),
        }
        self.powering_off()
    }

    /// powering-off: after the failure delay (a keep file created meanwhile holds the VM), the
    /// power-off command, or with --no-poweroff just the exit.
    pub(super) async fn power_off(&mut self, PowerOff { at }: PowerOff) -> Next {
        let wait = at
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::ZERO);
        let keep_file = self.ctx.args.keep_file.clone();
        // The wait ends early when the platform takes the VM anyway (no boot loop to slow
        // down), and becomes a hold when the keep file is created meanwhile.
        let waited = self.interrupts.unless(Interrupt::Preempted, async {
            tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                Ok(()) = hold::keep_file_created(&keep_file), if !wait.is_zero() => true,
            }
        });
        match waited.await {
            None if self.interrupt() == Interrupt::Stop => return self.stopping(None),
            Some(true) => {
                self.rec.poweroff_at = None;
                return self.holding();
            }
            None | Some(false) => {}
        }
        self.end_watcher();
        systemd::stopping();
        if self.ctx.args.no_poweroff {
            self.rec.note(Event::Done {
                text: "exiting without power-off (--no-poweroff); the VM stays up".into(),
                mark: None,
            });
            self.rec.end_of_boot("no-poweroff").await;
            return exit(ExitCode::SUCCESS);
        }
        self.rec.note(Event::Done {
            text: "powering off".into(),
            mark: None,
        });
        self.rec.end_of_boot("poweroff").await;
        match power::power_off(&self.ctx.args.poweroff_command, power::TIMEOUT).await {
            Ok(()) => {
                tracing::info!("power-off requested");
                exit(ExitCode::SUCCESS)
            }
            Err(e) => {
                self.rec.note(Event::Trouble {
                    text: format!("power-off failed: {e:#}"),
                    ends_the_run: true,
                });
                self.rec.console.flush(CONSOLE_FLUSH).await;
                exit(ExitCode::FAILURE)
            }
        }
    }

    /// stopping: the VM is shut down from outside. Abort the job, deregister, exit 0 without
    /// powering off (the platform is already doing that).
    pub(super) async fn stop(&mut self, stop: Stop) -> Next {
        self.end_watcher();
        systemd::stopping();
        if let Some(mut child) = stop.child {
            let mut timeout = Duration::from_secs(self.ctx.args.stop_timeout);
            if let Some(notice) = self.interrupts.notice() {
                timeout = preemption::abort_budget(&notice, SystemTime::now(), timeout);
            }
            stop_child(&mut child, timeout).await;
            self.rec.end_running_jobs("aborted by the stop");
        }
        if self.rec.gitlab.needs_deregistration() {
            self.delete_from_gitlab().await;
        }
        self.rec.note(Event::Done {
            text: "stopped".into(),
            mark: None,
        });
        self.rec.end_of_boot("stop").await;
        exit(ExitCode::SUCCESS)
    }

    /// A restarted agent found a status.json of this boot (or of a boot it cannot tell) that
    /// it cannot read: whatever this boot did is unknown, so it is taken as the worst (it
    /// registered and ran a job). No registration, no gitlab-runner: the teardown deletes what
    /// config.toml names and powers off. Which flow registered is unknown too, so the deletion
    /// is of this VM's manager: deleting "the runner" with a shared `glrt-` token would remove
    /// the whole fleet's runner from GitLab.
    pub(super) fn fail_closed(&mut self) {
        let state_dir = self.ctx.args.state_dir.clone();
        self.rec.system_id = runner::read_system_id(&state_dir);
        // With the broker every runner is this boot's own: deleting it removes nobody else's.
        let target = if self.ctx.args.config_source == ConfigSource::Broker {
            Target::Runner
        } else {
            Target::Manager
        };
        let entry = runner::read_runner_entry(&state_dir);
        if let Some(entry) = &entry {
            self.rec.shown.gitlab_url = Some(entry.url.clone());
        }
        let registered = entry.and_then(|entry| self.rec.deregistration_from(entry, target));
        match &registered {
            Some(_) if target == Target::Runner => tracing::warn!(
                "tearing down with what config.toml names: this boot's own runner (from the broker) is deleted from GitLab"
            ),
            Some(_) => tracing::warn!(
                "tearing down with what config.toml names: this VM's runner manager is deleted from GitLab; a runner this boot created (registration_token, access_token) stays: delete it by hand (Settings > CI/CD > Runners)"
            ),
            None => tracing::warn!(
                "config.toml names no runner: nothing to deregister; if this boot created a runner, delete it by hand (Settings > CI/CD > Runners)"
            ),
        }
        self.rec.gitlab = match registered {
            Some(registered) => GitLabKnows::ThisVm(Some(registered)),
            None => GitLabKnows::Nothing,
        };
    }

    /// A restarted agent found that this boot already registered, started gitlab-runner, was
    /// registering or began its teardown: it never starts another gitlab-runner, and resumes the
    /// teardown from the state directory alone (runner.json may be what made it crash).
    pub(super) fn resume(&mut self, prev: Status) {
        let what = if prev.runner_started {
            "started gitlab-runner"
        } else if prev.registered {
            "registered with GitLab"
        } else if prev.phase == Phase::Registering {
            "was registering"
        } else {
            "began its teardown"
        };
        tracing::warn!(
            "status.json shows that this boot already {what} (the agent was restarted); tearing down instead of starting another gitlab-runner"
        );
        let state_dir = self.ctx.args.state_dir.clone();
        self.rec.system_id = runner::read_system_id(&state_dir).or(prev.system_id.clone());
        // The broker's runner is this boot's own, whatever its token looks like.
        let own_runner = self.ctx.args.config_source == ConfigSource::Broker;
        let target = if prev.credential == Some(CredentialKind::RunnerToken) && !own_runner {
            Target::Manager
        } else {
            Target::Runner
        };
        let registered = runner::read_runner_entry(&state_dir)
            .and_then(|entry| self.rec.deregistration_from(entry, target));
        let mut shown = Registration::from_flags(prev.registered, prev.deregistered);
        if prev.phase == Phase::Registering && target.only_the_answer_names_it() {
            // A runner created just before the crash is in config.toml already; else its
            // token is lost.
            match registered {
                Some(_) => shown = Registration::Registered,
                None => tracing::warn!(
                    "{}",
                    possibly_created(prev.runner.as_deref().unwrap_or("?"))
                ),
            }
        }
        self.rec.gitlab = GitLabKnows::resumed(shown, registered);
        self.rec.resume(prev);
    }

    /// A hold cut short: by a stop, or by a notice that the VM goes away, after which nothing
    /// holds or delays the power-off (`Interrupt::allows_hold_and_delay`).
    fn interrupted_hold(&mut self) -> Next {
        if self.interrupt() == Interrupt::Stop {
            return self.stopping(None);
        }
        tracing::warn!(
            "hold ended: a preemption notice says the VM goes away ({})",
            self.interrupts.describe()
        );
        self.powering_off()
    }

    fn end_watcher(&mut self) {
        if let Some(task) = self.watcher.take() {
            task.abort();
        }
    }
}

/// How long the last console lines may hold the power-off up.
const CONSOLE_FLUSH: Duration = Duration::from_secs(2);

fn exit(code: ExitCode) -> Next {
    Next::to(State::Exit(code), "")
}

/// The hold's limits, from the flags.
impl Context {
    fn hold_limits(&self) -> hold::HoldLimits {
        hold::HoldLimits {
            max: Duration::from_secs(self.args.hold_max),
            extend: Duration::from_secs(self.args.hold_extend),
        }
    }
}

/// The end of jobs and of the boot in the record, and what a restarted agent finds in
/// config.toml.
impl Record {
    /// Jobs gitlab-runner started and never reported the end of: in the record they end now.
    fn end_running_jobs(&mut self, why: &str) {
        let now = crate::boot_record::now_ms();
        let ended = self
            .boot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .abandon_running(now);
        for (job, ms) in ended {
            let text = format!("job {job} {why}, after {}", crate::boot_record::seconds(ms));
            tracing::warn!("{text}");
            self.milestone(&text);
        }
    }

    /// The end of this boot's run: the boot record to the journal (one structured entry),
    /// status.json and the console, whose lines are out before the power-off cuts them.
    async fn end_of_boot(&mut self, ended_by: &str) {
        self.mark(|record, at| record.ended(at, ended_by));
        let record = self
            .boot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        record.log();
        self.milestone(&format!("boot record: {}", record.summary()));
        self.write_status();
        self.console.flush(CONSOLE_FLUSH).await;
    }

    /// What a deregistration needs, from config.toml's runner entry (which a restarted agent
    /// finds in the state directory); None without a token or a usable URL.
    fn deregistration_from(
        &self,
        entry: runner::RunnerEntry,
        target: Target,
    ) -> Option<Registered> {
        let client = Client::new(&entry.url, entry.tls_ca_file.as_deref())
            .map_err(|e| tracing::warn!("cannot set up the client for deregistration: {e:#}"))
            .ok()?;
        Some(Registered {
            client,
            runner_token: entry.token?,
            system_id: self.system_id.clone().unwrap_or_default(),
            target,
        })
    }
}
