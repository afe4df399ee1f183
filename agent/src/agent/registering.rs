//! registering: the credential flow's request to GitLab, then the start of gitlab-runner
//! (recorded in status.json first, so a restarted agent never starts a second one).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::error::AgentError;
use super::interrupt::Interrupt;
use super::record::Record;
use super::record::{Event, GitLabKnows};
use super::state::{Job, Next, Setup, State, failed};
use super::{Agent, deadline_after};
use crate::boot_record::{self, BootRecord};
use crate::config::RunnerConfig;
use crate::console::Console;
use crate::gitlab::RetryError;
use crate::lifecycle::Phase;
use crate::registration::expiry::{self, Expiry};
use crate::registration::{Registered, Target, possibly_created};
use crate::runner::job_lines::{self, JobLine, Outcome};
use crate::runner::{self, LineWatch, ShellJobs};
use crate::secret::Secret;
use crate::status::{self, Published};

impl Agent {
    pub(super) async fn register(&mut self, setup: Box<Setup>) -> Next {
        let target = setup.flow.target();
        let deadline = deadline_after(Duration::from_secs(self.ctx.args.register_timeout));
        // A drain, a notice that the VM goes away or a stop ends the retries at once.
        let give_up = {
            let interrupts = self.interrupts.clone();
            Box::pin(async move { interrupts.reached(Interrupt::Drain).await })
        };
        let call = setup
            .flow
            .register(&setup.client, &setup.system_id, deadline, give_up);
        tokio::pin!(call);
        let result = match self.interrupts.unless(Interrupt::Drain, &mut call).await {
            Some(result) => result,
            None => {
                if target.only_the_answer_names_it() {
                    // Dropping a request in flight would leave a runner GitLab may be creating
                    // right now, with a token nobody knows: let it finish (within the notice's
                    // warning, if any), then the teardown deletes it. Between attempts nothing
                    // is in flight and the call ends at once.
                    let bound = self.answer_budget();
                    tracing::warn!(
                        "{} while GitLab may be creating this VM's runner: no further attempt; waiting up to {} s for the answer of a request in flight, so that the runner can be deleted",
                        self.interrupts.describe(),
                        bound.as_secs()
                    );
                    match tokio::time::timeout(bound, call).await {
                        Ok(Ok(accepted)) => {
                            self.accept_created(&setup, setup.registered(accepted.token))
                        }
                        Ok(Err(RetryError::Interrupted { .. })) => {
                            tracing::info!("no request was in flight: nothing was created");
                        }
                        Ok(Err(_)) | Err(_) => {
                            tracing::warn!("{}", possibly_created(&setup.config.name));
                        }
                    }
                }
                // A verify that may have reached GitLab: teardown deletes the manager, which
                // `GitLabKnows` has named since the registering began.
                if self.interrupt() == Interrupt::Stop {
                    return self.stopping(None);
                }
                tracing::info!(
                    "{} while registering: gitlab-runner is not started; tearing down",
                    self.interrupts.describe()
                );
                return self.teardown();
            }
        };
        let token_expires_at = match result {
            Ok(accepted) if target == Target::Manager => {
                self.rec.gitlab = GitLabKnows::ThisVm(Some(setup.registered(accepted.token)));
                accepted.token_expires_at
            }
            Ok(accepted) => {
                self.accept_created(&setup, setup.registered(accepted.token));
                accepted.token_expires_at
            }
            Err(error) => {
                if matches!(error, RetryError::Permanent(_)) && target == Target::Manager {
                    // GitLab refused the verify: it created no manager.
                    self.rec.gitlab = GitLabKnows::Nothing;
                }
                let timeout_seconds = self.ctx.args.register_timeout;
                return failed(AgentError::Registration {
                    error,
                    timeout_seconds,
                });
            }
        };
        let config = &setup.config;
        self.rec.mark(BootRecord::registered);
        self.rec.milestone(&format!(
            "registered runner {} (system {}) at {}",
            config.name, setup.system_id, config.url
        ));
        if let Some(error) = self
            .rec
            .check_token_expiry(token_expires_at.as_deref(), config)
        {
            return failed(error);
        }
        self.rec.write_status();
        if matches!(self.interrupt(), Interrupt::Drain | Interrupt::Preempted) {
            // gitlab-runner killed by a SIGQUIT that arrives before it installs its handlers
            // would count as a failed run; a drain asked for before the start means no start.
            tracing::info!(
                "{} before gitlab-runner started: not starting it, tearing down",
                self.interrupts.describe()
            );
            return self.teardown();
        }
        self.start_runner(config, &setup.shell_jobs, &setup.runner_env)
    }

    /// How long a create request in flight may take to answer once registration is cut short:
    /// `--stop-timeout`, within a notice's warning less the deregistration's reserve.
    fn answer_budget(&self) -> Duration {
        let stop_timeout = Duration::from_secs(self.ctx.args.stop_timeout);
        match self.interrupts.notice() {
            Some(notice) => {
                crate::preemption::abort_budget(&notice, SystemTime::now(), stop_timeout)
            }
            None => stop_timeout,
        }
    }

    /// A runner GitLab created for this VM: from now on teardown deletes it, with the token
    /// that config.toml (which gitlab-runner reads) also keeps for a restarted agent.
    fn accept_created(&mut self, setup: &Setup, registered: Registered) {
        let toml =
            runner::render_config_toml(&setup.config, &registered.runner_token, &setup.shell_jobs);
        let system_id = registered.system_id.clone();
        self.rec.gitlab = GitLabKnows::ThisVm(Some(registered));
        if let Err(e) = self.ctx.write_runner_files(&system_id, &toml) {
            tracing::warn!("{}", e.with_fix());
        }
        self.rec.write_status();
    }

    /// Starts `gitlab-runner run-single`, once status.json records that it starts.
    fn start_runner(
        &mut self,
        config: &RunnerConfig,
        shell_jobs: &ShellJobs,
        env: &[(String, String)],
    ) -> Next {
        let config_file = self.ctx.args.state_dir.join(runner::CONFIG_FILE);
        let args = runner::run_single_args(&config_file, config);
        self.rec.lc.runner_started = true;
        if let Err(e) = self.rec.try_write_status() {
            let path = status::path_in(&self.ctx.args.state_dir);
            let detail = e.to_string();
            return failed(AgentError::StartNotRecorded { path, detail });
        }
        let program = self.ctx.args.gitlab_runner.clone();
        let cwd = self.ctx.args.state_dir.clone();
        let cgroup = self.ctx.runner_cgroup.as_ref();
        let mut child = match runner::spawn(&program, &args, env, &cwd, cgroup) {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return failed(AgentError::RunnerMissing(program));
            }
            Err(e) => {
                let detail = e.to_string();
                return failed(AgentError::RunnerSpawn { program, detail });
            }
        };
        let pid = child.id().unwrap_or(0);
        let secrets: Vec<Secret> = [
            Some(config.credential.secret().clone()),
            self.rec.gitlab.means().map(|r| r.runner_token.clone()),
        ]
        .into_iter()
        .flatten()
        // The cache's keys, which gitlab-runner reads from config.toml like the token.
        .chain(config.cache.iter().flat_map(|c| c.secrets()))
        .collect();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (jobs_tx, jobs_received) = tokio::sync::watch::channel(0);
        let watch: LineWatch = {
            let (record, console, published) = (
                self.rec.boot.clone(),
                self.rec.console.clone(),
                self.rec.published.clone(),
            );
            Arc::new(move |line: &str| job_milestone(line, &record, &console, &published, &jobs_tx))
        };
        // gitlab-runner's lines are logged in the phase it runs in.
        let forwarding = tokio::spawn(tracing::Instrument::instrument(
            runner::forward_output(stdout, stderr, secrets, watch),
            self.rec.span_in(Phase::Running),
        ));
        let job = Job {
            child,
            pid,
            forwarding,
            jobs_received,
            lifetime_end: config.max_lifetime.map(deadline_after),
            max_lifetime_seconds: config.max_lifetime.unwrap_or_default().as_secs(),
        };
        let detail = format!(
            "gitlab-runner (pid {pid}) runs up to {} job(s) as {}, giving up after {} s without a job",
            config.max_jobs,
            shell_jobs.user,
            config.idle_timeout.as_secs()
        );
        Next::to(State::Running(job), detail)
    }
}

/// A line of gitlab-runner that says a job started or ended: the boot record, status.json, the
/// journal and the console learn it.
fn job_milestone(
    line: &str,
    record: &Mutex<BootRecord>,
    console: &Console,
    published: &Published,
    jobs_received: &tokio::sync::watch::Sender<u32>,
) {
    let Some(event) = job_lines::parse(line) else {
        return;
    };
    let now = boot_record::now_ms();
    let text = {
        let mut record = record.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            JobLine::Started { job } => {
                record.job_started(job, now);
                jobs_received.send_replace(record.jobs);
                format!("job {job} started")
            }
            JobLine::Finished { job, outcome } => {
                let succeeded = outcome == Outcome::Succeeded;
                match record.job_finished(job, now, succeeded) {
                    Some(ms) => format!(
                        "job {job} {} after {}",
                        outcome.as_str(),
                        boot_record::seconds(ms)
                    ),
                    None => format!("job {job} {}", outcome.as_str()),
                }
            }
        }
    };
    tracing::info!("{text}");
    console.milestone(&text);
    let amended = published.amend(|status| {
        status.boot_record = record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    });
    if let Err(e) = amended {
        tracing::warn!("cannot write status.json: {e}");
    }
}

/// What the registration's answer says of the token, recorded.
impl Record {
    /// Warns when the token expires within a day or this VM's max_lifetime; a token already
    /// expired (by this VM's clock) is a failure before any job.
    fn check_token_expiry(
        &mut self,
        token_expires_at: Option<&str>,
        config: &RunnerConfig,
    ) -> Option<AgentError> {
        let now = SystemTime::now();
        let expiry = expiry::judge(token_expires_at, now, config.max_lifetime);
        self.token_expires_at = expiry.at();
        if let Some(warning) = expiry.warning(now) {
            self.token_warning = Some(warning.clone());
            self.note(Event::Warning(warning));
        }
        match expiry {
            Expiry::Expired(at) => Some(AgentError::TokenExpired {
                expired_at: crate::timestamp::fmt_time(at),
                now: crate::timestamp::fmt_time(now),
            }),
            _ => None,
        }
    }
}
