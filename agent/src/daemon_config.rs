//! The configuration of the VM's other daemons, per fleet, written before registering so that
//! one image serves fleets with different caches: Docker's `registry-mirrors` (merged into the
//! daemon.json the image has; Docker then reloads it on SIGHUP), Podman's mirrors (a drop-in of
//! containers-registries.conf.d, read by every `podman` run), and nix-daemon's extra
//! substituters and keys (a file the image's nix.conf includes with `!include`; nix-daemon
//! reads its configuration when it starts, so a running one is restarted).
//!
//! The decisions (what each file holds) are pure; `apply` does the I/O: each file written in
//! one rename, the daemon reloaded only when its file changed. Nothing is written when
//! runner.json asks for nothing, so the image's own settings stay as they are.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use crate::config::{NixCaches, RegistryMirror, RunnerConfig};

/// Where the daemons' settings go, and how Docker rereads its own (the agent's flags).
#[derive(Debug, Clone)]
pub struct DaemonPaths {
    pub docker_daemon_json: PathBuf,
    pub docker_reload_command: String,
    pub registries_conf: PathBuf,
    pub nix_conf: PathBuf,
    pub nix_restart_command: String,
    /// How long a reload (restart) command may take (`--daemon-reload-timeout`; a Docker that
    /// is still starting finishes its start first).
    pub reload_timeout: Duration,
}

/// What `apply` did, one line each for the journal.
pub type Applied = Vec<String>;

/// daemon.json with `mirrors` first and the image's own mirrors after them (each once), every
/// other setting as the image has it. `existing` is the image's file (None: there is none).
pub fn docker_daemon_json(
    existing: Option<&str>,
    mirrors: &[RegistryMirror],
) -> Result<String, String> {
    let mut settings = match existing.map(str::trim) {
        None | Some("") => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err("is not a JSON object".into()),
            Err(e) => return Err(format!("is not JSON ({e})")),
        },
    };
    let mut urls: Vec<String> = mirrors.iter().map(RegistryMirror::url).collect();
    match settings.get("registry-mirrors") {
        None => {}
        Some(Value::Array(own)) => {
            for url in own {
                let Some(url) = url.as_str() else {
                    return Err("has a registry-mirrors entry that is not a string".into());
                };
                let same = |u: &String| {
                    RegistryMirror::parse(u).is_some()
                        && RegistryMirror::parse(u) == RegistryMirror::parse(url)
                };
                if !urls.iter().any(same) && !urls.iter().any(|u| u == url) {
                    urls.push(url.to_string());
                }
            }
        }
        Some(_) => return Err("has registry-mirrors that is not a list".into()),
    }
    settings.insert("registry-mirrors".into(), Value::from(urls));
    let mut text = serde_json::to_string_pretty(&Value::Object(settings))
        .map_err(|e| format!("cannot be written ({e})"))?;
    text.push('\n');
    Ok(text)
}

/// The mirrors a daemon.json names (the image's own), for Podman's drop-in.
pub fn mirrors_in_daemon_json(text: &str) -> Vec<RegistryMirror> {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("registry-mirrors").cloned())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|u| u.as_str().and_then(RegistryMirror::parse))
        .collect()
}

/// A containers-registries.conf(5) drop-in (version 2, as drop-ins must be): Docker Hub's
/// images are pulled from each mirror in turn, then from Docker Hub itself.
pub fn registries_conf(mirrors: &[RegistryMirror]) -> String {
    let mut text = String::from(
        "# Written by gitlab-runner-vm from runner.json's registry_mirrors, before the first job.\n\
         [[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n",
    );
    for mirror in mirrors {
        // Validated: host[:port] of letters, digits, `.`, `-`, `:` and brackets only.
        text.push_str(&format!(
            "\n[[registry.mirror]]\nlocation = \"{}\"\n",
            mirror.host
        ));
        if !mirror.https {
            text.push_str("insecure = true\n");
        }
    }
    text
}

/// The nix.conf fragment: the fleet's caches and keys besides the image's (`extra-`: the
/// image's own settings stay), and the caches as trusted substituters, so that a job's `nix`
/// (which reads the same nix.conf and passes its substituters on) is not told that it may not
/// use them. No user becomes trusted. Values are validated as single words (no white space,
/// `#` or line break).
pub fn nix_conf(substituters: &[String], keys: &[String]) -> String {
    let mut text = String::from(
        "# Written by gitlab-runner-vm from runner.json's nix_substituters and\n\
         # nix_trusted_public_keys, before the first job; included by /etc/nix/nix.conf.\n",
    );
    if !substituters.is_empty() {
        let words = substituters.join(" ");
        text.push_str(&format!("extra-substituters = {words}\n"));
        text.push_str(&format!("extra-trusted-substituters = {words}\n"));
    }
    if !keys.is_empty() {
        text.push_str(&format!("extra-trusted-public-keys = {}\n", keys.join(" ")));
    }
    text
}

/// Writes what runner.json asks for and reloads Docker (restarts nix-daemon) if its file
/// changed. An error names the file or command and why: the run fails before registering.
pub async fn apply(paths: &DaemonPaths, config: &RunnerConfig) -> Result<Applied, String> {
    let mut applied = Vec::new();
    if let Some(nix) = &config.nix_caches {
        applied.push(apply_nix(paths, nix).await?);
    }
    if !config.registry_mirrors.is_empty() {
        applied.extend(apply_mirrors(paths, config).await?);
    }
    Ok(applied)
}

async fn apply_nix(paths: &DaemonPaths, nix: &NixCaches) -> Result<String, String> {
    let file = &paths.nix_conf;
    if !has_parent_dir(file) {
        return Ok(format!(
            "no Nix here ({} has no directory): its substituters are not set",
            file.display()
        ));
    }
    let text = nix_conf(&nix.substituters, &nix.trusted_public_keys);
    let existing =
        read_optional(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if existing.as_deref() == Some(text.as_str()) {
        return Ok(format!(
            "{} already holds the fleet's substituters",
            file.display()
        ));
    }
    write_replacing(file, &text).map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    run_reload(&paths.nix_restart_command, paths.reload_timeout).await?;
    Ok(format!(
        "nix-daemon's {} names the substituters {} and {} key(s); restarted with `{}`",
        file.display(),
        if nix.substituters.is_empty() {
            "(none)".to_string()
        } else {
            nix.substituters.join(", ")
        },
        nix.trusted_public_keys.len(),
        paths.nix_restart_command
    ))
}

async fn apply_mirrors(paths: &DaemonPaths, config: &RunnerConfig) -> Result<Applied, String> {
    let mut applied = Vec::new();
    let mirrors = &config.registry_mirrors;
    let mut image_mirrors = Vec::new();
    let docker = &paths.docker_daemon_json;
    if has_parent_dir(docker) {
        let existing = read_optional(docker)
            .map_err(|e| format!("cannot read Docker's {}: {e}", docker.display()))?;
        if let Some(text) = &existing {
            image_mirrors = mirrors_in_daemon_json(text);
        }
        let text = docker_daemon_json(existing.as_deref(), mirrors)
            .map_err(|e| format!("Docker's {} {e}", docker.display()))?;
        if existing.as_deref() != Some(text.as_str()) {
            write_replacing(docker, &text)
                .map_err(|e| format!("cannot write Docker's {}: {e}", docker.display()))?;
            run_reload(&paths.docker_reload_command, paths.reload_timeout).await?;
            applied.push(format!(
                "Docker's {} names the registry mirrors {}; reloaded with `{}`",
                docker.display(),
                list(mirrors),
                paths.docker_reload_command
            ));
        }
    } else {
        applied.push(format!(
            "no Docker here ({} has no directory): its registry mirrors are not set",
            docker.display()
        ));
    }
    let podman = &paths.registries_conf;
    if podman
        .parent()
        .and_then(Path::parent)
        .is_some_and(Path::is_dir)
    {
        let mut all = mirrors.clone();
        all.extend(image_mirrors.into_iter().filter(|m| !mirrors.contains(m)));
        if let Some(dir) = podman.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        write_replacing(podman, &registries_conf(&all))
            .map_err(|e| format!("cannot write Podman's {}: {e}", podman.display()))?;
        applied.push(format!(
            "Podman's {} names the registry mirrors {}",
            podman.display(),
            list(&all)
        ));
    } else {
        applied.push(format!(
            "no Podman here ({} has no containers directory): its registry mirrors are not set",
            podman.display()
        ));
    }
    Ok(applied)
}

fn list(mirrors: &[RegistryMirror]) -> String {
    let urls: Vec<String> = mirrors.iter().map(RegistryMirror::url).collect();
    urls.join(", ")
}

fn has_parent_dir(path: &Path) -> bool {
    path.parent().is_some_and(Path::is_dir)
}

/// The file's text, None when it does not exist (a dangling link included: NixOS links
/// /etc files into the store).
fn read_optional(path: &Path) -> io::Result<Option<String>> {
    match crate::files::read_text(path, crate::files::NAMED_FILE_CAP) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `files::write_atomically` (whole or not at all; a link into the Nix store is replaced, not
/// followed), 0644 whatever the umask: the daemons' settings are no secret, and rootless
/// Podman reads its drop-ins as the job user.
fn write_replacing(path: &Path, text: &str) -> io::Result<()> {
    crate::files::write_atomically(path, text.as_bytes(), 0o644, 0o755)
}

/// Runs a reload command with /bin/sh -c, at most `timeout` (`bounded`: killed whole when
/// the caller stops waiting too).
async fn run_reload(command: &str, timeout: Duration) -> Result<(), String> {
    let mut shell = tokio::process::Command::new("/bin/sh");
    shell.arg("-c").arg(command);
    crate::bounded::run(shell, command, timeout, "--daemon-reload-timeout").await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(url: &str) -> RegistryMirror {
        RegistryMirror::parse(url).unwrap()
    }

    #[test]
    fn daemon_json_keeps_the_image_settings_and_puts_the_fleet_mirrors_first() {
        let image = r#"{"data-root": "/var/lib/scratch/docker", "log-driver": "local",
            "registry-mirrors": ["https://image-mirror.example.com", "https://shared.example.com/"]}"#;
        let text = docker_daemon_json(
            Some(image),
            &[
                mirror("https://fleet.example.com"),
                mirror("https://shared.example.com"),
            ],
        )
        .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["data-root"], "/var/lib/scratch/docker");
        assert_eq!(v["log-driver"], "local");
        assert_eq!(
            v["registry-mirrors"],
            serde_json::json!([
                "https://fleet.example.com",
                "https://shared.example.com",
                "https://image-mirror.example.com"
            ])
        );
        // No file: only the mirrors.
        let text = docker_daemon_json(None, &[mirror("http://10.0.0.5:5000")]).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            serde_json::json!({"registry-mirrors": ["http://10.0.0.5:5000"]})
        );
    }

    #[test]
    fn a_daemon_json_that_is_not_an_object_is_an_error_not_overwritten() {
        for bad in [
            "[1]",
            "{",
            "{\"registry-mirrors\": \"x\"}",
            "{\"registry-mirrors\": [1]}",
        ] {
            assert!(
                docker_daemon_json(Some(bad), &[mirror("https://m")]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn nix_conf_adds_to_the_images_settings_and_trusts_no_user() {
        let text = nix_conf(
            &[
                "https://a.example.com".into(),
                "s3://b?region=eu-west-1".into(),
            ],
            &["a.example.com-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()],
        );
        let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            [
                "extra-substituters = https://a.example.com s3://b?region=eu-west-1",
                "extra-trusted-substituters = https://a.example.com s3://b?region=eu-west-1",
                "extra-trusted-public-keys = a.example.com-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            ]
        );
        assert!(!text.contains("trusted-users"));
        // Keys alone: no substituter lines.
        let text = nix_conf(
            &[],
            &["k:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()],
        );
        let settings: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            settings,
            ["extra-trusted-public-keys = k:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="]
        );
    }

    #[test]
    fn registries_conf_mirrors_docker_hub_and_marks_http_insecure() {
        let text = registries_conf(&[
            mirror("https://mirror.gcr.io"),
            mirror("http://registry-cache.ci:5000"),
        ]);
        let table: toml::Table = text.parse().unwrap();
        let registry = &table["registry"][0];
        assert_eq!(registry["prefix"].as_str(), Some("docker.io"));
        assert_eq!(registry["location"].as_str(), Some("docker.io"));
        let mirrors = registry["mirror"].as_array().unwrap();
        assert_eq!(mirrors[0]["location"].as_str(), Some("mirror.gcr.io"));
        assert_eq!(mirrors[0].get("insecure"), None);
        assert_eq!(
            mirrors[1]["location"].as_str(),
            Some("registry-cache.ci:5000")
        );
        assert_eq!(mirrors[1]["insecure"].as_bool(), Some(true));
    }
}
