//! gitlab-runner's way through the metadata firewall, for a cache that uses the instance's own
//! identity (S3's `iam`, GCS's service account, Azure's managed identity).
//!
//! gitlab-runner signs the cache's URLs itself, in its own process, with credentials it fetches
//! from the metadata service; the jobs get only the signed URLs (the cache archiver and
//! extractor of each job's stages use those). So gitlab-runner alone needs the service, and
//! its cgroup `<unit>/runner` is admitted, never the jobs' `<unit>/jobs` (each shell job's stage
//! moves there first, `job-exec --cgroup`; Docker's containers live in Docker's cgroups and
//! their bridged packets are dropped before any rule). Only when the cache needs it: without
//! it gitlab-runner has no business there, and an admitted gitlab-runner also reaches the
//! user-data (runner.json, whose token it holds anyway) and whatever the instance's role may
//! do. The rule goes with the unit (its ExecStopPost revokes `runner` too).
//!
//! The decision is pure; `admit` runs the firewall's script.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup::RunnerCgroup;
use crate::config::CacheSettings;

/// How long the firewall's script may take (iptables waits for the xtables lock).
pub const ADMIT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The cache has keys of its own (or there is no cache): nothing to admit.
    NotNeeded,
    /// No firewall script was given (an image without the firewall): gitlab-runner reaches the
    /// service as far as the VM's network lets it.
    NoFirewall { identity: &'static str },
    /// `firewall allow cgroup`.
    Admit {
        identity: &'static str,
        firewall: PathBuf,
        cgroup: String,
    },
}

/// What the fleet's cache needs of the firewall. An error when gitlab-runner would need the
/// service but has no cgroup of its own: admitting its cgroup would then admit the agent's
/// whole unit, every job included, so nothing is admitted and the run fails before any job.
pub fn decide(
    cache: Option<&CacheSettings>,
    firewall: Option<&Path>,
    runner: Option<&RunnerCgroup>,
) -> Result<Admission, String> {
    let Some(identity) = cache.and_then(CacheSettings::instance_identity) else {
        return Ok(Admission::NotNeeded);
    };
    let Some(firewall) = firewall else {
        return Ok(Admission::NoFirewall { identity });
    };
    let Some(runner) = runner else {
        return Err(format!(
            "{identity} needs gitlab-runner to reach the metadata service, but gitlab-runner has no cgroup of its own (--separate-cgroups is off or failed: see the journal), and admitting the agent's unit would admit every job; nothing is admitted"
        ));
    };
    Ok(Admission::Admit {
        identity,
        firewall: firewall.to_path_buf(),
        cgroup: runner.relative.clone(),
    })
}

/// Runs `firewall allow cgroup`, at most `ADMIT_TIMEOUT`.
pub async fn admit(firewall: &Path, cgroup: &str) -> Result<(), String> {
    let mut command = tokio::process::Command::new(firewall);
    command.arg("allow").arg(cgroup);
    let shown = format!("{} allow {cgroup}", firewall.display());
    crate::bounded::run(
        command,
        &shown,
        ADMIT_TIMEOUT,
        "the agent's limit for the firewall",
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CacheType, CacheValue};

    fn cache(cache_type: CacheType, settings: &[(&'static str, &str)]) -> CacheSettings {
        CacheSettings {
            cache_type,
            path: None,
            shared: false,
            max_uploaded_archive_size: None,
            settings: settings
                .iter()
                .map(|(k, v)| (*k, CacheValue::Text(v.to_string())))
                .collect(),
        }
    }

    fn runner() -> RunnerCgroup {
        RunnerCgroup {
            procs: c"/sys/fs/cgroup/system.slice/u.service/runner/cgroup.procs".into(),
            path: "/sys/fs/cgroup/system.slice/u.service/runner".into(),
            relative: "system.slice/u.service/runner".into(),
            jobs: "/sys/fs/cgroup/system.slice/u.service/jobs".into(),
        }
    }

    #[test]
    fn only_a_cache_with_the_instances_identity_admits_gitlab_runner() {
        let fw = Path::new("/fw");
        let keyed = [
            cache(
                CacheType::S3,
                &[("BucketName", "b"), ("AuthenticationType", "access-key")],
            ),
            cache(
                CacheType::Gcs,
                &[("BucketName", "b"), ("CredentialsFile", "/k.json")],
            ),
            cache(
                CacheType::Gcs,
                &[("BucketName", "b"), ("AccessID", "a@p.iam")],
            ),
            cache(
                CacheType::Azure,
                &[("AccountName", "a"), ("AccountKey", "k")],
            ),
        ];
        for c in &keyed {
            assert_eq!(
                decide(Some(c), Some(fw), Some(&runner())),
                Ok(Admission::NotNeeded),
                "{c:?}"
            );
        }
        assert_eq!(
            decide(None, Some(fw), Some(&runner())),
            Ok(Admission::NotNeeded)
        );
        let identity = [
            cache(
                CacheType::S3,
                &[("BucketName", "b"), ("AuthenticationType", "iam")],
            ),
            cache(CacheType::Gcs, &[("BucketName", "b")]),
            cache(CacheType::Azure, &[("AccountName", "a")]),
        ];
        for c in &identity {
            let Ok(Admission::Admit {
                firewall, cgroup, ..
            }) = decide(Some(c), Some(fw), Some(&runner()))
            else {
                panic!("{c:?}");
            };
            assert_eq!(firewall, fw);
            // gitlab-runner's cgroup, never the jobs' nor the unit's.
            assert_eq!(cgroup, "system.slice/u.service/runner");
            assert!(matches!(
                decide(Some(c), None, Some(&runner())),
                Ok(Admission::NoFirewall { .. })
            ));
            // No cgroup of its own: fail closed.
            let err = decide(Some(c), Some(fw), None).unwrap_err();
            assert!(err.contains("no cgroup of its own"), "{err}");
        }
    }

    #[tokio::test]
    async fn admit_runs_the_scripts_allow_and_says_when_it_fails() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fw");
        let log = dir.path().join("log");
        std::fs::write(
            &script,
            format!("#!/bin/sh\necho \"$@\" > {}\n", log.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        admit(&script, "system.slice/u.service/runner")
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "allow system.slice/u.service/runner\n"
        );
        let err = admit(Path::new("/bin/false"), "x/runner")
            .await
            .unwrap_err();
        assert!(err.contains("`/bin/false allow x/runner` failed"), "{err}");
        let err = admit(&dir.path().join("none"), "x/runner")
            .await
            .unwrap_err();
        assert!(err.contains("cannot run"), "{err}");
    }
}
