//! The client against a fake GitLab: a fresh wiremock `MockServer` per test, real HTTP on
//! loopback, no binary spawned. By concern: `statuses` (what each status means per endpoint),
//! `requests` (what is sent: paths, headers, bodies), `bodies` (what an answer must be),
//! `hints` (every form of `Retry-After` and `RateLimit-*`), `redirects`, `redaction`, and
//! `creates` (the calls that create a runner and how they are retried).

use serde_json::json;
use tokio::time::Instant;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::client::{MAX_BODY, MAX_MESSAGE_CHARS};
use super::*;
use crate::config::{Executor, RunnerSettings, RunnerType};
use crate::secret::Secret;

mod bodies;
mod creates;
mod hints;
mod redaction;
mod redirects;
mod requests;
mod statuses;

/// Obviously fake tokens, long enough to be masked with a visible tail.
const TOKEN: &str = "glrt-fake.runner.token.0123456789";
const ACCESS: &str = "glpat-fake.access.token.xxxxxxxx";
const SYSTEM_ID: &str = "r_0123456789ab";

fn info() -> RunnerInfo {
    RunnerInfo {
        name: "vm-test".into(),
        executor: Executor::Shell,
    }
}

fn secret(s: &str) -> Secret {
    Secret::new(s)
}

fn client(server: &MockServer) -> Client {
    Client::new(&server.uri(), None).unwrap()
}

/// Every `http_method url_path` request gets `r`.
async fn answer(server: &MockServer, http_method: &str, url_path: &str, r: ResponseTemplate) {
    Mock::given(method(http_method))
        .and(path(url_path))
        .respond_with(r)
        .mount(server)
        .await;
}

/// A server for what wiremock cannot send (a body without a length, an answer cut short): it
/// reads each request whole, writes `response` as it is, and closes the connection. Its base
/// URL, and the task to abort.
async fn raw_server(response: Vec<u8>) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0; 4096];
            // Up to the end of the headers, then the body's length.
            let whole = loop {
                let Ok(n @ 1..) = conn.read(&mut buf).await else {
                    break false;
                };
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break true;
                    }
                }
            };
            if whole {
                let _ = conn.write_all(&response).await;
                let _ = conn.shutdown().await;
            }
        }
    });
    (url, task)
}

/// An HTTP/1.1 answer with a chunked body: no length announced.
fn chunked(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A JSON object with the runner's id, padded to exactly `len` bytes.
fn json_of_len(len: usize) -> String {
    let head = r#"{"id":7,"pad":""#;
    let tail = r#""}"#;
    format!("{head}{}{tail}", "x".repeat(len - head.len() - tail.len()))
}
