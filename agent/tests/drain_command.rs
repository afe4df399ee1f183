//! `gitlab-runner-vm drain` signals only a live agent that can still drain: never PID 0, a
//! reused PID or an agent already past its jobs.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{BIN, known_phases};
use serde_json::json;

fn write_status(dir: &Path, phase: &str, pid: u32) {
    let status = json!({
        "phase": phase,
        "since": "2026-11-30T10:00:00.000Z",
        "pid": pid,
        "boot_id": "b1",
        "runner": "vm-1",
        "system_id": "r_abcdefABCDEF",
        "credential": "token",
        "gitlab_url": "https://gitlab.example.com",
        "registered": true,
        "deregistered": false,
        "runner_started": true,
        "timeline": [],
        "last_error": null
    });
    std::fs::write(dir.join("status.json"), status.to_string()).unwrap();
}

fn drain(dir: &Path) -> Output {
    Command::new(BIN)
        .args(["drain", "--state-dir"])
        .arg(dir)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn drain_refuses_pid_zero() {
    let dir = tempfile::tempdir().unwrap();
    write_status(dir.path(), "running", 0);
    let out = drain(dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("pid 0"), "{}", stderr(&out));
}

#[test]
fn drain_refuses_a_pid_that_is_another_program() {
    let dir = tempfile::tempdir().unwrap();
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    write_status(dir.path(), "running", other.id());
    let out = drain(dir.path());
    // Had it been signalled, SIGUSR1 would have killed sleep.
    let still_running = other.try_wait().unwrap().is_none();
    other.kill().unwrap();
    other.wait().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(still_running, "drain signalled another program");
    assert!(
        stderr(&out).contains("is not gitlab-runner-vm"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn drain_refuses_an_agent_that_has_exited() {
    let dir = tempfile::tempdir().unwrap();
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    write_status(dir.path(), "running", pid);
    let out = drain(dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nothing was signalled"),
        "{}",
        stderr(&out)
    );
}

/// The phases in which the agent can still drain: before and while its jobs run.
const DRAINABLE: [&str; 3] = ["waiting-for-config", "registering", "running"];

#[test]
fn drain_refuses_finished_phases_and_accepts_draining() {
    let dir = tempfile::tempdir().unwrap();
    // Every phase the agent has (a new one included) is drainable, draining, or refused.
    for phase in known_phases() {
        write_status(dir.path(), phase, std::process::id());
        let out = drain(dir.path());
        if phase == "draining" {
            assert!(out.status.success(), "{}", stderr(&out));
            assert!(String::from_utf8_lossy(&out.stdout).contains("already draining"));
        } else if DRAINABLE.contains(&phase) {
            // Past the phase check, drain finds that the pid (this test) is no agent.
            assert_eq!(out.status.code(), Some(1), "{phase}");
            assert!(
                stderr(&out).contains("is not gitlab-runner-vm"),
                "{phase}: {}",
                stderr(&out)
            );
        } else {
            assert_eq!(out.status.code(), Some(1), "{phase}");
            assert!(
                stderr(&out).contains("nothing to drain"),
                "{phase}: {}",
                stderr(&out)
            );
        }
    }
}
