//! What the VM's daemons use besides gitlab-runner, set per fleet: `registry_mirrors` (Docker's
//! and Podman's pull-through caches for Docker Hub). The agent writes them into the daemons'
//! configuration before registering (`daemon_config`).

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
