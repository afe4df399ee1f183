//! `gitlab-runner-vm job-exec`, the custom executor's run_exec, through the real binary: a
//! stage runs as the job user, never root, in a clean environment, and its end is told to
//! gitlab-runner with the exit codes gitlab-runner gave.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::BIN;
use nix::unistd::{Uid, User};

/// The job user of these tests: `nobody` when root (the agent in the image), else whoever runs
/// them (no switch is possible, and none is needed).
fn job_user() -> Option<User> {
    if Uid::current().is_root() {
        User::from_name("nobody").ok().flatten()
    } else {
        None
    }
}

/// A directory like gitlab-runner's for a stage: root's, 0700, with the script in it.
fn stage_script(dir: &Path, body: &str) -> PathBuf {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let path = dir.join("script.");
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    path
}

fn job_exec(script: &Path, envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("job-exec");
    if let Some(user) = job_user() {
        cmd.args(["--job-user", &user.name]);
    }
    cmd.arg(script)
        .arg("step_script")
        .envs(envs.iter().copied());
    cmd
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn a_stage_runs_as_the_job_user_and_sees_nothing_of_gitlab_runner() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("config.toml");
    std::fs::write(&secret, format!("token = \"{}\"\n", common::TOKEN)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let script = stage_script(
        dir.path(),
        &format!(
            r#"echo "uid=$(id -u) gid=$(id -g) groups=$(id -G)"
echo "env: $(env | cut -d= -f1 | sort | tr '\n' ' ')"
cat {secret} 2>/dev/null && echo "read config.toml" || echo "config.toml: denied"
tr '\0' '\n' < /proc/$PPID/environ 2>/dev/null && echo "read the parent's environment" || echo "environ: denied"
"#,
            secret = secret.display()
        ),
    );
    let out = job_exec(
        &script,
        &[
            ("CUSTOM_ENV_CI_JOB_TOKEN", "job-token-of-gitlab-runner"),
            ("RUNNER_SECRET", common::TOKEN),
            ("TMPDIR", "/root/gitlab-runner-tmp"),
            ("LANG", "C.UTF-8"),
        ],
    )
    .output()
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(!stdout.contains(common::TOKEN), "{stdout}");
    assert!(!stdout.contains("job-token-of-gitlab-runner"), "{stdout}");
    let env_line = stdout.lines().find(|l| l.starts_with("env: ")).unwrap();
    for name in env_line["env: ".len()..].split_whitespace() {
        assert!(
            [
                "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "PWD", "SHLVL", "_", "OLDPWD"
            ]
            .contains(&name)
                || name.starts_with("BASH")
                || name.starts_with("MAIL"),
            "{name} reached the job: {stdout}"
        );
    }
    if let Some(user) = job_user() {
        let groups: Vec<String> = nix::unistd::getgrouplist(
            &std::ffi::CString::new(user.name.clone()).unwrap(),
            user.gid,
        )
        .unwrap()
        .iter()
        .map(|g| g.to_string())
        .collect();
        let first = stdout.lines().next().unwrap();
        assert_eq!(
            first,
            format!(
                "uid={} gid={} groups={}",
                user.uid,
                user.gid,
                groups.join(" ")
            ),
            "{stdout}"
        );
        assert!(stdout.contains("config.toml: denied"), "{stdout}");
        assert!(stdout.contains("environ: denied"), "{stdout}");
    } else {
        assert!(
            stdout.starts_with(&format!("uid={} ", Uid::current())),
            "{stdout}"
        );
    }
}

#[test]
fn exit_codes_are_the_ones_gitlab_runner_gave() {
    let dir = tempfile::tempdir().unwrap();
    let ok = stage_script(dir.path(), "true\n");
    assert_eq!(job_exec(&ok, &[]).status().unwrap().code(), Some(0));

    // A failing script: BUILD_FAILURE_EXIT_CODE (1 by default), its own code in the file.
    let code_file = dir.path().join("exit-code");
    let fails = stage_script(dir.path(), "echo before; exit 3\necho never\n");
    let out = job_exec(
        &fails,
        &[("BUILD_EXIT_CODE_FILE", code_file.to_str().unwrap())],
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(text(&out.stdout), "before\n");
    assert_eq!(std::fs::read_to_string(&code_file).unwrap(), "3\n");
    let out = job_exec(&fails, &[("BUILD_FAILURE_EXIT_CODE", "7")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
}

#[test]
fn what_the_job_never_ran_is_a_system_failure_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let script = stage_script(dir.path(), "echo ran\n");
    let system = [("SYSTEM_FAILURE_EXIT_CODE", "9")];
    let cases: [(Vec<&str>, &str); 3] = [
        (vec!["--job-user", "root"], "as root"),
        (vec!["--job-user", "no-such-user-xyz"], "does not exist"),
        (vec!["--job-user", "nobody"], ""),
    ];
    for (args, why) in cases {
        if why.is_empty() && !Uid::current().is_root() {
            continue;
        }
        // A path with an escape sequence: the job's log shows none of it.
        let missing = dir.path().join("missing-\x1b]0;retitled\x07-script");
        let target = if why.is_empty() { &missing } else { &script };
        let out = Command::new(BIN)
            .arg("job-exec")
            .args(&args)
            .arg(target)
            .arg("build_script")
            .envs(system)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(9), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: the job ran: {out:?}");
        let why = if why.is_empty() {
            "cannot open the build_script script"
        } else {
            why
        };
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(!stderr.contains(['\x1b', '\x07']), "{args:?}: {stderr:?}");
    }
}

/// gitlab-runner aborts a stage with SIGTERM to run_exec's process group: the job ends at
/// once and the abort is reported as the job's failure (143, as a shell reports SIGTERM).
#[test]
fn sigterm_to_the_process_group_ends_the_job_and_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let code_file = dir.path().join("exit-code");
    let script = stage_script(dir.path(), "echo started\nsleep 60\necho never\n");
    let mut child = job_exec(
        &script,
        &[("BUILD_EXIT_CODE_FILE", code_file.to_str().unwrap())],
    )
    .process_group(0)
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    let started = Instant::now();
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the job outlived SIGTERM"
    );
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert_eq!(std::fs::read_to_string(&code_file).unwrap(), "143\n");
    assert!(lines.next().is_none(), "the job went on after SIGTERM");
}

/// A stand-in for the jobs' cgroup: a directory with a `cgroup.procs` gitlab-runner's user
/// (root) can write, as the agent's unit has it.
fn jobs_cgroup(dir: &Path) -> PathBuf {
    let jobs = dir.join("cgroup/unit.service/jobs");
    std::fs::create_dir_all(&jobs).unwrap();
    std::fs::write(jobs.join("cgroup.procs"), "").unwrap();
    jobs
}

#[test]
fn a_stage_moves_into_the_jobs_cgroup_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let jobs = jobs_cgroup(dir.path());
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ran = work.path().join("ran");
    // The stage sees the move done: cgroup.procs was written before its first command.
    let script = stage_script(
        dir.path(),
        &format!(
            "echo \"procs: $(cat {procs} 2>/dev/null || echo unreadable)\"; touch {ran}\n",
            procs = jobs.join("cgroup.procs").display(),
            ran = ran.display()
        ),
    );
    let out = job_exec(&script, &[])
        .arg("--cgroup")
        .arg(&jobs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(ran.exists());
    // "0": the writing process, job-exec itself, which the stage then descends from.
    assert_eq!(
        std::fs::read_to_string(jobs.join("cgroup.procs")).unwrap(),
        "0"
    );
    if job_user().is_none() {
        assert!(text(&out.stdout).contains("procs: 0"), "{out:?}");
    }
}

#[test]
fn a_stage_that_cannot_move_into_the_jobs_cgroup_never_runs() {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ran = work.path().join("ran");
    let script = stage_script(dir.path(), &format!("touch {}\n", ran.display()));
    // No such cgroup; a directory that is no cgroup (no cgroup.procs: never created); a
    // cgroup.procs that cannot be written (a directory in its place).
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    let unwritable = dir.path().join("unwritable");
    std::fs::create_dir_all(unwritable.join("cgroup.procs")).unwrap();
    for cgroup in [dir.path().join("gone/jobs"), plain.clone(), unwritable] {
        let out = job_exec(&script, &[("SYSTEM_FAILURE_EXIT_CODE", "77")])
            .arg("--cgroup")
            .arg(&cgroup)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{cgroup:?}: {stderr}");
        assert!(
            !ran.exists(),
            "{cgroup:?}: the stage ran outside the jobs' cgroup"
        );
        assert!(
            stderr.contains("the step_script stage does not run: it must run in the jobs' cgroup"),
            "{stderr}"
        );
        assert!(stderr.contains(&cgroup.display().to_string()), "{stderr}");
    }
    assert!(!plain.join("cgroup.procs").exists());
}
