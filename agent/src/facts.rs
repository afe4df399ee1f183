//! `gitlab-runner-vm facts`: what the agent is, as JSON, written once here and read by
//! everything that must agree with it: the NixOS module (its settings' defaults, the
//! config-source choices, the unit's stop timeout), the VM test harness (the unit's
//! environment) and the checks on the docs. A checked-in copy (`agent/facts.json`) is kept
//! current by a test, so a flag renamed or a default changed here shows up there at once.

use clap::{ArgAction, CommandFactory, ValueEnum};
use serde_json::{Map, Value, json};

use crate::cli::{Cli, SECONDS};
use crate::lifecycle::Phase;
use crate::metadata::{ConfigSource, Platform};
use crate::paths::DEFAULT_STATE_DIR;

/// What the unit's TimeoutStopSec adds to `--stop-timeout` + `--deregister-timeout`: the agent's
/// own steps around them and the power-off command, so that systemd never kills a teardown.
pub const UNIT_STOP_MARGIN_SECONDS: u64 = 20;

pub fn facts() -> Value {
    let names = |values: &[clap::builder::PossibleValue]| -> Vec<String> {
        values.iter().map(|v| v.get_name().to_string()).collect()
    };
    let config_sources: Vec<_> = ConfigSource::value_variants()
        .iter()
        .filter_map(|s| s.to_possible_value())
        .collect();
    let platforms: Vec<_> = Platform::value_variants()
        .iter()
        .filter_map(|p| p.to_possible_value())
        .collect();
    json!({
        "program": "gitlab-runner-vm",
        "run_flags": run_flags(),
        "config_sources": names(&config_sources),
        "platforms": names(&platforms),
        "phases": Phase::all().map(Phase::as_str).collect::<Vec<_>>(),
        "state_dir": DEFAULT_STATE_DIR,
        "console_prefix": crate::console::PREFIX,
        "unit_stop_margin_seconds": UNIT_STOP_MARGIN_SECONDS,
    })
}

/// `run`'s flags by name (without `--`): environment variable, kind, default, choices, help.
fn run_flags() -> Value {
    let mut cli = Cli::command();
    // Built, as parsing builds it: a switch's default (`false`) exists only then.
    cli.build();
    let run = cli
        .find_subcommand("run")
        .expect("the run subcommand exists");
    let mut flags = Map::new();
    for arg in run.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if long == "help" || long == "version" {
            continue;
        }
        let default = arg
            .get_default_values()
            .first()
            .map(|d| d.to_string_lossy().into_owned());
        let choices: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| v.get_name().to_string())
            .collect();
        let kind = if matches!(arg.get_action(), ArgAction::SetTrue) {
            "switch"
        } else if arg
            .get_value_names()
            .is_some_and(|names| names.iter().any(|n| n.as_str() == SECONDS))
        {
            "seconds"
        } else if !choices.is_empty() {
            "choice"
        } else {
            "text"
        };
        let default = match (kind, default) {
            (_, None) => Value::Null,
            ("switch", Some(d)) => Value::Bool(d == "true"),
            ("seconds", Some(d)) => d
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(d)),
            (_, Some(d)) => Value::String(d),
        };
        let mut flag = json!({
            "env": arg.get_env().map(|e| e.to_string_lossy().into_owned()),
            "kind": kind,
            "default": default,
            "help": arg.get_help().map(|h| h.to_string()).unwrap_or_default(),
        });
        if kind == "choice" {
            flag["choices"] = json!(choices);
        }
        flags.insert(long.to_string(), flag);
    }
    Value::Object(flags)
}

pub fn print() -> std::process::ExitCode {
    use std::io::Write;
    let text = serde_json::to_string_pretty(&facts()).expect("facts serialise");
    // A reader that stops early (`| head`) is no error of the agent's.
    match writeln!(std::io::stdout().lock(), "{text}") {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::ExitCode::SUCCESS,
        Err(e) => {
            complain!("error: cannot write the facts: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_flag_has_its_environment_variable_and_a_kind() {
        let facts = facts();
        let flags = facts["run_flags"].as_object().unwrap();
        assert!(flags.len() > 20, "{flags:?}");
        for (name, flag) in flags {
            let env = format!("GITLAB_RUNNER_VM_{}", name.to_uppercase().replace('-', "_"));
            assert_eq!(flag["env"], env, "{name}");
            assert!(
                !flag["help"].as_str().unwrap().is_empty(),
                "{name} has no help"
            );
        }
        assert_eq!(flags["stop-timeout"]["kind"], "seconds");
        assert_eq!(flags["stop-timeout"]["default"], 40);
        assert_eq!(flags["no-poweroff"]["kind"], "switch");
        assert_eq!(flags["no-poweroff"]["default"], false);
        assert_eq!(flags["config-source"]["kind"], "choice");
        assert_eq!(flags["config"]["kind"], "text");
        assert_eq!(flags["job-user"]["default"], Value::Null);
    }

    #[test]
    fn choices_are_the_command_lines() {
        let facts = facts();
        assert_eq!(
            facts["run_flags"]["config-source"]["choices"],
            facts["config_sources"]
        );
        assert!(
            facts["config_sources"]
                .as_array()
                .unwrap()
                .contains(&json!("digitalocean"))
        );
        assert_eq!(facts["platforms"], json!(["aws", "gce", "digitalocean"]));
    }
}
