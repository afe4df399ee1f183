//! The state files this boot writes before any GitLab call: the system id in
//! `<state-dir>/.runner_system_id` and config.toml beside it, both private to the agent's user
//! (root in the unit), which gitlab-runner runs as: no job's user can read them.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::Context;

use crate::files;

pub const SYSTEM_ID_FILE: &str = ".runner_system_id";
pub const CONFIG_FILE: &str = "config.toml";

/// A fresh `r_` + 12 random alphanumerics. Never derived from /etc/machine-id, which VMs cloned
/// from one image share (they would collapse into one runner manager in GitLab).
pub fn generate_system_id() -> io::Result<String> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let mut id = String::from("r_");
    while id.len() < 14 {
        let mut buf = [0u8; 32];
        getrandom::fill(&mut buf).map_err(|e| io::Error::other(e.to_string()))?;
        // 62 * 4 = 248: rejecting bytes >= 248 keeps every character equally likely.
        for b in buf.iter().filter(|b| **b < 248) {
            if id.len() == 14 {
                break;
            }
            id.push(ALPHABET[(*b % 62) as usize] as char);
        }
    }
    Ok(id)
}

/// The format gitlab-runner accepts in `.runner_system_id` (anything else it replaces).
pub fn is_valid_system_id(id: &str) -> bool {
    id.len() == 14
        && (id.starts_with("r_") || id.starts_with("s_"))
        && id[2..].chars().all(|c| c.is_ascii_alphanumeric())
}

/// Writes `<state-dir>/.runner_system_id` and `<state-dir>/config.toml`, both 0600 and owned by
/// the agent's user (gitlab-runner, which reads them, runs as that user), before any GitLab
/// call.
pub fn write_state_files(
    state_dir: &Path,
    system_id: &str,
    config_toml: &str,
) -> anyhow::Result<()> {
    write_private(&state_dir.join(SYSTEM_ID_FILE), system_id.as_bytes())?;
    write_private(&state_dir.join(CONFIG_FILE), config_toml.as_bytes())
}

fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_data()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

/// Reads a system id this boot already wrote, if it is valid.
pub fn read_system_id(state_dir: &Path) -> Option<String> {
    let id = files::read_text(&state_dir.join(SYSTEM_ID_FILE), files::STATE_FILE_CAP).ok()?;
    let id = id.trim();
    is_valid_system_id(id).then(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Executor;
    use crate::runner::{read_runner_entry, render_config_toml, sample_config};
    use crate::secret::Secret;

    #[test]
    fn system_ids_are_fresh_and_valid() {
        let a = generate_system_id().unwrap();
        let b = generate_system_id().unwrap();
        assert!(is_valid_system_id(&a), "{a}");
        assert_ne!(a, b);
        assert!(!is_valid_system_id("r_short"));
        assert!(!is_valid_system_id("x_abcdefghijkl"));
        assert!(!is_valid_system_id("r_abcdefghij-l"));
    }

    /// Every character of the alphabet comes up: a narrow alphabet would make the ids of a
    /// large fleet collide into one runner manager.
    #[test]
    fn system_ids_use_the_whole_alphabet() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            seen.extend(generate_system_id().unwrap()[2..].chars());
        }
        assert_eq!(seen.len(), 62, "{seen:?}");
    }

    #[test]
    fn state_files_are_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let shell = crate::runner::ShellJobs {
            agent: "/bin/gitlab-runner-vm".into(),
            user: "runner".into(),
            home: "/home/runner".into(),
            cgroup: None,
        };
        let toml = render_config_toml(
            &sample_config(Executor::Shell),
            &Secret::new("glrt-xyz"),
            &shell,
        );
        write_state_files(dir.path(), "r_abcdefABCDEF", &toml).unwrap();
        for f in [SYSTEM_ID_FILE, CONFIG_FILE] {
            let meta = fs::metadata(dir.path().join(f)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
            // The agent's own, never handed to the job user.
            use std::os::unix::fs::MetadataExt;
            assert_eq!(meta.uid(), nix::unistd::Uid::current().as_raw(), "{f}");
        }
        assert_eq!(
            fs::read_to_string(dir.path().join(SYSTEM_ID_FILE)).unwrap(),
            "r_abcdefABCDEF"
        );
        assert_eq!(
            read_system_id(dir.path()).as_deref(),
            Some("r_abcdefABCDEF")
        );
        let entry = read_runner_entry(dir.path()).unwrap();
        assert_eq!(entry.token.unwrap().expose(), "glrt-xyz");
        assert_eq!(entry.url, "https://gitlab.example.com");
        assert_eq!(entry.tls_ca_file, Some(PathBuf::from("/etc/ca.pem")));
    }
}
