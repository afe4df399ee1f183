//! Everything about the real gitlab-runner: the state files (system id, config.toml, root's
//! only), starting `run-single` with a scrubbed environment, forwarding its output, signalling
//! it, and `job-exec`, through which it runs shell jobs as the job user.
//!
//! - `state_files`: the system id and writing both state files, 0600, before any GitLab call;
//! - `config_toml`: rendering config.toml, and reading back what a restarted agent needs;
//! - `process`: accounts, the arguments, the environment, spawn and signals;
//! - `job_exec`: the custom executor's run_exec: a stage's script as the job user;
//! - `output`: forwarding stdout and stderr to the log, one record per line;
//! - `job_lines`: the lines of that output that say a job started or ended.

mod config_toml;
pub mod job_exec;
pub mod job_lines;
mod output;
mod process;
mod state_files;

pub use config_toml::{RunnerEntry, ShellJobs, read_runner_entry, render_config_toml};
pub use output::{LineWatch, forward_output};
pub use process::{Account, run_single_args, scrubbed_environment, send_signal, spawn};
pub use state_files::{CONFIG_FILE, generate_system_id, read_system_id, write_state_files};

/// A runner.json with every field the files above render, for their tests.
#[cfg(test)]
fn sample_config(executor: crate::config::Executor) -> crate::config::RunnerConfig {
    use crate::config::{Credential, DockerSettings, RunnerConfig, RunnerSettings};
    use crate::secret::Secret;

    RunnerConfig {
        name: "vm \"1\"".into(),
        url: "https://gitlab.example.com".into(),
        credential: Credential::RunnerToken(Secret::new("glrt-abc")),
        executor,
        settings: RunnerSettings::default(),
        docker: Some(DockerSettings {
            image: "alpine:3.20".into(),
            privileged: true,
            volumes: vec!["/cache".into()],
        }),
        max_jobs: 3,
        idle_timeout: std::time::Duration::from_secs(120),
        max_lifetime: None,
        tls_ca_file: Some("/etc/ca.pem".into()),
        builds_dir: None,
        environment: vec!["FOO=bar".into()],
        cache: None,
        registry_mirrors: Vec::new(),
        nix_caches: None,
    }
}
