//! The agent's lifecycle as an explicit state machine: phases, the legal transitions between
//! them, and the pure decisions that pick the next phase. No I/O happens here; the driver in
//! `agent.rs` performs the work of each phase and asks this module where to go next.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    WaitingForConfig,
    Registering,
    Running,
    Draining,
    Deregistering,
    Holding,
    PoweringOff,
    Failed,
    Stopping,
}

impl Phase {
    #[cfg(test)]
    pub const ALL: [Phase; 9] = [
        Phase::WaitingForConfig,
        Phase::Registering,
        Phase::Running,
        Phase::Draining,
        Phase::Deregistering,
        Phase::Holding,
        Phase::PoweringOff,
        Phase::Failed,
        Phase::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::WaitingForConfig => "waiting-for-config",
            Phase::Registering => "registering",
            Phase::Running => "running",
            Phase::Draining => "draining",
            Phase::Deregistering => "deregistering",
            Phase::Holding => "holding",
            Phase::PoweringOff => "powering-off",
            Phase::Failed => "failed",
            Phase::Stopping => "stopping",
        }
    }

    /// Whether systemd may consider the unit started in this phase. READY=1 is sent once
    /// gitlab-runner runs, or when the run ends before that: a Type=notify service whose main
    /// process exits without READY=1 fails with result "protocol" and is restarted.
    pub fn is_started(self) -> bool {
        !matches!(self, Phase::WaitingForConfig | Phase::Registering)
    }

    /// Phases that a restarted agent must resume as teardown rather than start over from.
    pub fn is_teardown(self) -> bool {
        matches!(
            self,
            Phase::Failed
                | Phase::Deregistering
                | Phase::Holding
                | Phase::PoweringOff
                | Phase::Stopping
        )
    }

    /// The edges of the lifecycle. Everything not listed is a bug in the driver.
    pub fn can_go_to(self, to: Phase) -> bool {
        use Phase::*;
        match (self, to) {
            // Stopping (SIGTERM: the VM is being shut down from outside) is reachable from
            // every phase except itself, and nothing leaves it.
            (Stopping, _) => false,
            (_, Stopping) => true,
            (WaitingForConfig, Registering | Failed) => true,
            // A restarted agent that finds this boot's registration or teardown resumes the
            // teardown at once.
            (WaitingForConfig, Deregistering | Holding | PoweringOff) => true,
            // Registering -> Deregistering: a drain asked for before gitlab-runner started.
            (Registering, Running | Deregistering | Failed) => true,
            (Running, Draining | Deregistering | Failed) => true,
            (Draining, Deregistering | Failed) => true,
            (Failed, Deregistering | Holding | PoweringOff) => true,
            (Deregistering, Holding | PoweringOff) => true,
            (Holding, PoweringOff) => true,
            // The keep file created during the failure delay still holds the VM.
            (PoweringOff, Holding) => true,
            _ => false,
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("illegal lifecycle transition: {from} -> {to}")]
pub struct IllegalTransition {
    pub from: Phase,
    pub to: Phase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub phase: Phase,
    #[serde(with = "crate::status::rfc3339")]
    pub at: SystemTime,
}

/// The current phase, and what has happened so far in this boot.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    pub timeline: Vec<TimelineEntry>,
    /// GitLab knows this VM (verify succeeded or a runner was created): it must be deregistered.
    pub registered: bool,
    pub deregistered: bool,
    /// gitlab-runner was started in this boot: a restarted agent must never start another.
    pub runner_started: bool,
    /// When the run failed, if it did; the power-off waits until `failure_delay` after it.
    pub failed_at: Option<SystemTime>,
}

impl Lifecycle {
    pub fn new(now: SystemTime) -> Self {
        Lifecycle {
            phase: Phase::WaitingForConfig,
            timeline: vec![TimelineEntry {
                phase: Phase::WaitingForConfig,
                at: now,
            }],
            registered: false,
            deregistered: false,
            runner_started: false,
            failed_at: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn since(&self) -> SystemTime {
        self.timeline
            .last()
            .map(|e| e.at)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// Moves to `to` if the edge exists; the caller then publishes the new status.
    pub fn transition(&mut self, to: Phase, now: SystemTime) -> Result<(), IllegalTransition> {
        if !self.phase.can_go_to(to) {
            return Err(IllegalTransition {
                from: self.phase,
                to,
            });
        }
        if to == Phase::Failed {
            self.failed_at = Some(now);
        }
        self.phase = to;
        self.timeline.push(TimelineEntry { phase: to, at: now });
        Ok(())
    }

    /// Where teardown starts: deregistration if GitLab still knows this VM, else straight to
    /// the hold check.
    pub fn needs_deregistration(&self) -> bool {
        self.registered && !self.deregistered
    }
}

/// After deregistration (or when there was nothing to deregister): hold while the keep file
/// exists, otherwise power off.
pub fn after_deregistration(keep_file_exists: bool) -> Phase {
    if keep_file_exists {
        Phase::Holding
    } else {
        Phase::PoweringOff
    }
}

/// How long to wait before running the power-off command: a failed run keeps the VM up until
/// `failure_delay` after the failure (so an operator can read the error, and a fleet with a
/// broken configuration does not boot VMs in a tight loop); a hold that lasted longer than that
/// needs no further wait.
pub fn poweroff_wait(
    failed_at: Option<SystemTime>,
    failure_delay: Duration,
    now: SystemTime,
) -> Duration {
    match failed_at {
        // A delay too long for the clock never ends: wait as long as a sleep can.
        Some(at) => match at.checked_add(failure_delay) {
            Some(end) => end.duration_since(now).unwrap_or(Duration::ZERO),
            None => Duration::MAX,
        },
        None => Duration::ZERO,
    }
}

/// What a starting agent learns from a status.json it finds in its state directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartDecision {
    /// Nothing of this boot: run the whole lifecycle.
    Fresh,
    /// This boot already registered or started gitlab-runner (the agent crashed or was
    /// restarted): never start another gitlab-runner; deregister and power off.
    TearDown,
}

/// What the previous run of this agent left in status.json.
#[derive(Debug, Clone, Copy)]
pub struct Previous<'a> {
    pub boot_id: &'a str,
    pub phase: Phase,
    pub registered: bool,
    pub runner_started: bool,
}

/// A previous run of this boot that registered, started gitlab-runner, began its teardown (a
/// power-off command that failed, say) or was killed while registering (its request may have
/// reached GitLab; creating a runner is not idempotent) is resumed as teardown: no second
/// registration, no second gitlab-runner.
pub fn on_start(previous: Option<Previous<'_>>, current_boot_id: &str) -> StartDecision {
    match previous {
        Some(p)
            if p.boot_id == current_boot_id
                && (p.registered
                    || p.runner_started
                    || p.phase == Phase::Registering
                    || p.phase.is_teardown()) =>
        {
            StartDecision::TearDown
        }
        _ => StartDecision::Fresh,
    }
}

#[cfg(test)]
mod tests {
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
        for from in Phase::ALL {
            for to in Phase::ALL {
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
        for to in Phase::ALL {
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
            poweroff_wait(lc.failed_at, Duration::from_secs(60), t(15)),
            Duration::from_secs(55)
        );
        assert_eq!(
            poweroff_wait(lc.failed_at, Duration::from_secs(60), t(100)),
            Duration::ZERO
        );
        assert_eq!(
            poweroff_wait(None, Duration::from_secs(60), t(15)),
            Duration::ZERO
        );
        // A delay the clock cannot represent is not a panic.
        assert_eq!(
            poweroff_wait(lc.failed_at, Duration::MAX, t(15)),
            Duration::MAX
        );
    }

    #[test]
    fn teardown_decisions() {
        assert_eq!(after_deregistration(true), Holding);
        assert_eq!(after_deregistration(false), PoweringOff);
        let mut lc = Lifecycle::new(SystemTime::UNIX_EPOCH);
        assert!(!lc.needs_deregistration());
        lc.registered = true;
        assert!(lc.needs_deregistration());
        lc.deregistered = true;
        assert!(!lc.needs_deregistration());
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
            for to in Phase::ALL {
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
        for from in Phase::ALL.into_iter().filter(|p| p.is_started()) {
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
        for p in Phase::ALL.into_iter().filter(|p| p.is_teardown()) {
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
        let readme = include_str!("../../README.md");
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
        let mut names: Vec<_> = Phase::ALL.iter().map(|p| p.as_str()).collect();
        let mut sorted = documented.clone();
        names.sort();
        sorted.sort();
        assert_eq!(names, sorted, "README.md documents {documented:?}");
        // status.json (serde) spells them as STATUS= and the journal (Display) do.
        for p in Phase::ALL {
            assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
            assert_eq!(
                serde_json::from_value::<Phase>(p.as_str().into()).unwrap(),
                p
            );
        }
    }
}
