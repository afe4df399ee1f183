//! config.toml, the one file gitlab-runner reads: rendered from runner.json and the runner
//! token for `run-single`, and read back by a restarted agent that must deregister without
//! runner.json.

use std::path::{Path, PathBuf};

use super::CONFIG_FILE;
use crate::config::{CacheSettings, CacheValue, Executor, RunnerConfig};
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

/// How shell jobs reach the job user: gitlab-runner's custom executor, whose `run_exec` is this
/// program's `job-exec` (see job_exec.rs for why the shell executor cannot do it).
#[derive(Debug, Clone)]
pub struct ShellJobs {
    /// This program, as gitlab-runner must call it (an absolute path).
    pub agent: PathBuf,
    /// The job user's name and home (builds and the local cache live there by default).
    pub user: String,
    pub home: PathBuf,
    /// The jobs' cgroup each stage moves into (`--separate-cgroups`); None: the stage stays in
    /// gitlab-runner's, which is then the agent's unit's and admitted nowhere.
    pub cgroup: Option<PathBuf>,
}

impl ShellJobs {
    pub fn for_user(user: &super::Account, cgroup: Option<PathBuf>) -> ShellJobs {
        ShellJobs {
            agent: std::env::current_exe().unwrap_or_else(|_| "gitlab-runner-vm".into()),
            user: user.name.clone(),
            home: user.home.clone(),
            cgroup,
        }
    }
}

/// The executor gitlab-runner is told to use for runner.json's `executor`.
pub fn gitlab_runner_executor(executor: Executor) -> &'static str {
    match executor {
        Executor::Shell => "custom",
        Executor::Docker => "docker",
    }
}

/// config.toml for `gitlab-runner run-single -c <file> -r <name>`: one `[[runners]]` entry.
pub fn render_config_toml(
    config: &RunnerConfig,
    runner_token: &Secret,
    shell: &ShellJobs,
) -> String {
    use toml::{Table, Value};
    let mut runner = Table::new();
    runner.insert("name".into(), Value::from(config.name.as_str()));
    runner.insert("url".into(), Value::from(config.url.as_str()));
    runner.insert("token".into(), Value::from(runner_token.expose()));
    runner.insert(
        "executor".into(),
        Value::from(gitlab_runner_executor(config.executor)),
    );
    if let Some(ca) = &config.tls_ca_file {
        runner.insert("tls-ca-file".into(), Value::from(ca.display().to_string()));
    }
    if let Some(dir) = &config.builds_dir {
        runner.insert("builds_dir".into(), Value::from(dir.as_str()));
    }
    if config.executor == Executor::Shell {
        // The custom executor has no default for either; the shell executor's were ./builds and
        // ./cache in gitlab-runner's working directory, the runner's home.
        if config.builds_dir.is_none() {
            let builds = shell.home.join("builds").display().to_string();
            runner.insert("builds_dir".into(), Value::from(builds));
        }
        let cache = shell.home.join("cache").display().to_string();
        runner.insert("cache_dir".into(), Value::from(cache));
        let mut custom = Table::new();
        custom.insert(
            "run_exec".into(),
            Value::from(shell.agent.display().to_string()),
        );
        let mut args = vec![
            "job-exec".to_string(),
            "--job-user".into(),
            shell.user.clone(),
        ];
        if let Some(cgroup) = &shell.cgroup {
            args.extend(["--cgroup".into(), cgroup.display().to_string()]);
        }
        custom.insert("run_args".into(), Value::from(args));
        runner.insert("custom".into(), Value::Table(custom));
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
    if let Some(cache) = &config.cache {
        runner.insert("cache".into(), Value::Table(cache_table(cache)));
    }
    let mut root = Table::new();
    // run-single ignores `concurrent`, but gitlab-runner's config loader expects it.
    root.insert("concurrent".into(), Value::from(1));
    root.insert("runners".into(), Value::Array(vec![Value::Table(runner)]));
    format!("# Written by gitlab-runner-vm for this boot only; rewritten at every start.\n{root}")
}

/// `[runners.cache]` and its type's section, with gitlab-runner's key names and TOML types
/// (`cache/cacheconfig/cacheconfig.go`: strings, booleans, `MaxUploadedArchiveSize` an int64).
/// The toml crate writes every string as a quoted, escaped TOML string: no value can end its
/// string or start a table of its own.
fn cache_table(cache: &CacheSettings) -> toml::Table {
    use toml::{Table, Value};
    let mut table = Table::new();
    table.insert("Type".into(), Value::from(cache.cache_type.as_str()));
    if let Some(path) = &cache.path {
        table.insert("Path".into(), Value::from(path.as_str()));
    }
    table.insert("Shared".into(), Value::from(cache.shared));
    if let Some(size) = cache.max_uploaded_archive_size {
        // Validated to fit an int64.
        let size = i64::try_from(size).unwrap_or(i64::MAX);
        table.insert("MaxUploadedArchiveSize".into(), Value::from(size));
    }
    let mut section = Table::new();
    for (name, value) in &cache.settings {
        let value = match value {
            CacheValue::Text(s) => Value::from(s.as_str()),
            CacheValue::Secret(s) => Value::from(s.expose()),
            CacheValue::Flag(b) => Value::from(*b),
            CacheValue::Number(n) => Value::from(*n),
        };
        section.insert((*name).into(), value);
    }
    table.insert(cache.cache_type.as_str().into(), Value::Table(section));
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::sample_config;

    fn shell_jobs() -> ShellJobs {
        ShellJobs {
            agent: "/nix/store/x/bin/gitlab-runner-vm".into(),
            user: "runner".into(),
            home: "/home/runner".into(),
            cgroup: None,
        }
    }

    #[test]
    fn shell_jobs_run_through_job_exec_as_the_job_user() {
        let text = render_config_toml(
            &sample_config(Executor::Shell),
            &Secret::new("glrt-xyz"),
            &shell_jobs(),
        );
        let table: toml::Table = text.parse().unwrap();
        let runner = &table["runners"].as_array().unwrap()[0];
        assert_eq!(runner["executor"].as_str(), Some("custom"));
        assert_eq!(runner["builds_dir"].as_str(), Some("/home/runner/builds"));
        assert_eq!(runner["cache_dir"].as_str(), Some("/home/runner/cache"));
        let custom = &runner["custom"];
        assert_eq!(
            custom["run_exec"].as_str(),
            Some("/nix/store/x/bin/gitlab-runner-vm")
        );
        let args: Vec<&str> = custom["run_args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(args, ["job-exec", "--job-user", "runner"]);
        // With --separate-cgroups every stage moves into the jobs' cgroup first.
        let mut separate = shell_jobs();
        separate.cgroup = Some("/sys/fs/cgroup/system.slice/u.service/jobs".into());
        let text = render_config_toml(
            &sample_config(Executor::Shell),
            &Secret::new("glrt-xyz"),
            &separate,
        );
        let table: toml::Table = text.parse().unwrap();
        let args = &table["runners"][0]["custom"]["run_args"];
        assert_eq!(
            args,
            &toml::Value::from(vec![
                "job-exec",
                "--job-user",
                "runner",
                "--cgroup",
                "/sys/fs/cgroup/system.slice/u.service/jobs"
            ])
        );
        // runner.json's builds_dir wins.
        let mut own = sample_config(Executor::Shell);
        own.builds_dir = Some("/var/lib/scratch/builds".into());
        let text = render_config_toml(&own, &Secret::new("glrt-xyz"), &shell_jobs());
        let table: toml::Table = text.parse().unwrap();
        let runner = &table["runners"].as_array().unwrap()[0];
        assert_eq!(
            runner["builds_dir"].as_str(),
            Some("/var/lib/scratch/builds")
        );
    }

    #[test]
    fn config_toml_is_valid_toml_with_one_runner() {
        let text = render_config_toml(
            &sample_config(Executor::Docker),
            &Secret::new("glrt-xyz"),
            &shell_jobs(),
        );
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
        assert_eq!(runner.get("custom"), None, "{text}");
        let shell = render_config_toml(
            &sample_config(Executor::Shell),
            &Secret::new("glrt-xyz"),
            &shell_jobs(),
        );
        assert!(!shell.contains("[runners.docker]"));
        // No volumes: none written, gitlab-runner's default stays.
        let mut no_volumes = sample_config(Executor::Docker);
        if let Some(docker) = &mut no_volumes.docker {
            docker.volumes.clear();
        }
        let text = render_config_toml(&no_volumes, &Secret::new("glrt-xyz"), &shell_jobs());
        let table: toml::Table = text.parse().unwrap();
        let docker = &table["runners"].as_array().unwrap()[0]["docker"];
        assert_eq!(docker.get("volumes"), None, "{text}");
    }
}
