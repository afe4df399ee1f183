//! How this VM becomes a runner in GitLab and stops being one. One module per kind of
//! credential, behind the small `CredentialFlow` trait, as afterburn has one module per
//! platform:
//!
//! - `manager`: a `glrt-` runner authentication token shared by the fleet; this VM is one of
//!   the runner's managers (`POST /runners/verify`, `DELETE /runners/managers`); or the token
//!   of a runner the broker created for this boot alone, verified the same way and deleted
//!   whole at the end (`DELETE /runners`);
//! - `legacy`: a registration token creates a runner per VM (`POST /runners`);
//! - `user_runner`: an access token creates a runner per VM (`POST /user/runners`).
//!
//! What registration leaves behind is a `Registered`: everything deregistration needs, which a
//! restarted agent can also rebuild from its state directory alone (`config.toml` keeps the
//! URL and the token, `.runner_system_id` the system id), without runner.json.

pub mod expiry;
mod legacy;
mod manager;
mod user_runner;

use std::future::Future;
use std::pin::Pin;

use tokio::time::Instant;

use crate::config::{Credential, RunnerConfig};
use crate::gitlab::{self, Client, Deletion, RetryError, RunnerInfo};
use crate::secret::Secret;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// One way of registering, chosen by the credential in runner.json.
pub trait CredentialFlow {
    /// The `registering` line of status.json and the log (tokens masked).
    fn describe(&self, system_id: &str) -> String;
    /// What deregistration deletes.
    fn target(&self) -> Target;
    /// The token gitlab-runner uses when it is known before registering (a shared `glrt-`
    /// token): config.toml is then written before the first request, so that the manager GitLab
    /// creates and the one gitlab-runner reports are the same.
    fn known_runner_token(&self) -> Option<Secret>;
    /// Registers with GitLab; the answer is the token gitlab-runner uses. Once `give_up`
    /// resolves (a drain, a notice, a stop) no further attempt is made; a create request in
    /// flight still gets its answer (`gitlab::with_retries_until`).
    fn register<'a>(
        &'a self,
        client: &'a Client,
        system_id: &'a str,
        deadline: Instant,
        give_up: BoxFuture<'a, ()>,
    ) -> BoxFuture<'a, Result<Accepted, RetryError>>;
}

/// What GitLab answered a registration with.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The token gitlab-runner uses.
    pub token: Secret,
    /// When that token expires, as GitLab wrote it (`expiry` judges it).
    pub token_expires_at: Option<String>,
}

/// The flow for runner.json's credential. `own_runner`: a `glrt-` token is this boot's own
/// runner, minted for it by the broker (`--config-source broker`), so that teardown deletes the
/// runner itself rather than this VM's manager of a runner the fleet shares.
pub fn flow_for(config: &RunnerConfig, own_runner: bool) -> Box<dyn CredentialFlow> {
    let info = RunnerInfo {
        name: config.name.clone(),
        executor: config.executor,
    };
    match &config.credential {
        Credential::RunnerToken(token) => Box::new(manager::Manager {
            token: token.clone(),
            info,
            url: config.url.clone(),
            own_runner,
        }),
        Credential::RegistrationToken(token) => Box::new(legacy::Legacy {
            token: token.clone(),
            info,
            settings: config.settings.clone(),
            url: config.url.clone(),
        }),
        Credential::AccessToken { token, runner_type } => Box::new(user_runner::UserRunner {
            token: token.clone(),
            runner_type: runner_type.clone(),
            info,
            settings: config.settings.clone(),
            url: config.url.clone(),
        }),
    }
}

/// What deregistration deletes in GitLab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This VM's manager of a runner that the fleet shares: never the runner itself.
    Manager,
    /// The runner GitLab created for this VM (or the broker for this boot).
    Runner,
}

impl Target {
    /// A creating flow's request cut off mid-flight may have created a runner that only its
    /// answer names (a stop waits for that answer); a verify may have created a manager, which
    /// the system id names whatever happens.
    pub fn only_the_answer_names_it(self) -> bool {
        self == Target::Runner
    }
}

/// This VM as GitLab knows it: enough to delete it.
#[derive(Debug, Clone)]
pub struct Registered {
    pub client: Client,
    pub runner_token: Secret,
    pub system_id: String,
    pub target: Target,
}

impl Registered {
    /// "runner manager r_…" or "runner", for the log.
    pub fn describe(&self) -> String {
        match self.target {
            Target::Manager => format!("runner manager {}", self.system_id),
            Target::Runner => "runner".to_string(),
        }
    }

    /// Deletes this VM's manager or runner, retried within `deadline` (throttled deletions
    /// keep going a while longer: see `gitlab::with_retries`).
    pub async fn deregister(&self, deadline: Instant) -> Result<Deletion, RetryError> {
        let (client, token, system_id) = (&self.client, &self.runner_token, &self.system_id);
        match self.target {
            Target::Manager => {
                gitlab::with_retries("deregister", deadline, || {
                    client.delete_manager(token, system_id)
                })
                .await
            }
            Target::Runner => {
                gitlab::with_retries("deregister", deadline, || client.delete_runner(token)).await
            }
        }
    }
}

/// The token of a runner GitLab created for this VM, logged (masked) with its id.
fn created(runner: gitlab::CreatedRunner) -> Accepted {
    tracing::info!(
        "GitLab created runner {} with token {}",
        runner
            .id
            .map(|i| i.to_string())
            .unwrap_or_else(|| "?".into()),
        runner.token
    );
    Accepted {
        token: runner.token,
        token_expires_at: runner.token_expires_at,
    }
}

/// What an operator must know when a create request's fate is unknown.
pub fn possibly_created(name: &str) -> String {
    format!(
        "GitLab may have created a runner named \"{name}\" for this VM without this VM learning its token, so it cannot be deleted from here; if it is listed under Settings > CI/CD > Runners, delete it there"
    )
}
