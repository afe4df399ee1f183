//! One runner per VM boot, through the real broker binary: who gets one, who is refused and why,
//! and what GitLab failures leave behind (nothing, and never a second runner).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gets_one_runner_for_its_boot_and_a_replayed_token_gets_nothing() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let (token, pod) = h.vm("runner-3");
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["url"], h.gitlab_server.uri());
    assert!(
        body["token"].as_str().unwrap().starts_with("glrt-"),
        "{body}"
    );
    assert!(
        body.as_object().unwrap().contains_key("token_expires_at"),
        "{body}"
    );
    let id = body["runner_id"].as_u64().unwrap();
    assert_eq!(h.gitlab.runner_ids(), vec![id]);

    // What GitLab was asked for: the operator's settings and a description naming VM and pod.
    let sent = h.gitlab.0.lock().unwrap().bodies[0].clone();
    assert_eq!(sent["runner_type"], "group_type");
    assert_eq!(sent["group_id"], GROUP_ID);
    assert_eq!(sent["tag_list"], "nixos,kubevirt");
    assert_eq!(sent["run_untagged"], false);
    assert_eq!(sent["locked"], true);
    assert_eq!(sent["access_level"], "not_protected");
    assert_eq!(sent["maximum_timeout"], 3600);
    let uid = h.cluster.uid(&pod);
    assert_eq!(
        sent["description"],
        format!("gitlab-runner-vm-broker ci/runner-3 pod {uid}")
    );
    // The grant is recorded on the pod, where every replica reads it.
    let grant = h.cluster.grant(&pod).unwrap();
    assert_eq!(grant["state"], "granted");
    assert_eq!(grant["runner_id"], id);

    // The same token again (a job that read the serviceAccount disk, a rebooted VM): refused.
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("already got its runner"),
        "{body}"
    );
    assert_eq!(h.gitlab.runner_count(), 1);
    assert!(
        !body.to_string().contains("glrt-"),
        "a refusal carries no token: {body}"
    );

    // A second VM gets its own.
    let (token2, _) = h.vm("runner-4");
    let (status, body2) = h.ask(&token2).await;
    assert_eq!(status, 201, "{body2}");
    assert_ne!(body2["token"], body["token"]);
    assert_eq!(h.gitlab.runner_count(), 2);
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_for_one_pod_to_two_replicas_create_one_runner() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let first = h.url.clone();
    let first_child = h.broker.take();
    h.start(&[]).await;
    let second = h.url.clone();
    let (token, pod) = h.vm("runner-0");
    let mut asks = Vec::new();
    for i in 0..12 {
        let url = if i % 2 == 0 { &first } else { &second };
        let request = h
            .http
            .post(format!("{url}/v1/runner"))
            .bearer_auth(&token)
            .send();
        asks.push(request);
    }
    let answers = futures_join(asks).await;
    let won: Vec<_> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(won.len(), 1, "exactly one request wins: {answers:?}");
    for (s, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(*s, 409, "{body}");
        let e = body["error"].as_str().unwrap();
        assert!(
            e.contains("being created") || e.contains("already got"),
            "{e}"
        );
    }
    assert_eq!(h.gitlab.runner_count(), 1);
    assert_eq!(h.cluster.grant(&pod).unwrap()["state"], "granted");
    h.assert_no_secrets_logged();
    drop(first_child);
}

async fn futures_join(
    requests: Vec<impl Future<Output = reqwest::Result<reqwest::Response>> + Send + 'static>,
) -> Vec<(u16, serde_json::Value)> {
    let handles: Vec<_> = requests
        .into_iter()
        .map(|r| {
            tokio::spawn(async move {
                let r = r.await.unwrap();
                let s = r.status().as_u16();
                (s, r.json().await.unwrap_or(serde_json::Value::Null))
            })
        })
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_updating_the_pod_meanwhile_costs_a_reread_not_the_vms_runner() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let (token, pod) = h.vm("runner-6");
    // The claim's patch and then the grant's each meet a status update (409 Conflict).
    h.cluster.0.lock().unwrap().kubelet_races = 2;
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 201, "{body}\n{}", h.logs());
    assert_eq!(
        h.cluster.0.lock().unwrap().conflicts,
        2,
        "both races happened"
    );
    assert_eq!(h.gitlab.runner_count(), 1);
    assert_eq!(
        h.cluster.grant(&pod).unwrap()["runner_id"],
        body["runner_id"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_that_are_not_a_pool_vms_own_are_refused_with_their_cause() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let refused = |status: u16, body: &serde_json::Value, cause: &str| {
        let e = body["error"].as_str().unwrap_or_default().to_string();
        assert!(e.contains(cause), "want {cause:?} in {status}: {body}");
        assert!((400..500).contains(&status), "{status} {body}");
    };

    // A deleted pod: its bound token no longer reviews as authenticated.
    let (token, pod) = h.vm("runner-gone");
    h.cluster.delete_pod(&pod);
    let (s, b) = h.ask(&token).await;
    refused(s, &b, "not valid");
    assert_eq!(s, 401);

    // A pod outside the broker's selector (another pool in the same namespace).
    let (token, _) = h
        .cluster
        .add_pod(NAMESPACE, "web-0", true, json!({"app": "web"}));
    let (s, b) = h.ask(&token).await;
    refused(s, &b, "--vm-selector");

    // A plain pod, not a virt-launcher, even with the pool's labels.
    let (token, _) = h
        .cluster
        .add_pod(NAMESPACE, "plain", false, json!({"app": "ci-runner"}));
    let (s, b) = h.ask(&token).await;
    refused(s, &b, "not a virt-launcher pod");

    // A VM of another namespace.
    let (token, _) = h
        .cluster
        .add_pod("elsewhere", "runner-9", true, json!({"app": "ci-runner"}));
    let (s, b) = h.ask(&token).await;
    refused(s, &b, "namespace \"elsewhere\"");

    // A finished VM's pod (its token still valid for a moment).
    let (token, pod) = h.vm("runner-done");
    h.cluster.set_phase(&pod, "Succeeded");
    let (s, b) = h.ask(&token).await;
    refused(s, &b, "not running");

    // Garbage, and no token at all.
    let (s, b) = h.ask("not-a-token").await;
    refused(s, &b, "not valid");
    let r = h
        .http
        .post(format!("{}/v1/runner", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.text().await.unwrap().contains("Authorization: Bearer"));

    assert_eq!(h.gitlab.runner_count(), 0);
    assert_eq!(h.gitlab.0.lock().unwrap().creates, 0);
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_lost_answers_cost_time_never_a_second_runner() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    // 429, then a 500 after creating (the answer lost at a proxy), then a create whose answer
    // comes after the broker's 2 s request timeout, then success.
    h.gitlab.script(&[
        Create::Throttled,
        Create::CreatedAnswerLost,
        Create::CreatedSlowly(Duration::from_secs(4)),
        Create::Ok,
    ]);
    let (token, pod) = h.vm("runner-1");
    // A kubelet status update between claim and grant: a new resourceVersion to cope with.
    h.cluster.touch(&pod);
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 201, "{body}\n{}", h.logs());
    let id = body["runner_id"].as_u64().unwrap();
    assert_eq!(h.gitlab.0.lock().unwrap().creates, 4);
    assert_eq!(
        h.gitlab.runner_ids(),
        vec![id],
        "the lost runners were found again and deleted"
    );
    assert_eq!(h.cluster.grant(&pod).unwrap()["runner_id"], id);
    h.assert_no_secrets_logged();
}

/// `Retry-After: 0` (a proxy's, or GitLab's at a window's edge) is no tight loop: the broker
/// waits at least a second between throttled creates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_that_says_retry_now_is_not_a_tight_loop() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    h.gitlab
        .script(&[Create::ThrottledNoWait, Create::ThrottledNoWait, Create::Ok]);
    let (token, _pod) = h.vm("runner-3");
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 201, "{body}\n{}", h.logs());
    let times = h.gitlab.0.lock().unwrap().create_times.clone();
    assert_eq!(times.len(), 3, "{}", h.logs());
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(990), "creates {gap:?} apart");
    }
    assert_eq!(h.gitlab.runner_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_gitlab_keeps_failing_nothing_is_left_and_the_vm_may_ask_again() {
    let mut h = Harness::new().await;
    h.start(&["--mint-deadline", "3s"]).await;
    h.gitlab.script(&[
        Create::CreatedAnswerLost,
        Create::Fails,
        Create::CreatedAnswerLost,
        Create::Fails,
        Create::Fails,
        Create::Fails,
    ]);
    let (token, pod) = h.vm("runner-2");
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 503, "{body}");
    let e = body["error"].as_str().unwrap();
    assert!(
        e.contains("could not create the runner") && e.contains("try again"),
        "{e}"
    );
    assert_eq!(h.gitlab.runner_count(), 0, "nothing left in GitLab");
    assert_eq!(h.cluster.grant(&pod), None, "the claim was released");

    // GitLab is back: the VM's retry gets exactly one runner.
    h.gitlab.0.lock().unwrap().script.clear();
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(h.gitlab.runner_count(), 1);
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_refusal_is_reported_without_the_access_token() {
    let mut h = Harness::new().await;
    std::fs::write(h.path("access-token"), "glpat-Wr0ngT0kenZz9Qx4Vb7Nm2").unwrap();
    h.start(&[]).await;
    let (token, pod) = h.vm("runner-5");
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("401"), "{body}");
    assert!(!body.to_string().contains("Wr0ngT0ken"), "{body}");
    assert!(!h.logs().contains("Wr0ngT0ken"), "{}", h.logs());
    assert_eq!(h.cluster.grant(&pod), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_name_the_flag_to_fix() {
    let h = Harness::new().await;
    let out = h
        .command(&["--runner-type", "project_type"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--project-id"));
    let out = h
        .command(&["--claim-stale-after", "5s"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--claim-stale-after must exceed"));
    std::fs::write(h.path("access-token"), "").unwrap();
    let out = h.command(&[]).output().await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is empty"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_a_clear_refusal_and_the_broker_carries_on() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    // Odd bytes in the token header: not UTF-8, or not Bearer.
    let raw = reqwest::header::HeaderValue::from_bytes(b"Bearer \xff\xfe").unwrap();
    let r = h
        .http
        .post(format!("{}/v1/runner", h.url))
        .header("authorization", raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = h
        .http
        .post(format!("{}/v1/runner", h.url))
        .header("authorization", "Basic dXNlcjpwYXNz")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A token far larger than any real one: refused before it reaches the API server.
    let (s, _) = h.ask(&"x".repeat(20 * 1024)).await;
    assert_eq!(s, 401);
    // Headers beyond the server's buffer: the connection is refused, the broker lives on.
    let huge = h
        .http
        .post(format!("{}/v1/runner", h.url))
        .header("x-padding", "y".repeat(200 * 1024))
        .send()
        .await;
    assert!(huge.is_err() || huge.unwrap().status().is_client_error());
    // Wrong method and path.
    let r = h
        .http
        .get(format!("{}/v1/runner", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    let r = h.http.get(format!("{}/admin", h.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = h
        .http
        .get(format!("{}/healthz", h.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // None of it reached the API server.
    assert_eq!(h.cluster.0.lock().unwrap().reviews, 0);
    // After all that, a real VM still gets its runner.
    let (token, _) = h.vm("runner-8");
    assert_eq!(h.ask(&token).await.0, 201);
    assert_eq!(h.gitlab.runner_count(), 1);
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_broker_cleanly() {
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let mut child = h.broker.take().unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", h.logs());
    assert!(h.logs().contains("SIGTERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_trickles_its_headers_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut h = Harness::new().await;
    h.start(&[]).await;
    let addr = h.url.trim_start_matches("http://").to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"POST /v1/runner HTTP/1.1\r\nHost: broker\r\n")
        .await
        .unwrap();
    // The broker closes it after its 10 s header timeout; 25 s is generous, and shorter than
    // hyper's own default of 30 s, so the test fails if the broker's timeout is lost.
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(25), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the broker kept a half-sent request open");
    let (token, _) = h.vm("runner-9");
    assert_eq!(h.ask(&token).await.0, 201);
}
