//! Three cgroups under the agent's unit: `agent` for the agent itself, `runner` for
//! gitlab-runner, `jobs` for every stage of every shell job. The metadata firewall admits
//! sockets by cgroup (a cgroup and its descendants), and jobs descend from gitlab-runner, which
//! descends from the agent: without the split, admitting the agent (always) or gitlab-runner
//! (when the cache uses the instance's identity) would admit every job. `jobs` is a sibling of
//! both, never a descendant of an admitted cgroup. The unit must delegate its cgroup
//! (`Delegate=yes`) for the agent to make sub-cgroups of its own.

use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// Where cgroup v2 is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The sub-cgroup the agent moves itself into (the firewall's allow rule names it).
pub const AGENT: &str = "agent";
/// The sub-cgroup of gitlab-runner (admitted by the firewall only for a cache that uses the
/// instance's identity).
pub const RUNNER: &str = "runner";
/// The sub-cgroup every shell job's stage moves into (`job-exec --cgroup`): never admitted.
pub const JOBS: &str = "jobs";

/// gitlab-runner's cgroup, prepared before any fork (gitlab-runner writes its own pid to
/// `procs` between fork and exec), and the jobs' beside it.
#[derive(Debug, Clone)]
pub struct RunnerCgroup {
    pub procs: CString,
    pub path: PathBuf,
    /// `runner` relative to the cgroup root (`system.slice/gitlab-runner-vm.service/runner`):
    /// what the firewall's `allow` names.
    pub relative: String,
    /// The jobs' cgroup directory, for `job-exec --cgroup`.
    pub jobs: PathBuf,
}

/// The cgroup v2 path in `/proc/self/cgroup` ("0::/system.slice/x.service"), relative to the
/// mount; None for a v1-only or unreadable entry.
pub fn own_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim)
        .filter(|path| path.starts_with('/'))
}

/// The unit's cgroup, given the agent's own: a restarted agent may find itself in `agent`
/// already (systemd puts a restarted main process back in the unit's cgroup, but a process
/// exec'd in place keeps its own).
pub fn unit_path(own: &str) -> Option<&str> {
    let unit = own.strip_suffix(&format!("/{AGENT}")).unwrap_or(own);
    // The root cgroup is no unit's: making children there would reorganise the whole machine.
    (unit != "/" && !unit.is_empty()).then_some(unit)
}

/// Makes `agent`, `runner` and `jobs` under the unit's cgroup and moves this process into
/// `agent`.
/// `root` is where cgroup v2 is mounted, `own` this process's cgroup (from /proc/self/cgroup).
pub fn separate(root: &Path, own: &str) -> Result<RunnerCgroup, String> {
    let unit = unit_path(own).ok_or_else(|| {
        format!("the agent runs in the root cgroup ({own}), not in a unit of its own")
    })?;
    let base = root.join(unit.trim_start_matches('/'));
    for name in [AGENT, RUNNER, JOBS] {
        match fs::create_dir(base.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(format!(
                    "cannot make the cgroup {}: {e}",
                    base.join(name).display()
                ));
            }
        }
    }
    let agent_procs = base.join(AGENT).join("cgroup.procs");
    // "0" moves the writing process, every thread of it.
    fs::write(&agent_procs, "0")
        .map_err(|e| format!("cannot move the agent into {}: {e}", agent_procs.display()))?;
    let path = base.join(RUNNER);
    let procs = CString::new(
        path.join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(|_| format!("the cgroup path {} holds a NUL byte", path.display()))?;
    Ok(RunnerCgroup {
        procs,
        path,
        relative: format!("{}/{RUNNER}", unit.trim_start_matches('/')),
        jobs: base.join(JOBS),
    })
}

/// Moves this process (every thread) into the cgroup `dir`, for `job-exec` before a stage
/// starts: what it then starts is born there. `cgroup.procs` is opened without being created,
/// so a `dir` that is no cgroup (gone, mistyped) is an error, never a file written beside
/// the cgroups; the kernel accepts the write only once the move is done.
pub fn enter(dir: &Path) -> Result<(), String> {
    let procs = dir.join("cgroup.procs");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| format!("cannot open {}: {e}", procs.display()))?;
    // "0": the writing process.
    file.write_all(b"0")
        .map_err(|e| format!("cannot move into {}: {e}", dir.display()))
}

/// `separate` for this process, as the unit runs it; what went wrong says how to fix it.
pub fn separate_self() -> Result<RunnerCgroup, String> {
    let text = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own_path(&text).ok_or("no cgroup v2 entry in /proc/self/cgroup (cgroup v1?)")?;
    separate(Path::new(CGROUP_ROOT), own)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_cgroup_is_the_v2_entry() {
        let text = "12:cpu:/x\n0::/system.slice/gitlab-runner-vm.service\n";
        assert_eq!(
            own_path(text),
            Some("/system.slice/gitlab-runner-vm.service")
        );
        assert_eq!(own_path("1:name=systemd:/x\n"), None);
        assert_eq!(own_path("0::relative\n"), None);
        assert_eq!(own_path(""), None);
    }

    #[test]
    fn the_unit_is_the_parent_of_agent_and_never_the_root() {
        let unit = "/system.slice/gitlab-runner-vm.service";
        assert_eq!(unit_path(unit), Some(unit));
        assert_eq!(unit_path(&format!("{unit}/agent")), Some(unit));
        // `runner` is not the agent's: a process there is gitlab-runner's, not a unit.
        assert_eq!(
            unit_path(&format!("{unit}/agentx")),
            Some(format!("{unit}/agentx").as_str())
        );
        assert_eq!(unit_path("/"), None);
        assert_eq!(unit_path("/agent"), None);
    }

    /// On a plain directory standing in for the cgroup mount: both cgroups made, the agent
    /// "moved" (its cgroup.procs written), the runner's cgroup.procs path prepared.
    #[test]
    fn separating_makes_both_cgroups_and_moves_the_agent() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/u.service");
        fs::create_dir_all(&unit).unwrap();
        let runner = separate(root.path(), "/system.slice/u.service").unwrap();
        assert_eq!(
            fs::read_to_string(unit.join("agent/cgroup.procs")).unwrap(),
            "0"
        );
        assert!(unit.join("runner").is_dir());
        assert!(unit.join("jobs").is_dir());
        assert_eq!(runner.path, unit.join("runner"));
        assert_eq!(runner.jobs, unit.join("jobs"));
        // What the firewall admits: relative to the mount, without a leading slash.
        assert_eq!(runner.relative, "system.slice/u.service/runner");
        assert_eq!(
            runner.procs.to_str().unwrap(),
            unit.join("runner/cgroup.procs").to_str().unwrap()
        );
        // Again, from inside `agent` (a restart): the same cgroups, nothing nested.
        let again = separate(root.path(), "/system.slice/u.service/agent").unwrap();
        assert_eq!(again.path, unit.join("runner"));
        assert_eq!(again.relative, "system.slice/u.service/runner");
        assert!(!unit.join("agent/agent").exists());
        let err = separate(root.path(), "/").unwrap_err();
        assert!(err.contains("root cgroup"), "{err}");
        let err = separate(root.path(), "/no/such.service").unwrap_err();
        assert!(err.contains("cannot make the cgroup"), "{err}");
    }

    #[test]
    fn entering_writes_the_own_pid_and_never_creates_the_file() {
        let root = tempfile::tempdir().unwrap();
        let jobs = root.path().join("jobs");
        fs::create_dir(&jobs).unwrap();
        // No cgroup.procs: a plain directory is no cgroup.
        let err = enter(&jobs).unwrap_err();
        assert!(err.contains("cannot open"), "{err}");
        assert!(!jobs.join("cgroup.procs").exists());
        let err = enter(&root.path().join("gone")).unwrap_err();
        assert!(err.contains("gone/cgroup.procs"), "{err}");
        fs::write(jobs.join("cgroup.procs"), "").unwrap();
        enter(&jobs).unwrap();
        assert_eq!(fs::read_to_string(jobs.join("cgroup.procs")).unwrap(), "0");
    }
}
