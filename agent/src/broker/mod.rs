//! `--config-source broker`: this boot's runner, minted outside the VM by the broker
//! (docs/broker.md). The VM proves which virt-launcher pod it is with the pod's own
//! service-account token, the `token` file of KubeVirt's `serviceAccount` disk, and the broker
//! answers `201 {"url", "token", "token_expires_at", "runner_id"}`: a runner of its own, which
//! the agent runs with as with a `glrt-` token in runner.json and deletes at the end.
//!
//! - `client`: `BrokerClient`, the one POST (no redirects, no proxy, capped body) and its
//!   retries within a deadline;
//! - `error`: `BrokerError`, which failures are retried, the fix each names.
//!
//! The broker's answer is all the configuration: runner.json is written from it (`url` and
//! `token`), and every other key takes its default. Neither the pod's token nor the runner
//! token is ever logged whole.

mod client;
mod error;

use std::path::Path;

use tokio::time::Instant;

pub use client::BrokerClient;
pub use error::BrokerError;

use crate::secret::Secret;

/// The broker's Service in the VM's namespace (examples/kubevirt/broker/broker.yaml), found
/// through the namespace's DNS search domain, which KubeVirt's DHCP hands the guest.
pub const DEFAULT_BROKER_URL: &str = "http://gitlab-runner-vm-broker";
/// Where the runner image mounts KubeVirt's serviceAccount disk (nixos-modules/runner.nix).
pub const DEFAULT_TOKEN_FILE: &str = "/runner-identity/token";
/// A bound service-account token is a JWT of about a kilobyte; the broker takes up to 16 KiB.
const TOKEN_FILE_CAP: u64 = 16 * 1024;

/// What the broker handed this boot.
#[derive(Debug, Clone)]
pub struct Granted {
    pub url: String,
    pub token: Secret,
    pub runner_id: Option<u64>,
}

impl Granted {
    /// runner.json for this runner: its URL and token, every other key at its default.
    pub fn runner_json(&self) -> String {
        let json = serde_json::json!({"url": self.url, "token": self.token.expose()});
        format!("{json:#}\n")
    }
}

/// Reads the pod's token from `path` once the file exists (the identity disk may be mounted
/// after the agent starts), then asks the broker for this boot's runner, both within `deadline`.
pub async fn fetch_runner(
    client: &BrokerClient,
    token_file: &Path,
    deadline: Instant,
    wait_seconds: u64,
) -> Result<Granted, BrokerError> {
    let pod_token = wait_for_pod_token(token_file, deadline, wait_seconds).await?;
    let body = client.fetch(&pod_token, deadline).await?;
    granted(&body).map_err(|detail| BrokerError::NotBroker {
        url: client.url().to_string(),
        detail,
    })
}

async fn wait_for_pod_token(
    path: &Path,
    deadline: Instant,
    wait_seconds: u64,
) -> Result<Secret, BrokerError> {
    let missing = || BrokerError::TokenFileMissing {
        path: path.to_path_buf(),
        seconds: wait_seconds,
    };
    // No inotify watch when the file is there (closing one costs a kernel grace period).
    if std::fs::metadata(path).is_err() {
        tracing::info!(
            "waiting for {} (the pod's service-account token on KubeVirt's serviceAccount disk)",
            path.display()
        );
        match tokio::time::timeout_at(deadline, crate::fswatch::wait_for_file(path)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(BrokerError::TokenFileUnreadable {
                    path: path.to_path_buf(),
                    detail: format!("cannot watch for it: {e}"),
                });
            }
            Err(_) => return Err(missing()),
        }
    }
    // The disk is an ISO image, mounted whole: a file that exists is complete.
    let bytes = crate::files::read_capped(path, TOKEN_FILE_CAP).map_err(|e| {
        BrokerError::TokenFileUnreadable {
            path: path.to_path_buf(),
            detail: e.to_string(),
        }
    })?;
    pod_token(&bytes).map_err(|what| BrokerError::TokenFileInvalid {
        path: path.to_path_buf(),
        what,
    })
}

/// The token in the file's bytes: one line of printable ASCII (a JWT), white space around it
/// ignored. What it is otherwise, described without quoting it.
pub fn pod_token(bytes: &[u8]) -> Result<Secret, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "{} bytes that are not UTF-8 text (an invalid byte at offset {})",
            bytes.len(),
            e.valid_up_to()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err("empty".into());
    }
    if let Some(at) = token.find(|c: char| !c.is_ascii_graphic()) {
        return Err(format!(
            "not one token: a space, a line break or a character that is not printable ASCII at offset {at}"
        ));
    }
    Ok(Secret::new(token))
}

/// The broker's 201 answer, or what it is instead.
pub fn granted(body: &[u8]) -> Result<Granted, String> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(format!("{} bytes that are not UTF-8 text", body.len()));
    };
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(_) if text.trim_start().starts_with('<') => {
            return Err(format!(
                "an HTML or XML page ({} bytes), not JSON",
                body.len()
            ));
        }
        Err(_) => return Err(format!("{} bytes that are not JSON", body.len())),
    };
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::trim);
    let url = field("url")
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
        .ok_or("JSON without a GitLab URL (\"url\")")?;
    let token = field("token")
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or("JSON without a runner token (\"token\")")?;
    Ok(Granted {
        url: url.to_string(),
        token: Secret::new(token),
        runner_id: value.get("runner_id").and_then(|v| v.as_u64()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_token_is_one_printable_line() {
        assert_eq!(
            pod_token(b"eyJhbGc.eyJ.sig\n").unwrap().expose(),
            "eyJhbGc.eyJ.sig"
        );
        assert_eq!(pod_token(b"  \n").unwrap_err(), "empty");
        assert!(pod_token(b"\xff\xfeabc").unwrap_err().contains("not UTF-8"));
        assert!(pod_token(b"abc def").unwrap_err().contains("offset 3"));
        assert!(
            pod_token("abc\u{e9}".as_bytes())
                .unwrap_err()
                .contains("printable ASCII")
        );
    }

    #[test]
    fn the_broker_s_answer_becomes_runner_json_with_its_url_and_token() {
        let answer = br#"{"url": "https://gitlab.example.com", "token": "glrt-abc.def", "token_expires_at": null, "runner_id": 42}"#;
        let granted = granted(answer).unwrap();
        assert_eq!(granted.runner_id, Some(42));
        let json: serde_json::Value = serde_json::from_str(&granted.runner_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"url": "https://gitlab.example.com", "token": "glrt-abc.def"})
        );
        assert!(!format!("{granted:?}").contains("abc.def"));
    }

    #[test]
    fn answers_that_are_not_the_broker_s_say_what_they_are() {
        assert!(
            granted(b"<!doctype html><p>hi")
                .unwrap_err()
                .contains("HTML")
        );
        assert!(granted(b"\xff").unwrap_err().contains("not UTF-8"));
        assert!(granted(b"{}").unwrap_err().contains("\"url\""));
        assert!(
            granted(br#"{"url": "https://g", "token": ""}"#)
                .unwrap_err()
                .contains("\"token\"")
        );
        assert!(
            granted(br#"{"url": "file:///etc", "token": "glrt-x"}"#)
                .unwrap_err()
                .contains("\"url\"")
        );
    }
}
