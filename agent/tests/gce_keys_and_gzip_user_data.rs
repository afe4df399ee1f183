//! Through the real binary, against fake metadata services (wiremock on 127.0.0.1,
//! `--metadata-url`): GCE SSH keys as Google's guest agent takes them (`google-ssh` expiry in
//! every form, the legacy `sshKeys`, `enable-oslogin`), and gzip-compressed user-data on AWS.

mod common;

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const AWS_TOKEN: &str = "AQAEAFakeSessionToken==";

/// A public key whose key data names it, so the test can tell which ones were written.
fn key(name: &str) -> String {
    format!("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5{name:0<24}")
}

/// A fake GCE metadata service answering `attributes` (path under `/computeMetadata/v1/`,
/// value) and 404 (with `Metadata-Flavor: Google`, as GCE does) for every other path.
async fn fake_gce(attributes: &[(&str, String)]) -> MockServer {
    let server = MockServer::start().await;
    for (p, value) in attributes {
        Mock::given(method("GET"))
            .and(path(format!("/computeMetadata/v1/{p}")))
            .and(header("metadata-flavor", "Google"))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("metadata-flavor", "Google")
                    .set_body_string(value.clone()),
            )
            .mount(&server)
            .await;
    }
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).insert_header("metadata-flavor", "Google"))
        .mount(&server)
        .await;
    server
}

/// `gitlab-runner-vm ssh-keys --user runner` against the fake GCE; the file's lines (None when
/// no file was written) and stderr.
fn ssh_keys_for_runner(server: &MockServer, keys_dir: &Path) -> (Option<Vec<String>>, String) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["ssh-keys", "--user", "runner", "--config-source", "gce"])
        .arg("--metadata-url")
        .arg(server.uri())
        .arg("--authorized-keys-dir")
        .arg(keys_dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("GITLAB_RUNNER_VM_") || name == "JOURNAL_STREAM" {
            cmd.env_remove(name);
        }
    }
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let lines = std::fs::read_to_string(keys_dir.join("runner"))
        .ok()
        .map(|text| text.lines().map(str::to_owned).collect());
    (lines, stderr)
}

/// `t` as `2026-12-06T07:30:00` (UTC, no zone), to which a test appends the zone it writes.
fn civil_utc(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .trim_end_matches('Z')
        .to_owned()
}

fn google_ssh(expire_on: &str) -> String {
    format!(" google-ssh {{\"userName\":\"ops@example.com\",\"expireOn\":\"{expire_on}\"}}")
}

#[tokio::test(flavor = "multi_thread")]
async fn gce_keys_expire_as_googles_guest_agent_decides() {
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let past = civil_utc(now - hour);
    let future = civil_utc(now + hour);
    // The same instants, written as UTC+05:30 and UTC-03:00 local times.
    let shifted = |t: SystemTime, east: Duration, west: bool| {
        civil_utc(if west { t - east } else { t + east })
    };
    let ist = Duration::from_secs(5 * 3600 + 1800);
    let brt = Duration::from_secs(3 * 3600);
    // (name, comment): names starting with "keep" must be written, "drop" must not.
    let cases: Vec<(&str, String)> = vec![
        ("keepnone", " ops@laptop".into()),
        ("keepplus0000", google_ssh(&format!("{future}+0000"))),
        ("keepz", google_ssh(&format!("{future}Z"))),
        ("keepcolon", google_ssh(&format!("{future}+00:00"))),
        (
            "keepist",
            google_ssh(&format!("{}+05:30", shifted(now + hour, ist, false))),
        ),
        (
            "keepbrt",
            google_ssh(&format!("{}-0300", shifted(now + hour, brt, true))),
        ),
        ("keepfraction", google_ssh(&format!("{future}.250Z"))),
        ("keepfar", google_ssh("2999-12-31T23:59:59+0000")),
        // Google's format puts google-ssh at the comment's start; elsewhere it is just text.
        (
            "keepmidcomment",
            format!(" ops{}", google_ssh("2020-04-23T12:34:56+0000")),
        ),
        ("dropplus0000", google_ssh(&format!("{past}+0000"))),
        ("dropz", google_ssh(&format!("{past}Z"))),
        ("dropcolon", google_ssh(&format!("{past}-00:00"))),
        (
            "dropist",
            google_ssh(&format!("{}+05:30", shifted(now - hour, ist, false))),
        ),
        // An hour ahead in UTC, but written as a local time west of it that is an hour behind.
        ("dropbrt", google_ssh(&format!("{future}+0200"))),
        ("dropfar", google_ssh("1970-01-01T00:00:00+0000")),
        ("drop2020", google_ssh("2020-04-23T12:34:56+0000")),
        // Unreadable dates: the guest agent refuses the key, even a 2020 one in another form.
        ("dropspace", google_ssh("2020-04-23 12:34:56")),
        ("dropnozone", google_ssh(&future)),
        ("drophttpdate", google_ssh("Thu, 23 Apr 2099 12:34:56 GMT")),
        ("dropdateonly", google_ssh("2099-04-23")),
        ("dropgarbage", google_ssh("\u{1b}]0;pwned\u{7}")),
        ("dropempty", google_ssh("")),
        ("dropbare", " google-ssh".into()),
        ("dropnotjson", " google-ssh {expireOn: 2099}".into()),
        ("dropnumber", " google-ssh {\"expireOn\":4102444800}".into()),
        (
            "dropnoexpiry",
            " google-ssh {\"userName\":\"ops@example.com\"}".into(),
        ),
    ];
    let value: String = cases
        .iter()
        .map(|(name, comment)| format!("runner:{}{comment}\n", key(name)))
        .collect();
    let server = fake_gce(&[("instance/attributes/ssh-keys", value)]).await;
    let dir = tempfile::tempdir().unwrap();
    let (lines, stderr) = ssh_keys_for_runner(&server, &dir.path().join("keys"));
    let lines = lines.expect("a file is written");
    for (name, comment) in &cases {
        let written = lines.iter().any(|l| l.starts_with(&key(name)));
        assert_eq!(
            written,
            name.starts_with("keep"),
            "{name} ({comment:?}); written: {lines:#?}\n{stderr}"
        );
    }
    assert_eq!(
        stderr.matches("warning: skipped").count(),
        cases.iter().filter(|(n, _)| n.starts_with("drop")).count(),
        "{stderr}"
    );
    assert!(stderr.contains("expired (google-ssh expireOn)"), "{stderr}");
    assert!(
        stderr.contains("not a date Google's guest agent reads"),
        "{stderr}"
    );
    // Nothing of a refused line is echoed (the terminal escape above, say).
    assert!(!stderr.contains('\u{1b}'), "{stderr:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gce_legacy_ssh_keys_count_and_block_project_keys() {
    let instance = (
        "instance/attributes/ssh-keys",
        format!("runner:{}\n", key("inst")),
    );
    let project = (
        "project/attributes/ssh-keys",
        format!("runner:{}\n", key("proj")),
    );
    let project_legacy = (
        "project/attributes/sshKeys",
        format!("runner:{}\nalice:{}\n", key("projlegacy"), key("alice")),
    );
    let dir = tempfile::tempdir().unwrap();

    // The project's legacy sshKeys count beside its ssh-keys.
    let server = fake_gce(&[instance.clone(), project.clone(), project_legacy.clone()]).await;
    let (lines, _) = ssh_keys_for_runner(&server, &dir.path().join("a"));
    assert_eq!(
        lines.unwrap(),
        vec![key("inst"), key("proj"), key("projlegacy")]
    );

    // An instance's legacy sshKeys count, and block the project's keys (the guest agent).
    let instance_legacy = (
        "instance/attributes/sshKeys",
        format!(
            "runner:{}{}\n",
            key("instlegacy"),
            google_ssh("2999-01-01T00:00:00Z")
        ),
    );
    let server = fake_gce(&[instance, instance_legacy, project, project_legacy]).await;
    let (lines, stderr) = ssh_keys_for_runner(&server, &dir.path().join("b"));
    let lines = lines.unwrap();
    assert_eq!(lines.len(), 2, "{lines:#?}\n{stderr}");
    assert_eq!(lines[0], key("inst"));
    assert!(lines[1].starts_with(&key("instlegacy")), "{lines:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gce_keys_are_refused_where_os_login_is_required() {
    let keys = [
        (
            "instance/attributes/ssh-keys",
            format!("runner:{}\n", key("inst")),
        ),
        (
            "project/attributes/ssh-keys",
            format!("runner:{}\n", key("proj")),
        ),
    ];
    // (instance enable-oslogin, project enable-oslogin, refused)
    let cases = [
        (None, Some("TRUE"), true),
        (Some("true"), None, true),
        (Some("1"), Some("FALSE"), true),
        (None, Some("True"), true),
        (Some("FALSE"), Some("TRUE"), false),
        (Some("yes"), Some("TRUE"), true),
        (Some("yes"), None, false),
        (None, Some("false"), false),
    ];
    for (instance, project, refused) in cases {
        let mut attributes = keys.to_vec();
        if let Some(v) = instance {
            attributes.push(("instance/attributes/enable-oslogin", v.into()));
        }
        if let Some(v) = project {
            attributes.push(("project/attributes/enable-oslogin", v.into()));
        }
        let server = fake_gce(&attributes).await;
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        // A file of an earlier run must not stay usable either.
        std::fs::create_dir_all(&keys_dir).unwrap();
        std::fs::write(keys_dir.join("runner"), format!("{}\n", key("stale"))).unwrap();
        let (lines, stderr) = ssh_keys_for_runner(&server, &keys_dir);
        let lines = lines.unwrap();
        let case = format!("instance {instance:?}, project {project:?}: {lines:#?}\n{stderr}");
        if refused {
            assert!(lines.is_empty(), "{case}");
            assert!(stderr.contains("enable-oslogin"), "{case}");
            assert!(stderr.contains("OS Login is required"), "{case}");
            // No key was asked for.
            let asked = server.received_requests().await.unwrap();
            assert!(
                asked.iter().all(|r| !r.url.path().ends_with("ssh-keys")),
                "{case}"
            );
        } else {
            assert_eq!(lines, vec![key("inst"), key("proj")], "{case}");
            assert!(!stderr.contains("OS Login"), "{case}");
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// A fake AWS IMDS serving `user_data` bytes behind an IMDSv2 token.
async fn fake_aws(user_data: Vec<u8>) -> MockServer {
    let imds = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .respond_with(ResponseTemplate::new(200).set_body_string(AWS_TOKEN))
        .mount(&imds)
        .await;
    Mock::given(method("GET"))
        .and(path("/latest/user-data"))
        .and(header("x-aws-ec2-metadata-token", AWS_TOKEN))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(user_data))
        .mount(&imds)
        .await;
    imds
}

#[tokio::test(flavor = "multi_thread")]
async fn gzip_compressed_aws_user_data_is_decompressed() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let runner_json = json!({"name": "vm-gz", "url": h.server.uri(), "token": TOKEN}).to_string();
    let imds = fake_aws(gzip(runner_json.as_bytes())).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = imds.uri();
    h.start(&runner, &["--config-source", "aws", "--metadata-url", &url]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.powered_off());
    assert_eq!(
        std::fs::read_to_string(h.config_path()).unwrap(),
        runner_json,
        "runner.json is written decompressed"
    );
    assert!(!h.all_output().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gzip_bomb_or_broken_gzip_as_user_data_is_refused_with_its_reason() {
    // 64 MiB of JSON white space before an object, in 64 gzip members of 1 MiB each (a
    // decoder reads every member, as cloud-init's does): about 64 KiB on the wire.
    let mut bomb = gzip(&vec![b' '; 1 << 20]).repeat(64);
    bomb.extend(gzip(b"{\"url\": \"https://gitlab.example.com\"}"));
    assert!(bomb.len() < 128 << 10, "{}", bomb.len());
    let whole = gzip(b"{\"url\": \"https://gitlab.example.com\"}");
    let cases = [
        (bomb, "decompress to more than 1024 KiB"),
        (whole[..whole.len() - 9].to_vec(), "cannot be decompressed"),
        (gzip(&whole), "compressed twice"),
        (gzip(b"#!/bin/sh\necho hi\n"), "a script"),
    ];
    for (user_data, reason) in cases {
        let mut h = Harness::new().await;
        let imds = fake_aws(user_data).await;
        let runner = h.write_fake_runner(FakeRunner::default());
        let url = imds.uri();
        h.start(&runner, &["--config-source", "aws", "--metadata-url", &url]);
        h.wait_exit().await;
        let st = h.status();
        let error = st["last_error"].as_str().unwrap_or_default().to_owned();
        assert!(error.contains("is not runner.json"), "{reason}: {error}");
        assert!(error.contains(reason), "{reason}: {error}");
        assert!(error.contains("gzip-compressed once"), "{reason}: {error}");
        assert!(h.runner_invocations().is_empty());
        assert!(!h.config_path().exists(), "nothing written");
    }
}

/// A gitlab-runner whose job takes 30 s: SIGQUIT is recorded and the job goes on, SIGTERM is
/// recorded and aborts it (as in tests/preemption.rs).
fn write_runner(h: &Harness) -> std::path::PathBuf {
    let dir = h.dir.path().display();
    let script = format!(
        r#"#!/bin/sh
trap 'echo QUIT >> {dir}/runner-signals' QUIT
trap 'echo TERM >> {dir}/runner-signals; kill $job 2>/dev/null; exit 1' TERM
echo "$*" >> {dir}/runner-invocations
sleep 30 &
job=$!
echo started > {dir}/runner-started
while kill -0 $job 2>/dev/null; do wait $job; done
exit 0
"#
    );
    h.write_script("gitlab-runner", &script)
}

/// AWS writes its notice times in UTC, but a time with an offset names the same instant: read
/// through `timestamp`, not as "not a notice" (humantime read UTC only).
#[tokio::test(flavor = "multi_thread")]
async fn an_aws_spot_time_with_an_offset_is_read_at_its_instant() {
    const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
    let east = Duration::from_secs(5 * 3600 + 1800);
    let west = Duration::from_secs(8 * 3600);
    // How the instant 10 s from now is written.
    let write = |form: &str, t: SystemTime| match form {
        "+05:30" => format!("{}+05:30", civil_utc(t + east)),
        "-0800" => format!("{}-0800", civil_utc(t - west)),
        _ => civil_utc(t),
    };
    for form in ["+05:30", "-0800", "no zone"] {
        let mut h = Harness::new().await;
        h.prepare_glrt(json!({})).await;
        let meta = MockServer::start().await;
        Mock::given(method("PUT"))
            .and(path("/latest/api/token"))
            .respond_with(ResponseTemplate::new(200).set_body_string(AWS_TOKEN))
            .mount(&meta)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404))
            .with_priority(10)
            .mount(&meta)
            .await;
        let runner = write_runner(&h);
        let url = meta.uri();
        h.start(
            &runner,
            &[
                "--watch-preemption",
                "on",
                "--metadata-url",
                &url,
                "--config-source",
                "aws",
            ],
        );
        h.wait_until("the job", |h| h.read("runner-started").is_some())
            .await;
        let at = SystemTime::now() + Duration::from_secs(10);
        let time = write(form, at);
        Mock::given(method("GET"))
            .and(path(INSTANCE_ACTION))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_string(format!(r#"{{"action": "terminate", "time": "{time}"}}"#)),
            )
            .with_priority(1)
            .mount(&meta)
            .await;
        assert!(h.wait_exit().await.success(), "{form}: {}", h.log());
        assert_eq!(h.runner_signals(), "QUIT\nTERM\n", "{form}: {}", h.log());
        assert!(h.powered_off());
        let st = h.status();
        assert_eq!(st["preemption"]["kind"], "spot-interruption", "{form}");
        assert_eq!(
            st["preemption"]["detail"],
            format!("terminate at {}.000Z", civil_utc(at)),
            "{form}: {time}"
        );
    }
}
