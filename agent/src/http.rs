//! The one HTTP layer under every client of the agent (GitLab, the metadata services, the
//! broker): how a client is built, how an answer is read, how a failure reads, and how long to
//! wait before trying again. Each client adds only what its service needs (its headers, its
//! errors, its proxy rule).

use std::time::Duration;

use tokio::time::Instant;

use crate::backoff;

/// A retry is not started unless this much of the deadline is left for the request itself.
pub const RETRY_SLACK: Duration = Duration::from_millis(500);

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

/// The wait before the next try after failed attempt `attempt` (1 for the first), picked by
/// the project's back-off from the server's hint; None when no wait leaves a request its
/// `RETRY_SLACK` before `limit`.
pub fn wait_before_retry(
    attempt: u32,
    hint: Option<&backoff::Hint>,
    memory: &mut backoff::Memory,
    limit: Instant,
) -> Option<Duration> {
    let room = limit
        .saturating_duration_since(Instant::now())
        .saturating_sub(RETRY_SLACK);
    backoff::plan(attempt.saturating_sub(1), hint, memory).pick(backoff::random_u64(), room)
}

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

    #[tokio::test]
    async fn no_wait_when_the_deadline_leaves_no_room() {
        let mut memory = backoff::Memory::default();
        let soon = Instant::now() + RETRY_SLACK / 2;
        assert_eq!(wait_before_retry(1, None, &mut memory, soon), None);
        let later = Instant::now() + Duration::from_secs(600);
        let wait = wait_before_retry(1, None, &mut memory, later).expect("room for a wait");
        assert!(wait < Duration::from_secs(600));
    }
}
