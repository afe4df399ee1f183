//! config.toml, the one file gitlab-runner reads: rendered from runner.json and the runner
//! token for `run-single`, and read back by a restarted agent that must deregister without
//! runner.json.

use std::path::{Path, PathBuf};

use super::CONFIG_FILE;
use crate::config::{Executor, RunnerConfig};
use crate::files;
use crate::secret::Secret;

/// What a restarted agent needs from an existing config.toml to deregister without runner.json:
/// GitLab's URL, the runner token (the shared `glrt-` token, or the one GitLab returned for the
/// runner this boot created) and the extra CA file.
#[derive(Debug, Clone)]
pub struct RunnerEntry {
    pub url: String,
    pub token: Option<Secret>,
    pub tls_ca_file: Option<PathBuf>,
}

pub fn read_runner_entry(state_dir: &Path) -> Option<RunnerEntry> {
    let text = files::read_text(&state_dir.join(CONFIG_FILE), files::STATE_FILE_CAP).ok()?;
    let table: toml::Table = text.parse().ok()?;
    let runner = table.get("runners")?.as_array()?.first()?;
    let text_of = |key: &str| {
        runner
            .get(key)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
    };
    Some(RunnerEntry {
        url: text_of("url")?.to_string(),
        token: text_of("token").map(Secret::new),
        tls_ca_file: text_of("tls-ca-file").map(PathBuf::from),
    })
}

/// config.toml for `gitlab-runner run-single -c <file> -r <name>`: one `[[runners]]` entry.
pub fn render_config_toml(config: &RunnerConfig, runner_token: &Secret) -> String {
    use toml::{Table, Value};
    let mut runner = Table::new();
    runner.insert("name".into(), Value::from(config.name.as_str()));
    runner.insert("url".into(), Value::from(config.url.as_str()));
    runner.insert("token".into(), Value::from(runner_token.expose()));
    runner.insert("executor".into(), Value::from(config.executor.as_str()));
    if let Some(ca) = &config.tls_ca_file {
        runner.insert("tls-ca-file".into(), Value::from(ca.display().to_string()));
    }
    if let Some(dir) = &config.builds_dir {
        runner.insert("builds_dir".into(), Value::from(dir.as_str()));
    }
    if !config.environment.is_empty() {
        runner.insert(
            "environment".into(),
            Value::from(config.environment.clone()),
        );
    }
    if let (Executor::Docker, Some(docker)) = (config.executor, &config.docker) {
        let mut d = Table::new();
        d.insert("image".into(), Value::from(docker.image.as_str()));
        d.insert("privileged".into(), Value::from(docker.privileged));
        if !docker.volumes.is_empty() {
            d.insert("volumes".into(), Value::from(docker.volumes.clone()));
        }
        runner.insert("docker".into(), Value::Table(d));
    }
    let mut root = Table::new();
    // run-single ignores `concurrent`, but gitlab-runner's config loader expects it.
    root.insert("concurrent".into(), Value::from(1));
    root.insert("runners".into(), Value::Array(vec![Value::Table(runner)]));
    format!("# Written by gitlab-runner-vm for this boot only; rewritten at every start.\n{root}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::sample_config;

    #[test]
    fn config_toml_is_valid_toml_with_one_runner() {
        let text = render_config_toml(&sample_config(Executor::Docker), &Secret::new("glrt-xyz"));
        let table: toml::Table = text.parse().unwrap();
        let runner = &table["runners"].as_array().unwrap()[0];
        assert_eq!(runner["name"].as_str(), Some("vm \"1\""));
        assert_eq!(runner["token"].as_str(), Some("glrt-xyz"));
        assert_eq!(runner["executor"].as_str(), Some("docker"));
        assert_eq!(runner["tls-ca-file"].as_str(), Some("/etc/ca.pem"));
        assert_eq!(runner["docker"]["image"].as_str(), Some("alpine:3.20"));
        assert_eq!(runner["docker"]["privileged"].as_bool(), Some(true));
        assert_eq!(runner["docker"]["volumes"][0].as_str(), Some("/cache"));
        assert_eq!(runner["environment"][0].as_str(), Some("FOO=bar"));
        let shell = render_config_toml(&sample_config(Executor::Shell), &Secret::new("glrt-xyz"));
        assert!(!shell.contains("[runners.docker]"));
        // No volumes: none written, gitlab-runner's default stays.
        let mut no_volumes = sample_config(Executor::Docker);
        if let Some(docker) = &mut no_volumes.docker {
            docker.volumes.clear();
        }
        let text = render_config_toml(&no_volumes, &Secret::new("glrt-xyz"));
        let table: toml::Table = text.parse().unwrap();
        let docker = &table["runners"].as_array().unwrap()[0]["docker"];
        assert_eq!(docker.get("volumes"), None, "{text}");
    }
}
