//! How jobs run on this VM: `executor` and its `docker` section, `builds_dir` and the jobs'
//! `environment`.

use super::keys;
use super::node::{Node, Problems};
use super::{DockerSettings, Executor};

pub(super) fn executor(root: &Node<'_>, p: &mut Problems) -> Option<Executor> {
    let Some(node) = root.get(&keys::EXECUTOR) else {
        return Some(Executor::Shell);
    };
    let name = node.string(p)?;
    let executor = Executor::ALL.into_iter().find(|e| e.as_str() == name);
    if executor.is_none() {
        node.error(
            p,
            format!("\"{name}\" is not supported"),
            "use \"shell\" or \"docker\"",
        );
    }
    executor
}

/// The `docker` section; `executor` is None when it is wrong.
pub(super) fn docker(
    root: &Node<'_>,
    executor: Option<Executor>,
    p: &mut Problems,
) -> Option<DockerSettings> {
    let Some(node) = root.get(&keys::DOCKER) else {
        if executor == Some(Executor::Docker) {
            root.error_at(
                p,
                &keys::DOCKER,
                "is missing (the docker executor needs a default image)",
                "add \"docker\": {\"image\": \"alpine:3.20\"}",
            );
        }
        return None;
    };
    let docker = node.object(p, "{\"image\": \"alpine:3.20\"}")?;
    keys::unknown(&docker, keys::DOCKER_SECTION, p);
    if executor == Some(Executor::Shell) {
        docker.warning(
            p,
            "is ignored with the shell executor",
            "set \"executor\": \"docker\", or remove the docker section",
        );
    }
    let image = match docker.get(&keys::IMAGE) {
        Some(image) => image.string(p),
        None => {
            docker.error_at(
                p,
                &keys::IMAGE,
                "is missing",
                "add \"image\": \"alpine:3.20\" (the image for jobs that name none)",
            );
            None
        }
    };
    Some(DockerSettings {
        image: image.unwrap_or_default().to_string(),
        privileged: docker
            .get(&keys::PRIVILEGED)
            .and_then(|n| n.boolean(p))
            .unwrap_or(false),
        volumes: docker
            .get(&keys::VOLUMES)
            .and_then(|n| n.string_list(p))
            .unwrap_or_default(),
    })
}

pub(super) fn builds_dir(root: &Node<'_>, p: &mut Problems) -> Option<String> {
    let node = root.get(&keys::BUILDS_DIR)?;
    let dir = node.string(p)?;
    if !dir.starts_with('/') {
        node.error(
            p,
            format!("\"{dir}\" is not an absolute path"),
            "write it as an absolute path, e.g. /var/lib/scratch/builds",
        );
    }
    Some(dir.to_string())
}

/// `KEY=VALUE` entries for the jobs' environment.
pub(super) fn environment(root: &Node<'_>, p: &mut Problems) -> Vec<String> {
    let items = root.get(&keys::ENVIRONMENT).and_then(|n| n.string_items(p));
    let mut entries = Vec::new();
    for (node, entry) in items.unwrap_or_default() {
        let valid = entry.split_once('=').is_some_and(|(key, _)| {
            !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if !valid {
            node.error(
                p,
                format!("\"{entry}\" is not KEY=VALUE"),
                "write each entry as \"NAME=value\" with a name of letters, digits and _",
            );
        }
        entries.push(entry.to_string());
    }
    entries
}
