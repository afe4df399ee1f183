//! runner.json's `registry_mirrors` through the real binary: merged into Docker's daemon.json
//! (the image's settings kept) and written as Podman's registries.conf.d drop-in before the
//! first GitLab call, Docker reloaded before gitlab-runner starts; a failure to apply them
//! fails the run before registering.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};

struct Daemons {
    daemon_json: PathBuf,
    registries_conf: PathBuf,
    reloads: PathBuf,
}

/// /etc/docker and /etc/containers in the test's directory; the image's daemon.json is a link
/// to a read-only file, as NixOS links /etc files into the store.
fn daemons(h: &Harness, image_daemon_json: Option<&str>) -> Daemons {
    std::fs::create_dir_all(h.path("etc/docker")).unwrap();
    std::fs::create_dir_all(h.path("etc/containers")).unwrap();
    let daemon_json = h.path("etc/docker/daemon.json");
    if let Some(text) = image_daemon_json {
        let store = h.path("store-daemon.json");
        std::fs::write(&store, text).unwrap();
        std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o444)).unwrap();
        std::os::unix::fs::symlink(&store, &daemon_json).unwrap();
    }
    Daemons {
        daemon_json,
        registries_conf: h.path("etc/containers/registries.conf.d/60-gitlab-runner-vm.conf"),
        reloads: h.path("reloads"),
    }
}

/// A fake gitlab-runner that records whether Docker had been reloaded when it started.
fn write_runner(h: &Harness, d: &Daemons) -> PathBuf {
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> {dir}/runner-invocations\n\
         if [ -e {reloads} ]; then echo reloaded-before-start > {dir}/runner-saw; fi\nexit 0\n",
        dir = h.dir.path().display(),
        reloads = d.reloads.display()
    );
    h.write_script("gitlab-runner", &script)
}

fn args<'a>(d: &'a Daemons, reload: &'a str) -> Vec<String> {
    vec![
        "--docker-daemon-config".into(),
        d.daemon_json.display().to_string(),
        "--docker-reload-command".into(),
        reload.into(),
        "--registries-conf".into(),
        d.registries_conf.display().to_string(),
    ]
}

async fn run(h: &mut Harness, d: &Daemons, config: Value, reload: &str) -> bool {
    h.mount_glrt_happy_path().await;
    let mut config = config;
    config["token"] = Value::from(TOKEN);
    h.write_config(config);
    let runner = write_runner(h, d);
    let args = args(d, reload);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.start(&runner, &args);
    h.wait_exit().await.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrors_are_merged_into_the_images_daemon_json_and_podmans_drop_in_before_the_runner() {
    let mut h = Harness::new().await;
    let d = daemons(
        &h,
        Some(
            r#"{"data-root": "/var/lib/scratch/docker", "registry-mirrors": ["https://image-mirror.example.com"]}"#,
        ),
    );
    let reload = format!("echo reload >> {}", d.reloads.display());
    let ok = run(
        &mut h,
        &d,
        json!({"registry_mirrors": ["https://mirror.gcr.io", "http://registry-cache.ci.svc:5000"]}),
        &reload,
    )
    .await;
    assert!(ok, "{}", h.log());
    // The link is replaced by a file of its own; the image's file is untouched.
    assert!(!d.daemon_json.is_symlink());
    let daemon: Value =
        serde_json::from_str(&std::fs::read_to_string(&d.daemon_json).unwrap()).unwrap();
    assert_eq!(
        daemon,
        json!({"data-root": "/var/lib/scratch/docker", "registry-mirrors": [
            "https://mirror.gcr.io", "http://registry-cache.ci.svc:5000",
            "https://image-mirror.example.com"]})
    );
    let mode = std::fs::metadata(&d.daemon_json)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o644);
    let podman: toml::Table = std::fs::read_to_string(&d.registries_conf)
        .unwrap()
        .parse()
        .unwrap();
    let registry = &podman["registry"][0];
    assert_eq!(registry["prefix"].as_str(), Some("docker.io"));
    let locations: Vec<(&str, bool)> = registry["mirror"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let insecure = m.get("insecure").and_then(|i| i.as_bool()).unwrap_or(false);
            (m["location"].as_str().unwrap(), insecure)
        })
        .collect();
    assert_eq!(
        locations,
        [
            ("mirror.gcr.io", false),
            ("registry-cache.ci.svc:5000", true),
            ("image-mirror.example.com", false)
        ]
    );
    // Docker reloaded once, before gitlab-runner started.
    assert_eq!(h.read("reloads").unwrap(), "reload\n");
    assert_eq!(
        h.read("runner-saw").as_deref(),
        Some("reloaded-before-start\n")
    );
    assert!(
        h.log().contains("names the registry mirrors"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_mirrors_nothing_is_written_nor_reloaded() {
    let mut h = Harness::new().await;
    let d = daemons(&h, Some("{}"));
    let reload = format!("echo reload >> {}", d.reloads.display());
    assert!(run(&mut h, &d, json!({}), &reload).await, "{}", h.log());
    assert!(d.daemon_json.is_symlink());
    assert!(!d.registries_conf.exists());
    assert!(!d.reloads.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_to_apply_fails_the_run_before_registering() {
    // A reload that fails, and a daemon.json that is not a JSON object (left as it is).
    for (image, reload, expected) in [
        (Some("{}"), "exit 3".to_string(), "`exit 3` failed"),
        (
            Some("[\"not an object\"]"),
            "true".to_string(),
            "is not a JSON object",
        ),
    ] {
        let mut h = Harness::new().await;
        let d = daemons(&h, image);
        let ok = run(
            &mut h,
            &d,
            json!({"registry_mirrors": ["https://mirror.gcr.io"]}),
            &reload,
        )
        .await;
        // A failed run still powers the VM off (after --failure-delay) and exits 0.
        assert!(ok, "{}", h.log());
        let last_error = h.status()["last_error"].as_str().unwrap_or("").to_string();
        assert!(last_error.contains(expected), "{last_error}");
        assert!(h.powered_off());
        assert!(h.requests("POST", VERIFY).await.is_empty());
        assert!(h.runner_invocations().is_empty());
        assert!(h.log().contains(expected), "{}", h.log());
        assert!(
            h.console().contains("cannot write the fleet's settings"),
            "{}",
            h.console()
        );
    }
}

// ---- a reload that hangs: an interrupt ends the wait at once, the timeout fails the run ----

/// A reload command that says it started, then hangs in a child (as `systemctl` waiting for a
/// stuck dockerd would), whose pid it records so the test can see it was killed.
fn hung_reload(h: &Harness) -> String {
    let dir = h.dir.path().display();
    format!(
        "echo started > {dir}/reload-started; sleep 600 & echo $! > {dir}/reload-child; wait; echo finished > {dir}/reload-finished"
    )
}

/// Starts the agent with mirrors to apply and a reload that hangs, and waits until it hangs.
/// `timeout` is `--daemon-reload-timeout`; "300" (with as long a failure delay): only an
/// interrupt can end the wait in time.
async fn start_hung(h: &mut Harness, timeout: &str, extra: &[&str]) {
    let failure_delay = if timeout == "300" { "300" } else { "1" };
    let d = daemons(h, Some("{}"));
    h.prepare_glrt(json!({"registry_mirrors": ["https://mirror.gcr.io"]}))
        .await;
    let runner = write_runner(h, &d);
    let reload = hung_reload(h);
    let mut args = args(&d, &reload);
    args.extend(
        [
            "--daemon-reload-timeout",
            timeout,
            "--failure-delay",
            failure_delay,
        ]
        .iter()
        .chain(extra)
        .map(|a| a.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    h.start(&runner, &args);
    h.wait_until("the reload to hang", |h| h.read("reload-child").is_some())
        .await;
}

/// Nothing of the reload is left, GitLab was never called, gitlab-runner never started.
async fn assert_nothing_after_the_reload(h: &Harness) {
    let child: i32 = h.read("reload-child").unwrap().trim().parse().unwrap();
    h.wait_until("the reload's child to be killed", |_| {
        // Gone, or a zombie waiting for init (killed, not yet reaped).
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
    })
    .await;
    assert!(h.read("reload-finished").is_none());
    assert!(h.requests("POST", VERIFY).await.is_empty(), "{}", h.log());
    assert!(h.runner_invocations().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_hung_reload_ends_it_at_once_without_registering() {
    let mut h = Harness::new().await;
    start_hung(&mut h, "300", &[]).await;
    send_signal(h.agent_pid(), 15);
    // Within PATIENCE, far less than the reload's 300 s timeout.
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_nothing_after_the_reload(&h).await;
    // As during the wait for runner.json: the VM is being shut down from outside, no power-off.
    assert!(!h.powered_off());
    assert_eq!(h.phases(), ["waiting-for-config", "stopping"]);
    assert!(h.status()["last_error"].is_null(), "{}", h.status());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_during_a_hung_reload_powers_off_without_registering_or_failing() {
    let mut h = Harness::new().await;
    start_hung(&mut h, "300", &[]).await;
    h.drain();
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_nothing_after_the_reload(&h).await;
    assert!(h.powered_off());
    assert_eq!(h.phases(), ["waiting-for-config", "powering-off"]);
    // A drain is no failure: no --failure-delay (300 s here) before the power-off.
    assert!(h.status()["last_error"].is_null(), "{}", h.status());
    assert!(
        h.log()
            .contains("drain requested (SIGUSR1) while the daemons were being reloaded"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preemption_notice_during_a_hung_reload_powers_off_without_registering() {
    use wiremock::matchers::{method, path, query_param_is_missing};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    const PREEMPTED: &str = "/computeMetadata/v1/instance/preempted";
    const MAINTENANCE: &str = "/computeMetadata/v1/instance/maintenance-event";
    let google = || ResponseTemplate::new(200).insert_header("Metadata-Flavor", "Google");
    let meta = MockServer::start().await;
    // Quiet GCE: the current values, then long polls that run out.
    for (p, value) in [(PREEMPTED, "FALSE"), (MAINTENANCE, "NONE")] {
        Mock::given(method("GET"))
            .and(path(p))
            .and(query_param_is_missing("wait_for_change"))
            .respond_with(google().insert_header("ETag", "e1").set_body_string(value))
            .mount(&meta)
            .await;
        mount(
            &meta,
            "GET",
            p,
            google()
                .insert_header("ETag", "e1")
                .set_body_string(value)
                .set_delay(std::time::Duration::from_secs(2)),
        )
        .await;
    }
    let mut h = Harness::new().await;
    // runner.json is already there (a config disk): the user-data is not fetched.
    let url = meta.uri();
    start_hung(
        &mut h,
        "300",
        &["--config-source", "gce", "--metadata-url", &url],
    )
    .await;
    Mock::given(method("GET"))
        .and(path(PREEMPTED))
        .respond_with(google().insert_header("ETag", "e2").set_body_string("TRUE"))
        .with_priority(1)
        .mount(&meta)
        .await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_nothing_after_the_reload(&h).await;
    assert!(h.powered_off());
    assert_eq!(h.phases(), ["waiting-for-config", "powering-off"]);
    let st = h.status();
    assert_eq!(st["preemption"]["kind"], "preemption", "{st}");
    assert!(st["last_error"].is_null(), "a notice is no failure: {st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_that_hangs_past_its_timeout_is_killed_and_fails_the_run_before_any_job() {
    let mut h = Harness::new().await;
    start_hung(&mut h, "1", &[]).await;
    assert!(h.wait_exit().await.success(), "{}", h.log());
    assert_nothing_after_the_reload(&h).await;
    assert!(h.powered_off());
    let expected = "did not finish within 1 s and was killed (--daemon-reload-timeout)";
    let last_error = h.status()["last_error"].as_str().unwrap_or("").to_string();
    assert!(last_error.contains(expected), "{last_error}");
    assert!(
        last_error.contains("cannot write the fleet's settings for the VM's daemons"),
        "{last_error}"
    );
    // The console's line is shortened; the journal has the whole error.
    assert!(
        h.console()
            .contains("failed: cannot write the fleet's settings for the VM's daemons"),
        "{}",
        h.console()
    );
    assert!(h.log().contains(expected), "{}", h.log());
    assert_eq!(h.phases(), ["waiting-for-config", "failed", "powering-off"]);
}
