//! How jobs run on this VM: `executor` and its `docker` section, `builds_dir` and the jobs'
//! `environment`.

use super::keys;
use super::node::{Node, Problems};
use super::{DockerSettings, Executor};
use std::path::{Path, PathBuf};

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
    super::node::unknown_keys(&docker, keys::DOCKER_SECTION, p);
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
    let privileged_node = docker.get(&keys::PRIVILEGED);
    let privileged = privileged_node
        .as_ref()
        .and_then(|n| n.boolean(p))
        .unwrap_or(false);
    if let (true, Some(node)) = (privileged, &privileged_node) {
        node.warning(
            p,
            ROOT_IN_THE_VM.replace("{what}", "a privileged container"),
            "leave it false unless every project this runner serves trusts the others (docs/security.md); jobs that build images can use rootless tools (buildah, kaniko) instead",
        );
    }
    let mut volumes = Vec::new();
    for (node, volume) in docker
        .get(&keys::VOLUMES)
        .and_then(|n| n.string_items(p))
        .unwrap_or_default()
    {
        if let Some(what) = host_secret_in(volume) {
            node.warning(
                p,
                format!("\"{volume}\" hands every job {what}: any job can read the runner token and take other projects' jobs with it for as long as it lives"),
                "remove it; jobs share files with the VM through the builds directory and caches, never through the agent's or the platform's directories",
            );
        } else if mounts_the_docker_socket(volume) {
            node.warning(
                p,
                ROOT_IN_THE_VM.replace("{what}", &format!("\"{volume}\" hands jobs Docker's socket")),
                "remove it unless every project this runner serves trusts the others (docs/security.md); Docker's API is root in the VM",
            );
        }
        volumes.push(volume.to_string());
    }
    Some(DockerSettings {
        image: image.unwrap_or_default().to_string(),
        privileged,
        volumes,
    })
}

/// What a job that is root in the VM can take: said for each setting that makes it so.
const ROOT_IN_THE_VM: &str = "makes every job root in the VM ({what}): any job can then read config.toml with the runner token and reach the metadata service, and with the token take other projects' jobs for as long as it lives";

/// Directories of the VM that hold the runner's credential: the agent's state (config.toml),
/// runner.json on the config disk and on the clouds, the platforms' copies of user-data.
const SECRET_DIRS: &[(&str, &str)] = &[
    (
        crate::paths::DEFAULT_STATE_DIR,
        "config.toml with the runner token",
    ),
    ("/runner-info", "runner.json"),
    ("/run/runner-info", "runner.json"),
    (
        "/etc/ec2-metadata",
        "the instance's user-data (runner.json)",
    ),
    ("/run/do-metadata", "the Droplet's user-data (runner.json)"),
];

/// The host side of a Docker volume (`host:container[:mode]`) as a path of the VM: /var/run
/// read as /run (a link to it on every image), no trailing `/` (but `/` itself). None for a
/// bare path (a fresh volume at that path in the container) or a named volume (`cache:/cache`,
/// Docker's): nothing of the host's.
fn host_side(volume: &str) -> Option<PathBuf> {
    let (host, _) = volume.split_once(':')?;
    let host = match host.strip_prefix("/var/run") {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => format!("/run{rest}"),
        _ => host.to_string(),
    };
    // Path's components drop trailing and repeated slashes.
    let host: PathBuf = Path::new(&host).components().collect();
    host.is_absolute().then_some(host)
}

/// What of the VM's secrets a Docker volume's host side gives the container: a secret directory
/// itself, one inside it, or one of its ancestors (`/run`, `/`).
pub(super) fn host_secret_in(volume: &str) -> Option<&'static str> {
    let host = host_side(volume)?;
    SECRET_DIRS
        .iter()
        .find(|(dir, _)| Path::new(dir).starts_with(&host) || host.starts_with(dir))
        .map(|(_, what)| *what)
}

/// Whether a Docker volume hands the job the host's Docker socket: the socket itself, or a
/// directory holding it (/run, /var/run, /).
pub(super) fn mounts_the_docker_socket(volume: &str) -> bool {
    let Some(host) = host_side(volume) else {
        return false;
    };
    let name = host.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.ends_with("docker.sock")
        || name.ends_with("containerd.sock")
        || ["/run", "/run/docker", "/"]
            .iter()
            .any(|dir| host == Path::new(dir))
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
