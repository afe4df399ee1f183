//! `ssh-keys --authorized-keys-dir`: the directory it creates is 0755 whatever the umask (a
//! hardened unit runs with 077, and sshd reads the keys as the user logging in), and one that
//! exists keeps its mode, with a warning when sshd could not use it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::BIN;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyDataForTests0123456789 op@laptop";

/// A DigitalOcean metadata service with one key.
async fn fake_digitalocean() -> MockServer {
    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata/v1/public-keys"))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{ED}\n")))
        .mount(&metadata)
        .await;
    metadata
}

/// `ssh-keys` under `umask`, set by a shell that then becomes the agent.
fn ssh_keys_under_umask(umask: &str, url: &str, keys_dir: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("umask {umask} && exec \"$@\""))
        .arg("sh")
        .arg(BIN)
        .args(["ssh-keys", "--user", "operator"])
        .args(["--config-source", "digitalocean", "--metadata-url", url])
        .arg("--authorized-keys-dir")
        .arg(keys_dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("GITLAB_RUNNER_VM_") || key == "JOURNAL_STREAM" {
            cmd.env_remove(key);
        }
    }
    cmd.output().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_directory_is_0755_under_any_umask_and_its_missing_parents_too() {
    let metadata = fake_digitalocean().await;
    for (umask, nested) in [("077", "ssh-keys"), ("027", "a/b/keys"), ("0277", "run/k")] {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join(nested);
        let out = ssh_keys_under_umask(umask, &metadata.uri(), &keys_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "umask {umask}: {stderr}");
        // Every directory the command made, up to the temporary one it was given.
        for made in keys_dir.ancestors().take_while(|d| *d != dir.path()) {
            assert_eq!(mode(made), 0o755, "umask {umask}: {}", made.display());
        }
        let file = keys_dir.join("operator");
        assert_eq!(mode(&file), 0o644, "umask {umask}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{ED}\n"));
        assert!(!stderr.contains("warning"), "umask {umask}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_directory_keeps_its_mode_and_a_mode_sshd_cannot_use_is_named() {
    let metadata = fake_digitalocean().await;
    for (existing, warned) in [(0o700, true), (0o711, false), (0o755, false), (0o777, true)] {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("ssh-keys");
        std::fs::create_dir(&keys_dir).unwrap();
        std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(existing)).unwrap();
        let out = ssh_keys_under_umask("077", &metadata.uri(), &keys_dir);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{existing:o}: {stderr}");
        assert_eq!(mode(&keys_dir), existing, "left as it was");
        assert_eq!(mode(&keys_dir.join("operator")), 0o644);
        assert_eq!(
            stderr.contains("warning") && stderr.contains("chmod 0755"),
            warned,
            "{existing:o}: {stderr}"
        );
    }
}
