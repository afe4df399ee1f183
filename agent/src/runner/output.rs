//! gitlab-runner's output in the agent's log: split into lines (whatever its bytes, never
//! without bound), secrets masked.

use std::io;

use tokio::io::AsyncReadExt;
use tokio::process::{ChildStderr, ChildStdout};

use crate::secret::{Secret, redact};

/// The longest line forwarded as one log record. A longer line (or output without newlines) is
/// split: the agent never buffers without bound, and journald and terminals cope badly with
/// huge records.
pub const MAX_LINE: usize = 16 * 1024;

/// Splits a byte stream into lines: at each newline (dropping it and a CR before it), and after
/// at most `cap` bytes when no newline comes. Bytes need not be text.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    cap: usize,
    /// Byte strings that a split at the cap must not cut in two (the secrets: the halves of a
    /// token in two records would each escape `redact`).
    keep_whole: Vec<Vec<u8>>,
}

impl LineSplitter {
    pub fn new(cap: usize, keep_whole: Vec<Vec<u8>>) -> Self {
        LineSplitter {
            buf: Vec::new(),
            cap: cap.max(1),
            keep_whole,
        }
    }

    /// Adds `data`, calling `line` with each line it completes.
    pub fn push(&mut self, mut data: &[u8], line: &mut impl FnMut(&[u8])) {
        while let Some(at) = data.iter().position(|b| *b == b'\n') {
            self.buf.extend_from_slice(&data[..at]);
            data = &data[at + 1..];
            if self.buf.last() == Some(&b'\r') {
                self.buf.pop();
            }
            self.split_long(line);
            line(&self.buf);
            self.buf.clear();
        }
        self.buf.extend_from_slice(data);
        self.split_long(line);
    }

    /// The end of the stream: the last line, if it had no newline.
    pub fn finish(&mut self, line: &mut impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            line(&self.buf);
            self.buf.clear();
        }
    }

    /// Emits pieces of the buffered line until at most `cap` bytes remain.
    fn split_long(&mut self, line: &mut impl FnMut(&[u8])) {
        while self.buf.len() > self.cap {
            let at = self.split_point();
            line(&self.buf[..at]);
            self.buf.drain(..at);
        }
    }

    /// Where to cut an over-long line: at the cap, moved back so that it cuts neither a UTF-8
    /// character nor anything in `keep_whole`.
    fn split_point(&self) -> usize {
        let mut at = self.cap;
        loop {
            let mut next = at;
            // A continuation byte (10xxxxxx) at `next` means a character began before it.
            while next + 3 > at && next > 1 && self.buf[next] & 0xC0 == 0x80 {
                next -= 1;
            }
            if self.buf[next] & 0xC0 == 0x80 {
                // Four continuation bytes in a row are no UTF-8 character: cut where we were,
                // rather than walk back through a binary blob a few bytes per record.
                next = at;
            }
            for whole in &self.keep_whole {
                // The longest prefix of `whole` that the part before the cut ends with.
                if let Some(k) = (1..whole.len().min(next))
                    .rev()
                    .find(|k| self.buf[..next].ends_with(&whole[..*k]))
                {
                    next -= k;
                }
            }
            if next == at || next == 0 {
                return at.max(1);
            }
            at = next;
        }
    }
}

/// Called with every line forwarded (secrets masked), from either stream: how the agent learns
/// that a job started or ended.
pub type LineWatch = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// Copies the child's stdout and stderr into the agent's log, one record per line (see
/// `LineSplitter`), with every secret masked, and shows each line to `watch`. Reads each stream
/// to its end whatever it holds: a reader that stopped early would kill gitlab-runner with
/// SIGPIPE at its next write.
pub async fn forward_output(
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    secrets: Vec<Secret>,
    watch: LineWatch,
) {
    let forward = |stream: &'static str,
                   reader: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>,
                   secrets: Vec<Secret>,
                   watch: LineWatch| async move {
        let Some(mut reader) = reader else { return };
        let refs: Vec<&Secret> = secrets.iter().collect();
        let keep_whole = secrets.iter().map(|s| s.expose().as_bytes().to_vec());
        let mut splitter = LineSplitter::new(MAX_LINE, keep_whole.collect());
        let mut log = |line: &[u8]| {
            let line = String::from_utf8_lossy(line);
            let line = redact(&line, &refs);
            tracing::info!(target: "gitlab-runner", stream, "gitlab-runner: {line}");
            watch(&line);
        };
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => splitter.push(&buf[..n], &mut log),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("cannot read gitlab-runner's {stream}: {e}");
                    break;
                }
            }
        }
        splitter.finish(&mut log);
    };
    tokio::join!(
        forward(
            "stdout",
            stdout.map(|s| Box::new(s) as _),
            secrets.clone(),
            watch.clone()
        ),
        forward("stderr", stderr.map(|s| Box::new(s) as _), secrets, watch),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(cap: usize, keep_whole: &[&str], chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let keep_whole = keep_whole.iter().map(|s| s.as_bytes().to_vec()).collect();
        let mut splitter = LineSplitter::new(cap, keep_whole);
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut |l| lines.push(l.to_vec()));
        }
        splitter.finish(&mut |l| lines.push(l.to_vec()));
        lines
    }

    #[test]
    fn lines_end_at_newlines_whatever_the_bytes() {
        let lines = split(
            100,
            &[],
            &[
                b"one\r\ntw",
                b"o \xff\xfe\0\n",
                b"\n",
                b"last without newline",
            ],
        );
        assert_eq!(
            lines,
            [&b"one"[..], b"two \xff\xfe\0", b"", b"last without newline"]
        );
    }

    #[test]
    fn a_long_line_is_split_at_the_cap_and_nothing_is_lost() {
        let long = vec![b'a'; 1024 * 1024];
        let mut chunks: Vec<&[u8]> = long.chunks(8192).collect();
        chunks.push(b"\nnext\n");
        let lines = split(MAX_LINE, &[], &chunks);
        assert_eq!(lines.len(), 1024 * 1024 / MAX_LINE + 1);
        assert!(lines[..lines.len() - 1].iter().all(|l| l.len() == MAX_LINE));
        assert_eq!(lines.last().unwrap(), b"next");
        // One chunk far larger than the cap is split too.
        let lines = split(1000, &[], &[&long[..5000]]);
        assert_eq!(lines.iter().map(Vec::len).collect::<Vec<_>>(), [1000; 5]);
    }

    #[test]
    fn bytes_that_are_no_utf8_are_cut_at_the_cap_not_byte_by_byte() {
        let blob = vec![0x80u8; 64];
        let lines = split(16, &[], &[&blob, b"\n"]);
        let sizes: Vec<usize> = lines.iter().map(Vec::len).collect();
        assert_eq!(sizes, [16, 16, 16, 16], "{lines:?}");
    }

    #[test]
    fn a_split_cuts_neither_a_character_nor_a_secret() {
        // 'é' is 2 bytes: cutting at 5 would fall inside the third one.
        let lines = split(5, &[], &["ééé\n".as_bytes()]);
        let text: Vec<_> = lines
            .iter()
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        assert_eq!(text, ["éé", "é"]);

        let secret = "glrt-fake.123";
        let line = format!("{}{secret} and more", "x".repeat(10));
        let lines = split(16, &[secret], &[line.as_bytes()]);
        let text: Vec<_> = lines
            .iter()
            .map(|l| std::str::from_utf8(l).unwrap())
            .collect();
        assert_eq!(text, ["xxxxxxxxxx", "glrt-fake.123 an", "d more"]);
    }
}
