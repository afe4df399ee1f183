//! `runner.json`: parsing, validation and defaults.
//!
//! Validation is pure (files named by `*_file` keys are read through a function passed in) and
//! reports every problem at once, each with its JSON path and a fix, so that `check` can print
//! them all and `run` can refuse a bad file with one clear message.

use std::fmt;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

pub use crate::cli::MAX_SECONDS;
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub severity: Severity,
    /// JSON path of the offending value, `$` for the whole document.
    pub path: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let severity = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{severity}: {}: {}; fix: {}",
            self.path, self.message, self.fix
        )
    }
}

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
    /// The name used in status.json and the logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Credential::RunnerToken(_) => "token",
            Credential::RegistrationToken(_) => "registration_token",
            Credential::AccessToken { .. } => "access_token",
        }
    }

    pub fn secret(&self) -> &Secret {
        match self {
            Credential::RunnerToken(s) | Credential::RegistrationToken(s) => s,
            Credential::AccessToken { token, .. } => token,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    Shell,
    Docker,
}

impl Executor {
    pub fn as_str(self) -> &'static str {
        match self {
            Executor::Shell => "shell",
            Executor::Docker => "docker",
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
    pub access_level: Option<String>,
    pub maximum_timeout: Option<u64>,
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
    /// Seconds without a job before gitlab-runner gives up; 0 waits forever.
    pub idle_timeout: u64,
    pub max_lifetime: Option<u64>,
    pub tls_ca_file: Option<PathBuf>,
    pub builds_dir: Option<String>,
    pub environment: Vec<String>,
}

pub const DEFAULT_MAX_JOBS: u32 = 1;
pub const DEFAULT_IDLE_TIMEOUT: u64 = 600;

const KNOWN_KEYS: &[&str] = &[
    "name",
    "url",
    "token",
    "token_file",
    "registration_token",
    "registration_token_file",
    "access_token",
    "access_token_file",
    "runner_type",
    "group_id",
    "project_id",
    "executor",
    "tags",
    "run_untagged",
    "locked",
    "access_level",
    "maximum_timeout",
    "docker",
    "max_jobs",
    "idle_timeout",
    "max_lifetime",
    "tls_ca_file",
    "builds_dir",
    "environment",
];
const DOCKER_KEYS: &[&str] = &["image", "privileged", "volumes"];
const GITLAB_SIDE_SETTINGS: &[&str] = &[
    "tags",
    "run_untagged",
    "locked",
    "access_level",
    "maximum_timeout",
];

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
    let mut c = Checker {
        problems: Vec::new(),
        read_file,
    };
    let config = match serde_json::from_str::<Value>(text) {
        Err(e) => {
            c.error(
                "$",
                format!("not valid JSON ({e})"),
                "make runner.json a JSON object, e.g. {\"url\": \"https://gitlab.example.com\", \"token\": \"glrt-...\"}",
            );
            None
        }
        Ok(Value::Object(obj)) => c.runner_config(&obj, default_name),
        Ok(_) => {
            c.error(
                "$",
                "is not a JSON object",
                "make runner.json a JSON object with the keys url and token",
            );
            None
        }
    };
    let has_error = c.problems.iter().any(|p| p.severity == Severity::Error);
    Validated {
        config: if has_error { None } else { config },
        problems: c.problems,
    }
}

struct Checker<'a> {
    problems: Vec<Problem>,
    read_file: ReadFile<'a>,
}

impl Checker<'_> {
    fn push(
        &mut self,
        severity: Severity,
        path: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity,
            path: path.to_string(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn error(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Severity::Error, path, message, fix);
    }

    fn warning(&mut self, path: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.push(Severity::Warning, path, message, fix);
    }

    fn unknown_keys(&mut self, obj: &Map<String, Value>, known: &[&str], prefix: &str) {
        for key in obj.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let nearest = known
                .iter()
                .map(|k| (strsim::jaro_winkler(key, k), *k))
                .max_by(|a, b| a.0.total_cmp(&b.0))
                .filter(|(score, _)| *score > 0.7);
            let fix = match nearest {
                Some((_, k)) => format!("did you mean \"{k}\"?"),
                None => format!("remove it; known keys are: {}", known.join(", ")),
            };
            self.error(&format!("{prefix}.{key}"), "unknown key", fix);
        }
    }

    fn string(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match obj.get(key)? {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.error(path, "is empty", format!("give {key} a value or remove it"));
                None
            }
            other => {
                self.error(
                    path,
                    format!("must be a string, not {}", type_name(other)),
                    format!("write {key} in double quotes"),
                );
                None
            }
        }
    }

    fn boolean(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<bool> {
        match obj.get(key)? {
            Value::Bool(b) => Some(*b),
            other => {
                self.error(
                    path,
                    format!("must be true or false, not {}", type_name(other)),
                    format!("write {key} as true or false, without quotes"),
                );
                None
            }
        }
    }

    fn integer(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
        range: RangeInclusive<u64>,
    ) -> Option<u64> {
        let value = obj.get(key)?;
        let (min, max) = (*range.start(), *range.end());
        match value.as_u64() {
            Some(n) if range.contains(&n) => Some(n),
            Some(n) if n < min => {
                self.error(
                    path,
                    format!("is {n}, below the minimum {min}"),
                    format!("set {key} to at least {min}"),
                );
                None
            }
            Some(n) => {
                let unit = if max == MAX_SECONDS {
                    " s (ten years)"
                } else {
                    ""
                };
                self.error(
                    path,
                    format!("is {n}, above the maximum {max}{unit}"),
                    format!("set {key} to at most {max}"),
                );
                None
            }
            None => {
                self.error(
                    path,
                    format!("must be a whole number, not {}", format_value(value)),
                    format!(
                        "write {key} as a number without quotes, e.g. {}",
                        min.max(1)
                    ),
                );
                None
            }
        }
    }

    fn string_list(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<Vec<String>> {
        match obj.get(key)? {
            Value::Array(items) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) if !s.trim().is_empty() => out.push(s.clone()),
                        other => self.error(
                            &format!("{path}[{i}]"),
                            format!("must be a non-empty string, not {}", format_value(other)),
                            format!("make every entry of {key} a quoted string"),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.error(
                    path,
                    format!("must be a list of strings, not {}", type_name(other)),
                    format!("write {key} as [\"a\", \"b\"]"),
                );
                None
            }
        }
    }

    /// A secret given inline (`key`) or in a file (`key_file`); at most one of the two.
    fn secret(&mut self, obj: &Map<String, Value>, key: &str) -> Option<Secret> {
        let file_key = format!("{key}_file");
        let inline = self.string(obj, key, &format!("$.{key}"));
        let file = self.string(obj, &file_key, &format!("$.{file_key}"));
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.error(
                    &format!("$.{file_key}"),
                    format!("both {key} and {file_key} are given"),
                    format!("keep only one of {key} and {file_key}"),
                );
                None
            }
            (Some(value), None) => Some(Secret::new(value.trim())),
            (None, Some(file)) => match (self.read_file)(Path::new(&file)) {
                Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
                Ok(_) => {
                    self.error(
                        &format!("$.{file_key}"),
                        format!("{file} is empty"),
                        format!("write the {key} into {file}"),
                    );
                    None
                }
                Err(e) => {
                    self.error(
                        &format!("$.{file_key}"),
                        format!("cannot read {file}: {e}"),
                        format!(
                            "make {file} exist and readable by the agent, or give {key} inline"
                        ),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }

    fn runner_config(
        &mut self,
        obj: &Map<String, Value>,
        default_name: &str,
    ) -> Option<RunnerConfig> {
        self.unknown_keys(obj, KNOWN_KEYS, "$");

        let name = self
            .string(obj, "name", "$.name")
            .unwrap_or_else(|| default_name.to_string());
        if name.chars().any(char::is_control) {
            // A NUL cannot be passed to gitlab-runner's -r at all; a newline splits log lines.
            self.error(
                "$.name",
                format!(
                    "{:?} contains a control character (NUL, newline, tab...)",
                    name
                ),
                "use letters, digits, spaces and punctuation only",
            );
        }
        let url = self.url(obj);
        let credential = self.credential(obj);
        let executor = self.executor(obj);
        let settings = self.settings(obj, credential.as_ref());
        let docker = self.docker(obj, executor);

        let max_jobs = self
            .integer(obj, "max_jobs", "$.max_jobs", 1..=u64::from(u32::MAX))
            .map(|n| n as u32);
        let idle_timeout = self.integer(obj, "idle_timeout", "$.idle_timeout", 0..=MAX_SECONDS);
        let max_lifetime = self.integer(obj, "max_lifetime", "$.max_lifetime", 1..=MAX_SECONDS);
        let tls_ca_file = self.tls_ca_file(obj);
        let builds_dir = self.string(obj, "builds_dir", "$.builds_dir");
        if let Some(dir) = &builds_dir
            && !dir.starts_with('/')
        {
            self.error(
                "$.builds_dir",
                format!("\"{dir}\" is not an absolute path"),
                "write it as an absolute path, e.g. /var/lib/scratch/builds",
            );
        }
        let environment = self.environment(obj);

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
        })
    }

    fn url(&mut self, obj: &Map<String, Value>) -> Option<String> {
        if !obj.contains_key("url") {
            self.error(
                "$.url",
                "is missing",
                "add \"url\": \"https://gitlab.example.com\" (your GitLab's address)",
            );
            return None;
        }
        let raw = self.string(obj, "url", "$.url")?;
        let url = raw.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            self.error(
                "$.url",
                format!("\"{url}\" has no http:// or https:// scheme"),
                format!("write it as \"https://{url}\""),
            );
            return None;
        };
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((_, host)) = authority.rsplit_once('@') {
            // Never echo the credentials themselves.
            self.error(
                "$.url",
                format!("\"{scheme}://…@{host}\" carries a user name or password"),
                format!("remove them: write \"{scheme}://{host}\"; the runner authenticates with its token"),
            );
            return None;
        }
        if scheme != "http" && scheme != "https" {
            self.error(
                "$.url",
                format!("scheme \"{scheme}\" is not http or https"),
                format!("write it as \"https://{rest}\""),
            );
            return None;
        }
        if rest.is_empty() || rest.starts_with('/') {
            self.error(
                "$.url",
                format!("\"{url}\" has no host name"),
                "write it as \"https://gitlab.example.com\"",
            );
            return None;
        }
        // gitlab-runner accepts the base URL with or without a trailing / or /ci; normalise the
        // same way so that both programs talk to the same API.
        let mut base = url.trim_end_matches('/').to_string();
        if let Some(stripped) = base.strip_suffix("/ci") {
            base = stripped.to_string();
        }
        if base.ends_with("/api/v4") {
            self.error(
                "$.url",
                "ends in /api/v4",
                format!(
                    "give the GitLab base URL: \"{}\"",
                    base.trim_end_matches("/api/v4")
                ),
            );
            return None;
        }
        Some(base)
    }

    fn credential(&mut self, obj: &Map<String, Value>) -> Option<Credential> {
        let token = self.secret(obj, "token");
        let registration = self.secret(obj, "registration_token");
        let access = self.secret(obj, "access_token");
        let given: Vec<&str> = [
            ("token", token.is_some() || obj.contains_key("token_file")),
            (
                "registration_token",
                registration.is_some() || obj.contains_key("registration_token_file"),
            ),
            (
                "access_token",
                access.is_some() || obj.contains_key("access_token_file"),
            ),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect();
        let has_type_keys = ["runner_type", "group_id", "project_id"]
            .iter()
            .any(|k| obj.contains_key(*k));
        if given.len() > 1 {
            self.error(
                "$",
                format!("{} credentials are given ({})", given.len(), given.join(", ")),
                "keep exactly one: token (a glrt- runner authentication token, recommended), registration_token or access_token",
            );
            return None;
        }
        if given.is_empty() && obj.contains_key("url") {
            self.error(
                "$.token",
                "no credential is given",
                "add \"token\": \"glrt-...\" (create a runner in GitLab under Settings > CI/CD > Runners and copy its token)",
            );
        }
        if has_type_keys && access.is_none() && !obj.contains_key("access_token_file") {
            self.error(
                "$.runner_type",
                "runner_type, group_id and project_id only apply to access_token",
                "remove them, or use access_token",
            );
        }
        if let Some(t) = token {
            if t.expose().starts_with("GR1348941") {
                self.error(
                    "$.token",
                    "this is a registration token (GR1348941...), not a runner authentication token",
                    "move it to \"registration_token\", or better create a runner in GitLab and use its glrt- token",
                );
                return None;
            }
            for key in GITLAB_SIDE_SETTINGS {
                if obj.contains_key(*key) {
                    self.warning(
                        &format!("$.{key}"),
                        "is ignored with a glrt- runner authentication token: GitLab stores it with the runner",
                        "set it on the runner in GitLab (Settings > CI/CD > Runners > Edit) and remove it here",
                    );
                }
            }
            return Some(Credential::RunnerToken(t));
        }
        if let Some(t) = registration {
            return Some(Credential::RegistrationToken(t));
        }
        let token = access?;
        let runner_type = self.runner_type(obj)?;
        Some(Credential::AccessToken { token, runner_type })
    }

    fn runner_type(&mut self, obj: &Map<String, Value>) -> Option<RunnerType> {
        let Some(kind) = self.string(obj, "runner_type", "$.runner_type") else {
            if !obj.contains_key("runner_type") {
                self.error("$.runner_type", "is missing (access_token needs it)", "add \"runner_type\": \"project_type\" with \"project_id\", \"group_type\" with \"group_id\", or \"instance_type\"");
            }
            return None;
        };
        let group = self.integer(obj, "group_id", "$.group_id", 1..=u64::MAX);
        let project = self.integer(obj, "project_id", "$.project_id", 1..=u64::MAX);
        match kind.as_str() {
            "instance_type" => Some(RunnerType::Instance),
            "group_type" => match group {
                Some(id) => Some(RunnerType::Group(id)),
                None => {
                    if !obj.contains_key("group_id") {
                        self.error(
                            "$.group_id",
                            "is missing (runner_type group_type needs it)",
                            "add \"group_id\": <the group's numeric id>",
                        );
                    }
                    None
                }
            },
            "project_type" => match project {
                Some(id) => Some(RunnerType::Project(id)),
                None => {
                    if !obj.contains_key("project_id") {
                        self.error(
                            "$.project_id",
                            "is missing (runner_type project_type needs it)",
                            "add \"project_id\": <the project's numeric id>",
                        );
                    }
                    None
                }
            },
            other => {
                self.error(
                    "$.runner_type",
                    format!("\"{other}\" is not a runner type"),
                    "use instance_type, group_type or project_type",
                );
                None
            }
        }
    }

    fn executor(&mut self, obj: &Map<String, Value>) -> Option<Executor> {
        if !obj.contains_key("executor") {
            return Some(Executor::Shell);
        }
        match self.string(obj, "executor", "$.executor")?.as_str() {
            "shell" => Some(Executor::Shell),
            "docker" => Some(Executor::Docker),
            other => {
                self.error(
                    "$.executor",
                    format!("\"{other}\" is not supported"),
                    "use \"shell\" or \"docker\"",
                );
                None
            }
        }
    }

    fn settings(
        &mut self,
        obj: &Map<String, Value>,
        credential: Option<&Credential>,
    ) -> RunnerSettings {
        let tags = self.string_list(obj, "tags", "$.tags").unwrap_or_default();
        for (i, tag) in tags.iter().enumerate() {
            if tag.contains(',') {
                self.error(
                    &format!("$.tags[{i}]"),
                    format!("\"{tag}\" contains a comma"),
                    "give each tag as its own list entry",
                );
            }
        }
        let run_untagged = self.boolean(obj, "run_untagged", "$.run_untagged");
        let locked = self.boolean(obj, "locked", "$.locked");
        let access_level = self.string(obj, "access_level", "$.access_level");
        if let Some(level) = &access_level
            && level != "not_protected"
            && level != "ref_protected"
        {
            self.error(
                "$.access_level",
                format!("\"{level}\" is not an access level"),
                "use \"not_protected\" or \"ref_protected\"",
            );
        }
        // GitLab refuses a maximum timeout under 10 minutes with a 400; say so before registering.
        let maximum_timeout = self.integer(
            obj,
            "maximum_timeout",
            "$.maximum_timeout",
            600..=MAX_SECONDS,
        );
        let creates_runner = matches!(
            credential,
            Some(Credential::RegistrationToken(_) | Credential::AccessToken { .. })
        );
        if creates_runner && run_untagged == Some(false) && tags.is_empty() {
            self.error(
                "$.run_untagged",
                "is false but no tags are given, so the runner could never pick a job",
                "add tags, or set run_untagged to true",
            );
        }
        RunnerSettings {
            tags,
            run_untagged,
            locked,
            access_level,
            maximum_timeout,
        }
    }

    fn docker(
        &mut self,
        obj: &Map<String, Value>,
        executor: Option<Executor>,
    ) -> Option<DockerSettings> {
        let value = obj.get("docker");
        if executor == Some(Executor::Docker) && value.is_none() {
            self.error(
                "$.docker",
                "is missing (the docker executor needs a default image)",
                "add \"docker\": {\"image\": \"alpine:3.20\"}",
            );
            return None;
        }
        let value = value?;
        let Value::Object(d) = value else {
            self.error(
                "$.docker",
                format!("must be an object, not {}", type_name(value)),
                "write it as {\"image\": \"alpine:3.20\"}",
            );
            return None;
        };
        self.unknown_keys(d, DOCKER_KEYS, "$.docker");
        if executor == Some(Executor::Shell) {
            self.warning(
                "$.docker",
                "is ignored with the shell executor",
                "set \"executor\": \"docker\", or remove the docker section",
            );
        }
        let image = self.string(d, "image", "$.docker.image");
        if image.is_none() && !d.contains_key("image") {
            self.error(
                "$.docker.image",
                "is missing",
                "add \"image\": \"alpine:3.20\" (the image for jobs that name none)",
            );
        }
        Some(DockerSettings {
            image: image.unwrap_or_default(),
            privileged: self
                .boolean(d, "privileged", "$.docker.privileged")
                .unwrap_or(false),
            volumes: self
                .string_list(d, "volumes", "$.docker.volumes")
                .unwrap_or_default(),
        })
    }

    fn tls_ca_file(&mut self, obj: &Map<String, Value>) -> Option<PathBuf> {
        let file = self.string(obj, "tls_ca_file", "$.tls_ca_file")?;
        match (self.read_file)(Path::new(&file)) {
            Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(PathBuf::from(file)),
            Ok(_) => {
                self.error("$.tls_ca_file", format!("{file} holds no PEM certificate"), "give a PEM file (-----BEGIN CERTIFICATE-----); convert DER with openssl x509 -inform der");
                None
            }
            Err(e) => {
                self.error(
                    "$.tls_ca_file",
                    format!("cannot read {file}: {e}"),
                    format!("make {file} exist and readable, or remove tls_ca_file"),
                );
                None
            }
        }
    }

    fn environment(&mut self, obj: &Map<String, Value>) -> Vec<String> {
        let entries = self
            .string_list(obj, "environment", "$.environment")
            .unwrap_or_default();
        for (i, entry) in entries.iter().enumerate() {
            let valid = entry.split_once('=').is_some_and(|(key, _)| {
                !key.is_empty()
                    && !key.starts_with(|c: char| c.is_ascii_digit())
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            if !valid {
                self.error(
                    &format!("$.environment[{i}]"),
                    format!("\"{entry}\" is not KEY=VALUE"),
                    "write each entry as \"NAME=value\" with a name of letters, digits and _",
                );
            }
        }
        entries
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn format_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_files(_: &Path) -> io::Result<String> {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "No such file or directory",
        ))
    }

    fn check(text: &str) -> Validated {
        validate(text, "host-1", &no_files)
    }

    fn only_error(text: &str) -> Problem {
        let v = check(text);
        let errors: Vec<_> = v.errors().cloned().collect();
        assert_eq!(errors.len(), 1, "expected one error, got {:#?}", v.problems);
        assert!(v.config.is_none());
        errors[0].clone()
    }

    const GLRT_WITH_TAGS: &str = r#"{
        "name": "nixos-runner-001",
        "url": "https://gitlab.example.com",
        "token": "glrt-xxxxxxxxxxxxxxxxxxxxx",
        "tags": ["nixos", "docker", "nix"],
        "executor": "shell"
    }"#;

    #[test]
    fn a_glrt_config_with_tags_is_valid_with_a_warning_that_tags_are_ignored() {
        let v = check(GLRT_WITH_TAGS);
        let config = v.config.expect("valid");
        assert_eq!(config.name, "nixos-runner-001");
        assert_eq!(config.url, "https://gitlab.example.com");
        assert_eq!(config.executor, Executor::Shell);
        assert_eq!(config.max_jobs, 1);
        assert_eq!(config.idle_timeout, 600);
        assert!(matches!(config.credential, Credential::RunnerToken(_)));
        assert_eq!(v.problems.len(), 1);
        assert_eq!(v.problems[0].severity, Severity::Warning);
        assert_eq!(v.problems[0].path, "$.tags");
    }

    #[test]
    fn defaults_fill_name_and_executor() {
        let config = check(r#"{"url": "http://gitlab.local/", "token": "glrt-abc"}"#)
            .config
            .unwrap();
        assert_eq!(config.name, "host-1");
        assert_eq!(config.url, "http://gitlab.local");
        assert_eq!(config.executor, Executor::Shell);
    }

    #[test]
    fn trailing_ci_is_stripped_like_gitlab_runner_does() {
        let config = check(r#"{"url": "https://g.example.com/ci/", "token": "glrt-abc"}"#)
            .config
            .unwrap();
        assert_eq!(config.url, "https://g.example.com");
    }

    #[test]
    fn unknown_key_suggests_the_nearest_known_key() {
        let p = only_error(
            r#"{"url": "https://g.example.com", "token": "glrt-abc", "exector": "shell"}"#,
        );
        assert_eq!(p.path, "$.exector");
        assert!(p.fix.contains("\"executor\""), "{p}");
    }

    #[test]
    fn unknown_docker_key_suggests_too() {
        let v = check(
            r#"{"url": "https://g.example.com", "token": "glrt-abc", "executor": "docker", "docker": {"imgae": "alpine"}}"#,
        );
        let e: Vec<_> = v.errors().collect();
        assert_eq!(e.len(), 2, "{:#?}", v.problems);
        assert_eq!(e[0].path, "$.docker.imgae");
        assert!(e[0].fix.contains("\"image\""));
        assert_eq!(e[1].path, "$.docker.image");
        let v = check(
            r#"{"url": "https://g.example.com", "token": "glrt-abc", "executor": "docker", "docker": {"image": "a", "privilegd": true}}"#,
        );
        let e: Vec<_> = v.errors().collect();
        assert_eq!(e[0].path, "$.docker.privilegd");
        assert!(e[0].fix.contains("\"privileged\""));
    }

    #[test]
    fn url_without_scheme_is_an_error_with_the_fixed_url() {
        let p = only_error(r#"{"url": "gitlab.example.com", "token": "glrt-abc"}"#);
        assert_eq!(p.path, "$.url");
        assert!(p.fix.contains("https://gitlab.example.com"), "{p}");
    }

    #[test]
    fn url_with_another_scheme_or_no_host_or_api_path() {
        assert_eq!(
            only_error(r#"{"url": "ftp://g.example.com", "token": "glrt-a"}"#).path,
            "$.url"
        );
        assert_eq!(
            only_error(r#"{"url": "https://", "token": "glrt-a"}"#).path,
            "$.url"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com/api/v4", "token": "glrt-a"}"#).path,
            "$.url"
        );
    }

    #[test]
    fn url_with_credentials_is_refused_without_echoing_them() {
        for url in [
            "https://deploy:s3cr3tpass@g.example.com",
            "https://s3cr3tpass@g.example.com/",
            "http://u:s3cr3tpass@g.example.com:8443/gitlab",
        ] {
            let p = only_error(&format!(r#"{{"url": "{url}", "token": "glrt-a"}}"#));
            assert_eq!(p.path, "$.url");
            let shown = p.to_string();
            assert!(!shown.contains("s3cr3tpass"), "{shown}");
            assert!(shown.contains("g.example.com"), "{shown}");
        }
        // An @ in the path is not a credential.
        let config = check(r#"{"url": "https://g.example.com/~team@x", "token": "glrt-a"}"#)
            .config
            .unwrap();
        assert_eq!(config.url, "https://g.example.com/~team@x");
    }

    #[test]
    fn names_with_control_characters_are_refused() {
        for name in [r"vm\u0000one", r"vm\none", r"vm\tone"] {
            let p = only_error(&format!(
                r#"{{"url": "https://g.example.com", "token": "glrt-a", "name": "{name}"}}"#
            ));
            assert_eq!(p.path, "$.name", "{name}");
        }
    }

    #[test]
    fn durations_and_counts_beyond_what_the_runner_accepts_are_refused() {
        for (key, value) in [
            ("max_lifetime", "18446744073709551615"),
            ("max_lifetime", "315360001"),
            ("idle_timeout", "315360001"),
            ("maximum_timeout", "18446744073709551615"),
            ("max_jobs", "4294967296"),
        ] {
            let p = only_error(&format!(
                r#"{{"url": "https://g.example.com", "registration_token": "GR1348941abc", "{key}": {value}}}"#
            ));
            assert_eq!(p.path, format!("$.{key}"));
            assert!(p.message.contains("above the maximum"), "{p}");
        }
        let config = check(
            r#"{"url": "https://g.example.com", "token": "glrt-a", "max_lifetime": 315360000, "idle_timeout": 315360000, "max_jobs": 4294967295}"#,
        )
        .config
        .unwrap();
        assert_eq!(config.max_lifetime, Some(MAX_SECONDS));
        assert_eq!(config.max_jobs, u32::MAX);
    }

    #[test]
    fn missing_url_and_missing_credential() {
        assert_eq!(only_error(r#"{"token": "glrt-a"}"#).path, "$.url");
        let p = only_error(r#"{"url": "https://g.example.com"}"#);
        assert_eq!(p.path, "$.token");
        assert!(p.fix.contains("glrt-"));
    }

    #[test]
    fn two_credentials_are_an_error() {
        let p = only_error(
            r#"{"url": "https://g.example.com", "token": "glrt-a", "registration_token": "GR1348941abc"}"#,
        );
        assert!(p.message.contains("token, registration_token"), "{p}");
    }

    #[test]
    fn registration_token_in_token_is_caught() {
        let p = only_error(r#"{"url": "https://g.example.com", "token": "GR1348941abcdef"}"#);
        assert!(p.fix.contains("registration_token"));
    }

    #[test]
    fn legacy_registration_keeps_runner_settings() {
        let config = check(
            r#"{"url": "https://g.example.com", "registration_token": "GR1348941abc", "tags": ["a"], "run_untagged": false, "locked": true, "access_level": "ref_protected", "maximum_timeout": 3600}"#,
        )
        .config
        .unwrap();
        assert!(matches!(
            config.credential,
            Credential::RegistrationToken(_)
        ));
        assert_eq!(config.settings.tags, vec!["a"]);
        assert_eq!(config.settings.run_untagged, Some(false));
        assert_eq!(config.settings.maximum_timeout, Some(3600));
    }

    #[test]
    fn access_token_needs_a_runner_type_and_its_id() {
        let ok = check(
            r#"{"url": "https://g.example.com", "access_token": "glpat-abc", "runner_type": "project_type", "project_id": 42}"#,
        );
        assert!(matches!(
            ok.config.unwrap().credential,
            Credential::AccessToken {
                runner_type: RunnerType::Project(42),
                ..
            }
        ));
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "access_token": "glpat-abc"}"#).path,
            "$.runner_type"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "access_token": "glpat-abc", "runner_type": "group_type"}"#).path,
            "$.group_id"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "access_token": "glpat-abc", "runner_type": "project_type", "project_id": "x"}"#).path,
            "$.project_id"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "access_token": "glpat-abc", "runner_type": "site_type"}"#).path,
            "$.runner_type"
        );
        assert_eq!(only_error(r#"{"url": "https://g.example.com", "token": "glrt-abc", "runner_type": "instance_type"}"#).path, "$.runner_type");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let read = |p: &Path| -> io::Result<String> {
            assert_eq!(p, Path::new("/run/secrets/token"));
            Ok("glrt-fromfile\n".to_string())
        };
        let v = validate(
            r#"{"url": "https://g.example.com", "token_file": "/run/secrets/token"}"#,
            "h",
            &read,
        );
        assert_eq!(
            v.config.unwrap().credential.secret().expose(),
            "glrt-fromfile"
        );
    }

    #[test]
    fn missing_token_file_and_both_forms() {
        let p = only_error(r#"{"url": "https://g.example.com", "token_file": "/nope"}"#);
        assert_eq!(p.path, "$.token_file");
        assert!(p.message.contains("/nope"));
        let p = only_error(
            r#"{"url": "https://g.example.com", "token": "glrt-a", "token_file": "/nope"}"#,
        );
        assert!(p.message.contains("both"));
    }

    #[test]
    fn type_errors_name_the_path() {
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "token": "glrt-a", "max_jobs": 0}"#)
                .path,
            "$.max_jobs"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "token": "glrt-a", "max_jobs": "2"}"#)
                .path,
            "$.max_jobs"
        );
        assert_eq!(
            only_error(
                r#"{"url": "https://g.example.com", "token": "glrt-a", "idle_timeout": -1}"#
            )
            .path,
            "$.idle_timeout"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "token": "glrt-a", "tags": "a,b"}"#)
                .path,
            "$.tags"
        );
        assert_eq!(only_error(r#"{"url": 5, "token": "glrt-a"}"#).path, "$.url");
        assert_eq!(
            only_error(
                r#"{"url": "https://g.example.com", "token": "glrt-a", "executor": "kubernetes"}"#
            )
            .path,
            "$.executor"
        );
        assert_eq!(only_error(r#"{"url": "https://g.example.com", "token": "glrt-a", "environment": ["NOEQUALS"]}"#).path, "$.environment[0]");
        assert_eq!(
            only_error(
                r#"{"url": "https://g.example.com", "token": "glrt-a", "builds_dir": "builds"}"#
            )
            .path,
            "$.builds_dir"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "registration_token": "GR1348941a", "maximum_timeout": 60}"#).path,
            "$.maximum_timeout"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "registration_token": "GR1348941a", "run_untagged": false}"#).path,
            "$.run_untagged"
        );
        assert_eq!(
            only_error(r#"{"url": "https://g.example.com", "registration_token": "GR1348941a", "access_level": "all"}"#).path,
            "$.access_level"
        );
    }

    #[test]
    fn docker_executor_needs_an_image() {
        assert_eq!(
            only_error(
                r#"{"url": "https://g.example.com", "token": "glrt-a", "executor": "docker"}"#
            )
            .path,
            "$.docker"
        );
        let config = check(r#"{"url": "https://g.example.com", "token": "glrt-a", "executor": "docker", "docker": {"image": "alpine:3.20", "privileged": true, "volumes": ["/cache"]}}"#)
            .config
            .unwrap();
        assert_eq!(
            config.docker.unwrap(),
            DockerSettings {
                image: "alpine:3.20".into(),
                privileged: true,
                volumes: vec!["/cache".into()]
            }
        );
    }

    #[test]
    fn invalid_json_and_non_objects() {
        assert!(only_error("{").message.contains("not valid JSON"));
        assert_eq!(only_error("[]").path, "$");
    }

    #[test]
    fn tls_ca_file_must_hold_pem() {
        let read = |_: &Path| -> io::Result<String> { Ok("not a cert".into()) };
        let v = validate(
            r#"{"url": "https://g.example.com", "token": "glrt-a", "tls_ca_file": "/ca.pem"}"#,
            "h",
            &read,
        );
        assert_eq!(v.errors().next().unwrap().path, "$.tls_ca_file");
    }

    #[test]
    fn problems_never_contain_the_token() {
        let token = "glrt-SECRET.SECRET.SECRET.SECRET";
        let v = check(&format!(
            r#"{{"url": "gitlab", "token": "{token}", "tagz": [], "tags": ["x"]}}"#
        ));
        assert!(v.problems.len() >= 3);
        for p in &v.problems {
            assert!(!p.to_string().contains("SECRET.SECRET"), "{p}");
        }
    }
}
