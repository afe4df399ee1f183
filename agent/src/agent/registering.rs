//! registering: the credential flow's request to GitLab, then the start of gitlab-runner
//! (recorded in status.json first, so a restarted agent never starts a second one).

use std::time::Duration;

use super::error::AgentError;
use super::interrupt::Interrupt;
use super::state::{Job, Next, Setup, State, Teardown, failed};
use super::{Agent, deadline_after};
use crate::config::RunnerConfig;
use crate::gitlab::RetryError;
use crate::lifecycle::Phase;
use crate::registration::{Registered, Target, possibly_created};
use crate::runner::{self, RunnerUser};
use crate::secret::Secret;
use crate::status;

impl Agent {
    pub(super) async fn register(&mut self, setup: Setup) -> Next {
        let Setup {
            config,
            client,
            user,
            system_id,
            flow,
        } = setup;
        let target = flow.target();
        let registered = |runner_token: Secret| Registered {
            client: client.clone(),
            runner_token,
            system_id: system_id.clone(),
            target,
        };
        // A manager may exist from the first verify on; a created runner only once its answer
        // came.
        let pending = Teardown {
            registered: flow.known_runner_token().map(&registered),
        };
        let deadline = deadline_after(Duration::from_secs(self.args.register_timeout));
        let call = flow.register(&client, &system_id, deadline);
        tokio::pin!(call);
        let result = match self.interrupts.unless(Interrupt::Stop, &mut call).await {
            Some(result) => result,
            None if target.only_the_answer_names_it() => {
                // Dropping the request would leave a runner GitLab may be creating right now,
                // with a token nobody knows: let it finish (bounded), then the stop deletes it.
                let bound = Duration::from_secs(self.args.stop_timeout);
                tracing::warn!(
                    "stop requested while GitLab may be creating this VM's runner: waiting up to {} s for its answer so that the runner can be deleted",
                    bound.as_secs()
                );
                let teardown = match tokio::time::timeout(bound, call).await {
                    Ok(Ok(token)) => self.accept_created(&config, &user, registered(token)),
                    Ok(Err(_)) => pending,
                    Err(_) => {
                        tracing::warn!("{}", possibly_created(&config.name));
                        pending
                    }
                };
                return self.stopping(None, teardown);
            }
            None => return self.stopping(None, pending),
        };
        let teardown = match result {
            Ok(token) if target == Target::Manager => Teardown {
                registered: Some(registered(token)),
            },
            Ok(token) => self.accept_created(&config, &user, registered(token)),
            Err(error) => {
                let nothing_created =
                    matches!(error, RetryError::Permanent(_)) && target == Target::Manager;
                if nothing_created {
                    // GitLab refused the verify: it created no manager.
                    self.lc.registered = false;
                }
                let teardown = if nothing_created {
                    Teardown::default()
                } else {
                    pending
                };
                let timeout_seconds = self.args.register_timeout;
                return failed(
                    AgentError::Registration {
                        error,
                        timeout_seconds,
                    },
                    teardown,
                );
            }
        };
        self.write_status();
        if self.interrupt() == Interrupt::Drain {
            // gitlab-runner killed by a SIGQUIT that arrives before it installs its handlers
            // would count as a failed run; a drain asked for before the start means no start.
            let why = match self.interrupts.notice() {
                Some(_) => "a preemption notice came",
                None => "drain requested",
            };
            tracing::info!("{why} before gitlab-runner started: not starting it, tearing down");
            return self.teardown(teardown);
        }
        self.start_runner(&config, &user, teardown)
    }

    /// A runner GitLab created for this VM: from now on teardown deletes it, with the token
    /// that config.toml (which gitlab-runner reads) also keeps for a restarted agent.
    fn accept_created(
        &mut self,
        config: &RunnerConfig,
        user: &RunnerUser,
        registered: Registered,
    ) -> Teardown {
        self.lc.registered = true;
        let toml = runner::render_config_toml(config, &registered.runner_token);
        if let Err(e) = self.write_runner_files(&registered.system_id, &toml, user) {
            tracing::warn!("{}", e.with_fix());
        }
        self.write_status();
        Teardown {
            registered: Some(registered),
        }
    }

    /// Starts `gitlab-runner run-single`, once status.json records that it starts.
    fn start_runner(
        &mut self,
        config: &RunnerConfig,
        user: &RunnerUser,
        teardown: Teardown,
    ) -> Next {
        let config_file = self.args.state_dir.join(runner::CONFIG_FILE);
        let args = runner::run_single_args(&config_file, config);
        let env = runner::scrubbed_environment(user, |key| std::env::var(key).ok());
        self.lc.runner_started = true;
        if let Err(e) = self.try_write_status() {
            let path = status::path_in(&self.args.state_dir);
            let detail = e.to_string();
            return failed(AgentError::StartNotRecorded { path, detail }, teardown);
        }
        let program = self.args.gitlab_runner.clone();
        let mut child = match runner::spawn(&program, &args, user, &env) {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return failed(AgentError::RunnerMissing(program), teardown);
            }
            Err(e) => {
                let detail = e.to_string();
                return failed(AgentError::RunnerSpawn { program, detail }, teardown);
            }
        };
        let pid = child.id().unwrap_or(0);
        let secrets: Vec<Secret> = [
            Some(config.credential.secret().clone()),
            teardown.registered.as_ref().map(|r| r.runner_token.clone()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // gitlab-runner's lines are logged in the phase it runs in.
        let forwarding = tokio::spawn(tracing::Instrument::instrument(
            runner::forward_output(stdout, stderr, secrets),
            self.span_in(Phase::Running),
        ));
        let job = Job {
            child,
            pid,
            forwarding,
            lifetime_end: config.max_lifetime.map(deadline_after),
            max_lifetime_seconds: config.max_lifetime.unwrap_or_default().as_secs(),
            teardown,
        };
        let detail = format!(
            "gitlab-runner (pid {pid}) runs up to {} job(s) as {}, giving up after {} s without a job",
            config.max_jobs,
            user.name,
            config.idle_timeout.as_secs()
        );
        (State::Running(job), detail)
    }
}
