//! Why a run failed, as a typed error that names its fix: the failure line of the journal and
//! status.json is `<error>; fix: <fix>`.

use std::path::PathBuf;

use crate::broker::BrokerError;
use crate::gitlab::RetryError;
use crate::metadata::{MetadataError, Platform};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot watch for {path}: {detail}")]
    ConfigWatch { path: PathBuf, detail: String },
    #[error("{path} did not appear within {seconds} s")]
    ConfigMissing { path: PathBuf, seconds: u64 },
    #[error(
        "{path} is a symbolic link to {target}, which does not exist: it did not appear within {seconds} s"
    )]
    ConfigLinkDangling {
        path: PathBuf,
        target: PathBuf,
        seconds: u64,
        /// The platform whose user-data would be fetched if the link were not there.
        user_data: Option<Platform>,
    },
    #[error("cannot read {path}: {detail}")]
    ConfigUnreadable { path: PathBuf, detail: String },
    #[error("{path} has {count} error(s): {summary}")]
    ConfigInvalid {
        path: PathBuf,
        count: usize,
        summary: String,
    },
    #[error("{0}")]
    TlsCaFile(String),
    #[error("{0}")]
    JobUser(String),
    #[error("cannot generate a system id: {0}")]
    SystemId(String),
    #[error("{detail}")]
    StateDir { dir: PathBuf, detail: String },
    #[error("registration failed: {error}")]
    Registration {
        error: RetryError,
        timeout_seconds: u64,
    },
    #[error(
        "cannot record in {path} that gitlab-runner starts ({detail}), so it was not started: a restarted agent could otherwise start a second one"
    )]
    StartNotRecorded { path: PathBuf, detail: String },
    #[error(
        "{path} cannot be read, so the agent registers nothing and starts no gitlab-runner (this boot may have registered and run a job already): {detail}; {whose}"
    )]
    StatusUnreadable {
        path: PathBuf,
        detail: String,
        whose: &'static str,
    },
    #[error("gitlab-runner not found: {0}")]
    RunnerMissing(PathBuf),
    #[error("cannot start {program}: {detail}")]
    RunnerSpawn { program: PathBuf, detail: String },
    #[error("gitlab-runner exited with {0}")]
    RunnerFailed(String),
    #[error("cannot wait for gitlab-runner: {0}")]
    RunnerWait(String),
    #[error(
        "GitLab accepted the runner token, but it expired at {expired_at} (this VM's clock says {now}), so GitLab refuses it from now on"
    )]
    TokenExpired { expired_at: String, now: String },
    #[error(
        "the {platform} instance has no user-data, where runner.json comes from (--config-source)"
    )]
    UserDataMissing { platform: Platform },
    #[error("the {platform} instance's user-data is not runner.json: it is {what}")]
    UserDataNotRunnerJson { platform: Platform, what: String },
    #[error("cannot fetch runner.json from the instance's user-data: {0}")]
    Metadata(MetadataError),
    #[error("cannot get this boot's runner from the broker: {0}")]
    Broker(BrokerError),
    #[error("cannot write the fleet's settings for the VM's daemons: {0}")]
    DaemonConfig(String),
    #[error("cannot admit gitlab-runner to the metadata service for the cache: {0}")]
    FirewallAdmission(String),
    #[error("cannot write runner.json (from the user-data or the broker) to {path}: {detail}")]
    ConfigWrite { path: PathBuf, detail: String },
}

impl AgentError {
    /// What the operator should do about it.
    pub fn fix(&self) -> String {
        use AgentError::*;
        match self {
            ConfigWatch { .. } => "check that the agent may read the directory".into(),
            ConfigMissing { .. } => "attach the runner config disk (on KubeVirt: a Secret with the key runner.json as a disk with serial runner-info) or write the file; --config-wait sets how long to wait".into(),
            ConfigLinkDangling {
                path,
                target,
                user_data,
                ..
            } => {
                let instead = match user_data {
                    Some(platform) => format!(
                        ", or remove the link: the {platform} user-data is then fetched into {}",
                        path.display()
                    ),
                    None => format!(", or replace the link with runner.json itself (rm {})", path.display()),
                };
                format!(
                    "create {} (attach or mount the disk it is on){instead}; --config-wait sets how long to wait",
                    target.display()
                )
            }
            ConfigUnreadable { .. } => "make it a regular file the agent can read".into(),
            ConfigInvalid { path, .. } => format!(
                "fix runner.json as listed above (gitlab-runner-vm check --config {} prints each problem with its fix)",
                path.display()
            ),
            TlsCaFile(_) => "fix tls_ca_file in runner.json".into(),
            JobUser(_) => "create the user (the NixOS base module creates `runner`) or set --job-user / GITLAB_RUNNER_VM_JOB_USER".into(),
            SystemId(_) => "check the kernel's random source".into(),
            StateDir { dir, .. } => format!("make {} writable by the agent", dir.display()),
            Registration {
                error: RetryError::Permanent(api),
                ..
            } => api.fix(),
            Registration {
                timeout_seconds, ..
            } => format!(
                "check that GitLab is reachable from the VM; --register-timeout ({timeout_seconds} s) bounds the retries"
            ),
            StartNotRecorded { path, .. } => format!(
                "make {} writable by the agent (is its file system full or read-only?)",
                path.parent().unwrap_or(path).display()
            ),
            StatusUnreadable { path, .. } => format!(
                "nothing to do in this VM: it deregisters what config.toml names and powers off; if it recurs, hold a VM (/etc/keep-runner) and look at {} and the journal",
                path.display()
            ),
            RunnerMissing(_) => "install gitlab-runner in the image, or point --gitlab-runner (GITLAB_RUNNER_VM_GITLAB_RUNNER) at it".into(),
            RunnerSpawn { .. } => "check that it is an executable gitlab-runner".into(),
            RunnerFailed(_) => "read its output above (journalctl -u gitlab-runner-vm); a wrong config.toml, an unknown executor or a missing tool makes it exit at once".into(),
            RunnerWait(_) => "this is a bug in gitlab-runner-vm; please report it with the journal".into(),
            TokenExpired { .. } => "rotate the runner token in GitLab (Settings > CI/CD > Runners, the runner's Edit > Reset token, or a new runner) and update runner.json; if the token is still valid in GitLab, this VM's clock is wrong (check its time synchronisation)".into(),
            UserDataMissing { platform } => format!(
                "set the instance's user-data to runner.json: {}",
                platform.how_to_set_user_data()
            ),
            UserDataNotRunnerJson { platform, .. } => format!(
                "set the instance's user-data to runner.json itself, one JSON object, as it is or gzip-compressed once (the image has no cloud-init: no #cloud-config, no script): {}",
                platform.how_to_set_user_data()
            ),
            Metadata(error) => error.fix(),
            Broker(error) => error.fix(),
            DaemonConfig(_) => "make the file named a writable JSON object (on the runner images /etc/docker/daemon.json is written at boot), and for a reload that failed or hung see why in `systemctl status docker` (nix-daemon), or remove registry_mirrors (nix_substituters) from runner.json; --docker-daemon-config, --docker-reload-command, --registries-conf, --nix-conf and --nix-restart-command name the files and the commands, --daemon-reload-timeout how long a reload may take".into(),
            FirewallAdmission(_) => "run the agent with --separate-cgroups in a unit with Delegate=yes (as the runner images do), and see why the firewall's script failed in the journal; or give the cache a key of its own (README, Caches), which needs no metadata service".into(),
            ConfigWrite { path, .. } => format!(
                "make {} writable by the agent, or point --config at a writable place",
                path.parent().unwrap_or(path).display()
            ),
        }
    }

    /// The line for the journal and status.json.
    pub fn with_fix(&self) -> String {
        format!("{self}; fix: {}", self.fix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitlab::{ApiError, Endpoint};

    #[test]
    fn a_rejected_registration_carries_the_api_fix() {
        let e = AgentError::Registration {
            error: RetryError::Permanent(ApiError::Status {
                endpoint: Endpoint::Register,
                status: 410,
                message: "410 Gone".into(),
                retry_hint: None,
            }),
            timeout_seconds: 300,
        };
        let line = e.with_fix();
        assert!(line.starts_with("registration failed: "), "{line}");
        assert!(line.contains("410") && line.contains("glrt-"), "{line}");
    }

    #[test]
    fn exhausted_retries_name_the_timeout() {
        let e = AgentError::Registration {
            error: RetryError::DeadlineExceeded {
                attempts: 3,
                elapsed_s: 20,
                last: ApiError::NoAnswer,
            },
            timeout_seconds: 20,
        };
        assert!(e.fix().contains("--register-timeout (20 s)"), "{}", e.fix());
    }

    #[test]
    fn an_unrecorded_start_names_the_state_directory() {
        let e = AgentError::StartNotRecorded {
            path: "/run/gitlab-runner-vm/status.json".into(),
            detail: "read-only file system".into(),
        };
        assert!(
            e.fix().contains("make /run/gitlab-runner-vm writable"),
            "{}",
            e.fix()
        );
        assert!(e.to_string().contains("was not started"));
    }
}
