//! Test harness: the real `gitlab-runner-vm-broker` binary between a fake Kubernetes API and a
//! fake GitLab (wiremock with state, answering as the real APIs document: TokenReview, pods as
//! JSON with 404 and 409 Status objects, `POST /user/runners`, runner lists, deletes).

#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const BIN: &str = env!("CARGO_BIN_EXE_gitlab-runner-vm-broker");
pub const ACCESS_TOKEN: &str = "glpat-Hq3ZvK8wTn5RbY2mXc7Lp4Df";
pub const BROKER_KUBE_TOKEN: &str = "eyJrdWJlIn0.Mq8ZtW3xVn6KcLs9Pd.c2ln";
pub const NAMESPACE: &str = "ci";
pub const VM_ACCOUNT: &str = "ci-vm";
pub const GROUP_ID: u64 = 7;
/// Generous: these tests check behaviour, never speed.
pub const PATIENCE: Duration = Duration::from_secs(40);

// ---------------------------------------------------------------- fake Kubernetes

#[derive(Default)]
pub struct ClusterState {
    /// name -> pod JSON
    pub pods: HashMap<String, Value>,
    /// token -> (namespace, service account, pod name, pod uid)
    pub tokens: HashMap<String, (String, String, String, String)>,
    pub resource_version: u64,
    pub patches: usize,
    pub conflicts: usize,
    /// TokenReviews asked for.
    pub reviews: usize,
    /// The next this many patches find the pod changed by kubelet (a new resourceVersion) just
    /// before them, and get the 409 that a real API server answers.
    pub kubelet_races: usize,
}

#[derive(Clone, Default)]
pub struct Cluster(pub Arc<Mutex<ClusterState>>);

fn status(code: u16, reason: &str, message: String) -> ResponseTemplate {
    ResponseTemplate::new(code).set_body_json(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    }))
}

fn authorized(req: &Request) -> bool {
    req.headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(&format!("Bearer {BROKER_KUBE_TOKEN}"))
}

impl Cluster {
    pub fn next_rv(s: &mut ClusterState) -> String {
        s.resource_version += 1;
        s.resource_version.to_string()
    }

    /// A running virt-launcher pod of VM `vm`, in `namespace`, with `labels` besides
    /// KubeVirt's own, and a token bound to it; returns the token.
    pub fn add_pod(
        &self,
        namespace: &str,
        vm: &str,
        launcher: bool,
        labels: Value,
    ) -> (String, String) {
        let mut s = self.0.lock().unwrap();
        let n = s.pods.len() + s.tokens.len();
        let name = format!("virt-launcher-{vm}-{n:05}");
        let uid = format!("0000-pod-uid-{vm}-{n}");
        let mut all = labels.as_object().cloned().unwrap_or_default();
        let mut owners = json!([]);
        if launcher {
            all.insert("kubevirt.io".into(), json!("virt-launcher"));
            all.insert("vm.kubevirt.io/name".into(), json!(vm));
            all.insert(
                "kubevirt.io/created-by".into(),
                json!(format!("vmi-uid-{vm}")),
            );
            owners = json!([{"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
                "name": vm, "uid": format!("vmi-uid-{vm}"), "controller": true, "blockOwnerDeletion": true}]);
        }
        let rv = Self::next_rv(&mut s);
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": rv,
                "labels": all, "annotations": {"kubevirt.io/domain": vm}, "ownerReferences": owners},
            "spec": {"serviceAccountName": VM_ACCOUNT},
            "status": {"phase": "Running"},
        });
        s.pods.insert(name.clone(), pod);
        let token = format!("eyJhbGciOiJSUzI1NiJ9.Wk{n:04}Rz8QvMpT3xYc{n:04}.c2lnbmF0dXJl");
        s.tokens.insert(
            token.clone(),
            (
                namespace.into(),
                VM_ACCOUNT.into(),
                name.clone(),
                uid.clone(),
            ),
        );
        (token, name)
    }

    pub fn delete_pod(&self, name: &str) {
        self.0.lock().unwrap().pods.remove(name);
    }

    pub fn set_phase(&self, name: &str, phase: &str) {
        let mut s = self.0.lock().unwrap();
        let rv = Self::next_rv(&mut s);
        let pod = s.pods.get_mut(name).unwrap();
        pod["status"]["phase"] = json!(phase);
        pod["metadata"]["resourceVersion"] = json!(rv);
    }

    /// kubelet updating the pod's status: a new resourceVersion under the broker's feet.
    pub fn touch(&self, name: &str) {
        let mut s = self.0.lock().unwrap();
        let rv = Self::next_rv(&mut s);
        if let Some(pod) = s.pods.get_mut(name) {
            pod["metadata"]["resourceVersion"] = json!(rv);
        }
    }

    pub fn grant(&self, name: &str) -> Option<Value> {
        let s = self.0.lock().unwrap();
        let text = s.pods.get(name)?["metadata"]["annotations"]["gitlab-runner-vm.io/broker-grant"]
            .as_str()?
            .to_string();
        serde_json::from_str(&text).ok()
    }

    pub fn uid(&self, name: &str) -> String {
        self.0.lock().unwrap().pods[name]["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_string()
    }

    pub async fn mount(&self, server: &MockServer) {
        Mock::given(method("POST"))
            .and(path("/apis/authentication.k8s.io/v1/tokenreviews"))
            .respond_with(TokenReviews(self.clone()))
            .mount(server)
            .await;
        Mock::given(path_regex(r"^/api/v1/namespaces/[^/]+/pods/[^/]+$"))
            .respond_with(Pods(self.clone()))
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path_regex(r"^/api/v1/namespaces/[^/]+/pods$"))
            .respond_with(PodLists(self.clone()))
            .mount(server)
            .await;
    }
}

struct TokenReviews(Cluster);

impl Respond for TokenReviews {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !authorized(req) {
            return status(401, "Unauthorized", "Unauthorized".into());
        }
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let token = body["spec"]["token"].as_str().unwrap_or("");
        let mut s = self.0.0.lock().unwrap();
        s.reviews += 1;
        // A bound token is valid only while its pod (that very UID) exists.
        let review = match s.tokens.get(token) {
            Some((ns, sa, pod, uid))
                if s.pods
                    .get(pod)
                    .is_some_and(|p| p["metadata"]["uid"] == json!(uid)) =>
            {
                json!({"authenticated": true, "user": {
                    "username": format!("system:serviceaccount:{ns}:{sa}"),
                    "uid": "sa-uid",
                    "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/pod-name": [pod],
                        "authentication.kubernetes.io/pod-uid": [uid],
                        "authentication.kubernetes.io/credential-id": ["JTI=abc"],
                    }},
                    "audiences": ["https://kubernetes.default.svc.cluster.local"]})
            }
            _ => {
                json!({"user": {}, "error": "[invalid bearer token, service account token has been invalidated]"})
            }
        };
        ResponseTemplate::new(201).set_body_json(json!({
            "kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null}, "spec": {"token": token}, "status": review,
        }))
    }
}

struct Pods(Cluster);

fn merge(target: &mut Value, patch: &Value) {
    if let (Some(t), Some(p)) = (target.as_object_mut(), patch.as_object()) {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else if v.is_object() {
                merge(t.entry(k.clone()).or_insert(json!({})), v);
            } else {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

impl Respond for Pods {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !authorized(req) {
            return status(401, "Unauthorized", "Unauthorized".into());
        }
        let parts: Vec<&str> = req.url.path().split('/').collect();
        let (ns, name) = (parts[4], parts[6]);
        let mut s = self.0.0.lock().unwrap();
        let not_found = status(404, "NotFound", format!("pods \"{name}\" not found"));
        let exists = s
            .pods
            .get(name)
            .is_some_and(|p| p["metadata"]["namespace"] == json!(ns));
        if !exists {
            return not_found;
        }
        match req.method.as_str() {
            "GET" => ResponseTemplate::new(200).set_body_json(s.pods[name].clone()),
            "PATCH" => {
                let ct = req
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if ct != "application/merge-patch+json" {
                    return status(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})"
                        ),
                    );
                }
                let patch: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
                s.patches += 1;
                if s.kubelet_races > 0 {
                    s.kubelet_races -= 1;
                    let rv = Cluster::next_rv(&mut s);
                    s.pods.get_mut(name).unwrap()["metadata"]["resourceVersion"] = json!(rv);
                }
                // A resourceVersion in a patch is a precondition (optimistic concurrency).
                if let Some(rv) = patch["metadata"]["resourceVersion"].as_str()
                    && s.pods[name]["metadata"]["resourceVersion"] != json!(rv)
                {
                    s.conflicts += 1;
                    return status(
                        409,
                        "Conflict",
                        format!(
                            "Operation cannot be fulfilled on pods \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                        ),
                    );
                }
                let rv = Cluster::next_rv(&mut s);
                let pod = s.pods.get_mut(name).unwrap();
                let mut patch = patch.clone();
                if let Some(m) = patch["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                merge(pod, &patch);
                pod["metadata"]["resourceVersion"] = json!(rv);
                ResponseTemplate::new(200).set_body_json(pod.clone())
            }
            _ => status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method".into(),
            ),
        }
    }
}

struct PodLists(Cluster);

impl Respond for PodLists {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !authorized(req) {
            return status(401, "Unauthorized", "Unauthorized".into());
        }
        let ns = req.url.path().split('/').nth(4).unwrap_or("").to_string();
        let selector: Vec<(String, String)> = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "labelSelector")
            .map(|(_, v)| {
                v.split(',')
                    .filter_map(|t| {
                        t.split_once('=')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut s = self.0.0.lock().unwrap();
        let items: Vec<Value> = s
            .pods
            .values()
            .filter(|p| p["metadata"]["namespace"] == json!(ns))
            .filter(|p| {
                selector
                    .iter()
                    .all(|(k, v)| p["metadata"]["labels"][k] == json!(v))
            })
            .cloned()
            .collect();
        let rv = Cluster::next_rv(&mut s);
        ResponseTemplate::new(200).set_body_json(json!({
            "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items,
        }))
    }
}

// ---------------------------------------------------------------- fake GitLab

/// What the next `POST /user/runners` does.
#[derive(Clone, Debug)]
pub enum Create {
    Ok,
    /// 429 with `Retry-After: 1`; nothing created.
    Throttled,
    /// 429 with `Retry-After: 0` (as a proxy may say); nothing created.
    ThrottledNoWait,
    /// 500; nothing created.
    Fails,
    /// The runner is created, but the answer is a 502 (lost at a proxy).
    CreatedAnswerLost,
    /// The runner is created, and the answer comes after this long.
    CreatedSlowly(Duration),
}

#[derive(Default)]
pub struct GitLabState {
    /// id -> (description, token)
    pub runners: HashMap<u64, (String, String)>,
    pub next_id: u64,
    pub script: VecDeque<Create>,
    pub bodies: Vec<Value>,
    pub creates: usize,
    /// When each create arrived.
    pub create_times: Vec<std::time::Instant>,
    pub deletes: Vec<u64>,
    /// Every runner token ever minted, deleted or not.
    pub minted: Vec<String>,
    /// Runners per page of a list; 0 means 2, small enough to make the broker page.
    pub page_size: usize,
    /// The runner API a VM's agent calls with its runner token: `POST /runners/verify` (the
    /// tokens), `DELETE /runners` (the ids deleted), `DELETE /runners/managers` (count).
    pub verified: Vec<String>,
    pub deleted_by_token: Vec<u64>,
    pub manager_deletes: usize,
}

#[derive(Clone, Default)]
pub struct GitLab(pub Arc<Mutex<GitLabState>>);

impl GitLab {
    pub fn script(&self, steps: &[Create]) {
        self.0.lock().unwrap().script.extend(steps.iter().cloned());
    }

    pub fn runner_count(&self) -> usize {
        self.0.lock().unwrap().runners.len()
    }

    pub fn runner_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.0.lock().unwrap().runners.keys().copied().collect();
        ids.sort();
        ids
    }

    /// A runner someone else made (another runner manager, a laptop): never the broker's.
    pub fn add_foreign(&self, description: &str) -> u64 {
        let mut s = self.0.lock().unwrap();
        s.next_id += 1;
        let id = 1000 + s.next_id;
        s.runners
            .insert(id, (description.into(), "glrt-foreign".into()));
        id
    }

    pub async fn mount(&self, server: &MockServer) {
        Mock::given(method("POST"))
            .and(path("/api/v4/user/runners"))
            .respond_with(Creates(self.clone()))
            .mount(server)
            .await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v4/groups/{GROUP_ID}/runners")))
            .respond_with(Lists(self.clone()))
            .mount(server)
            .await;
        Mock::given(method("DELETE"))
            .and(path_regex(r"^/api/v4/runners/\d+$"))
            .respond_with(Deletes(self.clone()))
            .mount(server)
            .await;
        Mock::given(path_regex(r"^/api/v4/runners(/verify|/managers)?$"))
            .respond_with(RunnerApi(self.clone()))
            .mount(server)
            .await;
    }
}

/// The runner API as GitLab answers it to a runner token (the agent's side): a token of an
/// existing runner is verified (200) and deletes its runner (204); any other token is 403.
struct RunnerApi(GitLab);

impl Respond for RunnerApi {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let token = body["token"].as_str().unwrap_or("");
        let mut s = self.0.0.lock().unwrap();
        let id = s
            .runners
            .iter()
            .find(|(_, (_, t))| t == token)
            .map(|(id, _)| *id);
        let forbidden =
            || ResponseTemplate::new(403).set_body_json(json!({"message": "403 Forbidden"}));
        match (req.method.as_str(), req.url.path(), id) {
            ("POST", "/api/v4/runners/verify", Some(id)) => {
                s.verified.push(token.to_string());
                ResponseTemplate::new(200)
                    .set_body_json(json!({"id": id, "token": token, "token_expires_at": null}))
            }
            ("DELETE", "/api/v4/runners", Some(id)) => {
                s.runners.remove(&id);
                s.deleted_by_token.push(id);
                ResponseTemplate::new(204)
            }
            ("DELETE", "/api/v4/runners/managers", Some(_)) => {
                s.manager_deletes += 1;
                ResponseTemplate::new(204)
            }
            _ => forbidden(),
        }
    }
}

fn gitlab_authorized(req: &Request) -> bool {
    req.headers
        .get("private-token")
        .and_then(|v| v.to_str().ok())
        == Some(ACCESS_TOKEN)
}

fn unauthorized() -> ResponseTemplate {
    ResponseTemplate::new(401).set_body_json(json!({"message": "401 Unauthorized"}))
}

struct Creates(GitLab);

impl Respond for Creates {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !gitlab_authorized(req) {
            return unauthorized();
        }
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let mut s = self.0.0.lock().unwrap();
        s.creates += 1;
        s.create_times.push(std::time::Instant::now());
        s.bodies.push(body.clone());
        let step = s.script.pop_front().unwrap_or(Create::Ok);
        let create = |s: &mut GitLabState| {
            s.next_id += 1;
            let id = s.next_id;
            let token = format!("glrt-{id:03}Jq7WmZ4xKv9Tb2Nc{id:03}");
            s.minted.push(token.clone());
            s.runners.insert(
                id,
                (
                    body["description"].as_str().unwrap_or("").into(),
                    token.clone(),
                ),
            );
            ResponseTemplate::new(201)
                .set_body_json(json!({"id": id, "token": token, "token_expires_at": null}))
        };
        match step {
            Create::Ok => create(&mut s),
            Create::Throttled => ResponseTemplate::new(429)
                .insert_header("Retry-After", "1")
                .set_body_string("Retry later\n"),
            Create::ThrottledNoWait => ResponseTemplate::new(429)
                .insert_header("Retry-After", "0")
                .set_body_string("Retry later\n"),
            Create::Fails => ResponseTemplate::new(500)
                .set_body_json(json!({"message": "500 Internal Server Error"})),
            Create::CreatedAnswerLost => {
                create(&mut s);
                ResponseTemplate::new(502).set_body_string("<html>Bad Gateway</html>")
            }
            Create::CreatedSlowly(delay) => create(&mut s).set_delay(delay),
        }
    }
}

struct Lists(GitLab);

impl Respond for Lists {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !gitlab_authorized(req) {
            return unauthorized();
        }
        let s = self.0.0.lock().unwrap();
        let page: usize = req
            .url
            .query_pairs()
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(1);
        let mut all: Vec<(&u64, &(String, String))> = s.runners.iter().collect();
        all.sort_by_key(|(id, _)| **id);
        let size = if s.page_size == 0 { 2 } else { s.page_size };
        let items: Vec<Value> = all
            .iter()
            .skip((page - 1) * size)
            .take(size)
            .map(|(id, (d, _))| json!({"id": id, "description": d, "runner_type": "group_type", "paused": false, "status": "online"}))
            .collect();
        let next = if page * size < all.len() {
            (page + 1).to_string()
        } else {
            String::new()
        };
        ResponseTemplate::new(200)
            .insert_header("X-Next-Page", next.as_str())
            .set_body_json(items)
    }
}

struct Deletes(GitLab);

impl Respond for Deletes {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        if !gitlab_authorized(req) {
            return unauthorized();
        }
        let id: u64 = req.url.path().rsplit('/').next().unwrap().parse().unwrap();
        let mut s = self.0.0.lock().unwrap();
        s.deletes.push(id);
        match s.runners.remove(&id) {
            Some(_) => ResponseTemplate::new(204),
            None => ResponseTemplate::new(404).set_body_json(json!({"message": "404 Not found"})),
        }
    }
}

// ---------------------------------------------------------------- the harness

pub struct Harness {
    pub dir: TempDir,
    pub kube_server: MockServer,
    pub gitlab_server: MockServer,
    pub cluster: Cluster,
    pub gitlab: GitLab,
    pub broker: Option<Child>,
    pub url: String,
    starts: usize,
    pub http: reqwest::Client,
}

impl Harness {
    pub async fn new() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("access-token"), format!("{ACCESS_TOKEN}\n")).unwrap();
        std::fs::write(dir.path().join("kube-token"), BROKER_KUBE_TOKEN).unwrap();
        let h = Harness {
            dir,
            kube_server: MockServer::start().await,
            gitlab_server: MockServer::start().await,
            cluster: Cluster::default(),
            gitlab: GitLab::default(),
            broker: None,
            url: String::new(),
            starts: 0,
            http: reqwest::Client::new(),
        };
        h.cluster.mount(&h.kube_server).await;
        h.gitlab.mount(&h.gitlab_server).await;
        h
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--listen",
            "127.0.0.1:0",
            "--namespace",
            NAMESPACE,
            "--vm-selector",
            "app=ci-runner",
            "--vm-service-account",
            VM_ACCOUNT,
            "--kube-api-url",
            &self.kube_server.uri(),
            "--kube-ca-file",
            "/nonexistent/ca.crt",
            "--gitlab-url",
            &self.gitlab_server.uri(),
            "--group-id",
            &GROUP_ID.to_string(),
            "--tag-list",
            "nixos,kubevirt",
            "--run-untagged",
            "false",
            "--maximum-timeout",
            "3600",
        ])
        .arg("--kube-token-file")
        .arg(self.path("kube-token"))
        .arg("--access-token-file")
        .arg(self.path("access-token"))
        .args(extra)
        .env_clear()
        // Defaults a test may override with a flag (a flag beats its variable).
        .env("BROKER_RUNNER_TYPE", "group_type")
        .env("BROKER_REQUEST_TIMEOUT", "2s")
        .env("BROKER_MINT_DEADLINE", "8s")
        .env("BROKER_CLAIM_STALE_AFTER", "12s")
        .env("BROKER_REAP_INTERVAL", "1s")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
        cmd
    }

    pub fn log_path(&self, n: usize) -> PathBuf {
        self.path(&format!("broker-{n}.log"))
    }

    /// Every log of every broker started so far.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| std::fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect()
    }

    /// Starts the broker and waits until it listens.
    pub async fn start(&mut self, extra: &[&str]) {
        self.starts += 1;
        let log = self.log_path(self.starts);
        let child = self
            .command(extra)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.broker = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(rest) = text.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap();
                self.url = format!("http://{addr}");
                return;
            }
            if let Some(status) = self.broker.as_mut().unwrap().try_wait().unwrap() {
                panic!("the broker exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "the broker did not listen:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: a broker that dies mid-flight, as on a node failure.
    pub async fn kill(&mut self) {
        let mut child = self.broker.take().unwrap();
        child.kill().await.unwrap();
    }

    /// A VM's request: (status, JSON body).
    pub async fn ask(&self, token: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/v1/runner", self.url))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A running virt-launcher pod of the pool; returns (token, pod name).
    pub fn vm(&self, name: &str) -> (String, String) {
        self.cluster
            .add_pod(NAMESPACE, name, true, json!({"app": "ci-runner"}))
    }

    pub async fn wait_until(&self, what: &str, cond: impl Fn(&Harness) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !cond(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {what}; logs:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// No secret, whole, in any broker log: the access token, every minted runner token, every
    /// pod token, the broker's own Kubernetes token.
    pub fn assert_no_secrets_logged(&self) {
        let logs = self.logs();
        let mut secrets = vec![ACCESS_TOKEN.to_string(), BROKER_KUBE_TOKEN.to_string()];
        secrets.extend(self.cluster.0.lock().unwrap().tokens.keys().cloned());
        let g = self.gitlab.0.lock().unwrap();
        secrets.extend(g.minted.iter().cloned());
        for s in secrets {
            assert!(
                !logs.contains(&s),
                "a secret ({}…) is in the logs:\n{logs}",
                &s[..6]
            );
            // Nor its secret part beyond the masking rule's last four characters.
            let middle = &s[s.len() / 2 - 3..s.len() / 2 + 3];
            assert!(
                !logs.contains(middle),
                "part of a secret is in the logs:\n{logs}"
            );
        }
    }
}
