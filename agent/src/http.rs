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

/// What the one retry loop needs to know of a client's errors.
pub trait RetryError: std::fmt::Display + Sized {
    /// Whether another attempt may succeed (a network error, 408, 429, 5xx).
    fn is_retryable(&self) -> bool;
    /// The server's word on when to come back (`Retry-After`, GitLab's RateLimit headers).
    fn retry_hint(&self) -> Option<&backoff::Hint>;
    /// Giving up after `attempts` tries and `seconds`, with the last error.
    fn gave_up(attempts: u32, seconds: u64, last: Self) -> Self;
}

/// `attempt_once` until it succeeds, fails for good, has been tried `max_attempts` times, or
/// no wait leaves the next try room before `deadline`; an attempt cut by the deadline is
/// `no_answer`. The waits follow `backoff::plan` (at least
/// a second, never before a server's hint, randomised); each is said in the journal.
pub async fn retry_until<T, E, F, Fut>(
    deadline: Instant,
    max_attempts: u32,
    mut attempt_once: F,
    no_answer: impl Fn() -> E,
) -> Result<T, E>
where
    E: RetryError,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut memory = backoff::Memory::default();
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error = match tokio::time::timeout(remaining, attempt_once()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if !e.is_retryable() => return Err(e),
            Ok(Err(e)) => e,
            Err(_) => no_answer(),
        };
        let gave_up = |last| E::gave_up(attempt, started.elapsed().as_secs(), last);
        if attempt >= max_attempts {
            return Err(gave_up(error));
        }
        let Some(wait) = wait_before_retry(attempt, error.retry_hint(), &mut memory, deadline)
        else {
            return Err(gave_up(error));
        };
        tracing::warn!("{error}; retry {attempt} in {:.1} s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    }
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
        .unwrap_or_else(|| "nowhere (no Location header)".into())
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

    /// An error of a made-up client: retryable or not, and what the loop made of it.
    #[derive(Debug, PartialEq)]
    enum Fake {
        Busy,
        Refused,
        NoAnswer,
        GaveUp(u32, Box<Fake>),
    }

    impl std::fmt::Display for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    impl RetryError for Fake {
        fn is_retryable(&self) -> bool {
            matches!(self, Fake::Busy | Fake::NoAnswer)
        }
        fn retry_hint(&self) -> Option<&backoff::Hint> {
            None
        }
        fn gave_up(attempts: u32, _seconds: u64, last: Self) -> Self {
            Fake::GaveUp(attempts, Box::new(last))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_an_answer_and_stops_at_a_refusal() {
        let deadline = Instant::now() + Duration::from_secs(600);
        let mut tries = 0;
        let answer: Result<u32, Fake> = retry_until(
            deadline,
            50,
            || {
                tries += 1;
                let now = tries;
                async move { if now < 3 { Err(Fake::Busy) } else { Ok(now) } }
            },
            || Fake::NoAnswer,
        )
        .await;
        assert_eq!(answer, Ok(3));

        let mut tries = 0;
        let refused: Result<(), Fake> = retry_until(
            deadline,
            50,
            || {
                tries += 1;
                async { Err(Fake::Refused) }
            },
            || Fake::NoAnswer,
        )
        .await;
        assert_eq!(refused, Err(Fake::Refused));
        assert_eq!(tries, 1, "a refusal is not tried again");
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_attempt_limit_or_the_deadline() {
        let deadline = Instant::now() + Duration::from_secs(3600);
        let limited: Result<(), Fake> =
            retry_until(deadline, 4, || async { Err(Fake::Busy) }, || Fake::NoAnswer).await;
        assert_eq!(limited, Err(Fake::GaveUp(4, Box::new(Fake::Busy))));

        // An attempt that never answers is cut at the deadline, and nothing is tried after it.
        let soon = Instant::now() + Duration::from_secs(5);
        let stalled: Result<(), Fake> =
            retry_until(soon, 50, std::future::pending::<Result<(), Fake>>, || {
                Fake::NoAnswer
            })
            .await;
        assert_eq!(stalled, Err(Fake::GaveUp(1, Box::new(Fake::NoAnswer))));
        assert!(Instant::now() <= soon + Duration::from_millis(1));
    }
}
