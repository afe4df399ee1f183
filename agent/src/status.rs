//! `<state-dir>/status.json`: what the agent is doing, for people (`gitlab-runner-vm status`),
//! for scripts (`status --json`), for `drain` (the agent's pid) and for a restarted agent (did
//! this boot already register or start gitlab-runner?). Rewritten atomically on every change.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::boot_record::BootRecord;
use crate::config::CredentialKind;
use crate::lifecycle::{Phase, TimelineEntry};
use crate::timestamp::{fmt_time, rfc3339, rfc3339_opt};

pub const FILE_NAME: &str = "status.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// First in the file: a restarted agent that cannot parse the file still finds this boot's
    /// id in its first bytes (`whose`).
    pub boot_id: String,
    pub phase: Phase,
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    /// The agent's process id, for `gitlab-runner-vm drain`.
    pub pid: u32,
    pub runner: Option<String>,
    pub system_id: Option<String>,
    pub credential: Option<CredentialKind>,
    pub gitlab_url: Option<String>,
    pub registered: bool,
    pub deregistered: bool,
    pub runner_started: bool,
    /// The first `lifecycle::TIMELINE_HEAD` entries of this boot and the last
    /// `lifecycle::TIMELINE_TAIL`; `timeline_dropped` counts those dropped between them.
    pub timeline: Vec<TimelineEntry>,
    #[serde(default)]
    pub timeline_dropped: u64,
    pub last_error: Option<String>,
    #[serde(with = "rfc3339_opt", default)]
    pub hold_deadline: Option<SystemTime>,
    /// When this boot's hold began: `--hold-max` counts from it, also for a restarted agent.
    #[serde(with = "rfc3339_opt", default)]
    pub hold_started: Option<SystemTime>,
    #[serde(with = "rfc3339_opt", default)]
    pub poweroff_at: Option<SystemTime>,
    /// The preemption or maintenance notice acted on (absent: none, or an older agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preemption: Option<crate::preemption::Notice>,
    /// When each milestone of this boot happened (`boot_record`).
    #[serde(default)]
    pub boot_record: BootRecord,
    /// The runner token's expiry, as GitLab gave it at registration.
    #[serde(with = "rfc3339_opt", default)]
    pub token_expires_at: Option<SystemTime>,
    /// It expires soon, or GitLab's date could not be read.
    #[serde(default)]
    pub token_warning: Option<String>,
}

/// status.json as last written, shared by the agent's steps and the task that forwards
/// gitlab-runner's output (which amends the boot record as jobs start and end), so that
/// neither writes an older status over the other's.
#[derive(Debug, Clone)]
pub struct Published {
    state_dir: PathBuf,
    last: Arc<Mutex<Option<Status>>>,
}

impl Published {
    pub fn new(state_dir: &Path) -> Self {
        Published {
            state_dir: state_dir.to_path_buf(),
            last: Arc::default(),
        }
    }

    /// Writes the status made by `make`, which runs while no one else writes.
    pub fn write(&self, make: impl FnOnce() -> Status) -> io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let status = make();
        let written = write(&self.state_dir, &status);
        *last = Some(status);
        written
    }

    /// Changes the last status written and writes it again; nothing before the first write.
    pub fn amend(&self, change: impl FnOnce(&mut Status)) -> io::Result<()> {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last.as_mut() {
            Some(status) => {
                change(status);
                write(&self.state_dir, status)
            }
            None => Ok(()),
        }
    }
}

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// Writes the status next to its final place and renames it over, so readers never see half a
/// file.
pub fn write(state_dir: &Path, status: &Status) -> io::Result<()> {
    let tmp = state_dir.join(".status.json.tmp");
    let mut file = fs::File::create(&tmp)?;
    // The file is world-readable: whatever a field carries (a token pasted into runner.json's
    // name, an error body that echoed one), no token goes in whole.
    let text = to_json(status).map_err(io::Error::other)?;
    let mut text = crate::secret::scrub(&text);
    text.push('\n');
    file.write_all(text.as_bytes())?;
    file.sync_data()?;
    fs::rename(&tmp, path_in(state_dir))
}

/// The status as pretty JSON in which every character a terminal could act on is escaped
/// (`\uXXXX`), not just the C0 controls serde_json escapes: `status --json` prints the file
/// as it is, and so does `cat`. Still JSON, with the same values.
fn to_json(status: &Status) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let formatter = TerminalSafe(serde_json::ser::PrettyFormatter::new());
    status.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, formatter,
    ))?;
    // Only whole characters and ASCII escapes were written.
    String::from_utf8(out).map_err(serde::ser::Error::custom)
}

struct TerminalSafe<'a>(serde_json::ser::PrettyFormatter<'a>);

impl serde_json::ser::Formatter for TerminalSafe<'_> {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut rest = fragment;
        while let Some((at, c)) = rest.char_indices().find(|(_, c)| crate::console::hides(*c)) {
            writer.write_all(&rest.as_bytes()[..at])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }

    // Everything else as the pretty formatter does it.
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.0.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.0.end_object_value(w)
    }
}

pub fn read(state_dir: &Path) -> io::Result<Status> {
    let text = crate::files::read_text(&path_in(state_dir), crate::files::STATE_FILE_CAP)?;
    serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The status as a person reads it.
pub fn render(status: &Status, now: SystemTime) -> String {
    let mut out = String::new();
    let ago = |t: SystemTime| match now.duration_since(t) {
        Ok(d) => format!(
            "{} ago",
            humantime::format_duration(std::time::Duration::from_secs(d.as_secs()))
        ),
        Err(_) => "just now".to_string(),
    };
    // One column wider than the longest label ("gitlab-runner:", "power-off at:").
    // Values come from GitLab (an error body, token_expires_at), runner.json and the metadata
    // service: each shown as one printable line, so none can act on the operator's terminal
    // or pass for another line.
    let line = |out: &mut String, key: &str, value: &str| {
        out.push_str(&format!("{key:<16}{}\n", crate::console::printable(value)))
    };
    line(
        &mut out,
        "phase:",
        &format!(
            "{} (since {}, {})",
            status.phase,
            fmt_time(status.since),
            ago(status.since)
        ),
    );
    if let Some(runner) = &status.runner {
        line(&mut out, "runner:", runner);
    }
    if let Some(id) = &status.system_id {
        line(&mut out, "system id:", id);
    }
    if let Some(url) = &status.gitlab_url {
        line(&mut out, "gitlab:", url);
    }
    if let Some(kind) = status.credential {
        line(&mut out, "credential:", kind.as_str());
    }
    let registration = match (status.registered, status.deregistered) {
        (true, true) => "deregistered",
        (true, false) => "registered",
        _ => "not registered",
    };
    line(&mut out, "registration:", registration);
    line(
        &mut out,
        "gitlab-runner:",
        if status.runner_started {
            "started"
        } else {
            "not started"
        },
    );
    if let Some(deadline) = status.hold_deadline {
        line(
            &mut out,
            "hold until:",
            &format!(
                "{} (remove the keep file or run `gitlab-runner-vm release` to end it now)",
                fmt_time(deadline)
            ),
        );
    }
    if let Some(at) = status.poweroff_at {
        line(&mut out, "power-off at:", &fmt_time(at));
    }
    if let Some(notice) = &status.preemption {
        line(
            &mut out,
            "notice:",
            &format!(
                "{} (received {})",
                notice.describe(now),
                fmt_time(notice.received)
            ),
        );
    }
    if let Some(err) = &status.last_error {
        line(&mut out, "last error:", err);
    }
    if let Some(at) = status.token_expires_at {
        line(&mut out, "token expires:", &fmt_time(at));
    }
    if let Some(warning) = &status.token_warning {
        line(&mut out, "token warning:", warning);
    }
    line(&mut out, "boot record:", &status.boot_record.summary());
    out.push_str("timeline:\n");
    for (i, entry) in status.timeline.iter().enumerate() {
        if i == crate::lifecycle::TIMELINE_HEAD && status.timeline_dropped > 0 {
            out.push_str(&format!(
                "  ... {} entries dropped (restarts of this boot; the first and the last are kept)\n",
                status.timeline_dropped
            ));
        }
        out.push_str(&format!("  {}  {}\n", fmt_time(entry.at), entry.phase));
    }
    out
}

/// What a starting agent finds in its state directory.
#[derive(Debug)]
pub enum Found {
    /// No status.json: no run in this state directory.
    Nothing,
    Status(Box<Status>),
    /// status.json is there but cannot be read or parsed (`error` says why).
    Unreadable {
        error: String,
        whose: Whose,
    },
}

/// Whose a status.json that cannot be parsed is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Whose {
    /// Written before this boot began, without this boot's id: starting afresh is safe.
    AnotherBoot,
    /// This boot's, for the reason given: this boot may have registered and run a job.
    ThisBoot(&'static str),
    /// Cannot be told (its content or its time cannot be read): taken as this boot's.
    Unknown,
}

impl Whose {
    pub fn may_be_this_boot(&self) -> bool {
        !matches!(self, Whose::AnotherBoot)
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Whose::AnotherBoot => "it is from an earlier boot",
            Whose::ThisBoot(why) => why,
            Whose::Unknown => "which boot wrote it cannot be told, so it counts as this boot's",
        }
    }
}

/// How many bytes of an unparsable status.json are searched for the boot id (the first key).
const BOOT_ID_PREFIX: usize = 4096;

/// Judges a status.json that cannot be parsed, failing closed: it is another boot's only when
/// its first bytes could be read and do not carry this boot's id, and it was last changed
/// before this boot began. The time alone is not enough: NTP may set the clock forward after
/// the file was written, making a file of this boot look older than the boot.
pub fn whose(
    prefix: Option<&[u8]>,
    modified: Option<SystemTime>,
    boot_id: &str,
    boot_started: Option<SystemTime>,
) -> Whose {
    // An id is 36 characters; "unknown" (no /proc) would match any file that says so.
    let id_known = boot_id.len() >= 16;
    if let Some(prefix) = prefix
        && id_known
        && prefix
            .windows(boot_id.len())
            .any(|w| w == boot_id.as_bytes())
    {
        return Whose::ThisBoot("it names this boot's id");
    }
    match (prefix, modified, boot_started) {
        (_, Some(modified), Some(started)) if modified >= started => {
            Whose::ThisBoot("it was changed after this boot began")
        }
        (Some(_), Some(_), Some(_)) if id_known => Whose::AnotherBoot,
        _ => Whose::Unknown,
    }
}

/// status.json as a starting agent finds it; an unreadable file is judged by `whose`.
pub fn find(state_dir: &Path, boot_id: &str) -> Found {
    let path = path_in(state_dir);
    let error = match read(state_dir) {
        Ok(status) => return Found::Status(Box::new(status)),
        Err(e) => e,
    };
    // Not even a dangling link or an unreadable directory: nothing ran here.
    let meta = match fs::symlink_metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Found::Nothing,
        meta => meta.ok(),
    };
    let prefix = crate::files::read_prefix(&path, BOOT_ID_PREFIX);
    let modified = meta.and_then(|m| m.modified().ok());
    Found::Unreadable {
        error: error.to_string(),
        whose: whose(prefix.as_deref(), modified, boot_id, boot_started()),
    }
}

/// When this boot began on the wall clock: now less the time since the kernel started.
fn boot_started() -> Option<SystemTime> {
    use nix::time::{ClockId, clock_gettime};
    let up = clock_gettime(ClockId::CLOCK_BOOTTIME).ok()?;
    let up = std::time::Duration::new(up.tv_sec() as u64, up.tv_nsec() as u32);
    SystemTime::now().checked_sub(up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sample() -> Status {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        Status {
            phase: Phase::Holding,
            since: t0,
            pid: 42,
            boot_id: "b1".into(),
            runner: Some("vm-1".into()),
            system_id: Some("r_abcdefABCDEF".into()),
            credential: Some(CredentialKind::RunnerToken),
            gitlab_url: Some("https://gitlab.example.com".into()),
            registered: true,
            deregistered: true,
            runner_started: true,
            timeline: vec![
                TimelineEntry {
                    phase: Phase::WaitingForConfig,
                    at: t0,
                },
                TimelineEntry {
                    phase: Phase::Holding,
                    at: t0,
                },
            ],
            timeline_dropped: 0,
            last_error: None,
            hold_deadline: Some(t0 + Duration::from_secs(3600)),
            hold_started: Some(t0),
            poweroff_at: None,
            preemption: None,
            boot_record: BootRecord::default(),
            token_expires_at: None,
            token_warning: None,
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &sample()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), sample());
        let raw: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(path_in(dir.path())).unwrap()).unwrap();
        assert_eq!(raw["phase"], "holding");
        assert_eq!(raw["hold_deadline"], "2027-01-15T09:00:00.000Z");
        assert!(!dir.path().join(".status.json.tmp").exists());
    }

    fn notice(at: SystemTime) -> crate::preemption::Notice {
        crate::preemption::Notice {
            platform: "gce".into(),
            kind: crate::preemption::NoticeKind::Preemption,
            detail: "instance/preempted TRUE".into(),
            received: at,
            deadline: Some(at + Duration::from_secs(30)),
        }
    }

    #[test]
    fn a_notice_is_shown_with_its_deadline_and_kept_in_the_file() {
        let mut s = sample();
        s.preemption = Some(notice(s.since));
        let text = render(&s, s.since + Duration::from_secs(5));
        assert!(
            text.contains("notice:         gce preemption notice (instance/preempted TRUE): the VM goes away at 2027-01-15T08:00:30.000Z (in 25 s) (received 2027-01-15T08:00:00.000Z)"),
            "{text}"
        );
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        // Without a notice the key is absent, as in the files of older agents.
        write(dir.path(), &sample()).unwrap();
        let raw = fs::read_to_string(path_in(dir.path())).unwrap();
        assert!(!raw.contains("preemption"), "{raw}");
    }

    #[test]
    fn an_amendment_keeps_the_rest_of_the_last_status() {
        let dir = tempfile::tempdir().unwrap();
        let published = Published::new(dir.path());
        // Nothing to amend before the first write.
        published.amend(|s| s.boot_record.jobs = 9).unwrap();
        assert!(read(dir.path()).is_err());
        published.write(sample).unwrap();
        published
            .amend(|s| s.boot_record.job_started(42, 1500))
            .unwrap();
        let shown = read(dir.path()).unwrap();
        assert_eq!(shown.boot_record.jobs, 1);
        assert_eq!(shown.boot_record.first_job_start_ms, Some(1500));
        assert_eq!(shown.phase, Phase::Holding);
        // The next write from the agent carries what it makes; the amendment was the record's.
        let mut next = sample();
        next.phase = Phase::PoweringOff;
        published.write(|| next).unwrap();
        assert_eq!(read(dir.path()).unwrap().phase, Phase::PoweringOff);
    }

    #[test]
    fn the_token_expiry_and_the_boot_record_are_shown() {
        let mut s = sample();
        s.token_expires_at = Some(s.since + Duration::from_secs(7200));
        s.token_warning = Some("the runner token expires at ...".into());
        s.boot_record.agent_started(1200);
        let text = render(&s, s.since);
        assert!(
            text.contains("token expires:  2027-01-15T10:00:00.000Z"),
            "{text}"
        );
        assert!(
            text.contains("token warning:  the runner token expires"),
            "{text}"
        );
        assert!(
            text.contains("boot record:    boot_to_agent_ms=1200 "),
            "{text}"
        );
        // An older status.json without these fields still reads.
        let mut raw: serde_json::Value = serde_json::to_value(&s).unwrap();
        for key in ["boot_record", "token_expires_at", "token_warning"] {
            raw.as_object_mut().unwrap().remove(key);
        }
        let old: Status = serde_json::from_value(raw).unwrap();
        assert_eq!(old.boot_record, crate::boot_record::BootRecord::default());
    }

    #[test]
    fn the_boot_id_comes_first_and_dropped_entries_are_said() {
        let mut s = sample();
        let raw = serde_json::to_string_pretty(&s).unwrap();
        assert!(raw.starts_with("{\n  \"boot_id\": \"b1\","), "{raw}");
        s.timeline = (0..crate::lifecycle::TIMELINE_HEAD + 2)
            .map(|_| s.timeline[0].clone())
            .collect();
        s.timeline_dropped = 5000;
        let text = render(&s, s.since);
        let lines: Vec<&str> = text.lines().skip_while(|l| *l != "timeline:").collect();
        assert_eq!(
            lines[1 + crate::lifecycle::TIMELINE_HEAD],
            "  ... 5000 entries dropped (restarts of this boot; the first and the last are kept)"
        );
        assert_eq!(lines.len(), 1 + crate::lifecycle::TIMELINE_HEAD + 3);
    }

    #[test]
    fn an_unparsable_file_is_another_boots_only_when_it_provably_is() {
        let id = "0b5c3f8e-7d1a-4c2b-9e6f-1a2b3c4d5e6f";
        let t = |s| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        let boot = Some(t(1000));
        let other = b"{\n  \"boot_id\": \"11111111-2222-3333-4444-555555555555\", \"pha";
        let mine = format!("{{\n  \"boot_id\": \"{id}\",\n  \"pha");
        assert_eq!(
            whose(Some(other), Some(t(10)), id, boot),
            Whose::AnotherBoot
        );
        // This boot's id, even in a file that looks older than the boot (the clock moved).
        assert!(matches!(
            whose(Some(mine.as_bytes()), Some(t(10)), id, boot),
            Whose::ThisBoot(_)
        ));
        // Changed since the boot began: this boot's, whatever it says.
        assert!(matches!(
            whose(Some(other), Some(t(1000)), id, boot),
            Whose::ThisBoot(_)
        ));
        assert!(matches!(
            whose(None, Some(t(2000)), id, boot),
            Whose::ThisBoot(_)
        ));
        // Nothing to tell it by: fail closed.
        assert_eq!(whose(None, Some(t(10)), id, boot), Whose::Unknown);
        assert_eq!(whose(Some(other), None, id, boot), Whose::Unknown);
        assert_eq!(whose(Some(other), Some(t(10)), id, None), Whose::Unknown);
        assert_eq!(
            whose(Some(b"unknown"), Some(t(10)), "unknown", boot),
            Whose::Unknown
        );
    }

    #[test]
    fn find_tells_no_file_from_an_unreadable_one() {
        let dir = tempfile::tempdir().unwrap();
        let id = "0b5c3f8e-7d1a-4c2b-9e6f-1a2b3c4d5e6f";
        assert!(matches!(find(dir.path(), id), Found::Nothing));
        // A link to nothing is there, and unreadable.
        std::os::unix::fs::symlink("nowhere", path_in(dir.path())).unwrap();
        assert!(matches!(
            find(dir.path(), id),
            Found::Unreadable { whose, .. } if whose.may_be_this_boot()
        ));
        fs::remove_file(path_in(dir.path())).unwrap();
        write(dir.path(), &sample()).unwrap();
        assert!(matches!(find(dir.path(), id), Found::Status(_)));
    }

    #[test]
    fn render_explains_the_hold() {
        let s = sample();
        let text = render(&s, s.since + Duration::from_secs(90));
        assert!(
            text.contains("phase:          holding (since 2027-01-15T08:00:00.000Z, 1m 30s ago)"),
            "{text}"
        );
        assert!(text.contains("gitlab-runner-vm release"), "{text}");
        assert!(text.contains("registration:   deregistered"), "{text}");
    }

    #[test]
    fn every_label_is_followed_by_a_space_and_values_line_up() {
        let mut s = sample();
        s.poweroff_at = Some(s.since);
        s.last_error = Some("x".into());
        s.preemption = Some(notice(s.since));
        let text = render(&s, s.since);
        let labelled: Vec<&str> = text
            .lines()
            .take_while(|l| !l.starts_with("timeline:"))
            .collect();
        assert!(labelled.len() >= 10, "{text}");
        for l in &labelled {
            let colon = l.find(": ").unwrap_or_else(|| panic!("no \": \" in {l:?}"));
            assert!(colon < 15, "{l:?}");
            assert_ne!(&l[16..17], " ", "values start in one column: {l:?}");
            assert_eq!(&l[15..16], " ", "{l:?}");
        }
        assert!(text.contains("gitlab-runner:  started"), "{text}");
    }
}
