//! The client for GitLab's runner API: verify, legacy registration, runner creation with an
//! access token, and deletion; plus the retry policy around them.
//!
//! - `error`: the endpoints, `ApiError`, which statuses are retried, the fix each error names;
//! - `client`: `Client`, how a request is sent and its answer read (no redirects, JSON-only
//!   successes, body caps, redaction of everything put in an error);
//! - `api`: the calls themselves (request bodies, what an answer must hold, `Call`);
//! - `retry`: `with_retries`, the rules of each endpoint for the one retry loop (`http::retry`):
//!   which calls are never cut, which ride out a throttle past the deadline, the attempt bound.
//!
//! The client is tested in-process against a fresh wiremock server per test (`mock_tests`), and
//! the retry policy in paused time (`retry/tests.rs`, `retry/wait_tests.rs`).

mod api;
mod client;
mod error;
mod retry;

#[cfg(test)]
mod mock_tests;

pub use api::{Call, CreatedRunner, Deletion, RunnerInfo};
pub use client::Client;
pub use error::{ApiError, Endpoint, retry_is_safe};
pub use retry::{MAX_ATTEMPTS, RetryError, with_retries, with_retries_until};
