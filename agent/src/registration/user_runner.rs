//! A personal, group or project access token: `POST /user/runners` creates an instance, group
//! or project runner for this VM, deleted again at the end.

use tokio::time::Instant;

use super::{Accepted, BoxFuture, CredentialFlow, Target, created};
use crate::config::{RunnerSettings, RunnerType};
use crate::gitlab::{self, Client, RetryError, RunnerInfo};
use crate::secret::Secret;

pub struct UserRunner {
    pub token: Secret,
    pub runner_type: RunnerType,
    pub info: RunnerInfo,
    pub settings: RunnerSettings,
    pub url: String,
}

impl CredentialFlow for UserRunner {
    fn describe(&self, _system_id: &str) -> String {
        format!(
            "creating a {} runner with access token {} at {}",
            self.runner_type.api_name(),
            self.token,
            self.url
        )
    }

    fn target(&self) -> Target {
        Target::Runner
    }

    fn known_runner_token(&self) -> Option<Secret> {
        None
    }

    fn register<'a>(
        &'a self,
        client: &'a Client,
        _system_id: &'a str,
        deadline: Instant,
        give_up: BoxFuture<'a, ()>,
    ) -> BoxFuture<'a, Result<Accepted, RetryError>> {
        Box::pin(async move {
            let runner = gitlab::with_retries_until("create runner", deadline, give_up, || {
                client.create_user_runner(
                    &self.token,
                    &self.runner_type,
                    &self.info,
                    &self.settings,
                )
            })
            .await?;
            Ok(created(runner))
        })
    }
}
