//! The HTTP client for a platform's metadata service: one GET with the platform's headers
//! (GCE's `Metadata-Flavor: Google`, AWS's IMDSv2 session token), 404 as "not set", typed
//! errors; and `fetch`, the same GET retried within a deadline with the project's back-off.
//!
//! As narrow as the GitLab client: no redirect is followed, no proxy is used (user-data holds
//! the runner token; it must not leave the host), no answer is read past `MAX_BODY` (or a
//! smaller cap, `with_max_body`), and on GCE an answer without `Metadata-Flavor: Google` is not
//! the metadata service's (a captive portal or a proxy answering 200 with HTML).

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderValue;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{MetadataError, Platform, aws, gce};
use crate::{backoff, http};

/// One request may take this long. The service is on the host; a request that takes longer is
/// lost and retried within the deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Answers are read up to this size: user-data is at most 16 KiB on AWS, 64 KiB on
/// DigitalOcean, 256 KiB on GCE.
pub const MAX_BODY: usize = 1024 * 1024;
/// As many attempts as a GitLab call gets at most.
const MAX_ATTEMPTS: u32 = crate::gitlab::MAX_ATTEMPTS;

/// An answer: its body, and its ETag (GCE's long poll continues from it:
/// `?wait_for_change=true&last_etag=<etag>` answers only once the value differs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub body: Vec<u8>,
    pub etag: Option<String>,
}

/// A platform's metadata service. Cheap to share by reference; the AWS session token is kept
/// between calls (and renewed once when the service says it expired).
#[derive(Debug)]
pub struct MetadataClient {
    platform: Platform,
    base: String,
    http: reqwest::Client,
    request_timeout: Duration,
    max_body: usize,
    aws_token: Mutex<Option<HeaderValue>>,
}

impl MetadataClient {
    /// `base_url` is the service's root, `http://169.254.169.254` on every platform
    /// (`--metadata-url`).
    pub fn new(platform: Platform, base_url: &str) -> Result<Self, MetadataError> {
        let base = base_url.trim_end_matches('/').to_string();
        // A typo is not worth retrying until the deadline.
        match reqwest::Url::parse(&base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(MetadataError::InvalidUrl {
                    url: crate::secret::scrub(base_url).chars().take(200).collect(),
                });
            }
        }
        let http = http::client_builder(CONNECT_TIMEOUT)
            // HTTP_PROXY in the environment must not see user-data (it holds the token), and a
            // proxy cannot reach the host's link-local service anyway.
            .no_proxy()
            .build()
            .map_err(|e| MetadataError::Client(e.to_string()))?;
        Ok(MetadataClient {
            platform,
            base,
            http,
            request_timeout: REQUEST_TIMEOUT,
            max_body: MAX_BODY,
            aws_token: Mutex::new(None),
        })
    }

    /// Each request's timeout (the token's PUT too; a long poll passes its own to
    /// `get_answer`).
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Answers larger than `max_body` (at most `MAX_BODY`) are `TooLarge`.
    pub fn with_max_body(mut self, max_body: usize) -> Self {
        self.max_body = max_body.min(MAX_BODY);
        self
    }

    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// The full URL of `path` (which starts with `/` and may carry a query).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// One GET of `path`: the body of a 200, None for a 404. On AWS with an IMDSv2 session
    /// token, renewed once if the service answers 401 (the token expired).
    pub async fn get(&self, path: &str) -> Result<Option<Vec<u8>>, MetadataError> {
        self.get_with_timeout(path, self.request_timeout).await
    }

    /// `get` with its own timeout: a long poll (GCE's `?wait_for_change=true`) waits longer
    /// than an ordinary request.
    pub async fn get_with_timeout(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, MetadataError> {
        Ok(self.get_answer(path, timeout).await?.map(|a| a.body))
    }

    /// `get_with_timeout`, with the answer's ETag.
    pub async fn get_answer(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<Answer>, MetadataError> {
        if self.platform != Platform::Aws {
            return self.send_get(path, None, timeout).await;
        }
        let token = self.aws_token(false).await?;
        match self.send_get(path, Some(token), timeout).await {
            Err(MetadataError::Status { status: 401, .. }) => {
                // Debug: a service that answers 401 to every token would repeat it at each
                // request (the preemption watcher's, every few seconds); the 401 that remains
                // is the caller's to report.
                tracing::debug!("the aws metadata session token expired; getting a new one");
                let token = self.aws_token(true).await?;
                self.send_get(path, Some(token), timeout).await
            }
            other => other,
        }
    }

    /// One GET of `path` and nothing more: on AWS a 401 (the session token expired, or a
    /// service that refuses every token) is returned as it is, not answered with a new token
    /// and a second GET at once. For a caller that polls on a schedule (the preemption
    /// watcher): it calls `forget_aws_token` and the next poll, no sooner, gets a new token,
    /// so that neither the GET nor the token's PUT is sent more often than the schedule says.
    pub async fn get_answer_once(
        &self,
        path: &str,
        timeout: Duration,
    ) -> Result<Option<Answer>, MetadataError> {
        let token = match self.platform {
            Platform::Aws => Some(self.aws_token(false).await?),
            _ => None,
        };
        self.send_get(path, token, timeout).await
    }

    /// Drops the kept AWS session token: the next request gets a new one first.
    pub async fn forget_aws_token(&self) {
        *self.aws_token.lock().await = None;
    }

    /// `get`, retried on network errors, 408, 429 and 5xx until it succeeds, fails for good,
    /// `MAX_ATTEMPTS`, or the next attempt could not start before `deadline`. Waits follow
    /// `backoff::plan` as for GitLab: at least a second, never before a `Retry-After`,
    /// randomised.
    pub async fn fetch(
        &self,
        path: &str,
        deadline: Instant,
    ) -> Result<Option<Vec<u8>>, MetadataError> {
        http::retry_until(
            deadline,
            MAX_ATTEMPTS,
            || self.get(path),
            || MetadataError::Unreachable {
                platform: self.platform,
                url: self.url(path),
                detail: "no answer before the deadline".into(),
                timed_out: true,
            },
        )
        .await
    }

    /// The IMDSv2 session token: the one kept, or a new one (`renew`, or none kept yet).
    async fn aws_token(&self, renew: bool) -> Result<HeaderValue, MetadataError> {
        let mut kept = self.aws_token.lock().await;
        if let Some(token) = kept.as_ref().filter(|_| !renew) {
            return Ok(token.clone());
        }
        let url = self.url(aws::TOKEN_PATH);
        let request = self
            .http
            .put(&url)
            .header(aws::TOKEN_TTL_HEADER, aws::TOKEN_TTL_SECONDS)
            .timeout(self.request_timeout);
        let body = match self.answer(&url, request).await {
            Ok(Some(answer)) => answer.body,
            Ok(None) => {
                return Err(self.status_error(&url, 404, None));
            }
            Err(MetadataError::Unreachable {
                detail,
                timed_out: true,
                ..
            }) => {
                return Err(MetadataError::AwsTokenUnanswered { url, detail });
            }
            Err(e) => return Err(e),
        };
        // A token is a short printable string; anything else did not come from IMDS.
        let token = std::str::from_utf8(&body)
            .ok()
            .map(str::trim)
            .filter(|t| !t.is_empty() && t.len() <= 1024)
            .and_then(|t| HeaderValue::from_str(t).ok())
            .ok_or_else(|| MetadataError::NotMetadataService {
                platform: self.platform,
                url: url.clone(),
                detail: format!(
                    "its answer to the token request ({} bytes) is not an IMDSv2 token",
                    body.len()
                ),
            })?;
        *kept = Some(token.clone());
        Ok(token)
    }

    async fn send_get(
        &self,
        path: &str,
        aws_token: Option<HeaderValue>,
        timeout: Duration,
    ) -> Result<Option<Answer>, MetadataError> {
        let url = self.url(path);
        let mut request = self.http.get(&url).timeout(timeout);
        match self.platform {
            Platform::Gce => request = request.header(gce::FLAVOR_HEADER, "Google"),
            Platform::Aws => {
                if let Some(token) = aws_token {
                    request = request.header(aws::TOKEN_HEADER, token);
                }
            }
            Platform::DigitalOcean => {}
        }
        self.answer(&url, request).await
    }

    /// Sends `request`; the answer to a 2xx, None for a 404, an error otherwise.
    async fn answer(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<Answer>, MetadataError> {
        let unreachable = |e: reqwest::Error| MetadataError::Unreachable {
            platform: self.platform,
            url: url.to_string(),
            detail: http::error_chain(&e),
            timed_out: e.is_timeout(),
        };
        let mut response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let header = |name: &str| http::header(&response, name);
        if (300..400).contains(&status) {
            let location = http::redirect_location(&response);
            return Err(MetadataError::Redirect {
                platform: self.platform,
                url: url.to_string(),
                status,
                location,
            });
        }
        let trusted = status == 404 || (200..300).contains(&status);
        if self.platform == Platform::Gce
            && trusted
            && header(gce::FLAVOR_HEADER).is_none_or(|v| v.trim() != "Google")
        {
            return Err(MetadataError::NotMetadataService {
                platform: self.platform,
                url: url.to_string(),
                detail: format!(
                    "its {status} answer has no Metadata-Flavor: Google header (a proxy or a captive portal?)"
                ),
            });
        }
        if status == 404 {
            return Ok(None);
        }
        if !(200..300).contains(&status) {
            let hint = backoff::server_hint(
                &backoff::Headers {
                    retry_after: header("retry-after").as_deref(),
                    ..backoff::Headers::default()
                },
                SystemTime::now(),
            );
            return Err(self.status_error(url, status, hint));
        }
        let etag = header("etag");
        match http::read_capped(&mut response, self.max_body)
            .await
            .map_err(unreachable)?
        {
            Some(body) => Ok(Some(Answer { body, etag })),
            None => Err(self.too_large(url)),
        }
    }

    fn status_error(&self, url: &str, status: u16, hint: Option<backoff::Hint>) -> MetadataError {
        MetadataError::Status {
            platform: self.platform,
            url: url.to_string(),
            status,
            retry_hint: hint,
        }
    }

    fn too_large(&self, url: &str) -> MetadataError {
        MetadataError::TooLarge {
            platform: self.platform,
            url: url.to_string(),
            cap_kib: self.max_body / 1024,
        }
    }
}
