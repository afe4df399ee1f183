//! The lifecycle's edges and decisions, and the phase names against the README.
use super::*;
use Phase::*;

const LEGAL: &[(Phase, Phase)] = &[
    (WaitingForConfig, Registering),
    (WaitingForConfig, Failed),
    (WaitingForConfig, Deregistering),
    (WaitingForConfig, Holding),
    (WaitingForConfig, PoweringOff),
    (WaitingForConfig, Stopping),
    (Registering, Running),
    (Registering, Deregistering),
    (Registering, Holding),
    (Registering, PoweringOff),
    (Registering, Failed),
    (Registering, Stopping),
    (Running, Draining),
    (Running, Deregistering),
    (Running, Failed),
    (Running, Stopping),
    (Draining, Deregistering),
    (Draining, Failed),
    (Draining, Stopping),
    (Deregistering, Holding),
    (Deregistering, PoweringOff),
    (Deregistering, Stopping),
    (Holding, PoweringOff),
    (Holding, Stopping),
    (PoweringOff, Holding),
    (PoweringOff, Stopping),
    (Failed, Deregistering),
    (Failed, Holding),
    (Failed, PoweringOff),
    (Failed, Stopping),
];

#[test]
fn exactly_the_listed_transitions_are_legal() {
    for from in Phase::all() {
        for to in Phase::all() {
            let expected = LEGAL.contains(&(from, to));
            assert_eq!(from.can_go_to(to), expected, "{from} -> {to}");
        }
    }
}

#[test]
fn illegal_transition_is_refused_and_changes_nothing() {
    let mut lc = Lifecycle::new(SystemTime::UNIX_EPOCH);
    let err = lc.transition(Running, SystemTime::UNIX_EPOCH).unwrap_err();
    assert_eq!(
        err.to_string(),
        "illegal lifecycle transition: waiting-for-config -> running"
    );
    assert_eq!(lc.phase(), WaitingForConfig);
    assert_eq!(lc.timeline.len(), 1);
}

#[test]
fn nothing_leaves_stopping() {
    let mut lc = Lifecycle::new(SystemTime::UNIX_EPOCH);
    lc.transition(Stopping, SystemTime::UNIX_EPOCH).unwrap();
    for to in Phase::all() {
        assert!(lc.transition(to, SystemTime::UNIX_EPOCH).is_err());
    }
}

#[test]
fn happy_path_records_a_timeline() {
    let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let mut lc = Lifecycle::new(t(0));
    for (i, phase) in [Registering, Running, Deregistering, PoweringOff]
        .into_iter()
        .enumerate()
    {
        lc.transition(phase, t(i as u64 + 1)).unwrap();
    }
    let phases: Vec<_> = lc.timeline.iter().map(|e| e.phase).collect();
    assert_eq!(
        phases,
        vec![
            WaitingForConfig,
            Registering,
            Running,
            Deregistering,
            PoweringOff
        ]
    );
    assert_eq!(lc.since(), t(4));
    assert_eq!(lc.failed_at, None);
}

#[test]
fn failure_is_timestamped_and_delays_power_off() {
    let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let mut lc = Lifecycle::new(t(0));
    lc.transition(Registering, t(1)).unwrap();
    lc.transition(Failed, t(10)).unwrap();
    assert_eq!(lc.failed_at, Some(t(10)));
    assert_eq!(
        poweroff_wait(
            lc.failed_at,
            Duration::from_secs(60),
            t(15),
            Interrupt::None
        ),
        Duration::from_secs(55)
    );
    assert_eq!(
        poweroff_wait(
            lc.failed_at,
            Duration::from_secs(60),
            t(100),
            Interrupt::None
        ),
        Duration::ZERO
    );
    assert_eq!(
        poweroff_wait(None, Duration::from_secs(60), t(15), Interrupt::None),
        Duration::ZERO
    );
    // A drain changes nothing of it; a VM the platform takes away waits for nothing.
    assert_eq!(
        poweroff_wait(
            lc.failed_at,
            Duration::from_secs(60),
            t(15),
            Interrupt::Drain
        ),
        Duration::from_secs(55)
    );
    for urgent in [Interrupt::Preempted, Interrupt::Stop] {
        assert_eq!(
            poweroff_wait(lc.failed_at, Duration::from_secs(60), t(15), urgent),
            Duration::ZERO
        );
    }
    // A delay the clock cannot represent is not a panic.
    assert_eq!(
        poweroff_wait(lc.failed_at, Duration::MAX, t(15), Interrupt::None),
        Duration::MAX
    );
}

#[test]
fn teardown_decisions() {
    assert_eq!(after_deregistration(true, Interrupt::None), Holding);
    assert_eq!(after_deregistration(true, Interrupt::Drain), Holding);
    assert_eq!(after_deregistration(false, Interrupt::None), PoweringOff);
    // A hold would not last: the platform takes the VM at the notice's deadline.
    assert_eq!(
        after_deregistration(true, Interrupt::Preempted),
        PoweringOff
    );
}

#[test]
fn registration_reads_back_from_status_flags() {
    for r in [
        Registration::None,
        Registration::Registered,
        Registration::Deregistered,
    ] {
        assert_eq!(
            Registration::from_flags(r.ever_registered(), r.deregistered()),
            r
        );
    }
    // A file that says deregistered without registered (never written so) is nothing to delete.
    assert_eq!(Registration::from_flags(false, true), Registration::None);
}

#[test]
fn restart_in_the_same_boot_tears_down() {
    let prev = |boot_id, phase, registered, runner_started| {
        Some(Previous {
            boot_id,
            phase,
            registered,
            runner_started,
        })
    };
    assert_eq!(on_start(None, "b1"), StartDecision::Fresh);
    assert_eq!(
        on_start(prev("b0", Running, true, true), "b1"),
        StartDecision::Fresh,
        "another boot"
    );
    assert_eq!(
        on_start(prev("b1", WaitingForConfig, false, false), "b1"),
        StartDecision::Fresh
    );
    // Killed while a create or verify may have reached GitLab: never register again.
    assert_eq!(
        on_start(prev("b1", Registering, false, false), "b1"),
        StartDecision::TearDown
    );
    assert_eq!(
        on_start(prev("b1", Registering, true, false), "b1"),
        StartDecision::TearDown
    );
    assert_eq!(
        on_start(prev("b1", Running, false, true), "b1"),
        StartDecision::TearDown
    );
    // A failure before registration whose power-off command failed: resume the teardown.
    assert_eq!(
        on_start(prev("b1", PoweringOff, false, false), "b1"),
        StartDecision::TearDown
    );
    assert_eq!(
        on_start(prev("b1", Failed, false, false), "b1"),
        StartDecision::TearDown
    );
}

/// Every phase reachable from `from` by legal transitions, `from` included.
fn reachable(from: Phase) -> Vec<Phase> {
    let mut seen = vec![from];
    let mut i = 0;
    while let Some(&p) = seen.get(i) {
        for to in Phase::all() {
            if p.can_go_to(to) && !seen.contains(&to) {
                seen.push(to);
            }
        }
        i += 1;
    }
    seen
}

#[test]
fn ready_is_sent_once_gitlab_runner_runs_and_never_taken_back() {
    // Before the config is read and while registering, gitlab-runner has not run: no READY.
    assert!(!WaitingForConfig.is_started());
    assert!(!Registering.is_started());
    // From `running` on, and in every phase a run that never got there can end in (so that
    // systemd never sees an exit before READY=1), the unit counts as started.
    for from in Phase::all().filter(|p| p.is_started()) {
        for to in reachable(from) {
            assert!(to.is_started(), "{from} is started but {to} is not");
        }
    }
    for p in [Running, Failed, PoweringOff, Holding, Stopping] {
        assert!(p.is_started(), "{p}: the agent may exit from here");
    }
}

#[test]
fn a_begun_teardown_is_never_left_for_a_fresh_start() {
    // A failure, a stop and the start of deregistration begin the teardown, and a phase
    // that a restarted agent resumes as teardown leads only to teardown phases.
    for p in [Failed, Stopping, Deregistering] {
        assert!(p.is_teardown(), "{p}");
    }
    for p in Phase::all().filter(|p| p.is_teardown()) {
        for to in reachable(p) {
            assert!(to.is_teardown(), "{to} after {p} is not a teardown phase");
        }
    }
    // Before gitlab-runner ends nothing is torn down yet (on_start decides those restarts).
    for p in [WaitingForConfig, Registering, Running, Draining] {
        assert!(!p.is_teardown(), "{p}");
    }
}

/// The phase names of README.md's table ("What the agent does, step by step"), in order.
fn readme_phases() -> Vec<&'static str> {
    let readme = include_str!("../../../README.md");
    let names: Vec<_> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| Phase |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| row.split('|').nth(1).unwrap().trim().trim_matches('`'))
        .collect();
    assert!(!names.is_empty(), "no '| Phase |' table in README.md");
    names
}

#[test]
fn phase_names_are_the_ones_the_readme_documents() {
    let documented = readme_phases();
    let mut names: Vec<_> = Phase::all().map(Phase::as_str).collect();
    let mut sorted = documented.clone();
    names.sort();
    sorted.sort();
    assert_eq!(names, sorted, "README.md documents {documented:?}");
    // status.json (serde) spells them as STATUS= and the journal (Display) do.
    for p in Phase::all() {
        assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
        assert_eq!(
            serde_json::from_value::<Phase>(p.as_str().into()).unwrap(),
            p
        );
    }
}

#[test]
fn the_timeline_keeps_its_first_and_last_entries_and_counts_the_rest() {
    let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
    let mut lc = Lifecycle::new(t(0));
    // A thousand restarts of this boot, each a run of two entries after the first.
    for run in 1..=1000u64 {
        let mut next = Lifecycle::new(t(run * 10));
        next.transition(PoweringOff, t(run * 10 + 1)).unwrap();
        next.continue_timeline(std::mem::take(&mut lc.timeline), lc.timeline_dropped);
        lc = next;
    }
    assert_eq!(lc.timeline.len(), TIMELINE_HEAD + TIMELINE_TAIL);
    assert_eq!(
        lc.timeline_dropped,
        2001 - (TIMELINE_HEAD + TIMELINE_TAIL) as u64
    );
    // The boot's first entry stays, and the last is the latest run's.
    assert_eq!(lc.timeline[0].at, t(0));
    assert_eq!(lc.timeline.last().unwrap().at, t(10_001));
    assert_eq!(lc.since(), t(10_001));
    // Within one run too (a keep file created again and again in the failure delay).
    let mut lc = Lifecycle::new(t(0));
    lc.transition(PoweringOff, t(1)).unwrap();
    for i in 0..100 {
        lc.transition(Holding, t(2 + 2 * i)).unwrap();
        lc.transition(PoweringOff, t(3 + 2 * i)).unwrap();
    }
    assert_eq!(lc.timeline.len(), TIMELINE_HEAD + TIMELINE_TAIL);
    assert_eq!(
        lc.timeline_dropped,
        202 - (TIMELINE_HEAD + TIMELINE_TAIL) as u64
    );
}
