//! The reader the checks are written with: a `Node` is one JSON value with its path (`$.docker.
//! image`), and every read reports what is wrong with the value at that path, so no check
//! spells a path or a key twice. Problems go into `Problems`, in the order they are found.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use serde_json::Value;

use super::MAX_SECONDS;
use super::keys::{Key, Kind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// JSON path of the offending value, `$` for the whole document.
    pub path: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{severity}: {}: {}; fix: {}",
            self.path, self.message, self.fix
        )
    }
}

/// Every problem found so far.
#[derive(Debug, Default)]
pub(super) struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, severity: Severity, path: &str, message: String, fix: String) {
        self.0.push(Problem {
            severity,
            path: path.to_string(),
            message,
            fix,
        });
    }

    pub fn has_error(&self) -> bool {
        self.0.iter().any(|p| p.severity == Severity::Error)
    }
}

/// A value in runner.json and where it is: `$` for the document, `$.docker.image` for a key,
/// `$.tags[2]` for a list entry.
#[derive(Debug, Clone)]
pub(super) struct Node<'a> {
    value: &'a Value,
    path: String,
    /// The key as the fixes name it (`image` for `$.docker.image`).
    key: &'static str,
    /// What the table of known keys says the value is; the reads check they agree with it.
    kind: Kind,
}

impl<'a> Node<'a> {
    pub fn root(value: &'a Value) -> Self {
        Node {
            value,
            path: "$".to_string(),
            key: "$",
            kind: Kind::Object,
        }
    }

    /// The path of a key of this object, present or not.
    pub fn path_of(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// The value of a known key, if this is an object that has it.
    pub fn get(&self, key: &Key) -> Option<Node<'a>> {
        Some(Node {
            value: self.value.as_object()?.get(key.name)?,
            path: self.path_of(key.name),
            key: key.name,
            kind: key.kind,
        })
    }

    pub fn has(&self, key: &Key) -> bool {
        self.value.get(key.name).is_some()
    }

    pub fn error(&self, p: &mut Problems, message: impl Into<String>, fix: impl Into<String>) {
        p.push(Severity::Error, &self.path, message.into(), fix.into());
    }

    pub fn warning(&self, p: &mut Problems, message: impl Into<String>, fix: impl Into<String>) {
        p.push(Severity::Warning, &self.path, message.into(), fix.into());
    }

    /// An error about a key of this object, present or not.
    pub fn error_at(
        &self,
        p: &mut Problems,
        key: &Key,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let path = self.path_of(key.name);
        p.push(Severity::Error, &path, message.into(), fix.into());
    }

    /// A warning about a key of this object, present or not.
    pub fn warning_at(
        &self,
        p: &mut Problems,
        key: &Key,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        let path = self.path_of(key.name);
        p.push(Severity::Warning, &path, message.into(), fix.into());
    }

    /// The JSON value itself, for reads the methods here do not cover.
    pub fn raw(&self) -> &'a Value {
        self.value
    }

    fn reads(&self, kind: Kind) {
        debug_assert_eq!(self.kind, kind, "{} is read as {kind:?}", self.path);
    }

    /// A string with something besides white space in it (returned as written).
    pub fn string(&self, p: &mut Problems) -> Option<&'a str> {
        self.reads(Kind::Text);
        let key = self.key;
        match self.value {
            Value::String(s) if !s.trim().is_empty() => Some(s),
            Value::String(_) => {
                self.error(p, "is empty", format!("give {key} a value or remove it"));
                None
            }
            other => {
                self.error(
                    p,
                    format!("must be a string, not {}", type_name(other)),
                    format!("write {key} in double quotes"),
                );
                None
            }
        }
    }

    pub fn boolean(&self, p: &mut Problems) -> Option<bool> {
        self.reads(Kind::Boolean);
        match self.value {
            Value::Bool(b) => Some(*b),
            other => {
                self.error(
                    p,
                    format!("must be true or false, not {}", type_name(other)),
                    format!("write {} as true or false, without quotes", self.key),
                );
                None
            }
        }
    }

    /// A whole number within `range`.
    pub fn integer(&self, p: &mut Problems, range: RangeInclusive<u64>) -> Option<u64> {
        self.reads(Kind::Integer);
        let key = self.key;
        let (min, max) = (*range.start(), *range.end());
        match self.value.as_u64() {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) if n < min => {
                self.error(
                    p,
                    format!("is {n}, below the minimum {min}"),
                    format!("set {key} to at least {min}"),
                );
                None
            }
            Some(n) => {
                let unit = if max == MAX_SECONDS {
                    " s (ten years)"
                } else {
                    ""
                };
                self.error(
                    p,
                    format!("is {n}, above the maximum {max}{unit}"),
                    format!("set {key} to at most {max}"),
                );
                None
            }
            None => {
                self.error(
                    p,
                    format!("must be a whole number, not {}", format_value(self.value)),
                    format!(
                        "write {key} as a number without quotes, e.g. {}",
                        min.max(1)
                    ),
                );
                None
            }
        }
    }

    /// A duration in whole seconds, at least `min` and at most ten years.
    pub fn seconds(&self, p: &mut Problems, min: u64) -> Option<Duration> {
        self.integer(p, min..=MAX_SECONDS).map(Duration::from_secs)
    }

    /// The entries of a list of non-empty strings, each with its node for later checks. Other
    /// entries are reported and left out.
    pub fn string_items(&self, p: &mut Problems) -> Option<Vec<(Node<'a>, &'a str)>> {
        self.reads(Kind::TextList);
        let Value::Array(items) = self.value else {
            self.error(
                p,
                format!("must be a list of strings, not {}", type_name(self.value)),
                format!("write {} as [\"a\", \"b\"]", self.key),
            );
            return None;
        };
        let mut out = Vec::new();
        for (i, value) in items.iter().enumerate() {
            let item = Node {
                value,
                path: format!("{}[{i}]", self.path),
                key: self.key,
                kind: Kind::Text,
            };
            match value {
                Value::String(s) if !s.trim().is_empty() => out.push((item, s.as_str())),
                other => item.error(
                    p,
                    format!("must be a non-empty string, not {}", format_value(other)),
                    format!("make every entry of {} a quoted string", self.key),
                ),
            }
        }
        Some(out)
    }

    /// An object; `example` shows how to write it.
    pub fn object(&self, p: &mut Problems, example: &str) -> Option<Node<'a>> {
        self.reads(Kind::Object);
        if self.value.is_object() {
            return Some(self.clone());
        }
        self.error(
            p,
            format!("must be an object, not {}", type_name(self.value)),
            format!("write it as {example}"),
        );
        None
    }

    /// The keys this object has.
    pub fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.value
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .map(String::as_str)
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn format_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// An error for each key of `node` that `known` does not have, suggesting the nearest known
/// key or, when none is near, listing them all.
pub(super) fn unknown_keys(node: &Node<'_>, known: &[Key], p: &mut Problems) {
    for name in node.keys() {
        if known.iter().any(|k| k.name == name) {
            continue;
        }
        // gitlab-runner's `BucketName` written as `bucket_name` or `bucketname` is the same
        // key in another spelling: that one is meant, however far the letters are.
        let spelled = |s: &str| -> String {
            s.chars()
                .filter(|c| *c != '_' && *c != '-')
                .flat_map(char::to_lowercase)
                .collect()
        };
        let nearest = known
            .iter()
            .map(|k| {
                let score = if spelled(name) == spelled(k.name) {
                    2.0
                } else {
                    strsim::jaro_winkler(name, k.name)
                };
                (score, k.name)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .filter(|(score, _)| *score > 0.7);
        let fix = match nearest {
            Some((_, k)) => format!("did you mean \"{k}\"?"),
            None => {
                let names: Vec<_> = known.iter().map(|k| k.name).collect();
                format!("remove it; known keys are: {}", names.join(", "))
            }
        };
        p.push(
            super::Severity::Error,
            &node.path_of(name),
            "unknown key".to_string(),
            fix,
        );
    }
}
