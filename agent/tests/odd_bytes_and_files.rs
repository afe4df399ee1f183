//! Hostile input and misbehaving children, through the real binary: gitlab-runner output that is
//! not text, proxy settings, a power-off command that lingers or hangs, files that are not
//! regular files.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::json;

/// A fake gitlab-runner made of `body` (sh), which gets run-single's arguments ($3 is config.toml).
fn write_script_runner(h: &Harness, body: &str) -> PathBuf {
    h.write_script("gitlab-runner", &format!("#!/bin/sh\n{body}"))
}

/// The longest run of `c` in each line of `text` that has one of at least `min` characters.
fn runs_of(text: &str, c: char, min: usize) -> Vec<usize> {
    text.lines()
        .filter_map(|l| l.split(|x| x != c).map(str::len).max())
        .filter(|n| *n >= min)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn gitlab_runner_output_that_is_not_text_is_forwarded_and_the_run_succeeds() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    // Invalid UTF-8, then (once the agent had time to stop reading, as it used to) a NUL, a
    // 200 000-byte line without a newline, the token, and output on both streams.
    let runner = write_script_runner(
        &h,
        r#"echo "fake gitlab-runner: before"
printf 'fake gitlab-runner: bad bytes \377\376 here\n'
sleep 1
printf 'fake gitlab-runner: nul \000 byte\r\n'
head -c 200000 /dev/zero | tr '\0' a
echo
echo "fake gitlab-runner: using $(grep '^token' "$3")"
echo "fake gitlab-runner: stderr after" >&2
echo "fake gitlab-runner: job done"
exit 0
"#,
    );
    h.start(&runner, &[]);
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    assert!(h.powered_off(), "{}", h.log());
    assert!(!h.went_through("failed"), "{}", h.log());
    assert!(h.status()["last_error"].is_null(), "{}", h.log());

    let log = h.log();
    assert!(
        log.contains("fake gitlab-runner: bad bytes \u{FFFD}\u{FFFD} here"),
        "{log}"
    );
    // On stderr (not the journal) a control character is shown as a space (logging::Inert).
    assert!(log.contains("fake gitlab-runner: nul   byte"), "{log}");
    assert!(!log.contains("byte\r"), "a trailing CR is dropped:\n{log}");
    assert!(log.contains("fake gitlab-runner: stderr after"), "{log}");
    assert!(log.contains("fake gitlab-runner: job done"), "{log}");
    assert!(
        log.contains("fake gitlab-runner: using token = \"glrt-…6789\""),
        "{log}"
    );
    assert!(!log.contains(&TOKEN[5..]), "token leaked");
    // The long line arrives whole, in several records.
    let runs = runs_of(&log, 'a', 100);
    assert!(runs.len() > 1, "not split: {runs:?}");
    assert_eq!(runs.iter().sum::<usize>(), 200_000, "{runs:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_settings_reach_gitlab_runner() {
    let mut h = Harness::new().await;
    h.prepare_glrt(json!({})).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    // The fake GitLab on loopback stays direct through NO_PROXY, for the agent too.
    let proxies = [
        ("HTTP_PROXY", "http://proxy.invalid:3128"),
        ("HTTPS_PROXY", "http://proxy.invalid:3129"),
        ("ALL_PROXY", "http://proxy.invalid:3130"),
        ("NO_PROXY", "127.0.0.1,localhost,.internal"),
        ("http_proxy", "http://lower.invalid:3128"),
        ("https_proxy", "http://lower.invalid:3129"),
        ("all_proxy", "http://lower.invalid:3130"),
        ("no_proxy", "127.0.0.1,localhost"),
    ];
    let mut cmd = h.command(&runner, &[]);
    cmd.envs(proxies);
    cmd.env("FTP_PROXY", "http://not.passed.invalid");
    h.agent = Some(cmd.spawn().unwrap());
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    assert!(h.powered_off(), "{}", h.log());

    let env = h.read("runner-env").unwrap();
    let env: Vec<&str> = env.lines().collect();
    for (key, value) in proxies {
        let line = format!("{key}={value}");
        assert!(env.contains(&line.as_str()), "{line} missing: {env:?}");
    }
    assert!(!env.iter().any(|l| l.starts_with("FTP_PROXY=")), "{env:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_power_off_command_that_leaves_a_process_behind_does_not_hold_the_agent() {
    let mut h = Harness::new().await;
    let pid_file = h.path("lingering.pid");
    let command = format!(
        "sleep 30 & echo $! > {}; echo poweroff >> {}",
        pid_file.display(),
        h.path("poweroff").display()
    );
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--poweroff-command", &command],
    )
    .await;
    let status = h.wait_exit().await;
    let took = h.started.elapsed();
    if let Some(pid) = h.read("lingering.pid") {
        send_signal(pid.trim().parse().unwrap(), 9);
    }
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    assert!(h.powered_off(), "{}", h.log());
    // The background sleep keeps the command's stdout and stderr open for 30 s.
    assert!(
        took < std::time::Duration::from_secs(15),
        "the agent waited for the command's background process: {took:?}\n{}",
        h.log()
    );
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// The output of `cmd`, which must exit within PATIENCE (it is killed otherwise).
fn output_bounded(mut cmd: std::process::Command) -> std::process::Output {
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{cmd:?} did not return within {PATIENCE:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `gitlab-runner-vm check --config <config>` under a 1 GiB address-space limit (an unbounded
/// read of /dev/zero must not take the machine's memory). Returns (success, stdout + stderr).
fn check_bounded(config: &Path) -> (bool, String) {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(r#"ulimit -v 1048576; exec "$0" check --config "$1""#)
        .arg(BIN)
        .arg(config);
    let out = output_bounded(cmd);
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn write_runner_json(dir: &Path, token_file: &Path) -> PathBuf {
    let path = dir.join("runner.json");
    let config = json!({"url": "https://gitlab.example.com", "token_file": token_file});
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

#[test]
fn check_refuses_a_fifo_or_a_device_as_token_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("token.fifo");
    mkfifo(&fifo);
    let (ok, out) = check_bounded(&write_runner_json(dir.path(), &fifo));
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "error: $.token_file: cannot read {}: is a FIFO, not a regular file",
            fifo.display()
        )),
        "{out}"
    );

    let (ok, out) = check_bounded(&write_runner_json(dir.path(), Path::new("/dev/zero")));
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot read /dev/zero: is a character device, not a regular file"),
        "{out}"
    );

    // A regular file, but a huge one.
    let big = dir.path().join("big-token");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 * 1024 * 1024)
        .unwrap();
    let (ok, out) = check_bounded(&write_runner_json(dir.path(), &big));
    assert!(!ok, "{out}");
    assert!(out.contains("is larger than 1024 KiB"), "{out}");
}

#[test]
fn check_refuses_a_runner_json_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("runner.json");
    mkfifo(&fifo);
    let (ok, out) = check_bounded(&fifo);
    assert!(!ok, "{out}");
    assert!(out.contains("is a FIFO, not a regular file"), "{out}");
    let (ok, out) = check_bounded(Path::new("/dev/zero"));
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot read /dev/zero: is a character device, not a regular file"),
        "{out}"
    );
    let binary = dir.path().join("binary.json");
    std::fs::write(&binary, b"{\"url\": \"\xff\"}").unwrap();
    let (ok, out) = check_bounded(&binary);
    assert!(!ok, "{out}");
    assert!(out.contains("is not UTF-8 text"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_with_a_fifo_as_token_file_fails_clearly_and_still_obeys_sigterm() {
    let mut h = Harness::new().await;
    let fifo = h.path("token.fifo");
    mkfifo(&fifo);
    h.write_config(json!({"token_file": fifo}));
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--failure-delay", "600"]);
    h.wait_until("the failure", |h| h.in_phase("powering-off"))
        .await;
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("is a FIFO, not a regular file"), "{error}");
    send_signal(h.agent_pid(), 15);
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    assert!(!h.powered_off());
    assert!(h.server.received_requests().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_with_a_fifo_as_runner_json_fails_at_once_instead_of_waiting() {
    let mut h = Harness::new().await;
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    mkfifo(&h.config_path());
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--config-wait", "3600"]);
    let status = h.wait_exit().await;
    assert!(status.success(), "exit {status:?}\n{}", h.log());
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("is a FIFO, not a regular file"), "{error}");
    assert!(h.powered_off());
}

#[test]
fn status_refuses_a_status_json_that_is_not_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("status.json"));
    for json in [false, true] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["status", "--state-dir"]).arg(dir.path());
        if json {
            cmd.arg("--json");
        }
        let out = output_bounded(cmd);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    }
}
