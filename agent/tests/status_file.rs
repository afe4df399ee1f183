//! status.json as a restarted agent finds it, through the real binary: a file of this boot that
//! cannot be read or parsed never leads to a second registration or a second gitlab-runner
//! (fail closed), a file of an earlier boot does not stop a fresh start, and the file stays
//! bounded however often systemd restarts the agent. Also `--config` as a link to nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::{Value, json};

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_owned()
}

fn status_path(h: &Harness) -> PathBuf {
    h.state_dir().join("status.json")
}

/// A whole run of this boot: registered, one job, deregistered, powered off.
async fn first_run(h: &mut Harness) -> PathBuf {
    let runner = h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert_eq!(h.status()["boot_id"], boot_id().as_str());
    runner
}

/// The agent restarted in the same boot over a status.json that `damage` made unreadable: it
/// registers nothing, starts no gitlab-runner, deletes the manager config.toml names, powers
/// off, and says why in the journal and on the console.
async fn restart_over(damage: impl FnOnce(&Path)) -> Harness {
    let mut h = Harness::new().await;
    let runner = first_run(&mut h).await;
    let system_id = h.system_id_file();
    damage(&status_path(&h));
    h.start(&runner, &[]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let log = h.log();
    assert_eq!(h.count("POST", VERIFY).await, 1, "registered again:\n{log}");
    assert_eq!(
        h.runner_invocations().len(),
        1,
        "a second gitlab-runner:\n{log}"
    );
    let deleted = h.requests("DELETE", MANAGERS).await;
    assert_eq!(deleted.len(), 2, "{log}");
    assert_eq!(
        body(&deleted[1]),
        json!({"token": TOKEN, "system_id": system_id})
    );
    assert_eq!(h.read("poweroff").unwrap().lines().count(), 2, "{log}");
    for (what, text) in [("journal", &log), ("console", &h.console())] {
        assert!(
            text.contains("cannot be read") && text.contains("registers nothing"),
            "the {what} says why:\n{text}"
        );
    }
    assert!(!h.all_output().contains(TOKEN), "a token in the output");
    h
}

/// A status.json of the first run, edited.
fn edit(path: &Path, change: impl FnOnce(&mut Value)) {
    let mut status: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    change(&mut status);
    std::fs::write(path, serde_json::to_string_pretty(&status).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_json_of_this_boot_over_the_read_cap_fails_closed() {
    let h = restart_over(|path| {
        // What an unbounded timeline reached after some 6,000 restarts.
        edit(path, |s| {
            let entry = s["timeline"][0].clone();
            s["timeline"] = Value::Array(vec![entry; 20_000]);
        });
        assert!(std::fs::metadata(path).unwrap().len() > 1024 * 1024);
    })
    .await;
    // The file written since is this run's, and small again.
    assert_eq!(h.status()["phase"], "powering-off");
    assert!(std::fs::metadata(status_path(&h)).unwrap().len() < 16 * 1024);
    assert!(
        h.last_error().contains("is larger than 1024 KiB"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_truncated_status_json_of_this_boot_fails_closed() {
    restart_over(|path| {
        let text = std::fs::read(path).unwrap();
        std::fs::write(path, &text[..text.len() / 3]).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_json_that_is_not_json_fails_closed_when_written_in_this_boot() {
    // No boot id to read in it: changed after this boot began is what makes it this boot's.
    restart_over(|path| std::fs::write(path, "\0\0\0 not JSON at all").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_json_that_is_not_utf8_fails_closed() {
    restart_over(|path| {
        let text = std::fs::read_to_string(path).unwrap();
        let mut bytes = text.replace("\"vm-test\"", "\"vm-\u{1}test\"").into_bytes();
        let at = bytes.iter().position(|&b| b == 1).unwrap();
        bytes[at] = 0xff;
        std::fs::write(path, bytes).unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_at_status_json_fails_closed() {
    let h = restart_over(|path| {
        std::fs::remove_file(path).unwrap();
        std::fs::create_dir(path).unwrap();
    })
    .await;
    assert!(h.log().contains("is a directory"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_json_that_cannot_be_opened_fails_closed() {
    // A link to itself: ELOOP, even for root (the tests may run as root, which chmod does not
    // stop).
    restart_over(|path| {
        std::fs::remove_file(path).unwrap();
        std::os::unix::fs::symlink("status.json", path).unwrap();
    })
    .await;
    if !nix::unistd::Uid::effective().is_root() {
        use std::os::unix::fs::PermissionsExt;
        restart_over(|path| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o000)).unwrap()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_status_json_of_an_earlier_boot_does_not_stop_a_fresh_start() {
    let mut h = Harness::new().await;
    let path = status_path(&h);
    std::fs::write(
        &path,
        "{\n  \"boot_id\": \"11111111-2222-3333-4444-555555555555\",\n  \"pha",
    )
    .unwrap();
    let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(long_ago)
        .unwrap();
    h.start_glrt(json!({}), FakeRunner::default(), &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.log().contains("from an earlier boot"), "{}", h.log());
    assert_eq!(h.status()["boot_id"], boot_id().as_str());
    assert!(h.status()["last_error"].is_null(), "{}", h.log());
}

fn timeline_len(h: &Harness) -> usize {
    h.status()["timeline"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_over_a_failing_power_off_keep_status_json_bounded() {
    let mut h = Harness::new().await;
    let failing = ["--poweroff-command", "false"];
    let runner = h
        .start_glrt(json!({}), FakeRunner::default(), &failing)
        .await;
    assert!(!h.wait_exit().await.success(), "{}", h.log());
    // A few real restarts, as systemd makes them.
    for _ in 0..3 {
        h.start(&runner, &failing);
        assert!(!h.wait_exit().await.success(), "{}", h.log());
    }
    let first = h.status();
    let runs: Vec<Value> = first["timeline"].as_array().unwrap().clone();
    // A restart's own entries: the last run's, from its waiting-for-config on.
    let restart_at = runs
        .iter()
        .rposition(|e| e["phase"] == "waiting-for-config")
        .unwrap();
    let one_restart = runs[restart_at..].to_vec();
    assert!(!one_restart.is_empty());
    // Then a thousand restarts' worth, as an agent without a bound left it: the first run and
    // a thousand restarts, every entry kept.
    let first_run_end = runs
        .iter()
        .skip(1)
        .position(|e| e["phase"] == "waiting-for-config")
        .unwrap()
        + 1;
    let mut grown: Vec<Value> = runs[..first_run_end].to_vec();
    for _ in 0..1000 {
        grown.extend(one_restart.iter().cloned());
    }
    let grown_len = grown.len();
    edit(&status_path(&h), |s| {
        s["timeline"] = Value::Array(grown);
        s.as_object_mut().unwrap().remove("timeline_dropped");
    });
    let mut sizes = Vec::new();
    for _ in 0..5 {
        h.start(&runner, &failing);
        assert!(!h.wait_exit().await.success(), "{}", h.log());
        sizes.push(std::fs::metadata(status_path(&h)).unwrap().len());
    }
    let st = h.status();
    let kept = timeline_len(&h);
    assert!(kept <= 40, "{kept} entries kept");
    let dropped = st["timeline_dropped"].as_u64().unwrap();
    assert_eq!(
        kept as u64 + dropped,
        (grown_len + 5 * one_restart.len()) as u64
    );
    // Every further restart writes a file of the same size (but for a pid or a count with
    // one more digit), and a small one.
    let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(max - min <= 16, "{sizes:?}");
    assert!(sizes[0] < 8 * 1024, "{sizes:?}");
    // The first run stays at the top, the latest at the bottom.
    assert_eq!(st["timeline"][0], runs[0]);
    assert!(st["timeline"].as_array().unwrap().contains(&json!(runs[1])));
    assert_eq!(st["phase"], "powering-off");
    // Never a second registration nor a second gitlab-runner.
    assert_eq!(h.count("POST", VERIFY).await, 1);
    assert_eq!(h.runner_invocations().len(), 1);
    // `status` says what was dropped.
    let out = std::process::Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(h.state_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "... {dropped} entries dropped (restarts of this boot"
        )),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_to_nothing_at_config_is_said_and_waited_for() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let target = h.path("disk/runner.json");
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, h.config_path()).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &["--config-wait", "2"]);
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains(&format!(
            "{} is a symbolic link to {}, which does not exist",
            h.config_path().display(),
            target.display()
        )),
        "{error}"
    );
    assert!(
        error.contains(&format!("create {}", target.display())),
        "{error}"
    );
    assert!(
        !error.contains("did not appear within 2 s; fix: attach"),
        "{error}"
    );

    // The link's target appearing later (a disk mounted elsewhere) ends the wait.
    let mut h2 = Harness::new().await;
    h2.mount_glrt_happy_path().await;
    let target = h2.path("disk/runner.json");
    std::fs::create_dir_all(h2.config_path().parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, h2.config_path()).unwrap();
    let runner = h2.write_fake_runner(FakeRunner::default());
    h2.start(&runner, &["--config-wait", "20"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::create_dir_all(target.parent().unwrap()).unwrap();
    let config = json!({"name": "vm-test", "url": h2.server.uri(), "token": TOKEN});
    std::fs::write(&target, config.to_string()).unwrap();
    assert!(h2.wait_exit().await.success(), "{}", h2.log());
    assert_eq!(h2.runner_invocations().len(), 1, "{}", h2.log());
    assert!(
        h2.started.elapsed() < Duration::from_secs(15),
        "the target's appearance was missed:\n{}",
        h2.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_link_to_nothing_at_config_is_not_taken_for_runner_json_on_a_cloud() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let mut h = Harness::new().await;
    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/computeMetadata/v1/instance/attributes/user-data"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("metadata-flavor", "Google")
                .set_body_string("{}"),
        )
        .mount(&metadata)
        .await;
    let target = h.path("elsewhere/runner.json");
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&target, h.config_path()).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = metadata.uri();
    h.start(
        &runner,
        &[
            "--config-source",
            "gce",
            "--metadata-url",
            &url,
            "--config-wait",
            "2",
        ],
    );
    assert!(h.wait_exit().await.success(), "{}", h.log());
    let log = h.log();
    assert!(!log.contains("already exists"), "{log}");
    assert!(
        log.contains(&format!(
            "is a symbolic link to {}, which does not exist: the gce user-data is not fetched",
            target.display()
        )),
        "{log}"
    );
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(
        error.contains("or remove the link: the gce user-data is then fetched"),
        "{error}"
    );
    // The link is left as it was.
    assert!(h.config_path().is_symlink());
}

#[test]
fn check_says_what_a_link_to_nothing_is() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("runner.json");
    let target = dir.path().join("disk/runner.json");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config"])
        .arg(&link)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{} is a symbolic link to {}, which does not exist: create {}",
            link.display(),
            target.display(),
            target.display()
        )),
        "{err}"
    );
}
