//! Powering the VM off: the configured command (default `systemctl poweroff`, so that systemd
//! stops every service cleanly), run with `/bin/sh -c`, bounded by `TIMEOUT`.

use std::os::fd::AsFd;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;

/// How long the power-off command may take; then its process group is killed and the power-off
/// has failed (the agent exits 1 and systemd restarts it, which tries again). `systemctl
/// poweroff` only queues the shutdown and returns at once.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `command` until its shell exits, at most `timeout`. Its output goes straight to the
/// agent's stderr (the journal): a process it leaves in the background may keep that open
/// without holding up the agent.
pub async fn power_off(command: &str, timeout: Duration) -> anyhow::Result<()> {
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(agent_stderr())
        .stderr(agent_stderr())
        // Its own process group, so that a timeout kills whatever it started too.
        .process_group(0)
        .kill_on_drop(false)
        .spawn()
        .with_context(|| format!("cannot run the power-off command `{command}`"))?;
    let pid = child.id();
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => {
            status.with_context(|| format!("cannot wait for the power-off command `{command}`"))?
        }
        Err(_) => {
            if let Some(pid) = pid {
                let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            let _ = child.kill().await;
            bail!(
                "the power-off command `{command}` did not finish within {} s and was killed; check --poweroff-command",
                timeout.as_secs()
            );
        }
    };
    if !status.success() {
        bail!("the power-off command `{command}` failed ({status}); check --poweroff-command");
    }
    Ok(())
}

/// A copy of the agent's stderr for a child's output, or nothing if it cannot be copied.
fn agent_stderr() -> Stdio {
    std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` still runs (a zombie waiting for its reaper does not).
    fn running(pid: &str) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                !state.starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let command = format!(
            "sleep 1000 >/dev/null 2>&1 & echo $! > {}; wait",
            pid_file.display()
        );
        let started = std::time::Instant::now();
        let err = power_off(&command, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        let message = format!("{err:#}");
        assert!(
            message.contains("did not finish within 1 s and was killed"),
            "{message}"
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if running(pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid.parse().unwrap()), Signal::SIGKILL);
            panic!("the command's background process {pid} survived");
        }
    }

    #[tokio::test]
    async fn success_and_failure_of_the_command() {
        power_off("true", TIMEOUT).await.unwrap();
        let err = power_off("exit 3", TIMEOUT).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("failed (exit status: 3)"),
            "{err:#}"
        );
    }
}
