//! What one answer of a notice endpoint says: a notice, nothing, something to log, or something
//! that is not the endpoint's answer at all. Each platform's provider reads its own endpoints
//! (`crate::metadata::{aws, gce}`: bytes and the clock in, a `Reading` out, pure); the watcher's
//! common loop acts on what they read.

use super::Notice;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reading {
    /// Nothing is announced.
    Quiet,
    Notice(Notice),
    /// Worth one log line, not an action (a live migration: the VM keeps running).
    Info(&'static str),
    /// Not an answer this endpoint gives; never a notice. The text is safe to log.
    Unrecognised(String),
}

impl Reading {
    /// `body` is not this endpoint's answer: said by its size and start (`describe_body`).
    pub fn unrecognised(body: &[u8]) -> Reading {
        Reading::Unrecognised(describe_body(body))
    }
}

/// A body for the log: its size and, if it is text, its start, escaped and scrubbed.
pub fn describe_body(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Err(_) => format!("{} bytes, not UTF-8", body.len()),
        Ok(text) => {
            let start: String = text.chars().take(40).collect();
            let more = if start.len() < text.len() { "…" } else { "" };
            let shown = crate::secret::scrub(&start.escape_debug().to_string());
            format!("{} bytes: \"{shown}{more}\"", body.len())
        }
    }
}
