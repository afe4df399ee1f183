//! The end of a run: deregistering, holding (while the keep file exists), powering-off (after
//! the failure delay, during which the keep file still holds the VM), failed, stopping. A
//! restarted agent enters it from `resume`.

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
use crate::gitlab::Deletion;
use crate::hold::{self, HoldEnd};
use crate::lifecycle::{self, Phase};
use crate::preemption;
use crate::{power, systemd};

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
}
