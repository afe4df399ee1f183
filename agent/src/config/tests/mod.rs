//! Unit tests of runner.json validation, on the fixtures under `agent/tests/fixtures/runner-json/`
//! (the `check_fixtures` integration test runs the real binary on the same files).

mod connection;
mod credential;
mod keys;
mod settings_and_jobs;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// The text of `tests/fixtures/runner-json/<name>.json`.
macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/runner-json/",
            $name,
            ".json"
        ))
    };
}
pub(super) use fixture;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runner-json")
}

/// Reads the files a fixture names (`files/token`) from beside the fixtures, as `check` does
/// when run there.
fn read_beside_fixtures(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(fixtures_dir().join(path))
}

fn check(text: &str) -> Validated {
    validate(text, "host-1", &read_beside_fixtures)
}

fn only_error(text: &str) -> Problem {
    let v = check(text);
    let errors: Vec<_> = v.errors().cloned().collect();
    assert_eq!(errors.len(), 1, "expected one error, got {:#?}", v.problems);
    assert!(v.config.is_none());
    errors[0].clone()
}

#[test]
fn a_glrt_token_config_with_tags_is_valid_with_a_warning_that_tags_are_ignored() {
    let v = check(fixture!("runner-token-with-tags"));
    let config = v.config.expect("valid");
    assert_eq!(config.name, "nixos-runner-001");
    assert_eq!(config.url, "https://gitlab.example.com");
    assert_eq!(config.executor, Executor::Shell);
    assert_eq!(config.max_jobs, 1);
    assert_eq!(config.idle_timeout, Duration::from_secs(600));
    assert_eq!(config.max_lifetime, None);
    assert!(matches!(config.credential, Credential::RunnerToken(_)));
    assert_eq!(v.problems.len(), 1);
    assert_eq!(v.problems[0].severity, Severity::Warning);
    assert_eq!(v.problems[0].path, "$.tags");
}

#[test]
fn defaults_fill_name_and_executor() {
    let config = check(fixture!("defaults")).config.unwrap();
    assert_eq!(config.name, "host-1");
    assert_eq!(config.url, "http://gitlab.local");
    assert_eq!(config.executor, Executor::Shell);
    assert_eq!(config.docker, None);
    assert_eq!(config.settings, RunnerSettings::default());
    assert_eq!(config.tls_ca_file, None);
    assert_eq!(config.builds_dir, None);
    assert!(config.environment.is_empty());
}

#[test]
fn names_with_control_characters_are_refused() {
    for text in [
        fixture!("name-nul"),
        fixture!("name-newline"),
        fixture!("name-tab"),
    ] {
        let p = only_error(text);
        assert_eq!(p.path, "$.name", "{text}");
        assert!(p.message.contains("control character"), "{p}");
    }
    // The host name standing in for a missing name is held to the same rule.
    let v = validate(fixture!("defaults"), "host\n1", &read_beside_fixtures);
    assert_eq!(v.errors().next().unwrap().path, "$.name");
}

#[test]
fn durations_and_counts_beyond_what_the_runner_accepts_are_refused() {
    for (text, key) in [
        (fixture!("max-lifetime-u64-max"), "max_lifetime"),
        (fixture!("max-lifetime-above-ten-years"), "max_lifetime"),
        (fixture!("idle-timeout-above-ten-years"), "idle_timeout"),
        (fixture!("maximum-timeout-u64-max"), "maximum_timeout"),
        (fixture!("max-jobs-above-u32"), "max_jobs"),
    ] {
        let p = only_error(text);
        assert_eq!(p.path, format!("$.{key}"));
        assert!(p.message.contains("above the maximum"), "{p}");
    }
    // Durations name their unit and what the maximum is.
    assert_eq!(
        only_error(fixture!("max-lifetime-above-ten-years")).message,
        "is 315360001, above the maximum 315360000 s (ten years)"
    );
    assert_eq!(
        only_error(fixture!("max-jobs-above-u32")).message,
        "is 4294967296, above the maximum 4294967295"
    );
    let config = check(fixture!("limits-at-maximum")).config.unwrap();
    let ten_years = Duration::from_secs(MAX_SECONDS);
    assert_eq!(config.max_lifetime, Some(ten_years));
    assert_eq!(config.idle_timeout, ten_years);
    assert_eq!(config.max_jobs, u32::MAX);
}

#[test]
fn durations_and_counts_below_their_minimum_or_not_whole_are_refused() {
    for (text, path, message) in [
        (
            fixture!("max-jobs-zero"),
            "$.max_jobs",
            "is 0, below the minimum 1",
        ),
        (
            fixture!("max-jobs-string"),
            "$.max_jobs",
            "must be a whole number, not \"2\"",
        ),
        (
            fixture!("idle-timeout-negative"),
            "$.idle_timeout",
            "must be a whole number, not -1",
        ),
        (
            fixture!("max-lifetime-fraction"),
            "$.max_lifetime",
            "must be a whole number, not 1.5",
        ),
    ] {
        let p = only_error(text);
        assert_eq!((p.path.as_str(), p.message.as_str()), (path, message));
    }
}

#[test]
fn invalid_json_and_non_objects() {
    assert!(
        only_error(fixture!("invalid-json"))
            .message
            .contains("not valid JSON")
    );
    assert_eq!(only_error(fixture!("not-object")).path, "$");
}

#[test]
fn problems_never_contain_the_token() {
    let v = check(fixture!("token-in-problems"));
    assert!(v.problems.len() >= 3);
    for p in &v.problems {
        assert!(!p.to_string().contains("SECRET.SECRET"), "{p}");
    }
}

#[test]
fn problems_print_with_severity_path_message_and_fix() {
    let v = check(fixture!("docker-with-shell-executor"));
    assert_eq!(
        v.problems[0].to_string(),
        "warning: $.docker: is ignored with the shell executor; fix: set \"executor\": \"docker\", or remove the docker section"
    );
    assert!(v.config.is_some());
    assert_eq!(
        only_error(fixture!("url-missing")).to_string(),
        "error: $.url: is missing; fix: add \"url\": \"https://gitlab.example.com\" (your GitLab's address)"
    );
}
