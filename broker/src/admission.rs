//! Who may have a runner: pure decisions on a TokenReview's answer and the pod it names.

use crate::grant::{Grant, State};
use crate::kube::{Pod, ReviewStatus};
use crate::selector::Selector;

pub const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";

/// What the broker's settings allow.
#[derive(Debug, Clone)]
pub struct Policy {
    pub namespace: String,
    pub selector: Selector,
    pub service_account: Option<String>,
    pub claim_stale_after_secs: u64,
}

/// The pod a token was bound to, according to the API server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A pod that may have its runner now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub vm_name: String,
    pub resource_version: String,
    /// A broker died while creating this pod's runner; its runner, if any, must be found and
    /// deleted before a new one is created.
    pub takes_over_stale_claim: bool,
}

/// Why a request was refused; the message names the cause and never a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

fn refuse(status: u16, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
    }
}

/// Step one: the TokenReview must say the token is a live pod-bound service-account token of
/// the VMs' namespace (and ServiceAccount, when set).
pub fn bound_pod(review: &ReviewStatus, policy: &Policy) -> Result<BoundPod, Refusal> {
    if !review.authenticated {
        return Err(refuse(
            401,
            "the token is not valid (expired, of a deleted pod, or not a Kubernetes token): send the virt-launcher pod's service-account token from KubeVirt's serviceAccount volume",
        ));
    }
    let Some(rest) = review.user.username.strip_prefix("system:serviceaccount:") else {
        return Err(refuse(
            403,
            format!(
                "the token belongs to {:?}, not to a service account",
                review.user.username
            ),
        ));
    };
    let (namespace, account) = rest.split_once(':').unwrap_or((rest, ""));
    if namespace != policy.namespace {
        return Err(refuse(
            403,
            format!(
                "the token's pod is in namespace {namespace:?}; this broker serves only {:?}",
                policy.namespace
            ),
        ));
    }
    if let Some(expected) = &policy.service_account
        && account != expected
    {
        return Err(refuse(
            403,
            format!(
                "the token is of service account {account:?}; the VMs run as {expected:?} (their serviceAccount volume)"
            ),
        ));
    }
    let one = |key: &str| {
        review
            .user
            .extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(name), Some(uid)) = (one(POD_NAME_KEY), one(POD_UID_KEY)) else {
        return Err(refuse(
            403,
            "the token is not bound to a pod (a legacy Secret token or a TokenRequest without a pod): only a pod's own projected token is accepted",
        ));
    };
    Ok(BoundPod {
        namespace: namespace.to_string(),
        name,
        uid,
    })
}

/// Step two: the pod, as the API server has it now, must be the token's pod, a running
/// virt-launcher pod of a VirtualMachineInstance matching the selector, without a runner yet.
pub fn admit(
    bound: &BoundPod,
    pod: Option<&Pod>,
    policy: &Policy,
    now: u64,
) -> Result<Admitted, Refusal> {
    let Some(pod) = pod else {
        return Err(refuse(
            403,
            format!(
                "pod {}/{} is gone: its VM has ended",
                bound.namespace, bound.name
            ),
        ));
    };
    let meta = &pod.metadata;
    if meta.uid != bound.uid {
        return Err(refuse(
            403,
            format!(
                "the token is of an earlier pod named {}/{} (uid {}), since deleted",
                bound.namespace, bound.name, bound.uid
            ),
        ));
    }
    if meta.labels.get("kubevirt.io").map(String::as_str) != Some("virt-launcher") {
        return Err(refuse(
            403,
            format!(
                "pod {}/{} is not a virt-launcher pod (label kubevirt.io=virt-launcher): only KubeVirt VMs get runners",
                bound.namespace, bound.name
            ),
        ));
    }
    let Some(owner) = meta.owner_references.iter().find(|o| {
        o.kind == "VirtualMachineInstance"
            && o.api_version.starts_with("kubevirt.io/")
            && o.controller == Some(true)
    }) else {
        return Err(refuse(
            403,
            format!(
                "pod {}/{} is not controlled by a VirtualMachineInstance",
                bound.namespace, bound.name
            ),
        ));
    };
    if !policy.selector.matches(&meta.labels) {
        return Err(refuse(
            403,
            format!(
                "the VM of pod {}/{} does not match this broker's --vm-selector",
                bound.namespace, bound.name
            ),
        ));
    }
    if meta.deletion_timestamp.is_some() || pod.status.phase != "Running" {
        return Err(refuse(
            403,
            format!(
                "pod {}/{} is not running (phase {:?}{})",
                bound.namespace,
                bound.name,
                pod.status.phase,
                if meta.deletion_timestamp.is_some() {
                    ", being deleted"
                } else {
                    ""
                }
            ),
        ));
    }
    let vm_name = meta
        .labels
        .get("vm.kubevirt.io/name")
        .cloned()
        .unwrap_or_else(|| owner.name.clone());
    let takes_over_stale_claim = match Grant::of(&meta.annotations) {
        None => false,
        Some(g) if g.is_stale_claim(now, policy.claim_stale_after_secs) => true,
        Some(g) if g.state == State::Claimed => {
            return Err(refuse(
                409,
                format!(
                    "a runner for pod {}/{} is being created by another request; a VM gets one runner per boot",
                    bound.namespace, bound.name
                ),
            ));
        }
        Some(_) => {
            return Err(refuse(
                409,
                format!(
                    "pod {}/{} already got its runner; a VM gets one runner per boot (a rebooted VM must power off)",
                    bound.namespace, bound.name
                ),
            ));
        }
    };
    Ok(Admitted {
        vm_name,
        resource_version: meta.resource_version.clone(),
        takes_over_stale_claim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::ANNOTATION;
    use crate::kube::{OwnerReference, PodMeta, PodStatus, ReviewedUser};
    use std::collections::BTreeMap;

    fn policy() -> Policy {
        Policy {
            namespace: "ci".into(),
            selector: Selector::parse("app=runner").unwrap(),
            service_account: Some("ci-vm".into()),
            claim_stale_after_secs: 120,
        }
    }

    fn review(username: &str, pod: Option<(&str, &str)>) -> ReviewStatus {
        let mut extra = BTreeMap::new();
        if let Some((name, uid)) = pod {
            extra.insert(POD_NAME_KEY.to_string(), vec![name.to_string()]);
            extra.insert(POD_UID_KEY.to_string(), vec![uid.to_string()]);
        }
        ReviewStatus {
            authenticated: true,
            error: None,
            user: ReviewedUser {
                username: username.into(),
                extra,
            },
        }
    }

    fn launcher(uid: &str) -> Pod {
        Pod {
            metadata: PodMeta {
                name: "virt-launcher-runner-0-abcde".into(),
                namespace: "ci".into(),
                uid: uid.into(),
                resource_version: "10".into(),
                labels: BTreeMap::from([
                    ("kubevirt.io".into(), "virt-launcher".into()),
                    ("vm.kubevirt.io/name".into(), "runner-0".into()),
                    ("app".into(), "runner".into()),
                ]),
                annotations: BTreeMap::new(),
                owner_references: vec![OwnerReference {
                    api_version: "kubevirt.io/v1".into(),
                    kind: "VirtualMachineInstance".into(),
                    name: "runner-0".into(),
                    uid: "vmi-uid".into(),
                    controller: Some(true),
                }],
                deletion_timestamp: None,
            },
            status: PodStatus {
                phase: "Running".into(),
            },
        }
    }

    fn bound() -> BoundPod {
        BoundPod {
            namespace: "ci".into(),
            name: "virt-launcher-runner-0-abcde".into(),
            uid: "u1".into(),
        }
    }

    #[test]
    fn a_bound_token_of_the_vms_account_names_its_pod() {
        let r = review("system:serviceaccount:ci:ci-vm", Some(("p", "u1")));
        let b = bound_pod(&r, &policy()).unwrap();
        assert_eq!(
            (b.namespace.as_str(), b.name.as_str(), b.uid.as_str()),
            ("ci", "p", "u1")
        );
    }

    #[test]
    fn tokens_that_prove_nothing_are_refused_with_their_cause() {
        let mut r = review("system:serviceaccount:ci:ci-vm", Some(("p", "u1")));
        r.authenticated = false;
        assert!(
            bound_pod(&r, &policy())
                .unwrap_err()
                .message
                .contains("not valid")
        );
        let r = review("system:serviceaccount:other:ci-vm", Some(("p", "u1")));
        assert!(
            bound_pod(&r, &policy())
                .unwrap_err()
                .message
                .contains("namespace \"other\"")
        );
        let r = review("system:serviceaccount:ci:default", Some(("p", "u1")));
        assert!(
            bound_pod(&r, &policy())
                .unwrap_err()
                .message
                .contains("\"default\"")
        );
        let r = review("system:serviceaccount:ci:ci-vm", None);
        assert!(
            bound_pod(&r, &policy())
                .unwrap_err()
                .message
                .contains("not bound to a pod")
        );
        let r = review("alice", Some(("p", "u1")));
        assert!(
            bound_pod(&r, &policy())
                .unwrap_err()
                .message
                .contains("not to a service account")
        );
    }

    #[test]
    fn a_running_launcher_pod_of_the_pool_is_admitted() {
        let a = admit(&bound(), Some(&launcher("u1")), &policy(), 1000).unwrap();
        assert_eq!(a.vm_name, "runner-0");
        assert_eq!(a.resource_version, "10");
        assert!(!a.takes_over_stale_claim);
    }

    #[test]
    fn every_other_pod_is_refused_with_its_cause() {
        let p = policy();
        let cause = |pod: Option<&Pod>| admit(&bound(), pod, &p, 1000).unwrap_err().message;
        assert!(cause(None).contains("is gone"));
        assert!(cause(Some(&launcher("u2"))).contains("earlier pod"));
        let mut plain = launcher("u1");
        plain.metadata.labels.remove("kubevirt.io");
        assert!(cause(Some(&plain)).contains("not a virt-launcher pod"));
        let mut orphan = launcher("u1");
        orphan.metadata.owner_references[0].kind = "ReplicaSet".into();
        assert!(cause(Some(&orphan)).contains("VirtualMachineInstance"));
        let mut outside = launcher("u1");
        outside.metadata.labels.insert("app".into(), "web".into());
        assert!(cause(Some(&outside)).contains("--vm-selector"));
        let mut done = launcher("u1");
        done.status.phase = "Succeeded".into();
        assert!(cause(Some(&done)).contains("not running"));
        let mut deleting = launcher("u1");
        deleting.metadata.deletion_timestamp = Some("2026-01-01T00:00:00Z".into());
        assert!(cause(Some(&deleting)).contains("being deleted"));
    }

    #[test]
    fn a_pod_gets_one_runner_and_a_stale_claim_may_be_taken_over() {
        let p = policy();
        let with = |text: &str| {
            let mut pod = launcher("u1");
            pod.metadata
                .annotations
                .insert(ANNOTATION.into(), text.into());
            admit(&bound(), Some(&pod), &p, 1000)
        };
        let e = with(r#"{"state":"granted","at":990,"runner_id":3}"#).unwrap_err();
        assert_eq!(e.status, 409);
        assert!(e.message.contains("already got its runner"));
        let e = with(r#"{"state":"claimed","at":990}"#).unwrap_err();
        assert!(e.message.contains("being created"));
        assert!(
            with(r#"{"state":"claimed","at":800}"#)
                .unwrap()
                .takes_over_stale_claim
        );
    }
}
