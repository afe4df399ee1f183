//! What can go wrong when asking a platform's metadata service, and what to do about it. An
//! enum at this boundary because the kind drives the retry: a refused or reset connection, a
//! timeout, 408, 429 and 5xx are worth another try within the deadline; the rest is permanent.

use super::Platform;
use crate::backoff::Hint;

#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// No answer: refused, reset, timed out, cut short.
    #[error("cannot reach the {platform} metadata service at {url}: {detail}")]
    Unreachable {
        platform: Platform,
        url: String,
        detail: String,
        /// It timed out (rather than being refused or reset).
        timed_out: bool,
    },
    /// AWS: the PUT for an IMDSv2 session token got no answer in time. The classic cause is a
    /// hop limit of 1 behind an extra hop (a container, a bridge): the answer is dropped on the
    /// way back, so the PUT times out while GETs would work.
    #[error(
        "the aws metadata service at {url} did not answer the PUT for an IMDSv2 session token: {detail}"
    )]
    AwsTokenUnanswered { url: String, detail: String },
    #[error("the {platform} metadata service answered {status} to {url}")]
    Status {
        platform: Platform,
        url: String,
        status: u16,
        /// Retry-After, if the service sent it.
        retry_hint: Option<Hint>,
    },
    #[error(
        "the {platform} metadata service answered {status} to {url}, a redirect to {location}; the agent follows no redirect"
    )]
    Redirect {
        platform: Platform,
        url: String,
        status: u16,
        location: String,
    },
    /// Something answered that is not the platform's metadata service (a proxy, a captive
    /// portal, another platform's service).
    #[error("{url} is not the {platform} metadata service: {detail}")]
    NotMetadataService {
        platform: Platform,
        url: String,
        detail: String,
    },
    #[error("the {platform} metadata service's answer to {url} is larger than {cap_kib} KiB")]
    TooLarge {
        platform: Platform,
        url: String,
        cap_kib: usize,
    },
    #[error("cannot set up the HTTP client for the metadata service: {0}")]
    Client(String),
    #[error("--metadata-url {url} is not an http:// or https:// URL")]
    InvalidUrl { url: String },
    #[error("gave up after {attempts} attempt(s) in {seconds} s: {last}")]
    GaveUp {
        attempts: u32,
        seconds: u64,
        last: Box<MetadataError>,
    },
}

impl MetadataError {
    /// Network errors, 408, 429 and 5xx; a 401 is retried inside the client (a new token).
    pub fn is_retryable(&self) -> bool {
        match self {
            MetadataError::Unreachable { .. } | MetadataError::AwsTokenUnanswered { .. } => true,
            MetadataError::Status { status, .. } => matches!(status, 408 | 429 | 500..),
            MetadataError::Redirect { .. }
            | MetadataError::NotMetadataService { .. }
            | MetadataError::TooLarge { .. }
            | MetadataError::Client(_)
            | MetadataError::InvalidUrl { .. }
            | MetadataError::GaveUp { .. } => false,
        }
    }

    /// It came from the IMDSv2 session token's PUT, not from the GET that needed the token.
    pub fn is_aws_token(&self) -> bool {
        use MetadataError::*;
        match self {
            AwsTokenUnanswered { .. } => true,
            Unreachable { url, .. }
            | Status { url, .. }
            | Redirect { url, .. }
            | NotMetadataService { url, .. }
            | TooLarge { url, .. } => url.ends_with(super::aws::TOKEN_PATH),
            Client(_) | InvalidUrl { .. } => false,
            GaveUp { last, .. } => last.is_aws_token(),
        }
    }

    pub(super) fn retry_hint(&self) -> Option<&Hint> {
        match self {
            MetadataError::Status { retry_hint, .. } => retry_hint.as_ref(),
            _ => None,
        }
    }

    /// What the operator should do about it.
    pub fn fix(&self) -> String {
        use MetadataError::*;
        match self {
            Unreachable { platform, .. } => format!(
                "check that this VM runs on {platform} (--config-source {platform}; auto recognises the platform from DMI) and that no firewall (nftables in the image, a security group or a proxy) blocks 169.254.169.254; on a platform without a metadata service use --config-source file"
            ),
            AwsTokenUnanswered { .. } => "check the instance's metadata options (aws ec2 describe-instances ... MetadataOptions): HttpEndpoint enabled, HttpPutResponseHopLimit at least 1 (2 if the agent runs behind another hop such as a container); HttpTokens required is fine, the agent only speaks IMDSv2".into(),
            Status {
                platform: Platform::Aws,
                status: 403,
                ..
            } => "the instance metadata service is disabled for this instance: aws ec2 modify-instance-metadata-options --instance-id <id> --http-endpoint enabled".into(),
            Status {
                platform: Platform::Aws,
                status: 400 | 405,
                ..
            } => "the metadata service refused an IMDSv2 request: check the instance's metadata options (aws ec2 describe-instances ... MetadataOptions); HttpTokens required or optional both work".into(),
            Status { platform, status, .. } if *status >= 500 || *status == 429 || *status == 408 => format!(
                "the {platform} metadata service kept failing; retry later, or check the platform's status page"
            ),
            Status { platform, .. } => format!(
                "check that this VM runs on {platform} and that --metadata-url points at its metadata service"
            ),
            Redirect { .. } | NotMetadataService { .. } => "something else answers at the metadata address (a proxy, a captive portal, or another platform): check --metadata-url and --config-source, and that HTTP to 169.254.169.254 is not intercepted".into(),
            TooLarge { .. } => "runner.json is a few hundred bytes: set the instance's user-data to runner.json alone".into(),
            Client(_) => "this is a bug in gitlab-runner-vm; please report it with the journal".into(),
            InvalidUrl { .. } => "set --metadata-url (GITLAB_RUNNER_VM_METADATA_URL) to the metadata service's base URL; every supported platform serves it at the default, http://169.254.169.254".into(),
            GaveUp { last, .. } => last.fix(),
        }
    }
}

impl crate::http::Retryable for MetadataError {
    fn is_retryable(&self) -> bool {
        MetadataError::is_retryable(self)
    }

    fn retry_hint(&self) -> Option<&Hint> {
        MetadataError::retry_hint(self)
    }
}

impl crate::http::RetryError for MetadataError {
    fn gave_up(attempts: u32, seconds: u64, last: Self) -> Self {
        MetadataError::GaveUp {
            attempts,
            seconds,
            last: Box::new(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(platform: Platform, status: u16) -> MetadataError {
        MetadataError::Status {
            platform,
            url: "http://169.254.169.254/x".into(),
            status,
            retry_hint: None,
        }
    }

    #[test]
    fn transient_failures_are_retried_and_answers_that_will_not_change_are_not() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(status(Platform::Gce, s).is_retryable(), "{s}");
        }
        for s in [400, 401, 403, 405, 410] {
            assert!(!status(Platform::Gce, s).is_retryable(), "{s}");
        }
        let unreachable = MetadataError::Unreachable {
            platform: Platform::Aws,
            url: "u".into(),
            detail: "refused".into(),
            timed_out: false,
        };
        assert!(unreachable.is_retryable());
        let gave_up = MetadataError::GaveUp {
            attempts: 3,
            seconds: 10,
            last: Box::new(unreachable),
        };
        assert!(!gave_up.is_retryable());
        assert!(gave_up.fix().contains("firewall"), "{}", gave_up.fix());
    }

    #[test]
    fn the_token_s_failures_are_told_from_the_get_s() {
        let at = |url: &str| MetadataError::Status {
            platform: Platform::Aws,
            url: url.into(),
            status: 403,
            retry_hint: None,
        };
        assert!(at("http://169.254.169.254/latest/api/token").is_aws_token());
        assert!(!at("http://169.254.169.254/latest/meta-data/spot/instance-action").is_aws_token());
        let unanswered = MetadataError::AwsTokenUnanswered {
            url: "u".into(),
            detail: "timed out".into(),
        };
        assert!(unanswered.is_aws_token());
    }

    #[test]
    fn aws_errors_name_the_instance_metadata_options() {
        let disabled = status(Platform::Aws, 403).fix();
        assert!(disabled.contains("--http-endpoint enabled"), "{disabled}");
        let hop = MetadataError::AwsTokenUnanswered {
            url: "u".into(),
            detail: "timed out".into(),
        }
        .fix();
        assert!(hop.contains("HttpPutResponseHopLimit"), "{hop}");
        assert!(status(Platform::Gce, 403).fix().contains("--metadata-url"));
    }
}
