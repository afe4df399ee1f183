//! The canonical unit, `agent/dist/gitlab-runner-vm.service`, agrees with the agent: what it
//! waits for, how it is stopped, where its state lives; and systemd accepts it.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::{BIN, facts};

const UNIT: &str = include_str!("../dist/gitlab-runner-vm.service");

fn settings() -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        map.entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    map
}

fn one(key: &str) -> String {
    let s = settings();
    let values = s.get(key).unwrap_or_else(|| panic!("{key} missing"));
    assert_eq!(values.len(), 1, "{key} set more than once");
    values[0].clone()
}

/// The default of a `run` flag in seconds.
fn default_of(flag: &str) -> u64 {
    facts()["run_flags"][flag]["default"]
        .as_u64()
        .unwrap_or_else(|| panic!("{flag} has no default in seconds"))
}

fn seconds(value: &str) -> u64 {
    value.trim_end_matches('s').parse().unwrap()
}

#[test]
fn type_notify_with_the_main_process_only() {
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("ExecStart"), "/usr/bin/gitlab-runner-vm run");
}

#[test]
fn ordered_after_the_network_and_the_config_mount() {
    let after = settings()["After"].join(" ");
    assert!(after.contains("network-online.target"));
    // systemd's name for the /runner-info mount unit (systemd-escape -p --suffix=mount).
    assert!(after.contains("runner\\x2dinfo.mount"), "{after}");
    assert_eq!(one("Wants"), "network-online.target");
}

#[test]
fn stop_budget_covers_the_agents_own_stop_and_deregistration() {
    assert_eq!(
        one("KillMode"),
        "mixed",
        "SIGTERM must reach the agent only; it signals gitlab-runner itself"
    );
    let budget = seconds(&one("TimeoutStopSec"));
    let needed = default_of("stop-timeout") + default_of("deregister-timeout");
    let margin = facts()["unit_stop_margin_seconds"].as_u64().unwrap();
    // The NixOS module computes its TimeoutStopSec the same way from the same facts.
    assert_eq!(
        budget,
        needed + margin,
        "TimeoutStopSec={budget} s must be stop + deregistration ({needed} s) + the margin ({margin} s)"
    );
    assert_eq!(
        one("TimeoutStartSec"),
        "infinity",
        "the agent bounds its own start"
    );
}

#[test]
fn state_survives_a_restart_for_crash_safety() {
    let state_dir = facts()["state_dir"].as_str().unwrap().to_owned();
    assert_eq!(
        format!("/run/{}", one("RuntimeDirectory")),
        state_dir,
        "the default --state-dir is the unit's runtime directory"
    );
    assert_eq!(one("RuntimeDirectoryPreserve"), "yes");
    assert_eq!(one("Restart"), "on-failure");
}

#[test]
fn no_sandboxing_that_takes_devices_or_mounts_from_jobs() {
    let s = settings();
    for key in [
        "ProtectClock",
        "ProtectKernelLogs",
        "ProtectHostname",
        "ProtectSystem",
        "PrivateDevices",
        "PrivateTmp",
        "NoNewPrivileges",
        "DevicePolicy",
        "DeviceAllow",
    ] {
        assert!(
            !s.contains_key(key),
            "{key} would constrain CI jobs, which run inside this unit"
        );
    }
}

/// `--console` writes /dev/console (root's only), or /dev/kmsg when that cannot be opened: the
/// agent runs as root, and nothing in the unit takes either device away.
#[test]
fn the_agent_may_write_the_console_and_the_kernel_log() {
    let s = settings();
    for key in [
        "User",
        "DynamicUser",
        "PrivateDevices",
        "DevicePolicy",
        "DeviceAllow",
        "ProtectKernelLogs",
        "InaccessiblePaths",
    ] {
        assert!(
            !s.contains_key(key),
            "{key} would keep the agent from the console or the kernel log"
        );
    }
    let help = Command::new(BIN).args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("[default: /dev/console]"), "{text}");
}

/// `systemd-analyze`, or why this machine cannot run it. Missing is a failure, with what to
/// install, everywhere but in the Nix package's build: its sandbox has no systemd, and the unit
/// is checked by tests/run (CI installs systemd with tests/agent/install-deps).
fn systemd_analyze() -> Option<Command> {
    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(out) if out.status.success() => Some(Command::new("systemd-analyze")),
        _ if std::env::var_os("NIX_BUILD_TOP").is_some() => {
            eprintln!("systemd-analyze is not in the Nix build sandbox: unit not verified here");
            None
        }
        Ok(out) => panic!(
            "systemd-analyze --version failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "systemd-analyze cannot be run ({e}): this test verifies the unit with it; install \
             Debian's systemd package (sudo tests/agent/install-deps, or apt-get install systemd)"
        ),
    }
}

#[test]
fn systemd_accepts_the_unit() {
    let Some(mut analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("gitlab-runner-vm.service");
    // The same substitution the Nix package and the VM test make.
    std::fs::write(&unit, UNIT.replace("/usr/bin/gitlab-runner-vm", BIN)).unwrap();
    let out = analyze.arg("verify").arg(&unit).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A missing or non-executable ExecStart (and other hard errors) show in the exit status.
    assert!(
        out.status.success(),
        "systemd-analyze verify exited with {}:\n{stderr}",
        out.status
    );
    // Settings systemd ignores (unknown keys, unparsable values) are only warned about, with
    // the file's name. Ordering dependencies on units this machine lacks (the mount) are fine;
    // anything about this unit's own settings is not.
    let problems: Vec<_> = stderr
        .lines()
        .filter(|l| {
            l.contains("gitlab-runner-vm.service")
                && !l.contains("Failed to create")
                && !l.contains("runner\\x2dinfo.mount")
        })
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{stderr}");
}
