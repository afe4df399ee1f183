//! `gitlab-runner-vm facts` and its checked-in copy, `agent/facts.json`, which the NixOS
//! module, the VM test harness and these checks read instead of repeating the agent's flags,
//! defaults, phases and paths. When the agent changes, refresh the copy with
//! `GITLAB_RUNNER_VM_UPDATE_FACTS=1 cargo test -p gitlab-runner-vm --test facts`.

mod common;

use std::process::Command;

use common::BIN;
use serde_json::Value;

const COPY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/facts.json");

fn facts_text() -> String {
    let out = Command::new(BIN).arg("facts").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_checked_in_copy_is_what_the_binary_says() {
    let now = facts_text();
    if std::env::var_os("GITLAB_RUNNER_VM_UPDATE_FACTS").is_some() {
        std::fs::write(COPY, &now).unwrap();
    }
    let copy = std::fs::read_to_string(COPY).unwrap_or_default();
    assert!(
        copy == now,
        "agent/facts.json is out of date: refresh it with \
         GITLAB_RUNNER_VM_UPDATE_FACTS=1 cargo test -p gitlab-runner-vm --test facts \
         and commit it (the NixOS module and tests/vm read it)"
    );
}

#[test]
fn every_phase_the_agent_writes_is_listed() {
    let facts: Value = serde_json::from_str(&facts_text()).unwrap();
    let phases: Vec<&str> = facts["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    // The README's lifecycle names each phase status.json can show.
    let readme = include_str!("../../README.md");
    for phase in &phases {
        assert!(
            readme.contains(&format!("`{phase}`")),
            "README never names the phase `{phase}`"
        );
    }
    assert_eq!(phases.first(), Some(&"waiting-for-config"));
}

/// The console prefix is the facts' alone: a test that writes it out again (instead of
/// `common::console_line`) would go on passing against a copy that the agent no longer prints.
#[test]
fn the_tests_take_the_console_prefix_from_the_facts() {
    let prefix = common::facts()["console_prefix"].as_str().unwrap();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let mut copies = Vec::new();
    for dir in [
        "agent/tests",
        "agent/tests/common",
        "tests/vm",
        "tests/vm/vmtest",
    ] {
        for entry in std::fs::read_dir(format!("{root}/{dir}")).unwrap() {
            let path = entry.unwrap().path();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue; // a directory
            };
            for (n, line) in text.lines().enumerate() {
                if line.contains(&format!("\"{prefix}")) {
                    let name = path.file_name().unwrap().to_string_lossy();
                    copies.push(format!("{dir}/{name}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        copies.is_empty(),
        "the console prefix written out (use console_line(\"...\") in agent/tests, \
         FACTS[\"console_prefix\"] in tests/vm):\n{}",
        copies.join("\n")
    );
}
