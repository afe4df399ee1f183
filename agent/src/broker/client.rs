//! The HTTP client for the broker: one `POST /v1/runner` with the pod's token as a bearer
//! token, retried within a deadline with the project's back-off.
//!
//! As narrow as the metadata client: no redirect is followed (the pod's token must reach the
//! broker and nothing else), no proxy is used (HTTP_PROXY in the environment must see neither
//! the pod's token nor the runner token in the answer), and no answer is read past `MAX_BODY`.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::BrokerError;
use crate::secret::Secret;
use crate::{backoff, http};

/// The broker may take its whole `--mint-deadline` (60 s by default) to create a runner while
/// GitLab throttles it; a request that takes longer is lost and tried again within the deadline.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The answer is a few hundred bytes of JSON.
pub const MAX_BODY: usize = 64 * 1024;
/// How much of a refusal's text is shown.
const MAX_MESSAGE: usize = 300;

pub const RUNNER_PATH: &str = "/v1/runner";

#[derive(Debug)]
pub struct BrokerClient {
    url: String,
    http: reqwest::Client,
    request_timeout: Duration,
}

impl BrokerClient {
    /// `base_url` is the broker's root (`--broker-url`).
    pub fn new(base_url: &str) -> Result<Self, BrokerError> {
        let base = base_url.trim_end_matches('/');
        // A typo is not worth retrying until the deadline.
        match reqwest::Url::parse(base) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
            _ => {
                return Err(BrokerError::InvalidUrl {
                    url: crate::secret::scrub(base_url).chars().take(200).collect(),
                });
            }
        }
        let http = http::client_builder(CONNECT_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| BrokerError::Client(e.to_string()))?;
        Ok(BrokerClient {
            url: format!("{base}{RUNNER_PATH}"),
            http,
            request_timeout: REQUEST_TIMEOUT,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// `post` until it succeeds, fails for good, or the deadline leaves no room for another
    /// attempt.
    pub async fn fetch(
        &self,
        pod_token: &Secret,
        deadline: Instant,
    ) -> Result<Vec<u8>, BrokerError> {
        // As often as the deadline allows: a broker that is starting answers 503 for a while.
        http::retry_until(
            deadline,
            u32::MAX,
            || self.post(pod_token),
            || BrokerError::Unreachable {
                url: self.url.clone(),
                detail: "no answer before the deadline (--config-wait)".into(),
            },
        )
        .await
    }

    /// One `POST /v1/runner`: the body of a 201 (or any 2xx), an error otherwise.
    pub async fn post(&self, pod_token: &Secret) -> Result<Vec<u8>, BrokerError> {
        let url = self.url.as_str();
        let unreachable = |e: reqwest::Error| BrokerError::Unreachable {
            url: url.to_string(),
            detail: http::error_chain(&e),
        };
        let mut response = self
            .http
            .post(url)
            .bearer_auth(pod_token.expose())
            .timeout(self.request_timeout)
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        let header = |name: &str| http::header(&response, name);
        if (300..400).contains(&status) {
            let location = http::redirect_location(&response);
            return Err(BrokerError::Redirect {
                url: url.to_string(),
                status,
                location,
            });
        }
        let hint = backoff::server_hint(
            &backoff::Headers {
                retry_after: header("retry-after").as_deref(),
                ..backoff::Headers::default()
            },
            SystemTime::now(),
        );
        let Some(body) = http::read_capped(&mut response, MAX_BODY)
            .await
            .map_err(unreachable)?
        else {
            return Err(self.too_large_or_status(status, hint));
        };
        if !(200..300).contains(&status) {
            return Err(BrokerError::Status {
                url: url.to_string(),
                status,
                message: refusal_message(&body),
                retry_hint: hint,
            });
        }
        Ok(body)
    }

    /// An oversized 2xx is not the broker's; an oversized error is still the error its status
    /// says (a 503 page of a proxy is retried as any 503).
    fn too_large_or_status(&self, status: u16, hint: Option<backoff::Hint>) -> BrokerError {
        if (200..300).contains(&status) {
            BrokerError::TooLarge {
                url: self.url.clone(),
                cap_kib: MAX_BODY / 1024,
            }
        } else {
            BrokerError::Status {
                url: self.url.clone(),
                status,
                message: "(an answer too large to show)".into(),
                retry_hint: hint,
            }
        }
    }
}

/// The broker's `{"error": "..."}`, masked and capped; of anything else only its size, since it
/// is not the broker's (an HTML error page of a proxy).
pub fn refusal_message(body: &[u8]) -> String {
    let said = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned));
    match said {
        Some(text) => {
            let text: String = text
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAX_MESSAGE)
                .collect();
            crate::secret::scrub(&text)
        }
        None => format!("{} bytes that are not the broker's JSON", body.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_shows_the_broker_s_words_masked_and_nothing_of_other_bodies() {
        // Token-shaped, made at run time: no token-like literal in the sources.
        let token = ["glrt", "-fakeTokenOnlyForTests12345"].concat();
        let said = refusal_message(
            format!(r#"{{"error": "pod already granted runner 5\n(token {token})"}}"#).as_bytes(),
        );
        assert!(said.starts_with("pod already granted runner 5 "), "{said}");
        assert!(!said.contains("fakeTokenOnlyForTests"), "{said}");
        let html = refusal_message(format!("<html><body>{token}</body></html>").as_bytes());
        assert_eq!(html, "57 bytes that are not the broker's JSON");
        let long = refusal_message(format!(r#"{{"error": "{}"}}"#, "x".repeat(5000)).as_bytes());
        assert_eq!(long.chars().count(), MAX_MESSAGE);
    }

    #[test]
    fn urls_that_cannot_be_the_broker_are_refused_at_once() {
        for url in ["gitlab-runner-vm-broker", "ftp://broker", "http://", ""] {
            assert!(
                matches!(BrokerClient::new(url), Err(BrokerError::InvalidUrl { .. })),
                "{url}"
            );
        }
        let client = BrokerClient::new("http://gitlab-runner-vm-broker/").unwrap();
        assert_eq!(client.url(), "http://gitlab-runner-vm-broker/v1/runner");
    }
}
