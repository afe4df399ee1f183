//! The lifecycle record of one boot: when each milestone happened, in milliseconds since the
//! kernel started, so that a fleet's boot-to-job latency (and where a boot spends its time)
//! can be measured from logs. It is filled in as the milestones happen (status.json carries it
//! as `boot_record`), and at the end of the run it becomes one structured journal entry and one
//! console line.
//!
//! The clock is CLOCK_BOOTTIME, what /proc/uptime shows: it starts with the kernel and, unlike
//! the wall clock, does not jump when NTP sets the time during boot. The lifecycle timeline
//! (wall-clock phase changes) cannot stand in for it: most milestones (registered, a job's
//! start and end, deregistered, the power-off command) happen inside a phase, not at its edge.

use serde::{Deserialize, Serialize};

/// Milliseconds since the kernel started, now.
pub fn now_ms() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    // CLOCK_BOOTTIME exists on every kernel this agent supports; 0 keeps a record going if not.
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// Each milestone of this boot, in ms since kernel start; None until it happens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BootRecord {
    /// The agent started (the first start of this boot, if systemd restarted it).
    pub boot_to_agent_ms: Option<u64>,
    /// runner.json was found and valid.
    pub config_found_ms: Option<u64>,
    /// GitLab accepted the token or created the runner.
    pub registered_ms: Option<u64>,
    /// Jobs gitlab-runner received, and how many of them failed.
    pub jobs: u32,
    pub jobs_failed: u32,
    pub first_job_start_ms: Option<u64>,
    pub last_job_end_ms: Option<u64>,
    pub deregistered_ms: Option<u64>,
    /// The run failed (the error is status.json's `last_error`).
    pub failed_ms: Option<u64>,
    /// The power-off command ran, or the agent ended without it (`ended_by`).
    pub poweroff_ms: Option<u64>,
    /// `poweroff`, `no-poweroff` (--no-poweroff) or `stop` (SIGTERM: the VM is shut down from
    /// outside).
    pub ended_by: Option<String>,
    /// Jobs started and not finished yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub running_jobs: Vec<RunningJob>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    pub job: u64,
    pub started_ms: u64,
}

impl BootRecord {
    /// The agent started: a restarted agent keeps the first start.
    pub fn agent_started(&mut self, at: u64) {
        self.boot_to_agent_ms.get_or_insert(at);
    }

    pub fn config_found(&mut self, at: u64) {
        self.config_found_ms.get_or_insert(at);
    }

    pub fn registered(&mut self, at: u64) {
        self.registered_ms.get_or_insert(at);
    }

    pub fn deregistered(&mut self, at: u64) {
        self.deregistered_ms.get_or_insert(at);
    }

    pub fn failed(&mut self, at: u64) {
        self.failed_ms.get_or_insert(at);
    }

    /// The end of the run; the last one counts (a failed power-off command is retried by a
    /// restarted agent).
    pub fn ended(&mut self, at: u64, by: &str) {
        self.poweroff_ms = Some(at);
        self.ended_by = Some(by.to_string());
    }

    pub fn job_started(&mut self, job: u64, at: u64) {
        self.jobs += 1;
        self.first_job_start_ms.get_or_insert(at);
        self.running_jobs.retain(|j| j.job != job);
        self.running_jobs.push(RunningJob {
            job,
            started_ms: at,
        });
    }

    /// A job ended; how long it ran, when its start was seen.
    pub fn job_finished(&mut self, job: u64, at: u64, succeeded: bool) -> Option<u64> {
        self.last_job_end_ms = Some(at);
        if !succeeded {
            self.jobs_failed += 1;
        }
        let i = self.running_jobs.iter().position(|j| j.job == job)?;
        let started = self.running_jobs.remove(i).started_ms;
        Some(at.saturating_sub(started))
    }

    /// gitlab-runner ended (or was stopped) with jobs it never reported the end of: they end
    /// now, as failed. Each job and how long it ran.
    pub fn abandon_running(&mut self, at: u64) -> Vec<(u64, u64)> {
        let jobs: Vec<_> = self.running_jobs.iter().map(|j| j.job).collect();
        jobs.into_iter()
            .filter_map(|job| Some((job, self.job_finished(job, at, false)?)))
            .collect()
    }

    /// `key=value` for every field, `-` for what did not happen: the message of the journal
    /// entry and the console line.
    pub fn summary(&self) -> String {
        let ms = |v: Option<u64>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
        format!(
            "boot_to_agent_ms={} config_found_ms={} registered_ms={} jobs={} jobs_failed={} first_job_start_ms={} last_job_end_ms={} deregistered_ms={} failed_ms={} poweroff_ms={} ended_by={}",
            ms(self.boot_to_agent_ms),
            ms(self.config_found_ms),
            ms(self.registered_ms),
            self.jobs,
            self.jobs_failed,
            ms(self.first_job_start_ms),
            ms(self.last_job_end_ms),
            ms(self.deregistered_ms),
            ms(self.failed_ms),
            ms(self.poweroff_ms),
            self.ended_by.as_deref().unwrap_or("-"),
        )
    }

    /// The structured journal entry (fields BOOT_TO_AGENT_MS, CONFIG_FOUND_MS, ...; a
    /// milestone that did not happen has no field).
    pub fn log(&self) {
        tracing::info!(
            boot_to_agent_ms = self.boot_to_agent_ms,
            config_found_ms = self.config_found_ms,
            registered_ms = self.registered_ms,
            jobs = self.jobs,
            jobs_failed = self.jobs_failed,
            first_job_start_ms = self.first_job_start_ms,
            last_job_end_ms = self.last_job_end_ms,
            deregistered_ms = self.deregistered_ms,
            failed_ms = self.failed_ms,
            poweroff_ms = self.poweroff_ms,
            ended_by = self.ended_by.as_deref(),
            "boot record: {}",
            self.summary()
        );
    }
}

/// "12.3 s", for the console and the journal.
pub fn seconds(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, ms % 1000 / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_boot_with_two_jobs() {
        let mut r = BootRecord::default();
        r.agent_started(1200);
        r.config_found(1300);
        r.registered(1500);
        r.job_started(7, 2000);
        assert_eq!(r.job_finished(7, 5500, true), Some(3500));
        r.job_started(8, 6000);
        assert_eq!(
            r.running_jobs,
            [RunningJob {
                job: 8,
                started_ms: 6000
            }]
        );
        assert_eq!(r.job_finished(8, 9000, false), Some(3000));
        r.deregistered(9100);
        r.ended(9200, "poweroff");
        assert_eq!(
            r.summary(),
            "boot_to_agent_ms=1200 config_found_ms=1300 registered_ms=1500 jobs=2 jobs_failed=1 first_job_start_ms=2000 last_job_end_ms=9000 deregistered_ms=9100 failed_ms=- poweroff_ms=9200 ended_by=poweroff"
        );
        assert!(r.running_jobs.is_empty());
    }

    #[test]
    fn jobs_never_reported_ended_end_as_failed() {
        let mut r = BootRecord::default();
        r.job_started(7, 2000);
        assert_eq!(r.abandon_running(2500), [(7, 500)]);
        assert_eq!((r.jobs, r.jobs_failed), (1, 1));
        assert_eq!(r.last_job_end_ms, Some(2500));
        assert!(r.abandon_running(3000).is_empty());
        assert_eq!(r.last_job_end_ms, Some(2500));
    }

    #[test]
    fn first_milestones_stay_and_the_end_is_the_last() {
        let mut r = BootRecord::default();
        r.agent_started(1000);
        // A restarted agent: the boot's first start, its first registration stay.
        r.agent_started(9000);
        r.registered(2000);
        r.registered(9500);
        r.ended(10_000, "poweroff");
        r.ended(16_000, "poweroff");
        assert_eq!(r.boot_to_agent_ms, Some(1000));
        assert_eq!(r.registered_ms, Some(2000));
        assert_eq!(r.poweroff_ms, Some(16_000));
        // An end whose start was not seen (the agent restarted in between) has no duration.
        assert_eq!(r.job_finished(5, 12_000, true), None);
        assert_eq!(r.last_job_end_ms, Some(12_000));
    }

    #[test]
    fn status_json_carries_the_same_fields() {
        let mut r = BootRecord::default();
        r.agent_started(1200);
        r.failed(1400);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["boot_to_agent_ms"], 1200);
        assert_eq!(json["failed_ms"], 1400);
        assert!(json["registered_ms"].is_null());
        assert!(json.get("running_jobs").is_none());
        // A status.json of an older agent has no record: an empty one.
        let old: BootRecord = serde_json::from_str("{}").unwrap();
        assert_eq!(old, BootRecord::default());
    }

    #[test]
    fn the_clock_counts_from_the_kernels_start() {
        let uptime: f64 = std::fs::read_to_string("/proc/uptime")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let now = now_ms() as f64 / 1000.0;
        assert!((now - uptime).abs() < 5.0, "{now} vs /proc/uptime {uptime}");
        assert_eq!(seconds(12_345), "12.3 s");
    }
}
