//! The client for GitLab's runner API: verify, legacy registration, runner creation with an
//! access token, and deletion; plus the retry policy around them.
//!
//! Errors are an enum at this boundary because the status code drives decisions: 408, 429 and
//! 5xx are retried, 403/404 on deletion mean "already gone", the rest are permanent and get an
//! explanation that names the fix.
//!
//! What the client accepts is narrow on purpose: it follows no redirect (a token must never
//! travel to an address runner.json does not name), a success is only the JSON GitLab sends,
//! and no answer is read past `MAX_BODY`. Every text it puts in an error is redacted and
//! scrubbed of token-shaped strings before it is cut to length.
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::backoff::{self, Hint};
use crate::config::{RunnerSettings, RunnerType};
use crate::secret::{self, Secret, redact};

/// One request may take this long before it counts as a network error and is retried (within
/// the phase's deadline).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are read up to this size. The runner API's answers are a few hundred bytes; a
/// larger one is not GitLab's (a success that large is a `Body` error; of an error status only
/// this much is read, for its message).
pub const MAX_BODY: usize = 64 * 1024;
/// A server's error message is cut to this many characters, after redaction.
const MAX_MESSAGE_CHARS: usize = 200;
/// No call is tried more often than this, whatever its deadline.
pub const MAX_ATTEMPTS: u32 = 50;
/// How long after it started a deletion keeps going while GitLab throttles it (429 with a reset
/// time), even past its deadline (`--deregister-timeout`): in a boot storm the deletions share
/// GitLab's budget with every VM's registration, and a deletion given up leaves a runner
/// manager behind. Past this, or at any other error past the deadline, it gives up.
pub const THROTTLED_DELETION_LIMIT: Duration = Duration::from_secs(600);
/// A retry is not started unless this much of its deadline is left for the request itself.
const RETRY_SLACK: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Verify,
    Register,
    CreateUserRunner,
    DeleteManager,
    DeleteRunner,
}

impl Endpoint {
    /// Whether a successful call creates a runner. Such a call is not idempotent: repeated
    /// after an answer that does not rule out a created runner, it may create a second one, and
    /// only the runner whose token the agent learns is ever deleted. It is retried only when the
    /// request surely created nothing (`retry_is_safe`); otherwise the error is `MaybeCreated`.
    pub fn creates_runner(self) -> bool {
        matches!(self, Endpoint::Register | Endpoint::CreateUserRunner)
    }

    /// Whether the call keeps going past its deadline while GitLab throttles it, up to
    /// `THROTTLED_DELETION_LIMIT`: the deletions, which are idempotent and stand between a
    /// boot storm and runner managers left behind.
    pub fn rides_out_throttling(self) -> bool {
        matches!(self, Endpoint::DeleteManager | Endpoint::DeleteRunner)
    }

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
    #[error("GitLab answered {status} to {endpoint}, a redirect to {location}; the agent follows no redirect", endpoint = .endpoint.describe())]
    Redirect {
        endpoint: Endpoint,
        status: u16,
        /// Where it pointed, without user info, query or fragment.
        location: String,
        /// The base URL that the redirect suggests, with https.
        suggestion: Option<String>,
    },
    #[error("GitLab answered {status} to {endpoint}: {message}", endpoint = .endpoint.describe())]
    Status {
        endpoint: Endpoint,
        status: u16,
        message: String,
        /// The server's Retry-After / RateLimit-* headers, if any.
        retry_hint: Option<Hint>,
    },
    #[error("GitLab's answer to {endpoint} is not what the runner API returns: {detail}", endpoint = .endpoint.describe())]
    Body { endpoint: Endpoint, detail: String },
    /// A call that creates a runner got an answer (or none) that does not rule out that GitLab
    /// created it: not retried, because a retry may create a second runner.
    #[error("GitLab may have created a runner whose token is unknown: {endpoint} got {detail}", endpoint = .endpoint.describe())]
    MaybeCreated {
        endpoint: Endpoint,
        /// The runner's description (this VM's runner name).
        description: String,
        detail: String,
    },
    #[error("no answer from GitLab before the deadline")]
    NoAnswer,
}

impl ApiError {
    /// Network errors, 408, 429 and 5xx are worth another try (for a call that creates a runner
    /// only those that surely created nothing); everything else is permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            ApiError::Transport { .. } => true,
            ApiError::Status {
                endpoint, status, ..
            } => retry_is_safe(*endpoint, *status),
            ApiError::Redirect { .. }
            | ApiError::Body { .. }
            | ApiError::MaybeCreated { .. }
            | ApiError::NoAnswer => false,
        }
    }

    fn retry_hint(&self) -> Option<&Hint> {
        match self {
            ApiError::Status { retry_hint, .. } => retry_hint.as_ref(),
            _ => None,
        }
    }

    /// A 429 that says when the throttle resets.
    fn is_throttle_with_reset(&self) -> bool {
        matches!(
            self,
            ApiError::Status {
                status: 429,
                retry_hint: Some(_),
                ..
            }
        )
    }

    /// What the operator should do about a permanent error.
    pub fn fix(&self) -> String {
        let (endpoint, status) = match self {
            ApiError::Transport { .. } | ApiError::NoAnswer => return "check the url in runner.json, the VM's network and DNS, and that GitLab is up".into(),
            ApiError::Body { .. } => return "check that url in runner.json points at GitLab itself, not at a proxy or login page".into(),
            ApiError::Redirect { suggestion, .. } => {
                let target = match suggestion {
                    Some(s) => format!("probably {s}"),
                    None => "usually https://...".into(),
                };
                return format!(
                    "set url in runner.json to the address GitLab answers at itself, its external_url ({target}); the agent never follows a redirect, so that a token never travels to another address"
                );
            }
            ApiError::MaybeCreated { description, .. } => {
                return format!(
                    "look in GitLab for a runner with the description \"{description}\" created just now (Admin > CI/CD > Runners, or the group's or project's Settings > CI/CD > Runners) and delete it: this VM never learnt its token, so it cannot; then check GitLab's health (a proxy's 502 or 504 means GitLab failed or was slow)"
                );
            }
            ApiError::Status {
                endpoint, status, ..
            } => (*endpoint, *status),
        };
        explain(endpoint, status).to_string()
    }
}

/// Whether a status is worth another try. For every call: 408 (the server did not receive the
/// whole request), 429 (throttled before the application ran: Rack::Attack, or the migration
/// back-off) and 503 (unavailable). For idempotent calls (verify, the deletions), any other
/// 5xx as well. A call that creates a runner does not retry 500, 502, 504 and the rest: 500 may
/// come after the runner was saved, a gateway answers 502 when the application failed or closed
/// the connection and 504 when it was too slow, both possibly after the runner was created.
pub fn retry_is_safe(endpoint: Endpoint, status: u16) -> bool {
    match status {
        408 | 429 | 503 => true,
        500.. => !endpoint.creates_runner(),
        _ => false,
    }
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

/// One API call: the endpoint (which decides how it may be retried, see `with_retries`) and
/// the request. Await it, or hand a closure that makes it to `with_retries`.
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<F> {
    endpoint: Endpoint,
    future: F,
}

impl<F> Call<F> {
    pub fn new(endpoint: Endpoint, future: F) -> Self {
        Call { endpoint, future }
    }
}

impl<F: Future> IntoFuture for Call<F> {
    type Output = F::Output;
    type IntoFuture = F;

    fn into_future(self) -> F {
        self.future
    }
}

/// The context of one request, for its errors.
struct Request<'a> {
    endpoint: Endpoint,
    secrets: &'a [&'a Secret],
    /// For a call that creates a runner: the runner's description.
    creates: Option<&'a str>,
}

impl Request<'_> {
    /// Known secrets masked, any other token-shaped text masked, then cut to length.
    fn clean(&self, text: &str, max_chars: usize) -> String {
        let clean = secret::scrub(&redact(text, self.secrets));
        match clean.char_indices().nth(max_chars) {
            Some((at, _)) => format!("{}…", &clean[..at]),
            None => clean,
        }
    }

    fn maybe_created(&self, detail: String) -> ApiError {
        ApiError::MaybeCreated {
            endpoint: self.endpoint,
            description: self.creates.unwrap_or_default().to_string(),
            detail,
        }
    }

    /// No usable answer: for a call that creates a runner that is `MaybeCreated` unless the
    /// request surely never left (`sent` false: no connection was made).
    fn no_answer(&self, e: &reqwest::Error, sent: bool) -> ApiError {
        let detail = self.clean(&error_chain(e), usize::MAX);
        if self.creates.is_some() && sent {
            self.maybe_created(format!("no answer: {detail}"))
        } else {
            ApiError::Transport {
                endpoint: self.endpoint,
                detail,
            }
        }
    }
}

impl Client {
    /// `base_url` is the GitLab base URL (`https://gitlab.example.com`); `ca_file` a PEM bundle
    /// trusted in addition to the system roots, as gitlab-runner does with `tls-ca-file`.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("gitlab-runner-vm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // A redirect would carry the token (in the body of a 307/308, or PRIVATE-TOKEN)
            // to wherever Location points; a 3xx is an error naming it instead.
            .redirect(reqwest::redirect::Policy::none());
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

    /// Sends the request; Ok is a 2xx whose body is empty or JSON (`Value::Null` when empty).
    async fn send(
        &self,
        r: &Request<'_>,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Value), ApiError> {
        let endpoint = r.endpoint;
        // An error without a connection means that nothing was sent.
        let mut response = request
            .send()
            .await
            .map_err(|e| r.no_answer(&e, !e.is_connect()))?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if (300..400).contains(&status) {
            return Err(redirect(
                r,
                status,
                response.url(),
                header("location").as_deref(),
            ));
        }
        let (retry_after, reset_time, observed, limit) = (
            header("retry-after"),
            header("ratelimit-resettime"),
            header("ratelimit-observed"),
            header("ratelimit-limit"),
        );
        let retry_hint = backoff::server_hint(
            &backoff::Headers {
                retry_after: retry_after.as_deref(),
                ratelimit_reset_time: reset_time.as_deref(),
                ratelimit_observed: observed.as_deref(),
                ratelimit_limit: limit.as_deref(),
            },
            SystemTime::now(),
        );
        let content_type = header("content-type").unwrap_or_else(|| "no type".into());

        if (200..300).contains(&status) {
            let answer = match read_capped(&mut response).await {
                Err(e) => return Err(r.no_answer(&e, true)),
                Ok(None) => Err(format!(
                    "a {status} answer larger than {} KiB",
                    MAX_BODY / 1024
                )),
                Ok(Some(body)) if body.iter().all(u8::is_ascii_whitespace) => Ok(Value::Null),
                Ok(Some(body)) => serde_json::from_slice::<Value>(&body).map_err(|_| {
                    format!(
                        "a {status} answer of type {} that is not JSON (a login page, or a proxy's?)",
                        r.clean(&content_type, 60)
                    )
                }),
            };
            return match answer {
                Ok(value) => Ok((status, value)),
                // 201 Created: something was created, and the answer cannot say what.
                Err(detail) if r.creates.is_some() && status == 201 => Err(r.maybe_created(detail)),
                Err(detail) => Err(ApiError::Body { endpoint, detail }),
            };
        }

        // An error status: its body only serves the message, so a failure to read it, or the
        // part past MAX_BODY, is of no consequence.
        let text = match read_capped(&mut response).await {
            Ok(Some(body)) => String::from_utf8_lossy(&body).into_owned(),
            _ => String::new(),
        };
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|body| {
                body.get("message")
                    .or_else(|| body.get("error"))
                    .map(|m| match m {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
            })
            .unwrap_or(text);
        let message = r.clean(message.trim(), MAX_MESSAGE_CHARS);
        if r.creates.is_some() && !retry_is_safe(endpoint, status) && status >= 500 {
            return Err(r.maybe_created(format!("{status}: {message}")));
        }
        Err(ApiError::Status {
            endpoint,
            status,
            message,
            retry_hint,
        })
    }

    /// `POST /runners/verify`: checks a `glrt-` token and creates (or heartbeats) the runner
    /// manager for `system_id`.
    pub fn verify<'a>(
        &'a self,
        token: &'a Secret,
        system_id: &'a str,
        info: &'a RunnerInfo,
    ) -> Call<impl Future<Output = Result<(), ApiError>> + 'a> {
        Call::new(Endpoint::Verify, async move {
            let body =
                json!({"token": token.expose(), "system_id": system_id, "info": info.to_json()});
            let request = self
                .http
                .post(format!("{}/runners/verify", self.api))
                .json(&body);
            let r = Request {
                endpoint: Endpoint::Verify,
                secrets: &[token],
                creates: None,
            };
            let (status, answer) = self.send(&r, request).await?;
            // GitLab answers with the runner: `{"id": ..., "token": ..., ...}`.
            if answer.get("id").and_then(Value::as_u64).is_none() {
                return Err(ApiError::Body {
                    endpoint: Endpoint::Verify,
                    detail: format!("a {status} answer without the runner's id"),
                });
            }
            Ok(())
        })
    }

    /// `POST /runners` with a legacy registration token.
    pub fn register<'a>(
        &'a self,
        registration_token: &'a Secret,
        info: &'a RunnerInfo,
        settings: &'a RunnerSettings,
    ) -> Call<impl Future<Output = Result<CreatedRunner, ApiError>> + 'a> {
        Call::new(Endpoint::Register, async move {
            let mut body = runner_fields(&info.name, settings);
            body["token"] = json!(registration_token.expose());
            body["info"] = info.to_json();
            let request = self.http.post(format!("{}/runners", self.api)).json(&body);
            let r = Request {
                endpoint: Endpoint::Register,
                secrets: &[registration_token],
                creates: Some(&info.name),
            };
            let (status, answer) = self.send(&r, request).await?;
            created_runner(&r, status, &answer)
        })
    }

    /// `POST /user/runners` with a personal, group or project access token.
    pub fn create_user_runner<'a>(
        &'a self,
        access_token: &'a Secret,
        runner_type: &'a RunnerType,
        info: &'a RunnerInfo,
        settings: &'a RunnerSettings,
    ) -> Call<impl Future<Output = Result<CreatedRunner, ApiError>> + 'a> {
        Call::new(Endpoint::CreateUserRunner, async move {
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
            let r = Request {
                endpoint: Endpoint::CreateUserRunner,
                secrets: &[access_token],
                creates: Some(&info.name),
            };
            let (status, answer) = self.send(&r, request).await?;
            created_runner(&r, status, &answer)
        })
    }

    /// `DELETE /runners/managers`: removes this VM's manager and leaves the shared runner.
    pub fn delete_manager<'a>(
        &'a self,
        token: &'a Secret,
        system_id: &'a str,
    ) -> Call<impl Future<Output = Result<Deletion, ApiError>> + 'a> {
        Call::new(Endpoint::DeleteManager, async move {
            let request = self
                .http
                .delete(format!("{}/runners/managers", self.api))
                .json(&json!({"token": token.expose(), "system_id": system_id}));
            let r = Request {
                endpoint: Endpoint::DeleteManager,
                secrets: &[token],
                creates: None,
            };
            deletion(self.send(&r, request).await)
        })
    }

    /// `DELETE /runners`: removes the runner this VM created.
    pub fn delete_runner<'a>(
        &'a self,
        token: &'a Secret,
    ) -> Call<impl Future<Output = Result<Deletion, ApiError>> + 'a> {
        Call::new(Endpoint::DeleteRunner, async move {
            let request = self
                .http
                .delete(format!("{}/runners", self.api))
                .json(&json!({"token": token.expose()}));
            let r = Request {
                endpoint: Endpoint::DeleteRunner,
                secrets: &[token],
                creates: None,
            };
            deletion(self.send(&r, request).await)
        })
    }
}

/// The body, or None when it is larger than `MAX_BODY` (then only that much is read).
async fn read_capped(response: &mut reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_BODY {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// A 3xx: where it points (absolute, without user info, query or fragment), and the base URL
/// it suggests.
fn redirect(r: &Request<'_>, status: u16, from: &reqwest::Url, location: Option<&str>) -> ApiError {
    let target = location.and_then(|l| from.join(l).ok()).map(|mut url| {
        url.set_query(None);
        url.set_fragment(None);
        let _ = url.set_username("");
        let _ = url.set_password(None);
        url
    });
    let suggestion = target.as_ref().and_then(|url| {
        let host = url.host_str()?;
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let path = url.path();
        let base = path.find("/api/v4").map(|at| &path[..at]).unwrap_or("");
        Some(r.clean(&format!("https://{host}{port}{base}"), 200))
    });
    let location = match (&target, location) {
        (Some(url), _) => r.clean(url.as_str(), 200),
        (None, Some(raw)) => r.clean(raw, 200),
        (None, None) => "nowhere (no Location header)".into(),
    };
    ApiError::Redirect {
        endpoint: r.endpoint,
        status,
        location,
        suggestion,
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

fn created_runner(r: &Request<'_>, status: u16, body: &Value) -> Result<CreatedRunner, ApiError> {
    #[derive(Deserialize)]
    struct Created {
        id: Option<u64>,
        token: String,
    }
    match serde_json::from_value::<Created>(body.clone()) {
        Ok(created) => Ok(CreatedRunner {
            id: created.id,
            token: Secret::new(created.token),
        }),
        Err(_) if status == 201 => {
            Err(r.maybe_created("a 201 answer without a runner token".into()))
        }
        Err(_) => Err(ApiError::Body {
            endpoint: r.endpoint,
            detail: format!("a {status} answer without a runner token"),
        }),
    }
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

/// Calls `op` until it succeeds, fails permanently, or the next retry could not start before
/// `deadline`; at most `MAX_ATTEMPTS` times. Waits follow `backoff::plan`: never shorter than
/// `backoff::MIN_WAIT`, never before the server's reset, always randomised.
///
/// How a call may be retried is a property of its endpoint, so the caller need not know:
/// - a call that creates a runner is never cut short at the deadline (its answer is the only way
///   to learn the token of a runner it may have created; `REQUEST_TIMEOUT` bounds it), and
///   ambiguous failures come back as the permanent `ApiError::MaybeCreated`;
/// - a deletion that GitLab throttles (429 with a reset time) keeps going past `deadline`, up to
///   `THROTTLED_DELETION_LIMIT` after it started, as long as the answers stay such 429s.
pub async fn with_retries<T, F, Fut>(
    what: &str,
    deadline: Instant,
    mut op: F,
) -> Result<T, RetryError>
where
    F: FnMut() -> Call<Fut>,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let started = Instant::now();
    let throttled_limit = started
        .checked_add(THROTTLED_DELETION_LIMIT)
        .map_or(deadline, |limit| limit.max(deadline));
    // Where the current attempt and the next wait must end.
    let mut limit = deadline;
    let mut attempt: u32 = 0;
    loop {
        let call = op();
        let endpoint = call.endpoint;
        attempt += 1;
        let gave_up = |last| RetryError::DeadlineExceeded {
            attempts: attempt,
            elapsed_s: started.elapsed().as_secs(),
            last,
        };
        let outcome = if endpoint.creates_runner() {
            call.future.await
        } else {
            let remaining = limit.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, call.future).await {
                Ok(outcome) => outcome,
                Err(_) => return Err(gave_up(ApiError::NoAnswer)),
            }
        };
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_retryable() => return Err(RetryError::Permanent(e)),
            Err(e) => e,
        };
        if attempt >= MAX_ATTEMPTS {
            return Err(gave_up(error));
        }
        limit = if endpoint.rides_out_throttling() && error.is_throttle_with_reset() {
            throttled_limit
        } else {
            deadline
        };
        let now = Instant::now();
        let room = limit
            .saturating_duration_since(now)
            .saturating_sub(RETRY_SLACK);
        let plan = backoff::plan(attempt - 1, error.retry_hint());
        let Some(wait) = plan.pick(random_u64(), room) else {
            return Err(gave_up(error));
        };
        let past_deadline = now.checked_add(wait).is_none_or(|at| at > deadline);
        tracing::warn!(
            "{what}: {error}; retry {attempt} in {:.1} s{}",
            wait.as_secs_f64(),
            if past_deadline {
                format!(
                    " (past the deadline: a throttled deletion keeps trying for up to {} s)",
                    THROTTLED_DELETION_LIMIT.as_secs()
                )
            } else {
                String::new()
            }
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
    use std::sync::atomic::{AtomicU32, Ordering};

    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::backoff::Queue;

    const TOKEN: &str = "glrt-fake.runner.token.0123456789";
    const ACCESS: &str = "glpat-fake.access.token.xxxxxxxx";

    fn status(endpoint: Endpoint, status: u16) -> ApiError {
        ApiError::Status {
            endpoint,
            status,
            message: "x".into(),
            retry_hint: None,
        }
    }

    fn throttled(endpoint: Endpoint, reset_s: u64) -> ApiError {
        ApiError::Status {
            endpoint,
            status: 429,
            message: "Retry later".into(),
            retry_hint: Some(Hint {
                reset_in: Duration::from_secs(reset_s),
                queue: None,
            }),
        }
    }

    /// A call whose n-th attempt (from 1) answers `answer(n)`.
    fn scripted<T>(
        endpoint: Endpoint,
        calls: &AtomicU32,
        answer: impl Fn(u32) -> Result<T, ApiError>,
    ) -> impl FnMut() -> Call<std::future::Ready<Result<T, ApiError>>> {
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Call::new(endpoint, std::future::ready(answer(n)))
        }
    }

    fn info() -> RunnerInfo {
        RunnerInfo {
            name: "vm-test".into(),
            executor: "shell".into(),
        }
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s)
    }

    // ---- classification ----

    #[test]
    fn retryable_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 520] {
            assert!(status(Endpoint::Verify, s).is_retryable(), "{s}");
            assert!(status(Endpoint::DeleteManager, s).is_retryable(), "{s}");
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
    fn a_call_that_creates_a_runner_retries_only_what_surely_created_nothing() {
        for endpoint in [Endpoint::Register, Endpoint::CreateUserRunner] {
            assert!(endpoint.creates_runner());
            for s in [408, 429, 503] {
                assert!(retry_is_safe(endpoint, s), "{s}");
            }
            for s in [500, 502, 504, 520, 400, 403, 410] {
                assert!(!retry_is_safe(endpoint, s), "{s}");
            }
        }
        for endpoint in [
            Endpoint::Verify,
            Endpoint::DeleteManager,
            Endpoint::DeleteRunner,
        ] {
            assert!(!endpoint.creates_runner());
        }
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
        let maybe = ApiError::MaybeCreated {
            endpoint: Endpoint::CreateUserRunner,
            description: "vm-test".into(),
            detail: "502: Bad Gateway".into(),
        };
        assert!(!maybe.is_retryable());
        assert!(maybe.to_string().contains("may have created a runner"));
        assert!(
            maybe.fix().contains("description \"vm-test\""),
            "{}",
            maybe.fix()
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

    // ---- with_retries, in paused time ----

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_and_honours_the_hint() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result = with_retries(
            "test",
            Instant::now() + Duration::from_secs(300),
            scripted(Endpoint::Verify, &calls, |n| match n {
                1 => Err(throttled(Endpoint::Verify, 7)),
                2 => Err(status(Endpoint::Verify, 503)),
                _ => Ok(n),
            }),
        )
        .await
        .unwrap();
        assert_eq!(result, 3);
        // Never before the reset (7 s), then at least the floor after the 503.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(8) && elapsed <= Duration::from_secs(60),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_error_stops_at_once() {
        let calls = AtomicU32::new(0);
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(300),
            scripted(Endpoint::Verify, &calls, |_| {
                Err(status(Endpoint::Verify, 403))
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(matches!(err, RetryError::Permanent(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_bounds_the_retries() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(20),
            scripted(Endpoint::Verify, &calls, |_| {
                Err(status(Endpoint::Verify, 502))
            }),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
        assert!(started.elapsed() <= Duration::from_secs(20));
        // A server hint beyond the deadline gives up at once rather than sleeping past it.
        let started = Instant::now();
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(20),
            scripted(Endpoint::Verify, &calls, |_| {
                Err(throttled(Endpoint::Verify, 60))
            }),
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            RetryError::DeadlineExceeded { attempts: 1, .. }
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    /// Issue item 2: `RateLimit-ResetTime` in the past or `Retry-After: 0` gave 0 s waits and
    /// 1,822 requests in 3 s.
    #[tokio::test(start_paused = true)]
    async fn a_zero_hint_never_becomes_a_tight_loop() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result = with_retries(
            "test",
            Instant::now() + Duration::from_secs(3),
            scripted(Endpoint::Verify, &calls, |n| {
                // A way out for the old behaviour, which never let paused time advance.
                if n > 100 {
                    Ok(n)
                } else {
                    Err(throttled(Endpoint::Verify, 0))
                }
            }),
        )
        .await;
        assert!(result.is_err(), "{result:?}");
        assert!(calls.load(Ordering::SeqCst) <= 3, "{calls:?} calls in 3 s");
        assert!(started.elapsed() <= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded_whatever_the_deadline() {
        let calls = AtomicU32::new(0);
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
        let err = with_retries::<(), _, _>(
            "test",
            far,
            scripted(Endpoint::Verify, &calls, |_| {
                Err(status(Endpoint::Verify, 503))
            }),
        )
        .await
        .unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), MAX_ATTEMPTS);
        assert!(
            matches!(err, RetryError::DeadlineExceeded { attempts, .. } if attempts == MAX_ATTEMPTS)
        );
    }

    /// Issue item 4: `Instant + Duration` panicked on `Retry-After: 18446744073709551615`.
    #[tokio::test(start_paused = true)]
    async fn an_absurd_hint_neither_overflows_nor_parks_the_agent() {
        let calls = AtomicU32::new(0);
        let answer = |n| {
            if n == 1 {
                Err(ApiError::Status {
                    endpoint: Endpoint::Verify,
                    status: 429,
                    message: "m".into(),
                    retry_hint: Some(Hint {
                        reset_in: Duration::MAX,
                        queue: Some(Queue {
                            observed: u64::MAX,
                            limit_per_minute: 1,
                        }),
                    }),
                })
            } else {
                Ok(n)
            }
        };
        // A deadline near the end of time: waits clamp, nothing overflows.
        let started = Instant::now();
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);
        let result = with_retries("test", far, scripted(Endpoint::Verify, &calls, answer)).await;
        assert_eq!(result.unwrap(), 2);
        assert!(started.elapsed() <= backoff::MAX_HINT + backoff::CAP);
        // A normal deadline: gives up at once.
        calls.store(0, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(300);
        let result = with_retries("test", deadline, scripted(Endpoint::Verify, &calls, answer));
        assert!(matches!(
            result.await,
            Err(RetryError::DeadlineExceeded { attempts: 1, .. })
        ));
        // And a deletion riding out the throttle is bounded by its limit too.
        calls.store(0, Ordering::SeqCst);
        let started = Instant::now();
        let result = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::DeleteManager, &calls, |_| {
                Err(throttled(Endpoint::DeleteManager, u64::MAX))
            }),
        );
        assert!(result.await.is_err());
        assert!(started.elapsed() <= THROTTLED_DELETION_LIMIT);
    }

    /// Issue item 17: deletions that ran out of --deregister-timeout in a storm left managers.
    #[tokio::test(start_paused = true)]
    async fn a_throttled_deletion_keeps_going_past_its_deadline() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let result = with_retries(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::DeleteManager, &calls, |n| {
                if n <= 3 {
                    Err(throttled(Endpoint::DeleteManager, 20))
                } else {
                    Ok(Deletion::Deleted)
                }
            }),
        )
        .await;
        assert_eq!(result.unwrap(), Deletion::Deleted);
        assert!(started.elapsed() >= Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_deletion_gives_up_at_the_limit() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::DeleteRunner, &calls, |_| {
                Err(throttled(Endpoint::DeleteRunner, 30))
            }),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
        assert!(calls.load(Ordering::SeqCst) > 2);
        let elapsed = started.elapsed();
        assert!(
            elapsed > Duration::from_secs(30) && elapsed <= THROTTLED_DELETION_LIMIT,
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_deadline_only_throttling_keeps_a_deletion_going() {
        let calls = AtomicU32::new(0);
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::DeleteManager, &calls, |n| {
                if n == 1 {
                    Err(throttled(Endpoint::DeleteManager, 29))
                } else {
                    Err(status(Endpoint::DeleteManager, 503))
                }
            }),
        )
        .await
        .unwrap_err();
        let RetryError::DeadlineExceeded { last, .. } = err else {
            panic!("{err:?}")
        };
        assert!(
            matches!(last, ApiError::Status { status: 503, .. }),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn verify_does_not_ride_out_throttling() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let err = with_retries::<(), _, _>(
            "test",
            Instant::now() + Duration::from_secs(30),
            scripted(Endpoint::Verify, &calls, |_| {
                Err(throttled(Endpoint::Verify, 10))
            }),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, RetryError::DeadlineExceeded { .. }));
        assert!(started.elapsed() <= Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_in_flight_is_never_cut_at_the_deadline() {
        let slow = |endpoint| {
            move || {
                Call::new(endpoint, async {
                    tokio::time::sleep(Duration::from_secs(25)).await;
                    Ok::<_, ApiError>(7)
                })
            }
        };
        let deadline = || Instant::now() + Duration::from_secs(10);
        let created = with_retries("test", deadline(), slow(Endpoint::CreateUserRunner)).await;
        assert_eq!(created.unwrap(), 7);
        let verified = with_retries("test", deadline(), slow(Endpoint::Verify)).await;
        assert!(matches!(
            verified,
            Err(RetryError::DeadlineExceeded {
                last: ApiError::NoAnswer,
                ..
            })
        ));
    }

    // ---- the client against a fake GitLab ----

    fn client(server: &MockServer) -> Client {
        Client::new(&server.uri(), None).unwrap()
    }

    async fn answer(server: &MockServer, http_method: &str, url_path: &str, r: ResponseTemplate) {
        Mock::given(method(http_method))
            .and(path(url_path))
            .respond_with(r)
            .mount(server)
            .await;
    }

    /// Issue item 1: a 308 on verify resent the body, token included, to the other host.
    #[tokio::test]
    async fn redirects_are_not_followed_and_name_their_location() {
        let gitlab = MockServer::start().await;
        let elsewhere = MockServer::start().await;
        let target = format!("{}/x", elsewhere.uri());
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(308).insert_header("Location", target.as_str()),
        )
        .await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/user/runners",
            ResponseTemplate::new(302).insert_header("Location", target.as_str()),
        )
        .await;
        let c = client(&gitlab);
        let err = c
            .verify(&secret(TOKEN), "r_0123456789ab", &info())
            .await
            .unwrap_err();
        let ApiError::Redirect {
            status, location, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!((*status, location.as_str()), (308, target.as_str()));
        assert!(!err.is_retryable());
        let host = elsewhere.address().to_string();
        assert!(
            err.fix().contains(&format!("https://{host}")),
            "{}",
            err.fix()
        );
        // PRIVATE-TOKEN stays home too, and a redirect is not a runner that may exist.
        let err = c
            .create_user_runner(
                &secret(ACCESS),
                &RunnerType::Project(42),
                &info(),
                &RunnerSettings::default(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::Redirect { status: 302, .. }),
            "{err:?}"
        );
        assert!(elsewhere.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_redirect_shows_no_user_info_query_or_token_and_suggests_the_base_url() {
        let gitlab = MockServer::start().await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(301).insert_header(
                "Location",
                "http://user:pw@gitlab.example.com:8443/gl/api/v4/runners/verify?s=glpat-fake.xxxxxxxxxxxxxxxx#f",
            ),
        )
        .await;
        let err = client(&gitlab)
            .verify(&secret(TOKEN), "r_0123456789ab", &info())
            .await
            .unwrap_err();
        let text = format!("{err} {}", err.fix());
        assert!(
            text.contains("a redirect to http://gitlab.example.com:8443/gl/api/v4/runners/verify;"),
            "{text}"
        );
        assert!(
            text.contains("probably https://gitlab.example.com:8443/gl)"),
            "{text}"
        );
        for hidden in ["user", "pw@", "glpat", "#f"] {
            assert!(!text.contains(hidden), "{hidden}: {text}");
        }
    }

    /// Issue item 1: verify took a `200 text/html` login page for "runner token accepted".
    #[tokio::test]
    async fn a_success_is_only_the_json_gitlab_sends() {
        let gitlab = MockServer::start().await;
        let html = ResponseTemplate::new(200)
            .set_body_raw("<html><body>Sign in</body></html>", "text/html");
        Mock::given(method("POST"))
            .and(path("/api/v4/runners/verify"))
            .respond_with(html.clone())
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&gitlab)
            .await;
        Mock::given(method("POST"))
            .and(path("/api/v4/runners/verify"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"token": "x"})))
            .up_to_n_times(1)
            .with_priority(2)
            .mount(&gitlab)
            .await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(200).set_body_json(json!({"id": 7, "token": TOKEN})),
        )
        .await;
        answer(&gitlab, "DELETE", "/api/v4/runners/managers", html).await;
        answer(
            &gitlab,
            "DELETE",
            "/api/v4/runners",
            ResponseTemplate::new(204),
        )
        .await;
        let c = client(&gitlab);
        let (t, id, i) = (secret(TOKEN), "r_0123456789ab", info());
        let html_err = c.verify(&t, id, &i).await.unwrap_err();
        assert!(
            matches!(&html_err, ApiError::Body { detail, .. } if detail.contains("text/html")),
            "{html_err:?}"
        );
        assert!(!html_err.is_retryable());
        let no_id = c.verify(&t, id, &i).await.unwrap_err();
        assert!(matches!(no_id, ApiError::Body { .. }), "{no_id:?}");
        c.verify(&t, id, &i).await.unwrap();
        let err = c.delete_manager(&t, id).await.unwrap_err();
        assert!(matches!(err, ApiError::Body { .. }), "{err:?}");
        assert_eq!(c.delete_runner(&t).await.unwrap(), Deletion::Deleted);
    }

    /// Issue item 14: bodies had no size cap.
    #[tokio::test]
    async fn answers_past_max_body_are_a_body_error() {
        let gitlab = MockServer::start().await;
        let pad = "x".repeat(MAX_BODY);
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(200).set_body_json(json!({"id": 7, "pad": pad})),
        )
        .await;
        answer(
            &gitlab,
            "DELETE",
            "/api/v4/runners/managers",
            ResponseTemplate::new(503).set_body_raw("y".repeat(1 << 20), "text/plain"),
        )
        .await;
        let c = client(&gitlab);
        let t = secret(TOKEN);
        let err = c.verify(&t, "r_0123456789ab", &info()).await.unwrap_err();
        assert!(
            matches!(&err, ApiError::Body { detail, .. } if detail.contains("larger than 64 KiB")),
            "{err:?}"
        );
        // Of an error status only the beginning is read; the status still decides.
        let err = c.delete_manager(&t, "r_0123456789ab").await.unwrap_err();
        let ApiError::Status {
            status, message, ..
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(*status, 503);
        assert!(err.is_retryable());
        assert!(message.chars().count() <= MAX_MESSAGE_CHARS + 1);
    }

    /// Issue item 15: error bodies were cut to 200 characters before redaction.
    #[tokio::test]
    async fn error_bodies_are_redacted_and_scrubbed_before_they_are_cut() {
        let gitlab = MockServer::start().await;
        let echo = format!("{} {TOKEN} and more", "x".repeat(190));
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(403).set_body_raw(echo, "text/plain"),
        )
        .await;
        answer(
            &gitlab,
            "DELETE",
            "/api/v4/runners/managers",
            ResponseTemplate::new(400)
                .set_body_json(json!({"message": "bad: glpat-other.token.xxxxxxxxxxxx"})),
        )
        .await;
        let c = client(&gitlab);
        let t = secret(TOKEN);
        let err = c.verify(&t, "r_0123456789ab", &info()).await.unwrap_err();
        let text = err.to_string();
        assert!(!text.contains("fake.r"), "{text}");
        assert!(text.contains(" glrt-…"), "{text}");
        let err = c.delete_manager(&t, "r_0123456789ab").await.unwrap_err();
        assert!(err.to_string().ends_with("bad: glpat-…xxxx"), "{err}");
    }

    /// Issue item 8: a create was retried after answers that may come from a created runner.
    #[tokio::test]
    async fn a_create_is_not_retried_after_an_answer_that_may_come_from_a_created_runner() {
        for code in [500, 502, 504] {
            let gitlab = MockServer::start().await;
            answer(
                &gitlab,
                "POST",
                "/api/v4/user/runners",
                ResponseTemplate::new(code).set_body_raw("Bad Gateway", "text/plain"),
            )
            .await;
            answer(
                &gitlab,
                "POST",
                "/api/v4/runners",
                ResponseTemplate::new(201).set_body_raw("<html/>", "text/html"),
            )
            .await;
            let c = client(&gitlab);
            let (i, settings) = (info(), RunnerSettings::default());
            let (access, kind) = (secret(ACCESS), RunnerType::Instance);
            let deadline = Instant::now() + Duration::from_secs(60);
            let err = with_retries("create runner", deadline, || {
                c.create_user_runner(&access, &kind, &i, &settings)
            })
            .await
            .unwrap_err();
            let RetryError::Permanent(err @ ApiError::MaybeCreated { .. }) = err else {
                panic!("{code}: {err:?}")
            };
            assert!(err.to_string().contains(&code.to_string()), "{err}");
            assert!(err.fix().contains("\"vm-test\""), "{}", err.fix());
            // A 201 whose token cannot be read created a runner all the same.
            let reg = secret("GR1348941fake.registration.xxxx");
            let err = with_retries("register", deadline, || c.register(&reg, &i, &settings))
                .await
                .unwrap_err();
            assert!(
                matches!(err, RetryError::Permanent(ApiError::MaybeCreated { .. })),
                "{err:?}"
            );
            assert_eq!(gitlab.received_requests().await.unwrap().len(), 2);
        }
    }

    #[tokio::test]
    async fn a_create_is_retried_when_it_surely_created_nothing_and_verify_after_a_502() {
        let gitlab = MockServer::start().await;
        for (url_path, first) in [
            ("/api/v4/user/runners", 503),
            ("/api/v4/runners/verify", 502),
        ] {
            Mock::given(method("POST"))
                .and(path(url_path))
                .respond_with(ResponseTemplate::new(first))
                .up_to_n_times(1)
                .with_priority(1)
                .mount(&gitlab)
                .await;
        }
        answer(
            &gitlab,
            "POST",
            "/api/v4/user/runners",
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": 9, "token": "glrt-t3_fake.xxxx"})),
        )
        .await;
        answer(
            &gitlab,
            "POST",
            "/api/v4/runners/verify",
            ResponseTemplate::new(200).set_body_json(json!({"id": 9})),
        )
        .await;
        let c = client(&gitlab);
        let (i, settings) = (info(), RunnerSettings::default());
        let (access, kind, t) = (secret(ACCESS), RunnerType::Group(3), secret(TOKEN));
        let deadline = Instant::now() + Duration::from_secs(60);
        let created = with_retries("create runner", deadline, || {
            c.create_user_runner(&access, &kind, &i, &settings)
        })
        .await
        .unwrap();
        assert_eq!(created.id, Some(9));
        with_retries("verify", deadline, || c.verify(&t, "r_0123456789ab", &i))
            .await
            .unwrap();
        assert_eq!(gitlab.received_requests().await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_create_without_an_answer_may_have_created_a_runner_unless_never_sent() {
        let (i, settings) = (info(), RunnerSettings::default());
        let (access, kind) = (secret(ACCESS), RunnerType::Instance);
        // A server that reads the request and hangs up without an answer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = vec![0; 16 * 1024];
                let _ = conn.read(&mut buf).await;
            }
        });
        let c = Client::new(&format!("http://{addr}"), None).unwrap();
        let err = c
            .create_user_runner(&access, &kind, &i, &settings)
            .await
            .unwrap_err();
        assert!(matches!(err, ApiError::MaybeCreated { .. }), "{err:?}");
        // Verify is idempotent: the same failure is a network error, retried.
        let err = c
            .verify(&secret(TOKEN), "r_0123456789ab", &i)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::Transport { .. }) && err.is_retryable(),
            "{err:?}"
        );
        server.abort();
        // Refused: nothing was sent, so even a create is retried.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let c = Client::new(&format!("http://{addr}"), None).unwrap();
        let err = c
            .create_user_runner(&access, &kind, &i, &settings)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ApiError::Transport { .. }) && err.is_retryable(),
            "{err:?}"
        );
    }
}
