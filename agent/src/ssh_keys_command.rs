//! `gitlab-runner-vm ssh-keys --user USER`: the platform's SSH public keys for USER, written
//! whole to `<authorized-keys-dir>/<USER>` (0644, directory 0755) for sshd's
//! `AuthorizedKeysFile /run/ssh-keys/%u`. Run once at boot before sshd, like
//! `afterburn --ssh-keys`. Exit 0 also when there is no platform (nothing written); non-zero
//! when the metadata service fails or the file cannot be written.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::SshKeysArgs;
use crate::metadata::{self, MetadataClient, Platform};

pub fn run(args: &SshKeysArgs) -> ExitCode {
    crate::logging::init();
    if let Err(why) = check_user_name(&args.user) {
        complain!(
            "error: --user {:?} {why}; fix: give a login name such as runner",
            args.user
        );
        return ExitCode::FAILURE;
    }
    let Some(platform) = args.config_source.platform(&args.dmi_dir) else {
        say!(
            "no SSH keys: --config-source {} names no platform with a metadata service (DMI read from {}); nothing written",
            args.config_source,
            args.dmi_dir.display()
        );
        return ExitCode::SUCCESS;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            complain!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(write_keys(args, platform)) {
        Ok(message) => {
            say!("{message}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            complain!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn write_keys(args: &SshKeysArgs, platform: Platform) -> Result<String, String> {
    let client = MetadataClient::new(platform, &args.metadata_url)
        .map_err(|e| format!("{e}; fix: {}", e.fix()))?;
    // At most ten years (the flag's bound): no overflow.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let keys = metadata::fetch_ssh_keys(&client, &args.user, deadline)
        .await
        .map_err(|e| format!("{e}; fix: {}", e.fix()))?;
    for skipped in &keys.skipped {
        complain!("warning: skipped a key from {platform} metadata: {skipped}");
    }
    if let Some(refused) = &keys.refused {
        complain!("warning: {refused}");
    }
    let path = key_file(&args.authorized_keys_dir, &args.user);
    let mut text = keys.lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    // An empty file too: keys removed from the metadata must not stay usable.
    crate::files::write_atomically(&path, text.as_bytes(), 0o644, 0o755).map_err(|e| {
        format!(
            "cannot write {}: {e}; fix: run as root, or point --authorized-keys-dir at a writable directory",
            path.display()
        )
    })?;
    // A directory that was there before keeps its mode (see `files::create_dirs`); say when
    // it keeps sshd out, rather than chmod what someone chose.
    if let Some(problem) = std::fs::metadata(&args.authorized_keys_dir)
        .ok()
        .and_then(|meta| {
            dir_mode_problem(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()))
        })
    {
        complain!(
            "warning: {} {problem}; fix: chmod 0755 {}",
            args.authorized_keys_dir.display(),
            args.authorized_keys_dir.display()
        );
    }
    let refused = if keys.refused.is_some() {
        " (OS Login is required: metadata keys are not used)"
    } else {
        ""
    };
    Ok(format!(
        "wrote {} SSH key(s) for {} from {platform} metadata to {}{refused}",
        keys.lines.len(),
        args.user,
        path.display()
    ))
}

fn key_file(dir: &Path, user: &str) -> PathBuf {
    dir.join(user)
}

/// What keeps sshd from using keys in a directory of this mode: sshd opens
/// `AuthorizedKeysFile` as the user logging in, who must be able to enter the directory, and
/// with `StrictModes` refuses a directory others can write to.
fn dir_mode_problem(mode: u32) -> Option<&'static str> {
    if mode & 0o001 == 0 {
        Some("cannot be entered by other users (sshd reads the keys as the user logging in)")
    } else if mode & 0o022 != 0 {
        Some("is writable by others (sshd's StrictModes refuses keys there)")
    } else {
        None
    }
}

/// The user name becomes a file name: nothing that could leave the directory or hide.
fn check_user_name(user: &str) -> Result<(), &'static str> {
    if user.is_empty() || user.len() > 256 {
        return Err("is empty or too long");
    }
    if user.starts_with(['.', '-']) || user.contains('/') || user.chars().any(char::is_control) {
        return Err("is not a user name (no /, no control characters, no leading . or -)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_sshd_cannot_use_is_named() {
        assert_eq!(dir_mode_problem(0o40755), None);
        assert_eq!(dir_mode_problem(0o711), None);
        assert!(
            dir_mode_problem(0o700)
                .unwrap()
                .contains("cannot be entered")
        );
        assert!(dir_mode_problem(0o750).is_some());
        assert!(dir_mode_problem(0o777).unwrap().contains("StrictModes"));
        assert!(dir_mode_problem(0o775).is_some());
    }

    #[test]
    fn user_names_that_would_leave_the_directory_are_refused() {
        assert!(check_user_name("runner").is_ok());
        assert!(check_user_name("ci.user_1").is_ok());
        assert!(check_user_name(&"u".repeat(256)).is_ok());
        assert!(check_user_name(&"u".repeat(257)).is_err());
        for bad in ["", "..", "../root", "a/b", ".hidden", "-rf", "a\nb"] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
