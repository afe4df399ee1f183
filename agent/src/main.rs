//! gitlab-runner-vm: the lifecycle agent of a disposable GitLab CI runner VM.

/// A line for a person at a terminal (stdout), made `console::printable`: no value in it (a
/// path, GitLab's error, runner.json's url) can act on the terminal or forge a second line.
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", $crate::console::printable(&format!($($arg)*)))
    };
}

/// `say!` on stderr.
macro_rules! complain {
    ($($arg:tt)*) => {
        eprintln!("{}", $crate::console::printable(&format!($($arg)*)))
    };
}

mod agent;
mod backoff;
mod boot_record;
mod bounded;
mod broker;
mod cgroup;
mod cli;
mod config;
mod console;
mod daemon_config;
mod facts;
mod files;
mod firewall_admission;
mod fswatch;
mod gitlab;
mod hold;
mod http;
mod lifecycle;
mod logging;
mod metadata;
mod paths;
mod power;
mod preemption;
mod registration;
mod runner;
mod secret;
mod ssh_keys_command;
mod status;
mod systemd;
mod timestamp;

use std::io::ErrorKind;
use std::path::Path;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Parser;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            logging::init();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(*args)) {
                Ok(code) => code,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config } => check(&config),
        Command::Status { state_dir, json } => show_status(&state_dir, json),
        Command::Release { keep_file } => release(&keep_file),
        Command::Drain { state_dir } => drain(&state_dir),
        Command::SshKeys(args) => ssh_keys_command::run(&args),
        Command::Facts => facts::print(),
        Command::JobExec(args) => runner::job_exec::run(&args),
    }
}

fn check(path: &Path) -> ExitCode {
    let text = match files::read_text(path, files::CONFIG_CAP) {
        Ok(text) => text,
        Err(e) => {
            match files::dangling_link(path) {
                Some(target) => complain!(
                    "error: {} is a symbolic link to {}, which does not exist: create {}, or replace the link with runner.json itself",
                    path.display(),
                    target.display(),
                    target.display()
                ),
                None => complain!("error: cannot read {}: {e}", path.display()),
            }
            return ExitCode::FAILURE;
        }
    };
    let validated = config::validate(&text, &cli::default_runner_name(), &|p| {
        files::read_text(p, files::NAMED_FILE_CAP)
    });
    // A token pasted into another field (name, url, runner_type...) is masked like the
    // credential itself.
    for problem in &validated.problems {
        say!("{}", secret::scrub(&problem.to_string()));
    }
    match validated.config {
        Some(c) => {
            // The cache as gitlab-runner scopes it: per runner unless shared.
            let cache = c.cache.as_ref().map(|cache| {
                let shared = if cache.shared { "shared" } else { "per runner" };
                format!(", {} cache {shared}", cache.cache_type.as_str())
            });
            let summary = format!(
                "ok: {} is valid (runner {}, {} credential {}, {} executor, {} job(s), url {}{})",
                path.display(),
                c.name,
                c.credential.kind(),
                c.credential.secret(),
                c.executor.as_str(),
                c.max_jobs,
                c.url,
                cache.unwrap_or_default()
            );
            say!("{}", secret::scrub(&summary));
            ExitCode::SUCCESS
        }
        None => ExitCode::FAILURE,
    }
}

fn show_status(state_dir: &Path, json: bool) -> ExitCode {
    let path = status::path_in(state_dir);
    let shown = if json {
        files::read_text(&path, files::STATE_FILE_CAP)
    } else {
        status::read(state_dir).map(|s| status::render(&s, SystemTime::now()))
    };
    match shown {
        Ok(text) => {
            print!("{}", secret::scrub(&text));
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            // The state directory is root's: config.toml beside status.json holds the token.
            complain!(
                "error: cannot read {}: {e}; the state directory is root's only: sudo gitlab-runner-vm status",
                path.display()
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            complain!(
                "error: cannot read {}: {e}; is gitlab-runner-vm running? (systemctl status gitlab-runner-vm)",
                path.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn release(keep_file: &Path) -> ExitCode {
    match std::fs::remove_file(keep_file) {
        Ok(()) => {
            say!(
                "released: removed {}; the VM powers off once the agent's teardown is done",
                keep_file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            say!("no hold: {} does not exist", keep_file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain!(
                "error: cannot remove {}: {e}; run as root (sudo gitlab-runner-vm release)",
                keep_file.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn drain(state_dir: &Path) -> ExitCode {
    use lifecycle::Phase;
    let status = match status::read(state_dir) {
        Ok(s) => s,
        Err(e) => {
            complain!(
                "error: cannot read {}: {e}; is gitlab-runner-vm running?",
                status::path_in(state_dir).display()
            );
            return ExitCode::FAILURE;
        }
    };
    match status.phase {
        Phase::WaitingForConfig | Phase::Registering | Phase::Running => {}
        Phase::Draining => {
            say!(
                "already draining: gitlab-runner finishes its current job, then the VM is torn down"
            );
            return ExitCode::SUCCESS;
        }
        finished => {
            complain!(
                "error: nothing to drain: the agent is {finished}, past running jobs (gitlab-runner-vm status shows what it does)"
            );
            return ExitCode::FAILURE;
        }
    }
    // status.json may outlive the agent, and its pid may since belong to another program.
    if let Err(why) = is_this_agent(status.pid) {
        complain!("error: {why}; nothing was signalled");
        return ExitCode::FAILURE;
    }
    let pid = nix::unistd::Pid::from_raw(status.pid as i32);
    match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1) {
        Ok(()) => {
            say!(
                "drain requested: gitlab-runner finishes its current job, takes no new one, then the VM is torn down"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain!(
                "error: cannot signal the agent (pid {}): {e}; run as root (sudo gitlab-runner-vm drain)",
                status.pid
            );
            ExitCode::FAILURE
        }
    }
}

/// Whether `pid` runs the same program as this process (same file, even if replaced since).
fn is_this_agent(pid: u32) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    if pid == 0 || pid > i32::MAX as u32 {
        return Err(format!("status.json names pid {pid}, which is no process"));
    }
    let theirs = std::fs::metadata(format!("/proc/{pid}/exe")).map_err(|e| match e.kind() {
        ErrorKind::NotFound => format!("the agent (pid {pid}) is not running"),
        ErrorKind::PermissionDenied => {
            format!("cannot inspect pid {pid}: {e}; run as root (sudo gitlab-runner-vm drain)")
        }
        _ => format!("cannot inspect pid {pid}: {e}"),
    })?;
    let mine = std::fs::metadata("/proc/self/exe")
        .map_err(|e| format!("cannot inspect this program: {e}"))?;
    if (theirs.dev(), theirs.ino()) != (mine.dev(), mine.ino()) {
        return Err(format!(
            "pid {pid} is not gitlab-runner-vm (the agent has exited and its pid was reused)"
        ));
    }
    Ok(())
}
