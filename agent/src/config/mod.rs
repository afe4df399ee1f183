//! `runner.json`: parsing, validation and defaults, into the typed `RunnerConfig` the rest of
//! the agent uses.
//!
//! Validation is pure (files named by `*_file` keys are read through a function passed in) and
//! reports every problem at once, each with its JSON path and a fix, so that `check` can print
//! them all and `run` can refuse a bad file with one clear message. The checks are split by
//! concern: `credential` (which token, and how this VM's runner comes to exist), `connection`
//! (url, tls_ca_file), `daemons` (registry mirrors), `runner_settings` (what GitLab stores with a runner), `jobs` (executor,
//! docker, builds_dir, environment), `cache` (GitLab's distributed cache); `keys` is the table of known keys and `node` the reader
//! they are all written with.

mod cache;
mod connection;
mod credential;
mod daemons;
mod jobs;
mod keys;
mod node;
mod runner_settings;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The longest duration any flag or runner.json key accepts: ten years, far beyond a VM's
/// life, far within what the clocks and gitlab-runner's flags (Go durations) can represent.
pub const MAX_SECONDS: u64 = 10 * 365 * 86_400;
use crate::secret::Secret;
#[cfg(test)]
pub use cache::CacheType;
pub use cache::{CacheSettings, CacheValue};
pub use daemons::RegistryMirror;
use node::{Node, Problems};
pub use node::{Problem, Severity};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerType {
    Instance,
    Group(u64),
    Project(u64),
}

impl RunnerType {
    pub fn api_name(&self) -> &'static str {
        match self {
            RunnerType::Instance => "instance_type",
            RunnerType::Group(_) => "group_type",
            RunnerType::Project(_) => "project_type",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "the names are GitLab's own for the three kinds of token"
)]
pub enum Credential {
    /// A runner authentication token (`glrt-...`), usually shared by a fleet: this VM is one of
    /// the runner's managers, told apart by its system id.
    RunnerToken(Secret),
    /// A legacy registration token: `POST /runners` creates a runner for this VM.
    RegistrationToken(Secret),
    /// A personal, group or project access token: `POST /user/runners` creates a runner.
    AccessToken {
        token: Secret,
        runner_type: RunnerType,
    },
}

impl Credential {
    pub fn kind(&self) -> CredentialKind {
        match self {
            Credential::RunnerToken(_) => CredentialKind::RunnerToken,
            Credential::RegistrationToken(_) => CredentialKind::RegistrationToken,
            Credential::AccessToken { .. } => CredentialKind::AccessToken,
        }
    }

    pub fn secret(&self) -> &Secret {
        match self {
            Credential::RunnerToken(s) | Credential::RegistrationToken(s) => s,
            Credential::AccessToken { token, .. } => token,
        }
    }
}

/// Which of the three credentials runner.json gives; named as its key in runner.json, in
/// status.json and in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::enum_variant_names, reason = "as Credential's")]
pub enum CredentialKind {
    #[serde(rename = "token")]
    RunnerToken,
    #[serde(rename = "registration_token")]
    RegistrationToken,
    #[serde(rename = "access_token")]
    AccessToken,
}

impl CredentialKind {
    pub const ALL: [CredentialKind; 3] = [
        CredentialKind::RunnerToken,
        CredentialKind::RegistrationToken,
        CredentialKind::AccessToken,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::RunnerToken => "token",
            CredentialKind::RegistrationToken => "registration_token",
            CredentialKind::AccessToken => "access_token",
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    Shell,
    Docker,
}

impl Executor {
    pub const ALL: [Executor; 2] = [Executor::Shell, Executor::Docker];

    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Shell => "shell",
            Executor::Docker => "docker",
        }
    }
}

/// Which pipelines a runner created by this VM takes jobs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLevel {
    /// Jobs of any branch or tag.
    NotProtected,
    /// Jobs of protected branches and tags only.
    RefProtected,
}

impl AccessLevel {
    pub const ALL: [AccessLevel; 2] = [AccessLevel::NotProtected, AccessLevel::RefProtected];

    /// The name in GitLab's API and in runner.json.
    pub fn as_str(self) -> &'static str {
        match self {
            AccessLevel::NotProtected => "not_protected",
            AccessLevel::RefProtected => "ref_protected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DockerSettings {
    pub image: String,
    pub privileged: bool,
    pub volumes: Vec<String>,
}

/// Runner settings that GitLab stores for runners created by this VM (registration and access
/// tokens); for `glrt-` tokens they live in GitLab and are ignored here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RunnerSettings {
    pub tags: Vec<String>,
    pub run_untagged: Option<bool>,
    pub locked: Option<bool>,
    pub access_level: Option<AccessLevel>,
    /// Whole seconds, at least ten minutes.
    pub maximum_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerConfig {
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://gitlab.example.com`.
    pub url: String,
    pub credential: Credential,
    pub executor: Executor,
    pub settings: RunnerSettings,
    pub docker: Option<DockerSettings>,
    pub max_jobs: u32,
    /// Whole seconds without a job before gitlab-runner gives up; zero waits forever.
    pub idle_timeout: Duration,
    /// Whole seconds after gitlab-runner starts when the agent drains it.
    pub max_lifetime: Option<Duration>,
    pub tls_ca_file: Option<PathBuf>,
    pub builds_dir: Option<String>,
    pub environment: Vec<String>,
    /// GitLab's distributed cache: config.toml's `[runners.cache]` (boxed: rarely given, and
    /// the states that carry the configuration stay small).
    pub cache: Option<Box<CacheSettings>>,
    /// Pull-through caches of Docker Hub for Docker and Podman, written into their
    /// configuration before registering.
    pub registry_mirrors: Vec<RegistryMirror>,
    /// Binary caches and their keys for nix-daemon, besides the image's, written into an
    /// included nix.conf before registering (boxed, as the cache).
    pub nix_caches: Option<Box<NixCaches>>,
}

/// runner.json's `nix_substituters` and `nix_trusted_public_keys`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NixCaches {
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
}

pub const DEFAULT_MAX_JOBS: u32 = 1;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The result of validating a runner.json: the configuration if there was no error, and every
/// problem found (warnings are kept even when the configuration is usable).
#[derive(Debug)]
pub struct Validated {
    pub config: Option<RunnerConfig>,
    pub problems: Vec<Problem>,
}

impl Validated {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }
}

/// Reads files named by the configuration (`token_file`, `tls_ca_file`).
pub type ReadFile<'a> = &'a dyn Fn(&Path) -> io::Result<String>;

/// Validates the text of a runner.json. `default_name` is used when `name` is absent (the host
/// name in production).
pub fn validate(text: &str, default_name: &str, read_file: ReadFile<'_>) -> Validated {
    let mut p = Problems::default();
    let config = match serde_json::from_str::<Value>(text) {
        Err(e) => {
            p.push(
                Severity::Error,
                "$",
                format!("not valid JSON ({e})"),
                "make runner.json a JSON object, e.g. {\"url\": \"https://gitlab.example.com\", \"token\": \"glrt-...\"}".to_string(),
            );
            None
        }
        Ok(value @ Value::Object(_)) => {
            runner_config(&Node::root(&value), default_name, read_file, &mut p)
        }
        Ok(value) => {
            Node::root(&value).error(
                &mut p,
                "is not a JSON object",
                "make runner.json a JSON object with the keys url and token",
            );
            None
        }
    };
    Validated {
        config: if p.has_error() { None } else { config },
        problems: p.0,
    }
}

fn runner_config(
    root: &Node<'_>,
    default_name: &str,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<RunnerConfig> {
    node::unknown_keys(root, keys::TOP_LEVEL, p);

    let name = name(root, default_name, p);
    let url = connection::url(root, p);
    let credential = credential::check(root, read_file, p);
    let executor = jobs::executor(root, p);
    let settings = runner_settings::check(root, credential.as_ref(), p);
    let docker = jobs::docker(root, executor, p);

    let max_jobs = root
        .get(&keys::MAX_JOBS)
        .and_then(|n| n.integer(p, 1..=u64::from(u32::MAX)))
        .map(|n| n as u32);
    let idle_timeout = root.get(&keys::IDLE_TIMEOUT).and_then(|n| n.seconds(p, 0));
    let max_lifetime = root.get(&keys::MAX_LIFETIME).and_then(|n| n.seconds(p, 1));
    let tls_ca_file = connection::tls_ca_file(root, read_file, p);
    let builds_dir = jobs::builds_dir(root, p);
    let environment = jobs::environment(root, p);
    let cache = cache::check(root, read_file, p).map(Box::new);
    let registry_mirrors = daemons::registry_mirrors(root, p);
    let nix_caches = NixCaches {
        substituters: daemons::nix_substituters(root, p),
        trusted_public_keys: daemons::nix_trusted_public_keys(root, p),
    };
    let nix_caches = (nix_caches != NixCaches::default()).then(|| Box::new(nix_caches));

    Some(RunnerConfig {
        name,
        url: url?,
        credential: credential?,
        executor: executor?,
        settings,
        docker,
        max_jobs: max_jobs.unwrap_or(DEFAULT_MAX_JOBS),
        idle_timeout: idle_timeout.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_lifetime,
        tls_ca_file,
        builds_dir,
        environment,
        cache,
        registry_mirrors,
        nix_caches,
    })
}

fn name(root: &Node<'_>, default_name: &str, p: &mut Problems) -> String {
    let given = root.get(&keys::NAME).and_then(|n| n.string(p));
    let name = given.unwrap_or(default_name).to_string();
    if name.chars().any(char::is_control) {
        // A NUL cannot be passed to gitlab-runner's -r at all; a newline splits log lines.
        root.error_at(
            p,
            &keys::NAME,
            format!("{name:?} contains a control character (NUL, newline, tab...)"),
            "use letters, digits, spaces and punctuation only",
        );
    }
    name
}
