//! The gitlab-runner process: the unprivileged user it runs as, its arguments, its scrubbed
//! environment, starting it, and signalling it.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::{Gid, Pid, Uid, User};
use tokio::process::{Child, Command};

use crate::config::RunnerConfig;

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
    fn the_runner_user_is_the_agents_own_unless_root() {
        let me = RunnerUser::resolve(None).unwrap();
        assert_eq!(me.uid, Uid::current());
        let Ok(Some(nobody)) = User::from_name("nobody") else {
            return;
        };
        let other = RunnerUser::resolve(Some("nobody"));
        if Uid::current().is_root() {
            let other = other.unwrap();
            assert_eq!((other.uid, other.gid), (nobody.uid, nobody.gid));
            assert!(other.groups.contains(&nobody.gid), "{:?}", other.groups);
        } else {
            let err = format!("{:#}", other.unwrap_err());
            assert!(err.contains("only root can switch users"), "{err}");
        }
        let err = RunnerUser::resolve(Some("no-such-user-xyz")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    /// Run as root, gitlab-runner runs as the runner user, not as root.
    #[tokio::test]
    async fn spawn_switches_to_the_runner_user() {
        if !Uid::current().is_root() {
            return;
        }
        let Ok(user) = RunnerUser::resolve(Some("nobody")) else {
            return;
        };
        let script = "while read -r k v rest; do case $k in Uid:|Gid:) echo $k $v;; esac; done < /proc/self/status";
        let args = ["-c".to_string(), script.to_string()];
        let child = spawn(Path::new("/bin/sh"), &args, &user, &[]).unwrap();
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("Uid: {}\nGid: {}\n", user.uid, user.gid)
        );
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
