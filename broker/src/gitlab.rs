//! GitLab's runner API with the broker's access token: create a runner, list the broker's own,
//! delete one. The access token goes only into the `PRIVATE-TOKEN` header.

use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::secret::{Secret, scrub};
use crate::settings::Settings;

/// Every runner the broker creates starts its description with this; with the namespace it is
/// how the reaper tells its runners from anyone else's.
pub const DESCRIPTION_PREFIX: &str = "gitlab-runner-vm-broker";

/// The description of a pod's runner: names the VM and the pod UID, so that a runner whose
/// creation answer was lost can be found again and the reaper can match it with its pod.
pub fn description(namespace: &str, vm: &str, pod_uid: &str) -> String {
    format!("{DESCRIPTION_PREFIX} {namespace}/{vm} pod {pod_uid}")
}

/// The pod UID of one of this broker's runners in `namespace`, or None for anyone else's.
pub fn pod_uid_of(description: &str, namespace: &str) -> Option<String> {
    let rest = description
        .strip_prefix(DESCRIPTION_PREFIX)?
        .strip_prefix(' ')?;
    let (vm_path, uid) = rest.rsplit_once(" pod ")?;
    let (ns, _vm) = vm_path.split_once('/')?;
    (ns == namespace && !uid.is_empty() && !uid.contains(' ')).then(|| uid.to_string())
}

/// What every runner gets, from the settings.
#[derive(Debug, Clone)]
pub struct RunnerSpec {
    pub runner_type: &'static str,
    pub group_id: Option<u64>,
    pub project_id: Option<u64>,
    pub tags: Vec<String>,
    pub run_untagged: bool,
    pub locked: bool,
    pub access_level: &'static str,
    pub maximum_timeout: Option<u64>,
    pub token_lifetime: Option<Duration>,
}

impl RunnerSpec {
    pub fn from_settings(s: &Settings) -> RunnerSpec {
        RunnerSpec {
            runner_type: s.runner_type.as_str(),
            group_id: s.group_id,
            project_id: s.project_id,
            tags: s.tags(),
            run_untagged: s.run_untagged,
            locked: s.locked,
            access_level: s.access_level.as_str(),
            maximum_timeout: s.maximum_timeout,
            token_lifetime: s.token_lifetime,
        }
    }

    /// The body of `POST /user/runners`.
    pub fn create_body(&self, description: &str, now_unix: u64) -> Value {
        let mut body = json!({
            "runner_type": self.runner_type,
            "description": description,
            "tag_list": self.tags.join(","),
            "run_untagged": self.run_untagged,
            "locked": self.locked,
            "access_level": self.access_level,
        });
        if let Some(id) = self.group_id {
            body["group_id"] = json!(id);
        }
        if let Some(id) = self.project_id {
            body["project_id"] = json!(id);
        }
        if let Some(t) = self.maximum_timeout {
            body["maximum_timeout"] = json!(t);
        }
        if let Some(life) = self.token_lifetime {
            body["token_expires_at"] = json!(crate::time::iso8601(now_unix + life.as_secs()));
        }
        body
    }

    /// Where the broker's runners are listed: a group's or project's runners, or (for instance
    /// runners, admin token) all of them.
    fn list_path(&self) -> String {
        match (self.group_id, self.project_id) {
            (Some(g), _) if self.runner_type == "group_type" => format!("groups/{g}/runners"),
            (_, Some(p)) if self.runner_type == "project_type" => format!("projects/{p}/runners"),
            _ => "runners/all".to_string(),
        }
    }
}

#[derive(Debug)]
pub struct Created {
    pub id: u64,
    pub token: Secret,
    pub token_expires_at: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Listed {
    pub id: u64,
    #[serde(default)]
    pub description: Option<String>,
}

/// Why a create failed, by what the broker may do next.
#[derive(Debug)]
pub enum CreateError {
    /// GitLab refused the request itself (400, 401, 403, 404): retrying cannot help.
    Refused(String),
    /// 429: nothing was created; try again after the given delay.
    Throttled(Option<Duration>, String),
    /// A 5xx, a timeout or a broken connection: a runner may or may not exist now.
    Unknown(String),
}

#[derive(Debug, thiserror::Error)]
#[error("GitLab: {0}")]
pub struct GitLabError(pub String);

pub struct GitLab {
    http: reqwest::Client,
    api: String,
    token: Secret,
}

impl GitLab {
    pub fn new(url: &str, token: Secret, timeout: Duration) -> anyhow::Result<GitLab> {
        Ok(GitLab {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            api: format!("{}/api/v4", url.trim_end_matches('/')),
            token,
        })
    }

    pub async fn create(&self, body: &Value) -> Result<Created, CreateError> {
        let sent = self
            .http
            .post(format!("{}/user/runners", self.api))
            .header("PRIVATE-TOKEN", self.token.expose())
            .json(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return Err(CreateError::Unknown(self.clean(&e.to_string()))),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(e) => return Err(CreateError::Unknown(self.clean(&e.to_string()))),
        };
        let what = || {
            format!(
                "creating a runner answered {status}{}",
                self.message(&bytes)
            )
        };
        match status {
            StatusCode::CREATED | StatusCode::OK => {
                #[derive(Deserialize)]
                struct Answer {
                    id: u64,
                    token: String,
                    #[serde(default)]
                    token_expires_at: Option<String>,
                }
                match serde_json::from_slice::<Answer>(&bytes) {
                    Ok(a) if a.token.starts_with("glrt-") => Ok(Created {
                        id: a.id,
                        token: Secret::new(a.token),
                        token_expires_at: a.token_expires_at,
                    }),
                    _ => Err(CreateError::Unknown(format!(
                        "creating a runner answered {status} without an id and a glrt- token"
                    ))),
                }
            }
            StatusCode::TOO_MANY_REQUESTS => Err(CreateError::Throttled(retry_after, what())),
            s if s.is_server_error() => Err(CreateError::Unknown(what())),
            _ => Err(CreateError::Refused(what())),
        }
    }

    /// Every runner in the broker's scope whose description starts with DESCRIPTION_PREFIX.
    pub async fn list_own(&self, spec: &RunnerSpec) -> Result<Vec<Listed>, GitLabError> {
        let mut all = Vec::new();
        for page in 1.. {
            let mut query = vec![
                ("type", spec.runner_type.to_string()),
                ("per_page", "100".to_string()),
                ("page", page.to_string()),
            ];
            if !spec.tags.is_empty() {
                query.push(("tag_list", spec.tags.join(",")));
            }
            let response = self
                .http
                .get(
                    reqwest::Url::parse_with_params(
                        &format!("{}/{}", self.api, spec.list_path()),
                        &query,
                    )
                    .map_err(|e| GitLabError(format!("the runner list's URL: {e}")))?,
                )
                .header("PRIVATE-TOKEN", self.token.expose())
                .send()
                .await
                .map_err(|e| {
                    GitLabError(format!("listing runners: {}", self.clean(&e.to_string())))
                })?;
            let status = response.status();
            let next = response
                .headers()
                .get("x-next-page")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| !v.trim().is_empty());
            let bytes = response.bytes().await.map_err(|e| {
                GitLabError(format!("listing runners: {}", self.clean(&e.to_string())))
            })?;
            if !status.is_success() {
                return Err(GitLabError(format!(
                    "listing runners answered {status}{}",
                    self.message(&bytes)
                )));
            }
            let runners: Vec<Listed> = serde_json::from_slice(&bytes).map_err(|e| {
                GitLabError(format!("the runner list is not a list of runners: {e}"))
            })?;
            let full = runners.len() == 100;
            all.extend(runners.into_iter().filter(|r| {
                r.description
                    .as_deref()
                    .is_some_and(|d| d.starts_with(DESCRIPTION_PREFIX))
            }));
            if !next && !full {
                break;
            }
        }
        Ok(all)
    }

    /// Deletes a runner by id; one already gone counts as deleted.
    pub async fn delete(&self, id: u64) -> Result<(), GitLabError> {
        let response = self
            .http
            .delete(format!("{}/runners/{id}", self.api))
            .header("PRIVATE-TOKEN", self.token.expose())
            .send()
            .await
            .map_err(|e| {
                GitLabError(format!(
                    "deleting runner {id}: {}",
                    self.clean(&e.to_string())
                ))
            })?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => Err(GitLabError(format!("deleting runner {id} answered {s}"))),
        }
    }

    /// An error text with the access token (and anything token-shaped) masked.
    fn clean(&self, text: &str) -> String {
        scrub(&crate::secret::redact(text, &[&self.token]))
    }

    /// `: <message>` from a GitLab error body, short and scrubbed.
    fn message(&self, body: &[u8]) -> String {
        let text = match serde_json::from_slice::<Value>(body) {
            Ok(v) => v
                .get("message")
                .or_else(|| v.get("error"))
                .map(|m| m.to_string())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                self.clean(&text.chars().take(200).collect::<String>())
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_description_names_the_vm_and_pod_and_is_read_back() {
        let d = description("ci", "runner-3", "0f1e-22");
        assert_eq!(d, "gitlab-runner-vm-broker ci/runner-3 pod 0f1e-22");
        assert_eq!(pod_uid_of(&d, "ci").as_deref(), Some("0f1e-22"));
        assert_eq!(pod_uid_of(&d, "other"), None);
        assert_eq!(pod_uid_of("my laptop runner", "ci"), None);
        assert_eq!(
            pod_uid_of("gitlab-runner-vm-brokerX ci/a pod u", "ci"),
            None
        );
    }

    #[test]
    fn the_create_body_carries_every_setting() {
        let spec = RunnerSpec {
            runner_type: "group_type",
            group_id: Some(7),
            project_id: None,
            tags: vec!["nixos".into(), "kvm".into()],
            run_untagged: false,
            locked: true,
            access_level: "ref_protected",
            maximum_timeout: Some(3600),
            token_lifetime: Some(Duration::from_secs(86_400)),
        };
        let b = spec.create_body("d", 0);
        assert_eq!(b["runner_type"], "group_type");
        assert_eq!(b["group_id"], 7);
        assert_eq!(b["tag_list"], "nixos,kvm");
        assert_eq!(b["run_untagged"], false);
        assert_eq!(b["locked"], true);
        assert_eq!(b["access_level"], "ref_protected");
        assert_eq!(b["maximum_timeout"], 3600);
        assert_eq!(b["token_expires_at"], "1970-01-02T00:00:00Z");
        assert!(b.get("project_id").is_none());
        assert_eq!(spec.list_path(), "groups/7/runners");
    }
}
