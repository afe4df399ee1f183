//! Where runner.json comes from: the file (written by a config disk, or by hand), the
//! platform's user-data, or the broker. The flags and the platform alone decide; the waiting
//! step (`waiting`) asks `obtain_config` and validates what it gets.

use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::AddWatchFlags;
use tokio::time::Instant;

use super::error::AgentError;
use super::{Context, deadline_after};
use crate::broker::{self, BrokerClient};
use crate::metadata::{ConfigSource, MetadataClient, NotRunnerJson, Platform, fetch_runner_json};
use crate::{files, fswatch};

/// How long a half-written runner.json may go without changing before it is judged as it is.
const CONFIG_SETTLE: Duration = Duration::from_secs(10);

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
    pub(super) fn config_platform(&self) -> Option<Platform> {
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
    pub(super) async fn obtain_config(
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
        write_runner_json(path, text.as_bytes())?;
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
        write_runner_json(path, text.as_bytes())?;
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
}

/// runner.json as the agent obtained it, for gitlab-runner-vm and the operator to read: only
/// root may (it holds a token).
fn write_runner_json(path: &std::path::Path, text: &[u8]) -> Result<(), AgentError> {
    files::write_atomically(path, text, 0o600, 0o700).map_err(|e| AgentError::ConfigWrite {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
