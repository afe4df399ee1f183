//! A fake metadata service (AWS IMDSv2 and GCE on one wiremock server) whose notice endpoints
//! are quiet until a test announces the VM's end, and the agent started against it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use wiremock::matchers::{method, path, query_param_is_missing};
use wiremock::{Mock, MockServer, ResponseTemplate};

use super::{Harness, mount};

pub const PREEMPTED: &str = "/computeMetadata/v1/instance/preempted";
pub const MAINTENANCE: &str = "/computeMetadata/v1/instance/maintenance-event";
pub const INSTANCE_ACTION: &str = "/latest/meta-data/spot/instance-action";
pub const REBALANCE: &str = "/latest/meta-data/events/recommendations/rebalance";

/// A 200 from the fake metadata service; GCE's says `Metadata-Flavor: Google`, as the real one
/// does (the agent takes an answer without it for something else's).
pub fn ok(p: &str) -> ResponseTemplate {
    let answer = ResponseTemplate::new(200);
    if p.starts_with("/computeMetadata/") {
        answer.insert_header("Metadata-Flavor", "Google")
    } else {
        answer
    }
}

/// IMDSv2's session token.
pub async fn imds_token(meta: &MockServer) {
    mount(
        meta,
        "PUT",
        "/latest/api/token",
        ResponseTemplate::new(200).set_body_string("imds-token-1"),
    )
    .await;
}

/// GCE keys that announce nothing: the current value, then long polls that run out.
pub async fn quiet_gce(meta: &MockServer) {
    for (p, value) in [(PREEMPTED, "FALSE"), (MAINTENANCE, "NONE")] {
        Mock::given(method("GET"))
            .and(path(p))
            .and(query_param_is_missing("wait_for_change"))
            .respond_with(ok(p).insert_header("ETag", "e1").set_body_string(value))
            .mount(meta)
            .await;
        mount(
            meta,
            "GET",
            p,
            ok(p)
                .insert_header("ETag", "e1")
                .set_body_string(value)
                .set_delay(Duration::from_secs(2)),
        )
        .await;
    }
}

/// AWS notice endpoints that announce nothing (404, as IMDS answers before a notice).
pub async fn quiet_aws(meta: &MockServer) {
    mount(meta, "GET", INSTANCE_ACTION, ResponseTemplate::new(404)).await;
    mount(meta, "GET", REBALANCE, ResponseTemplate::new(404)).await;
}

/// From now on `p` answers `body`.
pub async fn announce(meta: &MockServer, p: &str, body: String) {
    Mock::given(method("GET"))
        .and(path(p))
        .respond_with(ok(p).insert_header("ETag", "e2").set_body_string(body))
        .with_priority(1)
        .mount(meta)
        .await;
}

/// A time as the notices say it (RFC 3339, whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl Harness {
    /// Starts the agent with `--config-source source` against the fake metadata service.
    pub fn start_on(&mut self, runner: &Path, source: &str, meta: &MockServer, extra: &[&str]) {
        let url = meta.uri();
        let mut args = vec!["--config-source", source, "--metadata-url", &url];
        args.extend_from_slice(extra);
        self.start(runner, &args);
    }
}
