//! Amazon EC2: what the agent knows of it. The instance metadata service (IMDSv2: a session
//! token first, then every request with it), the instance's user-data, the launch key pairs,
//! how DMI tells an EC2 instance, and its notices: the Spot `instance-action` (terminate, stop
//! or hibernate at a given time, about two minutes ahead) and the rebalance recommendation (an
//! elevated risk, no deadline), polled no more often than every 5 s, as AWS recommends.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::time::Instant;

use super::notices::{self, REQUEST_TIMEOUT, WatchTask};
use super::ssh_keys::{Keys, text};
use super::{Answer, Dmi, MetadataClient, MetadataError, Provider};
use crate::preemption::{Complaints, Notice, NoticeKind, NoticeSender, Reading, next_wait, take};

pub const PROVIDER: Provider = Provider {
    // IMDSv2; 404 when the instance has none.
    user_data_path: "/latest/user-data",
    how_to_set_user_data: "aws ec2 run-instances --user-data file://runner.json (or the launch template's user data)",
    recognised,
    watch_notices: Some(watch_notices),
};

/// IMDSv2's session token: PUT here with the TTL header, then sent with every request.
pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Six hours, the longest IMDSv2 allows: a boot needs one token.
pub const TOKEN_TTL_SECONDS: &str = "21600";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// The launch key pairs: lines `0=name`, then `<i>/openssh-key`.
const KEYS: &str = "/latest/meta-data/public-keys/";

/// Nitro instances name Amazon EC2 as vendor; Xen-based ones have the vendor Xen, and the UUID
/// and serial start with ec2.
fn recognised(dmi: &Dmi) -> bool {
    let starts_ec2 = |s: &str| s.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ec2"));
    dmi.sys_vendor == "Amazon EC2"
        || dmi.bios_vendor == "Amazon EC2"
        || (starts_ec2(&dmi.product_uuid) && starts_ec2(&dmi.product_serial))
        || dmi.product_version.to_ascii_lowercase().contains("amazon")
}

/// The launch key pairs, for whichever user the image logs in.
pub async fn ssh_keys(
    client: &MetadataClient,
    deadline: Instant,
    keys: &mut Keys,
) -> Result<(), MetadataError> {
    let index = text(client.fetch(KEYS, deadline).await?);
    for entry in index.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // `0=my-key`: the number is the key's directory.
        let number = entry.split('=').next().unwrap_or("");
        if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
            keys.skipped
                .push(format!("{KEYS}: an entry that is not <number>=<name>"));
            continue;
        }
        let path = format!("{KEYS}{number}/openssh-key");
        let key = text(client.fetch(&path, deadline).await?);
        for line in key.lines().filter(|l| !l.trim().is_empty()) {
            keys.offer(&path, line);
        }
    }
    Ok(())
}

/// AWS recommends checking for interruption notices every 5 seconds; never more often.
pub const POLL: Duration = Duration::from_secs(5);

fn watch_notices(client: MetadataClient, tx: NoticeSender) -> WatchTask {
    Box::pin(watch(client, tx))
}

/// Both notice endpoints once per poll, with the session token the client keeps (renewed at
/// the poll after a 401, never at once).
async fn watch(client: MetadataClient, tx: NoticeSender) {
    let mut token_trouble = Complaints::new("IMDSv2 PUT /latest/api/token");
    let mut endpoints = [
        (
            "/latest/meta-data/spot/instance-action",
            Complaints::new("GET /latest/meta-data/spot/instance-action"),
            instance_action as fn(&[u8], SystemTime) -> Reading,
        ),
        (
            "/latest/meta-data/events/recommendations/rebalance",
            Complaints::new("GET /latest/meta-data/events/recommendations/rebalance"),
            rebalance,
        ),
    ];
    let mut failures = 0;
    // A GET answered 401: the session token is renewed at the next poll, not at once (a
    // renewal and a second GET within milliseconds would ask each endpoint twice per poll).
    let mut token_refused = false;
    loop {
        let started = Instant::now();
        let mut ok = true;
        if std::mem::take(&mut token_refused) {
            client.forget_aws_token().await;
        }
        for (path, complaints, read) in endpoints.iter_mut() {
            match client.get_answer_once(path, REQUEST_TIMEOUT).await {
                // 404: nothing announced.
                Ok(None) => {}
                Ok(Some(Answer { body, .. })) => {
                    if !take(read(&body, SystemTime::now()), complaints, &tx) {
                        ok = false;
                    }
                }
                Err(e) if e.is_aws_token() => {
                    // No token, no GET: the next endpoint waits for the next poll.
                    notices::trouble(&mut token_trouble, &e);
                    ok = false;
                    break;
                }
                Err(e) => {
                    // The other endpoint is still asked this poll, with the same token: each
                    // endpoint and the token's PUT at most once per poll.
                    token_refused |= matches!(e, MetadataError::Status { status: 401, .. });
                    notices::trouble(complaints, &e);
                    ok = false;
                }
            }
        }
        failures = if ok { 0 } else { failures + 1 };
        tokio::time::sleep_until(started + next_wait(POLL, failures)).await;
    }
}

/// `GET /latest/meta-data/spot/instance-action` answered 200:
/// `{"action": "terminate|stop|hibernate", "time": "2026-11-30T17:02:00Z"}`.
pub fn instance_action(body: &[u8], now: SystemTime) -> Reading {
    #[derive(Deserialize)]
    struct InstanceAction {
        action: String,
        time: String,
    }
    let Some(answer) = json::<InstanceAction>(body) else {
        return Reading::unrecognised(body);
    };
    let Some(time) = crate::timestamp::instant_utc_by_default(&answer.time) else {
        return Reading::unrecognised(body);
    };
    let action = match answer.action.as_str() {
        "terminate" => "terminate",
        "stop" => "stop",
        // Hibernation begins at once: no two-minute warning.
        "hibernate" => "hibernate",
        _ => return Reading::unrecognised(body),
    };
    let deadline = if action == "hibernate" {
        time.min(now)
    } else {
        time
    };
    Reading::Notice(Notice {
        platform: "aws".into(),
        kind: NoticeKind::SpotInterruption,
        detail: format!("{action} at {}", crate::timestamp::fmt_time(time)),
        received: now,
        deadline: Some(deadline),
    })
}

/// `GET /latest/meta-data/events/recommendations/rebalance` answered 200:
/// `{"noticeTime": "2026-11-30T17:00:00Z"}`.
pub fn rebalance(body: &[u8], now: SystemTime) -> Reading {
    #[derive(Deserialize)]
    struct Rebalance {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let Some(answer) = json::<Rebalance>(body) else {
        return Reading::unrecognised(body);
    };
    let Some(time) = crate::timestamp::instant_utc_by_default(&answer.notice_time) else {
        return Reading::unrecognised(body);
    };
    Reading::Notice(Notice {
        platform: "aws".into(),
        kind: NoticeKind::RebalanceRecommendation,
        detail: format!("recommended at {}", crate::timestamp::fmt_time(time)),
        received: now,
        deadline: None,
    })
}

/// An answer's JSON, only when the whole body is UTF-8: serde_json checks the strings it keeps
/// but skips over the ones it ignores unchecked, so an answer with a mangled field beside a
/// well-formed `action` would otherwise be taken for a notice.
fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_str(std::str::from_utf8(body).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::super::notices::tests::{secs, t0};
    use super::*;
    use crate::preemption::{Action, plan};

    #[test]
    fn a_spot_notice_is_read_with_its_action_and_time() {
        let body = br#"{"action": "terminate", "time": "2026-11-30T17:02:00Z"}"#;
        let Reading::Notice(n) = instance_action(body, t0()) else {
            panic!("not a notice");
        };
        assert_eq!(n.kind, NoticeKind::SpotInterruption);
        assert_eq!(n.deadline, Some(t0() + secs(120)));
        assert_eq!(n.detail, "terminate at 2026-11-30T17:02:00.000Z");
        assert_eq!(n.platform, "aws");
        // stop is a deadline as well; hibernation starts at once.
        let stop = br#"{"action":"stop","time":"2026-11-30T17:02:00Z","extra":1}"#;
        assert!(
            matches!(instance_action(stop, t0()), Reading::Notice(n) if n.deadline == Some(t0() + secs(120)))
        );
        let hibernate = br#"{"action":"hibernate","time":"2026-11-30T17:02:00Z"}"#;
        assert!(
            matches!(instance_action(hibernate, t0()), Reading::Notice(n) if n.deadline == Some(t0()))
        );
    }

    #[test]
    fn a_rebalance_recommendation_has_no_deadline() {
        let body = br#"{"noticeTime": "2026-11-30T16:59:30Z"}"#;
        let Reading::Notice(n) = rebalance(body, t0()) else {
            panic!("not a notice");
        };
        assert_eq!(n.kind, NoticeKind::RebalanceRecommendation);
        assert_eq!(n.deadline, None);
        assert!(!n.vm_goes_away());
        assert_eq!(plan(&n, t0(), secs(50)), Action::Drain);
    }
}
