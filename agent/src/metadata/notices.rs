//! The platforms' preemption and maintenance notices, from the metadata side: which platform's
//! are watched (`watched_platform`), the client they are read with, and the start of the
//! platform's own watch (`watch_notices`, which asks the platform's `Provider` for it: AWS's and
//! GCE's live in their modules, DigitalOcean has none). What a notice means for the jobs, and the
//! watcher's common loop, are `crate::preemption`'s.
//!
//! Requests go through the shared `MetadataClient`: it keeps the IMDSv2 session token, sends
//! `Metadata-Flavor: Google` and refuses GCE answers without it, follows no redirect and reads
//! no body past `MAX_BODY`; what it refuses is trouble here (`trouble`), never a notice.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::{ConfigSource, MetadataClient, MetadataError, Platform};
use crate::preemption::{self, Complaints, NoticeSender, WatchPreemption};

/// A request that is no long poll (the token's PUT included) and takes longer is a failure,
/// retried at the next poll.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Notices are a few dozen bytes; anything larger is not one.
pub const MAX_BODY: usize = 16 * 1024;

/// A platform's watch of its notices, for the agent's whole run: it reads the platform's notice
/// endpoints with the client it is given and publishes what they announce on the sender.
pub type NoticeWatch = fn(MetadataClient, NoticeSender) -> WatchTask;
/// The running watch: it never ends while the VM may still be told something.
pub type WatchTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The platform whose notices are watched, and a warning when `on` finds none to watch.
pub fn watched_platform(
    mode: WatchPreemption,
    source: ConfigSource,
    platform: Option<Platform>,
) -> (Option<Platform>, Option<String>) {
    let with_notices = platform.filter(|p| p.provider().watch_notices.is_some());
    match mode {
        WatchPreemption::Off => (None, None),
        WatchPreemption::Auto => (with_notices, None),
        WatchPreemption::On => match (with_notices, platform) {
            (Some(p), _) => (Some(p), None),
            (None, Some(other)) => (
                None,
                Some(format!(
                    "--watch-preemption on: {other} gives no preemption notice the agent knows; nothing is watched"
                )),
            ),
            (None, None) => (
                None,
                Some(format!(
                    "--watch-preemption on: no platform with notices (--config-source {}{}); nothing is watched: set --config-source aws or gce",
                    source.name(),
                    if source == ConfigSource::Auto {
                        ", and DMI/SMBIOS names none"
                    } else {
                        ""
                    }
                )),
            ),
        },
    }
}

/// Starts watching `platform`'s notices at `base_url`; None for a platform without notices, or
/// when no metadata client can be made (logged).
pub fn watch_notices(platform: Platform, base_url: &str) -> Option<preemption::Watcher> {
    let watch = platform.provider().watch_notices?;
    let client = match MetadataClient::new(platform, base_url) {
        Ok(client) => client
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_body(MAX_BODY),
        Err(e) => {
            tracing::warn!("{e}; preemption notices are not watched");
            return None;
        }
    };
    let watcher = preemption::start(|sender| watch(client, sender));
    tracing::info!(
        "watching {platform}'s preemption and maintenance notices at {}",
        crate::secret::scrub(base_url)
    );
    Some(watcher)
}

/// A failed request, logged once per kind (an error status, a redirect, no answer...).
pub fn trouble(complaints: &mut Complaints, e: &MetadataError) {
    use MetadataError::*;
    let (kind, detail) = match e {
        Status { status, .. } => (format!("status {status}"), format!("HTTP {status}")),
        Redirect {
            status, location, ..
        } => (
            "redirect".into(),
            format!("HTTP {status}, a redirect to {location} (not followed)"),
        ),
        TooLarge { cap_kib, .. } => ("too large".into(), format!("more than {cap_kib} KiB")),
        NotMetadataService { detail, .. } => (
            "not the metadata service".into(),
            format!("as something else than the metadata service would ({detail})"),
        ),
        AwsTokenUnanswered { .. }
        | Unreachable {
            timed_out: true, ..
        } => ("unreachable".into(), "nothing (no answer in time)".into()),
        Unreachable { detail, .. } => ("unreachable".into(), format!("nothing ({detail})")),
        other => ("error".into(), format!("nothing usable ({other})")),
    };
    complaints.complain(&kind, || detail);
}

#[cfg(test)]
pub(super) mod tests {
    use std::time::{Duration, SystemTime};

    use super::super::{aws, gce};
    use super::*;
    use crate::preemption::{RETRY_CAP, Reading, next_wait};

    /// The moment every provider's notice tests read their answers at.
    pub(in crate::metadata) fn t0() -> SystemTime {
        humantime::parse_rfc3339("2026-11-30T17:00:00Z").unwrap()
    }

    pub(in crate::metadata) fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn garbage_is_never_a_notice() {
        let garbage: &[&[u8]] = &[
            b"<html><body>Proxy Authentication Required</body></html>",
            b"",
            b"true",
            b"TRUE TRUE",
            b"\xff\xfe\x00TRUE",
            br#"{"action": "terminate"}"#,
            br#"{"action": "explode", "time": "2026-11-30T17:02:00Z"}"#,
            br#"{"action": "terminate", "time": "soon"}"#,
            br#"["terminate"]"#,
            b"TERMINATE_ON_HOST_MAINTENANCE_AND_MORE",
        ];
        for body in garbage {
            for read in [
                aws::instance_action,
                aws::rebalance,
                gce::preempted,
                gce::maintenance_event,
            ] {
                let reading = read(body, t0());
                assert!(
                    matches!(reading, Reading::Unrecognised(_)),
                    "{:?} read as {reading:?}",
                    String::from_utf8_lossy(body)
                );
            }
        }
    }

    #[test]
    fn an_unrecognised_body_is_logged_short_escaped_and_scrubbed() {
        let Reading::Unrecognised(text) = gce::preempted(b"\xff\xfe garbage", t0()) else {
            panic!()
        };
        assert_eq!(text, "10 bytes, not UTF-8");
        let body = format!(
            "\u{1b}[31mglrt-fake.token.abcdefghijklmnop {}",
            "x".repeat(5000)
        );
        let Reading::Unrecognised(text) = gce::preempted(body.as_bytes(), t0()) else {
            panic!()
        };
        assert!(text.starts_with("5038 bytes: \"\\u{1b}[31m"), "{text}");
        assert!(!text.contains("abcdefghijklmnop"), "token shown: {text}");
        assert!(text.len() < 120, "{text}");
    }

    #[test]
    fn auto_watches_aws_and_gce_only_and_on_warns_elsewhere() {
        let (watched, warning) = watched_platform(
            WatchPreemption::Auto,
            ConfigSource::Aws,
            Some(Platform::Aws),
        );
        assert_eq!((watched, warning), (Some(Platform::Aws), None));
        let (watched, warning) = watched_platform(
            WatchPreemption::Auto,
            ConfigSource::DigitalOcean,
            Some(Platform::DigitalOcean),
        );
        assert_eq!((watched, warning), (None, None));
        assert_eq!(
            watched_platform(WatchPreemption::Off, ConfigSource::Gce, Some(Platform::Gce)),
            (None, None)
        );
        let (watched, warning) = watched_platform(WatchPreemption::On, ConfigSource::File, None);
        assert_eq!(watched, None);
        assert!(
            warning.unwrap().contains("set --config-source aws or gce"),
            "the warning names the fix"
        );
        let (watched, warning) = watched_platform(
            WatchPreemption::On,
            ConfigSource::DigitalOcean,
            Some(Platform::DigitalOcean),
        );
        assert_eq!(watched, None);
        assert!(
            warning
                .unwrap()
                .contains("digitalocean gives no preemption notice")
        );
    }

    #[test]
    fn waits_have_a_floor_and_back_off_to_a_cap() {
        assert_eq!(next_wait(aws::POLL, 0), secs(5));
        assert_eq!(next_wait(aws::POLL, 1), secs(10));
        assert_eq!(next_wait(aws::POLL, 3), RETRY_CAP);
        assert_eq!(next_wait(aws::POLL, u32::MAX), RETRY_CAP);
        assert_eq!(next_wait(gce::FLOOR, 0), secs(1));
        assert_eq!(next_wait(gce::FLOOR, 2), secs(4));
        for failures in 0..100 {
            assert!(next_wait(aws::POLL, failures) >= aws::POLL);
            assert!(next_wait(gce::FLOOR, failures) >= gce::FLOOR);
        }
    }
}
