//! `gitlab-runner-vm run`: drives the lifecycle. Each phase's work (waiting, HTTP, the child
//! process, the hold, power-off) happens here; where to go next is decided by `lifecycle`, which
//! also rejects any illegal transition.

use std::path::Path;
use std::process::{ExitCode, ExitStatus};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use nix::sys::signal::Signal;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::RunArgs;
use crate::config::{Credential, CredentialKind, RunnerConfig};
use crate::gitlab::{self, Client, CreatedRunner, Deletion, RetryError, RunnerInfo};
use crate::hold::{self, HoldEnd};
use crate::lifecycle::{self, Lifecycle, Phase, StartDecision};
use crate::runner::{self, RunnerUser};
use crate::secret::Secret;
use crate::status::{self, Status};
use crate::{files, log, logging, power, systemd};

/// What the outside world asked for, by signal. Only ever escalates: None < Drain < Stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Interrupt {
    None,
    /// SIGUSR1 (`gitlab-runner-vm drain`): finish the current job, take no new one.
    Drain,
    /// SIGTERM/SIGINT: the VM is being shut down from outside.
    Stop,
}

/// A failure: what went wrong and what the operator should do about it.
struct Failure {
    cause: String,
    fix: String,
}

impl Failure {
    fn new(cause: impl Into<String>, fix: impl Into<String>) -> Self {
        Failure {
            cause: cause.into(),
            fix: fix.into(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Shown {
    runner: Option<String>,
    credential: Option<CredentialKind>,
    gitlab_url: Option<String>,
}

struct Agent {
    args: RunArgs,
    lc: Lifecycle,
    boot_id: String,
    interrupts: watch::Receiver<Interrupt>,
    config: Option<RunnerConfig>,
    /// What status.json shows of the configuration: from runner.json, or from the previous
    /// run's status.json when a restarted agent resumes a teardown without it.
    shown: Shown,
    /// Set up with the config, or from config.toml when resuming: deregistration needs only it,
    /// the token and the system id.
    client: Option<Client>,
    system_id: Option<String>,
    /// The token gitlab-runner uses: the `glrt-` token itself, or the one GitLab returned for
    /// a runner created by this VM.
    runner_token: Option<Secret>,
    /// Deregistration deletes this VM's manager of a shared `glrt-` runner (true) or the runner
    /// this VM created (false).
    deletes_manager: bool,
    /// Resolved once, when registration starts; gitlab-runner later runs as this user.
    user: Option<RunnerUser>,
    child: Option<Child>,
    last_error: Option<String>,
    hold_deadline: Option<SystemTime>,
    poweroff_at: Option<SystemTime>,
}

pub async fn run(mut args: RunArgs) -> anyhow::Result<ExitCode> {
    // gitlab-runner runs in the runner user's home: a relative path given to the agent must
    // mean the same file there as here. A bare program name is looked up in PATH instead.
    let bare_program =
        args.gitlab_runner.components().count() == 1 && !args.gitlab_runner.starts_with(".");
    let mut paths = vec![&mut args.config, &mut args.state_dir, &mut args.keep_file];
    if !bare_program {
        paths.push(&mut args.gitlab_runner);
    }
    for path in paths {
        *path = std::path::absolute(&*path)
            .with_context(|| format!("cannot make {} absolute", path.display()))?;
    }
    let interrupts = listen_for_signals()?;
    systemd::spawn_watchdog();
    let mut agent = Agent {
        args,
        lc: Lifecycle::new(SystemTime::now()),
        boot_id: boot_id(),
        interrupts,
        config: None,
        shown: Shown::default(),
        client: None,
        system_id: None,
        runner_token: None,
        deletes_manager: false,
        user: None,
        child: None,
        last_error: None,
        hold_deadline: None,
        poweroff_at: None,
    };
    agent.run().await
}

fn listen_for_signals() -> anyhow::Result<watch::Receiver<Interrupt>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("cannot handle SIGUSR1")?;
    let (tx, rx) = watch::channel(Interrupt::None);
    tokio::spawn(async move {
        loop {
            let wanted = tokio::select! {
                _ = term.recv() => Interrupt::Stop,
                _ = int.recv() => Interrupt::Stop,
                _ = usr1.recv() => Interrupt::Drain,
            };
            tx.send_if_modified(|current| {
                let escalates = wanted > *current;
                if escalates {
                    *current = wanted;
                }
                escalates
            });
        }
    });
    Ok(rx)
}

/// Resolves once the interrupt is exactly `wanted` (a drain that escalated to a stop is a stop,
/// not a drain).
async fn wait_for(mut rx: watch::Receiver<Interrupt>, wanted: Interrupt) {
    if rx.wait_for(|i| *i == wanted).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Resolves once any interrupt (a drain or a stop) was asked for.
async fn wait_for_any(mut rx: watch::Receiver<Interrupt>) {
    if rx.wait_for(|i| *i != Interrupt::None).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `now + wait`, or a deadline far beyond any VM's life when that overflows the clock.
fn deadline_after(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gitlab-runner-vm".into())
}

impl Agent {
    async fn run(&mut self) -> anyhow::Result<ExitCode> {
        std::fs::create_dir_all(&self.args.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                self.args.state_dir.display()
            )
        })?;
        // Decide before the first write: status.json of an earlier run in this boot is the crash
        // protection, and it needs nothing but the state directory (not even runner.json).
        if let Ok(prev) = status::read(&self.args.state_dir) {
            let previous_run = lifecycle::Previous {
                boot_id: &prev.boot_id,
                phase: prev.phase,
                registered: prev.registered && !prev.deregistered,
                runner_started: prev.runner_started,
            };
            if lifecycle::on_start(Some(previous_run), &self.boot_id) == StartDecision::TearDown {
                return self.resume_teardown(prev).await;
            }
        }
        self.publish(&format!("waiting for {}", self.args.config.display()));

        match self.prepare().await {
            Ok(true) => {}
            Ok(false) if self.interrupt() == Interrupt::Drain => {
                log!(
                    info,
                    "drain requested before runner.json was read: nothing to run, tearing down"
                );
                return self.teardown().await;
            }
            Ok(false) => return self.stop().await,
            Err(failure) => return self.fail(failure).await,
        }

        match self.register().await {
            Ok(true) => {}
            Ok(false) => return self.stop().await,
            Err(failure) => return self.fail(failure).await,
        }
        if self.interrupt() == Interrupt::Drain {
            // gitlab-runner killed by a SIGQUIT that arrives before it installs its handlers
            // would count as a failed run; a drain asked for before the start means no start.
            log!(
                info,
                "drain requested before gitlab-runner started: not starting it, tearing down"
            );
            return self.teardown().await;
        }
        match self.run_jobs().await {
            Ok(true) => self.teardown().await,
            Ok(false) => self.stop().await,
            Err(failure) => self.fail(failure).await,
        }
    }

    /// Moves to `phase`, then publishes it: status.json, systemd STATUS=, one log line.
    fn enter(&mut self, phase: Phase, detail: &str) -> anyhow::Result<()> {
        self.lc.transition(phase, SystemTime::now())?;
        logging::update_context(|c| c.phase = phase.as_str());
        self.publish(detail);
        if phase.is_started() {
            systemd::ready();
        }
        Ok(())
    }

    fn publish(&mut self, detail: &str) {
        let phase = self.lc.phase();
        let text = format!("{phase}: {detail}");
        systemd::status(&text);
        log!(info, "{text}");
        self.write_status();
    }

    fn write_status(&self) {
        if let Err(e) = self.try_write_status() {
            log!(
                warn,
                "cannot write {}: {e}",
                status::path_in(&self.args.state_dir).display()
            );
        }
    }

    fn try_write_status(&self) -> std::io::Result<()> {
        let status = Status {
            phase: self.lc.phase(),
            since: self.lc.since(),
            pid: std::process::id(),
            boot_id: self.boot_id.clone(),
            runner: self.shown.runner.clone(),
            system_id: self.system_id.clone(),
            credential: self.shown.credential,
            gitlab_url: self.shown.gitlab_url.clone(),
            registered: self.lc.registered,
            deregistered: self.lc.deregistered,
            runner_started: self.lc.runner_started,
            timeline: self.lc.timeline.clone(),
            last_error: self.last_error.clone(),
            hold_deadline: self.hold_deadline,
            poweroff_at: self.poweroff_at,
        };
        status::write(&self.args.state_dir, &status)
    }

    fn interrupt(&self) -> Interrupt {
        *self.interrupts.borrow()
    }

    /// waiting-for-config: wait for runner.json, validate it, set up the HTTP client.
    /// Ok(false): stopped or drained from outside.
    async fn prepare(&mut self) -> Result<bool, Failure> {
        let path = self.args.config.clone();
        let deadline = deadline_after(Duration::from_secs(self.args.config_wait));
        tokio::select! {
            found = tokio::time::timeout_at(deadline, crate::fswatch::wait_for_file(&path)) => match found {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Failure::new(format!("cannot watch for {}: {e}", path.display()), "check that the agent may read the directory")),
                Err(_) => return Err(Failure::new(
                    format!("{} did not appear within {} s", path.display(), self.args.config_wait),
                    "attach the runner config disk (on KubeVirt: a Secret with the key runner.json as a disk with serial runner-info) or write the file; --config-wait sets how long to wait",
                )),
            },
            _ = wait_for_any(self.interrupts.clone()) => return Ok(false),
        }
        let text = tokio::select! {
            text = self.read_complete_config(&path, deadline) => text?,
            _ = wait_for_any(self.interrupts.clone()) => return Ok(false),
        };
        let validated = crate::config::validate(&text, &host_name(), &|p| {
            files::read_text(p, files::NAMED_FILE_CAP)
        });
        for problem in &validated.problems {
            log!(warn, "{}: {problem}", path.display());
        }
        let Some(config) = validated.config else {
            let count = validated.errors().count();
            return Err(Failure::new(
                format!(
                    "{} has {count} error(s): {}",
                    path.display(),
                    validated
                        .errors()
                        .map(|p| format!("{}: {}", p.path, p.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                format!(
                    "fix runner.json as listed above (gitlab-runner-vm check --config {} prints each problem with its fix)",
                    path.display()
                ),
            ));
        };
        let client = Client::new(&config.url, config.tls_ca_file.as_deref())
            .map_err(|e| Failure::new(format!("{e:#}"), "fix tls_ca_file in runner.json"))?;
        logging::update_context(|c| c.runner = config.name.clone());
        self.shown = Shown {
            runner: Some(config.name.clone()),
            credential: Some(config.credential.kind()),
            gitlab_url: Some(config.url.clone()),
        };
        self.deletes_manager = matches!(config.credential, Credential::RunnerToken(_));
        self.client = Some(client);
        self.config = Some(config);
        Ok(true)
    }

    /// Reads runner.json once it is whole. A writer may create the file and fill it later (or
    /// pause mid-file): while the text is empty or ends before the JSON does, wait for the file
    /// to change again, for at most `CONFIG_SETTLE` without a change and never past `deadline`.
    /// Complete but invalid JSON is returned at once, for validation to report.
    async fn read_complete_config(
        &self,
        path: &Path,
        deadline: Instant,
    ) -> Result<String, Failure> {
        use nix::sys::inotify::AddWatchFlags;
        const CONFIG_SETTLE: Duration = Duration::from_secs(10);
        let dir = path.parent().unwrap_or(Path::new("/"));
        loop {
            // Watch first, then read, so that a write in between is not missed.
            let watch = crate::fswatch::DirWatch::new(
                dir,
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE,
            )
            .ok();
            let text = files::read_text(path, files::CONFIG_CAP).map_err(|e| {
                Failure::new(
                    format!("cannot read {}: {e}", path.display()),
                    "make it a regular file the agent can read",
                )
            })?;
            let incomplete = text.trim().is_empty()
                || serde_json::from_str::<serde_json::Value>(&text).is_err_and(|e| e.is_eof());
            let Some(watch) = watch.filter(|_| incomplete) else {
                return Ok(text);
            };
            log!(
                info,
                "{} is incomplete ({} bytes); waiting for its writer to finish",
                path.display(),
                text.len()
            );
            let settle = deadline_after(CONFIG_SETTLE).min(deadline);
            match tokio::time::timeout_at(settle, watch.changed()).await {
                Ok(Ok(())) => continue,
                // No change in time (or the watch broke): validation reports what is there.
                Ok(Err(_)) | Err(_) => return Ok(text),
            }
        }
    }

    fn config(&self) -> &RunnerConfig {
        self.config
            .as_ref()
            .expect("config is loaded before registration")
    }

    fn client(&self) -> &Client {
        self.client
            .as_ref()
            .expect("client is set up with the config")
    }

    fn runner_user(&self) -> Result<RunnerUser, Failure> {
        RunnerUser::resolve(self.args.runner_user.as_deref()).map_err(|e| {
            Failure::new(format!("{e:#}"), "create the user (the NixOS base module creates `runner`) or set --runner-user / GITLAB_RUNNER_VM_RUNNER_USER")
        })
    }

    fn write_runner_files(&self, user: &RunnerUser) -> Result<(), Failure> {
        let token = self.runner_token.as_ref().expect("runner token known");
        let system_id = self.system_id.as_deref().expect("system id generated");
        let toml = runner::render_config_toml(self.config(), token);
        runner::write_state_files(&self.args.state_dir, system_id, &toml, user).map_err(|e| {
            Failure::new(
                format!("{e:#}"),
                format!(
                    "make {} writable by the agent",
                    self.args.state_dir.display()
                ),
            )
        })
    }

    /// registering: system id and config.toml first, then the GitLab call for the credential.
    /// Ok(false): stopped from outside.
    async fn register(&mut self) -> Result<bool, Failure> {
        let user = self.runner_user()?;
        self.user = Some(user.clone());
        let system_id = runner::generate_system_id().map_err(|e| {
            Failure::new(
                format!("cannot generate a system id: {e}"),
                "check the kernel's random source",
            )
        })?;
        logging::update_context(|c| c.system_id = system_id.clone());
        self.system_id = Some(system_id.clone());
        let config = self.config().clone();
        if let Credential::RunnerToken(token) = &config.credential {
            // gitlab-runner reads both files; writing them before verify means the manager
            // GitLab creates and the one gitlab-runner reports are the same.
            self.runner_token = Some(token.clone());
            self.write_runner_files(&user)?;
        } else {
            runner::write_state_files(&self.args.state_dir, &system_id, "", &user).map_err(
                |e| {
                    Failure::new(
                        format!("{e:#}"),
                        format!(
                            "make {} writable by the agent",
                            self.args.state_dir.display()
                        ),
                    )
                },
            )?;
        }
        let detail = match &config.credential {
            Credential::RunnerToken(t) => format!(
                "verifying runner token {t} as manager {system_id} with {}",
                config.url
            ),
            Credential::RegistrationToken(t) => {
                format!("registering with registration token {t} at {}", config.url)
            }
            Credential::AccessToken { token, runner_type } => format!(
                "creating a {} runner with access token {token} at {}",
                runner_type.api_name(),
                config.url
            ),
        };
        // Any verify that reaches GitLab creates (or refreshes) this VM's manager, whether its
        // answer then arrives, times out or is interrupted: from the first one on, teardown
        // deletes the manager. Recorded (in status.json, by `enter`) before the request goes.
        let creates_runner = !self.deletes_manager;
        self.lc.registered = !creates_runner;
        self.enter(Phase::Registering, &detail).map_err(bug)?;

        let info = RunnerInfo {
            name: config.name.clone(),
            executor: config.executor,
        };
        let deadline = deadline_after(Duration::from_secs(self.args.register_timeout));
        let client = self.client().clone();
        let call = async {
            match &config.credential {
                Credential::RunnerToken(token) => gitlab::with_retries("verify", deadline, || {
                    client.verify(token, &system_id, &info)
                })
                .await
                .map(|()| None),
                Credential::RegistrationToken(token) => {
                    gitlab::with_retries("register", deadline, || {
                        client.register(token, &info, &config.settings)
                    })
                    .await
                    .map(Some)
                }
                Credential::AccessToken { token, runner_type } => {
                    gitlab::with_retries("create runner", deadline, || {
                        client.create_user_runner(token, runner_type, &info, &config.settings)
                    })
                    .await
                    .map(Some)
                }
            }
        };
        tokio::pin!(call);
        let result = tokio::select! {
            r = &mut call => r,
            _ = wait_for(self.interrupts.clone(), Interrupt::Stop) => {
                if creates_runner {
                    // Dropping the request would leave a runner GitLab may be creating right
                    // now, with a token nobody knows: let it finish (bounded), then the stop
                    // deletes it.
                    let bound = Duration::from_secs(self.args.stop_timeout);
                    log!(warn, "stop requested while GitLab may be creating this VM's runner: waiting up to {} s for its answer so that the runner can be deleted", bound.as_secs());
                    match tokio::time::timeout(bound, call).await {
                        Ok(Ok(Some(created))) => self.accept_created(created, &user)?,
                        Ok(_) => {}
                        Err(_) => log!(warn, "{}", possibly_created(&config.name)),
                    }
                }
                return Ok(false);
            }
        };
        match result {
            Ok(None) => log!(
                info,
                "runner token accepted; this VM is runner manager {system_id}"
            ),
            Ok(Some(created)) => self.accept_created(created, &user)?,
            Err(e) => {
                if matches!(e, RetryError::Permanent(_)) && !creates_runner {
                    // GitLab refused the verify: it created no manager.
                    self.lc.registered = false;
                }
                return Err(registration_failure(&e, self.args.register_timeout));
            }
        }
        self.write_status();
        Ok(true)
    }

    /// A runner GitLab created for this VM: from now on teardown deletes it, with the token
    /// that config.toml (which gitlab-runner reads) keeps for a restarted agent.
    fn accept_created(&mut self, created: CreatedRunner, user: &RunnerUser) -> Result<(), Failure> {
        self.lc.registered = true;
        self.runner_token = Some(created.token.clone());
        log!(
            info,
            "GitLab created runner {} with token {}",
            created
                .id
                .map(|i| i.to_string())
                .unwrap_or_else(|| "?".into()),
            created.token
        );
        let written = self.write_runner_files(user);
        self.write_status();
        written
    }

    /// running (and draining): gitlab-runner run-single until it exits.
    /// Ok(true): it finished; Ok(false): stopped from outside.
    async fn run_jobs(&mut self) -> Result<bool, Failure> {
        let user = self
            .user
            .clone()
            .expect("the runner user is resolved at registration");
        let config = self.config().clone();
        let config_file = self.args.state_dir.join(runner::CONFIG_FILE);
        let args = runner::run_single_args(&config_file, &config);
        let env = runner::scrubbed_environment(&user, |key| std::env::var(key).ok());
        // Recorded before the spawn: an agent restarted after this point must never start a
        // second gitlab-runner in this boot. Without that record there is no start at all.
        self.lc.runner_started = true;
        if let Err(e) = self.try_write_status() {
            return Err(Failure::new(
                format!(
                    "cannot record in {} that gitlab-runner starts ({e}), so it was not started: a restarted agent could otherwise start a second one",
                    status::path_in(&self.args.state_dir).display()
                ),
                format!(
                    "make {} writable by the agent (is its file system full or read-only?)",
                    self.args.state_dir.display()
                ),
            ));
        }
        let program = self.args.gitlab_runner.clone();
        let mut child =
            runner::spawn(&program, &args, &user, &env).map_err(|e| spawn_failure(&program, &e))?;
        let pid = child.id().unwrap_or(0);
        let secrets: Vec<Secret> = [
            Some(config.credential.secret().clone()),
            self.runner_token.clone(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let forwarding = tokio::spawn(runner::forward_output(stdout, stderr, secrets));
        self.child = Some(child);

        self.enter(
            Phase::Running,
            &format!("gitlab-runner (pid {pid}) runs up to {} job(s) as {}, giving up after {} s without a job", config.max_jobs, user.name, config.idle_timeout.as_secs()),
        )
        .map_err(bug)?;

        let lifetime_end = config.max_lifetime.map(deadline_after);
        let exit = loop {
            let draining = self.lc.phase() == Phase::Draining;
            let child = self.child.as_mut().expect("child is running");
            tokio::select! {
                // A stop outranks everything else that may be ready at the same time.
                biased;
                _ = wait_for(self.interrupts.clone(), Interrupt::Stop) => return Ok(false),
                exit = child.wait() => break exit,
                _ = wait_for(self.interrupts.clone(), Interrupt::Drain), if !draining => {
                    self.drain(pid, "drain requested (SIGUSR1)")?;
                }
                _ = sleep_until_opt(lifetime_end), if !draining => {
                    self.drain(pid, &format!("max_lifetime of {} s reached", config.max_lifetime.unwrap_or_default().as_secs()))?;
                }
            }
        };
        self.child = None;
        // Give the forwarder a moment to log gitlab-runner's last lines.
        let _ = tokio::time::timeout(Duration::from_secs(2), forwarding).await;
        match exit {
            Ok(status) if status.success() => {
                log!(info, "gitlab-runner exited: its jobs are done");
                Ok(true)
            }
            Ok(status)
                if self.lc.phase() == Phase::Draining && killed_by(status, Signal::SIGQUIT) =>
            {
                // Our SIGQUIT arrived before gitlab-runner had installed its handlers: it had
                // not taken a job yet, so this is the drain it was asked for, not a failure.
                log!(
                    info,
                    "gitlab-runner ended on SIGQUIT before it could take a job: drained"
                );
                Ok(true)
            }
            Ok(status) => Err(Failure::new(
                format!("gitlab-runner exited with {}", describe_exit(status)),
                "read its output above (journalctl -u gitlab-runner-vm); a wrong config.toml, an unknown executor or a missing tool makes it exit at once",
            )),
            Err(e) => Err(Failure::new(
                format!("cannot wait for gitlab-runner: {e}"),
                "this is a bug in gitlab-runner-vm",
            )),
        }
    }

    fn drain(&mut self, pid: u32, why: &str) -> Result<(), Failure> {
        self.enter(
            Phase::Draining,
            &format!("{why}; gitlab-runner finishes its current job and takes no new one"),
        )
        .map_err(bug)?;
        if let Err(e) = runner::send_signal(pid, Signal::SIGQUIT) {
            log!(
                warn,
                "cannot send SIGQUIT to gitlab-runner (pid {pid}): {e}"
            );
        }
        Ok(())
    }

    /// A restarted agent found that this boot already registered, started gitlab-runner, was
    /// registering or began its teardown: it never starts another gitlab-runner and resumes the
    /// teardown from the state directory alone (runner.json may be what made it crash).
    async fn resume_teardown(&mut self, prev: Status) -> anyhow::Result<ExitCode> {
        let what = if prev.runner_started {
            "started gitlab-runner"
        } else if prev.registered {
            "registered with GitLab"
        } else if prev.phase == Phase::Registering {
            "was registering"
        } else {
            "began its teardown"
        };
        log!(
            warn,
            "status.json shows that this boot already {what} (the agent was restarted); tearing down instead of starting another gitlab-runner"
        );
        let state_dir = self.args.state_dir.clone();
        self.system_id = runner::read_system_id(&state_dir).or(prev.system_id.clone());
        if let Some(id) = &self.system_id {
            logging::update_context(|c| c.system_id = id.clone());
        }
        if let Some(name) = &prev.runner {
            logging::update_context(|c| c.runner = name.clone());
        }
        self.deletes_manager = prev.credential == Some(CredentialKind::RunnerToken);
        let entry = runner::read_runner_entry(&state_dir);
        if let Some(entry) = &entry {
            match Client::new(&entry.url, entry.tls_ca_file.as_deref()) {
                Ok(client) => self.client = Some(client),
                Err(e) => log!(warn, "cannot set up the client for deregistration: {e:#}"),
            }
        }
        self.runner_token = entry.and_then(|e| e.token);
        self.lc.registered = prev.registered;
        if prev.phase == Phase::Registering && !self.deletes_manager {
            // A runner created just before the crash is in config.toml already; else its
            // token is lost.
            match self.runner_token {
                Some(_) => self.lc.registered = true,
                None => log!(
                    warn,
                    "{}",
                    possibly_created(prev.runner.as_deref().unwrap_or("?"))
                ),
            }
        }
        self.lc.deregistered = prev.deregistered;
        self.lc.runner_started = prev.runner_started;
        // A failure of the earlier run still delays the power-off from when it happened.
        self.lc.failed_at = prev
            .timeline
            .iter()
            .rev()
            .find(|e| e.phase == Phase::Failed)
            .map(|e| e.at);
        // The earlier runs' timeline stays, so status shows the restart.
        self.lc.timeline = prev
            .timeline
            .iter()
            .cloned()
            .chain(self.lc.timeline.drain(..))
            .collect();
        self.shown = Shown {
            runner: prev.runner,
            credential: prev.credential,
            gitlab_url: prev.gitlab_url,
        };
        self.last_error = prev.last_error;
        self.teardown().await
    }

    /// A failure: record it, then the normal teardown (deregistration, hold, power-off), with the
    /// power-off no sooner than --failure-delay after the failure.
    async fn fail(&mut self, failure: Failure) -> anyhow::Result<ExitCode> {
        let message = format!("{}; fix: {}", failure.cause, failure.fix);
        log!(error, "{message}");
        self.last_error = Some(message);
        if self.interrupt() == Interrupt::Stop {
            return self.stop().await;
        }
        self.enter(Phase::Failed, &failure.cause)?;
        self.teardown().await
    }

    /// deregistering -> holding? -> powering-off.
    async fn teardown(&mut self) -> anyhow::Result<ExitCode> {
        if self.lc.needs_deregistration() {
            self.enter(Phase::Deregistering, "removing this VM from GitLab")?;
            // Deregistration runs to its (bounded) end even when a stop arrives meanwhile.
            self.deregister().await;
            if self.interrupt() == Interrupt::Stop {
                return self.stop().await;
            }
        }
        let keep_file = self.args.keep_file.clone();
        if lifecycle::after_deregistration(hold::keep_file_exists(&keep_file)) == Phase::Holding
            && !self.hold(&keep_file).await?
        {
            return self.stop().await;
        }
        self.power_off().await
    }

    /// holding: true when the hold ended, false when stopped from outside.
    async fn hold(&mut self, keep_file: &Path) -> anyhow::Result<bool> {
        self.enter(
            Phase::Holding,
            &format!("{} exists: keeping the VM for debugging until it is removed (gitlab-runner-vm release)", keep_file.display()),
        )?;
        let hold_max = Duration::from_secs(self.args.hold_max);
        let interrupts = self.interrupts.clone();
        let end = tokio::select! {
            end = hold::hold(keep_file, hold_max, |deadline| {
                self.hold_deadline = Some(deadline);
                log!(info, "the hold lasts until {} at most (--hold-max after the keep file's last change)", status::fmt_time(deadline));
                self.write_status();
            }) => end,
            _ = wait_for(interrupts, Interrupt::Stop) => return Ok(false),
        };
        self.hold_deadline = None;
        match end {
            Ok(HoldEnd::Released) => log!(info, "hold ended: keep file removed"),
            Ok(HoldEnd::Expired) => log!(info, "hold ended: hold-max reached"),
            Err(e) => log!(
                error,
                "cannot watch {}: {e}; ending the hold",
                keep_file.display()
            ),
        }
        Ok(true)
    }

    async fn deregister(&mut self) {
        let deadline = deadline_after(Duration::from_secs(self.args.deregister_timeout));
        let (Some(client), Some(token)) = (self.client.clone(), self.runner_token.clone()) else {
            let message = "cannot deregister: the runner token or GitLab's url of this boot is lost (config.toml is missing or unreadable); delete this VM's runner or manager in GitLab by hand (Settings > CI/CD > Runners)";
            log!(warn, "{message}");
            self.last_error = Some(message.into());
            return;
        };
        let system_id = self.system_id.clone().unwrap_or_default();
        let result = if self.deletes_manager {
            (
                format!("runner manager {system_id}"),
                gitlab::with_retries("deregister", deadline, || {
                    client.delete_manager(&token, &system_id)
                })
                .await,
            )
        } else {
            (
                "runner".to_string(),
                gitlab::with_retries("deregister", deadline, || client.delete_runner(&token)).await,
            )
        };
        match result {
            (what, Ok(Deletion::Deleted)) => {
                self.lc.deregistered = true;
                log!(info, "deregistered: {what} deleted from GitLab");
            }
            (what, Ok(Deletion::AlreadyGone)) => {
                self.lc.deregistered = true;
                log!(info, "deregistered: {what} was already gone from GitLab");
            }
            (what, Err(e)) => {
                let message = format!(
                    "could not delete {what} from GitLab ({e}); powering off anyway: GitLab removes managers it has not seen for 7 days, or delete it under Settings > CI/CD > Runners"
                );
                log!(warn, "{message}");
                self.last_error = Some(message);
            }
        }
        self.write_status();
    }

    /// powering-off, after the failure delay if the run failed. A keep file created during that
    /// delay (the README tells operators to get in and touch it) still holds the VM.
    async fn power_off(&mut self) -> anyhow::Result<ExitCode> {
        let keep_file = self.args.keep_file.clone();
        loop {
            let now = SystemTime::now();
            let wait = lifecycle::poweroff_wait(
                self.lc.failed_at,
                Duration::from_secs(self.args.failure_delay),
                now,
            );
            self.poweroff_at = now.checked_add(wait);
            let action = if self.args.no_poweroff {
                "exiting without power-off (--no-poweroff)".to_string()
            } else {
                format!("running `{}`", self.args.poweroff_command)
            };
            let detail = if wait.is_zero() {
                action
            } else {
                format!(
                    "{action} in {} s (--failure-delay after the failure; creating {} holds the VM)",
                    wait.as_millis().div_ceil(1000),
                    keep_file.display()
                )
            };
            self.enter(Phase::PoweringOff, &detail)?;
            let keep_file_created = tokio::select! {
                _ = tokio::time::sleep(wait) => false,
                Ok(()) = hold::keep_file_created(&keep_file), if !wait.is_zero() => true,
                _ = wait_for(self.interrupts.clone(), Interrupt::Stop) => return self.stop().await,
            };
            if !keep_file_created {
                break;
            }
            self.poweroff_at = None;
            if !self.hold(&keep_file).await? {
                return self.stop().await;
            }
        }
        systemd::stopping();
        if self.args.no_poweroff {
            log!(
                info,
                "power-off is disabled (--no-poweroff); the VM stays up and the agent exits"
            );
            return Ok(ExitCode::SUCCESS);
        }
        match power::power_off(&self.args.poweroff_command, power::TIMEOUT).await {
            Ok(()) => {
                log!(info, "power-off requested");
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                log!(error, "{e:#}");
                self.last_error = Some(format!("{e:#}"));
                self.write_status();
                Ok(ExitCode::FAILURE)
            }
        }
    }

    /// stopping: the VM is shut down from outside. Abort the job, deregister, exit 0 without
    /// powering off (the platform is already doing that).
    async fn stop(&mut self) -> anyhow::Result<ExitCode> {
        if self.lc.phase() != Phase::Stopping {
            self.enter(
                Phase::Stopping,
                "stop requested (SIGTERM): aborting, deregistering, exiting",
            )?;
        }
        systemd::stopping();
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, Duration::from_secs(self.args.stop_timeout)).await;
        }
        if self.lc.needs_deregistration() {
            self.deregister().await;
        }
        log!(info, "stopped");
        Ok(ExitCode::SUCCESS)
    }
}

/// SIGTERM (gitlab-runner aborts the job and reports it to GitLab), then SIGKILL after
/// `timeout`.
async fn stop_child(child: &mut Child, timeout: Duration) {
    let Some(pid) = child.id() else { return };
    log!(
        info,
        "sending SIGTERM to gitlab-runner (pid {pid}); it aborts its job and reports it"
    );
    if let Err(e) = runner::send_signal(pid, Signal::SIGTERM) {
        log!(warn, "cannot send SIGTERM to gitlab-runner: {e}");
    }
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => log!(info, "gitlab-runner exited with {}", describe_exit(status)),
        Ok(Err(e)) => log!(warn, "cannot wait for gitlab-runner: {e}"),
        Err(_) => {
            log!(
                warn,
                "gitlab-runner did not exit within {} s of SIGTERM; killing it",
                timeout.as_secs()
            );
            let _ = child.kill().await;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn killed_by(status: ExitStatus, signal: Signal) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(signal as i32)
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("signal {sig}"),
        _ => status.to_string(),
    }
}

fn bug(e: impl std::fmt::Display) -> Failure {
    Failure::new(
        e.to_string(),
        "this is a bug in gitlab-runner-vm; please report it with the journal",
    )
}

fn spawn_failure(program: &Path, e: &std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::NotFound {
        Failure::new(
            format!("gitlab-runner not found: {}", program.display()),
            "install gitlab-runner in the image, or point --gitlab-runner (GITLAB_RUNNER_VM_GITLAB_RUNNER) at it",
        )
    } else {
        Failure::new(
            format!("cannot start {}: {e}", program.display()),
            "check that it is an executable gitlab-runner",
        )
    }
}

/// What an operator must know when a create request's fate is unknown.
fn possibly_created(name: &str) -> String {
    format!(
        "GitLab may have created a runner named \"{name}\" for this VM without this VM learning its token, so it cannot be deleted from here; if it is listed under Settings > CI/CD > Runners, delete it there"
    )
}

fn registration_failure(e: &RetryError, timeout_s: u64) -> Failure {
    match e {
        RetryError::Permanent(api) => {
            Failure::new(format!("registration failed: {api}"), api.fix())
        }
        RetryError::DeadlineExceeded { .. } => Failure::new(
            format!("registration failed: {e}"),
            format!(
                "check that GitLab is reachable from the VM; --register-timeout ({timeout_s} s) bounds the retries"
            ),
        ),
    }
}
