//! A `glrt-` runner authentication token, usually shared by a whole fleet: each VM is one of
//! the runner's managers, told apart by its system id. `POST /runners/verify` creates (or
//! refreshes) the manager; tags, protection and timeout live in GitLab.

use tokio::time::Instant;

use super::{Accepted, BoxFuture, CredentialFlow, Target};
use crate::gitlab::{self, Client, RetryError, RunnerInfo};
use crate::secret::Secret;

pub struct Manager {
    pub token: Secret,
    pub info: RunnerInfo,
    pub url: String,
    /// The runner is this boot's own (the broker's): teardown deletes it, not only the manager.
    pub own_runner: bool,
}

impl CredentialFlow for Manager {
    fn describe(&self, system_id: &str) -> String {
        let whose = if self.own_runner {
            " (this boot's own runner, from the broker)"
        } else {
            ""
        };
        format!(
            "verifying runner token {}{whose} as manager {system_id} with {}",
            self.token, self.url
        )
    }

    fn target(&self) -> Target {
        if self.own_runner {
            Target::Runner
        } else {
            Target::Manager
        }
    }

    fn known_runner_token(&self) -> Option<Secret> {
        Some(self.token.clone())
    }

    fn register<'a>(
        &'a self,
        client: &'a Client,
        system_id: &'a str,
        deadline: Instant,
        give_up: BoxFuture<'a, ()>,
    ) -> BoxFuture<'a, Result<Accepted, RetryError>> {
        Box::pin(async move {
            let token_expires_at = gitlab::with_retries_until("verify", deadline, give_up, || {
                client.verify(&self.token, system_id, &self.info)
            })
            .await?;
            tracing::info!("runner token accepted; this VM is runner manager {system_id}");
            Ok(Accepted {
                token: self.token.clone(),
                token_expires_at,
            })
        })
    }
}
