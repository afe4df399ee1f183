//! The keys runner.json may have: one table that the checks read through (a `Node` is got by
//! its `Key`), from which the unknown-key errors (`node::unknown_keys`), their "did you mean"
//! suggestions and the lists of keys that only some credentials use are derived. Data only.

use Kind::{Boolean, Integer, Object, Text, TextList};
use Use::{AccessToken, Credential, GitLab, Vm};

/// What a key's value is; the reads check it (in debug builds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Text,
    Integer,
    Boolean,
    TextList,
    Object,
}

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Use {
    /// The agent or gitlab-runner on this VM.
    Vm,
    /// A credential, inline or in a file.
    Credential,
    /// Which runner an access token creates.
    AccessToken,
    /// A setting GitLab stores with the runner: sent when this VM creates its runner, ignored
    /// (with a warning) with a `glrt-` token, whose runner GitLab already has.
    GitLab,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) struct Key {
    pub name: &'static str,
    pub kind: Kind,
    pub used: Use,
}

const fn key(name: &'static str, kind: Kind, used: Use) -> Key {
    Key { name, kind, used }
}

pub(super) const NAME: Key = key("name", Text, Vm);
pub(super) const URL: Key = key("url", Text, Vm);
pub(super) const TOKEN: Key = key("token", Text, Credential);
pub(super) const TOKEN_FILE: Key = key("token_file", Text, Credential);
pub(super) const REGISTRATION_TOKEN: Key = key("registration_token", Text, Credential);
pub(super) const REGISTRATION_TOKEN_FILE: Key = key("registration_token_file", Text, Credential);
pub(super) const ACCESS_TOKEN: Key = key("access_token", Text, Credential);
pub(super) const ACCESS_TOKEN_FILE: Key = key("access_token_file", Text, Credential);
pub(super) const RUNNER_TYPE: Key = key("runner_type", Text, AccessToken);
pub(super) const GROUP_ID: Key = key("group_id", Integer, AccessToken);
pub(super) const PROJECT_ID: Key = key("project_id", Integer, AccessToken);
pub(super) const EXECUTOR: Key = key("executor", Text, Vm);
pub(super) const TAGS: Key = key("tags", TextList, GitLab);
pub(super) const RUN_UNTAGGED: Key = key("run_untagged", Boolean, GitLab);
pub(super) const LOCKED: Key = key("locked", Boolean, GitLab);
pub(super) const ACCESS_LEVEL: Key = key("access_level", Text, GitLab);
pub(super) const MAXIMUM_TIMEOUT: Key = key("maximum_timeout", Integer, GitLab);
pub(super) const DOCKER: Key = key("docker", Object, Vm);
pub(super) const MAX_JOBS: Key = key("max_jobs", Integer, Vm);
pub(super) const IDLE_TIMEOUT: Key = key("idle_timeout", Integer, Vm);
pub(super) const MAX_LIFETIME: Key = key("max_lifetime", Integer, Vm);
pub(super) const TLS_CA_FILE: Key = key("tls_ca_file", Text, Vm);
pub(super) const BUILDS_DIR: Key = key("builds_dir", Text, Vm);
pub(super) const ENVIRONMENT: Key = key("environment", TextList, Vm);
pub(super) const CACHE: Key = key("cache", Object, Vm);
pub(super) const REGISTRY_MIRRORS: Key = key("registry_mirrors", TextList, Vm);
pub(super) const NIX_SUBSTITUTERS: Key = key("nix_substituters", TextList, Vm);
pub(super) const NIX_TRUSTED_PUBLIC_KEYS: Key = key("nix_trusted_public_keys", TextList, Vm);

/// The keys of runner.json, in the order the unknown-key error lists them.
pub(super) const TOP_LEVEL: &[Key] = &[
    NAME,
    URL,
    TOKEN,
    TOKEN_FILE,
    REGISTRATION_TOKEN,
    REGISTRATION_TOKEN_FILE,
    ACCESS_TOKEN,
    ACCESS_TOKEN_FILE,
    RUNNER_TYPE,
    GROUP_ID,
    PROJECT_ID,
    EXECUTOR,
    TAGS,
    RUN_UNTAGGED,
    LOCKED,
    ACCESS_LEVEL,
    MAXIMUM_TIMEOUT,
    DOCKER,
    MAX_JOBS,
    IDLE_TIMEOUT,
    MAX_LIFETIME,
    TLS_CA_FILE,
    BUILDS_DIR,
    ENVIRONMENT,
    CACHE,
    REGISTRY_MIRRORS,
    NIX_SUBSTITUTERS,
    NIX_TRUSTED_PUBLIC_KEYS,
];

pub(super) const IMAGE: Key = key("image", Text, Vm);
pub(super) const PRIVILEGED: Key = key("privileged", Boolean, Vm);
pub(super) const VOLUMES: Key = key("volumes", TextList, Vm);

/// The keys of `docker`.
pub(super) const DOCKER_SECTION: &[Key] = &[IMAGE, PRIVILEGED, VOLUMES];

/// The keys of `cache`: gitlab-runner's `[runners.cache]`, named as it names them (see cache.rs).
pub(super) const CACHE_TYPE: Key = key("Type", Text, Vm);
pub(super) const CACHE_PATH: Key = key("Path", Text, Vm);
pub(super) const CACHE_SHARED: Key = key("Shared", Boolean, Vm);
pub(super) const CACHE_MAX_UPLOADED_ARCHIVE_SIZE: Key = key("MaxUploadedArchiveSize", Integer, Vm);
pub(super) const CACHE_S3: Key = key("s3", Object, Vm);
pub(super) const CACHE_GCS: Key = key("gcs", Object, Vm);
pub(super) const CACHE_AZURE: Key = key("azure", Object, Vm);

pub(super) const CACHE_SECTION: &[Key] = &[
    CACHE_TYPE,
    CACHE_PATH,
    CACHE_SHARED,
    CACHE_MAX_UPLOADED_ARCHIVE_SIZE,
    CACHE_S3,
    CACHE_GCS,
    CACHE_AZURE,
];

/// The keys of the table used for `used`, in table order.
pub(super) fn used_for(used: Use) -> impl Iterator<Item = &'static Key> {
    TOP_LEVEL.iter().filter(move |k| k.used == used)
}
