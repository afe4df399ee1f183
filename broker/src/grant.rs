//! The record, on the virt-launcher pod itself, that a pod's runner was claimed or granted. The
//! pod is the one place every broker replica, and a restarted broker, reads; writing it with the
//! pod's `resourceVersion` as a precondition makes "once per pod" atomic.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub const ANNOTATION: &str = "gitlab-runner-vm.io/broker-grant";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// A request is creating the runner (since `at`).
    Claimed,
    /// The runner `runner_id` was handed to the VM.
    Granted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub state: State,
    /// Unix seconds of the claim or the grant.
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<u64>,
    /// A random number naming the request that claimed the pod, so that it can tell its own
    /// claim from one that took over after it went stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<u64>,
}

impl Grant {
    /// The grant recorded on a pod, if any. A value that does not parse counts as granted: an
    /// unreadable record must never open the way to a second runner.
    pub fn of(annotations: &std::collections::BTreeMap<String, String>) -> Option<Grant> {
        annotations.get(ANNOTATION).map(|text| {
            serde_json::from_str(text).unwrap_or(Grant {
                state: State::Granted,
                at: 0,
                runner_id: None,
                claim: None,
            })
        })
    }

    pub fn is_stale_claim(&self, now: u64, stale_after_secs: u64) -> bool {
        self.state == State::Claimed && now.saturating_sub(self.at) > stale_after_secs
    }
}

/// A merge patch that sets (or with `None` removes) the grant, only if the pod is still at
/// `resource_version`; the API server answers 409 Conflict otherwise.
/// A random claim number (std's per-process random hash keys, no extra crate).
pub fn random_claim() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

pub fn patch(resource_version: &str, grant: Option<&Grant>) -> Value {
    let value = match grant {
        Some(g) => Value::String(serde_json::to_string(g).expect("a grant serializes")),
        None => Value::Null,
    };
    json!({"metadata": {"resourceVersion": resource_version, "annotations": {ANNOTATION: value}}})
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_grant_round_trips_through_the_annotation() {
        let g = Grant {
            state: State::Granted,
            at: 7,
            runner_id: Some(42),
            claim: Some(9),
        };
        let p = patch("99", Some(&g));
        assert_eq!(p["metadata"]["resourceVersion"], "99");
        let text = p["metadata"]["annotations"][ANNOTATION].as_str().unwrap();
        let annotations = BTreeMap::from([(ANNOTATION.to_string(), text.to_string())]);
        assert_eq!(Grant::of(&annotations), Some(g));
    }

    #[test]
    fn an_unreadable_record_counts_as_granted() {
        let annotations = BTreeMap::from([(ANNOTATION.to_string(), "garbage".to_string())]);
        assert_eq!(Grant::of(&annotations).unwrap().state, State::Granted);
    }

    #[test]
    fn only_an_old_claim_is_stale() {
        let claim = Grant {
            state: State::Claimed,
            at: 100,
            runner_id: None,
            claim: None,
        };
        assert!(!claim.is_stale_claim(150, 120));
        assert!(claim.is_stale_claim(221, 120));
        let granted = Grant {
            state: State::Granted,
            ..claim
        };
        assert!(!granted.is_stale_claim(10_000, 120));
    }

    #[test]
    fn removing_the_grant_sets_null() {
        assert!(patch("5", None)["metadata"]["annotations"][ANNOTATION].is_null());
    }
}
