//! Equality-based label selectors (`a=b,c!=d,e`), the subset Kubernetes' own `labelSelector`
//! query accepts, so the same text filters server-side and is checked here.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Term {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Term>);

impl Selector {
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut terms = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let term = if let Some((k, v)) = raw.split_once("!=") {
                Term::NotEquals(key(k)?, value(v)?)
            } else if let Some((k, v)) = raw.split_once("==").or_else(|| raw.split_once('=')) {
                Term::Equals(key(k)?, value(v)?)
            } else {
                Term::Exists(key(raw)?)
            };
            terms.push(term);
        }
        Ok(Selector(terms))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|t| match t {
            Term::Equals(k, v) => labels.get(k) == Some(v),
            Term::NotEquals(k, v) => labels.get(k) != Some(v),
            Term::Exists(k) => labels.contains_key(k),
        })
    }
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!(
            "{k:?} is not a label key (letters, digits, '-', '_', '.', '/'); set-based terms (in, notin) are not supported"
        ))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        Ok(v.to_string())
    } else {
        Err(format!("{v:?} is not a label value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn all_terms_must_hold() {
        let s = Selector::parse("app=ci-runner, tier!=test,kubevirt.io/pool").unwrap();
        assert!(s.matches(&labels(&[("app", "ci-runner"), ("kubevirt.io/pool", "x")])));
        assert!(!s.matches(&labels(&[("app", "ci-runner")])));
        assert!(!s.matches(&labels(&[
            ("app", "ci-runner"),
            ("tier", "test"),
            ("kubevirt.io/pool", "x")
        ])));
        assert!(!s.matches(&labels(&[("app", "other"), ("kubevirt.io/pool", "x")])));
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::parse("").unwrap().matches(&labels(&[])));
    }

    #[test]
    fn set_based_terms_are_refused_with_the_reason() {
        let e = Selector::parse("app in (a,b)").unwrap_err();
        assert!(e.contains("set-based"), "{e}");
    }
}
