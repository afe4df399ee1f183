//! The metadata client against a hostile or broken service: stalls, connections cut short,
//! 5xx and 429, redirects, answers over the cap, a URL that is none.

use std::time::Duration;

use tokio::time::Instant;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{RUNNER_JSON, client, soon};
use crate::metadata::client as http;
use crate::metadata::{MetadataClient, MetadataError, Platform};

#[tokio::test]
async fn a_5xx_is_retried_until_the_service_answers() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let body = c.fetch("/metadata/v1/user-data", soon()).await.unwrap();
    assert_eq!(body.unwrap(), RUNNER_JSON.as_bytes());
}

#[tokio::test]
async fn a_429_is_retried_no_sooner_than_its_retry_after() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let started = std::time::Instant::now();
    assert!(
        c.fetch("/metadata/v1/user-data", soon())
            .await
            .unwrap()
            .is_some()
    );
    assert!(started.elapsed() >= Duration::from_secs(2));
}

#[tokio::test]
async fn retries_stop_at_the_deadline_with_the_last_error() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let err = c
        .fetch(
            "/metadata/v1/user-data",
            Instant::now() + Duration::from_secs(3),
        )
        .await
        .unwrap_err();
    let MetadataError::GaveUp { attempts, last, .. } = &err else {
        panic!("{err}")
    };
    assert!(*attempts >= 1);
    assert!(
        matches!(**last, MetadataError::Status { status: 500, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn permanent_answers_are_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(403))
        .expect(1)
        .mount(&server)
        .await;
    let err = client(Platform::DigitalOcean, &server)
        .fetch("/metadata/v1/user-data", soon())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::Status { status: 403, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_redirect_is_not_followed() {
    let server = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(302)
                .insert_header("location", format!("{}/steal", elsewhere.uri()).as_str()),
        )
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .expect(0)
        .mount(&elsewhere)
        .await;
    let err = client(Platform::DigitalOcean, &server)
        .fetch("/metadata/v1/user-data", soon())
        .await
        .unwrap_err();
    assert!(
        matches!(err, MetadataError::Redirect { status: 302, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("/steal"), "{err}");
}

#[tokio::test]
async fn answers_up_to_the_cap_are_read_and_larger_ones_refused() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/fits"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; http::MAX_BODY]))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; http::MAX_BODY + 1]))
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let fits = c.fetch("/fits", soon()).await.unwrap().unwrap();
    assert_eq!(fits.len(), http::MAX_BODY);
    // The cap is 1 MiB: far above any platform's user-data limit (GCE's 256 KiB).
    assert_eq!(http::MAX_BODY, 1024 * 1024);
    let err = c.fetch("/metadata/v1/user-data", soon()).await.unwrap_err();
    assert!(matches!(err, MetadataError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("1024 KiB"), "{err}");
}

#[tokio::test]
async fn a_smaller_cap_is_kept_and_the_error_names_it() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/fits"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; 2048]))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_bytes(vec![b' '; 2049]))
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server).with_max_body(2048);
    assert_eq!(c.get("/fits").await.unwrap().unwrap().len(), 2048);
    let err = c.get("/larger").await.unwrap_err();
    assert!(
        matches!(err, MetadataError::TooLarge { cap_kib: 2, .. }),
        "{err}"
    );
    // Never above MAX_BODY.
    let c = client(Platform::DigitalOcean, &server).with_max_body(usize::MAX);
    assert_eq!(c.get("/fits").await.unwrap().unwrap().len(), 2048);
}

/// A server that answers every request with `head` and then `body`, without a length: the
/// body ends when the connection closes.
async fn unsized_server(body: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
                .await;
            for part in body.chunks(64 * 1024) {
                if conn.write_all(part).await.is_err() {
                    break;
                }
            }
        }
    });
    (url, task)
}

#[tokio::test]
async fn an_answer_without_a_length_is_cut_at_the_cap() {
    let (url, task) = unsized_server(vec![b' '; http::MAX_BODY + 1]).await;
    let c = MetadataClient::new(Platform::DigitalOcean, &url).unwrap();
    let err = c.fetch("/metadata/v1/user-data", soon()).await.unwrap_err();
    assert!(matches!(err, MetadataError::TooLarge { .. }), "{err}");
    task.abort();

    let (url, task) = unsized_server(vec![b' '; http::MAX_BODY]).await;
    let c = MetadataClient::new(Platform::DigitalOcean, &url).unwrap();
    let body = c.fetch("/metadata/v1/user-data", soon()).await.unwrap();
    assert_eq!(body.unwrap().len(), http::MAX_BODY);
    task.abort();
}

#[tokio::test]
async fn an_unreachable_service_names_its_url_and_the_likely_cause() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let c = MetadataClient::new(Platform::Gce, &url).unwrap();
    let err = c
        .fetch(
            Platform::Gce.user_data_path(),
            Instant::now() + Duration::from_secs(2),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains(&url), "{err}");
    // The cause as the network stack gave it.
    assert!(err.to_string().contains("onnection refused"), "{err}");
    assert!(err.fix().contains("firewall"), "{}", err.fix());
}

#[test]
fn a_metadata_url_that_is_no_http_url_fails_at_once() {
    for bad in ["169.254.169.254", "ftp://169.254.169.254", "http://", ""] {
        let err = MetadataClient::new(Platform::Aws, bad).unwrap_err();
        assert!(
            matches!(err, MetadataError::InvalidUrl { .. }),
            "{bad}: {err}"
        );
        assert!(err.fix().contains("--metadata-url"));
    }
    assert!(MetadataClient::new(Platform::Aws, "http://169.254.169.254/").is_ok());
}

#[tokio::test]
async fn a_stalled_answer_is_abandoned_at_the_request_timeout_and_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_string(RUNNER_JSON)
                .set_delay(Duration::from_secs(30)),
        )
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(200).set_body_string(RUNNER_JSON))
        .expect(1)
        .mount(&server)
        .await;
    let c = client(Platform::DigitalOcean, &server);
    let started = std::time::Instant::now();
    let body = c.fetch("/metadata/v1/user-data", soon()).await.unwrap();
    assert_eq!(body.unwrap(), RUNNER_JSON.as_bytes());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "it waited for the stall"
    );
}

#[tokio::test]
async fn a_connection_closed_without_an_answer_is_retried() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        for n in 0.. {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0; 4096];
            let _ = conn.read(&mut buf).await;
            if n == 0 {
                // Cut short: a reset or a crashed service.
                drop(conn);
                continue;
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{RUNNER_JSON}",
                RUNNER_JSON.len()
            );
            let _ = conn.write_all(answer.as_bytes()).await;
        }
    });
    let c = MetadataClient::new(Platform::DigitalOcean, &url).unwrap();
    let body = c.fetch("/metadata/v1/user-data", soon()).await.unwrap();
    assert_eq!(body.unwrap(), RUNNER_JSON.as_bytes());
    server.abort();
}
