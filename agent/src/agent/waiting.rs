//! waiting-for-config: runner.json is obtained (`sources`: it appears, is fetched from the
//! platform's user-data or asked of the broker), read once whole and validated; then
//! everything registration needs is prepared: the HTTP client, the runner user, this boot's
//! system id and config.toml.

use std::time::Duration;

use super::Context;
use super::error::AgentError;
use super::interrupt::Interrupt;
use super::record::GitLabKnows;
use super::record::Shown;
use super::state::{Next, Setup, State, failed};
use super::{Agent, deadline_after};
use crate::config::RunnerConfig;
use crate::gitlab::Client;
use crate::metadata::ConfigSource;
use crate::registration;
use crate::runner::{self, Account, ShellJobs};
use crate::{cli, files};

impl Agent {
    pub(super) async fn wait_for_config(&mut self) -> Next {
        let deadline = deadline_after(Duration::from_secs(self.ctx.args.config_wait));
        let platform = self.ctx.config_platform();
        if let Some(platform) = platform {
            self.rec.publish(&format!(
                "fetching runner.json from the {platform} instance's user-data"
            ));
        }
        // A drain asked for before runner.json was read means nothing is left to run.
        let text = match self
            .interrupts
            .unless(Interrupt::Drain, self.ctx.obtain_config(platform, deadline))
            .await
        {
            Some(Ok(text)) => text,
            Some(Err(error)) => return failed(error),
            None if self.interrupt() == Interrupt::Stop => {
                return self.stopping(None);
            }
            None => {
                tracing::info!("drain requested before runner.json was read: nothing to run");
                return self.teardown();
            }
        };
        let config = match self.validate(&text) {
            Ok(config) => config,
            Err(error) => return failed(error),
        };
        // Before any GitLab call (fleet_settings.rs): a VM whose daemons or firewall cannot
        // take the fleet's settings takes no job. A reload that hangs is waited for no longer
        // than an interrupt allows: a drain, a notice or a stop ends it (its processes killed)
        // as they end the wait for runner.json, with nothing registered.
        match self
            .interrupts
            .unless(Interrupt::Drain, self.apply_fleet_settings(&config))
            .await
        {
            Some(Ok(())) => {}
            Some(Err(error)) => return failed(error),
            None if self.interrupt() == Interrupt::Stop => {
                return self.stopping(None);
            }
            None => {
                tracing::info!(
                    "{} while the daemons were being reloaded: not registering, tearing down",
                    self.interrupts.describe()
                );
                return self.teardown();
            }
        }
        match self.set_up(config) {
            Ok(setup) => {
                // Any verify that reaches GitLab creates (or refreshes) this VM's manager,
                // whether its answer then arrives, times out or is interrupted: from the first
                // one on, teardown deletes it. `enter` records this before the request goes.
                // A runner the broker gave this boot exists already: teardown deletes it too.
                if let Some(registered) = setup.known_before_registering() {
                    self.rec.gitlab = GitLabKnows::ThisVm(Some(registered));
                }
                let detail = setup.flow.describe(&setup.system_id);
                Next::to(State::Registering(Box::new(setup)), detail)
            }
            Err(error) => failed(error),
        }
    }

    fn validate(&mut self, text: &str) -> Result<RunnerConfig, AgentError> {
        let path = &self.ctx.args.config;
        let validated = crate::config::validate(text, &cli::default_runner_name(), &|p| {
            files::read_text(p, files::NAMED_FILE_CAP)
        });
        for problem in &validated.problems {
            tracing::warn!("{}: {problem}", path.display());
        }
        let Some(config) = validated.config else {
            return Err(AgentError::ConfigInvalid {
                path: path.clone(),
                count: validated.errors().count(),
                summary: validated
                    .errors()
                    .map(|p| format!("{}: {}", p.path, p.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        };
        self.rec.shown = Shown {
            runner: Some(config.name.clone()),
            credential: Some(config.credential.kind()),
            gitlab_url: Some(config.url.clone()),
        };
        Ok(config)
    }

    /// The client, the job user, a fresh system id and config.toml, before any GitLab call.
    fn set_up(&mut self, config: RunnerConfig) -> Result<Setup, AgentError> {
        let client = Client::new(&config.url, config.tls_ca_file.as_deref())
            .map_err(|e| AgentError::TlsCaFile(format!("{e:#}")))?;
        let job_user = Account::resolve(self.ctx.args.job_user.as_deref())
            .map_err(|e| AgentError::JobUser(format!("{e:#}")))?;
        if job_user.uid.is_root() && config.executor == crate::config::Executor::Shell {
            // job-exec refuses: every job of this VM would fail. Said before registering.
            return Err(AgentError::JobUser(
                "shell jobs would run as root (no --job-user, and the agent runs as root): job-exec refuses, since root can read the runner token".into(),
            ));
        }
        let own = Account::resolve(None).map_err(|e| AgentError::JobUser(format!("{e:#}")))?;
        let runner_env = runner::scrubbed_environment(&own, |key| std::env::var(key).ok());
        let jobs_cgroup = self.ctx.runner_cgroup.as_ref().map(|c| c.jobs.clone());
        let shell_jobs = ShellJobs::for_user(&job_user, jobs_cgroup);
        let system_id =
            runner::generate_system_id().map_err(|e| AgentError::SystemId(e.to_string()))?;
        self.rec.system_id = Some(system_id.clone());
        let own_runner = self.ctx.args.config_source == ConfigSource::Broker;
        let flow = registration::flow_for(&config, own_runner);
        // gitlab-runner reads both files. A runner token known now is written now; a created
        // runner's token is written when GitLab returns it.
        let toml = flow
            .known_runner_token()
            .map(|token| runner::render_config_toml(&config, &token, &shell_jobs))
            .unwrap_or_default();
        self.ctx.write_runner_files(&system_id, &toml)?;
        Ok(Setup {
            config,
            client,
            shell_jobs,
            runner_env,
            system_id,
            flow,
        })
    }
}

/// Where the runner's files go.
impl Context {
    pub(super) fn write_runner_files(
        &self,
        system_id: &str,
        config_toml: &str,
    ) -> Result<(), AgentError> {
        runner::write_state_files(&self.args.state_dir, system_id, config_toml).map_err(|e| {
            AgentError::StateDir {
                dir: self.args.state_dir.clone(),
                detail: format!("{e:#}"),
            }
        })
    }
}
