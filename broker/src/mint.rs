//! One request of one VM boot, from token to runner: review the token, admit the pod, claim it,
//! create the runner (finding a lost one again first), record the grant, answer.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::admission::{self, Policy, Refusal};
use crate::gitlab::{self, CreateError, GitLab, RunnerSpec};
use crate::grant::{self, Grant, State};
use crate::kube::{Kube, Patched};
use crate::time::now_unix;

pub struct Broker {
    pub kube: Kube,
    pub gitlab: GitLab,
    pub gitlab_url: String,
    pub policy: Policy,
    pub spec: RunnerSpec,
    pub mint_deadline: Duration,
}

/// The answer to the VM: a status and a JSON body.
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    fn error(status: u16, message: impl Into<String>) -> Answer {
        Answer {
            status,
            body: json!({"error": message.into()}),
        }
    }
}

impl From<Refusal> for Answer {
    fn from(r: Refusal) -> Answer {
        Answer::error(r.status, r.message)
    }
}

impl Broker {
    pub async fn mint(&self, token: &str) -> Answer {
        let review = match self.kube.review(token).await {
            Ok(r) => r,
            Err(e) => {
                warn!("refused a request: {e}");
                return Answer::error(503, format!("cannot check the token now ({e}); try again"));
            }
        };
        let bound = match admission::bound_pod(&review, &self.policy) {
            Ok(b) => b,
            Err(r) => {
                info!("refused a request: {}", r.message);
                return r.into();
            }
        };
        let (admitted, claim) = match self.claim(&bound).await {
            Ok(claimed) => claimed,
            Err(answer) => return answer,
        };

        let description = gitlab::description(&bound.namespace, &admitted.vm_name, &bound.uid);
        let created = self
            .create_once(&description, admitted.takes_over_stale_claim)
            .await;
        let created = match created {
            Ok(c) => c,
            Err(message) => {
                // Nothing is left in GitLab (create_once made sure); release the pod so the VM
                // may ask again.
                if let Err(e) = self.replace_claim(&bound, &claim, None).await {
                    warn!(
                        "pod {}/{}: the claim stays until it is stale ({e})",
                        bound.namespace, bound.name
                    );
                }
                warn!(
                    "no runner for pod {}/{}: {message}",
                    bound.namespace, bound.name
                );
                return Answer::error(
                    503,
                    format!("could not create the runner: {message}; try again"),
                );
            }
        };

        let granted = Grant {
            state: State::Granted,
            at: now_unix(),
            runner_id: Some(created.id),
            claim: claim.claim,
        };
        match self.replace_claim(&bound, &claim, Some(&granted)).await {
            Ok(()) => {}
            Err(other) => {
                // Without the grant on the pod the runner would be unaccounted for: take it back.
                warn!(
                    "pod {}/{}: recording runner {} failed ({other}); deleting it",
                    bound.namespace, bound.name, created.id
                );
                if let Err(e) = self.gitlab.delete(created.id).await {
                    warn!("runner {}: {e}; the reaper will delete it", created.id);
                }
                return Answer::error(503, "could not record the runner on the pod; try again");
            }
        }
        info!(
            "runner {} ({}) for VM {}/{} pod {}",
            created.id, created.token, bound.namespace, admitted.vm_name, bound.uid
        );
        Answer {
            status: 201,
            body: json!({
                "url": self.gitlab_url,
                "token": created.token.expose(),
                "token_expires_at": created.token_expires_at,
                "runner_id": created.id,
            }),
        }
    }

    /// Creates the runner, retrying 429s and unknown outcomes until the mint deadline; before
    /// each attempt that follows an unknown outcome (or a dead broker's claim) it finds and
    /// deletes any runner with this description, so a retry never leaves a second runner.
    /// On failure nothing with this description is left in GitLab.
    async fn create_once(
        &self,
        description: &str,
        mut may_exist: bool,
    ) -> Result<gitlab::Created, String> {
        let deadline = Instant::now() + self.mint_deadline;
        let mut backoff = Duration::from_millis(500);
        loop {
            if may_exist {
                self.delete_described(description).await?;
            }
            let (last, wait) = match self
                .gitlab
                .create(&self.spec.create_body(description, now_unix()))
                .await
            {
                Ok(created) => return Ok(created),
                Err(CreateError::Refused(m)) => return Err(m),
                // GitLab said when; its own pacing is not ours to double.
                Err(CreateError::Throttled(after, m)) => (
                    m,
                    throttled_wait(after.unwrap_or(backoff), grant::random_claim()),
                ),
                Err(CreateError::Unknown(m)) => {
                    may_exist = true;
                    let wait = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    (m, wait)
                }
            };
            warn!("{description}: {last}; retrying in {wait:?}");
            if Instant::now() + wait >= deadline {
                if may_exist {
                    self.delete_described(description).await?;
                }
                return Err(format!("{last} (gave up after {:?})", self.mint_deadline));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Reads the pod, admits it and claims it. The claim carries the pod's resourceVersion, so
    /// of two requests only one can win; a conflict may also be kubelet updating the pod's
    /// status in between, so the pod is read and judged again, and only a claim or grant by
    /// another request refuses this one.
    async fn claim(
        &self,
        bound: &admission::BoundPod,
    ) -> Result<(admission::Admitted, Grant), Answer> {
        let (ns, name) = (&bound.namespace, &bound.name);
        for _ in 0..5 {
            let pod = self.kube.get_pod(ns, name).await.map_err(|e| {
                warn!("pod {ns}/{name}: {e}");
                Answer::error(503, format!("cannot read the pod now ({e}); try again"))
            })?;
            let admitted = admission::admit(bound, pod.as_ref(), &self.policy, now_unix())
                .map_err(|r| {
                    info!("refused pod {ns}/{name} (uid {}): {}", bound.uid, r.message);
                    Answer::from(r)
                })?;
            let claim = Grant {
                state: State::Claimed,
                at: now_unix(),
                runner_id: None,
                claim: Some(grant::random_claim()),
            };
            let patch = grant::patch(&admitted.resource_version, Some(&claim));
            match self.kube.patch_pod(ns, name, &patch).await {
                Ok(Patched::Done) => return Ok((admitted, claim)),
                Ok(Patched::Conflict) => {
                    info!("pod {ns}/{name} changed while being claimed; reading it again");
                }
                Ok(Patched::Gone) => {
                    return Err(Answer::error(
                        403,
                        format!("pod {ns}/{name} is gone: its VM has ended"),
                    ));
                }
                Err(e) => {
                    warn!("claiming pod {ns}/{name}: {e}");
                    return Err(Answer::error(
                        503,
                        format!("cannot record the claim now ({e}); try again"),
                    ));
                }
            }
        }
        Err(Answer::error(
            503,
            format!("pod {ns}/{name} kept changing while being claimed; try again"),
        ))
    }

    /// Replaces this request's own claim on the pod (by a grant, or by nothing to release it),
    /// as long as the claim is still there: kubelet may have changed the pod meanwhile (a new
    /// resourceVersion), so the pod is read again and the write retried on a conflict.
    async fn replace_claim(
        &self,
        bound: &admission::BoundPod,
        claim: &Grant,
        new: Option<&Grant>,
    ) -> Result<(), String> {
        for _ in 0..5 {
            let pod = self
                .kube
                .get_pod(&bound.namespace, &bound.name)
                .await
                .map_err(|e| e.to_string())?
                .filter(|p| p.metadata.uid == bound.uid)
                .ok_or("the pod is gone")?;
            if Grant::of(&pod.metadata.annotations).as_ref() != Some(claim) {
                return Err("another request took the pod's claim over".into());
            }
            match self
                .kube
                .patch_pod(
                    &bound.namespace,
                    &bound.name,
                    &grant::patch(&pod.metadata.resource_version, new),
                )
                .await
                .map_err(|e| e.to_string())?
            {
                Patched::Done => return Ok(()),
                Patched::Gone => return Err("the pod is gone".into()),
                Patched::Conflict => continue,
            }
        }
        Err("the pod kept changing".into())
    }

    async fn delete_described(&self, description: &str) -> Result<(), String> {
        let own = self
            .gitlab
            .list_own(&self.spec)
            .await
            .map_err(|e| e.to_string())?;
        for r in own
            .iter()
            .filter(|r| r.description.as_deref() == Some(description))
        {
            info!(
                "deleting runner {} left by an earlier attempt ({description})",
                r.id
            );
            self.gitlab.delete(r.id).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The wait after a 429: what GitLab said (or the back-off), but at least `MIN_THROTTLED_WAIT`
/// (a `Retry-After: 0`, or a proxy's, must not make a tight loop of a storm of VMs' requests),
/// and spread by up to `THROTTLED_SPREAD` so that the requests GitLab throttled together do not
/// come back together. `random` is any 64 random bits.
fn throttled_wait(said: Duration, random: u64) -> Duration {
    let spread = THROTTLED_SPREAD.mul_f64((random % 1_000) as f64 / 1_000.0);
    said.max(MIN_THROTTLED_WAIT) + spread
}

const MIN_THROTTLED_WAIT: Duration = Duration::from_secs(1);
const THROTTLED_SPREAD: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::throttled_wait;
    use std::time::Duration;

    #[test]
    fn a_throttled_create_waits_at_least_a_second_and_spreads() {
        // Retry-After: 0 is no tight loop.
        assert!(throttled_wait(Duration::ZERO, 0) >= Duration::from_secs(1));
        assert_eq!(
            throttled_wait(Duration::from_secs(7), 0),
            Duration::from_secs(7)
        );
        let spread: Vec<Duration> = [1, 250, 999]
            .iter()
            .map(|r| throttled_wait(Duration::from_secs(2), *r))
            .collect();
        assert!(spread.windows(2).all(|w| w[0] < w[1]), "{spread:?}");
        assert!(spread[2] < Duration::from_millis(2_500), "{spread:?}");
    }
}
