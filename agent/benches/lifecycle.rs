//! Benchmark of the agent's own overhead, through the real (release) binary against a fake
//! GitLab on loopback:
//! - agent start -> gitlab-runner spawned (target: under 20 ms);
//! - gitlab-runner exit -> power-off command started (target: under 20 ms plus one GitLab round
//!   trip, the manager deletion);
//! - the agent's peak resident memory while a job runs (target: under 8 MiB);
//! - the stripped release binary's size (target: under 8 MiB).
//!
//! Run with `cargo bench`; prints a Markdown table for BENCHMARKS.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::json;

const RUNS: usize = 20;

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn read_ns(h: &Harness, name: &str) -> u128 {
    h.read(name)
        .unwrap_or_default()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{name} missing; log:\n{}", h.log()))
}

fn vm_hwm_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

struct Run {
    start_to_spawn: Duration,
    exit_to_poweroff: Duration,
    delete_round_trip: Duration,
    peak_rss_kib: u64,
}

async fn one_run() -> Run {
    let mut h = Harness::new().await;
    h.mount_glrt_happy_path().await;
    h.write_config(json!({"token": TOKEN}));
    let dir = h.dir.path().display().to_string();
    // The fake gitlab-runner stamps its start, "runs a job" for 1 s, stamps its exit.
    let runner = h.path("gitlab-runner");
    std::fs::write(
        &runner,
        format!("#!/bin/sh\ndate +%s%N > {dir}/spawned\nsleep 1\ndate +%s%N > {dir}/exited\n"),
    )
    .unwrap();
    std::fs::set_permissions(&runner, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = h.command(
        &runner,
        &[
            "--poweroff-command",
            &format!("date +%s%N > {dir}/poweroff-started"),
        ],
    );
    let started_ns = now_ns();
    h.agent = Some(cmd.spawn().unwrap());
    let pid = h.agent_pid();

    // Sample the high-water mark while the job runs.
    let mut peak = 0;
    let deadline = Instant::now() + PATIENCE;
    while h.read("exited").is_none() && Instant::now() < deadline {
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(kib) = vm_hwm_kib(pid) {
        peak = peak.max(kib);
    }
    assert!(h.wait_exit().await.success(), "{}", h.log());

    // One loopback round trip to the fake GitLab, as the deletion makes it.
    let client = reqwest::Client::new();
    let t = Instant::now();
    client
        .delete(format!("{}/api/v4/runners/managers", h.server.uri()))
        .json(&json!({"token": "x", "system_id": "r_000000000000"}))
        .send()
        .await
        .unwrap();
    let delete_round_trip = t.elapsed();

    Run {
        start_to_spawn: Duration::from_nanos((read_ns(&h, "spawned") - started_ns) as u64),
        exit_to_poweroff: Duration::from_nanos(
            (read_ns(&h, "poweroff-started") - read_ns(&h, "exited")) as u64,
        ),
        delete_round_trip,
        peak_rss_kib: peak,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs one quick pass.
    let runs = if std::env::args().any(|a| a == "--bench") {
        RUNS
    } else {
        1
    };
    let mut results = Vec::new();
    for _ in 0..runs {
        results.push(one_run().await);
    }
    let size = std::fs::metadata(BIN).unwrap().len();
    let spawn: Vec<_> = results.iter().map(|r| r.start_to_spawn).collect();
    let poweroff: Vec<_> = results.iter().map(|r| r.exit_to_poweroff).collect();
    let rtt: Vec<_> = results.iter().map(|r| r.delete_round_trip).collect();
    let peak = results.iter().map(|r| r.peak_rss_kib).max().unwrap();
    println!("| Measure ({runs} runs) | Median | Max | Target |");
    println!("|---|---|---|---|");
    println!(
        "| agent start -> gitlab-runner spawned | {} | {} | < 20 ms |",
        ms(median(spawn.clone())),
        ms(*spawn.iter().max().unwrap())
    );
    println!(
        "| gitlab-runner exit -> power-off command started | {} | {} | < 20 ms + 1 round trip (median round trip {}) |",
        ms(median(poweroff.clone())),
        ms(*poweroff.iter().max().unwrap()),
        ms(median(rtt))
    );
    println!(
        "| agent peak resident memory (VmHWM) during a job | | {:.2} MiB | < 8 MiB |",
        peak as f64 / 1024.0
    );
    println!(
        "| release binary size ({}) | | {:.2} MiB | < 8 MiB |",
        BIN,
        size as f64 / (1024.0 * 1024.0)
    );
}
