//! The lines of `gitlab-runner run-single` that say a job started or ended, recognised in its
//! output for the console's milestones and the boot record. gitlab-runner logs (log formats
//! `runner`, the default, `text` and `json`):
//!
//! - `Checking for jobs... received` with `job=<id>` when GitLab hands it a job
//!   (`network/gitlab.go`, RequestJob);
//! - `Job succeeded`, `Job failed: <error>` (a warning) or `Job failed (system failure):
//!   <error>` (an error) with `job=<id>` when the job ends (`common/build.go`, setTraceStatus).
//!
//! The runner format colours the message and every field name with ANSI escapes
//! (`\x1b[0;33mWARNING: Job failed: exit code 1\x1b[0;m  job\x1b[0;m=42`); they are removed
//! first. The message must open the line (after the level's `WARNING: `/`ERROR: `), so text in
//! a field (an error quoting a job's output, say) is never taken for one.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobLine {
    Started { job: u64 },
    Finished { job: u64, outcome: Outcome },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The job's script failed (or it was canceled, timed out...).
    Failed,
    /// gitlab-runner or the VM failed it (`runner_system_failure`, which `retry: when:` retries).
    SystemFailure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::SystemFailure => "failed (system failure)",
        }
    }
}

/// The job event a line of gitlab-runner's output reports, if any.
pub fn parse(raw: &str) -> Option<JobLine> {
    let line = strip_ansi(raw);
    let line = line.trim();
    let (message, job) = if line.starts_with('{') {
        let value: Value = serde_json::from_str(line).ok()?;
        let message = value.get("msg")?.as_str()?.to_string();
        (message, value.get("job")?.as_u64()?)
    } else if let Some(rest) = text_format_message(line) {
        (rest, field_job(line)?)
    } else {
        let message = line
            .strip_prefix("WARNING: ")
            .or_else(|| line.strip_prefix("ERROR: "))
            .unwrap_or(line);
        (message.to_string(), field_job(line)?)
    };
    let event = if message.starts_with("Checking for jobs... received") {
        JobLine::Started { job }
    } else if message.starts_with("Job succeeded") {
        JobLine::Finished {
            job,
            outcome: Outcome::Succeeded,
        }
    } else if message.starts_with("Job failed (system failure)") {
        JobLine::Finished {
            job,
            outcome: Outcome::SystemFailure,
        }
    } else if message.starts_with("Job failed") {
        JobLine::Finished {
            job,
            outcome: Outcome::Failed,
        }
    } else {
        return None;
    };
    Some(event)
}

/// logrus's text format: `time="…" level=info msg="Job succeeded" job=42 …`.
fn text_format_message(line: &str) -> Option<String> {
    if !line.starts_with("time=") && !line.starts_with("level=") {
        return None;
    }
    let start = line.find(" msg=")? + " msg=".len();
    let rest = &line[start..];
    Some(match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next().unwrap_or_default().to_string(),
        None => rest.split(' ').next().unwrap_or_default().to_string(),
    })
}

/// The value of the last ` job=<digits>` field: fields are sorted by name and `job` comes after
/// `error`, whose free text could hold another.
fn field_job(line: &str) -> Option<u64> {
    line.rmatch_indices(" job=").find_map(|(at, key)| {
        let value = &line[at + key.len()..];
        let end = value
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(value.len());
        let ends_field = value[end..].chars().next().is_none_or(char::is_whitespace);
        ends_field.then(|| value[..end].parse().ok()).flatten()
    })
}

/// The line without ANSI escape sequences (CSI `ESC [ … final`, and any other `ESC x`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as gitlab-runner 18 prints them with its default (runner) log format, colours and
    /// all, between lines that are no job events.
    const RUNNER_FORMAT: &[&str] = &[
        "Runtime platform                                    \x1b[0;m  arch\x1b[0;m=amd64 os\x1b[0;m=linux pid\x1b[0;m=1234 revision\x1b[0;m=5a021a1c version\x1b[0;m=18.6.0",
        "Checking for jobs... received                       \x1b[0;m  job\x1b[0;m=399659 repo_url\x1b[0;m=https://gitlab.example.com/group/project.git runner\x1b[0;m=N83zBFyfs",
        "Added job to processing list                        \x1b[0;m  builds\x1b[0;m=1 job\x1b[0;m=399659 max_builds\x1b[0;m=1 project\x1b[0;m=4884",
        "Job succeeded                                       \x1b[0;m  correlation_id\x1b[0;m=01J duration_s\x1b[0;m=3.866619798 job\x1b[0;m=399659 job-status\x1b[0;m=success project\x1b[0;m=4884 runner\x1b[0;m=N83zBFyfs",
        "\x1b[0;33mWARNING: Job failed: exit code 1              \x1b[0;m  \x1b[0;33mduration_s\x1b[0;m=1.2 \x1b[0;33merror\x1b[0;m=exit code 1 job=7 \x1b[0;33mexit_code\x1b[0;m=1 \x1b[0;33mfailure_reason\x1b[0;m=script_failure \x1b[0;33mjob\x1b[0;m=400001 \x1b[0;33mjob-status\x1b[0;m=failed",
        "\x1b[31;1mERROR: Job failed (system failure): aborted: terminated\x1b[0;m  \x1b[31;1mduration_s\x1b[0;m=9.5 \x1b[31;1mjob\x1b[0;m=400002 \x1b[31;1mproject\x1b[0;m=4884",
        "Appending trace to coordinator...ok                 \x1b[0;m  code\x1b[0;m=202 job\x1b[0;m=399659 job-log\x1b[0;m=0-281",
    ];

    #[test]
    fn the_runner_format_with_its_colours() {
        let events: Vec<_> = RUNNER_FORMAT.iter().filter_map(|l| parse(l)).collect();
        assert_eq!(
            events,
            [
                JobLine::Started { job: 399659 },
                JobLine::Finished {
                    job: 399659,
                    outcome: Outcome::Succeeded
                },
                // The job= inside the error text is not the job's id.
                JobLine::Finished {
                    job: 400001,
                    outcome: Outcome::Failed
                },
                JobLine::Finished {
                    job: 400002,
                    outcome: Outcome::SystemFailure
                },
            ]
        );
    }

    #[test]
    fn the_json_and_text_formats() {
        let json = r#"{"job":42,"level":"info","msg":"Checking for jobs... received","repo_url":"https://gitlab.example.com/a/b.git","runner":"x","time":"2026-11-30T10:00:00Z"}"#;
        assert_eq!(parse(json), Some(JobLine::Started { job: 42 }));
        let json = r#"{"duration_s":1.5,"job":42,"job-status":"failed","level":"warning","msg":"Job failed: exit code 2","time":"2026-11-30T10:00:01Z"}"#;
        assert_eq!(
            parse(json),
            Some(JobLine::Finished {
                job: 42,
                outcome: Outcome::Failed
            })
        );
        let text = r#"time="2026-11-30T10:00:01Z" level=info msg="Job succeeded" duration_s=1.5 job=43 project=1"#;
        assert_eq!(
            parse(text),
            Some(JobLine::Finished {
                job: 43,
                outcome: Outcome::Succeeded
            })
        );
    }

    #[test]
    fn odd_bytes_elsewhere_in_the_line_do_not_matter() {
        // Non-UTF-8 bytes reach the parser as U+FFFD (the forwarder decodes lossily).
        let bytes =
            b"Checking for jobs... received  job=77 repo_url=https://x/\xff\xfe.git runner=\x1b[31";
        let line = String::from_utf8_lossy(bytes);
        assert_eq!(parse(&line), Some(JobLine::Started { job: 77 }));
        let huge = format!("Job succeeded  job=78 {}", "x".repeat(100_000));
        assert_eq!(
            parse(&huge),
            Some(JobLine::Finished {
                job: 78,
                outcome: Outcome::Succeeded
            })
        );
        assert_eq!(parse("Job succeeded  job=99999999999999999999999"), None);
    }

    #[test]
    fn other_lines_and_look_alikes_are_no_events() {
        for line in [
            "",
            "Checking for jobs... nothing                        \x1b[0;m  runner\x1b[0;m=x",
            // The message must open the line.
            "Removed job from processing list  error=Job succeeded job=5",
            // No job id.
            "Job succeeded                                       \x1b[0;m  duration_s\x1b[0;m=1",
            "Checking for jobs... received  job=12x4",
            "{not json at all",
            r#"{"msg":"Job succeeded","job":"42"}"#,
            "fake-gitlab-runner: job 5 succeeded",
            "\x1b",
            "\x1b[",
        ] {
            assert_eq!(parse(line), None, "{line:?}");
        }
    }
}
