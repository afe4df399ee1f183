//! What can go wrong with a call to GitLab's runner API, and what to do about it: the
//! endpoints, the error enum, which statuses are worth another try (`retry_is_safe`) and the
//! fix that a permanent error names.
//!
//! Errors are an enum at this boundary because the status code drives decisions: 408, 429 and
//! 5xx are retried, 403/404 on deletion mean "already gone", the rest are permanent and get an
//! explanation that names the fix.

use crate::backoff::Hint;

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

    pub(super) fn retry_hint(&self) -> Option<&Hint> {
        match self {
            ApiError::Status { retry_hint, .. } => retry_hint.as_ref(),
            _ => None,
        }
    }

    /// A 429 that says when the throttle resets.
    pub(super) fn is_throttle_with_reset(&self) -> bool {
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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A status error with a placeholder message, for tests of what a status leads to.
    pub(in crate::gitlab) fn status(endpoint: Endpoint, status: u16) -> ApiError {
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
}
