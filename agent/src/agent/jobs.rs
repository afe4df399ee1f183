//! running and draining: gitlab-runner `run-single` until it exits. A drain (SIGUSR1,
//! `max_lifetime`, a notice that the VM goes away, or a rebalance recommendation once a job was
//! received) sends it SIGQUIT: finish the current job, take no new one. A notice with a deadline then sends SIGTERM when `preemption::plan` says, so that
//! gitlab-runner aborts and reports the job while the VM can still deregister.

use std::process::ExitStatus;
use std::time::{Duration, SystemTime};

use tokio::process::Child;
use tokio::time::Instant;

use nix::sys::signal::Signal;

use super::Context;
use super::error::AgentError;
use super::interrupt::Interrupt;
use super::state::{Job, Next, State, failed};
use super::{Agent, deadline_after};
use crate::preemption::{self, Action, Notice};
use crate::runner;

impl Agent {
    /// running: until gitlab-runner exits, a drain or `max_lifetime` (-> draining), or a stop.
    pub(super) async fn run_jobs(&mut self, mut job: Job) -> Next {
        let (why, notice) = tokio::select! {
            // A stop outranks everything else that may be ready at the same time.
            biased;
            _ = self.interrupts.reached(Interrupt::Stop) => {
                return self.stopping(Some(job.child));
            }
            exit = job.child.wait() => return self.jobs_ended(exit, job, false).await,
            _ = self.interrupts.reached(Interrupt::Drain) => {
                match (self.interrupt(), self.interrupts.notice()) {
                    (Interrupt::Preempted, Some(notice)) => draining_for(&notice),
                    _ => ("drain requested (SIGUSR1)".to_string(), None),
                }
            }
            notice = self.notice_that_drains(&mut job.jobs_received) => draining_for(&notice),
            _ = sleep_until_opt(job.lifetime_end) => {
                (format!("max_lifetime of {} s reached", job.max_lifetime_seconds), None)
            }
        };
        if let Err(e) = runner::send_signal(job.pid, Signal::SIGQUIT) {
            tracing::warn!(
                "cannot send SIGQUIT to gitlab-runner (pid {}): {e}",
                job.pid
            );
        }
        let detail = format!("{why}; gitlab-runner finishes its current job and takes no new one");
        let next = Next::to(State::Draining(job), detail);
        match notice {
            Some(line) => next.on_console(line),
            None => next,
        }
    }

    /// A notice resolves this once it stops further jobs (`preemption::drains_now`): one that
    /// the VM goes away at once, a rebalance recommendation once gitlab-runner received a job.
    async fn notice_that_drains(&self, jobs: &mut tokio::sync::watch::Receiver<u32>) -> Notice {
        let mut counting = true;
        loop {
            let seen = self.interrupts.notice();
            if let Some(notice) = &seen
                && preemption::drains_now(notice, *jobs.borrow_and_update())
            {
                return notice.clone();
            }
            tokio::select! {
                _ = self.interrupts.notice_other_than(seen.as_ref()) => {}
                // Its sender ends with the forwarding of gitlab-runner's output.
                changed = jobs.changed(), if counting => counting = changed.is_ok(),
            }
        }
    }

    /// draining: until gitlab-runner exits, a stop, or the abort a preemption notice plans
    /// (a notice may come, or grow more urgent, while draining).
    pub(super) async fn finish_jobs(&mut self, mut job: Job) -> Next {
        let quit_sent = Instant::now();
        loop {
            let notice = self.interrupts.notice();
            let abort_at = notice
                .as_ref()
                .and_then(|n| self.ctx.abort_time(n, quit_sent));
            let interrupts = self.interrupts.clone();
            tokio::select! {
                biased;
                _ = interrupts.reached(Interrupt::Stop) => {
                    return self.stopping(Some(job.child));
                }
                exit = job.child.wait() => return self.jobs_ended(exit, job, true).await,
                _ = sleep_until_opt(abort_at) => {
                    let notice = notice.expect("an abort time comes from a notice");
                    return self.abort_jobs(job, &notice).await;
                }
                _ = interrupts.notice_other_than(notice.as_ref()) => {}
            }
        }
    }

    /// SIGTERM to gitlab-runner within the notice's time (it aborts the job and reports it as
    /// a runner system failure), then the teardown: whatever its exit, this is no failure.
    async fn abort_jobs(&mut self, mut job: Job, notice: &Notice) -> Next {
        let now = SystemTime::now();
        let budget =
            preemption::abort_budget(notice, now, Duration::from_secs(self.ctx.args.stop_timeout));
        tracing::warn!(
            "{}: aborting the job now, so that gitlab-runner reports it (failure reason runner_system_failure) and the VM deregisters in time; gitlab-runner gets {} s",
            notice.describe(now),
            budget.as_secs()
        );
        self.rec.milestone(&format!(
            "aborting the job: {} (the job is reported as a runner system failure)",
            notice.describe(now)
        ));
        stop_child(&mut job.child, budget).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), job.forwarding).await;
        self.teardown()
    }

    async fn jobs_ended(
        &mut self,
        exit: std::io::Result<ExitStatus>,
        job: Job,
        draining: bool,
    ) -> Next {
        // Give the forwarder a moment to log gitlab-runner's last lines.
        let _ = tokio::time::timeout(Duration::from_secs(2), job.forwarding).await;
        match exit {
            Ok(status) if status.success() => {
                tracing::info!("gitlab-runner exited: its jobs are done");
                self.teardown()
            }
            Ok(status) if draining && killed_by(status, Signal::SIGQUIT) => {
                // Our SIGQUIT arrived before gitlab-runner had installed its handlers: it had
                // not taken a job yet, so this is the drain it was asked for, not a failure.
                tracing::info!(
                    "gitlab-runner ended on SIGQUIT before it could take a job: drained"
                );
                self.teardown()
            }
            Ok(status) => failed(AgentError::RunnerFailed(describe_exit(status))),
            Err(e) => failed(AgentError::RunnerWait(e.to_string())),
        }
    }
}

/// A drain for a notice: its reason, and the console's line that says why the VM takes no
/// more jobs.
fn draining_for(notice: &Notice) -> (String, Option<String>) {
    let why = notice.describe(SystemTime::now());
    let console = format!("draining: {why}");
    (why, Some(console))
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn killed_by(status: ExitStatus, signal: Signal) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal as i32)
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

/// SIGTERM (gitlab-runner aborts the job and reports it to GitLab), then SIGKILL after
/// `timeout`.
pub(super) async fn stop_child(child: &mut Child, timeout: Duration) {
    let Some(pid) = child.id() else { return };
    tracing::info!(
        "sending SIGTERM to gitlab-runner (pid {pid}); it aborts its job and reports it"
    );
    if let Err(e) = runner::send_signal(pid, Signal::SIGTERM) {
        tracing::warn!("cannot send SIGTERM to gitlab-runner: {e}");
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => tracing::info!("gitlab-runner exited with {}", describe_exit(status)),
        Ok(Err(e)) => tracing::warn!("cannot wait for gitlab-runner: {e}"),
        Err(_) => {
            tracing::warn!(
                "gitlab-runner did not exit within {} s of SIGTERM; killing it",
                timeout.as_secs()
            );
            let _ = child.kill().await;
        }
    }
}

/// The abort a notice plans, from the flags alone.
impl Context {
    /// When the notice wants gitlab-runner aborted: what `plan` says, but never sooner than
    /// `QUIT_TERM_GAP` after the SIGQUIT.
    fn abort_time(&self, notice: &Notice, quit_sent: Instant) -> Option<Instant> {
        let reserve = Duration::from_secs(self.args.stop_timeout) + preemption::DEREGISTER_RESERVE;
        match preemption::plan(notice, SystemTime::now(), reserve) {
            Action::Drain => None,
            Action::DrainThenAbort { after } => {
                Some(deadline_after(after).max(quit_sent + preemption::QUIT_TERM_GAP))
            }
        }
    }
}
