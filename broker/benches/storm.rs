//! `cargo bench -p gitlab-runner-vm-broker --bench storm`: N VMs ask the real broker binary at
//! once, each twice (the VM and a replay of its token), against the fake Kubernetes API and
//! fake GitLab of the tests (in-process wiremock on loopback, so the times are the broker's and
//! the fakes' together, not a cluster's). Counts runners created, refused and left after the
//! pods are gone; reports the time per request and until the reaper has deleted every runner.
//! Asserts the counts, never a time. Under `cargo test` it runs once with 10 VMs.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench = args.iter().any(|a| a == "--bench");
    let vms: usize = args
        .iter()
        .position(|a| a == "--vms")
        .and_then(|i| args.get(i + 1))
        .or(std::env::var("STORM_VMS").ok().as_ref())
        .map(|v| v.parse().expect("--vms wants a whole number"))
        .unwrap_or(if bench { 200 } else { 10 });

    let mut h = Harness::new().await;
    h.gitlab.0.lock().unwrap().page_size = 100;
    h.start(&[
        "--reap-interval",
        "2s",
        "--request-timeout",
        "10s",
        "--mint-deadline",
        "30s",
        "--claim-stale-after",
        "60s",
    ])
    .await;
    let tokens: Vec<(String, String)> = (0..vms).map(|i| h.vm(&format!("runner-{i}"))).collect();

    let started = Instant::now();
    let mut asks = Vec::new();
    for (token, _) in tokens.iter().chain(tokens.iter()) {
        let http = h.http.clone();
        let url = format!("{}/v1/runner", h.url);
        let token = token.clone();
        asks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = http
                .post(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("the broker answers");
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["runner_id"].as_u64(), t.elapsed())
        }));
    }
    let mut answers = Vec::new();
    for a in asks {
        answers.push(a.await.unwrap());
    }
    let storm = started.elapsed();

    let created: Vec<u64> = answers
        .iter()
        .filter_map(|(s, id, _)| if *s == 201 { *id } else { None })
        .collect();
    let refused = answers.iter().filter(|(s, _, _)| *s == 409).count();
    let other: Vec<u16> = answers
        .iter()
        .map(|(s, _, _)| *s)
        .filter(|s| *s != 201 && *s != 409)
        .collect();
    let distinct: HashSet<u64> = created.iter().copied().collect();
    let in_gitlab = h.gitlab.runner_count();
    let granted: HashSet<u64> = tokens
        .iter()
        .filter_map(|(_, pod)| h.cluster.grant(pod).and_then(|g| g["runner_id"].as_u64()))
        .collect();

    let mut times: Vec<Duration> = answers.iter().map(|(_, _, t)| *t).collect();
    times.sort();

    // The VMs end without deleting their runners (hard power-off): the reaper must.
    let ended = Instant::now();
    for (_, pod) in &tokens {
        h.cluster.delete_pod(pod);
    }
    let reap_deadline = Instant::now() + Duration::from_secs(120);
    while h.gitlab.runner_count() > 0 && Instant::now() < reap_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reaped = ended.elapsed();
    let left = h.gitlab.runner_count();

    println!(
        "| VMs | Requests | Runners created | Refused (replays) | Other answers | Runners left after the pods end | Storm | Per request p50 / p95 / max | All reaped after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {vms} | {} | {} | {refused} | {} | {left} | {:.2} s | {:.0} / {:.0} / {:.0} ms | {:.1} s |",
        answers.len(),
        created.len(),
        other.len(),
        storm.as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.95).as_secs_f64() * 1e3,
        times.last().unwrap().as_secs_f64() * 1e3,
        reaped.as_secs_f64(),
    );
    assert_eq!(created.len(), vms, "one runner per VM");
    assert_eq!(distinct.len(), vms, "no runner handed out twice");
    assert_eq!(in_gitlab, vms, "no runner created twice");
    assert_eq!(granted, distinct, "every pod records the runner it got");
    assert_eq!(refused, vms, "every replay refused");
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert_eq!(left, 0, "the reaper deleted every runner of the ended VMs");
    h.assert_no_secrets_logged();
}
