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
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::config::{Executor, RunnerConfig};
use crate::files;
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
    let id = files::read_text(&state_dir.join(SYSTEM_ID_FILE), files::STATE_FILE_CAP).ok()?;
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
    let text = files::read_text(&state_dir.join(CONFIG_FILE), files::STATE_FILE_CAP).ok()?;
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
        config.idle_timeout.as_secs().to_string(),
    ]
}

/// Proxy settings gitlab-runner (Go's net/http reads the first three), git, curl and the jobs
/// need as much as the agent (reqwest reads them all) does: behind a proxy, a VM without them
/// registers, finds no job and powers off.
pub const PROXY_VARIABLES: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
];

/// The whole environment gitlab-runner gets, from the agent's own (`var`): PATH, LANG and the
/// proxy settings pass, nothing else does. Stray variables (CI_SERVER_TOKEN, RUNNER_EXECUTOR,
/// DOCKER_HOST, GITLAB_RUNNER_VM_*...) would otherwise feed its flags or leak into jobs.
pub fn scrubbed_environment(
    user: &RunnerUser,
    var: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "PATH".to_string(),
            var("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()),
        ),
        ("HOME".to_string(), user.home.display().to_string()),
        ("USER".to_string(), user.name.clone()),
        ("LOGNAME".to_string(), user.name.clone()),
        ("SHELL".to_string(), user.shell.display().to_string()),
    ];
    for key in std::iter::once("LANG").chain(PROXY_VARIABLES.iter().copied()) {
        if let Some(value) = var(key) {
            env.push((key.to_string(), value));
        }
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

/// The longest line forwarded as one log record. A longer line (or output without newlines) is
/// split: the agent never buffers without bound, and journald and terminals cope badly with
/// huge records.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines: at each newline (dropping it and a CR before it), and after
/// at most `cap` bytes when no newline comes. Bytes need not be text.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    cap: usize,
    /// Byte strings that a split at the cap must not cut in two (the secrets: the halves of a
    /// token in two records would each escape `redact`).
    keep_whole: Vec<Vec<u8>>,
}

impl LineSplitter {
    pub fn new(cap: usize, keep_whole: Vec<Vec<u8>>) -> Self {
        LineSplitter {
            buf: Vec::new(),
            cap: cap.max(1),
            keep_whole,
        }
    }

    /// Adds `data`, calling `line` with each line it completes.
    pub fn push(&mut self, mut data: &[u8], line: &mut impl FnMut(&[u8])) {
        while let Some(at) = data.iter().position(|b| *b == b'\n') {
            self.buf.extend_from_slice(&data[..at]);
            data = &data[at + 1..];
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            self.split_long(line);
            line(&self.buf);
            self.buf.clear();
        }
        self.buf.extend_from_slice(data);
        self.split_long(line);
    }

    /// The end of the stream: the last line, if it had no newline.
    pub fn finish(&mut self, line: &mut impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            line(&self.buf);
            self.buf.clear();
        }
    }

    /// Emits pieces of the buffered line until at most `cap` bytes remain.
    fn split_long(&mut self, line: &mut impl FnMut(&[u8])) {
        while self.buf.len() > self.cap {
            let at = self.split_point();
            line(&self.buf[..at]);
            self.buf.drain(..at);
        }
    }

    /// Where to cut an over-long line: at the cap, moved back so that it cuts neither a UTF-8
    /// character nor anything in `keep_whole`.
    fn split_point(&self) -> usize {
        let mut at = self.cap;
        loop {
            let mut next = at;
            // A continuation byte (10xxxxxx) at `next` means a character began before it.
            while next + 3 > at && next > 1 && self.buf[next] & 0xC0 == 0x80 {
                next -= 1;
            }
            for whole in &self.keep_whole {
                // The longest prefix of `whole` that the part before the cut ends with.
                if let Some(k) = (1..whole.len().min(next))
                    .rev()
                    .find(|k| self.buf[..next].ends_with(&whole[..*k]))
                {
                    next -= k;
                }
            }
            if next == at || next == 0 {
                return at.max(1);
            }
            at = next;
        }
    }
}

/// Copies the child's stdout and stderr into the agent's log, one record per line (see
/// `LineSplitter`), with every secret masked. Reads each stream to its end whatever it holds:
/// a reader that stopped early would kill gitlab-runner with SIGPIPE at its next write.
pub async fn forward_output(
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    secrets: Vec<Secret>,
) {
    let forward = |stream: &'static str,
                   reader: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
                   secrets: Vec<Secret>| async move {
        let Some(mut reader) = reader else { return };
        let refs: Vec<&Secret> = secrets.iter().collect();
        let keep_whole = secrets.iter().map(|s| s.expose().as_bytes().to_vec());
        let mut splitter = LineSplitter::new(MAX_LINE, keep_whole.collect());
        let mut log = |line: &[u8]| {
            let line = String::from_utf8_lossy(line);
            tracing::info!(target: "gitlab-runner", stream, "gitlab-runner: {}", redact(&line, &refs));
        };
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => splitter.push(&buf[..n], &mut log),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("cannot read gitlab-runner's {stream}: {e}");
                    break;
                }
            }
        }
        splitter.finish(&mut log);
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
            idle_timeout: std::time::Duration::from_secs(120),
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

    fn split(cap: usize, keep_whole: &[&str], chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let keep_whole = keep_whole.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut splitter = LineSplitter::new(cap, keep_whole);
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut |l| lines.push(l.to_vec()));
        }
        splitter.finish(&mut |l| lines.push(l.to_vec()));
        lines
    }

    #[test]
    fn lines_end_at_newlines_whatever_the_bytes() {
        let lines = split(
            100,
            &[],
            &[
                b"one\r\ntw",
                b"o \xff\xfe\0\n",
                b"\n",
                b"last without newline",
            ],
        );
        assert_eq!(
            lines,
            [&b"one"[..], b"two \xff\xfe\0", b"", b"last without newline"]
        );
    }

    #[test]
    fn a_long_line_is_split_at_the_cap_and_nothing_is_lost() {
        let long = vec![b'a'; 1024 * 1024];
        let mut chunks: Vec<&[u8]> = long.chunks(8192).collect();
        chunks.push(b"\nnext\n");
        let lines = split(MAX_LINE, &[], &chunks);
        assert_eq!(lines.len(), 1024 * 1024 / MAX_LINE + 1);
        assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(lines.last().unwrap(), b"next");
        // One chunk far larger than the cap is split too.
        let lines = split(1000, &[], &[&long[..5000]]);
        assert_eq!(lines.iter().map(Vec::len).collect::<Vec<_>>(), [1000; 5]);
    }

    #[test]
    fn a_split_cuts_neither_a_character_nor_a_secret() {
        // 'é' is 2 bytes: cutting at 5 would fall inside the third one.
        let lines = split(5, &[], &["ééé\n".as_bytes()]);
        let text: Vec<_> = lines
            .iter()
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        assert_eq!(text, ["éé", "é"]);

        let secret = "glrt-fake.123";
        let line = format!("{}{secret} and more", "x".repeat(10));
        let lines = split(16, &[secret], &[line.as_bytes()]);
        let text: Vec<_> = lines
            .iter()
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        assert_eq!(text, ["xxxxxxxxxx", "glrt-fake.123 an", "d more"]);
    }

    #[test]
    fn the_environment_keeps_path_lang_and_proxies_only() {
        let user = RunnerUser {
            name: "runner".into(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            home: "/home/runner".into(),
            shell: "/bin/sh".into(),
            groups: Vec::new(),
        };
        let ours = |key: &str| match key {
            "LANG" => Some("C.UTF-8".to_string()),
            "HTTPS_PROXY" => Some("http://proxy:3128".to_string()),
            "no_proxy" => Some(".internal".to_string()),
            "DOCKER_HOST" | "CI_SERVER_TOKEN" => Some("x".to_string()),
            _ => None,
        };
        let env = scrubbed_environment(&user, ours);
        let keys: Vec<_> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "PATH",
                "HOME",
                "USER",
                "LOGNAME",
                "SHELL",
                "LANG",
                "HTTPS_PROXY",
                "no_proxy"
            ]
        );
        assert_eq!(env[0].1, "/usr/local/bin:/usr/bin:/bin");
        assert_eq!(env[6].1, "http://proxy:3128");
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
