//! What every platform's SSH keys are checked against (`gitlab-runner-vm ssh-keys`, like
//! `afterburn --ssh-keys`): a key line as authorized_keys takes it, and the keys found for one
//! user with a note per line left out. Where each platform keeps its keys, and which count, is
//! in its own module (`aws`, `gce`, `digitalocean`); `super::fetch_ssh_keys` asks the right one.

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
    pub(super) fn offer(&mut self, source: &str, line: &str) {
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

/// A metadata answer as text (none: empty).
pub(super) fn text(body: Option<Vec<u8>>) -> String {
    String::from_utf8_lossy(&body.unwrap_or_default()).into_owned()
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
pub mod tests {
    use super::*;

    /// Keys of each kind the providers' tests hand out.
    pub const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyDataForTestsOnly0123456789abcdef alice@laptop";
    pub const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQFakeKeyData0123456789 bob";

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
}
