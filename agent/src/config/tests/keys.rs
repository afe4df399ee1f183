//! The table of known keys: unknown keys, suggestions, and that every key is read as its kind.

use serde_json::{Value, json};

use super::super::keys::{self, Kind, Use};
use super::*;

#[test]
fn unknown_key_suggests_the_nearest_known_key() {
    let p = only_error(fixture!("unknown-key"));
    assert_eq!(p.path, "$.exector");
    assert_eq!(p.fix, "did you mean \"executor\"?");
}

#[test]
fn a_key_near_none_lists_them_all_in_table_order() {
    let p = only_error(fixture!("unknown-key-far"));
    assert_eq!(p.path, "$.zzzzzz");
    assert_eq!(
        p.fix,
        "remove it; known keys are: name, url, token, token_file, registration_token, \
         registration_token_file, access_token, access_token_file, runner_type, group_id, \
         project_id, executor, tags, run_untagged, locked, access_level, maximum_timeout, docker, \
         max_jobs, idle_timeout, max_lifetime, tls_ca_file, builds_dir, environment, cache, \
         registry_mirrors, nix_substituters, nix_trusted_public_keys"
    );
    let p = only_error(fixture!("docker-unknown-key-far"));
    assert_eq!(
        (p.path.as_str(), p.fix.as_str()),
        (
            "$.docker.zzzzzz",
            "remove it; known keys are: image, privileged, volumes"
        )
    );
}

#[test]
fn unknown_docker_key_suggests_too() {
    let v = check(fixture!("docker-unknown-key"));
    let e: Vec<_> = v.errors().collect();
    assert_eq!(e.len(), 2, "{:#?}", v.problems);
    assert_eq!(e[0].path, "$.docker.imgae");
    assert!(e[0].fix.contains("\"image\""));
    assert_eq!(e[1].path, "$.docker.image");
    let v = check(fixture!("docker-unknown-key-privileged"));
    let e: Vec<_> = v.errors().collect();
    assert_eq!(e[0].path, "$.docker.privilegd");
    assert!(e[0].fix.contains("\"privileged\""));
}

#[test]
fn the_settings_gitlab_stores_are_the_ones_a_glrt_token_ignores() {
    let names: Vec<_> = keys::used_for(Use::GitLab).map(|k| k.name).collect();
    assert_eq!(
        names,
        [
            "tags",
            "run_untagged",
            "locked",
            "access_level",
            "maximum_timeout"
        ]
    );
    let v = check(fixture!("token-with-gitlab-side-settings"));
    assert!(v.config.is_some());
    let warned: Vec<_> = v.problems.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(
        warned,
        [
            "$.tags",
            "$.run_untagged",
            "$.locked",
            "$.access_level",
            "$.maximum_timeout"
        ]
    );
    let names: Vec<_> = keys::used_for(Use::AccessToken).map(|k| k.name).collect();
    assert_eq!(names, ["runner_type", "group_id", "project_id"]);
}

/// A value that is not of `kind`.
fn not_a(kind: Kind) -> Value {
    match kind {
        Kind::Text | Kind::TextList | Kind::Object => json!(5),
        Kind::Integer | Kind::Boolean => json!("x"),
    }
}

#[test]
fn every_known_key_is_read_as_its_kind() {
    let base = json!({"url": "https://g.example.com", "access_token": "glpat-abc",
        "runner_type": "instance_type", "executor": "docker", "docker": {"image": "a"}});
    let mut cases: Vec<(Value, String)> = Vec::new();
    for key in keys::TOP_LEVEL {
        let mut doc = base.clone();
        doc[key.name] = not_a(key.kind);
        cases.push((doc, format!("$.{}", key.name)));
    }
    for key in keys::DOCKER_SECTION {
        let mut doc = base.clone();
        doc["docker"][key.name] = not_a(key.kind);
        cases.push((doc, format!("$.docker.{}", key.name)));
    }
    for key in keys::CACHE_SECTION {
        let mut doc = base.clone();
        doc["cache"] = json!({"Type": "s3", "s3": {"BucketName": "b"}});
        doc["cache"][key.name] = not_a(key.kind);
        cases.push((doc, format!("$.cache.{}", key.name)));
    }
    for (doc, path) in cases {
        let v = check(&doc.to_string());
        assert!(
            v.errors().any(|p| p.path == path),
            "{doc}: no error at {path}: {:#?}",
            v.problems
        );
    }
}

#[test]
fn the_readme_documents_every_key() {
    let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
    let sections = [keys::TOP_LEVEL, keys::DOCKER_SECTION, keys::CACHE_SECTION];
    for key in sections.into_iter().flatten() {
        assert!(
            readme.contains(&format!("`{}`", key.name)),
            "README.md does not mention `{}`",
            key.name
        );
    }
}

#[test]
fn a_key_in_another_spelling_is_suggested_as_gitlab_runner_spells_it() {
    for (written, meant) in [
        ("bucket_name", "BucketName"),
        ("bucketname", "BucketName"),
        ("server-address", "ServerAddress"),
        ("AUTHENTICATIONTYPE", "AuthenticationType"),
    ] {
        let doc = json!({"url": "https://g.example.com", "token": "glrt-abc",
            "cache": {"Type": "s3", "s3": {"BucketName": "b", written: "x"}}});
        let v = check(&doc.to_string());
        let e: Vec<_> = v.errors().collect();
        assert_eq!(e.len(), 1, "{written}: {:#?}", v.problems);
        assert_eq!(e[0].path, format!("$.cache.s3.{written}"));
        assert_eq!(e[0].fix, format!("did you mean \"{meant}\"?"));
    }
}
