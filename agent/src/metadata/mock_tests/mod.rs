//! The metadata client against fake metadata services: a fresh wiremock server per test on
//! loopback, real HTTP, real time (waits are a second or two at most). Here: each platform's
//! protocol and SSH keys; in `hostile`: stalls, resets, retries, redirects, huge answers; in
//! `notices`: the preemption notice watches.

use std::time::Duration;

use tokio::time::Instant;
use wiremock::matchers::{header, header_exists, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::*;

mod hostile;
mod notices;

pub(super) const RUNNER_JSON: &str =
    r#"{"url": "https://gitlab.example.com", "token": "glrt-fake.runner.token.0123456789"}"#;
const AWS_TOKEN: &str = "AQAEAFakeSessionToken==";

pub(super) fn client(platform: Platform, server: &MockServer) -> MetadataClient {
    MetadataClient::new(platform, &server.uri())
        .unwrap()
        .with_request_timeout(Duration::from_millis(500))
}

pub(super) fn soon() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

fn gce_ok(body: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .insert_header("metadata-flavor", "Google")
        .set_body_string(body)
}

async fn aws_token(server: &MockServer, token: &str, times: u64) {
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .and(header("x-aws-ec2-metadata-token-ttl-seconds", "21600"))
        .respond_with(ResponseTemplate::new(200).set_body_string(token))
        .expect(times)
        .mount(server)
        .await;
}

#[tokio::test]
async fn aws_gets_a_session_token_then_user_data_with_it() {
    let server = MockServer::start().await;
    aws_token(&server, AWS_TOKEN, 1).await;
    Mock::given(method("GET"))
        .and(path("/latest/user-data"))
        .and(header("x-aws-ec2-metadata-token", AWS_TOKEN))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .expect(2)
        .mount(&server)
        .await;
    let c = client(Platform::Aws, &server);
    let text = fetch_runner_json(&c, soon()).await.unwrap().unwrap();
    assert_eq!(text, RUNNER_JSON);
    // The token is kept: a second call asks for no new one (expect(1) above).
    assert!(c.get("/latest/user-data").await.unwrap().is_some());
}

#[tokio::test]
async fn aws_renews_an_expired_token_once_and_no_more() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/latest/api/token"))
        .respond_with(ResponseTemplate::new(200).set_body_string("old-token"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    aws_token(&server, "new-token", 1).await;
    Mock::given(method("GET"))
        .and(header("x-aws-ec2-metadata-token", "old-token"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/latest/user-data"))
        .and(header("x-aws-ec2-metadata-token", "new-token"))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .mount(&server)
        .await;
    let c = client(Platform::Aws, &server);
    assert_eq!(
        c.get("/latest/user-data").await.unwrap().unwrap(),
        RUNNER_JSON.as_bytes()
    );

    // A service that rejects every token: one renewal, then a permanent 401.
    let server = MockServer::start().await;
    aws_token(&server, AWS_TOKEN, 2).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(401))
        .expect(2)
        .mount(&server)
        .await;
    let c = client(Platform::Aws, &server);
    let err = c.fetch("/latest/user-data", soon()).await.unwrap_err();
    assert!(
        matches!(err, MetadataError::Status { status: 401, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn aws_without_user_data_is_none_and_a_disabled_service_names_the_option() {
    let server = MockServer::start().await;
    aws_token(&server, AWS_TOKEN, 1).await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let c = client(Platform::Aws, &server);
    assert_eq!(
        fetch_runner_json(&c, soon()).await.unwrap(),
        Err(NotRunnerJson::Missing)
    );

    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(403))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(Platform::Aws, &server)
        .fetch("/latest/user-data", soon())
        .await
        .unwrap_err();
    assert!(err.fix().contains("--http-endpoint enabled"), "{err}");
}

#[tokio::test]
async fn an_aws_token_that_is_no_token_is_not_imds() {
    for body in ["".to_string(), "x".repeat(2000), "two\nlines".to_string()] {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(200).set_body_string(body.as_str()))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
            .expect(0)
            .mount(&server)
            .await;
        let err = client(Platform::Aws, &server)
            .fetch("/latest/user-data", soon())
            .await
            .unwrap_err();
        assert!(
            matches!(err, MetadataError::NotMetadataService { .. }),
            "{} bytes: {err}",
            body.len()
        );
    }
}

#[tokio::test]
async fn aws_token_put_that_never_answers_points_at_the_hop_limit() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(5)))
        .mount(&server)
        .await;
    let c = client(Platform::Aws, &server);
    let started = std::time::Instant::now();
    let err = c
        .fetch("/latest/user-data", Instant::now() + Duration::from_secs(3))
        .await
        .unwrap_err();
    // Bounded by the deadline, not by the stalled answer.
    assert!(started.elapsed() < Duration::from_secs(10));
    let MetadataError::GaveUp { last, .. } = &err else {
        panic!("{err}")
    };
    assert!(
        matches!(**last, MetadataError::AwsTokenUnanswered { .. }),
        "{err}"
    );
    assert!(
        err.fix().contains("HttpPutResponseHopLimit"),
        "{}",
        err.fix()
    );
}

#[tokio::test]
async fn gce_sends_the_flavor_header_and_trusts_only_answers_that_carry_it() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/computeMetadata/v1/instance/attributes/user-data"))
        .and(header("metadata-flavor", "Google"))
        .respond_with(gce_ok(RUNNER_JSON))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(Platform::Gce, &server);
    assert_eq!(
        fetch_runner_json(&c, soon()).await.unwrap().unwrap(),
        RUNNER_JSON
    );

    // A captive portal or proxy: 200 with HTML and no Metadata-Flavor.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("content-type", "text/html")
                .set_body_string("<html><body>Sign in to the Wi-Fi</body></html>"),
        )
        .expect(1)
        .mount(&server)
        .await;
    let err = client(Platform::Gce, &server)
        .fetch("/computeMetadata/v1/instance/attributes/user-data", soon())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::NotMetadataService { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Metadata-Flavor"), "{err}");

    // A proxy's 404 page is not "no user-data".
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).set_body_string("<html>Not Found</html>"))
        .mount(&server)
        .await;
    let err = client(Platform::Gce, &server)
        .fetch("/computeMetadata/v1/instance/attributes/user-data", soon())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::NotMetadataService { .. }),
        "{err}"
    );

    // 404 from the real service: no user-data.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(404).insert_header("metadata-flavor", "Google"))
        .mount(&server)
        .await;
    let c = client(Platform::Gce, &server);
    assert_eq!(
        fetch_runner_json(&c, soon()).await.unwrap(),
        Err(NotRunnerJson::Missing)
    );
}

#[tokio::test]
async fn digitalocean_empty_or_absent_user_data_is_missing_and_other_user_data_is_named() {
    for answer in [
        ResponseTemplate::new(404),
        ResponseTemplate::new(200).set_body_string(""),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/metadata/v1/user-data"))
            .respond_with(answer)
            .mount(&server)
            .await;
        let c = client(Platform::DigitalOcean, &server);
        assert_eq!(
            fetch_runner_json(&c, soon()).await.unwrap(),
            Err(NotRunnerJson::Missing)
        );
    }
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200).set_body_bytes(b"#cloud-config\n\xff\xfe".to_vec()),
        )
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let Err(NotRunnerJson::Other(what)) = fetch_runner_json(&c, soon()).await.unwrap() else {
        panic!("not runner.json expected");
    };
    assert!(what.contains("not UTF-8"), "{what}");
}

#[tokio::test]
async fn ssh_keys_of_each_platform() {
    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyDataForTests0123456789 me";
    const RSA: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQFakeKeyData0123456789 you";

    // AWS: the index, then each key.
    let server = MockServer::start().await;
    aws_token(&server, AWS_TOKEN, 1).await;
    let answer = |p: &str, body: &str| {
        Mock::given(method("GET"))
            .and(path(p))
            .and(header("x-aws-ec2-metadata-token", AWS_TOKEN))
            .respond_with(ResponseTemplate::new(200).set_body_string(body))
    };
    answer(
        "/latest/meta-data/public-keys/",
        "0=laptop\n1=ci\n=odd\nx=odd",
    )
    .mount(&server)
    .await;
    answer(
        "/latest/meta-data/public-keys/0/openssh-key",
        &format!("{ED}\n"),
    )
    .mount(&server)
    .await;
    answer("/latest/meta-data/public-keys/1/openssh-key", "not a key")
        .mount(&server)
        .await;
    let keys = super::fetch_ssh_keys(&client(Platform::Aws, &server), "runner", soon())
        .await
        .unwrap();
    assert_eq!(keys.lines, vec![ED.to_string()]);
    // The key that is no key, and the two entries that are not <number>=<name>.
    assert_eq!(keys.skipped.len(), 3, "{keys:?}");

    // GCE: the instance's and the project's keys for the user, unless project keys are blocked.
    for blocked in [false, true] {
        let server = MockServer::start().await;
        let answer = |p: &str, body: String| {
            Mock::given(method("GET"))
                .and(path(format!("/computeMetadata/v1/{p}")))
                .and(header_exists("metadata-flavor"))
                .respond_with(gce_ok(&body))
        };
        answer(
            "instance/attributes/ssh-keys",
            format!("runner:{ED}\nalice:{RSA}"),
        )
        .mount(&server)
        .await;
        answer("project/attributes/ssh-keys", format!("runner:{RSA}"))
            .mount(&server)
            .await;
        if blocked {
            answer("instance/attributes/block-project-ssh-keys", "TRUE".into())
                .mount(&server)
                .await;
        }
        // Every other attribute (enable-oslogin, the legacy sshKeys) is unset.
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404).insert_header("metadata-flavor", "Google"))
            .mount(&server)
            .await;
        let keys = super::fetch_ssh_keys(&client(Platform::Gce, &server), "runner", soon())
            .await
            .unwrap();
        let expected = if blocked { vec![ED] } else { vec![ED, RSA] };
        assert_eq!(keys.lines, expected, "blocked: {blocked}");
    }

    // DigitalOcean: every key, one a line.
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/metadata/v1/public-keys"))
        .respond_with(ResponseTemplate::new(200).set_body_string(format!("{ED}\n{RSA}\n")))
        .mount(&server)
        .await;
    let keys = super::fetch_ssh_keys(&client(Platform::DigitalOcean, &server), "runner", soon())
        .await
        .unwrap();
    assert_eq!(keys.lines, vec![ED, RSA]);
}

#[tokio::test]
async fn an_answer_carries_its_etag_for_a_long_poll() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/computeMetadata/v1/instance/preempted"))
        .respond_with(gce_ok("FALSE").insert_header("etag", "4a1b2c"))
        .mount(&server)
        .await;
    let answer = client(Platform::Gce, &server)
        .get_answer(
            "/computeMetadata/v1/instance/preempted",
            Duration::from_secs(5),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.body, b"FALSE");
    assert_eq!(answer.etag.as_deref(), Some("4a1b2c"));
}
