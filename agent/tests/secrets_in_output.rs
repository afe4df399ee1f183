//! A token pasted into a field where none belongs (name, url, runner_type) is masked in every
//! output: `check`, status.json, `status`.

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

/// Obviously fake, but token-shaped: a personal access token and a runner token.
const PAT: &str = "glpat-fAkE.pAsTeD.iNtO.tHe.NaMe.0000";
const STRAY_RUNNER_TOKEN: &str = "glrt-fAkE.pAsTeD.iNtO.tHe.UrL.0000";

#[tokio::test(flavor = "multi_thread")]
async fn tokens_in_other_fields_are_masked_by_check_status_json_and_status() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let url = format!("{}/{STRAY_RUNNER_TOKEN}", h.server.uri());
    let config =
        json!({"name": format!("vm {PAT}"), "url": url, "token": TOKEN, "runner_type": PAT});
    std::fs::create_dir_all(h.config_path().parent().unwrap()).unwrap();
    std::fs::write(h.config_path(), config.to_string()).unwrap();

    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(h.config_path())
        .output()
        .unwrap();
    let shown =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(shown.contains("$.runner_type"), "{shown}");
    for secret in [&PAT[6..], &STRAY_RUNNER_TOKEN[5..]] {
        assert!(!shown.contains(secret), "check printed a token:\n{shown}");
    }

    // Without the stray runner_type the file is valid: run it and read what it wrote.
    let config = json!({"name": format!("vm {PAT}"), "url": url, "token": TOKEN});
    std::fs::write(h.config_path(), config.to_string()).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    h.wait_exit().await;
    let status_text = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(h.state_dir())
        .output()
        .unwrap();
    let all = h.all_output() + &String::from_utf8_lossy(&status_text.stdout);
    assert!(all.contains("glpat-"), "{all}");
    for secret in [&PAT[6..], &STRAY_RUNNER_TOKEN[5..], &TOKEN[5..]] {
        assert!(!all.contains(secret), "a token reached an output:\n{all}");
    }
}
