//! The decisions and the readings, without sockets.

use std::time::{Duration, SystemTime};

use super::parse::{self, Reading};
use super::watch::{AWS_POLL, GCE_FLOOR, RETRY_CAP, gce_path, next_wait};
use super::*;

fn t0() -> SystemTime {
    humantime::parse_rfc3339("2026-11-30T17:00:00Z").unwrap()
}

fn notice(kind: NoticeKind, deadline: Option<SystemTime>) -> Notice {
    Notice {
        platform: "aws".into(),
        kind,
        detail: "x".into(),
        received: t0(),
        deadline,
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[test]
fn a_spot_notice_is_read_with_its_action_and_time() {
    let body = br#"{"action": "terminate", "time": "2026-11-30T17:02:00Z"}"#;
    let Reading::Notice(n) = parse::aws_instance_action(body, t0()) else {
        panic!("not a notice");
    };
    assert_eq!(n.kind, NoticeKind::SpotInterruption);
    assert_eq!(n.deadline, Some(t0() + secs(120)));
    assert_eq!(n.detail, "terminate at 2026-11-30T17:02:00.000Z");
    assert_eq!(n.platform, "aws");
    // stop is a deadline as well; hibernation starts at once.
    let stop = br#"{"action":"stop","time":"2026-11-30T17:02:00Z","extra":1}"#;
    assert!(
        matches!(parse::aws_instance_action(stop, t0()), Reading::Notice(n) if n.deadline == Some(t0() + secs(120)))
    );
    let hibernate = br#"{"action":"hibernate","time":"2026-11-30T17:02:00Z"}"#;
    assert!(
        matches!(parse::aws_instance_action(hibernate, t0()), Reading::Notice(n) if n.deadline == Some(t0()))
    );
}

#[test]
fn a_rebalance_recommendation_has_no_deadline() {
    let body = br#"{"noticeTime": "2026-11-30T16:59:30Z"}"#;
    let Reading::Notice(n) = parse::aws_rebalance(body, t0()) else {
        panic!("not a notice");
    };
    assert_eq!(n.kind, NoticeKind::RebalanceRecommendation);
    assert_eq!(n.deadline, None);
    assert!(!n.vm_goes_away());
    assert_eq!(plan(&n, t0(), secs(50)), Action::Drain);
}

#[test]
fn gce_values_are_read_exactly() {
    let Reading::Notice(n) = parse::gce_preempted(b"TRUE", t0()) else {
        panic!("not a notice");
    };
    assert_eq!(
        (n.kind, n.deadline),
        (NoticeKind::Preemption, Some(t0() + secs(30)))
    );
    assert_eq!(parse::gce_preempted(b"FALSE\n", t0()), Reading::Quiet);
    assert_eq!(parse::gce_maintenance_event(b"NONE", t0()), Reading::Quiet);
    assert_eq!(
        parse::gce_maintenance_event(b"\"NONE\"", t0()),
        Reading::Quiet
    );
    assert!(matches!(
        parse::gce_maintenance_event(b"MIGRATE_ON_HOST_MAINTENANCE", t0()),
        Reading::Info(_)
    ));
    let Reading::Notice(n) = parse::gce_maintenance_event(b"TERMINATE_ON_HOST_MAINTENANCE", t0())
    else {
        panic!("not a notice");
    };
    assert_eq!(
        (n.kind, n.deadline),
        (NoticeKind::HostMaintenance, Some(t0() + secs(60)))
    );
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
            parse::aws_instance_action,
            parse::aws_rebalance,
            parse::gce_preempted,
            parse::gce_maintenance_event,
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
    let Reading::Unrecognised(text) = parse::gce_preempted(b"\xff\xfe garbage", t0()) else {
        panic!()
    };
    assert_eq!(text, "10 bytes, not UTF-8");
    let body = format!(
        "\u{1b}[31mglrt-fake.token.abcdefghijklmnop {}",
        "x".repeat(5000)
    );
    let Reading::Unrecognised(text) = parse::gce_preempted(body.as_bytes(), t0()) else {
        panic!()
    };
    assert!(text.starts_with("5038 bytes: \"\\u{1b}[31m"), "{text}");
    assert!(!text.contains("abcdefghijklmnop"), "token shown: {text}");
    assert!(text.len() < 120, "{text}");
}

#[test]
fn plan_aborts_at_once_when_the_deadline_is_within_the_reserve() {
    // GCE's 30 s with the default --stop-timeout (40 s) + 10 s reserve: at once.
    let gce = notice(NoticeKind::Preemption, Some(t0() + secs(30)));
    assert_eq!(
        plan(&gce, t0(), secs(50)),
        Action::DrainThenAbort { after: secs(0) }
    );
    // AWS's two minutes: the job may run on until 50 s before the deadline.
    let aws = notice(NoticeKind::SpotInterruption, Some(t0() + secs(120)));
    assert_eq!(
        plan(&aws, t0(), secs(50)),
        Action::DrainThenAbort { after: secs(70) }
    );
    // A deadline already past (a clock behind the platform's): at once.
    assert_eq!(
        plan(&aws, t0() + secs(600), secs(50)),
        Action::DrainThenAbort { after: secs(0) }
    );
}

#[test]
fn gitlab_runner_gets_what_leaves_time_to_deregister() {
    let gce = notice(NoticeKind::Preemption, Some(t0() + secs(30)));
    // 30 s left: 20 s for gitlab-runner, 10 s for the deregistration.
    assert_eq!(abort_budget(&gce, t0(), secs(40)), secs(20));
    // A short --stop-timeout is kept.
    assert_eq!(abort_budget(&gce, t0(), secs(5)), secs(5));
    // Past the deadline: still a moment to report the job.
    assert_eq!(abort_budget(&gce, t0() + secs(29), secs(40)), MIN_ABORT);
    assert_eq!(abort_budget(&gce, t0() + secs(29), secs(1)), secs(1));
    // The deregistration fits in what is left, but always gets a try.
    assert_eq!(deregister_budget(Some(&gce), t0(), secs(30)), secs(30));
    assert_eq!(
        deregister_budget(Some(&gce), t0() + secs(25), secs(30)),
        secs(5)
    );
    assert_eq!(
        deregister_budget(Some(&gce), t0() + secs(60), secs(30)),
        MIN_ABORT
    );
    assert_eq!(deregister_budget(None, t0(), secs(30)), secs(30));
}

#[test]
fn the_most_urgent_notice_wins_and_a_repeat_is_no_news() {
    let rebalance = notice(NoticeKind::RebalanceRecommendation, None);
    let far = notice(NoticeKind::SpotInterruption, Some(t0() + secs(120)));
    let near = notice(NoticeKind::HostMaintenance, Some(t0() + secs(60)));
    assert!(more_urgent(None, &rebalance));
    assert!(more_urgent(Some(&rebalance), &far));
    assert!(more_urgent(Some(&far), &near));
    assert!(!more_urgent(Some(&near), &far));
    assert!(!more_urgent(Some(&far), &rebalance));
    assert!(!more_urgent(Some(&far), &far.clone()));
    assert!(!more_urgent(Some(&rebalance), &rebalance.clone()));
}

#[test]
fn auto_watches_aws_and_gce_only_and_on_warns_elsewhere() {
    use crate::metadata::{ConfigSource, Platform};
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
    assert_eq!(next_wait(AWS_POLL, 0), secs(5));
    assert_eq!(next_wait(AWS_POLL, 1), secs(10));
    assert_eq!(next_wait(AWS_POLL, 3), RETRY_CAP);
    assert_eq!(next_wait(AWS_POLL, u32::MAX), RETRY_CAP);
    assert_eq!(next_wait(GCE_FLOOR, 0), secs(1));
    assert_eq!(next_wait(GCE_FLOOR, 2), secs(4));
    for failures in 0..100 {
        assert!(next_wait(AWS_POLL, failures) >= AWS_POLL);
        assert!(next_wait(GCE_FLOOR, failures) >= GCE_FLOOR);
    }
}

#[test]
fn gce_paths_read_the_value_then_long_poll_with_the_etag_url_encoded() {
    let key = "/computeMetadata/v1/instance/preempted";
    assert_eq!(gce_path("preempted", None), key);
    assert_eq!(
        gce_path("preempted", Some(None)),
        format!("{key}?wait_for_change=true&timeout_sec=300")
    );
    assert_eq!(
        gce_path("preempted", Some(Some("Az09-._~ +&=#/%é"))),
        format!(
            "{key}?wait_for_change=true&timeout_sec=300&last_etag=Az09-._~%20%2B%26%3D%23%2F%25%C3%A9"
        )
    );
}

#[test]
fn describe_names_kind_platform_and_deadline() {
    let n = Notice {
        platform: "gce".into(),
        kind: NoticeKind::Preemption,
        detail: "instance/preempted TRUE".into(),
        received: t0(),
        deadline: Some(t0() + secs(30)),
    };
    assert_eq!(
        n.describe(t0() + secs(4)),
        "gce preemption notice (instance/preempted TRUE): the VM goes away at 2026-11-30T17:00:30.000Z (in 26 s)"
    );
    assert!(n.describe(t0() + secs(31)).ends_with("(now)"));
}

#[test]
fn status_json_without_the_field_still_reads_and_with_it_round_trips() {
    let n = notice(NoticeKind::SpotInterruption, Some(t0() + secs(120)));
    let json = serde_json::to_value(&n).unwrap();
    assert_eq!(json["kind"], "spot-interruption");
    assert_eq!(json["deadline"], "2026-11-30T17:02:00.000Z");
    assert_eq!(serde_json::from_value::<Notice>(json).unwrap(), n);
}

#[test]
fn the_time_left_is_whole_seconds_and_now_under_one() {
    let now = t0();
    assert_eq!(seconds_left(now + Duration::from_secs(30), now), "in 30 s");
    assert_eq!(seconds_left(now + Duration::from_secs(1), now), "in 1 s");
    // "in 0 s" would read as a bug: under a second left, or past, is now.
    assert_eq!(seconds_left(now + Duration::from_millis(999), now), "now");
    assert_eq!(seconds_left(now, now + Duration::from_secs(5)), "now");
}

#[test]
fn a_rebalance_recommendation_drains_only_after_a_job_and_a_deadline_at_once() {
    let rebalance = notice(NoticeKind::RebalanceRecommendation, None);
    let spot = notice(NoticeKind::SpotInterruption, Some(t0() + secs(120)));
    for jobs in [0, 1, 7] {
        assert_eq!(drains_now(&rebalance, jobs), jobs > 0, "{jobs}");
        assert!(drains_now(&spot, jobs), "{jobs}");
    }
}
