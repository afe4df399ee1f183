//! The HTTP side of the client: one `reqwest` client per GitLab, how a request is sent and how
//! its answer is read into a value or an `ApiError`.
//!
//! What it accepts is narrow on purpose: it follows no redirect (a token must never travel to
//! an address runner.json does not name), a success is only the JSON GitLab sends, and no
//! answer is read past `MAX_BODY`. Every text it puts in an error is redacted and scrubbed of
//! token-shaped strings before it is cut to length.

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{ApiError, Endpoint, retry_is_safe};
use crate::secret::{self, Secret, redact};
use crate::{backoff, http};

/// One request may take this long before it counts as a network error and is retried (within
/// the phase's deadline).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Answers are read up to this size. The runner API's answers are a few hundred bytes; a
/// larger one is not GitLab's (a success that large is a `Body` error; of an error status only
/// this much is read, for its message).
pub(super) const MAX_BODY: usize = 64 * 1024;
/// A server's error message is cut to this many characters, after redaction.
pub(super) const MAX_MESSAGE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub struct Client {
    pub(super) http: reqwest::Client,
    /// The API's root: `<base url>/api/v4`.
    pub(super) api: String,
}

/// The context of one request, for its errors.
pub(super) struct Request<'a> {
    pub(super) endpoint: Endpoint,
    pub(super) secrets: &'a [&'a Secret],
    /// For a call that creates a runner: the runner's description.
    pub(super) creates: Option<&'a str>,
}

impl Request<'_> {
    /// Known secrets masked, any other token-shaped text masked, then cut to length.
    pub(super) fn clean(&self, text: &str, max_chars: usize) -> String {
        let clean = secret::scrub(&redact(text, self.secrets));
        match clean.char_indices().nth(max_chars) {
            Some((at, _)) => format!("{}…", &clean[..at]),
            None => clean,
        }
    }

    pub(super) fn maybe_created(&self, detail: String) -> ApiError {
        ApiError::MaybeCreated {
            endpoint: self.endpoint,
            description: self.creates.unwrap_or_default().to_string(),
            detail,
        }
    }

    /// No usable answer: for a call that creates a runner that is `MaybeCreated` unless the
    /// request surely never left (`sent` false: no connection was made).
    fn no_answer(&self, e: &reqwest::Error, sent: bool) -> ApiError {
        let detail = self.clean(&http::error_chain(e), usize::MAX);
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
        // No redirect is followed: a 3xx is an error naming where it pointed.
        let mut builder = http::client_builder(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT);
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
    pub(super) async fn send(
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
        let header = |name: &str| http::header(&response, name);
        if (300..400).contains(&status) {
            return Err(redirect(r, &response));
        }
        let (retry_after, reset, reset_time, observed, limit) = (
            header("retry-after"),
            header("ratelimit-reset"),
            header("ratelimit-resettime"),
            header("ratelimit-observed"),
            header("ratelimit-limit"),
        );
        let retry_hint = backoff::server_hint(
            &backoff::Headers {
                retry_after: retry_after.as_deref(),
                ratelimit_reset: reset.as_deref(),
                ratelimit_reset_time: reset_time.as_deref(),
                ratelimit_observed: observed.as_deref(),
                ratelimit_limit: limit.as_deref(),
            },
            SystemTime::now(),
        );
        let content_type = header("content-type").unwrap_or_else(|| "no type".into());

        if (200..300).contains(&status) {
            let answer = match http::read_capped(&mut response, MAX_BODY).await {
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
        let text = match http::read_capped(&mut response, MAX_BODY).await {
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
}

/// A 3xx: where it points (absolute, without user info, query or fragment), and the base URL
/// it suggests.
fn redirect(r: &Request<'_>, response: &reqwest::Response) -> ApiError {
    let location = http::header(response, "location");
    let location = location.as_deref();
    let target = location
        .and_then(|l| response.url().join(l).ok())
        .map(|mut url| {
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
        (None, None) => http::NO_LOCATION.into(),
    };
    ApiError::Redirect {
        endpoint: r.endpoint,
        status: response.status().as_u16(),
        location,
        suggestion,
    }
}
