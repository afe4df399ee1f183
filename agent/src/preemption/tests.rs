//! The notice and the decisions, without sockets (each platform's readings are tested in its
//! provider's module, `crate::metadata::{aws, gce}`).

use std::time::{Duration, SystemTime};

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
