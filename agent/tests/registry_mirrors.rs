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
    let path = h.path("gitlab-runner");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
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
        assert!(
            h.requests("POST", "/api/v4/runners/verify")
                .await
                .is_empty()
        );
        assert!(h.runner_invocations().is_empty());
        assert!(h.log().contains(expected), "{}", h.log());
        assert!(
            h.console().contains("cannot write the fleet's settings"),
            "{}",
            h.console()
        );
    }
}
