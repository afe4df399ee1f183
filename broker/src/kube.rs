//! The Kubernetes API, as far as the broker needs it: TokenReview, and get/list/patch of pods.
//! Every answer is decoded into the few fields the broker reads.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

/// What a TokenReview said (`status` of authentication.k8s.io/v1 TokenReview).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ReviewStatus {
    #[serde(default)]
    pub authenticated: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub user: ReviewedUser,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct ReviewedUser {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct Pod {
    pub metadata: PodMeta,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub resource_version: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: String,
}

#[derive(Debug, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Vec<Pod>,
    #[serde(default)]
    metadata: ListMeta,
}

#[derive(Debug, Default, Deserialize)]
struct ListMeta {
    #[serde(default, rename = "continue")]
    continue_: Option<String>,
}

/// The outcome of a patch carrying `metadata.resourceVersion` as its precondition.
#[derive(Debug)]
pub enum Patched {
    Done,
    /// 409: the pod changed since it was read; another request won.
    Conflict,
    /// 404: the pod is gone.
    Gone,
}

#[derive(Debug, thiserror::Error)]
#[error("Kubernetes API: {0}")]
pub struct KubeError(String);

pub struct Kube {
    http: reqwest::Client,
    base: String,
    token_file: PathBuf,
}

impl Kube {
    pub fn new(
        base: String,
        token_file: PathBuf,
        ca_file: Option<PathBuf>,
        timeout: Duration,
    ) -> anyhow::Result<Kube> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = ca_file {
            let pem = std::fs::read(&ca)
                .map_err(|e| anyhow::anyhow!("reading the Kubernetes CA {}: {e}", ca.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                anyhow::anyhow!("the Kubernetes CA {} is not PEM: {e}", ca.display())
            })? {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Kube {
            http: builder.build()?,
            base,
            token_file,
        })
    }

    fn bearer(&self) -> Result<String, KubeError> {
        std::fs::read_to_string(&self.token_file)
            .map(|t| t.trim().to_string())
            .map_err(|e| {
                KubeError(format!(
                    "reading the broker's own token {}: {e}",
                    self.token_file.display()
                ))
            })
    }

    /// Asks the API server who `token` belongs to. The token never enters an error.
    pub async fn review(&self, token: &str) -> Result<ReviewStatus, KubeError> {
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        });
        let answer = self
            .send(
                self.http
                    .post(format!(
                        "{}/apis/authentication.k8s.io/v1/tokenreviews",
                        self.base
                    ))
                    .json(&body),
                "TokenReview",
            )
            .await?;
        let (status, value) = answer;
        if !status.is_success() {
            return Err(KubeError(format!(
                "TokenReview answered {status}{}",
                status_message(&value)
            )));
        }
        serde_json::from_value(value.get("status").cloned().unwrap_or(Value::Null))
            .map_err(|e| KubeError(format!("TokenReview answer has no usable status: {e}")))
    }

    pub async fn get_pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, KubeError> {
        let (status, value) = self
            .send(
                self.http.get(self.pod_url(namespace, name)),
                "getting the pod",
            )
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            s if s.is_success() => serde_json::from_value(value)
                .map(Some)
                .map_err(|e| KubeError(format!("the pod's answer is not a Pod: {e}"))),
            s => Err(KubeError(format!(
                "getting pod {namespace}/{name} answered {s}{}",
                status_message(&value)
            ))),
        }
    }

    /// A JSON merge patch; callers put `metadata.resourceVersion` in it to make it conditional.
    pub async fn patch_pod(
        &self,
        namespace: &str,
        name: &str,
        patch: &Value,
    ) -> Result<Patched, KubeError> {
        let (status, value) = self
            .send(
                self.http
                    .patch(self.pod_url(namespace, name))
                    .header("content-type", "application/merge-patch+json")
                    .body(patch.to_string()),
                "patching the pod",
            )
            .await?;
        match status {
            StatusCode::CONFLICT => Ok(Patched::Conflict),
            StatusCode::NOT_FOUND => Ok(Patched::Gone),
            s if s.is_success() => Ok(Patched::Done),
            s => Err(KubeError(format!(
                "patching pod {namespace}/{name} answered {s}{}",
                status_message(&value)
            ))),
        }
    }

    /// Every pod of `namespace` matching `selector`, page by page.
    pub async fn list_pods(&self, namespace: &str, selector: &str) -> Result<Vec<Pod>, KubeError> {
        let mut pods = Vec::new();
        let mut cont: Option<String> = None;
        loop {
            let mut query = vec![
                ("labelSelector", selector.to_string()),
                ("limit", "500".to_string()),
            ];
            if let Some(c) = &cont {
                query.push(("continue", c.clone()));
            }
            let (status, value) = self
                .send(
                    self.http.get(
                        reqwest::Url::parse_with_params(
                            &format!("{}/api/v1/namespaces/{namespace}/pods", self.base),
                            &query,
                        )
                        .map_err(|e| KubeError(format!("the pod list's URL: {e}")))?,
                    ),
                    "listing pods",
                )
                .await?;
            if !status.is_success() {
                return Err(KubeError(format!(
                    "listing pods in {namespace} answered {status}{}",
                    status_message(&value)
                )));
            }
            let list: PodList = serde_json::from_value(value)
                .map_err(|e| KubeError(format!("the pod list is not a PodList: {e}")))?;
            pods.extend(list.items);
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => cont = Some(c),
                None => return Ok(pods),
            }
        }
    }

    fn pod_url(&self, namespace: &str, name: &str) -> String {
        format!("{}/api/v1/namespaces/{namespace}/pods/{name}", self.base)
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        what: &str,
    ) -> Result<(StatusCode, Value), KubeError> {
        let response = request
            .bearer_auth(self.bearer()?)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| KubeError(format!("{what}: {}", crate::secret::scrub(&e.to_string()))))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| KubeError(format!("{what}: reading the answer: {e}")))?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }
}

/// `: <message>` of a Kubernetes Status object, scrubbed of anything token-shaped.
fn status_message(value: &Value) -> String {
    match value.get("message").and_then(Value::as_str) {
        Some(m) => format!(
            ": {}",
            crate::secret::scrub(&m.chars().take(300).collect::<String>())
        ),
        None => String::new(),
    }
}
