//! The command line. Every `run` flag also reads `GITLAB_RUNNER_VM_<FLAG>`, which is how the
//! NixOS module and drop-ins configure the unit without changing ExecStart.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::MAX_SECONDS;
use crate::metadata::{ConfigSource, DEFAULT_DMI_DIR, DEFAULT_METADATA_URL};
use crate::paths::*;
use crate::preemption::WatchPreemption;

/// The value name of every flag that takes whole seconds (`--failure-delay <SECONDS>`), by
/// which `facts` tells their kind.
pub const SECONDS: &str = "SECONDS";

/// The runner's name when runner.json gives none, for `check` and `run` alike: the host name.
pub fn default_runner_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gitlab-runner-vm".into())
}

fn seconds(text: &str) -> Result<u64, String> {
    let value: u64 = text
        .trim()
        .parse()
        .map_err(|_| format!("\"{text}\" is not a whole number of seconds"))?;
    if value > MAX_SECONDS {
        return Err(format!(
            "{value} s is more than the maximum {MAX_SECONDS} s (ten years)"
        ));
    }
    Ok(value)
}

#[derive(Debug, Parser)]
#[command(
    name = "gitlab-runner-vm",
    version,
    about = "Lifecycle agent of a disposable GitLab CI runner VM: register, run N jobs, deregister, power off"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of `run`'s flags in the enum costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole lifecycle (what the systemd unit starts)
    Run(Box<RunArgs>),
    /// Validate runner.json: one line per problem, exit 1 if any is an error
    Check {
        #[arg(long, env = "GITLAB_RUNNER_VM_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show what the agent is doing
    Status {
        #[arg(long, env = "GITLAB_RUNNER_VM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print status.json as it is
        #[arg(long)]
        json: bool,
    },
    /// End a hold: remove the keep file, so the VM powers off
    Release {
        #[arg(long, env = "GITLAB_RUNNER_VM_KEEP_FILE", default_value = DEFAULT_KEEP_FILE)]
        keep_file: PathBuf,
    },
    /// Let the current job finish, take no new one, then tear down (SIGUSR1 to the agent)
    Drain {
        #[arg(long, env = "GITLAB_RUNNER_VM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Write the platform's SSH public keys for a user to <authorized-keys-dir>/<user>
    SshKeys(SshKeysArgs),
    /// Print what the agent is as JSON (flags, environment variables, defaults, config
    /// sources, phases, paths), which the NixOS module and the tests read
    Facts,
    /// Run one stage of a shell job as the job user: gitlab-runner's custom executor calls
    /// this (config.toml's run_exec), not people
    JobExec(crate::runner::job_exec::JobExecArgs),
}

#[derive(Debug, Clone, Args)]
pub struct SshKeysArgs {
    /// The user whose keys are written (on GCE, only the keys given to this user)
    #[arg(long)]
    pub user: String,
    /// Where the keys come from: a platform's metadata service, or auto (the platform
    /// recognised from DMI/SMBIOS); file or no platform recognised: nothing is written
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_CONFIG_SOURCE",
        value_enum,
        default_value = "auto"
    )]
    pub config_source: ConfigSource,
    /// The metadata service's base URL
    #[arg(long, env = "GITLAB_RUNNER_VM_METADATA_URL", default_value = DEFAULT_METADATA_URL)]
    pub metadata_url: String,
    /// Where the DMI/SMBIOS strings that recognise the platform are read
    #[arg(long, env = "GITLAB_RUNNER_VM_DMI_DIR", default_value = DEFAULT_DMI_DIR)]
    pub dmi_dir: PathBuf,
    /// The directory sshd's AuthorizedKeysFile names (/run/ssh-keys/%u)
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_AUTHORIZED_KEYS_DIR",
        default_value = DEFAULT_AUTHORIZED_KEYS_DIR
    )]
    pub authorized_keys_dir: PathBuf,
    /// Seconds for the metadata service to answer, retries included
    #[arg(long, env = "GITLAB_RUNNER_VM_SSH_KEYS_TIMEOUT", value_name = SECONDS, value_parser = seconds, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Path of runner.json, read at boot (and written first when --config-source fetches it)
    #[arg(long, env = "GITLAB_RUNNER_VM_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where runner.json comes from: the file, a platform's metadata service or the broker
    /// (written to --config), or auto (the platform recognised from DMI/SMBIOS, else the file)
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_CONFIG_SOURCE",
        value_enum,
        default_value = "file"
    )]
    pub config_source: ConfigSource,
    /// The metadata service's base URL (all platforms serve it at the link-local address)
    #[arg(long, env = "GITLAB_RUNNER_VM_METADATA_URL", default_value = DEFAULT_METADATA_URL)]
    pub metadata_url: String,
    /// Where the DMI/SMBIOS strings that recognise the platform are read
    #[arg(long, env = "GITLAB_RUNNER_VM_DMI_DIR", default_value = DEFAULT_DMI_DIR)]
    pub dmi_dir: PathBuf,
    /// The broker's base URL (--config-source broker): its Service in the VM's namespace
    #[arg(long, env = "GITLAB_RUNNER_VM_BROKER_URL", default_value = crate::broker::DEFAULT_BROKER_URL)]
    pub broker_url: String,
    /// The pod's service-account token that proves this VM to the broker (--config-source
    /// broker): the `token` file of KubeVirt's serviceAccount disk, as the image mounts it
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_BROKER_TOKEN_FILE",
        default_value = crate::broker::DEFAULT_TOKEN_FILE
    )]
    pub broker_token_file: PathBuf,
    /// Act on the platform's preemption and maintenance notices (drain; abort the job in time
    /// to deregister before the VM goes away): auto is on for aws and gce
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_WATCH_PREEMPTION",
        value_enum,
        default_value = "auto"
    )]
    pub watch_preemption: WatchPreemption,
    /// Where status.json, config.toml and the runner system id live (one boot only)
    #[arg(long, env = "GITLAB_RUNNER_VM_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// While this file exists after the jobs, the VM is kept for debugging
    #[arg(long, env = "GITLAB_RUNNER_VM_KEEP_FILE", default_value = DEFAULT_KEEP_FILE)]
    pub keep_file: PathBuf,
    /// The gitlab-runner program (a path, or a name looked up in PATH)
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_GITLAB_RUNNER",
        default_value = "gitlab-runner"
    )]
    pub gitlab_runner: PathBuf,
    /// The user shell jobs run as, never root (default: the agent's own user); gitlab-runner
    /// itself runs as the agent, which alone can read the runner token
    #[arg(long, alias = "runner-user", env = "GITLAB_RUNNER_VM_JOB_USER")]
    pub job_user: Option<String>,
    /// Put the agent in the sub-cgroup `agent` of its unit's cgroup, gitlab-runner in `runner`
    /// and every shell job's stage in `jobs` (the unit delegates its cgroup), so that a
    /// firewall can tell them apart
    #[arg(long, env = "GITLAB_RUNNER_VM_SEPARATE_CGROUPS")]
    pub separate_cgroups: bool,
    /// The metadata firewall's script: when runner.json's cache uses the instance's identity,
    /// `P allow <unit>/runner` admits gitlab-runner (never the jobs) before registering
    #[arg(long, env = "GITLAB_RUNNER_VM_METADATA_FIREWALL", value_name = "P")]
    pub metadata_firewall: Option<PathBuf>,
    /// Run with /bin/sh -c to power the VM off; the agent exits 0 once it succeeds
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_POWEROFF_COMMAND",
        default_value = "systemctl poweroff"
    )]
    pub poweroff_command: String,
    /// Do the whole teardown but never power off: the agent exits 0 instead (debug images)
    #[arg(long, env = "GITLAB_RUNNER_VM_NO_POWEROFF")]
    pub no_poweroff: bool,
    /// Seconds between a failure and the power-off
    #[arg(long, env = "GITLAB_RUNNER_VM_FAILURE_DELAY", value_name = SECONDS, value_parser = seconds, default_value_t = 60)]
    pub failure_delay: u64,
    /// Seconds to wait for runner.json to appear
    #[arg(long, env = "GITLAB_RUNNER_VM_CONFIG_WAIT", value_name = SECONDS, value_parser = seconds, default_value_t = 300)]
    pub config_wait: u64,
    /// Seconds for registration, retries included
    #[arg(long, env = "GITLAB_RUNNER_VM_REGISTER_TIMEOUT", value_name = SECONDS, value_parser = seconds, default_value_t = 300)]
    pub register_timeout: u64,
    /// Seconds for deregistration, retries included; an unreachable GitLab delays power-off by at most this
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_DEREGISTER_TIMEOUT",
        value_name = SECONDS, value_parser = seconds,
        default_value_t = 30
    )]
    pub deregister_timeout: u64,
    /// Seconds gitlab-runner gets to abort its job after SIGTERM before it is killed
    #[arg(long, env = "GITLAB_RUNNER_VM_STOP_TIMEOUT", value_name = SECONDS, value_parser = seconds, default_value_t = 40)]
    pub stop_timeout: u64,
    /// Longest hold in seconds, from its start: touching the keep file never extends it further
    #[arg(long, env = "GITLAB_RUNNER_VM_HOLD_MAX", value_name = SECONDS, value_parser = seconds, default_value_t = 14400)]
    pub hold_max: u64,
    /// Seconds a hold lasts after its start or the keep file's last modification, whichever is later
    #[arg(long, env = "GITLAB_RUNNER_VM_HOLD_EXTEND", value_name = SECONDS, value_parser = seconds, default_value_t = 3600)]
    pub hold_extend: u64,
    /// Where milestones and failures are written, one line each, for reading from outside the
    /// VM (the serial console); `off` for nowhere. When it cannot be opened, /dev/kmsg
    #[arg(long, env = "GITLAB_RUNNER_VM_CONSOLE", default_value = crate::console::DEFAULT)]
    pub console: PathBuf,
    /// Docker's daemon.json, where runner.json's registry_mirrors are merged before registering
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_DOCKER_DAEMON_CONFIG",
        default_value = DEFAULT_DOCKER_DAEMON_CONFIG
    )]
    pub docker_daemon_config: PathBuf,
    /// Run with /bin/sh -c after daemon.json changed, so that a running Docker rereads it
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_DOCKER_RELOAD_COMMAND",
        default_value = "systemctl try-reload-or-restart docker.service"
    )]
    pub docker_reload_command: String,
    /// The containers-registries.conf.d drop-in where runner.json's registry_mirrors go for Podman
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_REGISTRIES_CONF",
        default_value = DEFAULT_REGISTRIES_CONF
    )]
    pub registries_conf: PathBuf,
    /// The nix.conf fragment (included by the image's nix.conf) where runner.json's
    /// nix_substituters and nix_trusted_public_keys go
    #[arg(long, env = "GITLAB_RUNNER_VM_NIX_CONF", default_value = DEFAULT_NIX_CONF)]
    pub nix_conf: PathBuf,
    /// Run with /bin/sh -c after the nix.conf fragment changed, so that nix-daemon rereads it
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_NIX_RESTART_COMMAND",
        default_value = "systemctl try-restart nix-daemon.service"
    )]
    pub nix_restart_command: String,
    /// Seconds a daemon's reload (restart) command may take before it is killed and the run
    /// fails; a SIGTERM, a drain or a notice ends the wait at once
    #[arg(
        long,
        env = "GITLAB_RUNNER_VM_DAEMON_RELOAD_TIMEOUT",
        value_parser = seconds,
        default_value_t = 90
    )]
    pub daemon_reload_timeout: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The README's flag table, as (flag, environment variable, default) cells.
    fn readme_flag_table() -> Vec<(String, String, String)> {
        include_str!("../../README.md")
            .lines()
            .filter(|l| l.starts_with("| `--"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let unquote = |c: &str| c.trim_matches('`').to_string();
                (unquote(cells[1]), unquote(cells[2]), cells[3].to_string())
            })
            .collect()
    }

    #[test]
    fn the_readme_flag_table_is_the_command_line() {
        let cli = Cli::command();
        let run = cli.find_subcommand("run").unwrap();
        let table = readme_flag_table();
        let mut flags = Vec::new();
        for arg in run.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" {
                continue;
            }
            let flag = format!("--{long}");
            let row = table
                .iter()
                .find(|(f, _, _)| *f == flag)
                .unwrap_or_else(|| panic!("README's flag table has no row for {flag}"));
            let env = arg.get_env().unwrap().to_str().unwrap();
            assert_eq!(row.1, env, "{flag}");
            match arg.get_default_values().first() {
                Some(default) => {
                    let default = default.to_str().unwrap();
                    // `value` (words after it explain), or a bare first word; a switch is "off".
                    let shown = match row.2.strip_prefix('`') {
                        Some(quoted) => quoted.split('`').next().unwrap(),
                        None => row.2.split([' ', ':']).next().unwrap(),
                    };
                    let default = if default == "false" { "off" } else { default };
                    assert_eq!(shown, default, "{flag}'s default in the README");
                }
                None => assert!(!row.2.is_empty(), "{flag}"),
            }
            flags.push(flag);
        }
        let documented: Vec<&String> = table.iter().map(|(f, _, _)| f).collect();
        assert_eq!(
            documented,
            flags.iter().collect::<Vec<_>>(),
            "same flags, same order"
        );
    }

    #[test]
    fn durations_are_whole_seconds_up_to_ten_years() {
        assert_eq!(seconds("60"), Ok(60));
        assert_eq!(seconds(" 0 "), Ok(0));
        assert_eq!(seconds("315360000"), Ok(MAX_SECONDS));
        assert!(seconds("315360001").unwrap_err().contains("maximum"));
        assert!(seconds("1.5").unwrap_err().contains("whole number"));
        assert!(seconds("-1").is_err());
    }
}
