//! A broker restart loses nothing and leaves nothing behind; the reaper deletes the runners of
//! VMs that ended without deleting theirs (a hard power-off, a killed node).

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_deletes_what_a_hard_killed_vm_left_and_nothing_else() {
    let mut h = Harness::new().await;
    let foreign = h.gitlab.add_foreign("laptop of alice");
    let other_ns = h
        .gitlab
        .add_foreign("gitlab-runner-vm-broker other/runner-0 pod 1234");
    h.start(&[]).await;
    let (t1, killed) = h.vm("runner-0");
    let (t2, finished) = h.vm("runner-1");
    let (t3, alive) = h.vm("runner-2");
    for t in [&t1, &t2, &t3] {
        assert_eq!(h.ask(t).await.0, 201);
    }
    let alive_id = h.cluster.grant(&alive).unwrap()["runner_id"]
        .as_u64()
        .unwrap();
    // runner-0's node died (the pod is deleted); runner-1 powered off without deregistering.
    h.cluster.delete_pod(&killed);
    h.cluster.set_phase(&finished, "Failed");
    h.wait_until("the reaper deleted both", |h| h.gitlab.runner_count() == 3)
        .await;
    let mut left = vec![foreign, other_ns, alive_id];
    left.sort();
    assert_eq!(
        h.gitlab.runner_ids(),
        left,
        "the live VM's and others' runners stay"
    );
    let logs = h.logs();
    assert!(logs.contains("its pod is gone"), "{logs}");
    assert!(logs.contains("its pod has finished (Failed)"), "{logs}");
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_broker_reconciles_what_it_missed_while_down() {
    let mut h = Harness::new().await;
    h.start(&["--reap-interval", "1h"]).await;
    let (t1, gone) = h.vm("runner-0");
    let (t2, alive) = h.vm("runner-1");
    assert_eq!(h.ask(&t1).await.0, 201);
    assert_eq!(h.ask(&t2).await.0, 201);
    h.kill().await;
    h.cluster.delete_pod(&gone);
    // Started again with a reaper that would not run for an hour: the pass at start does it.
    h.start(&["--reap-interval", "1h"]).await;
    h.wait_until("the runner of the gone pod is deleted", |h| {
        h.gitlab.runner_count() == 1
    })
    .await;
    assert_eq!(
        h.gitlab.runner_ids(),
        vec![
            h.cluster.grant(&alive).unwrap()["runner_id"]
                .as_u64()
                .unwrap()
        ]
    );
    // And the restart forgot nothing: the alive VM's token is still spent.
    assert_eq!(h.ask(&t2).await.0, 409);
    h.assert_no_secrets_logged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_mid_create_leaves_one_runner_once_the_vm_asks_again() {
    let mut h = Harness::new().await;
    let short = [
        "--request-timeout",
        "1s",
        "--mint-deadline",
        "2s",
        "--claim-stale-after",
        "4s",
        "--reap-interval",
        "1h",
    ];
    h.start(&short).await;
    // GitLab creates the runner but answers late; the broker dies before it hears back.
    h.gitlab
        .script(&[Create::CreatedSlowly(Duration::from_secs(30))]);
    let (token, pod) = h.vm("runner-7");
    let url = h.url.clone();
    let http = h.http.clone();
    let t = token.clone();
    let pending = tokio::spawn(async move {
        http.post(format!("{url}/v1/runner"))
            .bearer_auth(t)
            .send()
            .await
    });
    h.wait_until("GitLab created the runner", |h| {
        h.gitlab.runner_count() == 1
    })
    .await;
    h.kill().await;
    assert!(pending.await.unwrap().is_err(), "the VM's connection broke");
    assert_eq!(h.cluster.grant(&pod).unwrap()["state"], "claimed");

    h.start(&short).await;
    // Right away, the claim is fresh: the VM is told a request is in flight.
    let (status, body) = h.ask(&token).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("being created"),
        "{body}"
    );
    // Once the claim is stale, the VM's retry takes it over: the leftover runner is deleted
    // first, then exactly one runner is created.
    let mut answer = (0, serde_json::Value::Null);
    for _ in 0..100 {
        answer = h.ask(&token).await;
        if answer.0 != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answer.0, 201, "{}", answer.1);
    let id = answer.1["runner_id"].as_u64().unwrap();
    assert_eq!(h.gitlab.runner_ids(), vec![id]);
    assert_eq!(h.cluster.grant(&pod).unwrap()["runner_id"], id);
    h.assert_no_secrets_logged();
}
