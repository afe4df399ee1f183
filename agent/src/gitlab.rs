//! The client for GitLab's runner API: verify, legacy registration, runner creation with an
//! access token, and deletion; plus the retry policy around them.
//!
//! Errors are an enum at this boundary because the status code drives decisions: 408, 429 and
//! 5xx are retried, 403/404 on deletion mean "already gone", the rest are permanent and get an
//! explanation that names the fix.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::backoff;
use crate::config::{RunnerSettings, RunnerType};
use crate::secret::{Secret, redact};

/// One request may take this long before it counts as a network error and is retried (within
/// the phase's deadline).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Verify,
    Register,
    CreateUserRunner,
    DeleteManager,
    DeleteRunner,
}

impl Endpoint {
    fn describe(self) -> &'static str {
        match self {
            Endpoint::Verify => "POST /api/v4/runners/verify",
            Endpoint::Register => "POST /api/v4/runners",
            Endpoint::CreateUserRunner => "POST /api/v4/user/runners",
            Endpoint::DeleteManager => "DELETE /api/v4/runners/managers",
            Endpoint::DeleteRunner => "DELETE /api/v4/runners",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach GitLab ({endpoint}): {detail}", endpoint = .endpoint.describe())]
    Transport { endpoint: Endpoint, detail: String },
    #[error("GitLab answered {status} to {endpoint}: {message}", endpoint = .endpoint.describe())]
    Status {
        endpoint: Endpoint,
        status: u16,
        message: String,
        /// The server's Retry-After / RateLimit-ResetTime, if any.
        retry_hint: Option<Duration>,
    },
    #[error("GitLab's answer to {endpoint} is not what the runner API returns: {detail}", endpoint = .endpoint.describe())]
    Body { endpoint: Endpoint, detail: String },
    #[error("no answer from GitLab before the deadline")]
    NoAnswer,
}

impl ApiError {
    /// Network errors, 408, 429 and 5xx are worth another try; everything else is permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Status { status, .. } => is_retryable_status(*status),
            ApiError::Body { .. } | ApiError::NoAnswer => false,
        }
    }

    fn retry_hint(&self) -> Option<Duration> {
        match self {
            ApiError::Status { retry_hint, .. } => *retry_hint,
            _ => None,
        }
    }

    /// What the operator should do about a permanent error.
    pub fn fix(&self) -> String {
        let (endpoint, status) = match self {
            ApiError::Transport { .. } | ApiError::NoAnswer => return "check the url in runner.json, the VM's network and DNS, and that GitLab is up".into(),
            ApiError::Body { .. } => return "check that url in runner.json points at GitLab itself, not at a proxy or login page".into(),
            ApiError::Status { endpoint, status, .. } => (*endpoint, *status),
        };
        explain(endpoint, status).to_string()
    }
}

pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// The fix for a permanent status, by endpoint.
fn explain(endpoint: Endpoint, status: u16) -> &'static str {
    use Endpoint::*;
    match (endpoint, status) {
        (Verify, 403) => {
            "the runner authentication token is wrong, expired or its runner was deleted: create a runner in GitLab (Settings > CI/CD > Runners > New runner) and put its glrt- token in runner.json"
        }
        (Verify, 422) => {
            "the runner is orphaned in GitLab: create a new runner and use its glrt- token"
        }
        (Register, 410) => {
            "this GitLab has registration tokens disabled (the default since GitLab 17.0): create a runner in GitLab (Settings > CI/CD > Runners > New runner) and use its glrt- token as \"token\" instead of \"registration_token\""
        }
        (Register, 403) => {
            "the registration token is wrong or was reset: copy the current one, or better use a glrt- runner token as \"token\""
        }
        (CreateUserRunner, 401) => {
            "the access token is wrong, expired or revoked: create a new personal, group or project access token with the create_runner scope"
        }
        (CreateUserRunner, 403) => {
            "the access token lacks the create_runner (or api) scope, or its user is not an Owner of the group or project (instance runners need an administrator)"
        }
        (CreateUserRunner, 404) => {
            "the group_id or project_id does not exist or the token's user cannot see it: check it in runner.json"
        }
        (_, 400) => {
            "GitLab rejected the request's parameters: fix runner.json as the message above says"
        }
        (_, 401) => "the token is not accepted: check the credential in runner.json",
        (_, 404) => {
            "there is no GitLab runner API at this url: check url in runner.json (the GitLab base URL, e.g. https://gitlab.example.com)"
        }
        _ => "check the credential and url in runner.json, and GitLab's logs",
    }
}

#[derive(Debug, Clone)]
pub struct CreatedRunner {
    pub id: Option<u64>,
    pub token: Secret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deletion {
    Deleted,
    /// 403 or 404: the runner or manager is unknown, i.e. already gone (or its token expired,
    /// which leaves nothing for us to delete either).
    AlreadyGone,
}

/// What this VM tells GitLab about itself; the same fields gitlab-runner sends.
#[derive(Debug, Clone)]
pub struct RunnerInfo {
    pub name: String,
    pub executor: String,
}

impl RunnerInfo {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "version": concat!("gitlab-runner-vm ", env!("CARGO_PKG_VERSION")),
            "platform": std::env::consts::OS,
            "architecture": std::env::consts::ARCH,
            "executor": self.executor,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    api: String,
}

impl Client {
    /// `base_url` is the GitLab base URL (`https://gitlab.example.com`); `ca_file` a PEM bundle
    /// trusted in addition to the system roots, as gitlab-runner does with `tls-ca-file`.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("gitlab-runner-vm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT);
        if let Some(path) = ca_file {
            let pem = crate::files::read_capped(path, crate::files::NAMED_FILE_CAP)
                .map_err(|e| anyhow::anyhow!("cannot read tls_ca_file {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                anyhow::anyhow!("tls_ca_file {} is not a PEM bundle: {e}", path.display())
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the HTTP client: {e}"))?;
        Ok(Client {
            http,
            api: format!("{}/api/v4", base_url.trim_end_matches('/')),
        })
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        request: reqwest::RequestBuilder,
        secrets: &[&Secret],
    ) -> Result<(u16, Value), ApiError> {
        let response = request.send().await.map_err(|e| ApiError::Transport {
            endpoint,
            detail: redact(&error_chain(&e), secrets),
        })?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_hint = backoff::server_hint(
            header("retry-after").as_deref(),
            header("ratelimit-resettime").as_deref(),
            SystemTime::now(),
        );
        let text = response.text().await.map_err(|e| ApiError::Transport {
            endpoint,
            detail: redact(&error_chain(&e), secrets),
        })?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            return Ok((status, body));
        }
        let message = body
            .get("message")
            .or_else(|| body.get("error"))
            .map(|m| match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| text.chars().take(200).collect());
        Err(ApiError::Status {
            endpoint,
            status,
            message: redact(&message, secrets),
            retry_hint,
        })
    }

    /// `POST /runners/verify`: checks a `glrt-` token and creates (or heartbeats) the runner
    /// manager for `system_id`.
    pub async fn verify(
        &self,
        token: &Secret,
        system_id: &str,
        info: &RunnerInfo,
    ) -> Result<(), ApiError> {
        let body = json!({"token": token.expose(), "system_id": system_id, "info": info.to_json()});
        let request = self
            .http
            .post(format!("{}/runners/verify", self.api))
            .json(&body);
        self.send(Endpoint::Verify, request, &[token])
            .await
            .map(|_| ())
    }

    /// `POST /runners` with a legacy registration token.
    pub async fn register(
        &self,
        registration_token: &Secret,
        info: &RunnerInfo,
        settings: &RunnerSettings,
    ) -> Result<CreatedRunner, ApiError> {
        let mut body = runner_fields(&info.name, settings);
        body["token"] = json!(registration_token.expose());
        body["info"] = info.to_json();
        let request = self.http.post(format!("{}/runners", self.api)).json(&body);
        let (_, answer) = self
            .send(Endpoint::Register, request, &[registration_token])
            .await?;
        created_runner(Endpoint::Register, &answer)
    }

    /// `POST /user/runners` with a personal, group or project access token.
    pub async fn create_user_runner(
        &self,
        access_token: &Secret,
        runner_type: &RunnerType,
        info: &RunnerInfo,
        settings: &RunnerSettings,
    ) -> Result<CreatedRunner, ApiError> {
        let mut body = runner_fields(&info.name, settings);
        body["runner_type"] = json!(runner_type.api_name());
        match runner_type {
            RunnerType::Group(id) => body["group_id"] = json!(id),
            RunnerType::Project(id) => body["project_id"] = json!(id),
            RunnerType::Instance => {}
        }
        let request = self
            .http
            .post(format!("{}/user/runners", self.api))
            .header("PRIVATE-TOKEN", access_token.expose())
            .json(&body);
        let (_, answer) = self
            .send(Endpoint::CreateUserRunner, request, &[access_token])
            .await?;
        created_runner(Endpoint::CreateUserRunner, &answer)
    }

    /// `DELETE /runners/managers`: removes this VM's manager and leaves the shared runner.
    pub async fn delete_manager(
        &self,
        token: &Secret,
        system_id: &str,
    ) -> Result<Deletion, ApiError> {
        let request = self
            .http
            .delete(format!("{}/runners/managers", self.api))
            .json(&json!({"token": token.expose(), "system_id": system_id}));
        deletion(self.send(Endpoint::DeleteManager, request, &[token]).await)
    }

    /// `DELETE /runners`: removes the runner this VM created.
    pub async fn delete_runner(&self, token: &Secret) -> Result<Deletion, ApiError> {
        let request = self
            .http
            .delete(format!("{}/runners", self.api))
            .json(&json!({"token": token.expose()}));
        deletion(self.send(Endpoint::DeleteRunner, request, &[token]).await)
    }
}

fn runner_fields(name: &str, settings: &RunnerSettings) -> Value {
    let mut body = json!({"description": name});
    if !settings.tags.is_empty() {
        body["tag_list"] = json!(settings.tags);
    }
    if let Some(v) = settings.run_untagged {
        body["run_untagged"] = json!(v);
    }
    if let Some(v) = settings.locked {
        body["locked"] = json!(v);
    }
    if let Some(v) = &settings.access_level {
        body["access_level"] = json!(v);
    }
    if let Some(v) = settings.maximum_timeout {
        body["maximum_timeout"] = json!(v);
    }
    body
}

fn created_runner(endpoint: Endpoint, body: &Value) -> Result<CreatedRunner, ApiError> {
    #[derive(Deserialize)]
    struct Created {
        id: Option<u64>,
        token: String,
    }
    let created: Created = serde_json::from_value(body.clone()).map_err(|_| ApiError::Body {
        endpoint,
        detail: "no runner token in the answer".into(),
    })?;
    Ok(CreatedRunner {
        id: created.id,
        token: Secret::new(created.token),
    })
}

fn deletion(result: Result<(u16, Value), ApiError>) -> Result<Deletion, ApiError> {
    match result {
        Ok(_) => Ok(Deletion::Deleted),
        Err(ApiError::Status {
            status: 403 | 404, ..
        }) => Ok(Deletion::AlreadyGone),
        Err(e) => Err(e),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Why a retried call gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError {
    #[error("{0}")]
    Permanent(ApiError),
    #[error("gave up after {attempts} attempts in {elapsed_s} s: {last}")]
    DeadlineExceeded {
        attempts: u32,
        elapsed_s: u64,
        last: ApiError,
    },
}

/// Calls `op` until it succeeds, fails permanently, or the next wait would pass `deadline`.
/// Waits are the server's hint or full-jitter exponential back-off (see `backoff`).
pub async fn with_retries<T, F, Fut>(
    what: &str,
    deadline: Instant,
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let started = Instant::now();
    let mut attempt: u32 = 0;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let outcome = match tokio::time::timeout(remaining, op()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                return Err(RetryError::DeadlineExceeded {
                    attempts: attempt + 1,
                    elapsed_s: started.elapsed().as_secs(),
                    last: ApiError::NoAnswer,
                });
            }
        };
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_retryable() => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        let wait = backoff::next_wait(attempt, error.retry_hint(), random_u64());
        attempt += 1;
        if Instant::now() + wait >= deadline {
            return Err(RetryError::DeadlineExceeded {
                attempts: attempt,
                elapsed_s: started.elapsed().as_secs(),
                last: error,
            });
        }
        tracing::warn!(
            "{what}: {error}; retry {attempt} in {:.1} s",
            wait.as_secs_f64()
        );
        tokio::time::sleep(wait).await;
    }
}

fn random_u64() -> u64 {
    // getrandom only fails when the kernel has no entropy source at all; a fixed value then
    // still gives a valid (if not spread) back-off.
    getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(endpoint: Endpoint, status: u16) -> ApiError {
        ApiError::Status {
            endpoint,
            status,
            message: "x".into(),
            retry_hint: None,
        }
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 520] {
            assert!(status(Endpoint::Verify, s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 412, 422] {
            assert!(!status(Endpoint::Verify, s).is_retryable(), "{s}");
        }
        assert!(
            ApiError::Transport {
                endpoint: Endpoint::Verify,
                detail: "refused".into()
            }
            .is_retryable()
        );
    }

    #[test]
    fn permanent_errors_name_a_fix() {
        assert!(status(Endpoint::Register, 410).fix().contains("glrt-"));
        assert!(status(Endpoint::Verify, 403).fix().contains("New runner"));
        assert!(
            status(Endpoint::CreateUserRunner, 403)
                .fix()
                .contains("create_runner")
        );
        assert!(
            status(Endpoint::CreateUserRunner, 401)
                .fix()
                .contains("expired")
        );
    }

    #[test]
    fn deletion_treats_403_and_404_as_gone() {
        assert_eq!(deletion(Ok((204, Value::Null))).unwrap(), Deletion::Deleted);
        assert_eq!(
            deletion(Err(status(Endpoint::DeleteManager, 404))).unwrap(),
            Deletion::AlreadyGone
        );
        assert_eq!(
            deletion(Err(status(Endpoint::DeleteRunner, 403))).unwrap(),
            Deletion::AlreadyGone
        );
        assert!(deletion(Err(status(Endpoint::DeleteRunner, 500))).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_honours_the_hint() {
        let mut calls = 0;
        let started = Instant::now();
        let result = with_retries("test", Instant::now() + Duration::from_secs(300), || {
            calls += 1;
            let n = calls;
            async move {
                match n {
                    1 => Err(ApiError::Status {
                        endpoint: Endpoint::Verify,
                        status: 429,
                        message: "slow down".into(),
                        retry_hint: Some(Duration::from_secs(7)),
                    }),
                    2 => Err(status(Endpoint::Verify, 503)),
                    _ => Ok(n),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(result, 3);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(7) && elapsed <= Duration::from_secs(9),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_error_stops_at_once() {
        let mut calls = 0;
        let err =
            with_retries::<(), _, _>("test", Instant::now() + Duration::from_secs(300), || {
                calls += 1;
                async { Err(status(Endpoint::Verify, 403)) }
            })
            .await
            .unwrap_err();
        assert_eq!(calls, 1);
        assert!(matches!(err, RetryError::Permanent(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_bounds_the_retries() {
        let started = Instant::now();
        let err =
            with_retries::<(), _, _>("test", Instant::now() + Duration::from_secs(20), || async {
                Err(status(Endpoint::Verify, 502))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
        assert!(started.elapsed() <= Duration::from_secs(20));
        // A server hint beyond the deadline gives up at once rather than sleeping past it.
        let started = Instant::now();
        let err =
            with_retries::<(), _, _>("test", Instant::now() + Duration::from_secs(20), || async {
                Err(ApiError::Status {
                    endpoint: Endpoint::Verify,
                    status: 429,
                    message: "m".into(),
                    retry_hint: Some(Duration::from_secs(60)),
                })
            })
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            RetryError::DeadlineExceeded { attempts: 1, .. }
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
