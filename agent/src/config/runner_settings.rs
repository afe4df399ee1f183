//! The settings GitLab stores with a runner (`tags`, `run_untagged`, `locked`, `access_level`,
//! `maximum_timeout`): sent when this VM creates its runner. With a `glrt-` token they are
//! ignored, and `credential` warns about them.

use super::keys;
use super::node::{Node, Problems};
use super::{AccessLevel, Credential, RunnerSettings};

pub(super) fn check(
    root: &Node<'_>,
    credential: Option<&Credential>,
    p: &mut Problems,
) -> RunnerSettings {
    let mut tags = Vec::new();
    for (node, tag) in root
        .get(&keys::TAGS)
        .and_then(|n| n.string_items(p))
        .unwrap_or_default()
    {
        if tag.contains(',') {
            node.error(
                p,
                format!("\"{tag}\" contains a comma"),
                "give each tag as its own list entry",
            );
        }
        tags.push(tag.to_string());
    }
    let run_untagged = root.get(&keys::RUN_UNTAGGED).and_then(|n| n.boolean(p));
    let locked = root.get(&keys::LOCKED).and_then(|n| n.boolean(p));
    let access_level = root
        .get(&keys::ACCESS_LEVEL)
        .and_then(|n| access_level(&n, p));
    // GitLab refuses a maximum timeout under 10 minutes with a 400; say so before registering.
    let maximum_timeout = root
        .get(&keys::MAXIMUM_TIMEOUT)
        .and_then(|n| n.seconds(p, 600));
    let creates_runner = matches!(
        credential,
        Some(Credential::RegistrationToken(_) | Credential::AccessToken { .. })
    );
    if creates_runner && run_untagged == Some(false) && tags.is_empty() {
        root.error_at(
            p,
            &keys::RUN_UNTAGGED,
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

fn access_level(node: &Node<'_>, p: &mut Problems) -> Option<AccessLevel> {
    let name = node.string(p)?;
    let level = AccessLevel::ALL.into_iter().find(|l| l.as_str() == name);
    if level.is_none() {
        node.error(
            p,
            format!("\"{name}\" is not an access level"),
            "use \"not_protected\" or \"ref_protected\"",
        );
    }
    level
}
