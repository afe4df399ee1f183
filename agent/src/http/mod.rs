//! The one HTTP layer under every client of the agent (GitLab, the metadata services, the
//! broker): how a client is built, how an answer is read, how a failure reads, and (`retry`)
//! how a call is tried again. Each client adds only what its service needs (its headers, its
//! errors, its proxy rule, its retry policy).

use std::time::Duration;

mod retry;

pub use retry::{Overtime, Policy, RetryError, Retryable, Stopped, retry, retry_until};

/// A client that names the agent and follows no redirect: a redirect would carry a token (in
/// a header, or the body of a 307/308) to wherever `Location` points, so a 3xx is an answer
/// each client turns into an error naming it.
pub fn client_builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .user_agent(concat!("gitlab-runner-vm/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
}

/// The body, or None when it is larger than `cap` (then at most `cap` bytes were read: a
/// declared length above it reads nothing).
pub async fn read_capped(
    response: &mut reqwest::Response,
    cap: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// An error with its causes, one line: reqwest's own message says only "error sending
/// request"; the cause (connection refused, a TLS failure, a timeout) is in its sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A header of an answer as text (absent or not text: None).
pub fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Where a 3xx points, for an error that names it: scrubbed of token-shaped text, at most 200
/// characters.
pub fn redirect_location(response: &reqwest::Response) -> String {
    header(response, "location")
        .map(|l| crate::secret::scrub(&l).chars().take(200).collect())
        .unwrap_or_else(|| NO_LOCATION.into())
}

/// Where a 3xx without a `Location` header points, in its error.
pub const NO_LOCATION: &str = "nowhere (no Location header)";

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn the_chain_names_every_cause() {
        let e = Layer(
            "error sending request",
            Some(Box::new(Layer("connection refused", None))),
        );
        assert_eq!(error_chain(&e), "error sending request: connection refused");
    }
}
