//! The credential: which one, inline or from a file, and the runner an access token creates.

use super::*;

#[test]
fn missing_credential() {
    let p = only_error(fixture!("credential-missing"));
    assert_eq!(p.path, "$.token");
    assert!(p.fix.contains("glrt-"));
    // An empty token is reported as such, and as no credential.
    let v = check(fixture!("token-empty"));
    let messages: Vec<_> = v
        .errors()
        .map(|p| (p.path.as_str(), p.message.as_str()))
        .collect();
    assert_eq!(
        messages,
        [
            ("$.token", "is empty"),
            ("$.token", "no credential is given")
        ]
    );
}

#[test]
fn two_credentials_are_an_error() {
    let p = only_error(fixture!("credentials-two"));
    assert_eq!(p.path, "$");
    assert!(p.message.contains("token, registration_token"), "{p}");
    // A credential file counts even when it cannot be read.
    let v = check(fixture!("credentials-three-with-files"));
    let e: Vec<_> = v.errors().collect();
    assert_eq!(e.len(), 2, "{e:#?}");
    assert_eq!(e[0].path, "$.access_token_file");
    assert_eq!(
        e[1].message,
        "3 credentials are given (token, registration_token, access_token)"
    );
}

#[test]
fn registration_token_in_token_is_caught() {
    let p = only_error(fixture!("token-is-registration-token"));
    assert_eq!(p.path, "$.token");
    assert!(p.fix.contains("registration_token"));
}

#[test]
fn access_token_needs_a_runner_type_and_its_id() {
    let ok = check(fixture!("access-token-project"));
    assert!(matches!(
        ok.config.unwrap().credential,
        Credential::AccessToken {
            runner_type: RunnerType::Project(42),
            ..
        }
    ));
    let group = check(fixture!("access-token-group")).config.unwrap();
    assert!(matches!(
        group.credential,
        Credential::AccessToken {
            runner_type: RunnerType::Group(7),
            ..
        }
    ));
    for (text, path) in [
        (fixture!("access-token-no-runner-type"), "$.runner_type"),
        (fixture!("access-token-group-no-id"), "$.group_id"),
        (fixture!("access-token-project-no-id"), "$.project_id"),
        (fixture!("access-token-project-id-string"), "$.project_id"),
        (fixture!("access-token-group-id-zero"), "$.group_id"),
        (
            fixture!("access-token-unknown-runner-type"),
            "$.runner_type",
        ),
        (fixture!("access-token-runner-type-number"), "$.runner_type"),
        (fixture!("token-with-runner-type"), "$.runner_type"),
    ] {
        assert_eq!(only_error(text).path, path, "{text}");
    }
}

#[test]
fn token_file_is_read_and_trimmed() {
    let read = |p: &Path| -> io::Result<String> {
        assert_eq!(p, Path::new("files/token"));
        read_beside_fixtures(p)
    };
    let v = validate(fixture!("token-file"), "h", &read);
    assert_eq!(
        v.config.unwrap().credential.secret().expose(),
        "glrt-fromfile"
    );
    let config = check(fixture!("access-token-instance")).config.unwrap();
    assert_eq!(
        config.credential,
        Credential::AccessToken {
            token: crate::secret::Secret::new("glrt-fromfile"),
            runner_type: RunnerType::Instance
        }
    );
}

#[test]
fn missing_or_empty_token_file_and_both_forms() {
    let p = only_error(fixture!("token-file-missing"));
    assert_eq!(p.path, "$.token_file");
    assert!(p.message.contains("/nope"));
    let p = only_error(fixture!("token-file-empty"));
    assert_eq!(
        (p.path.as_str(), p.message.as_str()),
        ("$.token_file", "files/empty is empty")
    );
    let p = only_error(fixture!("token-and-token-file"));
    assert_eq!(p.path, "$.token_file");
    assert!(p.message.contains("both"));
}

#[test]
fn credential_kinds_keep_their_names_in_status_json() {
    let names: Vec<_> = CredentialKind::ALL
        .iter()
        .map(|k| serde_json::to_string(k).unwrap())
        .collect();
    assert_eq!(
        names,
        ["\"token\"", "\"registration_token\"", "\"access_token\""]
    );
    for kind in CredentialKind::ALL {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{kind}\""));
        assert_eq!(serde_json::from_str::<CredentialKind>(&json).unwrap(), kind);
    }
    let kinds: Vec<_> = [
        fixture!("defaults"),
        fixture!("registration-token-with-settings"),
        fixture!("access-token-project"),
    ]
    .into_iter()
    .map(|text| check(text).config.unwrap().credential.kind())
    .collect();
    assert_eq!(kinds, CredentialKind::ALL);
}

#[test]
fn runner_types_have_gitlabs_names() {
    let names: Vec<_> = [
        RunnerType::Instance,
        RunnerType::Group(1),
        RunnerType::Project(2),
    ]
    .iter()
    .map(RunnerType::api_name)
    .collect();
    assert_eq!(names, ["instance_type", "group_type", "project_type"]);
}
