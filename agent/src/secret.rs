//! Secrets (runner, registration and access tokens) and how they are shown.
//!
//! A `Secret` never prints whole: `Display` and `Debug` show only a recognisable prefix and the
//! last four characters, enough for an operator to tell two tokens apart.

use std::fmt;

/// Prefixes that say what kind of token something is; shown in full because they are not secret.
const KNOWN_PREFIXES: &[&str] = &["glrtr-", "glrt-", "glpat-", "gldt-", "GR1348941"];

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The whole value, for the one place that needs it: the HTTP request or config.toml.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The masked form used everywhere else.
    pub fn masked(&self) -> String {
        mask(&self.0)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.masked())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({})", self.masked())
    }
}

/// `glrt-abcd.efgh.ijkl.mnopqrst` -> `glrt-…qrst`. Short values show no tail at all, because four
/// characters of a short secret are too large a share of it.
pub fn mask(value: &str) -> String {
    let prefix = KNOWN_PREFIXES
        .iter()
        .find_map(|p| value.find(p).map(|at| &value[..at + p.len()]))
        .filter(|p| p.len() < value.len())
        .unwrap_or("");
    let rest = &value[prefix.len()..];
    let chars = rest.chars().count();
    if chars >= 16 {
        let tail: String = rest.chars().skip(chars - 4).collect();
        format!("{prefix}…{tail}")
    } else {
        format!("{prefix}…")
    }
}

/// Replaces every occurrence of each secret in `line` by its masked form; used on gitlab-runner's
/// output and on error bodies before they reach the log.
pub fn redact(line: &str, secrets: &[&Secret]) -> String {
    let mut out = line.to_string();
    for secret in secrets {
        if !secret.0.is_empty() && out.contains(&secret.0) {
            out = out.replace(&secret.0, &secret.masked());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_token_keeps_prefix_and_last_four() {
        assert_eq!(mask("glrt-abcd.efgh.ijkl.mnopqrst"), "glrt-…qrst");
        assert_eq!(mask("glrt-t1_abcd.efgh.ijkl.mnopq"), "glrt-…nopq");
    }

    #[test]
    fn instance_prefixed_token_keeps_the_whole_prefix() {
        assert_eq!(mask("acmeglrt-abcd.efgh.ijkl.mnopqrst"), "acmeglrt-…qrst");
    }

    #[test]
    fn short_or_unknown_tokens_show_no_tail() {
        assert_eq!(mask("glrt-short"), "glrt-…");
        assert_eq!(mask("0123456789"), "…");
        assert_eq!(mask(""), "…");
        assert_eq!(mask("glrt-"), "…");
    }

    #[test]
    fn display_and_debug_never_show_the_value() {
        let s = Secret::new("glrt-abcd.efgh.ijkl.mnopqrst");
        assert!(!format!("{s}").contains("efgh.ijkl"));
        assert!(!format!("{s:?}").contains("efgh.ijkl"));
    }

    #[test]
    fn redact_masks_every_occurrence() {
        let s = Secret::new("glrt-abcd.efgh.ijkl.mnopqrst");
        let line = "token=glrt-abcd.efgh.ijkl.mnopqrst again glrt-abcd.efgh.ijkl.mnopqrst";
        assert_eq!(redact(line, &[&s]), "token=glrt-…qrst again glrt-…qrst");
    }
}
