//! GCE's SSH keys as Google's guest agent reads them: the instance's and the project's
//! `ssh-keys` (and legacy `sshKeys`), `block-project-ssh-keys`, OS Login, `google-ssh` expiries.

use std::time::SystemTime;

use tokio::time::Instant;

use super::{GCE_INSTANCE, GCE_PROJECT};
use crate::metadata::ssh_keys::Keys;
use crate::metadata::{MetadataClient, MetadataError};

/// The keys given to `user`: none where OS Login is required; else the instance's `ssh-keys`
/// and legacy `sshKeys`, and the project's unless the instance blocks them.
pub async fn ssh_keys(
    client: &MetadataClient,
    user: &str,
    deadline: Instant,
    keys: &mut Keys,
) -> Result<(), MetadataError> {
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
    if let Some(why) = os_login_required(instance_os_login.as_deref(), project_os_login.as_deref())
    {
        keys.refused = Some(why);
        return Ok(());
    }
    let now = SystemTime::now();
    let instance = value(GCE_INSTANCE, "ssh-keys").await?.unwrap_or_default();
    gce_keys(keys, "instance ssh-keys", &instance, user, now);
    let legacy = value(GCE_INSTANCE, "sshKeys").await?.unwrap_or_default();
    gce_keys(keys, "instance sshKeys", &legacy, user, now);
    let block = value(GCE_INSTANCE, "block-project-ssh-keys").await?;
    if go_bool(block.as_deref()) == Some(true) {
        tracing::info!("the instance sets block-project-ssh-keys: project keys are not used");
    } else if !legacy.is_empty() {
        // The guest agent: an instance's legacy sshKeys blocks the project's keys.
        tracing::info!(
            "the instance has legacy sshKeys, which block project keys: project keys are not used"
        );
    } else {
        let project = value(GCE_PROJECT, "ssh-keys").await?.unwrap_or_default();
        gce_keys(keys, "project ssh-keys", &project, user, now);
        let legacy = value(GCE_PROJECT, "sshKeys").await?.unwrap_or_default();
        gce_keys(keys, "project sshKeys", &legacy, user, now);
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::ssh_keys::tests::{ED, RSA};

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
