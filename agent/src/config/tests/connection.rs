//! `url` and `tls_ca_file`.

use super::*;

#[test]
fn trailing_ci_is_stripped_like_gitlab_runner_does() {
    let config = check(fixture!("url-trailing-ci")).config.unwrap();
    assert_eq!(config.url, "https://g.example.com");
}

#[test]
fn url_without_scheme_is_an_error_with_the_fixed_url() {
    let p = only_error(fixture!("url-no-scheme"));
    assert_eq!(p.path, "$.url");
    assert!(p.fix.contains("https://gitlab.example.com"), "{p}");
}

#[test]
fn url_with_another_scheme_or_no_host_or_api_path() {
    for (text, message) in [
        (fixture!("url-ftp"), "scheme \"ftp\" is not http or https"),
        (fixture!("url-no-host"), "\"https://\" has no host name"),
        (fixture!("url-api-v4"), "ends in /api/v4"),
        (fixture!("url-number"), "must be a string, not a number"),
        (fixture!("url-empty"), "is empty"),
    ] {
        let p = only_error(text);
        assert_eq!((p.path.as_str(), p.message.as_str()), ("$.url", message));
    }
    assert_eq!(
        only_error(fixture!("url-api-v4-slash")).fix,
        "give the GitLab base URL: \"https://g.example.com/gitlab\""
    );
}

#[test]
fn url_with_credentials_is_refused_without_echoing_them() {
    for text in [
        fixture!("url-user-and-password"),
        fixture!("url-user"),
        fixture!("url-user-port-path"),
    ] {
        let p = only_error(text);
        assert_eq!(p.path, "$.url");
        let shown = p.to_string();
        assert!(!shown.contains("s3cr3tpass"), "{shown}");
        assert!(shown.contains("g.example.com"), "{shown}");
    }
    // An @ in the path is not a credential.
    let config = check(fixture!("url-at-in-path")).config.unwrap();
    assert_eq!(config.url, "https://g.example.com/~team@x");
}

#[test]
fn missing_url() {
    assert_eq!(only_error(fixture!("url-missing")).path, "$.url");
}

#[test]
fn tls_ca_file_must_hold_pem() {
    let p = only_error(fixture!("tls-ca-file-not-pem"));
    assert_eq!(p.path, "$.tls_ca_file");
    assert_eq!(p.message, "files/not-a-cert holds no PEM certificate");
    let p = only_error(fixture!("tls-ca-file-missing"));
    assert_eq!(p.path, "$.tls_ca_file");
    assert!(p.message.starts_with("cannot read /nope/ca.pem: "), "{p}");
    let config = check(fixture!("tls-ca-file-pem")).config.unwrap();
    assert_eq!(config.tls_ca_file, Some(PathBuf::from("files/ca.pem")));
}
