//! The SSH public keys a platform gives an instance (`gitlab-runner-vm ssh-keys`, like
//! `afterburn --ssh-keys`): fetched from the metadata service, checked line by line, and the
//! ones for one user returned as authorized_keys lines.
//!
//! - aws: the launch key pairs, `/latest/meta-data/public-keys/` (lines `0=name`), then
//!   `/latest/meta-data/public-keys/<i>/openssh-key`: for whichever user the image logs in;
//! - gce: `ssh-keys` of the instance, and of the project unless the instance sets
//!   `block-project-ssh-keys` to true; lines `user:key`, only the user's, expired ones skipped;
//! - digitalocean: `/metadata/v1/public-keys`, one key per line: for whichever user.

use std::time::SystemTime;

use tokio::time::Instant;

use super::{MetadataClient, MetadataError, Platform};

const AWS_KEYS: &str = "/latest/meta-data/public-keys/";
const GCE_INSTANCE_KEYS: &str = "/computeMetadata/v1/instance/attributes/ssh-keys";
const GCE_PROJECT_KEYS: &str = "/computeMetadata/v1/project/attributes/ssh-keys";
const GCE_BLOCK_PROJECT_KEYS: &str =
    "/computeMetadata/v1/instance/attributes/block-project-ssh-keys";
const DO_KEYS: &str = "/metadata/v1/public-keys";

/// Key types sshd accepts in authorized_keys (DSA is gone from OpenSSH).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// The keys found for the user, and a note per line that was left out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keys {
    pub lines: Vec<String>,
    pub skipped: Vec<String>,
}

impl Keys {
    /// Adds a key line for the user if it is one; `source` names where it came from.
    fn offer(&mut self, source: &str, line: &str) {
        match check_key(line) {
            Ok(key) => {
                if !self.lines.iter().any(|l| l == key) {
                    self.lines.push(key.to_string());
                }
            }
            Err(why) => self.skipped.push(format!("{source}: {why}")),
        }
    }
}

/// The SSH keys the platform gives `user`, fetched within `deadline`.
pub async fn fetch(
    client: &MetadataClient,
    user: &str,
    deadline: Instant,
) -> Result<Keys, MetadataError> {
    let text =
        |body: Option<Vec<u8>>| String::from_utf8_lossy(&body.unwrap_or_default()).into_owned();
    let mut keys = Keys::default();
    match client.platform() {
        Platform::Aws => {
            let index = text(client.fetch(AWS_KEYS, deadline).await?);
            for entry in index.lines().map(str::trim).filter(|l| !l.is_empty()) {
                // `0=my-key`: the number is the key's directory.
                let number = entry.split('=').next().unwrap_or("");
                if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                    keys.skipped
                        .push(format!("{AWS_KEYS}: an entry that is not <number>=<name>"));
                    continue;
                }
                let path = format!("{AWS_KEYS}{number}/openssh-key");
                let key = text(client.fetch(&path, deadline).await?);
                for line in key.lines().filter(|l| !l.trim().is_empty()) {
                    keys.offer(&path, line);
                }
            }
        }
        Platform::Gce => {
            let instance = text(client.fetch(GCE_INSTANCE_KEYS, deadline).await?);
            gce_keys(
                &mut keys,
                "instance ssh-keys",
                &instance,
                user,
                SystemTime::now(),
            );
            let block = text(client.fetch(GCE_BLOCK_PROJECT_KEYS, deadline).await?);
            if block.trim().eq_ignore_ascii_case("true") {
                tracing::info!(
                    "the instance sets block-project-ssh-keys: project keys are not used"
                );
            } else {
                let project = text(client.fetch(GCE_PROJECT_KEYS, deadline).await?);
                gce_keys(
                    &mut keys,
                    "project ssh-keys",
                    &project,
                    user,
                    SystemTime::now(),
                );
            }
        }
        Platform::DigitalOcean => {
            let all = text(client.fetch(DO_KEYS, deadline).await?);
            for line in all.lines().filter(|l| !l.trim().is_empty()) {
                keys.offer(DO_KEYS, line);
            }
        }
    }
    Ok(keys)
}

/// GCE's `ssh-keys` value: lines `user:key-type key comment`; only `user`'s count, and a key
/// whose `google-ssh {"userName":..,"expireOn":..}` comment says it expired is skipped.
pub fn gce_keys(keys: &mut Keys, source: &str, value: &str, user: &str, now: SystemTime) {
    for (n, line) in value.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let Some((owner, key)) = line.split_once(':') else {
            keys.skipped
                .push(format!("{source} line {}: not user:key", n + 1));
            continue;
        };
        if owner != user {
            continue;
        }
        if gce_expired(key, now) {
            keys.skipped.push(format!(
                "{source} line {}: expired (google-ssh expireOn)",
                n + 1
            ));
            continue;
        }
        keys.offer(&format!("{source} line {}", n + 1), key);
    }
}

/// Whether a GCE key carries a `google-ssh` expiry that is past. An expiry that cannot be read
/// keeps the key (the platform's own guest agent would decide; a key is never dropped on a
/// guess).
fn gce_expired(key: &str, now: SystemTime) -> bool {
    let Some(json) = key.split_once("google-ssh ").map(|(_, json)| json.trim()) else {
        return false;
    };
    let Some(expire_on) = serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|v| v.get("expireOn")?.as_str().map(str::to_owned))
    else {
        return false;
    };
    parse_expiry(&expire_on).is_some_and(|at| at <= now)
}

/// `2026-11-30T18:00:00+0000` (what gcloud writes), `...Z` or `...+00:00`.
fn parse_expiry(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let (local, offset) = match text.strip_suffix('Z') {
        Some(local) => (local, 0),
        None => {
            // The zone's sign is the last + or -: the date's dashes come before it.
            let at = text.rfind(['+', '-'])?;
            (&text[..at], zone_seconds(&text[at..].replace(':', ""))?)
        }
    };
    // Whole seconds; a fraction is dropped.
    let local = local.split('.').next()?;
    let as_if_utc = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    let shift = std::time::Duration::from_secs(offset.unsigned_abs());
    if offset >= 0 {
        as_if_utc.checked_sub(shift)
    } else {
        as_if_utc.checked_add(shift)
    }
}

/// `+hhmm` or `-hhmm` as seconds east of UTC.
fn zone_seconds(zone: &str) -> Option<i64> {
    let digits = zone.get(1..5)?;
    if zone.len() != 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seconds = digits[..2].parse::<i64>().ok()? * 3600 + digits[2..].parse::<i64>().ok()? * 60;
    Some(if zone.starts_with('-') {
        -seconds
    } else {
        seconds
    })
}

/// A public key line as authorized_keys takes it: a known type, then base64 key data, then an
/// optional comment; nothing else (no options such as `command=`, no control characters).
pub fn check_key(line: &str) -> Result<&str, String> {
    let line = line.trim();
    if line.chars().any(char::is_control) {
        return Err("a key with control characters in it".into());
    }
    let mut words = line.split_whitespace();
    let kind = words.next().unwrap_or("");
    if !KEY_TYPES.contains(&kind) {
        let shown: String = kind.chars().take(40).collect();
        return Err(format!(
            "not a public key of a known type (it starts with {shown:?}; options such as command= are not taken from metadata)"
        ));
    }
    let data = words.next().unwrap_or("");
    let base64 = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=');
    if data.len() < 16 || !data.bytes().all(base64) {
        return Err(format!("a {kind} key without its base64 key data"));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyDataForTestsOnly0123456789abcdef alice@laptop";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQFakeKeyData0123456789 bob";

    #[test]
    fn known_key_types_pass_and_anything_else_is_skipped_with_a_reason() {
        assert_eq!(check_key(&format!("  {ED}\r")), Ok(ED));
        assert!(check_key(RSA).is_ok());
        assert!(check_key("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAA x").is_ok());
        assert!(
            check_key("sk-ssh-ed25519@openssh.com AAAAGnNrLXNzaC1lZDI1NTE5QG9wZW5zc2guY29t")
                .is_ok()
        );
        // Key data is at least 16 base64 characters (a real key has far more).
        assert!(check_key("ssh-ed25519 AAAAC3NzaC1lZDI1").is_ok());
        assert!(check_key("ssh-ed25519 AAAAC3NzaC1lZDI1N").is_ok());
        assert!(check_key("ssh-ed25519 AAAAC3NzaC1lZDI").is_err());
        for bad in [
            "command=\"rm -rf /\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAFakeKeyData",
            "ssh-ed25519",
            "ssh-ed25519 not*base64*data!!!!!!!",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFake\u{1b}[2J",
            "<html>",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn gce_keeps_only_the_users_keys_that_have_not_expired() {
        let now = humantime::parse_rfc3339("2026-11-30T16:00:00Z").unwrap();
        let value = format!(
            "runner:{ED}\n\
             alice:{RSA}\n\
             runner:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQExpired google-ssh {{\"userName\":\"a@b.c\",\"expireOn\":\"2026-11-30T15:00:00+0000\"}}\n\
             runner:ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQValid00 google-ssh {{\"userName\":\"a@b.c\",\"expireOn\":\"2026-11-30T17:00:00+0000\"}}\n\
             a line without a colon\n\
             runner:{ED}\n"
        );
        let mut keys = Keys::default();
        gce_keys(&mut keys, "instance ssh-keys", &value, "runner", now);
        assert_eq!(keys.lines.len(), 2, "{keys:?}");
        assert_eq!(keys.lines[0], ED);
        assert!(keys.lines[1].contains("Valid00"));
        assert_eq!(keys.skipped.len(), 2, "{keys:?}");
        assert!(keys.skipped[0].contains("expired"));
        assert!(keys.skipped[1].contains("not user:key"));
        // The user name is matched whole: "run" is not "runner".
        let mut none = Keys::default();
        gce_keys(&mut none, "s", &value, "run", now);
        assert!(none.lines.is_empty());
    }

    #[test]
    fn expiry_times_in_the_forms_gcloud_and_others_write() {
        let at = |s: &str| parse_expiry(s).map(|t| humantime::format_rfc3339(t).to_string());
        assert_eq!(
            at("2026-11-30T18:00:00+0000").as_deref(),
            Some("2026-11-30T18:00:00Z")
        );
        assert_eq!(
            at("2026-11-30T18:00:00+0100").as_deref(),
            Some("2026-11-30T17:00:00Z")
        );
        assert_eq!(
            at("2026-11-30T18:00:00-02:30").as_deref(),
            Some("2026-11-30T20:30:00Z")
        );
        assert_eq!(
            at("2026-11-30T18:00:00.5Z").as_deref(),
            Some("2026-11-30T18:00:00Z")
        );
        assert_eq!(at("tomorrow"), None);
        assert_eq!(at("2026-11-30T18:00:00+01000"), None);
        assert_eq!(at("2026-11-30T18:00:00"), None);
        // An unreadable expiry keeps the key.
        let now = SystemTime::now() + Duration::from_secs(1);
        assert!(!gce_expired(
            "ssh-rsa AAAA google-ssh {\"expireOn\":\"soon\"}",
            now
        ));
        assert!(!gce_expired("ssh-rsa AAAA google-ssh not json", now));
    }
}
