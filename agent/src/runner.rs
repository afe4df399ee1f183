//! Everything about the real gitlab-runner: the system id, config.toml, the unprivileged user it
//! runs as, starting `run-single` with a scrubbed environment, forwarding its output, and
//! signalling it.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::config::{Executor, RunnerConfig};
use crate::secret::{Secret, redact};

pub const SYSTEM_ID_FILE: &str = ".runner_system_id";
pub const CONFIG_FILE: &str = "config.toml";

/// A fresh `r_` + 12 random alphanumerics. Never derived from /etc/machine-id, which VMs cloned
/// from one image share (they would collapse into one runner manager in GitLab).
pub fn generate_system_id() -> io::Result<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut id = String::from("r_");
    while id.len() < 14 {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).map_err(|e| io::Error::other(e.to_string()))?;
        // 62 * 4 = 248: rejecting bytes >= 248 keeps every character equally likely.
        for b in buf.iter().filter(|b| **b < 248) {
            if id.len() == 14 {
                break;
            }
            id.push(ALPHABET[(*b % 62) as usize] as char);
        }
    }
    Ok(id)
}

/// The format gitlab-runner accepts in `.runner_system_id` (anything else it replaces).
pub fn is_valid_system_id(id: &str) -> bool {
    id.len() == 14
        && (id.starts_with("r_") || id.starts_with("s_"))
        && id[2..].chars().all(|c| c.is_ascii_alphanumeric())
}

/// The user gitlab-runner (and so every job) runs as.
#[derive(Debug, Clone)]
pub struct RunnerUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups (e.g. docker), resolved before the fork.
    pub groups: Vec<Gid>,
}

impl RunnerUser {
    /// `name` = None means the agent's own user.
    pub fn resolve(name: Option<&str>) -> anyhow::Result<Self> {
        let user = match name {
            Some(name) => User::from_name(name)
                .with_context(|| format!("cannot look up the runner user {name}"))?
                .with_context(|| {
                    format!(
                        "the runner user {name} does not exist; create it or change --runner-user"
                    )
                })?,
            None => User::from_uid(Uid::current())?
                .context("the agent's own user has no passwd entry")?,
        };
        let me = Uid::current();
        if user.uid != me && !me.is_root() {
            bail!(
                "cannot run gitlab-runner as {} (uid {}): the agent runs as uid {me}, and only root can switch users; run the agent as root or drop --runner-user",
                user.name,
                user.uid
            );
        }
        let groups = if me.is_root() {
            let cname = CString::new(user.name.clone())?;
            nix::unistd::getgrouplist(&cname, user.gid)
                .with_context(|| format!("cannot list the groups of {}", user.name))?
        } else {
            Vec::new()
        };
        Ok(RunnerUser {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
            shell: user.shell,
            groups,
        })
    }
}

/// Writes `<state-dir>/.runner_system_id` and `<state-dir>/config.toml`, both 0600 and owned by
/// the runner user (gitlab-runner reads them), before any GitLab call.
pub fn write_state_files(
    state_dir: &Path,
    system_id: &str,
    config_toml: &str,
    owner: &RunnerUser,
) -> anyhow::Result<()> {
    write_private(&state_dir.join(SYSTEM_ID_FILE), system_id.as_bytes(), owner)?;
    write_private(&state_dir.join(CONFIG_FILE), config_toml.as_bytes(), owner)
}

fn write_private(path: &Path, contents: &[u8], owner: &RunnerUser) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_data()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    if Uid::current().is_root() {
        nix::unistd::chown(&tmp, Some(owner.uid), Some(owner.gid))
            .with_context(|| format!("cannot give {} to {}", tmp.display(), owner.name))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a system id this boot already wrote, if it is valid.
pub fn read_system_id(state_dir: &Path) -> Option<String> {
    let id = fs::read_to_string(state_dir.join(SYSTEM_ID_FILE)).ok()?;
    let id = id.trim();
    is_valid_system_id(id).then(|| id.to_string())
}

/// What a restarted agent needs from an existing config.toml to deregister without runner.json:
/// GitLab's URL, the runner token (the shared `glrt-` token, or the one GitLab returned for the
/// runner this boot created) and the extra CA file.
#[derive(Debug, Clone)]
pub struct RunnerEntry {
    pub url: String,
    pub token: Option<Secret>,
    pub tls_ca_file: Option<PathBuf>,
}

pub fn read_runner_entry(state_dir: &Path) -> Option<RunnerEntry> {
    let text = fs::read_to_string(state_dir.join(CONFIG_FILE)).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let runner = table.get("runners")?.as_array()?.first()?;
    let text_of = |key: &str| {
        runner
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
    };
    Some(RunnerEntry {
        url: text_of("url")?.to_string(),
        token: text_of("token").map(Secret::new),
        tls_ca_file: text_of("tls-ca-file").map(PathBuf::from),
    })
}

/// config.toml for `gitlab-runner run-single -c <file> -r <name>`: one `[[runners]]` entry.
pub fn render_config_toml(config: &RunnerConfig, runner_token: &Secret) -> String {
    use toml::{Table, Value};
    let mut runner = Table::new();
    runner.insert("name".into(), Value::from(config.name.as_str()));
    runner.insert("url".into(), Value::from(config.url.as_str()));
    runner.insert("token".into(), Value::from(runner_token.expose()));
    runner.insert("executor".into(), Value::from(config.executor.as_str()));
    if let Some(ca) = &config.tls_ca_file {
        runner.insert("tls-ca-file".into(), Value::from(ca.display().to_string()));
    }
    if let Some(dir) = &config.builds_dir {
        runner.insert("builds_dir".into(), Value::from(dir.as_str()));
    }
    if !config.environment.is_empty() {
        runner.insert(
            "environment".into(),
            Value::from(config.environment.clone()),
        );
    }
    if let (Executor::Docker, Some(docker)) = (config.executor, &config.docker) {
        let mut d = Table::new();
        d.insert("image".into(), Value::from(docker.image.as_str()));
        d.insert("privileged".into(), Value::from(docker.privileged));
        if !docker.volumes.is_empty() {
            d.insert("volumes".into(), Value::from(docker.volumes.clone()));
        }
        runner.insert("docker".into(), Value::Table(d));
    }
    let mut root = Table::new();
    // run-single ignores `concurrent`, but gitlab-runner's config loader expects it.
    root.insert("concurrent".into(), Value::from(1));
    root.insert("runners".into(), Value::Array(vec![Value::Table(runner)]));
    format!("# Written by gitlab-runner-vm for this boot only; rewritten at every start.\n{root}")
}

/// The arguments of `gitlab-runner run-single`.
pub fn run_single_args(config_file: &Path, config: &RunnerConfig) -> Vec<String> {
    vec![
        "run-single".into(),
        "-c".into(),
        config_file.display().to_string(),
        "-r".into(),
        config.name.clone(),
        "--max-builds".into(),
        config.max_jobs.to_string(),
        "--wait-timeout".into(),
        config.idle_timeout.to_string(),
    ]
}

/// The whole environment gitlab-runner gets: stray variables in ours (CI_SERVER_TOKEN,
/// RUNNER_EXECUTOR, DOCKER_HOST, GITLAB_RUNNER_VM_*...) would otherwise feed its flags or leak
/// into jobs.
pub fn scrubbed_environment(
    user: &RunnerUser,
    path: Option<String>,
    lang: Option<String>,
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            path.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME".to_string(), user.home.display().to_string()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
        ("SHELL".to_string(), user.shell.display().to_string()),
    ];
    if let Some(lang) = lang {
        env.push(("LANG".to_string(), lang));
    }
    env
}

/// Starts gitlab-runner as `user`, its output piped for `forward_output`.
pub fn spawn(
    program: &Path,
    args: &[String],
    user: &RunnerUser,
    env: &[(String, String)],
) -> io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    if user.home.is_dir() {
        // The shell executor puts `builds/` under the working directory.
        cmd.current_dir(&user.home);
    }
    let switch_user = user.uid != Uid::current();
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs between fork and exec and only makes plain system calls (open,
    // write, setgroups, setgid, setuid) on data prepared before the fork; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            // The unit gives the agent a low OOM score so the kernel kills a job before the agent
            // that must deregister; gitlab-runner and its jobs get the normal score back.
            if let Ok(fd) = nix::fcntl::open(
                c"/proc/self/oom_score_adj",
                nix::fcntl::OFlag::O_WRONLY,
                nix::sys::stat::Mode::empty(),
            ) {
                let _ = nix::unistd::write(&fd, b"0");
            }
            if switch_user {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Copies the child's stdout and stderr into the agent's log, line by line, with every secret
/// masked. Ends when both streams close.
pub async fn forward_output(
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    secrets: Vec<Secret>,
) {
    let forward = |stream: &'static str,
                   reader: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
                   secrets: Vec<Secret>| async move {
        let Some(reader) = reader else { return };
        let mut lines = BufReader::new(reader).lines();
        let refs: Vec<&Secret> = secrets.iter().collect();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::info!(target: "gitlab-runner", stream, "gitlab-runner: {}", redact(&line, &refs));
        }
    };
    tokio::join!(
        forward("stdout", stdout.map(|s| Box::new(s) as _), secrets.clone()),
        forward("stderr", stderr.map(|s| Box::new(s) as _), secrets),
    );
}

/// Sends `sig` to gitlab-runner's main process only: jobs run in their own process groups and
/// gitlab-runner stops them itself (SIGQUIT: finish the job; SIGTERM: abort and report it).
pub fn send_signal(pid: u32, sig: Signal) -> nix::Result<()> {
    signal::kill(Pid::from_raw(pid as i32), sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Credential, DockerSettings, RunnerSettings};

    fn config(executor: Executor) -> RunnerConfig {
        RunnerConfig {
            name: "vm \"1\"".into(),
            url: "https://gitlab.example.com".into(),
            credential: Credential::RunnerToken(Secret::new("glrt-abc")),
            executor,
            settings: RunnerSettings::default(),
            docker: Some(DockerSettings {
                image: "alpine:3.20".into(),
                privileged: true,
                volumes: vec!["/cache".into()],
            }),
            max_jobs: 3,
            idle_timeout: 120,
            max_lifetime: None,
            tls_ca_file: Some("/etc/ca.pem".into()),
            builds_dir: None,
            environment: vec!["FOO=bar".into()],
        }
    }

    #[test]
    fn system_ids_are_fresh_and_valid() {
        let a = generate_system_id().unwrap();
        let b = generate_system_id().unwrap();
        assert!(is_valid_system_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_valid_system_id("r_short"));
        assert!(!is_valid_system_id("x_abcdefghijkl"));
        assert!(!is_valid_system_id("r_abcdefghij-l"));
    }

    #[test]
    fn config_toml_is_valid_toml_with_one_runner() {
        let text = render_config_toml(&config(Executor::Docker), &Secret::new("glrt-xyz"));
        let table: toml::Table = text.parse().unwrap();
        let runner = &table["runners"].as_array().unwrap()[0];
        assert_eq!(runner["name"].as_str(), Some("vm \"1\""));
        assert_eq!(runner["token"].as_str(), Some("glrt-xyz"));
        assert_eq!(runner["executor"].as_str(), Some("docker"));
        assert_eq!(runner["tls-ca-file"].as_str(), Some("/etc/ca.pem"));
        assert_eq!(runner["docker"]["image"].as_str(), Some("alpine:3.20"));
        assert_eq!(runner["docker"]["privileged"].as_bool(), Some(true));
        assert_eq!(runner["environment"][0].as_str(), Some("FOO=bar"));
        let shell = render_config_toml(&config(Executor::Shell), &Secret::new("glrt-xyz"));
        assert!(!shell.contains("[runners.docker]"));
    }

    #[test]
    fn state_files_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let me = RunnerUser::resolve(None).unwrap();
        let toml = render_config_toml(&config(Executor::Shell), &Secret::new("glrt-xyz"));
        write_state_files(dir.path(), "r_abcdefABCDEF", &toml, &me).unwrap();
        for f in [SYSTEM_ID_FILE, CONFIG_FILE] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(
            fs::read_to_string(dir.path().join(SYSTEM_ID_FILE)).unwrap(),
            "r_abcdefABCDEF"
        );
        assert_eq!(
            read_system_id(dir.path()).as_deref(),
            Some("r_abcdefABCDEF")
        );
        let entry = read_runner_entry(dir.path()).unwrap();
        assert_eq!(entry.token.unwrap().expose(), "glrt-xyz");
        assert_eq!(entry.url, "https://gitlab.example.com");
        assert_eq!(entry.tls_ca_file, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn run_single_arguments() {
        let args = run_single_args(
            Path::new("/run/gitlab-runner-vm/config.toml"),
            &config(Executor::Shell),
        );
        assert_eq!(
            args,
            [
                "run-single",
                "-c",
                "/run/gitlab-runner-vm/config.toml",
                "-r",
                "vm \"1\"",
                "--max-builds",
                "3",
                "--wait-timeout",
                "120"
            ]
        );
    }
}
