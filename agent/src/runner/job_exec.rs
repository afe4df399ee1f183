//! `gitlab-runner-vm job-exec`: the custom executor's `run_exec`, through which gitlab-runner
//! (root, holding the runner token) runs every stage of a shell job as the job user.
//!
//! `gitlab-runner run-single` has no `--user` (commands/single.go builds each job with an empty
//! global config), so its shell executor would run jobs as gitlab-runner's own user, the one
//! that must read config.toml. The custom executor (executors/custom) instead calls
//! `run_exec run_args... <script> <stage>` for each stage, with BUILD_FAILURE_EXIT_CODE and
//! SYSTEM_FAILURE_EXIT_CODE (and BUILD_EXIT_CODE_FILE on newer runners) in the environment,
//! and on abort sends SIGTERM to the process group (helpers/process/killer_unix.go). Here the
//! script is opened as root, the process drops to the job user (groups, gid, uid) and runs
//! `bash --login` with the script on stdin, as the shell executor does for bash
//! (executors/shell: the script is bash's stdin), in a clean environment: nothing of
//! gitlab-runner's (CUSTOM_ENV_*, its TMPDIR) reaches the job except what the script exports.

use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Stdio};

use clap::Args;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::Uid;

use super::{Account, scrubbed_environment};

#[derive(Debug, Clone, Args)]
pub struct JobExecArgs {
    /// The user the job runs as (never root)
    #[arg(long, alias = "runner-user")]
    pub job_user: Option<String>,
    /// The cgroup (its directory in the cgroup v2 mount) this process moves into before the
    /// stage starts, so that no job runs in gitlab-runner's cgroup, which the metadata firewall
    /// may admit; a failure to move is a system failure and the stage does not run
    #[arg(long, value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// The stage's script, written by gitlab-runner
    pub script: PathBuf,
    /// The stage's name (prepare_script, get_sources, step_script, ...)
    pub stage: String,
}

/// The exit codes gitlab-runner told this process to use (command.go's defaults otherwise).
struct Codes {
    build_failure: u8,
    system_failure: u8,
    exit_code_file: Option<PathBuf>,
}

impl Codes {
    fn from(var: impl Fn(&str) -> Option<String>) -> Codes {
        let code = |key: &str, default: u8| {
            var(key)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        Codes {
            build_failure: code("BUILD_FAILURE_EXIT_CODE", 1),
            system_failure: code("SYSTEM_FAILURE_EXIT_CODE", 2),
            exit_code_file: var("BUILD_EXIT_CODE_FILE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
        }
    }
}

/// What the job's exit means to gitlab-runner: None for success, else the job's own code (a
/// signal as 128 + its number, as shells report it) for BUILD_EXIT_CODE_FILE.
pub fn failure_code(status: ExitStatus) -> Option<i32> {
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(code), _) => Some(code),
        (None, Some(signal)) => Some(128 + signal),
        (None, None) => Some(1),
    }
}

pub fn run(args: &JobExecArgs) -> ExitCode {
    let codes = Codes::from(|key| std::env::var(key).ok());
    match run_job(args) {
        Ok(status) => match failure_code(status) {
            None => ExitCode::SUCCESS,
            Some(code) => {
                if let Some(file) = &codes.exit_code_file
                    && let Err(e) = std::fs::write(file, format!("{code}\n"))
                {
                    eprintln!(
                        "gitlab-runner-vm job-exec: {}",
                        crate::console::printable(&format!(
                            "cannot write the exit code to {}: {e}",
                            file.display()
                        ))
                    );
                }
                ExitCode::from(codes.build_failure)
            }
        },
        Err(why) => {
            // gitlab-runner shows this in the job's log: a system failure, not the job's.
            // Made printable: the path and the stage come from gitlab-runner's arguments.
            eprintln!(
                "gitlab-runner-vm job-exec: {}",
                crate::console::printable(&why)
            );
            ExitCode::from(codes.system_failure)
        }
    }
}

fn run_job(args: &JobExecArgs) -> Result<ExitStatus, String> {
    // First, before anything of the job exists: the stage is born in the jobs' cgroup or not
    // at all (fail closed: a job in gitlab-runner's cgroup would share its firewall rule).
    if let Some(dir) = &args.cgroup {
        crate::cgroup::enter(dir).map_err(|why| {
            format!(
                "the {} stage does not run: it must run in the jobs' cgroup, away from gitlab-runner's, and {why}",
                args.stage
            )
        })?;
    }
    let user = Account::resolve(args.job_user.as_deref()).map_err(|e| format!("{e:#}"))?;
    if user.uid.is_root() {
        return Err(format!(
            "refusing to run the {} stage as root: jobs never run as the user that can read the runner token; give the agent --job-user (GITLAB_RUNNER_VM_JOB_USER), the CI user",
            args.stage
        ));
    }
    // Opened before the switch: the script is gitlab-runner's (root's) file.
    let script = File::open(&args.script).map_err(|e| {
        format!(
            "cannot open the {} script {}: {e}",
            args.stage,
            args.script.display()
        )
    })?;
    let mut env = scrubbed_environment(&user, |key| std::env::var(key).ok());
    env.extend(runtime_dir(&user, Path::new(RUN_USER)));
    let cwd = if user.home.is_dir() {
        user.home.as_path()
    } else {
        Path::new("/")
    };
    let mut child = spawn_as(&user, script, &env, cwd)
        .map_err(|e| format!("cannot start bash as {}: {e}", user.name))?;
    // gitlab-runner aborts a stage with SIGTERM to the whole process group: the job (whose
    // signals are reset before exec) gets it too and ends; this process stays to report how.
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    child
        .wait()
        .map_err(|e| format!("cannot wait for the {} stage: {e}", args.stage))
}

/// Where systemd makes each user's runtime directory (the image lingers the job user, so it
/// exists from boot although jobs start without a login session).
const RUN_USER: &str = "/run/user";

/// XDG_RUNTIME_DIR for the job, as a login session would set it: rootless Podman keeps its
/// socket and state there. Only a directory of the job user's own, never another's.
fn runtime_dir(user: &Account, base: &Path) -> Option<(String, String)> {
    use std::os::unix::fs::MetadataExt;
    let dir = base.join(user.uid.to_string());
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == user.uid.as_raw())
        .then(|| ("XDG_RUNTIME_DIR".to_string(), dir.display().to_string()))
}

/// `bash --login` as `user`, the script on stdin.
fn spawn_as(
    user: &Account,
    script: File,
    env: &[(String, String)],
    cwd: &Path,
) -> io::Result<std::process::Child> {
    let mut cmd = Command::new("bash");
    cmd.arg("--login")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::from(script));
    let switch = user.uid != Uid::current();
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: between fork and exec only plain system calls on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for sig in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGQUIT,
                Signal::SIGHUP,
            ] {
                signal(sig, SigHandler::SigDfl)?;
            }
            if switch {
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_map_to_gitlab_runners_codes() {
        assert_eq!(failure_code(ExitStatus::from_raw(0)), None);
        assert_eq!(failure_code(ExitStatus::from_raw(3 << 8)), Some(3));
        assert_eq!(failure_code(ExitStatus::from_raw(1 << 8)), Some(1));
        // Killed by SIGTERM (15): reported as a shell would, 143.
        assert_eq!(failure_code(ExitStatus::from_raw(15)), Some(143));
    }

    #[test]
    fn the_runtime_directory_is_the_job_users_own_or_none() {
        let base = tempfile::tempdir().unwrap();
        let me = Account::resolve(None).unwrap();
        assert_eq!(runtime_dir(&me, base.path()), None);
        let dir = base.path().join(me.uid.to_string());
        std::fs::create_dir(&dir).unwrap();
        assert_eq!(
            runtime_dir(&me, base.path()),
            Some(("XDG_RUNTIME_DIR".into(), dir.display().to_string()))
        );
        // Someone else's directory under the job user's uid is not the job user's.
        let other = Account {
            uid: Uid::from_raw(me.uid.as_raw() + 1),
            ..me.clone()
        };
        std::fs::create_dir(base.path().join(other.uid.to_string())).unwrap();
        assert_eq!(runtime_dir(&other, base.path()), None);
    }

    #[test]
    fn codes_come_from_gitlab_runners_environment() {
        let codes = Codes::from(|key| match key {
            "BUILD_FAILURE_EXIT_CODE" => Some("7".into()),
            "SYSTEM_FAILURE_EXIT_CODE" => Some(" 9 ".into()),
            "BUILD_EXIT_CODE_FILE" => Some("/tmp/x".into()),
            _ => None,
        });
        assert_eq!((codes.build_failure, codes.system_failure), (7, 9));
        assert_eq!(codes.exit_code_file, Some(PathBuf::from("/tmp/x")));
        let defaults = Codes::from(|key| (key == "BUILD_FAILURE_EXIT_CODE").then(|| "x".into()));
        assert_eq!((defaults.build_failure, defaults.system_failure), (1, 2));
        assert_eq!(defaults.exit_code_file, None);
    }
}
