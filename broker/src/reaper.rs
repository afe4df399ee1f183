//! The reaper: deletes the broker's runners whose VM is gone. Runs at start (so a restarted
//! broker leaves nothing behind) and every `--reap-interval`. GitLab is listed before the pods:
//! a runner seen in GitLab had its claim written on its pod before it was created, so the pod
//! list that follows sees that claim and the runner of a request in flight is never taken.

use std::collections::HashMap;

use tracing::{info, warn};

use crate::gitlab::{self, Listed};
use crate::grant::{Grant, State};
use crate::kube::Pod;
use crate::mint::Broker;
use crate::time::now_unix;

/// Why a runner is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    PodGone,
    PodFinished(String),
    NeverGranted,
    ClaimAbandoned,
    Superseded,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::PodGone => f.write_str("its pod is gone"),
            Reason::PodFinished(phase) => write!(f, "its pod has finished ({phase})"),
            Reason::NeverGranted => f.write_str("its pod carries no grant"),
            Reason::ClaimAbandoned => f.write_str("the request that created it died"),
            Reason::Superseded => f.write_str("its pod was granted another runner"),
        }
    }
}

/// The pure decision: which of the broker's runners (in `namespace`) to delete, given every
/// virt-launcher pod of the namespace.
pub fn doomed(
    runners: &[Listed],
    pods: &[Pod],
    namespace: &str,
    now: u64,
    stale_after_secs: u64,
) -> Vec<(u64, Reason)> {
    let by_uid: HashMap<&str, &Pod> = pods.iter().map(|p| (p.metadata.uid.as_str(), p)).collect();
    runners
        .iter()
        .filter_map(|r| {
            let uid = gitlab::pod_uid_of(r.description.as_deref()?, namespace)?;
            let reason = match by_uid.get(uid.as_str()) {
                None => Reason::PodGone,
                Some(pod) if matches!(pod.status.phase.as_str(), "Succeeded" | "Failed") => {
                    Reason::PodFinished(pod.status.phase.clone())
                }
                Some(pod) => match Grant::of(&pod.metadata.annotations) {
                    None => Reason::NeverGranted,
                    Some(g) if g.is_stale_claim(now, stale_after_secs) => Reason::ClaimAbandoned,
                    Some(g)
                        if g.state == State::Granted
                            && g.runner_id.is_some_and(|id| id != r.id) =>
                    {
                        Reason::Superseded
                    }
                    Some(_) => return None,
                },
            };
            Some((r.id, reason))
        })
        .collect()
}

/// One pass: list, decide, delete. Errors are logged; the next pass tries again.
pub async fn reap_once(broker: &Broker) -> Result<usize, String> {
    let runners = broker
        .gitlab
        .list_own(&broker.spec)
        .await
        .map_err(|e| e.to_string())?;
    let pods = broker
        .kube
        .list_pods(&broker.policy.namespace, "kubevirt.io=virt-launcher")
        .await
        .map_err(|e| e.to_string())?;
    let doomed = doomed(
        &runners,
        &pods,
        &broker.policy.namespace,
        now_unix(),
        broker.policy.claim_stale_after_secs,
    );
    let mut deleted = 0;
    for (id, reason) in doomed {
        match broker.gitlab.delete(id).await {
            Ok(()) => {
                info!("reaper: deleted runner {id}: {reason}");
                deleted += 1;
            }
            Err(e) => warn!("reaper: runner {id} ({reason}): {e}"),
        }
    }
    Ok(deleted)
}

pub async fn run(broker: std::sync::Arc<Broker>, interval: std::time::Duration) {
    loop {
        if let Err(e) = reap_once(&broker).await {
            warn!("reaper: {e}; trying again in {interval:?}");
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::ANNOTATION;
    use std::collections::BTreeMap;

    fn runner(id: u64, uid: &str) -> Listed {
        Listed {
            id,
            description: Some(gitlab::description("ci", "vm", uid)),
        }
    }

    fn pod(uid: &str, phase: &str, grant: Option<&str>) -> Pod {
        let mut p = Pod::default();
        p.metadata.uid = uid.into();
        p.status.phase = phase.into();
        if let Some(g) = grant {
            p.metadata.annotations = BTreeMap::from([(ANNOTATION.to_string(), g.to_string())]);
        }
        p
    }

    #[test]
    fn runners_of_live_granted_or_fresh_claimed_pods_stay() {
        let pods = [
            pod(
                "a",
                "Running",
                Some(r#"{"state":"granted","at":1,"runner_id":1}"#),
            ),
            pod("b", "Running", Some(r#"{"state":"claimed","at":990}"#)),
        ];
        let runners = [runner(1, "a"), runner(2, "b")];
        assert!(doomed(&runners, &pods, "ci", 1000, 120).is_empty());
    }

    #[test]
    fn runners_of_gone_finished_or_abandoned_pods_go() {
        let pods = [
            pod(
                "done",
                "Succeeded",
                Some(r#"{"state":"granted","at":1,"runner_id":2}"#),
            ),
            pod("bare", "Running", None),
            pod("stale", "Running", Some(r#"{"state":"claimed","at":10}"#)),
            pod(
                "other",
                "Running",
                Some(r#"{"state":"granted","at":1,"runner_id":9}"#),
            ),
        ];
        let runners = [
            runner(1, "gone"),
            runner(2, "done"),
            runner(3, "bare"),
            runner(4, "stale"),
            runner(5, "other"),
        ];
        let d = doomed(&runners, &pods, "ci", 1000, 120);
        assert_eq!(
            d,
            vec![
                (1, Reason::PodGone),
                (2, Reason::PodFinished("Succeeded".into())),
                (3, Reason::NeverGranted),
                (4, Reason::ClaimAbandoned),
                (5, Reason::Superseded),
            ]
        );
    }

    #[test]
    fn runners_of_others_are_never_touched() {
        let others = [
            Listed {
                id: 1,
                description: Some("someone's laptop".into()),
            },
            Listed {
                id: 2,
                description: None,
            },
            Listed {
                id: 3,
                description: Some(gitlab::description("other-ns", "vm", "x")),
            },
        ];
        assert!(doomed(&others, &[], "ci", 1000, 120).is_empty());
    }
}
