//! The only I/O of the watchers: requests to the metadata service. AWS: an IMDSv2 session token,
//! then GETs with it. GCE: GETs with `Metadata-Flavor: Google`, as long polls once the current
//! value is known. No redirect is followed, no proxy is used (the service is link-local), and no
//! body is read past `MAX_BODY`.

use std::time::Duration;

/// Notices are a few dozen bytes; anything larger is not one.
pub const MAX_BODY: usize = 16 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A request that is no long poll and takes longer is a failure, retried at the next poll.
pub const AWS_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The token's lifetime asked of IMDSv2 (the maximum, six hours).
pub const AWS_TOKEN_TTL_SECONDS: u64 = 21_600;
/// A long poll's answer may come this much after its `timeout_sec` before it is a failure.
const GCE_GRACE: Duration = Duration::from_secs(10);

/// A status, its body (None: larger than `MAX_BODY`) and GCE's ETag.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Option<Vec<u8>>,
    pub etag: Option<String>,
}

pub struct MetadataHttp {
    client: reqwest::Client,
    base: String,
}

impl MetadataHttp {
    pub fn new(base_url: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("gitlab-runner-vm/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| anyhow::anyhow!("cannot set up the metadata client: {e}"))?;
        Ok(MetadataHttp {
            client,
            base: base_url.trim_end_matches('/').to_string(),
        })
    }

    /// `PUT /latest/api/token`: an IMDSv2 session token (the body of a 200).
    pub async fn aws_token(&self) -> Result<Answer, String> {
        let request = self
            .client
            .put(format!("{}/latest/api/token", self.base))
            .header(
                "X-aws-ec2-metadata-token-ttl-seconds",
                AWS_TOKEN_TTL_SECONDS.to_string(),
            )
            .timeout(AWS_REQUEST_TIMEOUT);
        send(request).await
    }

    /// `GET /latest/meta-data/<path>` with the session token.
    pub async fn aws_get(&self, path: &str, token: &str) -> Result<Answer, String> {
        let request = self
            .client
            .get(format!("{}/latest/meta-data/{path}", self.base))
            .header("X-aws-ec2-metadata-token", token)
            .timeout(AWS_REQUEST_TIMEOUT);
        send(request).await
    }

    /// `GET /computeMetadata/v1/instance/<key>`. `wait`: None reads the current value at once;
    /// Some((last ETag, seconds)) waits until the value differs from that ETag's (or, without
    /// one, changes), at most that many seconds.
    pub async fn gce_get(
        &self,
        key: &str,
        wait: Option<(Option<&str>, u64)>,
    ) -> Result<Answer, String> {
        let mut url =
            reqwest::Url::parse(&format!("{}/computeMetadata/v1/instance/{key}", self.base))
                .map_err(|e| format!("a bad metadata URL ({e})"))?;
        if let Some((etag, seconds)) = wait {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("wait_for_change", "true")
                .append_pair("timeout_sec", &seconds.to_string());
            if let Some(etag) = etag {
                query.append_pair("last_etag", etag);
            }
        }
        let timeout = match wait {
            None => AWS_REQUEST_TIMEOUT,
            Some((_, seconds)) => Duration::from_secs(seconds) + GCE_GRACE,
        };
        let request = self
            .client
            .get(url)
            .header("Metadata-Flavor", "Google")
            .timeout(timeout);
        send(request).await
    }
}

async fn send(request: reqwest::RequestBuilder) -> Result<Answer, String> {
    let mut response = request.send().await.map_err(|e| describe(&e))?;
    let status = response.status().as_u16();
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.chars().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned);
    let too_large = response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64);
    let mut body = Some(Vec::new());
    if too_large {
        body = None;
    } else {
        while let Some(chunk) = response.chunk().await.map_err(|e| describe(&e))? {
            let read = body.as_mut().expect("set above");
            if read.len() + chunk.len() > MAX_BODY {
                body = None;
                break;
            }
            read.extend_from_slice(&chunk);
        }
    }
    Ok(Answer { status, body, etag })
}

/// The error and its causes on one line (a timeout, a refused connection...).
fn describe(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "no answer in time".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    crate::secret::scrub(&text)
}
