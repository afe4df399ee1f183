//! The start of an agent restarted in the same boot: what its earlier run left in the state
//! directory (status.json, config.toml) is all it goes by, since runner.json may be what made
//! it crash. It never registers again nor starts another gitlab-runner; it resumes the teardown.

use super::Agent;
use super::record::{GitLabKnows, Record};
use crate::config::CredentialKind;
use crate::gitlab::Client;
use crate::lifecycle::{Phase, Registration};
use crate::metadata::ConfigSource;
use crate::registration::{Registered, Target, possibly_created};
use crate::runner;
use crate::status::Status;

impl Agent {
    /// A restarted agent found a status.json of this boot (or of a boot it cannot tell) that
    /// it cannot read: whatever this boot did is unknown, so it is taken as the worst (it
    /// registered and ran a job). No registration, no gitlab-runner: the teardown deletes what
    /// config.toml names and powers off. Which flow registered is unknown too, so the deletion
    /// is of this VM's manager: deleting "the runner" with a shared `glrt-` token would remove
    /// the whole fleet's runner from GitLab.
    pub(super) fn fail_closed(&mut self) {
        let state_dir = self.ctx.args.state_dir.clone();
        self.rec.system_id = runner::read_system_id(&state_dir);
        // With the broker every runner is this boot's own: deleting it removes nobody else's.
        let target = if self.ctx.args.config_source == ConfigSource::Broker {
            Target::Runner
        } else {
            Target::Manager
        };
        let entry = runner::read_runner_entry(&state_dir);
        if let Some(entry) = &entry {
            self.rec.shown.gitlab_url = Some(entry.url.clone());
        }
        let registered = entry.and_then(|entry| self.rec.deregistration_from(entry, target));
        match &registered {
            Some(_) if target == Target::Runner => tracing::warn!(
                "tearing down with what config.toml names: this boot's own runner (from the broker) is deleted from GitLab"
            ),
            Some(_) => tracing::warn!(
                "tearing down with what config.toml names: this VM's runner manager is deleted from GitLab; a runner this boot created (registration_token, access_token) stays: delete it by hand (Settings > CI/CD > Runners)"
            ),
            None => tracing::warn!(
                "config.toml names no runner: nothing to deregister; if this boot created a runner, delete it by hand (Settings > CI/CD > Runners)"
            ),
        }
        self.rec.gitlab = match registered {
            Some(registered) => GitLabKnows::ThisVm(Some(registered)),
            None => GitLabKnows::Nothing,
        };
    }

    /// A restarted agent found that this boot already registered, started gitlab-runner, was
    /// registering or began its teardown: it never starts another gitlab-runner, and resumes the
    /// teardown from the state directory alone (runner.json may be what made it crash).
    pub(super) fn resume(&mut self, prev: Status) {
        let what = if prev.runner_started {
            "started gitlab-runner"
        } else if prev.registered {
            "registered with GitLab"
        } else if prev.phase == Phase::Registering {
            "was registering"
        } else {
            "began its teardown"
        };
        tracing::warn!(
            "status.json shows that this boot already {what} (the agent was restarted); tearing down instead of starting another gitlab-runner"
        );
        let state_dir = self.ctx.args.state_dir.clone();
        self.rec.system_id = runner::read_system_id(&state_dir).or(prev.system_id.clone());
        // The broker's runner is this boot's own, whatever its token looks like.
        let own_runner = self.ctx.args.config_source == ConfigSource::Broker;
        let target = if prev.credential == Some(CredentialKind::RunnerToken) && !own_runner {
            Target::Manager
        } else {
            Target::Runner
        };
        let registered = runner::read_runner_entry(&state_dir)
            .and_then(|entry| self.rec.deregistration_from(entry, target));
        let mut shown = Registration::from_flags(prev.registered, prev.deregistered);
        if prev.phase == Phase::Registering && target.only_the_answer_names_it() {
            // A runner created just before the crash is in config.toml already; else its
            // token is lost.
            match registered {
                Some(_) => shown = Registration::Registered,
                None => tracing::warn!(
                    "{}",
                    possibly_created(prev.runner.as_deref().unwrap_or("?"))
                ),
            }
        }
        self.rec.gitlab = GitLabKnows::resumed(shown, registered);
        self.rec.resume(prev);
    }
}

/// What a deregistration needs, as config.toml names it.
impl Record {
    /// What a deregistration needs, from config.toml's runner entry (which a restarted agent
    /// finds in the state directory); None without a token or a usable URL.
    pub(super) fn deregistration_from(
        &self,
        entry: runner::RunnerEntry,
        target: Target,
    ) -> Option<Registered> {
        let client = Client::new(&entry.url, entry.tls_ca_file.as_deref())
            .map_err(|e| tracing::warn!("cannot set up the client for deregistration: {e:#}"))
            .ok()?;
        Some(Registered {
            client,
            runner_token: entry.token?,
            system_id: self.system_id.clone().unwrap_or_default(),
            target,
        })
    }
}
