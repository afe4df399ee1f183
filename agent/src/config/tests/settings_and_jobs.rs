//! Runner settings GitLab stores, and how jobs run: executor, docker, builds_dir, environment.

use super::*;

#[test]
fn legacy_registration_keeps_runner_settings() {
    let config = check(fixture!("registration-token-with-settings"))
        .config
        .unwrap();
    assert!(matches!(
        config.credential,
        Credential::RegistrationToken(_)
    ));
    assert_eq!(
        config.settings,
        RunnerSettings {
            tags: vec!["a".into()],
            run_untagged: Some(false),
            locked: Some(true),
            access_level: Some(AccessLevel::RefProtected),
            maximum_timeout: Some(Duration::from_secs(3600)),
        }
    );
    let config = check(fixture!("access-token-group")).config.unwrap();
    assert_eq!(
        config.settings.access_level,
        Some(AccessLevel::NotProtected)
    );
    assert_eq!(config.settings.locked, Some(false));
    assert_eq!(
        config.settings.maximum_timeout,
        Some(Duration::from_secs(600))
    );
}

#[test]
fn type_errors_name_the_path() {
    for (text, path) in [
        (fixture!("tags-string"), "$.tags"),
        (fixture!("executor-unknown"), "$.executor"),
        (fixture!("environment-not-key-value"), "$.environment[0]"),
        (fixture!("builds-dir-relative"), "$.builds_dir"),
        (
            fixture!("maximum-timeout-below-ten-minutes"),
            "$.maximum_timeout",
        ),
        (fixture!("run-untagged-false-no-tags"), "$.run_untagged"),
        (fixture!("access-level-unknown"), "$.access_level"),
        (fixture!("environment-string"), "$.environment"),
        (fixture!("docker-not-object"), "$.docker"),
    ] {
        assert_eq!(only_error(text).path, path, "{text}");
    }
}

#[test]
fn every_wrong_value_is_reported_at_once() {
    let v = check(fixture!("wrong-types"));
    let paths: Vec<_> = v.errors().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "$.name",
            "$.tags",
            "$.run_untagged",
            "$.locked",
            "$.access_level",
            "$.idle_timeout",
            "$.builds_dir"
        ]
    );
}

#[test]
fn list_entries_are_named_by_their_own_index() {
    let v = check(fixture!("tags-wrong-entries"));
    let paths: Vec<_> = v.errors().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["$.tags[1]", "$.tags[2]", "$.tags[3]", "$.tags[0]"]);
    // An entry after a left-out one keeps its place in the list.
    let v = check(fixture!("environment-entry-after-a-bad-one"));
    let paths: Vec<_> = v.errors().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, ["$.environment[0]", "$.environment[2]"]);
    let v = check(fixture!("environment-bad-names"));
    let paths: Vec<_> = v.errors().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "$.environment[4]",
            "$.environment[0]",
            "$.environment[1]",
            "$.environment[2]"
        ]
    );
}

#[test]
fn builds_dir_and_environment_are_kept() {
    let config = check(fixture!("tls-ca-file-pem")).config.unwrap();
    assert_eq!(
        config.builds_dir.as_deref(),
        Some("/var/lib/scratch/builds")
    );
    assert_eq!(config.environment, ["FOO=bar", "_X1=a=b"]);
}

#[test]
fn docker_executor_needs_an_image() {
    assert_eq!(only_error(fixture!("docker-missing")).path, "$.docker");
    let config = check(fixture!("docker-full")).config.unwrap();
    assert_eq!(config.executor, Executor::Docker);
    assert_eq!(
        config.docker.unwrap(),
        DockerSettings {
            image: "alpine:3.20".into(),
            privileged: true,
            volumes: vec!["/cache".into()]
        }
    );
    let v = check(fixture!("docker-shell-no-image"));
    let problems: Vec<_> = v
        .problems
        .iter()
        .map(|p| (p.severity, p.path.as_str()))
        .collect();
    assert_eq!(
        problems,
        [
            (Severity::Warning, "$.docker"),
            (Severity::Error, "$.docker.image"),
            (Severity::Error, "$.docker.volumes[1]"),
        ]
    );
}

#[test]
fn docker_section_with_the_shell_executor_is_ignored_with_a_warning() {
    let v = check(fixture!("docker-with-shell-executor"));
    let config = v.config.unwrap();
    assert_eq!(config.executor, Executor::Shell);
    assert_eq!(v.problems.len(), 1);
    assert_eq!(v.problems[0].severity, Severity::Warning);
    let v = check(fixture!("docker-wrong-types"));
    let paths: Vec<_> = v.errors().map(|p| p.path.as_str()).collect();
    assert_eq!(
        paths,
        ["$.docker.image", "$.docker.privileged", "$.docker.volumes"]
    );
}

/// A privileged container or Docker's socket makes every job root in the VM, one step from the
/// runner token: valid, but said where it is set (`check` and the journal).
#[test]
fn root_in_the_vm_from_docker_settings_is_warned_where_it_is_set() {
    let v = check(fixture!("docker-root-in-the-vm"));
    let config = v.config.unwrap();
    assert!(config.docker.unwrap().privileged);
    let warned: Vec<_> = v
        .problems
        .iter()
        .map(|p| (p.severity, p.path.as_str()))
        .collect();
    assert_eq!(
        warned,
        [
            (Severity::Warning, "$.docker.privileged"),
            (Severity::Warning, "$.docker.volumes[1]"),
            (Severity::Warning, "$.docker.volumes[2]"),
        ]
    );
    assert!(
        v.problems[0].message.contains("runner token"),
        "{}",
        v.problems[0]
    );
    assert!(
        v.problems[1].message.contains("Docker's socket"),
        "{}",
        v.problems[1]
    );
    // Neither without them.
    let plain = check(
        r#"{"url": "https://g.example.com", "token": "glrt-a", "executor": "docker", "docker": {"image": "alpine", "privileged": false, "volumes": ["/cache", "/srv/sock:/x"]}}"#,
    );
    assert!(plain.problems.is_empty(), "{:?}", plain.problems);
}

#[test]
fn docker_socket_volumes_are_told_from_others() {
    use crate::config::jobs::mounts_the_docker_socket as socket;
    for yes in [
        "/var/run/docker.sock:/var/run/docker.sock",
        "/run/docker.sock:/d.sock:ro",
        "/run:/r",
        "/var/run/:/r",
        "/:/host",
        "/run/containerd/containerd.sock:/c",
    ] {
        assert!(socket(yes), "{yes}");
    }
    for no in [
        "/cache",
        "/var/run",
        "/srv/run:/run",
        "/home/x/docker.socks:/y",
        "/run/user:/u",
    ] {
        assert!(!socket(no), "{no}");
    }
}

/// A volume that reaches config.toml or runner.json hands every job the token, root or not.
#[test]
fn volumes_that_hold_the_token_are_told() {
    use crate::config::jobs::host_secret_in as secret;
    let state = Some("config.toml with the runner token");
    assert_eq!(secret("/run/gitlab-runner-vm:/x"), state);
    assert_eq!(secret("/run/gitlab-runner-vm/config.toml:/c:ro"), state);
    assert_eq!(secret("/run:/r"), state);
    assert_eq!(secret("/var/run:/r"), state);
    assert_eq!(secret("/var/run/gitlab-runner-vm/:/r"), state);
    assert_eq!(secret("/:/host"), state);
    assert_eq!(secret("/runner-info:/ri"), Some("runner.json"));
    assert_eq!(secret("/run/runner-info/:/ri"), Some("runner.json"));
    assert_eq!(
        secret("/etc:/etc-of-the-vm"),
        Some("the instance's user-data (runner.json)")
    );
    for no in [
        "/cache",
        "cache:/run/gitlab-runner-vm",
        "/srv/cache:/run/gitlab-runner-vm",
        "/run/user:/u",
        "/runner-information:/x",
        "/var/runner:/x",
        "/var/run/docker.sock:/var/run/docker.sock",
    ] {
        assert_eq!(secret(no), None, "{no}");
    }
    let v = check(
        r#"{"url": "https://g.example.com", "token": "glrt-a", "executor": "docker", "docker": {"image": "alpine", "volumes": ["/cache", "/run/gitlab-runner-vm:/state:ro"]}}"#,
    );
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert_eq!(v.problems[0].path, "$.docker.volumes[1]");
    assert!(
        v.problems[0].message.contains("runner token"),
        "{}",
        v.problems[0]
    );
}
