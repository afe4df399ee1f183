//! The credential: exactly one of `token`, `registration_token` and `access_token`, each given
//! inline or in a file (`<key>_file`), and for an access token the runner it creates
//! (`runner_type`, `group_id`, `project_id`).

use std::path::Path;

use super::keys::{self, Key, Use};
use super::node::{Node, Problems};
use super::{Credential, CredentialKind, ReadFile, RunnerType};
use crate::secret::Secret;

/// The keys that give a credential inline and in a file.
fn keys_of(kind: CredentialKind) -> (&'static Key, &'static Key) {
    match kind {
        CredentialKind::RunnerToken => (&keys::TOKEN, &keys::TOKEN_FILE),
        CredentialKind::RegistrationToken => {
            (&keys::REGISTRATION_TOKEN, &keys::REGISTRATION_TOKEN_FILE)
        }
        CredentialKind::AccessToken => (&keys::ACCESS_TOKEN, &keys::ACCESS_TOKEN_FILE),
    }
}

pub(super) fn check(
    root: &Node<'_>,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<Credential> {
    let [token, registration, access] =
        CredentialKind::ALL.map(|kind| secret(root, kind, read_file, p));
    // A file that cannot be read still counts as given: its own error says why.
    let given: Vec<CredentialKind> = CredentialKind::ALL
        .into_iter()
        .zip([&token, &registration, &access])
        .filter(|(kind, secret)| secret.is_some() || root.has(keys_of(*kind).1))
        .map(|(kind, _)| kind)
        .collect();
    if given.len() > 1 {
        let names: Vec<_> = given.iter().map(|k| k.as_str()).collect();
        root.error(
            p,
            format!("{} credentials are given ({})", given.len(), names.join(", ")),
            "keep exactly one: token (a glrt- runner authentication token, recommended), registration_token or access_token",
        );
        return None;
    }
    if given.is_empty() && root.has(&keys::URL) {
        root.error_at(
            p,
            &keys::TOKEN,
            "no credential is given",
            "add \"token\": \"glrt-...\" (create a runner in GitLab under Settings > CI/CD > Runners and copy its token)",
        );
    }
    let for_access_token = keys::used_for(Use::AccessToken).any(|k| root.has(k));
    if for_access_token && !given.contains(&CredentialKind::AccessToken) {
        root.error_at(
            p,
            &keys::RUNNER_TYPE,
            "runner_type, group_id and project_id only apply to access_token",
            "remove them, or use access_token",
        );
    }
    if let Some(t) = token {
        if t.expose().starts_with("GR1348941") {
            root.error_at(
                p,
                &keys::TOKEN,
                "this is a registration token (GR1348941...), not a runner authentication token",
                "move it to \"registration_token\", or better create a runner in GitLab and use its glrt- token",
            );
            return None;
        }
        for node in keys::used_for(Use::GitLab).filter_map(|k| root.get(k)) {
            node.warning(
                p,
                "is ignored with a glrt- runner authentication token: GitLab stores it with the runner",
                "set it on the runner in GitLab (Settings > CI/CD > Runners > Edit) and remove it here",
            );
        }
        return Some(Credential::RunnerToken(t));
    }
    if let Some(t) = registration {
        return Some(Credential::RegistrationToken(t));
    }
    let token = access?;
    let runner_type = runner_type(root, p)?;
    Some(Credential::AccessToken { token, runner_type })
}

/// A credential given inline or in a file; at most one of the two.
fn secret(
    root: &Node<'_>,
    kind: CredentialKind,
    read_file: ReadFile<'_>,
    p: &mut Problems,
) -> Option<Secret> {
    let (key, file_key) = keys_of(kind);
    let inline = root.get(key).and_then(|n| n.string(p));
    let file = root.get(file_key).and_then(|n| Some((n.string(p)?, n)));
    let (key, file_key) = (key.name, file_key.name);
    let (file, node) = match (inline, file) {
        (Some(value), None) => return Some(Secret::new(value.trim())),
        (None, None) => return None,
        (Some(_), Some((_, node))) => {
            node.error(
                p,
                format!("both {key} and {file_key} are given"),
                format!("keep only one of {key} and {file_key}"),
            );
            return None;
        }
        (None, Some(file)) => file,
    };
    match read_file(Path::new(file)) {
        Ok(text) if !text.trim().is_empty() => Some(Secret::new(text.trim())),
        Ok(_) => {
            node.error(
                p,
                format!("{file} is empty"),
                format!("write the {key} into {file}"),
            );
            None
        }
        Err(e) => {
            node.error(
                p,
                format!("cannot read {file}: {e}"),
                format!("make {file} exist and readable by the agent, or give {key} inline"),
            );
            None
        }
    }
}

fn runner_type(root: &Node<'_>, p: &mut Problems) -> Option<RunnerType> {
    let Some(node) = root.get(&keys::RUNNER_TYPE) else {
        root.error_at(
            p,
            &keys::RUNNER_TYPE,
            "is missing (access_token needs it)",
            "add \"runner_type\": \"project_type\" with \"project_id\", \"group_type\" with \"group_id\", or \"instance_type\"",
        );
        return None;
    };
    let kind = node.string(p)?;
    let group = id(root, &keys::GROUP_ID, p);
    let project = id(root, &keys::PROJECT_ID, p);
    match kind {
        "instance_type" => Some(RunnerType::Instance),
        "group_type" => match group {
            Some(id) => Some(RunnerType::Group(id)),
            None => {
                if !root.has(&keys::GROUP_ID) {
                    root.error_at(
                        p,
                        &keys::GROUP_ID,
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
                if !root.has(&keys::PROJECT_ID) {
                    root.error_at(
                        p,
                        &keys::PROJECT_ID,
                        "is missing (runner_type project_type needs it)",
                        "add \"project_id\": <the project's numeric id>",
                    );
                }
                None
            }
        },
        other => {
            node.error(
                p,
                format!("\"{other}\" is not a runner type"),
                "use instance_type, group_type or project_type",
            );
            None
        }
    }
}

fn id(root: &Node<'_>, key: &Key, p: &mut Problems) -> Option<u64> {
    root.get(key).and_then(|n| n.integer(p, 1..=u64::MAX))
}
