//! Secrets (runner, registration and access tokens) and how they are shown.
//!
//! A `Secret` never prints whole: `Display` and `Debug` show only a recognisable prefix and the
//! last four characters, enough for an operator to tell two tokens apart.

use std::borrow::Cow;
use std::fmt;

/// Prefixes that say what kind of token something is; shown in full because they are not secret.
/// Where one prefix starts another, the longer comes first (`glrtr-` before `glrt-`). Besides
/// the runner, registration and access tokens this agent handles, the other kinds GitLab issues
/// (job, trigger, feed, deploy, OAuth, agent, SCIM, incoming mail, feature flag client): any of
/// them may turn up in an error body, a misplaced config value or gitlab-runner's output.
const KNOWN_PREFIXES: &[&str] = &[
    "glrtr-",
    "glrt-",
    "glpat-",
    "gldt-",
    "GR1348941",
    "glcbt-",
    "glptt-",
    "glft-",
    "gloas-",
    "glagent-",
    "glsoat-",
    "glimt-",
    "glffct-",
];

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
    mask_after(prefix, &value[prefix.len()..])
}

fn mask_after(prefix: &str, rest: &str) -> String {
    let chars = rest.chars().count();
    if chars >= 16 {
        let tail: String = rest.chars().skip(chars - 4).collect();
        format!("{prefix}…{tail}")
    } else {
        format!("{prefix}…")
    }
}

/// Masks every token-shaped substring of `text` the way `mask` does (the token kind's prefix
/// stays, the rest is hidden), and hides the `user:password@` part of any URL. For text that may
/// carry a secret no `Secret` knows about: a token placed in another config field, echoed by a
/// proxy, or printed by a job. Applied to every log message (see `logging`).
pub fn scrub(text: &str) -> String {
    scrub_cow(text).into_owned()
}

/// `scrub`, borrowing when there is nothing to hide (the common case for log lines).
pub fn scrub_cow(text: &str) -> Cow<'_, str> {
    match scrub_userinfo(text) {
        Cow::Borrowed(t) => scrub_tokens(t),
        Cow::Owned(t) => Cow::Owned(scrub_tokens(&t).into_owned()),
    }
}

/// The characters a token is made of after its prefix (base64url, and `.` in the newer format).
fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

fn scrub_tokens(text: &str) -> Cow<'_, str> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    // `copied`: how much of `text` is already in `out`.
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        // Prefixes are ASCII, so a match can only start at a character boundary.
        let Some(prefix) = KNOWN_PREFIXES
            .iter()
            .find(|p| bytes[i..].starts_with(p.as_bytes()))
        else {
            i += 1;
            continue;
        };
        let start = i + prefix.len();
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| is_token_char(**b))
                .count();
        if end > start {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[copied..i]);
            out.push_str(&mask_after(prefix, &text[start..end]));
            copied = end;
        }
        i = end.max(i + 1);
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut out) => {
            out.push_str(&text[copied..]);
            Cow::Owned(out)
        }
    }
}

/// `scheme://user:password@host/...` -> `scheme://…@host/...`.
fn scrub_userinfo(text: &str) -> Cow<'_, str> {
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut from = 0;
    while let Some(at) = text[from..].find("://") {
        let authority_start = from + at + 3;
        let authority_len = text[authority_start..]
            .find(|c: char| {
                c.is_whitespace()
                    || matches!(c, '/' | '?' | '#' | '"' | '\'' | '<' | '>' | '(' | ')')
            })
            .unwrap_or(text.len() - authority_start);
        let authority = &text[authority_start..authority_start + authority_len];
        if let Some(userinfo_len) = authority.rfind('@') {
            let out = out.get_or_insert_with(|| String::with_capacity(text.len()));
            out.push_str(&text[copied..authority_start]);
            out.push('…');
            copied = authority_start + userinfo_len;
        }
        from = authority_start + authority_len;
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut out) => {
            out.push_str(&text[copied..]);
            Cow::Owned(out)
        }
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

    #[test]
    fn scrub_masks_every_token_shaped_substring_like_mask() {
        let text = "url=https://h/glrt-abcd.efgh.ijkl.mnopqrst name=\"glpat-xxxxxxxxxxxxxxxxxxxx\" \
                    reg GR1348941LeGaCyReGiStRaTiOn;glrtr-short, gldt-x acmeglrt-abcd.efgh.ijkl.mnopqrst";
        assert_eq!(
            scrub(text),
            "url=https://h/glrt-…qrst name=\"glpat-…xxxx\" reg GR1348941…TiOn;glrtr-…, gldt-… \
             acmeglrt-…qrst"
        );
        // The same form as the Secret's own Display, so an operator can match the two.
        let s = Secret::new("glrt-abcd.efgh.ijkl.mnopqrst");
        assert_eq!(scrub(&format!("[{}]", s.expose())), format!("[{s}]"));
    }

    #[test]
    fn scrub_leaves_plain_text_and_masked_tokens_alone() {
        for text in [
            "",
            "use its glrt- token as \"token\"",
            "already masked: glrt-…6789 and GR1348941…",
            "glr glrt glpat",
            "ünïcödé glrt",
        ] {
            assert!(matches!(scrub_cow(text), Cow::Borrowed(_)), "{text}");
        }
        let once = scrub("x glrt-abcd.efgh.ijkl.mnopqrst y");
        assert_eq!(scrub(&once), once);
    }

    #[test]
    fn scrub_hides_url_userinfo() {
        assert_eq!(
            scrub("error sending request for url (https://user:pa55@gitlab.example.com/api/v4/x)"),
            "error sending request for url (https://…@gitlab.example.com/api/v4/x)"
        );
        assert_eq!(
            scrub("a http://u@h b https://h/p?q=a@b c"),
            "a http://…@h b https://h/p?q=a@b c"
        );
        assert_eq!(scrub("no url: a@b, x://"), "no url: a@b, x://");
        assert_eq!(
            scrub("https://user:glpat-xxxxxxxxxxxxxxxxxxxx@h/"),
            "https://…@h/"
        );
    }

    #[test]
    fn scrub_handles_a_token_at_either_end_and_multibyte_text() {
        assert_eq!(scrub("glpat-xxxxxxxxxxxxxxxxxxxx"), "glpat-…xxxx");
        assert_eq!(scrub("é glcbt-0123456789abcdefXYZ é"), "é glcbt-…fXYZ é");
        // The prefix that matched is the one shown, never a second one further in.
        assert_eq!(scrub("glpat-abc-glrt-xyz"), "glpat-…");
    }
}
