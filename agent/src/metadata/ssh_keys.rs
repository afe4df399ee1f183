//! The SSH public keys a platform gives an instance (`gitlab-runner-vm ssh-keys`, like
//! `afterburn --ssh-keys`): fetched from the metadata service, checked line by line, and the
//! ones for one user returned as authorized_keys lines.
//!
//! - aws: the launch key pairs, `/latest/meta-data/public-keys/` (lines `0=name`), then
//!   `/latest/meta-data/public-keys/<i>/openssh-key`: for whichever user the image logs in;
//! - gce: none at all where OS Login is required (`enable-oslogin`); else `ssh-keys` and the
//!   legacy `sshKeys` of the instance, and of the project unless the instance sets
//!   `block-project-ssh-keys` or has a legacy `sshKeys`; lines `user:key`, only the user's,
//!   expired ones skipped (see `gce_keys` for the guest agent's rules this follows);
//! - digitalocean: `/metadata/v1/public-keys`, one key per line: for whichever user.

use std::time::SystemTime;

use tokio::time::Instant;

use super::{MetadataClient, MetadataError, Platform};

const AWS_KEYS: &str = "/latest/meta-data/public-keys/";
const GCE_INSTANCE: &str = "/computeMetadata/v1/instance/attributes/";
const GCE_PROJECT: &str = "/computeMetadata/v1/project/attributes/";
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
    /// Why no key of the platform's metadata is used at all (GCE's OS Login).
    pub refused: Option<String>,
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
            let value = async |scope: &str, name: &str| {
                let body = client.fetch(&format!("{scope}{name}"), deadline).await?;
                Ok::<_, MetadataError>(body.map(|b| String::from_utf8_lossy(&b).into_owned()))
            };
            // OS Login first: where it is required, no metadata key may open the VM.
            let instance_os_login = value(GCE_INSTANCE, "enable-oslogin").await?;
            let project_os_login = match go_bool(instance_os_login.as_deref()) {
                Some(_) => None,
                None => value(GCE_PROJECT, "enable-oslogin").await?,
            };
            if let Some(why) =
                os_login_required(instance_os_login.as_deref(), project_os_login.as_deref())
            {
                keys.refused = Some(why);
                return Ok(keys);
            }
            let now = SystemTime::now();
            let instance = value(GCE_INSTANCE, "ssh-keys").await?.unwrap_or_default();
            gce_keys(&mut keys, "instance ssh-keys", &instance, user, now);
            let legacy = value(GCE_INSTANCE, "sshKeys").await?.unwrap_or_default();
            gce_keys(&mut keys, "instance sshKeys", &legacy, user, now);
            let block = value(GCE_INSTANCE, "block-project-ssh-keys").await?;
            if go_bool(block.as_deref()) == Some(true) {
                tracing::info!(
                    "the instance sets block-project-ssh-keys: project keys are not used"
                );
            } else if !legacy.is_empty() {
                // The guest agent: an instance's legacy sshKeys blocks the project's keys.
                tracing::info!(
                    "the instance has legacy sshKeys, which block project keys: project keys are not used"
                );
            } else {
                let project = value(GCE_PROJECT, "ssh-keys").await?.unwrap_or_default();
                gce_keys(&mut keys, "project ssh-keys", &project, user, now);
                let legacy = value(GCE_PROJECT, "sshKeys").await?.unwrap_or_default();
                gce_keys(&mut keys, "project sshKeys", &legacy, user, now);
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

/// A GCE boolean attribute as Google's guest agent reads it (Go's `strconv.ParseBool`: `1`, `t`,
/// `T`, `TRUE`, `true`, `True` and their false counterparts; anything else is unset), here after
/// trimming white space, which can only make a value count that the agent would ignore.
fn go_bool(value: Option<&str>) -> Option<bool> {
    match value?.trim() {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// Whether OS Login is required, and then why no metadata key is used. As the guest agent
/// decides (`OSLoginEnabled` in google-guest-agent `internal/metadata/exported.go`): the
/// instance's `enable-oslogin` when it is a boolean, else the project's, else off. Where OS
/// Login is on, Google's guest agent stops managing metadata keys (`enableMetadataSSHKey`), and
/// sshd asks OS Login, which this image does not have: nobody logs in with a metadata key.
pub fn os_login_required(instance: Option<&str>, project: Option<&str>) -> Option<String> {
    let (on, level) = match (go_bool(instance), go_bool(project)) {
        (Some(on), _) => (on, "instance"),
        (None, Some(on)) => (on, "project"),
        (None, None) => (false, ""),
    };
    on.then(|| {
        format!(
            "the {level} metadata sets enable-oslogin: OS Login is required, so no SSH key from metadata is used (this image has no OS Login); fix: set enable-oslogin=FALSE on the instance to log in with metadata keys, or use the serial console"
        )
    })
}

/// GCE's `ssh-keys` (or legacy `sshKeys`) value: lines `user:key-type key comment`; only
/// `user`'s count, and a key that Google's guest agent would refuse for its `google-ssh`
/// comment is skipped (see `gce_expiry`).
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
        if let Err(why) = gce_expiry(key, now) {
            keys.skipped.push(format!("{source} line {}: {why}", n + 1));
            continue;
        }
        keys.offer(&format!("{source} line {}", n + 1), key);
    }
}

/// Whether Google's guest agent keeps a key for its comment (`CheckExpiredKey` in
/// GoogleCloudPlatform/guest-agent `utils/ssh.go`, the same in google-guest-agent
/// `internal/utils/ssh/ssh.go`): the comment is what follows the key data; only a comment that
/// *starts* with `google-ssh` makes the key an expiring one, and then the rest after the first
/// space must be a JSON object whose `expireOn` (matched without regard to case, as Go does)
/// is a date in one of the two forms the agent reads (`timestamp::gce_expire_on`) and not
/// before now. A missing, unreadable or past expiry means expired: the agent refuses the key.
fn gce_expiry(key: &str, now: SystemTime) -> Result<(), &'static str> {
    let mut rest = key.trim();
    // Past the key type and the key data.
    for _ in 0..2 {
        rest = rest
            .trim_start()
            .split_once([' ', '\t'])
            .map_or("", |(_, after)| after);
    }
    let comment = rest.trim();
    if !comment.starts_with("google-ssh") {
        return Ok(());
    }
    let Some((_, json)) = comment.split_once(' ') else {
        return Err("a google-ssh key without its expiry (Google's guest agent refuses it)");
    };
    let unreadable = "a google-ssh key whose expiry is not JSON with expireOn and userName strings (Google's guest agent refuses it)";
    // Go fills nothing from null: no expiry. Duplicate or differently cased `expireOn`s: Go
    // keeps the last in the text, which serde_json's map does not record, so every one must
    // be a date to come (a key the agent would keep is at worst left out, never the reverse).
    let mut expire_on = Vec::new();
    match serde_json::from_str::<serde_json::Value>(json) {
        Ok(serde_json::Value::Null) => {}
        Ok(serde_json::Value::Object(fields)) => {
            for (name, value) in &fields {
                let is_expiry = name.eq_ignore_ascii_case("expireOn");
                if !is_expiry && !name.eq_ignore_ascii_case("userName") {
                    continue;
                }
                match value {
                    serde_json::Value::String(text) if is_expiry => expire_on.push(text.clone()),
                    serde_json::Value::String(_) | serde_json::Value::Null => {}
                    // Go's json.Unmarshal fails on a non-string for a string field.
                    _ => return Err(unreadable),
                }
            }
        }
        _ => return Err(unreadable),
    }
    if expire_on.is_empty() {
        return Err("a google-ssh key without expireOn (Google's guest agent refuses it)");
    }
    for text in expire_on {
        match crate::timestamp::gce_expire_on(&text) {
            None => {
                return Err(
                    "a google-ssh expireOn that is not a date Google's guest agent reads (it refuses the key)",
                );
            }
            Some(at) if at < now => return Err("expired (google-ssh expireOn)"),
            Some(_) => {}
        }
    }
    Ok(())
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
    fn google_ssh_comments_are_judged_as_googles_guest_agent_does() {
        let now = humantime::parse_rfc3339("2026-11-30T16:00:00Z").unwrap();
        let key = |comment: &str| format!("ssh-rsa AAAAB3NzaC1yc2EAAAADAQAB {comment}");
        let judge = |comment: &str| gce_expiry(&key(comment), now);
        let json = |expire_on: &str| {
            format!("google-ssh {{\"userName\":\"a@b.c\",\"expireOn\":\"{expire_on}\"}}")
        };
        // Kept: no comment, another comment, google-ssh not at the comment's start, a date to
        // come in each form, at exactly now (the agent drops keys *before* now).
        for comment in [
            String::new(),
            "alice@laptop".into(),
            format!("alice {}", json("2020-01-01T00:00:00+0000")),
            json("2026-11-30T17:00:00+0000"),
            json("2026-11-30T18:00:00+01:00"),
            json("2026-11-30T16:30:00Z"),
            json("2026-11-30T16:00:00.000001Z"),
            json("2026-11-30T13:00:00-0330"),
            json("2999-12-31T23:59:59+0000"),
            json("2026-11-30T16:00:00Z"),
            "google-ssh {\"EXPIREON\":\"2027-01-01T00:00:00Z\",\"username\":null}".into(),
            "google-ssh   {\"expireOn\":\"2027-01-01T00:00:00Z\"}".into(),
        ] {
            assert_eq!(judge(&comment), Ok(()), "{comment:?}");
        }
        // Refused: past in each form, far past, unreadable dates (the 2020 one too), no
        // expiry, not JSON, wrong types, trailing text, google-ssh with no space.
        for comment in [
            json("2026-11-30T15:59:59+0000"),
            json("2026-11-30T16:59:59+01:00"),
            json("2026-11-30T15:00:00Z"),
            json("2026-11-30T15:59:59.999Z"),
            json("2026-11-30T17:00:00+0200"),
            json("1970-01-01T00:00:00+0000"),
            json("2020-04-23 12:34:56"),
            json("2020-04-23T12:34:56"),
            json("Thu, 23 Apr 2020 12:34:56 GMT"),
            json("2099-04-23"),
            json("tomorrow"),
            json(""),
            "google-ssh".into(),
            "google-ssh{\"expireOn\":\"2027-01-01T00:00:00Z\"}".into(),
            "google-ssh {\"userName\":\"a@b.c\"}".into(),
            "google-ssh not json".into(),
            "google-ssh {\"expireOn\":1893456000}".into(),
            "google-ssh {\"expireOn\":\"2027-01-01T00:00:00Z\",\"userName\":7}".into(),
            "google-ssh [\"2027-01-01T00:00:00Z\"]".into(),
            "google-ssh {\"expireOn\":\"2027-01-01T00:00:00Z\"} trailing".into(),
            "google-ssh {\"expireOn\":\"2027-01-01T00:00:00Z\",\"ExpireOn\":\"2020-01-01T00:00:00Z\"}".into(),
            "google-ssh null".into(),
            "google-sshx {\"expireOn\":\"2020-01-01T00:00:00Z\"}".into(),
        ] {
            assert!(judge(&comment).is_err(), "{comment:?} was kept");
        }
    }

    #[test]
    fn os_login_follows_the_instance_then_the_project() {
        assert_eq!(os_login_required(None, None), None);
        for on in ["TRUE", "true", "True", "1", "t", "T", " true\n"] {
            assert!(os_login_required(Some(on), None).is_some(), "{on:?}");
            assert!(os_login_required(None, Some(on)).is_some(), "{on:?}");
        }
        // The instance's value wins over the project's, either way.
        assert_eq!(os_login_required(Some("FALSE"), Some("TRUE")), None);
        assert!(
            os_login_required(Some("TRUE"), Some("false"))
                .unwrap()
                .contains("instance")
        );
        // A value that is no boolean is unset (Go's ParseBool): the project's counts.
        assert!(
            os_login_required(Some("yes"), Some("TRUE"))
                .unwrap()
                .contains("project")
        );
        assert_eq!(os_login_required(Some("yes"), Some("on")), None);
    }
}
