//! running and draining: gitlab-runner `run-single` until it exits. A drain (SIGUSR1 or
//! `max_lifetime`) sends it SIGQUIT: finish the current job, take no new one.

use std::process::ExitStatus;
use std::time::Duration;

use tokio::process::Child;

use nix::sys::signal::Signal;

use super::Agent;
use super::error::AgentError;
use super::interrupt::Interrupt;
use super::state::{Job, Next, State, failed};
use crate::runner;

impl Agent {
    /// running: until gitlab-runner exits, a drain or `max_lifetime` (-> draining), or a stop.
    pub(super) async fn run_jobs(&mut self, mut job: Job) -> Next {
        let why = tokio::select! {
            // A stop outranks everything else that may be ready at the same time.
            biased;
            _ = self.interrupts.reached(Interrupt::Stop) => {
                return self.stopping(Some(job.child), job.teardown);
            }
            exit = job.child.wait() => return self.jobs_ended(exit, job, false).await,
            _ = self.interrupts.reached(Interrupt::Drain) => "drain requested (SIGUSR1)".to_string(),
            _ = sleep_until_opt(job.lifetime_end) => {
                format!("max_lifetime of {} s reached", job.max_lifetime_seconds)
            }
        };
        if let Err(e) = runner::send_signal(job.pid, Signal::SIGQUIT) {
            tracing::warn!(
                "cannot send SIGQUIT to gitlab-runner (pid {}): {e}",
                job.pid
            );
        }
        let detail = format!("{why}; gitlab-runner finishes its current job and takes no new one");
        (State::Draining(job), detail)
    }

    /// draining: until gitlab-runner exits, or a stop.
    pub(super) async fn finish_jobs(&mut self, mut job: Job) -> Next {
        match self
            .interrupts
            .unless(Interrupt::Stop, job.child.wait())
            .await
        {
            Some(exit) => self.jobs_ended(exit, job, true).await,
            None => self.stopping(Some(job.child), job.teardown),
        }
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
                self.teardown(job.teardown)
            }
            Ok(status) if draining && killed_by(status, Signal::SIGQUIT) => {
                // Our SIGQUIT arrived before gitlab-runner had installed its handlers: it had
                // not taken a job yet, so this is the drain it was asked for, not a failure.
                tracing::info!(
                    "gitlab-runner ended on SIGQUIT before it could take a job: drained"
                );
                self.teardown(job.teardown)
            }
            Ok(status) => failed(
                AgentError::RunnerFailed(describe_exit(status)),
                job.teardown,
            ),
            Err(e) => failed(AgentError::RunnerWait(e.to_string()), job.teardown),
        }
    }
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
