//! How the agent and gitlab-runner reach GitLab: `url` (normalised the way gitlab-runner does)
//! and `tls_ca_file`.

use std::path::{Path, PathBuf};

use super::ReadFile;
use super::keys;
use super::node::{Node, Problems};

/// The base URL without a trailing `/` or `/ci`.
pub(super) fn url(root: &Node<'_>, p: &mut Problems) -> Option<String> {
    let Some(node) = root.get(&keys::URL) else {
        root.error_at(
            p,
            &keys::URL,
            "is missing",
            "add \"url\": \"https://gitlab.example.com\" (your GitLab's address)",
        );
        return None;
    };
    let url = node.string(p)?.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        node.error(
            p,
            format!("\"{url}\" has no http:// or https:// scheme"),
            format!("write it as \"https://{url}\""),
        );
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if let Some((_, host)) = authority.rsplit_once('@') {
        // Never echo the credentials themselves.
        node.error(
            p,
            format!("\"{scheme}://…@{host}\" carries a user name or password"),
            format!(
                "remove them: write \"{scheme}://{host}\"; the runner authenticates with its token"
            ),
        );
        return None;
    }
    if scheme != "http" && scheme != "https" {
        node.error(
            p,
            format!("scheme \"{scheme}\" is not http or https"),
            format!("write it as \"https://{rest}\""),
        );
        return None;
    }
    if rest.is_empty() || rest.starts_with('/') {
        node.error(
            p,
            format!("\"{url}\" has no host name"),
            "write it as \"https://gitlab.example.com\"",
        );
        return None;
    }
    // gitlab-runner accepts the base URL with or without a trailing / or /ci; normalise the
    // same way so that both programs talk to the same API.
    let base = url.trim_end_matches('/');
    let base = base.strip_suffix("/ci").unwrap_or(base);
    if base.ends_with("/api/v4") {
        node.error(
            p,
            "ends in /api/v4",
            format!(
                "give the GitLab base URL: \"{}\"",
                base.trim_end_matches("/api/v4")
            ),
        );
        return None;
    }
    Some(base.to_string())
}

/// A file of PEM certificates that the agent and gitlab-runner trust besides the system's.
pub(super) fn tls_ca_file(
    root: &Node<'_>,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<PathBuf> {
    let node = root.get(&keys::TLS_CA_FILE)?;
    let file = node.string(p)?;
    match read_file(Path::new(file)) {
        Ok(pem) if pem.contains("-----BEGIN CERTIFICATE-----") => Some(PathBuf::from(file)),
        Ok(_) => {
            node.error(
                p,
                format!("{file} holds no PEM certificate"),
                "give a PEM file (-----BEGIN CERTIFICATE-----); convert DER with openssl x509 -inform der",
            );
            None
        }
        Err(e) => {
            node.error(
                p,
                format!("cannot read {file}: {e}"),
                format!("make {file} exist and readable, or remove tls_ca_file"),
            );
            None
        }
    }
}
