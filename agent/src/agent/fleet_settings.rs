//! The end of waiting-for-config: what runner.json asks of the VM besides gitlab-runner, done
//! before any GitLab call. The daemons' settings (registry mirrors, Nix substituters:
//! `daemon_config`), then gitlab-runner's admission through the metadata firewall when the
//! cache uses the instance's identity (`firewall_admission`). Either failing fails the run
//! before registering: a VM that cannot serve the fleet as configured takes no job.

use std::time::Duration;

use super::Agent;
use super::Context;
use super::error::AgentError;
use crate::config::RunnerConfig;
use crate::daemon_config;
use crate::firewall_admission::{self, Admission};

impl Agent {
    pub(super) async fn apply_fleet_settings(
        &self,
        config: &RunnerConfig,
    ) -> Result<(), AgentError> {
        self.ctx.configure_daemons(config).await?;
        self.ctx.admit_runner(config).await
    }
}

/// What the daemons and the firewall are told: from runner.json and the flags alone.
impl Context {
    /// runner.json's registry mirrors (and Nix substituters) into the daemons' configuration.
    async fn configure_daemons(&self, config: &RunnerConfig) -> Result<(), AgentError> {
        let paths = daemon_config::DaemonPaths {
            docker_daemon_json: self.args.docker_daemon_config.clone(),
            docker_reload_command: self.args.docker_reload_command.clone(),
            registries_conf: self.args.registries_conf.clone(),
            nix_conf: self.args.nix_conf.clone(),
            nix_restart_command: self.args.nix_restart_command.clone(),
            reload_timeout: Duration::from_secs(self.args.daemon_reload_timeout),
        };
        let applied = daemon_config::apply(&paths, config)
            .await
            .map_err(AgentError::DaemonConfig)?;
        for line in applied {
            tracing::info!("{line}");
        }
        Ok(())
    }

    /// gitlab-runner's cgroup admitted to the metadata service, when the cache needs it.
    async fn admit_runner(&self, config: &RunnerConfig) -> Result<(), AgentError> {
        let admission = firewall_admission::decide(
            config.cache.as_deref(),
            self.args.metadata_firewall.as_deref(),
            self.runner_cgroup.as_ref(),
        )
        .map_err(AgentError::FirewallAdmission)?;
        match admission {
            Admission::NotNeeded => {}
            Admission::NoFirewall { identity } => tracing::info!(
                "{identity}: gitlab-runner fetches the instance's credentials from the metadata service; no --metadata-firewall, so nothing is admitted (this VM's network decides)"
            ),
            Admission::Admit {
                identity,
                firewall,
                cgroup,
            } => {
                firewall_admission::admit(&firewall, &cgroup)
                    .await
                    .map_err(AgentError::FirewallAdmission)?;
                tracing::info!(
                    "{identity}: the metadata firewall admits gitlab-runner's cgroup {cgroup} (the jobs' cgroup stays refused)"
                );
            }
        }
        Ok(())
    }
}
