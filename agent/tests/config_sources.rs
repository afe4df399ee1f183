//! runner.json from a platform's user-data, and `ssh-keys`, through the real binary: a fake
//! metadata service (wiremock on 127.0.0.1, `--metadata-url`) beside the fake GitLab, and a
//! fixture DMI directory (`--dmi-dir`) for `auto`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const AWS_TOKEN: &str = "AQAEAFakeSessionToken==";
const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyDataForTests0123456789 runner@laptop";
const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQFakeKeyData0123456789 alice@laptop";

/// runner.json as user-data: the fake GitLab and the shared token.
fn user_data(h: &Harness) -> String {
    json!({"name": "vm-test", "url": h.server.uri(), "token": TOKEN}).to_string()
}

/// A fake AWS IMDS serving `user_data` (404 when None) behind an IMDSv2 token.
async fn fake_aws(user_data: Option<String>) -> MockServer {
    let imds = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .and(header("x-aws-ec2-metadata-token-ttl-seconds", "21600"))
        .respond_with(ResponseTemplate::new(200).set_body_string(AWS_TOKEN))
        .mount(&imds)
        .await;
    let answer = match user_data {
        Some(text) => ResponseTemplate::new(200).set_body_string(text),
        None => ResponseTemplate::new(404),
    };
    Mock::given(method("GET"))
        .and(path("/latest/user-data"))
        .and(header("x-aws-ec2-metadata-token", AWS_TOKEN))
        .respond_with(answer)
        .mount(&imds)
        .await;
    imds
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn dmi_dir(h: &Harness, sys_vendor: &str, product_name: &str) -> String {
    let dir = h.path("dmi");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sys_vendor"), format!("{sys_vendor}\n")).unwrap();
    std::fs::write(dir.join("product_name"), format!("{product_name}\n")).unwrap();
    dir.display().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn aws_user_data_is_written_0600_and_the_agent_runs_as_with_a_file() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let imds = fake_aws(Some(user_data(&h))).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = imds.uri();
    h.start(&runner, &["--config-source", "aws", "--metadata-url", &url]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{status:?}\n{}", h.log());

    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert_eq!(h.count("POST", VERIFY).await, 1);
    assert!(h.powered_off());
    let config = h.config_path();
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        user_data(&h),
        "runner.json is the user-data as it came"
    );
    assert_eq!(mode(&config), 0o600);
    assert_eq!(
        mode(config.parent().unwrap()),
        0o700,
        "a new directory is private"
    );
    let log = h.log();
    assert!(log.contains("aws metadata service"), "{log}");
    assert!(log.contains("/latest/user-data"), "{log}");
    assert!(!h.all_output().contains(TOKEN), "the token leaked:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_user_data_fails_with_each_platforms_fix() {
    let cases = [
        (
            "aws",
            "aws ec2 run-instances --user-data file://runner.json",
        ),
        (
            "gce",
            "gcloud compute instances create --metadata-from-file user-data=runner.json",
        ),
        (
            "digitalocean",
            "doctl compute droplet create --user-data-file runner.json",
        ),
    ];
    for (platform, fix) in cases {
        let mut h = Harness::new().await;
        let metadata = match platform {
            "aws" => fake_aws(None).await,
            _ => {
                let server = MockServer::start().await;
                Mock::given(method("GET"))
                    .respond_with(
                        ResponseTemplate::new(404).insert_header("metadata-flavor", "Google"),
                    )
                    .mount(&server)
                    .await;
                server
            }
        };
        let runner = h.write_fake_runner(FakeRunner::default());
        let url = metadata.uri();
        h.start(
            &runner,
            &["--config-source", platform, "--metadata-url", &url],
        );
        h.wait_exit().await;
        let st = h.status();
        assert_eq!(st["phase"], "powering-off", "{platform}");
        let error = st["last_error"].as_str().unwrap();
        assert!(error.contains("has no user-data"), "{platform}: {error}");
        assert!(error.contains(fix), "{platform}: {error}");
        assert!(h.runner_invocations().is_empty());
        assert!(!h.config_path().exists(), "nothing written");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cloud_config_user_data_is_named_and_not_quoted() {
    let mut h = Harness::new().await;
    let imds = fake_aws(Some(format!(
        "#cloud-config\nwrite_files:\n- path: /runner-info/runner.json\n  content: '{}'\n",
        user_data(&h)
    )))
    .await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = imds.uri();
    h.start(&runner, &["--config-source", "aws", "--metadata-url", &url]);
    h.wait_exit().await;
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("is not runner.json"), "{error}");
    assert!(error.contains("#cloud-config"), "{error}");
    assert!(error.contains("no cloud-init"), "{error}");
    assert!(!h.all_output().contains(TOKEN));
    assert!(!h.all_output().contains("write_files"), "user-data quoted");
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_recognises_digitalocean_from_dmi() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata/v1/user-data"))
        .respond_with(ResponseTemplate::new(200).set_body_string(user_data(&h)))
        .expect(1)
        .mount(&metadata)
        .await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let dmi = dmi_dir(&h, "DigitalOcean", "Droplet");
    let url = metadata.uri();
    h.start(
        &runner,
        &[
            "--config-source",
            "auto",
            "--dmi-dir",
            &dmi,
            "--metadata-url",
            &url,
        ],
    );
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.log().contains("says digitalocean"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_without_a_platform_reads_the_file_and_asks_no_metadata_service() {
    let mut h = Harness::new().await;
    let metadata = MockServer::start().await;
    let dmi = dmi_dir(&h, "KubeVirt", "None");
    let url = metadata.uri();
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &[
            "--config-source",
            "auto",
            "--dmi-dir",
            &dmi,
            "--metadata-url",
            &url,
        ],
    )
    .await;
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1);
    assert!(metadata.received_requests().await.unwrap().is_empty());
    assert!(
        h.log().contains("no cloud platform recognised"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_existing_runner_json_wins_over_user_data() {
    // A config disk, the image, or this boot's earlier run: the file is used, nothing fetched.
    let mut h = Harness::new().await;
    let imds = fake_aws(Some("{\"url\": \"https://elsewhere.example\"}".into())).await;
    let url = imds.uri();
    h.start_glrt(
        json!({}),
        FakeRunner::default(),
        &["--config-source", "aws", "--metadata-url", &url],
    )
    .await;
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1);
    // The preemption watcher may ask for notices; nobody asks for the user-data.
    let asked: Vec<String> = imds
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.url.path().to_string())
        .collect();
    assert!(!asked.iter().any(|p| p.contains("user-data")), "{asked:?}");
    assert!(h.log().contains("already exists"), "{}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flaky_metadata_service_is_retried_within_config_wait() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).insert_header("metadata-flavor", "Google"))
        .up_to_n_times(1)
        .mount(&metadata)
        .await;
    Mock::given(method("GET"))
        .and(path("/computeMetadata/v1/instance/attributes/user-data"))
        .and(header("metadata-flavor", "Google"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("metadata-flavor", "Google")
                .set_body_string(user_data(&h)),
        )
        .mount(&metadata)
        .await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = metadata.uri();
    h.start(&runner, &["--config-source", "gce", "--metadata-url", &url]);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1, "{}", h.log());
    assert!(h.log().contains("503"), "the retry is logged: {}", h.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_metadata_service_fails_after_config_wait_naming_its_url() {
    let mut h = Harness::new().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let runner = h.write_fake_runner(FakeRunner::default());
    h.start(
        &runner,
        &[
            "--config-source",
            "gce",
            "--metadata-url",
            &url,
            "--config-wait",
            "3",
        ],
    );
    h.wait_exit().await;
    let error = h.status()["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains(&url), "{error}");
    assert!(error.contains("firewall"), "{error}");
    assert!(h.powered_off());
}

/// An agent whose fetch of DigitalOcean user-data is under way and gets no answer for a minute.
async fn agent_in_a_stalled_fetch() -> (Harness, MockServer) {
    let mut h = Harness::new().await;
    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .mount(&metadata)
        .await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = metadata.uri();
    h.start(
        &runner,
        &[
            "--config-source",
            "digitalocean",
            "--metadata-url",
            &url,
            "--config-wait",
            "120",
        ],
    );
    h.wait_until("the fetch to start", |_| was_asked(&metadata))
        .await;
    (h, metadata)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_during_a_stalled_fetch_tears_down_at_once() {
    let (mut h, _metadata) = agent_in_a_stalled_fetch().await;
    send_signal(h.agent_pid(), 10); // SIGUSR1
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert!(h.powered_off());
    assert!(h.runner_invocations().is_empty());
    assert!(
        h.log().contains("drain requested before runner.json"),
        "{}",
        h.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_stalled_fetch_stops_without_power_off() {
    let (mut h, _metadata) = agent_in_a_stalled_fetch().await;
    send_signal(h.agent_pid(), 15);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert!(
        !h.powered_off(),
        "SIGTERM means the VM is shut down from outside"
    );
    assert_eq!(h.status()["phase"], "stopping");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_in_the_same_boot_fetches_nothing_again() {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    let imds = fake_aws(Some(user_data(&h))).await;
    let runner = h.write_fake_runner(FakeRunner::default());
    let url = imds.uri();
    let args = ["--config-source", "aws", "--metadata-url", &url];
    // The first run's power-off fails, so systemd would restart the agent in the same boot.
    let mut first = h.command(&runner, &args);
    first.env(flag_env("poweroff-command"), "exit 1");
    h.agent = Some(first.spawn().unwrap());
    h.wait_exit().await;
    h.start(&runner, &args);
    let status = h.wait_exit().await;
    assert!(status.success(), "{}", h.log());
    assert!(h.powered_off());
    let fetched = imds
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == "/latest/user-data")
        .count();
    assert_eq!(fetched, 1, "{}", h.log());
    assert_eq!(h.runner_invocations().len(), 1);
    assert_eq!(h.count("POST", VERIFY).await, 1);
}

/// Whether the metadata service has been asked (wiremock's call is async; poll it here).
fn was_asked(server: &MockServer) -> bool {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(server.received_requests()))
        .is_some_and(|r| !r.is_empty())
}

fn ssh_keys(args: &[&str], keys_dir: &Path) -> std::process::Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("ssh-keys")
        .args(args)
        .arg("--authorized-keys-dir")
        .arg(keys_dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("GITLAB_RUNNER_VM_") || key == "JOURNAL_STREAM" {
            cmd.env_remove(key);
        }
    }
    cmd.output().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_keys_writes_only_the_users_keys_0644() {
    let metadata = MockServer::start().await;
    let gce = |p: &str, body: String| {
        Mock::given(method("GET"))
            .and(path(format!("/computeMetadata/v1/{p}")))
            .respond_with(
                ResponseTemplate::new(200)
                    .insert_header("metadata-flavor", "Google")
                    .set_body_string(body),
            )
    };
    gce(
        "instance/attributes/ssh-keys",
        format!("runner:{ED}\nalice:{RSA}\nrunner:command=\"sh\" {RSA}\n"),
    )
    .mount(&metadata)
    .await;
    gce("project/attributes/ssh-keys", format!("alice:{ED}\n"))
        .mount(&metadata)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).insert_header("metadata-flavor", "Google"))
        .mount(&metadata)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let keys_dir = dir.path().join("ssh-keys");
    let url = metadata.uri();
    let out = ssh_keys(
        &[
            "--user",
            "runner",
            "--config-source",
            "gce",
            "--metadata-url",
            &url,
        ],
        &keys_dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let file = keys_dir.join("runner");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{ED}\n"));
    assert_eq!(mode(&file), 0o644);
    assert_eq!(mode(&keys_dir), 0o755);
    assert!(
        stderr.contains("skipped"),
        "the option line is reported: {stderr}"
    );
    assert!(!keys_dir.join("alice").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_keys_without_a_platform_writes_nothing_and_a_failing_service_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let dmi = dir.path().join("dmi");
    std::fs::create_dir_all(&dmi).unwrap();
    std::fs::write(dmi.join("sys_vendor"), "QEMU\n").unwrap();
    let keys_dir = dir.path().join("ssh-keys");
    let out = ssh_keys(
        &["--user", "runner", "--dmi-dir", dmi.to_str().unwrap()],
        &keys_dir,
    );
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing written"));
    assert!(!keys_dir.exists());

    let metadata = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(403))
        .mount(&metadata)
        .await;
    let url = metadata.uri();
    let out = ssh_keys(
        &[
            "--user",
            "runner",
            "--config-source",
            "digitalocean",
            "--metadata-url",
            &url,
        ],
        &keys_dir,
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("fix:"),
        "{stderr}"
    );
    assert!(!keys_dir.join("runner").exists());
}
