//! A legacy registration token (`GR1348941…`): `POST /runners` creates a runner for this VM,
//! deleted again at the end. Disabled by default since GitLab 17.0 (it answers 410).

use tokio::time::Instant;

use super::{Accepted, BoxFuture, CredentialFlow, Target, created};
use crate::config::RunnerSettings;
use crate::gitlab::{self, Client, RetryError, RunnerInfo};
use crate::secret::Secret;

pub struct Legacy {
    pub token: Secret,
    pub info: RunnerInfo,
    pub settings: RunnerSettings,
    pub url: String,
}

impl CredentialFlow for Legacy {
    fn describe(&self, _system_id: &str) -> String {
        format!(
            "registering with registration token {} at {}",
            self.token, self.url
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
            let runner = gitlab::with_retries_until("register", deadline, give_up, || {
                client.register(&self.token, &self.info, &self.settings)
            })
            .await?;
            Ok(created(runner))
        })
    }
}
