//! waiting-for-config: runner.json appears (inotify and the mount table, no polling), or is
//! fetched from the platform's user-data and written there; it is read once whole and
//! validated; then everything registration needs is prepared: the HTTP client, the runner user,
//! this boot's system id and config.toml.

use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::AddWatchFlags;
use tokio::time::Instant;

use super::Context;
use super::error::AgentError;
use super::interrupt::Interrupt;
use super::record::GitLabKnows;
use super::record::Shown;
use super::state::{Next, Setup, State, failed};
use super::{Agent, deadline_after};
use crate::broker::{self, BrokerClient};
use crate::config::RunnerConfig;
use crate::gitlab::Client;
use crate::metadata::{ConfigSource, MetadataClient, NotRunnerJson, Platform, fetch_runner_json};
use crate::registration;
use crate::runner::{self, Account, ShellJobs};
use crate::{cli, files, fswatch};

/// How long a half-written runner.json may go without changing before it is judged as it is.
const CONFIG_SETTLE: Duration = Duration::from_secs(10);

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

/// Reads runner.json once it is whole. A writer may create the file and fill it later (or pause
/// mid-file): while the text is empty or ends before the JSON does, wait for the file to change
/// again, for at most `CONFIG_SETTLE` without a change and never past `deadline`. Complete but
/// invalid JSON is returned at once, for validation to report.
async fn read_complete(path: &Path, deadline: Instant) -> Result<String, AgentError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    // No watch while the file reads whole (the usual case): closing an inotify instance that
    // holds a watch waits for a kernel grace period (see fswatch::wait_for_file).
    let mut watch: Option<fswatch::DirWatch> = None;
    loop {
        let text = files::read_text(path, files::CONFIG_CAP).map_err(|e| {
            AgentError::ConfigUnreadable {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        })?;
        let incomplete = text.trim().is_empty()
            || serde_json::from_str::<serde_json::Value>(&text).is_err_and(|e| e.is_eof());
        if !incomplete {
            return Ok(text);
        }
        let Some(changes) = &watch else {
            // Watch first, then read again, so that a write in between is not missed. Without
            // a watch, validation reports what is there.
            watch = fswatch::DirWatch::new(
                dir,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE,
            )
            .ok();
            if watch.is_none() {
                return Ok(text);
            }
            continue;
        };
        tracing::info!(
            "{} is incomplete ({} bytes); waiting for its writer to finish",
            path.display(),
            text.len()
        );
        let settle = deadline_after(CONFIG_SETTLE).min(deadline);
        match tokio::time::timeout_at(settle, changes.changed()).await {
            Ok(Ok(())) => continue,
            // No change in time (or the watch broke): validation reports what is there.
            Ok(Err(_)) | Err(_) => return Ok(text),
        }
    }
}

/// Where runner.json comes from (the file, the platform's user-data, the broker) and where
/// the runner's files go: the flags and the platform alone decide.
impl Context {
    /// The platform whose user-data is runner.json (None: the file), said in the journal.
    fn config_platform(&self) -> Option<Platform> {
        let (source, platform) = (self.args.config_source, self.platform);
        match (source, platform) {
            (ConfigSource::Auto, None) => tracing::info!(
                "--config-source auto: no cloud platform recognised from DMI/SMBIOS ({}); runner.json is the file {}",
                self.args.dmi_dir.display(),
                self.args.config.display()
            ),
            (ConfigSource::Auto, Some(platform)) => tracing::info!(
                "--config-source auto: DMI/SMBIOS ({}) says {platform}",
                self.args.dmi_dir.display()
            ),
            _ => {}
        }
        platform
    }

    /// runner.json's text: fetched from the platform's user-data into the file first when
    /// there is a platform, then read as a file is.
    async fn obtain_config(
        &self,
        platform: Option<Platform>,
        deadline: Instant,
    ) -> Result<String, AgentError> {
        if let Some(platform) = platform {
            self.fetch_user_data(platform, deadline).await?;
        } else if self.args.config_source == ConfigSource::Broker {
            self.fetch_from_broker(deadline).await?;
        }
        self.read_config(deadline).await
    }

    /// Asks the broker for this boot's runner and writes runner.json from its answer to
    /// `--config` (0600, its directory 0700 if new), unless a file is already there: this
    /// boot's earlier run (a restarted agent asks the broker nothing twice; the broker would
    /// refuse a second request for this pod anyway).
    async fn fetch_from_broker(&self, deadline: Instant) -> Result<(), AgentError> {
        let path = &self.args.config;
        if std::fs::symlink_metadata(path).is_ok() {
            tracing::info!(
                "{} already exists (an earlier run in this boot): using it; the broker is not asked",
                path.display()
            );
            return Ok(());
        }
        let client = BrokerClient::new(&self.args.broker_url).map_err(AgentError::Broker)?;
        tracing::info!(
            "runner.json from the broker: POST {} with the pod's token from {} (--config-source broker)",
            client.url(),
            self.args.broker_token_file.display()
        );
        let granted = broker::fetch_runner(
            &client,
            &self.args.broker_token_file,
            deadline,
            self.args.config_wait,
        )
        .await
        .map_err(AgentError::Broker)?;
        let text = granted.runner_json();
        files::write_atomically(path, text.as_bytes(), 0o600, 0o700).map_err(|e| {
            AgentError::ConfigWrite {
                path: path.clone(),
                detail: e.to_string(),
            }
        })?;
        tracing::info!(
            "the broker granted runner {} (token {}) at {}; wrote runner.json to {} (0600)",
            granted
                .runner_id
                .map(|id| id.to_string())
                .unwrap_or_else(|| "?".into()),
            granted.token,
            granted.url,
            path.display()
        );
        Ok(())
    }

    /// Writes the instance's user-data to `--config` (0600, its directory 0700 if new), unless
    /// a file is already there: a config disk, the image, or this boot's earlier run (a
    /// restarted agent fetches nothing twice). User-data is never logged, only its size.
    async fn fetch_user_data(
        &self,
        platform: Platform,
        deadline: Instant,
    ) -> Result<(), AgentError> {
        let path = &self.args.config;
        if let Some(target) = files::dangling_link(path) {
            // Writing the user-data would replace the link someone put there on purpose.
            tracing::warn!(
                "{} is a symbolic link to {}, which does not exist: the {platform} user-data is not fetched (it would replace the link); waiting for {} (remove the link to have the user-data fetched)",
                path.display(),
                target.display(),
                target.display()
            );
            return Ok(());
        }
        if std::fs::symlink_metadata(path).is_ok() {
            tracing::info!(
                "{} already exists (a config disk, the image, or an earlier run in this boot): using it; the {platform} user-data is not fetched",
                path.display()
            );
            return Ok(());
        }
        let client =
            MetadataClient::new(platform, &self.args.metadata_url).map_err(AgentError::Metadata)?;
        tracing::info!(
            "runner.json from the {platform} metadata service: {} (--config-source {})",
            client.url(platform.user_data_path()),
            self.args.config_source
        );
        let text = match fetch_runner_json(&client, deadline)
            .await
            .map_err(AgentError::Metadata)?
        {
            Ok(text) => text,
            Err(NotRunnerJson::Missing) => return Err(AgentError::UserDataMissing { platform }),
            Err(NotRunnerJson::Other(what)) => {
                return Err(AgentError::UserDataNotRunnerJson { platform, what });
            }
        };
        files::write_atomically(path, text.as_bytes(), 0o600, 0o700).map_err(|e| {
            AgentError::ConfigWrite {
                path: path.clone(),
                detail: e.to_string(),
            }
        })?;
        tracing::info!(
            "wrote the {platform} user-data ({} bytes) to {} (0600)",
            text.len(),
            path.display()
        );
        Ok(())
    }

    async fn read_config(&self, deadline: Instant) -> Result<String, AgentError> {
        let path = &self.args.config;
        if let Some(target) = files::dangling_link(path) {
            tracing::info!(
                "{} is a symbolic link to {}, which does not exist yet: waiting for it",
                path.display(),
                target.display()
            );
        }
        match tokio::time::timeout_at(deadline, fswatch::wait_for_file(path)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(AgentError::ConfigWatch {
                    path: path.clone(),
                    detail: e.to_string(),
                });
            }
            Err(_) => {
                if let Some(target) = files::dangling_link(path) {
                    return Err(AgentError::ConfigLinkDangling {
                        path: path.clone(),
                        target,
                        seconds: self.args.config_wait,
                        user_data: self.platform,
                    });
                }
                return Err(AgentError::ConfigMissing {
                    path: path.clone(),
                    seconds: self.args.config_wait,
                });
            }
        }
        read_complete(path, deadline).await
    }

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
