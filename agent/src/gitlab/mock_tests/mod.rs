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
use crate::config::{RunnerSettings, RunnerType};
use crate::secret::Secret;

mod bodies;
mod creates;
mod redaction;
mod redirects;

/// Obviously fake tokens, long enough to be masked with a visible tail.
const TOKEN: &str = "glrt-fake.runner.token.0123456789";
const ACCESS: &str = "glpat-fake.access.token.xxxxxxxx";

fn info() -> RunnerInfo {
    RunnerInfo {
        name: "vm-test".into(),
        executor: "shell".into(),
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
