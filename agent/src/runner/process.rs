//! The gitlab-runner process: its arguments, its scrubbed environment, starting it (as the
//! agent's own user, in the `runner` cgroup when the agent separated them), and signalling it;
//! and the accounts (passwd entries) that gitlab-runner and the jobs run as.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};

use crate::cgroup::RunnerCgroup;
use crate::config::RunnerConfig;

/// A user account as a process runs under it: gitlab-runner's (the agent's own, root in the
/// unit) or the job user's (`--job-user`), whom `job-exec` switches to.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary groups (e.g. docker), resolved before the fork.
    pub groups: Vec<Gid>,
}

impl Account {
    /// `name` = None means this process's own user.
    pub fn resolve(name: Option<&str>) -> anyhow::Result<Self> {
        let user = match name {
            Some(name) => User::from_name(name)
                .with_context(|| format!("cannot look up the job user {name}"))?
                .with_context(|| {
                    format!("the job user {name} does not exist; create it or change --job-user")
                })?,
            None => User::from_uid(Uid::current())?
                .context("the agent's own user has no passwd entry")?,
        };
        let me = Uid::current();
        if user.uid != me && !me.is_root() {
            bail!(
                "cannot run jobs as {} (uid {}): this process runs as uid {me}, and only root can switch users; run the agent as root or drop --job-user",
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
        Ok(Account {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir,
            shell: user.shell,
            groups,
        })
    }
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
    user: &Account,
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

/// Starts gitlab-runner as the agent's own user (root in the unit: it holds the runner token
/// and never runs as the job user), its output piped for `forward_output`, in `cwd` and, when
/// the agent separated the cgroups, in the `runner` cgroup with every job it starts.
pub fn spawn(
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    cwd: &Path,
    cgroup: Option<&RunnerCgroup>,
) -> io::Result<Child> {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    if cwd.is_dir() {
        cmd.current_dir(cwd);
    }
    let procs = cgroup.map(|c| c.procs.clone());
    // SAFETY: the closure runs between fork and exec and only makes plain system calls (open,
    // write) on data prepared before the fork; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            // The agent stops gitlab-runner with SIGQUIT (finish the job) and SIGTERM (abort
            // it). A signal ignored by whoever started the agent stays ignored across exec, and
            // a shell cannot even trap it: give gitlab-runner the default dispositions.
            for sig in [
                Signal::SIGQUIT,
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
            ] {
                // sigaction with SIG_DFL: async-signal-safe.
                signal::signal(sig, signal::SigHandler::SigDfl)?;
            }
            // The unit gives the agent a low OOM score so the kernel kills a job before the agent
            // that must deregister; gitlab-runner and its jobs get the normal score back.
            write_file(c"/proc/self/oom_score_adj", b"0");
            // Into the `runner` cgroup before exec: nothing of gitlab-runner ever runs in the
            // agent's, which the metadata firewall admits. A failure leaves it beside the agent
            // (refusing to start would leave the VM without its job); the agent warned already
            // when it could not make the cgroups.
            if let Some(procs) = &procs {
                write_file(procs, b"0");
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// open + write + close, for between fork and exec: no allocation, errors ignored.
fn write_file(path: &std::ffi::CStr, contents: &[u8]) {
    if let Ok(fd) = nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) {
        let _ = nix::unistd::write(&fd, contents);
    }
}

/// Sends `sig` to gitlab-runner's main process only: jobs run in their own process groups and
/// gitlab-runner stops them itself (SIGQUIT: finish the job; SIGTERM: abort and report it).
pub fn send_signal(pid: u32, sig: Signal) -> nix::Result<()> {
    signal::kill(Pid::from_raw(pid as i32), sig)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Executor;
    use crate::runner::sample_config;

    #[test]
    fn the_environment_keeps_path_lang_and_proxies_only() {
        let user = Account {
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
            &sample_config(Executor::Shell),
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

    /// Only root switches users; anyone may run gitlab-runner as themselves.
    #[test]
    fn an_account_is_this_processs_own_unless_root() {
        let me = Account::resolve(None).unwrap();
        assert_eq!(me.uid, Uid::current());
        let Ok(Some(nobody)) = User::from_name("nobody") else {
            return;
        };
        let other = Account::resolve(Some("nobody"));
        if Uid::current().is_root() {
            let other = other.unwrap();
            assert_eq!((other.uid, other.gid), (nobody.uid, nobody.gid));
            assert!(other.groups.contains(&nobody.gid), "{:?}", other.groups);
        } else {
            let err = format!("{:#}", other.unwrap_err());
            assert!(err.contains("only root can switch users"), "{err}");
        }
        let err = Account::resolve(Some("no-such-user-xyz")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    /// gitlab-runner runs as the agent (never switched to the job user), in the given working
    /// directory, with exactly the environment it is given.
    #[tokio::test]
    async fn spawn_keeps_the_agents_user_and_clears_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let script =
            "echo uid=$(id -u) cwd=$(pwd) env=$(env | sed 's/=.*//' | sort | tr '\\n' ' ')";
        let args = ["-c".to_string(), script.to_string()];
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let child = spawn(Path::new("/bin/sh"), &args, &env, dir.path(), None).unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let cwd = dir.path().canonicalize().unwrap();
        assert!(
            text.starts_with(&format!("uid={} cwd={} ", Uid::current(), cwd.display())),
            "{text}"
        );
        let names: Vec<&str> = text
            .split("env=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .collect();
        // The shell adds PWD, SHLVL and _ itself; nothing else comes from the agent.
        for name in names {
            assert!(
                ["PATH", "PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
                "{name} in {text}"
            );
        }
    }

    #[tokio::test]
    async fn send_signal_reaches_the_process() {
        use std::os::unix::process::ExitStatusExt;

        let mut child = Command::new("/bin/sh")
            .args(["-c", "read -r line"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        send_signal(child.id().unwrap(), Signal::SIGTERM).unwrap();
        let status = child.wait().await.unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGTERM as i32), "{status:?}");
    }
}
