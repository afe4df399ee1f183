//! A helper command the agent waits for, within a deadline (a daemon's reload, the metadata
//! firewall's script). It runs in a process group of its own, killed whole when the deadline
//! passes or when the caller stops waiting (the future dropped: a SIGTERM, a drain or a notice
//! during a hung command), so that nothing of it outlives the wait. Its output goes to the
//! agent's stderr (the journal).

use std::process::Stdio;
use std::time::Duration;

/// Runs `command`, shown as `shown` in errors; `deadline_flag` names the flag that set
/// `timeout`, for the error that says it passed.
pub async fn run(
    mut command: tokio::process::Command,
    shown: &str,
    timeout: Duration,
    deadline_flag: &str,
) -> Result<(), String> {
    let child = command
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    let mut group = ProcessGroup(child);
    match tokio::time::timeout(timeout, group.0.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(format!("`{shown}` failed ({status})")),
        Ok(Err(e)) => Err(format!("cannot wait for `{shown}`: {e}")),
        Err(_) => Err(format!(
            "`{shown}` did not finish within {} s and was killed ({deadline_flag})",
            timeout.as_secs()
        )),
    }
}

/// A command's process group, SIGKILLed whole when dropped before its leader was reaped (a
/// zombie leader still holds the group's id, so no other group can be hit; tokio reaps it).
struct ProcessGroup(tokio::process::Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // None once `wait` returned: the leader was reaped and the id may be reused.
        if let Some(pid) = self.0.id() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}
