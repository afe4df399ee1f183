//! The serial console: one line per milestone (registered, job started and finished,
//! deregistered, holding, powering off), the failure with its fix and the boot record, besides
//! the journal. From outside a VM the console is often all there is to read (`kubectl logs -c
//! guest-console-log`, `aws ec2 get-console-output`, GCE's serial port), so a fleet that keeps
//! failing can be diagnosed without getting into a VM within its failure delay.
//!
//! Every line starts with `gitlab-runner-vm: ` (greppable among the kernel's and systemd's
//! lines), is scrubbed of tokens, has no control characters and is at most `MAX_LINE` bytes.
//!
//! Writing never holds the agent up: a serial port stopped by flow control, or a FIFO nobody
//! reads, would otherwise stall the lifecycle (and with it deregistration and power-off). The
//! agent only queues lines, dropping them when the queue is full; a task of the agent's runtime
//! writes them to a descriptor opened non-blocking, waits for it to take more through the
//! runtime's poller, and gives up on a line after `LINE_TIMEOUT`. A task rather than a thread
//! of its own: a second thread, even one that never woke, made the start of gitlab-runner
//! 15-20 ms slower (BENCHMARKS.md), and the runtime's single thread has nothing to wait for
//! while it writes.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::{Receiver, Sender, error::TrySendError};
use tokio::time::Instant;

use crate::secret;

pub const PREFIX: &str = "gitlab-runner-vm: ";
/// The console the kernel was told to use (`console=ttyS0`): where platforms record what the
/// VM prints.
pub const DEFAULT: &str = "/dev/console";
/// Where lines go when the console cannot be opened: the kernel log, which the kernel prints
/// on its consoles at a priority above its console log level.
pub const KMSG: &str = "/dev/kmsg";
/// The longest line, prefix included, in bytes: a serial port at 115200 baud writes it in
/// about 40 ms, and a kmsg record holds it whole.
pub const MAX_LINE: usize = 480;
/// A line not written within this time is given up (the port is stuck).
const LINE_TIMEOUT: Duration = Duration::from_secs(1);
/// Lines waiting for the writer; more are dropped.
const QUEUE: usize = 64;

/// How a line matters, which decides its kmsg priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Milestone,
    Failure,
}

/// What `--console` says: a device (or file) to write to, or `off`.
pub fn target(flag: &Path) -> Option<&Path> {
    (flag != Path::new("off")).then_some(flag)
}

/// One console line, as written: prefix, the text scrubbed of tokens, every control
/// character (newlines, escape sequences) made a space, cut to `MAX_LINE` bytes.
pub fn format_line(text: &str) -> String {
    let mut line = String::from(PREFIX);
    line.push_str(&one_line(text, MAX_LINE - PREFIX.len()));
    line
}

/// The failure's line: `failed: <error>; fix: <fix>`, where a long error (GitLab's message,
/// say) is cut rather than the fix, which is what the operator needs.
pub fn failure_text(error: &str, fix: &str) -> String {
    let room = MAX_LINE - PREFIX.len() - "failed: ; fix: ".len();
    let fix = one_line(fix, room - room / 3);
    let error = one_line(error, room - fix.len());
    format!("failed: {error}; fix: {fix}")
}

/// `text` scrubbed of tokens, made `printable`, cut to `max` bytes with an ellipsis.
fn one_line(text: &str, max: usize) -> String {
    let mut line = printable(&secret::scrub(text));
    if line.len() > max {
        let mut cut = max.saturating_sub('…'.len_utf8());
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push('…');
    }
    line
}

/// `text` as one line that is safe on a terminal, for the console and for every command's
/// output a person reads (`status`, `check`, `drain`, errors): each character `hides` says
/// could act on the terminal or disguise the text becomes a space (runs of spaces one), so that
/// a value from GitLab, the metadata service or runner.json can neither retitle, clear or
/// link the operator's terminal nor forge a line of the output.
pub fn printable(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    let mut last_space = true;
    for c in text.chars() {
        let c = if hides(c) { ' ' } else { c };
        if c == ' ' && last_space {
            continue;
        }
        last_space = c == ' ';
        line.push(c);
    }
    if line.ends_with(' ') {
        line.pop();
    }
    line
}

/// Whether `c` is no text to show: a control character (C0 with newline and tab, DEL, C1:
/// ESC starts the sequences that retitle, clear or plant hyperlinks, and 0x9B is a CSI by
/// itself for terminals that take 8-bit controls), or an invisible format character that
/// reorders or hides text (the bidirectional embeddings, overrides and isolates of "Trojan
/// Source", CVE-2021-42574; marks, zero-width characters, line and paragraph separators,
/// tags). Also the one rule `status.json` escapes by (`status::write`).
pub fn hides(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0000}'..='\u{E007F}'
        )
}

/// The bytes of one line for its destination: on /dev/kmsg a record with a priority (user
/// facility; failures at err, which the kernel prints on its consoles at the usual console
/// log level 4, milestones at notice, which it only logs).
fn encode(line: &str, kind: Kind, severity: Severity) -> Vec<u8> {
    let priority = match (kind, severity) {
        (Kind::Device, _) => "",
        (Kind::Kmsg, Severity::Failure) => "<11>",
        (Kind::Kmsg, Severity::Milestone) => "<13>",
    };
    format!("{priority}{line}\n").into_bytes()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Device,
    Kmsg,
}

enum Request {
    Line(Vec<u8>),
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// The console's writer, or nothing (`--console off`, or nothing could be opened). Cheap to
/// clone; every clone queues to the same writer.
#[derive(Clone, Default)]
pub struct Console {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: Sender<Request>,
    path: PathBuf,
    kind: Kind,
    health: Arc<Health>,
    /// Problems already logged, so that a stuck port is reported once, not per line.
    told_dropped: AtomicBool,
    told_stuck: AtomicBool,
    told_error: AtomicBool,
}

/// What the writer task reports back.
#[derive(Default)]
struct Health {
    /// The last line was not written within LINE_TIMEOUT.
    stuck: AtomicBool,
    error: Mutex<Option<String>>,
}

impl Console {
    /// Opens the console at `path`, else `fallback` (/dev/kmsg), and logs where lines go.
    pub fn open(path: &Path, fallback: &Path) -> Console {
        let first = match open_nonblocking(path) {
            Ok(file) => return Console::start(file, path, kind_of(path)),
            Err(e) => e,
        };
        match open_nonblocking(fallback) {
            Ok(file) => {
                tracing::warn!(
                    "cannot open the console {} ({first}); console lines go to {} instead (failures show on the console, milestones only in the kernel log)",
                    path.display(),
                    fallback.display()
                );
                Console::start(file, fallback, kind_of(fallback))
            }
            Err(second) => {
                tracing::warn!(
                    "cannot open the console {} ({first}) nor {} ({second}): no console lines (--console off silences this)",
                    path.display(),
                    fallback.display()
                );
                Console::default()
            }
        }
    }

    /// Starts the writer task on the current runtime (the agent's), which `open` needs.
    fn start(file: File, path: &Path, kind: Kind) -> Console {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no runtime to write the console from; no console lines");
            return Console::default();
        };
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let health = Arc::new(Health::default());
        runtime.spawn(write_lines(Output::new(file), rx, health.clone()));
        Console {
            inner: Some(Arc::new(Inner {
                tx,
                path: path.to_path_buf(),
                kind,
                health,
                told_dropped: AtomicBool::new(false),
                told_stuck: AtomicBool::new(false),
                told_error: AtomicBool::new(false),
            })),
        }
    }

    /// Queues one line (see `format_line`); never waits.
    pub fn line(&self, severity: Severity, text: &str) {
        let Some(inner) = &self.inner else { return };
        inner.report_trouble();
        let bytes = encode(&format_line(text), inner.kind, severity);
        match inner.tx.try_send(Request::Line(bytes)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !inner.told_dropped.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "the console {} takes output slower than the agent writes it: dropping console lines",
                        inner.path.display()
                    );
                }
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    pub fn milestone(&self, text: &str) {
        self.line(Severity::Milestone, text);
    }

    pub fn failure(&self, text: &str) {
        self.line(Severity::Failure, text);
    }

    /// Waits until the lines queued so far are written, at most `timeout`; at once when the
    /// console is stuck. Before the power-off, which would cut the last lines.
    pub async fn flush(&self, timeout: Duration) {
        let Some(inner) = &self.inner else { return };
        if inner.health.stuck.load(Ordering::Relaxed) {
            return;
        }
        let (done, written) = tokio::sync::oneshot::channel();
        if inner.tx.try_send(Request::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(timeout, written).await;
        }
        // The last chance to say that lines were lost.
        inner.report_trouble();
    }
}

impl Inner {
    /// Logs, once each, what the writer ran into.
    fn report_trouble(&self) {
        if self.health.stuck.load(Ordering::Relaxed)
            && !self.told_stuck.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "the console {} took no output for {} s (a serial port stopped by flow control?): console lines may be lost",
                self.path.display(),
                LINE_TIMEOUT.as_secs()
            );
        }
        let error = self
            .health
            .error
            .lock()
            .ok()
            .and_then(|error| error.clone());
        if let Some(error) = error
            && !self.told_error.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "cannot write to the console {}: {error}",
                self.path.display()
            );
        }
    }
}

fn kind_of(path: &Path) -> Kind {
    if path == Path::new(KMSG) {
        Kind::Kmsg
    } else {
        Kind::Device
    }
}

/// Opens for writing without blocking: neither in open (a serial port waiting for carrier, a
/// FIFO without a reader) nor later in write. O_NOCTTY: the agent, a session leader under
/// systemd, must not make the console its controlling terminal (a ^C or hangup on the serial
/// line would then signal it).
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use nix::fcntl::OFlag;
    std::fs::OpenOptions::new()
        .append(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)
}

/// Where the writer task writes: a descriptor the runtime polls for room (a serial port, a
/// FIFO), or one it cannot poll, which never makes a non-blocking write wait (a regular file;
/// /dev/kmsg, which takes a record or refuses it at once).
enum Output {
    Polled(AsyncFd<File>),
    Plain(File),
}

impl Output {
    fn new(file: File) -> Output {
        // SAFETY: the AsyncFd owns the File, so the descriptor stays open and the same for the
        // AsyncFd's lifetime.
        match unsafe { AsyncFd::register(file) } {
            Ok(polled) => Output::Polled(polled),
            Err(e) => Output::Plain(e.into_parts().0),
        }
    }

    /// Writes all of `buf` to the non-blocking descriptor, waiting for it to take more at
    /// most `timeout` in all.
    async fn write_within(&mut self, mut buf: &[u8], timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let timed_out = |_| io::Error::from(io::ErrorKind::TimedOut);
        while !buf.is_empty() {
            let written = match self {
                Output::Polled(fd) => {
                    let mut ready = tokio::time::timeout_at(deadline, fd.writable())
                        .await
                        .map_err(timed_out)??;
                    // A write that would block clears the readiness, so the next wait is for
                    // the poller's word that there is room.
                    match ready.try_io(|fd| retry_interrupted(|| fd.get_ref().write(buf))) {
                        Ok(result) => result?,
                        Err(_would_block) => continue,
                    }
                }
                Output::Plain(file) => match retry_interrupted(|| file.write(buf)) {
                    Ok(n) => n,
                    // Not pollable, yet refusing for now: try again shortly.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err(io::ErrorKind::TimedOut.into());
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[written..];
        }
        Ok(())
    }
}

fn retry_interrupted(mut write: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match write() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            result => return result,
        }
    }
}

/// The writer task: each line within LINE_TIMEOUT, or given up.
async fn write_lines(mut out: Output, mut rx: Receiver<Request>, health: Arc<Health>) {
    // A line cut off by the timeout leaves the console mid-line: the next starts on a new one.
    let mut mid_line = false;
    while let Some(request) = rx.recv().await {
        match request {
            Request::Line(bytes) => {
                let newline: &[u8] = if mid_line { b"\n" } else { b"" };
                match out
                    .write_within(&[newline, &bytes].concat(), LINE_TIMEOUT)
                    .await
                {
                    Ok(()) => {
                        mid_line = false;
                        health.stuck.store(false, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        mid_line = true;
                        health.stuck.store(true, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if let Ok(mut error) = health.error.lock() {
                            error.get_or_insert_with(|| e.to_string());
                        }
                    }
                }
            }
            Request::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::time::Instant;

    #[test]
    fn a_line_is_prefixed_scrubbed_one_line_and_capped() {
        let line = format_line(
            "failed: bad token glrt-fake.xxxx.xxxx.xxxx1234\n\tfix:\x1b[31m rotate\r\n",
        );
        assert_eq!(
            line,
            "gitlab-runner-vm: failed: bad token glrt-…1234 fix: [31m rotate"
        );
        let long = format_line(&"é".repeat(1000));
        assert!(long.len() <= MAX_LINE, "{}", long.len());
        assert!(long.ends_with("é…"), "{long}");
        assert!(!format_line("a\u{85}b\u{7f}c").contains(['\u{85}', '\u{7f}']));
    }

    #[test]
    fn printable_text_has_nothing_a_terminal_acts_on() {
        let hostile = [
            ("\x1b]0;owned\x07title", "]0;owned title"),
            ("\x1b[2J\x1b[Hclear", "[2J [Hclear"),
            (
                "\x1b]8;;https://evil.example/\x1b\\link\x1b]8;;\x1b\\",
                "]8;;https://evil.example/ \\link ]8;; \\",
            ),
            ("a\u{9b}31mb\u{9d}c", "a 31mb c"),
            (
                "gitlab\u{202E}moc.live\u{202C}.example",
                "gitlab moc.live .example",
            ),
            ("x\u{2066}y\u{2069}\u{200B}z\u{FEFF}", "x y z"),
            ("one\nphase: forged\r\n", "one phase: forged"),
            ("  plain  text, é 日本 ", "plain text, é 日本"),
        ];
        for (text, shown) in hostile {
            assert_eq!(printable(text), shown, "{text:?}");
            assert!(!printable(text).chars().any(hides));
        }
    }

    #[test]
    fn a_long_failure_keeps_its_fix() {
        let error = format!("GitLab answered 403 to verify: {}", "blah ".repeat(200));
        let fix = "create a runner in GitLab (Settings > CI/CD > Runners > New runner) and put its glrt- token in runner.json";
        let line = format_line(&failure_text(&error, fix));
        assert!(line.len() <= MAX_LINE, "{}", line.len());
        assert!(
            line.starts_with("gitlab-runner-vm: failed: GitLab answered 403"),
            "{line}"
        );
        assert!(line.ends_with(&format!("…; fix: {fix}")), "{line}");
        let short = failure_text("bad\nthing", "do x");
        assert_eq!(short, "failed: bad thing; fix: do x");
    }

    #[test]
    fn kmsg_records_carry_a_priority_the_console_shows_for_failures_only() {
        assert_eq!(
            encode("x", Kind::Kmsg, Severity::Failure),
            b"<11>x\n".to_vec()
        );
        assert_eq!(
            encode("x", Kind::Kmsg, Severity::Milestone),
            b"<13>x\n".to_vec()
        );
        assert_eq!(
            encode("x", Kind::Device, Severity::Failure),
            b"x\n".to_vec()
        );
        assert_eq!(target(Path::new("off")), None);
        assert_eq!(
            target(Path::new("/dev/ttyS0")),
            Some(Path::new("/dev/ttyS0"))
        );
    }

    #[tokio::test]
    async fn lines_reach_the_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console");
        std::fs::write(&path, "boot\n").unwrap();
        let console = Console::open(&path, &dir.path().join("kmsg"));
        console.milestone("registered runner vm-1");
        console.failure("failed: x; fix: y");
        console.flush(Duration::from_secs(10)).await;
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "boot\ngitlab-runner-vm: registered runner vm-1\ngitlab-runner-vm: failed: x; fix: y\n"
        );
    }

    #[tokio::test]
    async fn a_console_that_cannot_be_opened_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let fallback = dir.path().join("kmsg");
        std::fs::write(&fallback, "").unwrap();
        // A FIFO without a reader cannot be opened without blocking.
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let console = Console::open(&fifo, &fallback);
        console.milestone("powering off");
        console.flush(Duration::from_secs(10)).await;
        assert_eq!(
            std::fs::read_to_string(&fallback).unwrap(),
            "gitlab-runner-vm: powering off\n"
        );
        // Neither: nothing, and no error.
        let none = Console::open(&dir.path().join("no/such"), &dir.path().join("no/kmsg"));
        none.failure("lost");
        none.flush(Duration::from_secs(10)).await;
    }

    /// A FIFO whose reader never reads: the agent's calls return at once, whatever it writes,
    /// and a flush is bounded.
    #[tokio::test]
    async fn a_console_nobody_reads_never_blocks_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let _reader: OwnedFd = nix::fcntl::open(
            &fifo,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let console = Console::open(&fifo, &dir.path().join("kmsg"));
        let started = Instant::now();
        // Far more than the pipe (64 KiB) and the queue hold.
        for i in 0..2000 {
            console.milestone(&format!("line {i} {}", "x".repeat(400)));
            // The agent goes on between its lines: the writer gets its turns.
            tokio::task::yield_now().await;
        }
        console.flush(Duration::from_secs(3)).await;
        console.failure("still not blocked");
        console.flush(Duration::from_secs(3)).await;
        // Generous: only a blocked write could take this long.
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
        // The writer notices within a line's timeout that the port takes nothing.
        let inner = console.inner.as_ref().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !inner.health.stuck.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(inner.health.stuck.load(Ordering::Relaxed));
    }

    /// A terminal whose other side reads nothing (a serial port stopped by flow control): the
    /// lines that fit are written, then the writer waits on the runtime's poller, gives up
    /// after a line's timeout and says so, and the agent's calls never wait.
    #[tokio::test]
    async fn a_terminal_that_takes_nothing_is_found_stuck() {
        use nix::fcntl::OFlag;
        let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY).unwrap();
        nix::pty::grantpt(&master).unwrap();
        nix::pty::unlockpt(&master).unwrap();
        let terminal = PathBuf::from(nix::pty::ptsname_r(&master).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let console = Console::open(&terminal, &dir.path().join("kmsg"));
        let inner = console.inner.as_ref().unwrap().clone();
        assert_eq!(
            inner.path, terminal,
            "the terminal itself, not the fallback"
        );
        let started = Instant::now();
        for i in 0..500 {
            console.milestone(&format!("line {i} {}", "y".repeat(200)));
            tokio::task::yield_now().await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !inner.health.stuck.load(Ordering::Relaxed) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(inner.health.stuck.load(Ordering::Relaxed));
        // Once stuck, a flush before the power-off does not wait.
        let flushing = Instant::now();
        console.flush(Duration::from_secs(30)).await;
        assert!(
            flushing.elapsed() < Duration::from_secs(5),
            "{:?}",
            flushing.elapsed()
        );
        drop(master);
    }
}
