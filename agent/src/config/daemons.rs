//! What the VM's daemons use besides gitlab-runner, set per fleet: `registry_mirrors` (Docker's
//! and Podman's pull-through caches for Docker Hub), `nix_substituters` and
//! `nix_trusted_public_keys` (binary caches for nix-daemon, besides the image's). The agent
//! writes them into the daemons' configuration before registering (`daemon_config`).

use super::keys;
use super::node::{Node, Problems};

/// At most this many mirrors: each is tried in turn before Docker Hub, so a long list only
/// slows a pull that none of them serves.
pub const MAX_MIRRORS: usize = 8;
/// The longest mirror URL.
const MAX_URL: usize = 256;

/// A pull-through cache of Docker Hub, as Docker's `registry-mirrors` takes it
/// (`https://host[:port]`) and as Podman's registries.conf takes it (`host[:port]`, with
/// `insecure` for plain http).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryMirror {
    pub https: bool,
    /// `host[:port]`.
    pub host: String,
}

impl RegistryMirror {
    /// The URL for Docker's `registry-mirrors`.
    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.host)
    }

    /// Reads a URL from Docker's daemon.json back (the image's own mirrors).
    pub fn parse(url: &str) -> Option<RegistryMirror> {
        let (scheme, rest) = url.split_once("://")?;
        let host = rest.strip_suffix('/').unwrap_or(rest);
        let https = match scheme {
            "https" => true,
            "http" => false,
            _ => return None,
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
        (!host.is_empty() && host.chars().all(plain)).then(|| RegistryMirror {
            https,
            host: host.to_string(),
        })
    }
}

pub(super) fn registry_mirrors(root: &Node<'_>, p: &mut Problems) -> Vec<RegistryMirror> {
    let Some(list) = root.get(&keys::REGISTRY_MIRRORS) else {
        return Vec::new();
    };
    let items = list.string_items(p).unwrap_or_default();
    if items.len() > MAX_MIRRORS {
        list.error(
            p,
            format!("has {} entries, more than {MAX_MIRRORS}", items.len()),
            "keep the pull-through caches the VMs can reach, nearest first",
        );
        return Vec::new();
    }
    let mut mirrors = Vec::new();
    for (node, url) in items {
        let shown = crate::console::printable(url);
        let fix = "write it as \"https://host[:port]\" (a pull-through cache of Docker Hub), without a path, user or password";
        if url.len() > MAX_URL || url.chars().any(crate::console::hides) {
            node.error(
                p,
                "is longer than 256 bytes or contains a control or invisible character",
                fix,
            );
            continue;
        }
        if url.contains('@') {
            // Never echo what may be a password.
            node.error(p, "carries a user name or password", "remove them: Docker and Podman take a mirror's credentials from their own login (docker login), never from its URL");
            continue;
        }
        match RegistryMirror::parse(url) {
            Some(mirror) if !mirrors.contains(&mirror) => mirrors.push(mirror),
            Some(_) => node.warning(
                p,
                format!("\"{shown}\" is listed twice"),
                "list each mirror once",
            ),
            None => node.error(
                p,
                format!("\"{shown}\" is not an http:// or https:// URL of a host"),
                fix,
            ),
        }
    }
    mirrors
}

/// At most this many substituters or keys.
pub const MAX_NIX_ENTRIES: usize = 16;
/// The longest substituter URL or key.
const MAX_NIX_VALUE: usize = 512;

/// Whether a value can stand in nix.conf as one word: no white space (which separates a
/// list's words), no `#` (which starts a comment anywhere on a line), no control or invisible
/// character (a line break would start a setting of its own, `trusted-users = ...`).
fn one_nix_word(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NIX_VALUE
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c == '#' || crate::console::hides(c))
}

fn nix_list<'a>(node: &Node<'a>, p: &mut Problems) -> Vec<(Node<'a>, &'a str)> {
    let items = node.string_items(p).unwrap_or_default();
    if items.len() > MAX_NIX_ENTRIES {
        node.error(
            p,
            format!("has {} entries, more than {MAX_NIX_ENTRIES}", items.len()),
            "keep the binary caches the jobs use",
        );
        return Vec::new();
    }
    items
}

/// Binary caches for nix-daemon besides the image's own (`extra-substituters`).
pub(super) fn nix_substituters(root: &Node<'_>, p: &mut Problems) -> Vec<String> {
    let Some(list) = root.get(&keys::NIX_SUBSTITUTERS) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (node, url) in nix_list(&list, p) {
        let fix = "write it as \"https://cache.example.com\" (a binary cache's URL), one word without spaces, # or control characters";
        if !one_nix_word(url) {
            node.error(
                p,
                "is not one word of at most 512 bytes: it has white space, a # or a control or invisible character",
                fix,
            );
            continue;
        }
        let scheme = url.split_once("://").map(|(s, _)| s);
        if !matches!(scheme, Some("https" | "http" | "s3")) {
            node.error(
                p,
                format!(
                    "\"{}\" is not an https://, http:// or s3:// binary cache",
                    crate::console::printable(url)
                ),
                fix,
            );
            continue;
        }
        if url
            .split_once("://")
            .is_some_and(|(_, rest)| rest.split('/').next().unwrap_or("").contains('@'))
        {
            node.error(p, "carries a user name or password", "remove them: give nix-daemon a netrc file in the image (nix.settings.netrc-file) instead");
            continue;
        }
        out.push(url.to_string());
    }
    if !out.is_empty() && !root.has(&keys::NIX_TRUSTED_PUBLIC_KEYS) {
        list.warning(
            p,
            "no nix_trusted_public_keys: nix-daemon takes a path from these caches only if a key it trusts signed it (the image's keys: cache.nixos.org's by default)",
            "add the caches' keys: \"nix_trusted_public_keys\": [\"cache.example.com-1:...\"]",
        );
    }
    out
}

/// The keys whose signatures nix-daemon trusts besides the image's
/// (`extra-trusted-public-keys`): `name:base64` of an Ed25519 public key.
pub(super) fn nix_trusted_public_keys(root: &Node<'_>, p: &mut Problems) -> Vec<String> {
    let Some(list) = root.get(&keys::NIX_TRUSTED_PUBLIC_KEYS) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (node, key) in nix_list(&list, p) {
        let well_formed = one_nix_word(key)
            && key
                .split_once(':')
                .is_some_and(|(name, data)| !name.is_empty() && ed25519_public_key_in_base64(data));
        if !well_formed {
            node.error(
                p,
                "is not a Nix public key (name:base64 of 32 bytes)",
                "copy the cache's key as its operator publishes it, e.g. \"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"",
            );
            continue;
        }
        out.push(key.to_string());
    }
    out
}

/// 32 bytes in standard base64: 43 characters and one `=`.
fn ed25519_public_key_in_base64(data: &str) -> bool {
    data.len() == 44
        && data.ends_with('=')
        && data[..43]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/')
}
