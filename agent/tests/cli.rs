//! The small commands (`check`, `status`, `release`, `drain`) and the systemd notifications,
//! through the real binary.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

fn check(config: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runner.json");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn check_accepts_a_glrt_config_and_warns_that_its_tags_are_ignored() {
    let (ok, out) = check(
        r#"{"name": "nixos-runner-001", "url": "https://gitlab.example.com", "token": "glrt-xxxxxxxxxxxxxxxxxxxxx", "tags": ["nixos", "docker", "nix"], "executor": "shell"}"#,
    );
    assert!(ok, "{out}");
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0]
            .starts_with("warning: $.tags: is ignored with a glrt- runner authentication token"),
        "{out}"
    );
    assert!(lines[1].starts_with("ok: "), "{out}");
}

#[test]
fn check_prints_one_line_per_problem_with_path_and_fix_and_exits_1() {
    let (ok, out) = check(
        r#"{"url": "gitlab.example.com", "token": "glrt-abc", "registration_token": "GR1348941x", "exector": "shell"}"#,
    );
    assert!(!ok);
    let lines: Vec<_> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        out.contains("error: $.exector: unknown key; fix: did you mean \"executor\"?"),
        "{out}"
    );
    assert!(out.contains("error: $.url: \"gitlab.example.com\" has no http:// or https:// scheme; fix: write it as \"https://gitlab.example.com\""), "{out}");
    assert!(
        out.contains("error: $: 2 credentials are given (token, registration_token)"),
        "{out}"
    );
}

#[test]
fn check_of_a_missing_file_fails_clearly() {
    let out = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/runner.json"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read /nonexistent/runner.json"));
}

#[test]
fn status_without_an_agent_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is gitlab-runner-vm running?"));
}

/// The state directory is root's (config.toml holds the token): anyone else is told to use
/// sudo, not that the agent is not running.
#[test]
fn status_as_another_user_says_to_use_sudo() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") else {
        return;
    };
    if !nix::unistd::Uid::current().is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("status.json"), "{}").unwrap();
    // As the unit makes it (RuntimeDirectoryMode=0700).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let out = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(dir.path())
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sudo gitlab-runner-vm status"), "{stderr}");
}

#[test]
fn release_without_a_hold_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["release", "--keep-file"])
        .arg(dir.path().join("keep-runner"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("no hold"));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_the_phase_for_a_person() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    std::fs::write(h.keep_file(), "").unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    h.wait_until("the hold", |h| {
        h.in_phase("holding") && h.status()["hold_deadline"].is_string()
    })
    .await;
    let out = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(h.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("phase:          holding"), "{text}");
    assert!(text.contains("runner:         vm-test"), "{text}");
    assert!(text.contains("registration:   deregistered"), "{text}");
    assert!(text.contains("hold until:"), "{text}");
    std::fs::remove_file(h.keep_file()).unwrap();
    assert!(h.wait_exit().await.success());
}

/// Runs the agent to its end with NOTIFY_SOCKET pointing at a socket of ours, and returns the
/// notifications systemd would have received, in order.
async fn notifications_of_a_run(h: &mut Harness, runner: &std::path::Path) -> Vec<String> {
    let socket_path = h.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut cmd = h.command(runner, &[]);
    cmd.env("NOTIFY_SOCKET", &socket_path);
    h.agent = Some(cmd.spawn().unwrap());
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).trim().to_string());
    }
    messages
}

/// The notifications systemd gets with Type=notify: STATUS= per phase, READY=1 once
/// gitlab-runner runs, STOPPING=1 before the power-off.
#[tokio::test(flavor = "multi_thread")]
async fn notifies_systemd_of_readiness_phases_and_stopping() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let messages = notifications_of_a_run(&mut h, &runner).await;
    let position = |prefix: &str| {
        messages
            .iter()
            .position(|m| m.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {messages:#?}"))
    };
    let ready = position("READY=1");
    assert!(position("STATUS=registering") < ready);
    assert!(
        position("STATUS=running") < ready,
        "READY=1 comes once gitlab-runner runs"
    );
    assert!(ready < position("STATUS=deregistering"));
    assert!(position("STATUS=powering-off") < position("STOPPING=1"));
    assert!(
        messages.iter().all(|m| !m.contains(&TOKEN[5..])),
        "{messages:#?}"
    );
}

/// A run that fails before gitlab-runner starts still sends READY=1 before it exits: a
/// Type=notify service that exits without it fails with result "protocol" and is restarted.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_run_still_notifies_ready_before_exiting() {
    let mut h = Harness::new().await;
    common::mount(
        &h.server,
        "POST",
        VERIFY,
        wiremock::ResponseTemplate::new(403),
    )
    .await;
    h.write_config(json!({"token": TOKEN}));
    let runner = h.write_fake_runner(FakeRunner::default());
    let messages = notifications_of_a_run(&mut h, &runner).await;
    let failed = messages
        .iter()
        .position(|m| m.starts_with("STATUS=failed"))
        .expect("STATUS=failed");
    let ready = messages
        .iter()
        .position(|m| m == "READY=1")
        .unwrap_or_else(|| panic!("no READY=1 in {messages:#?}"));
    assert!(failed < ready, "{messages:#?}");
    assert!(messages.iter().any(|m| m == "STOPPING=1"), "{messages:#?}");
}
