//! The agent's lifecycle as an explicit state machine: phases, the legal transitions between
//! them, and the pure decisions that pick the next phase. No I/O happens here; the driver in
//! `agent.rs` performs the work of each phase and asks this module where to go next.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

// `ValueEnum` for its list of every variant, which the compiler keeps whole (`Phase::all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
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
    /// Every phase, in the order of the enum.
    pub fn all() -> impl Iterator<Item = Phase> {
        use clap::ValueEnum;
        Phase::value_variants().iter().copied()
    }

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
            // Registering -> Deregistering (or, with nothing registered, Holding or
            // PoweringOff): a drain or a notice before gitlab-runner started.
            (Registering, Running | Deregistering | Holding | PoweringOff | Failed) => true,
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
    #[serde(with = "crate::timestamp::rfc3339")]
    pub at: SystemTime,
}

/// The timeline keeps the first entries of a boot (its first run, which registered and ran the
/// jobs) and the last ones (the latest runs); what lies between is only counted. Without a
/// bound, an agent that systemd restarts again and again (a power-off command that keeps
/// failing) grows status.json by every run until it passes the read cap.
pub const TIMELINE_HEAD: usize = 8;
pub const TIMELINE_TAIL: usize = 32;

/// The entries of `timeline` worth keeping, and how many more are dropped (added to those
/// dropped before): the first `TIMELINE_HEAD` and the last `TIMELINE_TAIL`.
pub fn bounded_timeline(
    mut timeline: Vec<TimelineEntry>,
    dropped: u64,
) -> (Vec<TimelineEntry>, u64) {
    let keep = TIMELINE_HEAD + TIMELINE_TAIL;
    if timeline.len() <= keep {
        return (timeline, dropped);
    }
    let excess = timeline.len() - keep;
    timeline.drain(TIMELINE_HEAD..TIMELINE_HEAD + excess);
    (timeline, dropped.saturating_add(excess as u64))
}

/// Whether GitLab knows this VM, as status.json shows it. Only ever moves forward within a run (a refused verify is the
/// one step back: GitLab created nothing), and a restarted agent takes it from status.json.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// GitLab knows nothing of this boot.
    None,
    /// GitLab knows this VM, or may (a verify sent, a runner created or handed over by the
    /// broker): teardown deletes it.
    Registered,
    /// Deleted from GitLab, or found gone.
    Deregistered,
}

impl Registration {
    /// From status.json's two flags.
    pub fn from_flags(registered: bool, deregistered: bool) -> Self {
        match (registered, deregistered) {
            (false, _) => Registration::None,
            (true, false) => Registration::Registered,
            (true, true) => Registration::Deregistered,
        }
    }

    /// status.json's `registered`: GitLab knew this VM at some point of this boot.
    pub fn ever_registered(self) -> bool {
        self != Registration::None
    }

    /// status.json's `deregistered`.
    pub fn deregistered(self) -> bool {
        self == Registration::Deregistered
    }
}

/// The current phase, and what has happened so far in this boot.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    phase: Phase,
    /// Bounded: see `bounded_timeline`.
    pub timeline: Vec<TimelineEntry>,
    /// Entries dropped from the middle of the timeline.
    pub timeline_dropped: u64,
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
            timeline_dropped: 0,
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
        self.keep_timeline_bounded();
        Ok(())
    }

    /// Puts an earlier run's timeline (with what it had dropped) before this run's.
    pub fn continue_timeline(&mut self, mut earlier: Vec<TimelineEntry>, earlier_dropped: u64) {
        earlier.append(&mut self.timeline);
        self.timeline = earlier;
        self.timeline_dropped = self.timeline_dropped.saturating_add(earlier_dropped);
        self.keep_timeline_bounded();
    }

    fn keep_timeline_bounded(&mut self) {
        let (timeline, dropped) =
            bounded_timeline(std::mem::take(&mut self.timeline), self.timeline_dropped);
        self.timeline = timeline;
        self.timeline_dropped = dropped;
    }
}

/// What the outside world asks of the run: by signal, or by a preemption notice. Only ever
/// escalates (None < Drain < Preempted < Stop), and each level is one rule of the lifecycle,
/// applied where the next phase is chosen rather than checked in every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Interrupt {
    None,
    /// SIGUSR1 (`gitlab-runner-vm drain`): finish the current job, take no new one.
    Drain,
    /// A notice that the platform takes the VM at a deadline (spot or preemptible reclaim,
    /// host maintenance): a drain, then the abort the notice plans; no hold (it would not
    /// last) and no failure delay (there is no boot loop to slow down: the platform ends the
    /// VM anyway). A rebalance recommendation, which has no deadline, is not this.
    Preempted,
    /// SIGTERM/SIGINT: the VM is being shut down from outside.
    Stop,
}

impl Interrupt {
    /// Whether a keep file may still hold the VM, and a failure still delay its power-off.
    pub fn allows_hold_and_delay(self) -> bool {
        self < Interrupt::Preempted
    }
}

/// After deregistration (or when there was nothing to deregister): hold while the keep file
/// exists, otherwise power off; never hold a VM the platform takes away.
pub fn after_deregistration(keep_file_exists: bool, interrupt: Interrupt) -> Phase {
    if keep_file_exists && interrupt.allows_hold_and_delay() {
        Phase::Holding
    } else {
        Phase::PoweringOff
    }
}

/// How long to wait before running the power-off command: a failed run keeps the VM up until
/// `failure_delay` after the failure (so an operator can read the error, and a fleet with a
/// broken configuration does not boot VMs in a tight loop); a hold that lasted longer than that
/// needs no further wait, and neither does a VM the platform takes away.
pub fn poweroff_wait(
    failed_at: Option<SystemTime>,
    failure_delay: Duration,
    now: SystemTime,
    interrupt: Interrupt,
) -> Duration {
    match failed_at {
        _ if !interrupt.allows_hold_and_delay() => Duration::ZERO,
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
mod tests;
