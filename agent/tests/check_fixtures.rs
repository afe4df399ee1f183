//! `gitlab-runner-vm check` through the real binary on every runner.json under
//! `tests/fixtures/runner-json/` (the config module's unit tests read the same files): its output
//! must be the `.out` file beside, word for word, and it exits 0 exactly when it prints `ok:`.
//! Relative file names in the fixtures (`files/token`, `files/ca.pem`) are read from that
//! directory. `UPDATE_FIXTURES=1 cargo test --test check_fixtures` rewrites the `.out` files.

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_gitlab-runner-vm");

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/runner-json")
}

/// `check`'s output for one fixture, the host name (the default runner name) replaced by
/// `<hostname>`; and whether it exited 0.
fn check(name: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", name])
        .current_dir(fixtures())
        .output()
        .unwrap();
    assert!(out.stderr.is_empty(), "{name}: {out:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let text = String::from_utf8(out.stdout).unwrap().replace(
        &format!("(runner {},", host.trim_end()),
        "(runner <hostname>,",
    );
    (out.status.success(), text)
}

#[test]
fn check_prints_what_each_fixture_expects() {
    let update = std::env::var_os("UPDATE_FIXTURES").is_some();
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(names.len() > 50, "{names:?}");
    let mut wrong = Vec::new();
    for name in &names {
        let (ok, text) = check(name);
        let last = text.lines().last().unwrap_or("");
        assert_eq!(ok, last.starts_with("ok: "), "{name}: exit status\n{text}");
        let expected_file = fixtures().join(name.replace(".json", ".out"));
        if update {
            std::fs::write(&expected_file, &text).unwrap();
            continue;
        }
        let Ok(expected) = std::fs::read_to_string(&expected_file) else {
            wrong.push(format!(
                "{name}: no .out beside it (UPDATE_FIXTURES=1 writes one)"
            ));
            continue;
        };
        if text != expected {
            wrong.push(format!("{name}:\n--- expected\n{expected}--- got\n{text}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn a_glrt_token_config_with_tags_is_valid_and_warns_that_tags_are_ignored() {
    let (ok, text) = check("runner-token-with-tags.json");
    assert!(ok, "{text}");
    assert_eq!(
        text,
        "warning: $.tags: is ignored with a glrt- runner authentication token: GitLab stores it \
         with the runner; fix: set it on the runner in GitLab (Settings > CI/CD > Runners > Edit) \
         and remove it here\n\
         ok: runner-token-with-tags.json is valid (runner nixos-runner-001, token credential glrt-…xxxx, shell \
         executor, 1 job(s), url https://gitlab.example.com)\n"
    );
}

#[test]
fn a_token_file_is_read_and_never_printed_whole() {
    let (ok, text) = check("token-file.json");
    assert!(ok, "{text}");
    assert!(!text.contains("glrt-fromfile"), "{text}");
    let (ok, text) = check("token-file-empty.json");
    assert!(!ok, "{text}");
    assert!(
        text.contains("$.token_file: files/empty is empty"),
        "{text}"
    );
}

#[test]
fn a_url_with_a_password_is_refused_without_showing_it() {
    for name in [
        "url-user-and-password.json",
        "url-user.json",
        "url-user-port-path.json",
    ] {
        let (ok, text) = check(name);
        assert!(!ok, "{text}");
        assert!(!text.contains("s3cr3tpass"), "{text}");
        assert!(text.starts_with("error: $.url: "), "{text}");
    }
}
