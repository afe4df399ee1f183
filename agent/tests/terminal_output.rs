//! What the commands print for a person at a terminal (`status`, `check`, `drain`, `release`,
//! errors) holds nothing a terminal acts on, whatever GitLab's error bodies, its
//! `token_expires_at`, runner.json's `url` or the paths given carry: no escape sequence (a new
//! window title, a cleared screen, an OSC 8 hyperlink), no C1 control, no bidirectional
//! override, no second line forged inside a value. `status --json` stays JSON with the same
//! values.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, ResponseTemplate};

/// Terminal tricks, each in a form a value can carry.
const TITLE: &str = "\u{1b}]0;pwned-title\u{7}";
const CLEAR: &str = "\u{1b}[2J\u{1b}[H";
const LINK: &str = "\u{1b}]8;;https://evil.example/\u{1b}\\click\u{1b}]8;;\u{1b}\\";
const C1_CSI: &str = "\u{9b}31m\u{9d}0;c1-title\u{9c}";
const BIDI: &str = "\u{202e}lmth.xe\u{202c}\u{2066}x\u{2069}\u{200b}";
const FORGED_LINE: &str = "\nphase:          running\r";

/// Everything above in one value.
fn hostile(tag: &str) -> String {
    format!("{tag}{TITLE}{CLEAR}{LINK}{C1_CSI}{BIDI}{FORGED_LINE}end-{tag}")
}

/// Fails unless `out` is UTF-8 text with no character a terminal acts on (newlines between
/// lines excepted) and no line that a value forged.
fn assert_inert(what: &str, out: &[u8]) {
    let text = std::str::from_utf8(out).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"));
    for c in text.chars() {
        let bidi_or_hidden = matches!(
            c,
            '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{206f}' | '\u{feff}'
        );
        assert!(
            (c == '\n' || !c.is_control()) && !bidi_or_hidden,
            "{what}: prints {c:?} (U+{:04X}):\n{text:?}",
            c as u32
        );
    }
    assert!(
        text.lines()
            .all(|l| !l.starts_with("phase:          running")),
        "{what}: a forged line:\n{text}"
    );
}

fn run(args: &[&OsStr]) -> Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("GITLAB_RUNNER_VM_") || key == "JOURNAL_STREAM" {
            cmd.env_remove(key);
        }
    }
    cmd.output().unwrap()
}

fn status_of(state_dir: &Path, json: bool) -> Output {
    let mut args = vec![
        OsStr::new("status"),
        OsStr::new("--state-dir"),
        state_dir.as_os_str(),
    ];
    if json {
        args.push(OsStr::new("--json"));
    }
    run(&args)
}

fn both(out: &Output) -> Vec<u8> {
    [out.stdout.as_slice(), out.stderr.as_slice()].concat()
}

/// A GitLab whose verify answers `answer`, at a runner.json url whose path carries `hostile`.
async fn agent_against(answer: ResponseTemplate, url_tail: &str) -> Harness {
    let mut h = Harness::new().await;
    // The agent asks <url>/api/v4/...: whatever the path before it became on the wire.
    Mock::given(method("POST"))
        .and(path_regex("/api/v4/runners/verify$"))
        .respond_with(answer)
        .mount(&h.server)
        .await;
    Mock::given(method("DELETE"))
        .and(path_regex("/api/v4/runners/managers$"))
        .respond_with(ResponseTemplate::new(204))
        .mount(&h.server)
        .await;
    h.write_config(json!({"token": TOKEN}));
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(h.config_path()).unwrap()).unwrap();
    config["url"] = Value::from(format!("{}/{url_tail}", h.server.uri()));
    std::fs::write(h.config_path(), config.to_string()).unwrap();
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(&runner, &[]);
    h.wait_exit().await;
    h
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_gitlabs_error_body_and_the_url_inert() {
    // A JSON message (its escapes decode to the raw characters), and a body that is not
    // JSON and not UTF-8 either.
    let json_body = json!({"message": format!("403 Forbidden {}", hostile("body"))}).to_string();
    let mut raw_body = b"<h1>denied \x9b2J \xff\xfe ".to_vec();
    raw_body.extend_from_slice(hostile("raw").as_bytes());
    for (answer, tail, tag) in [
        (
            ResponseTemplate::new(403)
                .insert_header("content-type", "application/json")
                .set_body_string(json_body.clone()),
            format!("gl{TITLE}{C1_CSI}{BIDI}"),
            "end-body",
        ),
        (
            ResponseTemplate::new(401)
                .insert_header("content-type", "text/html")
                .set_body_bytes(raw_body.clone()),
            format!("x{CLEAR}{LINK}"),
            "end-raw",
        ),
    ] {
        let h = agent_against(answer, &tail).await;
        let st = h.status();
        let error = st["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains(tag), "the body reached status.json: {st}");
        // The agent's own log on stderr, as a person running it by hand reads it.
        assert_inert("the agent's stderr log", h.log().as_bytes());
        assert!(h.log().contains(tag), "{}", h.log());
        let out = status_of(&h.state_dir(), false);
        assert!(out.status.success(), "{out:?}");
        assert_inert("status", &both(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        // Still shown, only neutralised: the operator reads GitLab's message and the url.
        assert!(text.contains("last error:") && text.contains(tag), "{text}");
        assert!(
            text.contains(&format!("{:<16}http://127.0.0.1", "gitlab:")),
            "{text}"
        );
        // --json: JSON with the very same values, escaped, safe on a terminal too.
        let json_out = status_of(&h.state_dir(), true);
        assert_inert("status --json", &json_out.stdout);
        let parsed: Value = serde_json::from_slice(&json_out.stdout).unwrap();
        assert_eq!(parsed, st);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_an_unreadable_token_expiry_inert() {
    for expiry in [
        format!("2030-01-01{LINK}"),
        format!("{TITLE}{C1_CSI}"),
        format!("{BIDI}{CLEAR}"),
    ] {
        let answer = ResponseTemplate::new(200)
            .set_body_json(json!({"id": 7, "token": TOKEN, "token_expires_at": expiry}));
        let h = agent_against(answer, "").await;
        assert!(
            h.status()["token_warning"]
                .as_str()
                .is_some_and(|w| w.contains("token_expires_at")),
            "{}",
            h.log()
        );
        let out = status_of(&h.state_dir(), false);
        assert_inert("status", &both(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains("token warning:  GitLab's token_expires_at"),
            "{out:?}"
        );
        assert_inert("status --json", &status_of(&h.state_dir(), true).stdout);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hand_made_status_file_with_every_field_hostile_is_shown_inert() {
    let dir = tempfile::tempdir().unwrap();
    let v = |tag: &str| Value::from(hostile(tag));
    let status = json!({
        "phase": "holding", "since": "2026-12-01T10:00:00.000Z", "pid": 1, "boot_id": v("boot"),
        "runner": v("runner"), "system_id": v("sid"), "credential": "token",
        "gitlab_url": v("url"), "registered": true, "deregistered": false,
        "runner_started": false, "timeline": [], "last_error": v("err"),
        "hold_deadline": null, "poweroff_at": null,
        "preemption": {"platform": v("platform"), "kind": "preemption", "detail": v("detail"),
                       "received": "2026-12-01T10:00:00.000Z", "deadline": null},
        "token_expires_at": null, "token_warning": v("warning"),
    });
    std::fs::write(dir.path().join("status.json"), status.to_string()).unwrap();
    let out = status_of(dir.path(), false);
    assert!(out.status.success(), "{out:?}");
    assert_inert("status", &both(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for tag in [
        "runner", "sid", "url", "err", "platform", "detail", "warning",
    ] {
        assert!(text.contains(&format!("end-{tag}")), "{tag}: {text}");
    }
    // A status file that is not UTF-8: an error, itself inert.
    std::fs::write(
        dir.path().join("status.json"),
        b"{\"phase\": \"\x9b2J\xff\"}",
    )
    .unwrap();
    let out = status_of(dir.path(), false);
    assert!(!out.status.success());
    assert_inert("status of a file that is not UTF-8", &both(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_prints_the_url_and_its_problems_inert() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runner.json");
    for (url, ok) in [
        (
            format!("https://gitlab.example.com/{}", hostile("ok")),
            true,
        ),
        (format!("gitlab.example.com{TITLE}{C1_CSI}"), false),
        (format!("ftp://{CLEAR}{LINK}{BIDI}"), false),
    ] {
        std::fs::write(&config, json!({"url": url, "token": TOKEN}).to_string()).unwrap();
        let out = run(&[
            OsStr::new("check"),
            OsStr::new("--config"),
            config.as_os_str(),
        ]);
        assert_eq!(out.status.success(), ok, "{out:?}");
        assert_inert("check", &both(&out));
        assert!(!both(&out).is_empty());
    }
    // runner.json that is not UTF-8 (a raw 0x9B, CSI in 8-bit terminals).
    std::fs::write(&config, b"{\"url\": \"https://x\x9b2J\"}").unwrap();
    let out = run(&[
        OsStr::new("check"),
        OsStr::new("--config"),
        config.as_os_str(),
    ]);
    assert!(!out.status.success());
    assert_inert("check of a file that is not UTF-8", &both(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_and_release_name_hostile_paths_inert() {
    let dir = tempfile::tempdir().unwrap();
    // Names that carry escapes, and one that is not UTF-8 at all (a raw 0x9B).
    let names: Vec<PathBuf> = vec![
        dir.path().join(format!("state{TITLE}{CLEAR}")),
        dir.path()
            .join(format!("k{}{BIDI}", LINK.replace('/', "_"))),
        dir.path()
            .join(OsStr::from_bytes(b"raw\x9b2J\x1b]0;t\x07\xff")),
    ];
    for name in &names {
        let out = run(&[
            OsStr::new("drain"),
            OsStr::new("--state-dir"),
            name.as_os_str(),
        ]);
        assert!(!out.status.success());
        assert_inert("drain", &both(&out));
        let out = run(&[
            OsStr::new("release"),
            OsStr::new("--keep-file"),
            name.as_os_str(),
        ]);
        assert!(out.status.success(), "{out:?}");
        assert_inert("release of no file", &both(&out));
        std::fs::write(name, "").unwrap();
        let out = run(&[
            OsStr::new("release"),
            OsStr::new("--keep-file"),
            name.as_os_str(),
        ]);
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("released"));
        assert_inert("release", &both(&out));
        assert!(!name.exists());
    }
    // A status file whose phase is past running, in a directory with a hostile name.
    std::fs::create_dir(&names[0]).unwrap();
    std::fs::write(
        names[0].join("status.json"),
        json!({"phase": "powering-off", "since": "2026-12-01T10:00:00.000Z", "pid": 1,
               "boot_id": hostile("b"), "runner": null, "system_id": null, "credential": null,
               "gitlab_url": null, "registered": false, "deregistered": false,
               "runner_started": false, "timeline": [], "last_error": hostile("e")})
        .to_string(),
    )
    .unwrap();
    let out = run(&[
        OsStr::new("drain"),
        OsStr::new("--state-dir"),
        names[0].as_os_str(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to drain"));
    assert_inert("drain", &both(&out));
}
