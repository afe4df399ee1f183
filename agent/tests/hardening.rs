//! Hostile input and misbehaving children, through the real binary: gitlab-runner output that is
//! not text, proxy settings, a power-off command that lingers or hangs, files that are not
//! regular files.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use serde_json::json;

/// A fake gitlab-runner made of `body` (sh), which gets run-single's arguments ($3 is config.toml).
fn write_script_runner(h: &Harness, body: &str) -> PathBuf {
    let path = h.path("gitlab-runner");
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn phases(h: &Harness) -> Vec<String> {
    h.status()["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["phase"].as_str().unwrap().to_owned())
        .collect()
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
    h.mount_glrt_happy_path().await;
    h.write_config(json!({"token": TOKEN}));
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
    assert!(!phases(&h).contains(&"failed".to_string()), "{}", h.log());
    assert!(h.status()["last_error"].is_null(), "{}", h.log());

    let log = h.log();
    assert!(
        log.contains("fake gitlab-runner: bad bytes \u{FFFD}\u{FFFD} here"),
        "{log}"
    );
    assert!(log.contains("fake gitlab-runner: nul \0 byte"), "{log}");
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
    h.mount_glrt_happy_path().await;
    h.write_config(json!({"token": TOKEN}));
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
