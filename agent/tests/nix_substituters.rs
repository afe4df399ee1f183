//! runner.json's `nix_substituters` and `nix_trusted_public_keys` through the real binary: the
//! nix.conf fragment written before the first GitLab call and nix-daemon restarted before
//! gitlab-runner starts; hostile values refused; a failure fails the run before registering.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use common::*;
use serde_json::{Value, json};

const KEY: &str = "cache.example.com-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

/// A fake gitlab-runner that records whether nix-daemon had been restarted when it started.
fn write_runner(h: &Harness) -> PathBuf {
    let script = format!(
        "#!/bin/sh\necho \"$*\" >> {dir}/runner-invocations\n\
         if [ -e {dir}/restarts ]; then echo restarted-before-start > {dir}/runner-saw; fi\nexit 0\n",
        dir = h.dir.path().display(),
    );
    h.write_script("gitlab-runner", &script)
}

async fn run(h: &mut Harness, config: Value, restart: &str) {
    std::fs::create_dir_all(h.path("etc/nix")).unwrap();
    h.mount_glrt_happy_path().await;
    let mut config = config;
    config["token"] = Value::from(TOKEN);
    h.write_config(config);
    let runner = write_runner(h);
    let nix_conf = h.path("etc/nix/gitlab-runner-vm.conf");
    let nix_conf = nix_conf.to_str().unwrap();
    // Docker's and Podman's files too, in the test's directory: never the machine's.
    let docker = h.path("etc/docker/daemon.json");
    let podman = h.path("etc/containers/registries.conf.d/x.conf");
    h.start(
        &runner,
        &[
            "--nix-conf",
            nix_conf,
            "--nix-restart-command",
            restart,
            "--docker-daemon-config",
            docker.to_str().unwrap(),
            "--registries-conf",
            podman.to_str().unwrap(),
        ],
    );
    assert!(h.wait_exit().await.success(), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleets_caches_reach_nix_daemon_before_the_runner_starts() {
    let mut h = Harness::new().await;
    let restart = format!("echo restart >> {}", h.path("restarts").display());
    run(
        &mut h,
        json!({"nix_substituters": ["https://cache.example.com", "s3://nix-cache?region=eu-west-1"],
               "nix_trusted_public_keys": [KEY]}),
        &restart,
    )
    .await;
    let text = h.read("etc/nix/gitlab-runner-vm.conf").unwrap();
    let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        settings,
        [
            "extra-substituters = https://cache.example.com s3://nix-cache?region=eu-west-1",
            "extra-trusted-substituters = https://cache.example.com s3://nix-cache?region=eu-west-1",
            &format!("extra-trusted-public-keys = {KEY}"),
        ]
    );
    let mode = std::fs::metadata(h.path("etc/nix/gitlab-runner-vm.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(h.read("restarts").unwrap(), "restart\n");
    assert_eq!(
        h.read("runner-saw").as_deref(),
        Some("restarted-before-start\n")
    );
    // Nothing asked of Docker: nothing written there.
    assert!(!h.path("etc/docker").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_value_that_would_add_a_nix_setting_is_refused_before_registering() {
    for (config, at) in [
        (
            json!({"nix_substituters": ["https://c.example.com\ntrusted-users = runner"]}),
            "$.nix_substituters[0]",
        ),
        (
            json!({"nix_substituters": ["https://c.example.com require-sigs = false"]}),
            "$.nix_substituters[0]",
        ),
        (
            json!({"nix_trusted_public_keys": [format!("{KEY} # comment")]}),
            "$.nix_trusted_public_keys[0]",
        ),
        (
            json!({"nix_trusted_public_keys": ["cache.example.com-1:short="]}),
            "$.nix_trusted_public_keys[0]",
        ),
    ] {
        let mut h = Harness::new().await;
        let restart = format!("echo restart >> {}", h.path("restarts").display());
        run(&mut h, config, &restart).await;
        assert!(h.log().contains(at), "{at}: {}", h.log());
        assert!(h.requests("POST", VERIFY).await.is_empty());
        assert!(h.runner_invocations().is_empty());
        assert!(!h.path("etc/nix/gitlab-runner-vm.conf").exists());
        assert!(!h.path("restarts").exists());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_that_fails_fails_the_run_before_registering() {
    let mut h = Harness::new().await;
    run(
        &mut h,
        json!({"nix_substituters": ["https://cache.example.com"], "nix_trusted_public_keys": [KEY]}),
        "echo nix-daemon failed >&2; exit 1",
    )
    .await;
    let last_error = h.status()["last_error"].as_str().unwrap_or("").to_string();
    assert!(
        last_error.contains("failed (exit status: 1)"),
        "{last_error}"
    );
    assert!(h.requests("POST", VERIFY).await.is_empty());
    assert!(h.runner_invocations().is_empty());
    assert!(h.powered_off());
}
