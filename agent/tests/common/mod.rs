//! Test harness: the real `gitlab-runner-vm` binary, a fake GitLab (wiremock) on loopback, a fake
//! gitlab-runner script that records how it was started and which signals it got, and a
//! power-off command that records that it ran.

#![allow(dead_code)]

pub mod metadata;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

pub const TOKEN: &str = "glrt-fake.runner.token.0123456789";
pub const BIN: &str = env!("CARGO_BIN_EXE_gitlab-runner-vm");
/// Generous: these tests check behaviour, never speed.
pub const PATIENCE: Duration = Duration::from_secs(30);
/// GitLab's endpoints the agent registers and deregisters a glrt- runner with.
pub const VERIFY: &str = "/api/v4/runners/verify";
pub const MANAGERS: &str = "/api/v4/runners/managers";

/// The agent's facts as checked in (`agent/facts.json`, which tests/facts.rs keeps equal to
/// `gitlab-runner-vm facts`): where these tests take the console prefix, the phases and the
/// flags' defaults and environment variables from, instead of copying them.
pub fn facts() -> &'static Value {
    static FACTS: OnceLock<Value> = OnceLock::new();
    FACTS.get_or_init(|| {
        serde_json::from_str(include_str!("../../facts.json")).expect("agent/facts.json is JSON")
    })
}

/// `message` as the agent writes it to the console: the prefix is the facts', the message
/// stays written out in each test, so a changed console line still fails the test.
pub fn console_line(message: &str) -> String {
    let prefix = facts()["console_prefix"]
        .as_str()
        .expect("facts: console_prefix");
    format!("{prefix}{message}")
}

/// The phases status.json can show, in the agent's order.
pub fn known_phases() -> Vec<&'static str> {
    facts()["phases"]
        .as_array()
        .expect("facts: phases")
        .iter()
        .map(|p| p.as_str().expect("facts: a phase is a string"))
        .collect()
}

/// `name`, checked to be one of the agent's phases: a phase misspelt (or renamed in the agent)
/// fails here instead of making a wait time out or a `contains` never match.
pub fn phase(name: &str) -> &str {
    assert!(
        known_phases().contains(&name),
        "{name:?} is no phase of the agent's; its phases: {:?}",
        known_phases()
    );
    name
}

/// The environment variable of a `run` flag (`--stop-timeout`: GITLAB_RUNNER_VM_STOP_TIMEOUT).
pub fn flag_env(flag: &str) -> &'static str {
    facts()["run_flags"][flag]["env"]
        .as_str()
        .unwrap_or_else(|| panic!("facts: no run flag --{flag}"))
}

pub struct Harness {
    pub dir: TempDir,
    pub server: MockServer,
    pub agent: Option<Child>,
    pub started: Instant,
}

/// How the fake gitlab-runner behaves.
#[derive(Default)]
pub struct FakeRunner {
    /// Seconds the "job" takes.
    pub job_seconds: u32,
    pub exit_code: i32,
}

impl FakeRunner {
    /// A job of `seconds` that succeeds.
    pub fn job(seconds: u32) -> Self {
        FakeRunner {
            job_seconds: seconds,
            exit_code: 0,
        }
    }
}

impl Harness {
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        Harness {
            dir,
            server: MockServer::start().await,
            agent: None,
            started: Instant::now(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// `gitlab-runner-vm drain` for this agent, as an operator types it; it must succeed.
    pub fn drain(&self) {
        let out = std::process::Command::new(BIN)
            .args(["drain", "--state-dir"])
            .arg(self.state_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes `text` as the executable `name` in the test's directory (a fake program for the
    /// agent to run) and returns its path.
    pub fn write_script(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    pub fn keep_file(&self) -> PathBuf {
        self.path("etc/keep-runner")
    }

    pub fn config_path(&self) -> PathBuf {
        self.path("runner-info/runner.json")
    }

    /// runner.json with the fake GitLab's URL and the given extra keys.
    pub fn write_config(&self, extra: Value) {
        let mut config = serde_json::json!({"name": "vm-test", "url": self.server.uri()});
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        std::fs::create_dir_all(self.config_path().parent().unwrap()).unwrap();
        std::fs::write(
            self.config_path(),
            serde_json::to_string_pretty(&config).unwrap(),
        )
        .unwrap();
    }

    /// Writes the fake gitlab-runner: it appends its arguments to `runner-invocations`, copies
    /// the system id it finds next to config.toml, prints the token of config.toml (the agent
    /// must mask it in its log), records TERM/QUIT in `runner-signals`, and "runs a job" for
    /// `job_seconds`.
    pub fn write_fake_runner(&self, fake: FakeRunner) -> PathBuf {
        let dir = self.dir.path().display();
        let script = format!(
            r#"#!/bin/sh
trap 'echo TERM >> {dir}/runner-signals; kill $job 2>/dev/null; exit 0' TERM
trap 'echo QUIT >> {dir}/runner-signals; wait $job; echo "fake gitlab-runner: drained"; exit 0' QUIT
echo "$*" >> {dir}/runner-invocations
env > {dir}/runner-env
cfg_dir=$(dirname "$3")
echo "fake gitlab-runner: using $(grep '^token' "$3")"
echo "fake gitlab-runner: starting job" >&2
# Written last: tests wait for it before signalling, when the traps are in place.
cat "$cfg_dir/.runner_system_id" > {dir}/runner-system-id
sleep {secs} &
job=$!
wait $job
echo "fake gitlab-runner: job done"
exit {code}
"#,
            secs = fake.job_seconds,
            code = fake.exit_code
        );
        self.write_script("gitlab-runner", &script)
    }

    pub fn command(&self, runner: &Path, extra_args: &[&str]) -> Command {
        let mut cmd = self.command_without_paths();
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--keep-file")
            .arg(self.keep_file())
            .arg("--gitlab-runner")
            .arg(runner)
            .args(extra_args);
        cmd
    }

    /// `gitlab-runner-vm run` with the test environment and power-off, but no path flags.
    pub fn command_without_paths(&self) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("run");
        // The harness's own environment must not configure the agent.
        for (key, _) in std::env::vars() {
            if key.starts_with("GITLAB_RUNNER_VM_")
                || key == "NOTIFY_SOCKET"
                || key == "JOURNAL_STREAM"
            {
                cmd.env_remove(key);
            }
        }
        // Run as root (CI), shell jobs need a job user other than root, as in the image.
        if nix::unistd::Uid::current().is_root() {
            cmd.env(flag_env("job-user"), "nobody");
        }
        // Short timeouts for tests, through the environment variables the NixOS module uses;
        // a test's own flags override them.
        for (flag, value) in [
            ("failure-delay", "1"),
            ("config-wait", "10"),
            ("register-timeout", "20"),
            ("deregister-timeout", "5"),
            ("stop-timeout", "5"),
            ("hold-max", "3600"),
        ] {
            cmd.env(flag_env(flag), value);
        }
        // Console lines go to a file of the test, never to the machine's console (nor, as the
        // fallback for a console that cannot be opened, to its kernel log).
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("console"))
            .unwrap();
        cmd.env(flag_env("console"), self.path("console"));
        let poweroff = format!("echo poweroff >> {}", self.path("poweroff").display());
        cmd.env(flag_env("poweroff-command"), poweroff);
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(self.path("agent.stdout")).unwrap())
            .stderr(std::fs::File::create(self.path("agent.log")).unwrap())
            .kill_on_drop(true);
        cmd
    }

    pub fn start(&mut self, runner: &Path, extra_args: &[&str]) {
        self.started = Instant::now();
        self.agent = Some(self.command(runner, extra_args).spawn().unwrap());
    }

    pub fn agent_pid(&self) -> i32 {
        self.agent.as_ref().unwrap().id().unwrap() as i32
    }

    pub async fn wait_exit(&mut self) -> ExitStatus {
        let child = self.agent.as_mut().expect("agent started");
        match tokio::time::timeout(PATIENCE, child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "the agent did not exit within {PATIENCE:?}; its log:\n{}",
                self.log()
            ),
        }
    }

    /// Waits until `cond` holds, or fails with the agent's log.
    pub async fn wait_until(&self, what: &str, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(self) {
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; agent log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What the agent wrote to the console.
    pub fn console(&self) -> String {
        self.read("console").unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    pub fn read(&self, name: &str) -> Option<String> {
        std::fs::read_to_string(self.path(name)).ok()
    }

    pub fn powered_off(&self) -> bool {
        self.read("poweroff")
            .is_some_and(|s| s.contains("poweroff"))
    }

    pub fn runner_invocations(&self) -> Vec<String> {
        self.read("runner-invocations")
            .map(|s| s.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    pub fn runner_signals(&self) -> String {
        self.read("runner-signals").unwrap_or_default()
    }

    pub fn status(&self) -> Value {
        let text = std::fs::read_to_string(self.state_dir().join("status.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    pub fn phase(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.state_dir().join("status.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["phase"].as_str().map(str::to_owned)
    }

    /// Whether status.json shows the phase `name` (one of the agent's, or the test fails).
    pub fn in_phase(&self, name: &str) -> bool {
        self.phase().as_deref() == Some(phase(name))
    }

    /// The phases of status.json's timeline, in order; each one the agent lists in its facts.
    pub fn phases(&self) -> Vec<String> {
        let phases: Vec<String> = self.status()["timeline"]
            .as_array()
            .expect("status.json has a timeline")
            .iter()
            .map(|e| e["phase"].as_str().unwrap().to_owned())
            .collect();
        for p in &phases {
            phase(p);
        }
        phases
    }

    /// Whether status.json's timeline has the phase `name` (one of the agent's).
    pub fn went_through(&self, name: &str) -> bool {
        self.phases().iter().any(|p| p == phase(name))
    }

    /// status.json's last error ("" when there is none).
    pub fn last_error(&self) -> String {
        self.status()["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until the job runs: status.json says `running` (the agent writes it once the
    /// spawn returned) and the fake gitlab-runner is past its traps (it wrote the system id).
    pub async fn wait_for_job(&self) {
        self.wait_until("the job", |h| {
            h.in_phase("running") && h.read("runner-system-id").is_some()
        })
        .await;
    }

    /// Kills the agent with SIGKILL (no teardown at all) and, as systemd would, the rest of
    /// the unit: the fake gitlab-runner at `runner` (matched by its path in this test's
    /// directory).
    pub async fn crash(&mut self, runner: &Path) {
        send_signal(self.agent_pid(), 9);
        self.wait_exit().await;
        let _ = std::process::Command::new("pkill")
            .args(["-f", &runner.display().to_string()])
            .status();
    }

    pub fn system_id_file(&self) -> String {
        std::fs::read_to_string(self.state_dir().join(".runner_system_id")).unwrap()
    }

    pub async fn requests(&self, http_method: &str, url_path: &str) -> Vec<Request> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.method.as_str() == http_method && r.url.path() == url_path)
            .collect()
    }

    /// How many `http_method url_path` requests the fake GitLab got.
    pub async fn count(&self, http_method: &str, url_path: &str) -> usize {
        self.requests(http_method, url_path).await.len()
    }

    /// Mounts GitLab's deletion of a runner this VM created (DELETE /api/v4/runners: 204).
    pub async fn mount_runner_deletion(&self) {
        mount(
            &self.server,
            "DELETE",
            "/api/v4/runners",
            ResponseTemplate::new(204),
        )
        .await;
    }

    /// Mounts GitLab's refusal of the runner token: verify answers 403.
    pub async fn mount_rejected_token(&self) {
        mount(
            &self.server,
            "POST",
            VERIFY,
            ResponseTemplate::new(403)
                .set_body_json(serde_json::json!({"message": "403 Forbidden"})),
        )
        .await;
    }

    /// Mounts the glrt- happy path: verify 200, manager deletion 204.
    pub async fn mount_glrt_happy_path(&self) {
        mount(
            &self.server,
            "POST",
            VERIFY,
            ResponseTemplate::new(200).set_body_json(
                serde_json::json!({"id": 7, "token": TOKEN, "token_expires_at": null}),
            ),
        )
        .await;
        mount(&self.server, "DELETE", MANAGERS, ResponseTemplate::new(204)).await;
    }

    /// The common setup: the glrt- happy path in GitLab, and runner.json with the shared
    /// token and `config`.
    pub async fn prepare_glrt(&self, config: Value) {
        self.mount_glrt_happy_path().await;
        let mut config = config;
        config["token"] = Value::from(TOKEN);
        self.write_config(config);
    }

    /// The common start: `prepare_glrt(config)`, the fake gitlab-runner, and the agent
    /// started with `args`.
    pub async fn start_glrt(&mut self, config: Value, fake: FakeRunner, args: &[&str]) -> PathBuf {
        self.prepare_glrt(config).await;
        let runner = self.write_fake_runner(fake);
        self.start(&runner, args);
        runner
    }

    /// Everything the agent printed and wrote, for secret checks.
    pub fn all_output(&self) -> String {
        let mut all = self.log();
        all.push_str(&self.read("agent.stdout").unwrap_or_default());
        all.push_str(&self.console());
        all.push_str(
            &std::fs::read_to_string(self.state_dir().join("status.json")).unwrap_or_default(),
        );
        all
    }
}

pub async fn mount(
    server: &MockServer,
    http_method: &str,
    url_path: &str,
    response: ResponseTemplate,
) {
    Mock::given(method(http_method))
        .and(path(url_path))
        .respond_with(response)
        .mount(server)
        .await;
}

pub fn body(r: &Request) -> Value {
    serde_json::from_slice(&r.body).unwrap_or(Value::Null)
}

pub fn send_signal(pid: i32, sig: i32) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success());
}
