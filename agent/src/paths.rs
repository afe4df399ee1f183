//! Where the agent's files are by default: written once, read by the command line (its
//! defaults), `facts`, and the checks that name them (config's secret directories).

pub const DEFAULT_CONFIG: &str = "/runner-info/runner.json";
pub const DEFAULT_STATE_DIR: &str = "/run/gitlab-runner-vm";
pub const DEFAULT_KEEP_FILE: &str = "/etc/keep-runner";
pub const DEFAULT_AUTHORIZED_KEYS_DIR: &str = "/run/ssh-keys";
/// Docker's own default; the runner images' dockerd reads it (nixos-modules/runner.nix).
pub const DEFAULT_DOCKER_DAEMON_CONFIG: &str = "/etc/docker/daemon.json";
/// After the image's own drop-ins (`40-...`), so that the fleet's mirrors win.
/// The runner images' nix.conf includes it (`!include`: none is no error).
pub const DEFAULT_NIX_CONF: &str = "/etc/nix/gitlab-runner-vm.conf";
pub const DEFAULT_REGISTRIES_CONF: &str =
    "/etc/containers/registries.conf.d/60-gitlab-runner-vm.conf";
