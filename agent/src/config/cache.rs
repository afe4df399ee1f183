//! `cache`: GitLab's distributed cache, rendered into config.toml's `[runners.cache]`.
//!
//! The object is gitlab-runner's `[runners.cache]` key for key, named as gitlab-runner names
//! them, so that its documentation applies word for word: `Type`, `Path`, `Shared`,
//! `MaxUploadedArchiveSize` and one of the sections `s3`, `gcs`, `azure` with their own keys.
//! The names and types are those of gitlab-runner's `cache/cacheconfig/cacheconfig.go` (the
//! `Config`, `CacheS3Config`, `CacheGCSConfig` and `CacheAzureConfig` structs that
//! `common/config.go`'s `RunnerSettings.Cache` embeds) and of
//! `docs/configuration/advanced-configuration.md` ("The `[runners.cache]` section").
//!
//! Each secret gitlab-runner masks (`AccessKey`, `SecretKey`, `SessionToken`, `PrivateKey`,
//! `AccountKey`: `RunnerConfig.mask` in `common/config.go`) may instead be read from a file,
//! `<key>_file`, as the tokens are; given inline it draws a warning naming the better way the
//! platform offers (an instance role, the VM's service account, a managed identity). Every
//! value is checked before it reaches config.toml: no control character (a PEM key's line
//! breaks aside), at most `MAX_TEXT` bytes.

use std::path::Path;

use serde_json::Value;

use super::ReadFile;
use super::keys::{self, Key, Kind};
use super::node::{Node, Problems};
use crate::secret::Secret;

/// The storage gitlab-runner's cache adapters know (`Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheType {
    S3,
    Gcs,
    Azure,
}

impl CacheType {
    pub const ALL: [CacheType; 3] = [CacheType::S3, CacheType::Gcs, CacheType::Azure];

    /// The name of `Type` and of the section: `s3`, `gcs`, `azure`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheType::S3 => "s3",
            CacheType::Gcs => "gcs",
            CacheType::Azure => "azure",
        }
    }

    fn section(self) -> &'static Key {
        match self {
            CacheType::S3 => &keys::CACHE_S3,
            CacheType::Gcs => &keys::CACHE_GCS,
            CacheType::Azure => &keys::CACHE_AZURE,
        }
    }

    fn keys(self) -> &'static [Key] {
        match self {
            CacheType::S3 => S3_KEYS,
            CacheType::Gcs => GCS_KEYS,
            CacheType::Azure => AZURE_KEYS,
        }
    }
}

/// One setting of the type's section, as config.toml gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheValue {
    Text(String),
    /// From runner.json or its `<key>_file`; masked everywhere but config.toml.
    Secret(Secret),
    Flag(bool),
    Number(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSettings {
    pub cache_type: CacheType,
    pub path: Option<String>,
    /// Rendered always: gitlab-runner's default (false) is then visible in config.toml.
    pub shared: bool,
    pub max_uploaded_archive_size: Option<u64>,
    /// The type's section, by gitlab-runner's key names, in the table's order.
    pub settings: Vec<(&'static str, CacheValue)>,
}

impl CacheSettings {
    /// What makes gitlab-runner fetch the instance's own credentials from the metadata
    /// service, None when the cache has keys of its own: S3 with `AuthenticationType` `iam`
    /// (always written), GCS without `CredentialsFile` or `AccessID`, Azure without
    /// `AccountKey`. gitlab-runner signs the cache's URLs itself, so it alone needs them (the
    /// agent then admits gitlab-runner's cgroup, not the jobs', through the metadata firewall).
    pub fn instance_identity(&self) -> Option<&'static str> {
        let has = |name: &str| self.settings.iter().any(|(k, _)| *k == name);
        let text = |name: &str| {
            self.settings.iter().find_map(|(k, v)| match v {
                CacheValue::Text(t) if *k == name => Some(t.as_str()),
                _ => None,
            })
        };
        match self.cache_type {
            CacheType::S3 if text("AuthenticationType") == Some("iam") => {
                Some("the S3 cache's AuthenticationType \"iam\" (the instance's role)")
            }
            CacheType::Gcs if !has("CredentialsFile") && !has("AccessID") => {
                Some("the GCS cache without CredentialsFile or AccessID (the VM's service account)")
            }
            CacheType::Azure if !has("AccountKey") => {
                Some("the Azure cache without AccountKey (the VM's managed identity)")
            }
            _ => None,
        }
    }

    /// The secrets, for masking gitlab-runner's output: each whole, and each line of a PEM
    /// key on its own (a multi-line TOML string is printed line by line), its armour aside.
    pub fn secrets(&self) -> Vec<Secret> {
        let mut out = Vec::new();
        for (_, value) in &self.settings {
            let CacheValue::Secret(secret) = value else {
                continue;
            };
            out.push(secret.clone());
            let lines = secret.expose().lines().map(str::trim);
            let lines = lines.filter(|l| !l.is_empty() && !l.starts_with("-----"));
            if secret.expose().contains('\n') {
                out.extend(lines.map(Secret::new));
            }
        }
        out
    }
}

/// The longest text value: S3 object keys (`Path` is their prefix) and IAM role ARNs stay far
/// below it; anything longer is a mistake, not a setting.
pub const MAX_TEXT: usize = 2048;
/// A PEM private key (`PrivateKey`): an RSA 4096 key is about 3.3 KiB.
const MAX_PRIVATE_KEY: usize = 16 * 1024;

const fn text(name: &'static str) -> Key {
    Key {
        name,
        kind: Kind::Text,
        used: keys::Use::Vm,
    }
}
const fn flag(name: &'static str) -> Key {
    Key {
        name,
        kind: Kind::Boolean,
        used: keys::Use::Vm,
    }
}
const fn number(name: &'static str) -> Key {
    Key {
        name,
        kind: Kind::Integer,
        used: keys::Use::Vm,
    }
}

/// `[runners.cache.s3]`: `CacheS3Config`.
const S3_KEYS: &[Key] = &[
    text("ServerAddress"),
    text("AccessKey"),
    text("AccessKey_file"),
    text("SecretKey"),
    text("SecretKey_file"),
    text("SessionToken"),
    text("SessionToken_file"),
    text("BucketName"),
    text("BucketLocation"),
    flag("Insecure"),
    text("AuthenticationType"),
    text("ServerSideEncryption"),
    text("ServerSideEncryptionKeyID"),
    flag("DualStack"),
    flag("PathStyle"),
    flag("Accelerate"),
    text("RoleARN"),
    text("UploadRoleARN"),
    number("AssumeRoleMaxConcurrency"),
    flag("DisableAssumeRoleCredentialsCaching"),
];

/// `[runners.cache.gcs]`: `CacheGCSConfig` and its embedded `CacheGCSCredentials`.
const GCS_KEYS: &[Key] = &[
    text("CredentialsFile"),
    text("AccessID"),
    text("PrivateKey"),
    text("PrivateKey_file"),
    text("BucketName"),
    text("UniverseDomain"),
];

/// `[runners.cache.azure]`: `CacheAzureConfig` and its embedded `CacheAzureCredentials`.
const AZURE_KEYS: &[Key] = &[
    text("AccountName"),
    text("AccountKey"),
    text("AccountKey_file"),
    text("ContainerName"),
    text("StorageDomain"),
];

/// The keys whose values gitlab-runner masks; each may come from `<key>_file`.
const SECRETS: &[&str] = &[
    "AccessKey",
    "SecretKey",
    "SessionToken",
    "PrivateKey",
    "AccountKey",
];

/// What a secret in the clear should be instead, per type.
fn better_than_inline(cache_type: CacheType, name: &str) -> String {
    let file = format!("{name}_file");
    let scoped = "a key that may use the cache's bucket only";
    match cache_type {
        CacheType::S3 => format!(
            "give {scoped}; where runner.json comes from a config disk put it in a file there (root's only) and give \"{file}\""
        ),
        CacheType::Gcs => {
            format!("give {scoped}, as a key file: \"CredentialsFile\" (root's only)")
        }
        CacheType::Azure => format!(
            "give {scoped}; where runner.json comes from a config disk put it in a file there (root's only) and give \"{file}\""
        ),
    }
}

pub(super) fn check(
    root: &Node<'_>,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<CacheSettings> {
    let node = root.get(&keys::CACHE)?;
    let cache = node.object(
        p,
        "{\"Type\": \"s3\", \"s3\": {\"BucketName\": \"runners-cache\", \"BucketLocation\": \"eu-west-1\"}}",
    )?;
    super::node::unknown_keys(&cache, keys::CACHE_SECTION, p);
    let cache_type = cache_type(&cache, p);
    let path = cache
        .get(&keys::CACHE_PATH)
        .and_then(|n| text_value(&n, p, MAX_TEXT))
        .map(|s| s.to_string());
    let shared = cache
        .get(&keys::CACHE_SHARED)
        .and_then(|n| n.boolean(p))
        .unwrap_or(false);
    // An int64 in gitlab-runner.
    let max_uploaded_archive_size = cache
        .get(&keys::CACHE_MAX_UPLOADED_ARCHIVE_SIZE)
        .and_then(|n| n.integer(p, 1..=i64::MAX as u64));
    for other in CacheType::ALL {
        let Some(section) = cache.get(other.section()) else {
            continue;
        };
        if cache_type.is_some_and(|t| t != other) {
            section.error(
                p,
                format!(
                    "is the section of Type \"{}\", but Type is \"{}\"",
                    other.as_str(),
                    cache_type.map_or("", CacheType::as_str)
                ),
                format!("remove it, or set \"Type\": \"{}\"", other.as_str()),
            );
        }
    }
    let cache_type = cache_type?;
    let section = match cache.get(cache_type.section()) {
        Some(n) => n.object(p, "{\"BucketName\": \"runners-cache\"}")?,
        None => {
            cache.error_at(
                p,
                cache_type.section(),
                format!("is missing (Type \"{}\" needs it)", cache_type.as_str()),
                format!(
                    "add \"{}\": {{...}} with the storage's settings (e.g. its bucket)",
                    cache_type.as_str()
                ),
            );
            return None;
        }
    };
    super::node::unknown_keys(&section, cache_type.keys(), p);
    let settings = section_settings(&section, cache_type, read_file, p);
    let settings = match cache_type {
        CacheType::S3 => s3(&section, settings, p),
        CacheType::Gcs => gcs(&section, settings, read_file, p),
        CacheType::Azure => azure(&section, settings, p),
    };
    Some(CacheSettings {
        cache_type,
        path,
        shared,
        max_uploaded_archive_size,
        settings,
    })
}

fn cache_type(cache: &Node<'_>, p: &mut Problems) -> Option<CacheType> {
    let Some(node) = cache.get(&keys::CACHE_TYPE) else {
        cache.error_at(
            p,
            &keys::CACHE_TYPE,
            "is missing",
            "add \"Type\": \"s3\", \"gcs\" or \"azure\"",
        );
        return None;
    };
    let name = node.string(p)?;
    let found = CacheType::ALL.into_iter().find(|t| t.as_str() == name);
    if found.is_none() {
        node.error(
            p,
            format!("\"{}\" is not a cache type gitlab-runner knows", printable(name)),
            "use \"s3\" (also for S3-compatible storage: MinIO, DigitalOcean Spaces, Ceph), \"gcs\" or \"azure\"",
        );
    }
    found
}

/// A text value without control characters (line breaks allowed where `multiline`), within
/// `max` bytes. The value is never echoed: it may be a secret.
fn clean(node: &Node<'_>, p: &mut Problems, value: &str, max: usize, multiline: bool) -> bool {
    if value.len() > max {
        node.error(
            p,
            format!("is {} bytes long, more than the {max} allowed", value.len()),
            "give the value itself, not a document",
        );
        return false;
    }
    let allowed = |c: char| multiline && (c == '\n' || c == '\r');
    // `hides`: control characters and the invisible ones that reorder or hide text, the rule
    // of everything the agent shows (a value that hides part of itself is no setting).
    if value
        .chars()
        .any(|c| crate::console::hides(c) && !allowed(c))
    {
        node.error(
            p,
            "contains a control or invisible character (a newline, tab, NUL, escape, bidirectional override...)",
            "remove it: gitlab-runner and the storage expect one line of text",
        );
        return false;
    }
    true
}

fn text_value<'a>(node: &Node<'a>, p: &mut Problems, max: usize) -> Option<&'a str> {
    let value = node.string(p)?;
    clean(node, p, value, max, false).then_some(value)
}

/// Every setting of the type's section that is given, read as its kind, secrets inline or
/// from their files.
fn section_settings(
    section: &Node<'_>,
    cache_type: CacheType,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Vec<(&'static str, CacheValue)> {
    let table = cache_type.keys();
    let mut out = Vec::new();
    for key in table.iter().filter(|k| !k.name.ends_with("_file")) {
        if SECRETS.contains(&key.name) {
            let file_key = table
                .iter()
                .find(|k| k.name.strip_suffix("_file") == Some(key.name))
                .expect("every secret has a _file key");
            if let Some(secret) = secret(section, cache_type, key, file_key, read_file, p) {
                out.push((key.name, CacheValue::Secret(secret)));
            }
            continue;
        }
        let Some(node) = section.get(key) else {
            continue;
        };
        let value = match key.kind {
            Kind::Boolean => node.boolean(p).map(CacheValue::Flag),
            Kind::Integer => signed(&node, p).map(CacheValue::Number),
            _ => text_value(&node, p, MAX_TEXT).map(|s| CacheValue::Text(s.to_string())),
        };
        if let Some(value) = value {
            out.push((key.name, value));
        }
    }
    out
}

/// `AssumeRoleMaxConcurrency`: a Go `int`, where -1 lifts the limit.
fn signed(node: &Node<'_>, p: &mut Problems) -> Option<i64> {
    match node.raw().as_i64() {
        Some(n) if (-1..=i64::from(i32::MAX)).contains(&n) => Some(n),
        _ => {
            node.error(
                p,
                format!("must be a whole number from -1 to {}", i32::MAX),
                "write it as a number without quotes, e.g. 5 (-1: no limit)",
            );
            None
        }
    }
}

/// A secret given inline (a warning) or in `<key>_file` (read now, as the tokens are).
fn secret(
    section: &Node<'_>,
    cache_type: CacheType,
    key: &Key,
    file_key: &Key,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<Secret> {
    let multiline = key.name == "PrivateKey";
    let max = if multiline { MAX_PRIVATE_KEY } else { MAX_TEXT };
    let inline = section.get(key);
    let file = section.get(file_key);
    match (inline, file) {
        (None, None) => None,
        (Some(_), Some(file)) => {
            file.error(
                p,
                format!("both {} and {} are given", key.name, file_key.name),
                format!("keep only one of {} and {}", key.name, file_key.name),
            );
            None
        }
        (Some(node), None) => {
            let value = node.string(p)?.trim();
            if !clean(&node, p, value, max, multiline) {
                return None;
            }
            if key.name != "AccessKey" {
                node.warning(
                    p,
                    "is in the clear in runner.json: whoever reads runner.json (the config disk, the instance's user-data) has it",
                    better_than_inline(cache_type, key.name),
                );
            }
            Some(Secret::new(value))
        }
        (None, Some(node)) => {
            let file = node.string(p)?;
            let text = match read_file(Path::new(file)) {
                Ok(text) => text,
                Err(e) => {
                    node.error(
                        p,
                        format!("cannot read {}: {e}", printable(file)),
                        format!(
                            "make {} exist and readable by the agent, or give {} another way",
                            printable(file),
                            key.name
                        ),
                    );
                    return None;
                }
            };
            let value = text.trim();
            if value.is_empty() {
                node.error(
                    p,
                    format!("{} is empty", printable(file)),
                    format!("write the {} into {}", key.name, printable(file)),
                );
                return None;
            }
            clean(&node, p, value, max, multiline).then(|| Secret::new(value))
        }
    }
}

fn has(settings: &[(&'static str, CacheValue)], name: &str) -> bool {
    settings.iter().any(|(k, _)| *k == name)
}

fn text_of<'s>(settings: &'s [(&'static str, CacheValue)], name: &str) -> Option<&'s str> {
    settings.iter().find_map(|(k, v)| match v {
        CacheValue::Text(s) if *k == name => Some(s.as_str()),
        _ => None,
    })
}

/// Whether `name` or its `_file` is in the section, read or not.
fn given(section: &Node<'_>, name: &str) -> bool {
    section.raw().get(name).is_some() || section.raw().get(format!("{name}_file")).is_some()
}

fn required(section: &Node<'_>, names: &[&str], cache_type: CacheType, p: &mut Problems) {
    for name in names {
        if !given(section, name) {
            p.push(
                super::Severity::Error,
                &section.path_of(name),
                format!("is missing (the {} cache needs it)", cache_type.as_str()),
                format!("add \"{name}\": \"...\""),
            );
        }
    }
}

/// S3: the bucket, and how gitlab-runner authenticates, always said explicitly: gitlab-runner
/// would silently use the instance role, ignoring the keys, when `ServerAddress` is missing
/// (`CacheS3Config.AuthType`).
fn s3(
    section: &Node<'_>,
    mut settings: Vec<(&'static str, CacheValue)>,
    p: &mut Problems,
) -> Vec<(&'static str, CacheValue)> {
    required(section, &["BucketName"], CacheType::S3, p);
    if let Some(address) = text_of(&settings, "ServerAddress") {
        if let Some((scheme, _)) = address.split_once("://") {
            section.error_at(
                p,
                &text("ServerAddress"),
                format!("has a scheme ({}://)", printable(scheme)),
                "give host[:port] only, e.g. \"s3.amazonaws.com\" or \"minio.example.com:9000\"; \"Insecure\": true for plain http",
            );
        } else if address.contains('/') {
            section.error_at(
                p,
                &text("ServerAddress"),
                "has a path",
                "give host[:port] only; put a prefix for the cache's objects in \"Path\"",
            );
        }
    }
    if let Some(sse) = text_of(&settings, "ServerSideEncryption") {
        // cacheconfig.go's EncryptionType: anything else is logged and means no encryption.
        let known = ["S3", "AES256", "KMS", "AWS:KMS", "DSSE-KMS", "AWS:KMS:DSSE"];
        if !known.contains(&sse.to_ascii_uppercase().as_str()) {
            section.error_at(
                p,
                &text("ServerSideEncryption"),
                format!("\"{}\" is not an encryption gitlab-runner knows (it would store the cache unencrypted)", printable(sse)),
                "use \"S3\", \"KMS\" (with ServerSideEncryptionKeyID) or \"DSSE-KMS\"",
            );
        }
    }
    if has(&settings, "UploadRoleARN") {
        section.warning_at(
            p,
            &text("UploadRoleARN"),
            "is deprecated in gitlab-runner",
            "use \"RoleARN\"",
        );
    }
    let keys_given = given(section, "AccessKey") || given(section, "SecretKey");
    // gitlab-runner reads it in any case (`CacheS3Config.AuthType`).
    let auth = text_of(&settings, "AuthenticationType").map(str::to_ascii_lowercase);
    let auth = match auth.as_deref() {
        None if keys_given => "access-key",
        None => "iam",
        Some(a @ ("iam" | "access-key")) => a,
        Some(other) => {
            section.error_at(
                p,
                &text("AuthenticationType"),
                format!("\"{}\" is not an authentication type", printable(other)),
                "use \"iam\" (the instance's role) or \"access-key\" (AccessKey and SecretKey)",
            );
            return settings;
        }
    };
    if auth == "iam" && (keys_given || given(section, "SessionToken")) {
        section.error_at(
            p,
            &text("AuthenticationType"),
            "is \"iam\", but keys are given too: gitlab-runner would ignore them",
            "remove AccessKey, SecretKey and SessionToken to use the instance's role, or set \"AuthenticationType\": \"access-key\"",
        );
    }
    if auth == "access-key" {
        for name in ["AccessKey", "SecretKey"] {
            if !given(section, name) {
                section.error_at(
                    p,
                    &text(name),
                    "is missing (AuthenticationType \"access-key\" needs it)",
                    format!("add \"{name}_file\": \"/path/to/file\", or use \"AuthenticationType\": \"iam\" with an instance role"),
                );
            }
        }
    }
    settings.retain(|(k, _)| *k != "AuthenticationType");
    settings.push(("AuthenticationType", CacheValue::Text(auth.to_string())));
    settings
}

/// GCS: the VM's service account (Application Default Credentials), a key file, or AccessID
/// with PrivateKey; gitlab-runner takes CredentialsFile over the other two.
fn gcs(
    section: &Node<'_>,
    settings: Vec<(&'static str, CacheValue)>,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Vec<(&'static str, CacheValue)> {
    required(section, &["BucketName"], CacheType::Gcs, p);
    let pair = [given(section, "AccessID"), given(section, "PrivateKey")];
    if let Some(file) = text_of(&settings, "CredentialsFile") {
        let at = text("CredentialsFile");
        if pair.contains(&true) {
            section.error_at(
                p,
                &at,
                "is given with AccessID or PrivateKey: gitlab-runner would use the file only",
                "keep CredentialsFile, or AccessID with PrivateKey_file",
            );
        }
        if !file.starts_with('/') {
            section.error_at(
                p,
                &at,
                format!("\"{}\" is not an absolute path (gitlab-runner reads it from its own directory)", printable(file)),
                "write it as an absolute path, e.g. /run/runner-info/gcs-key.json",
            );
        } else {
            service_account_file(section, &at, file, read_file, p);
        }
    } else if pair[0] != pair[1] {
        let missing = if pair[0] { "PrivateKey" } else { "AccessID" };
        section.error_at(
            p,
            &text(missing),
            "is missing: AccessID and PrivateKey go together",
            "give both, or neither to use the VM's service account",
        );
    }
    settings
}

/// gitlab-runner supports only a service account's JSON key (`"type": "service_account"`).
fn service_account_file(
    section: &Node<'_>,
    at: &Key,
    file: &str,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) {
    let problem = match read_file(Path::new(file)) {
        Err(e) => Some(format!("cannot read {}: {e}", printable(file))),
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(json) if json.get("type").and_then(Value::as_str) == Some("service_account") => None,
            // Never quote the file: it holds a private key.
            _ => Some(format!(
                "{} is not a service account's JSON key (\"type\": \"service_account\")",
                printable(file)
            )),
        },
    };
    if let Some(message) = problem {
        section.error_at(
            p,
            at,
            message,
            "give the key file of a service account (gcloud iam service-accounts keys create), readable by root, or remove CredentialsFile to use the VM's service account",
        );
    }
}

/// Azure: the account and container; without AccountKey gitlab-runner uses the VM's managed
/// identity.
fn azure(
    section: &Node<'_>,
    settings: Vec<(&'static str, CacheValue)>,
    p: &mut Problems,
) -> Vec<(&'static str, CacheValue)> {
    required(
        section,
        &["AccountName", "ContainerName"],
        CacheType::Azure,
        p,
    );
    settings
}

/// A value shown in a problem: as the console shows text, cut at 64 characters.
fn printable(value: &str) -> String {
    let mut out: String = crate::console::printable(value).chars().take(64).collect();
    if value.chars().count() > 64 {
        out.push('…');
    }
    out
}
