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

/// How one run starts the agent.
#[derive(Clone, Copy, PartialEq)]
struct Setup {
    /// `--console off` instead of the harness's console file.
    console_off: bool,
    /// The agent and everything it starts pinned to CPU 0, as on a one-vCPU VM.
    one_cpu: bool,
}

async fn one_run(setup: Setup) -> Run {
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
    if setup.console_off {
        cmd.env("GITLAB_RUNNER_VM_CONSOLE", "off");
    }
    if setup.one_cpu {
        // SAFETY: only a system call between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut cpus = nix::sched::CpuSet::new();
                cpus.set(0)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)?;
                Ok(())
            });
        }
    }
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
    let size = std::fs::metadata(BIN).unwrap().len();
    println!("| Measure ({runs} runs each) | Median | Max | Target |");
    println!("|---|---|---|---|");
    let mut peak = 0;
    for one_cpu in [false, true] {
        // Console on and off alternate, so that whatever else the machine does weighs on both.
        let mut on = Vec::new();
        let mut off = Vec::new();
        for _ in 0..runs {
            for console_off in [false, true] {
                let run = one_run(Setup {
                    console_off,
                    one_cpu,
                })
                .await;
                peak = peak.max(run.peak_rss_kib);
                if console_off { &mut off } else { &mut on }.push(run);
            }
        }
        let cpus = if one_cpu { "1 CPU" } else { "2 CPUs" };
        let spawn = |runs: &[Run]| runs.iter().map(|r| r.start_to_spawn).collect::<Vec<_>>();
        let (spawn_on, spawn_off) = (spawn(&on), spawn(&off));
        println!(
            "| agent start -> gitlab-runner spawned, {cpus} | {} | {} | < 20 ms |",
            ms(median(spawn_on.clone())),
            ms(*spawn_on.iter().max().unwrap())
        );
        println!(
            "| the same with `--console off`, {cpus} | {} | {} | console on within 25 % ({:.0} %) |",
            ms(median(spawn_off.clone())),
            ms(*spawn_off.iter().max().unwrap()),
            (median(spawn_on).as_secs_f64() / median(spawn_off).as_secs_f64() - 1.0) * 100.0
        );
        let poweroff: Vec<_> = on.iter().map(|r| r.exit_to_poweroff).collect();
        let rtt: Vec<_> = on.iter().map(|r| r.delete_round_trip).collect();
        println!(
            "| gitlab-runner exit -> power-off command started, {cpus} | {} | {} | < 20 ms + 1 round trip (median round trip {}) |",
            ms(median(poweroff.clone())),
            ms(*poweroff.iter().max().unwrap()),
            ms(median(rtt))
        );
    }
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
