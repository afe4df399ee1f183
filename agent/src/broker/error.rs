//! What can go wrong when asking the broker for this boot's runner, and what to do about it.
//! The kind drives the retry: no answer, 408, 429 and 5xx are tried again within
//! `--config-wait`; a refusal (401, 403, 409) is final, because asking again cannot change it:
//! 409 means this pod already got its runner (a rebooted VM, or a replayed token), and such a
//! VM powers off.

use std::path::PathBuf;

use crate::backoff::Hint;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "{path} (the pod's service-account token, --broker-token-file) did not appear within {seconds} s"
    )]
    TokenFileMissing { path: PathBuf, seconds: u64 },
    #[error("cannot read {path} (the pod's service-account token, --broker-token-file): {detail}")]
    TokenFileUnreadable { path: PathBuf, detail: String },
    #[error("{path} (the pod's service-account token, --broker-token-file) is {what}")]
    TokenFileInvalid { path: PathBuf, what: String },
    #[error("--broker-url {url} is not an http:// or https:// URL")]
    InvalidUrl { url: String },
    #[error("cannot set up the HTTP client for the broker: {0}")]
    Client(String),
    /// No answer: refused, reset, timed out, cut short.
    #[error("cannot reach the broker at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The broker refused, or failed: its own words (`{"error": ...}`), masked and capped.
    #[error("the broker answered {status} to {url}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
        retry_hint: Option<Hint>,
    },
    #[error(
        "the broker answered {status} to {url}, a redirect to {location}; the agent follows no redirect"
    )]
    Redirect {
        url: String,
        status: u16,
        location: String,
    },
    #[error("the broker's answer to {url} is larger than {cap_kib} KiB")]
    TooLarge { url: String, cap_kib: usize },
    /// A 201 that is not the broker's answer (an HTML page of a proxy, a JSON without a token).
    #[error("{url} did not answer as the broker does: {detail}")]
    NotBroker { url: String, detail: String },
    #[error("gave up after {attempts} attempt(s) in {seconds} s: {last}")]
    GaveUp {
        attempts: u32,
        seconds: u64,
        last: Box<BrokerError>,
    },
}

impl BrokerError {
    /// No answer, 408, 429 and 5xx: the broker (or the API server or GitLab behind it) may
    /// answer differently in a moment.
    pub fn is_retryable(&self) -> bool {
        match self {
            BrokerError::Unreachable { .. } => true,
            BrokerError::Status { status, .. } => matches!(status, 408 | 429 | 500..),
            _ => false,
        }
    }

    pub fn retry_hint(&self) -> Option<&Hint> {
        match self {
            BrokerError::Status { retry_hint, .. } => retry_hint.as_ref(),
            _ => None,
        }
    }

    /// What the operator should do about it.
    pub fn fix(&self) -> String {
        use BrokerError::*;
        match self {
            TokenFileMissing { path, .. } => format!(
                "give the VM KubeVirt's serviceAccount volume (volumes: - name: identity, serviceAccount: serviceAccountName: gitlab-runner-vm-identity, and a disk named identity with serial identity; examples/kubevirt/broker/pool.yaml), which the runner image mounts so that {} exists; or point --broker-token-file (GITLAB_RUNNER_VM_BROKER_TOKEN_FILE) at the token",
                path.display()
            ),
            TokenFileUnreadable { .. } | TokenFileInvalid { .. } => "the file must be the pod's service-account token as KubeVirt's serviceAccount volume writes it (one line of printable ASCII); check the VM's identity volume and --broker-token-file".into(),
            InvalidUrl { .. } => "set --broker-url (GITLAB_RUNNER_VM_BROKER_URL) to the broker's Service, by default http://gitlab-runner-vm-broker (examples/kubevirt/broker/broker.yaml)".into(),
            Client(_) => "this is a bug in gitlab-runner-vm; please report it with the journal".into(),
            Unreachable { .. } => "check that the broker runs (kubectl get deploy gitlab-runner-vm-broker), that --broker-url names its Service in the VM's namespace, and that the NetworkPolicies let this VM's pod (label gitlab-runner-vm/identity: broker) reach it".into(),
            Status { status: 401, .. } => "the broker did not accept the pod's token (expired, of a deleted pod, or not a service-account token): check that the VM's identity volume is KubeVirt's serviceAccount volume of the pool's ServiceAccount; a new VM gets a fresh token".into(),
            Status { status: 403, .. } => "the broker's settings do not admit this VM: check its --namespace, --vm-service-account and --vm-selector against the VM's namespace, serviceAccountName and labels (docs/broker.md)".into(),
            Status { status: 409, .. } => "nothing to fix: this pod already got its runner (the VM was rebooted, or its token was used before); the VM powers off and the platform starts a fresh one, which gets a runner of its own".into(),
            Status { status, .. } if *status >= 500 || *status == 429 || *status == 408 => "the broker (or the Kubernetes API or GitLab behind it) kept failing: read the broker's log (kubectl logs deploy/gitlab-runner-vm-broker)".into(),
            Status { .. } => "check that --broker-url points at the broker (it answers POST /v1/runner)".into(),
            Redirect { .. } | NotBroker { .. } | TooLarge { .. } => "something else answers at --broker-url (a proxy, an ingress, another service): point --broker-url (GITLAB_RUNNER_VM_BROKER_URL) at the broker's Service".into(),
            GaveUp { last, .. } => last.fix(),
        }
    }
}

impl crate::http::Retryable for BrokerError {
    fn is_retryable(&self) -> bool {
        BrokerError::is_retryable(self)
    }

    fn retry_hint(&self) -> Option<&Hint> {
        BrokerError::retry_hint(self)
    }
}

impl crate::http::RetryError for BrokerError {
    fn gave_up(attempts: u32, seconds: u64, last: Self) -> Self {
        BrokerError::GaveUp {
            attempts,
            seconds,
            last: Box::new(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(status: u16) -> BrokerError {
        BrokerError::Status {
            url: "http://gitlab-runner-vm-broker/v1/runner".into(),
            status,
            message: "m".into(),
            retry_hint: None,
        }
    }

    #[test]
    fn refusals_are_final_and_failures_are_retried() {
        for s in [401, 403, 404, 409, 400] {
            assert!(!status(s).is_retryable(), "{s}");
        }
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(status(s).is_retryable(), "{s}");
        }
        assert!(status(409).fix().contains("powers off"));
        assert!(status(403).fix().contains("--vm-selector"));
    }
}
