//! The states of a run, each carrying what its step needs. The phase shown in status.json is
//! derived from the state; `lifecycle` decides which moves between phases are legal.

use std::process::ExitCode;
use std::time::SystemTime;

use tokio::process::Child;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::error::AgentError;
use crate::config::RunnerConfig;
use crate::gitlab::Client;
use crate::lifecycle::Phase;
use crate::registration::{CredentialFlow, Registered};
use crate::runner::ShellJobs;
use crate::secret::Secret;

pub enum State {
    WaitingForConfig,
    /// Boxed: the largest state by far, and entered once.
    Registering(Box<Setup>),
    Running(Job),
    Draining(Job),
    Deregistering,
    Holding(Hold),
    PoweringOff(PowerOff),
    Failed(AgentError),
    Stopping(Stop),
    /// The run is over: the process exits with this code.
    Exit(ExitCode),
}

impl State {
    pub fn phase(&self) -> Option<Phase> {
        Some(match self {
            State::WaitingForConfig => Phase::WaitingForConfig,
            State::Registering(_) => Phase::Registering,
            State::Running(_) => Phase::Running,
            State::Draining(_) => Phase::Draining,
            State::Deregistering => Phase::Deregistering,
            State::Holding(_) => Phase::Holding,
            State::PoweringOff(_) => Phase::PoweringOff,
            State::Failed(_) => Phase::Failed,
            State::Stopping(_) => Phase::Stopping,
            State::Exit(_) => return None,
        })
    }
}

/// The next state, the line that says why (status.json, `STATUS=`, the journal), and for a
/// move that an operator watching the serial console must see (a hold, a stop, a drain for a
/// notice), the console's line: `enter` tells each place once the move is made.
pub struct Next {
    pub state: State,
    pub detail: String,
    pub console: Option<String>,
}

impl Next {
    pub fn to(state: State, detail: impl Into<String>) -> Self {
        Next {
            state,
            detail: detail.into(),
            console: None,
        }
    }

    /// Said on the console too, as `line`.
    pub fn on_console(mut self, line: String) -> Self {
        self.console = Some(line);
        self
    }
}

/// registering: runner.json read, the job user resolved, the system id and config.toml
/// written.
pub struct Setup {
    pub config: RunnerConfig,
    pub client: Client,
    /// How shell jobs reach the job user (`job-exec` switches to it; gitlab-runner never does).
    pub shell_jobs: ShellJobs,
    /// gitlab-runner's whole environment, made from the agent's own account before any
    /// GitLab call: gitlab-runner runs as the agent, never as the job user.
    pub runner_env: Vec<(String, String)>,
    pub system_id: String,
    pub flow: Box<dyn CredentialFlow>,
}

impl Setup {
    /// This VM as GitLab knows it once `runner_token` names it (the flow says whether that is
    /// this VM's manager or a runner of its own).
    pub fn registered(&self, runner_token: Secret) -> Registered {
        Registered {
            client: self.client.clone(),
            runner_token,
            system_id: self.system_id.clone(),
            target: self.flow.target(),
        }
    }

    /// What GitLab knows of this VM before the flow's first request: the manager a verify
    /// creates (from the first one on, teardown deletes it: the request may reach GitLab
    /// whatever becomes of its answer), or the runner the broker created for this boot.
    pub fn known_before_registering(&self) -> Option<Registered> {
        self.flow
            .known_runner_token()
            .map(|token| self.registered(token))
    }
}

/// running and draining: gitlab-runner and the forwarding of its output.
pub struct Job {
    pub child: Child,
    pub pid: u32,
    pub forwarding: JoinHandle<()>,
    /// How many jobs gitlab-runner received so far (from its output).
    pub jobs_received: tokio::sync::watch::Receiver<u32>,
    /// `max_lifetime`: the drain starts here.
    pub lifetime_end: Option<Instant>,
    pub max_lifetime_seconds: u64,
}

/// holding: the VM kept for debugging while the keep file exists.
pub struct Hold {
    /// When this boot's hold began: `--hold-max` counts from it, across restarts.
    pub started: SystemTime,
}

/// powering-off: the power-off command (or the exit) is due at `at`, after the failure delay;
/// None: at once.
pub struct PowerOff {
    pub at: Option<SystemTime>,
}

/// stopping: SIGTERM from outside.
pub struct Stop {
    pub child: Option<Child>,
}

/// A failure; the teardown follows it.
pub fn failed(error: AgentError) -> Next {
    let detail = error.to_string();
    Next::to(State::Failed(error), detail)
}
