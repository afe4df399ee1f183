# The CI user and OpenSSH with keys only. No keys are baked in by default; clouds add them at
# boot through their metadata, KubeVirt through the QEMU guest agent.
#
# Whether the CI user can become root (wheel with passwordless sudo, the docker group) is
# `userCanBecomeRoot`: on in the base and CircleCI images (CircleCI's machine images promise
# sudo and Docker), and in runner images what gitlabRunnerVm.runner.jobsCanBecomeRoot says
# (off by default: the runner token would be one `sudo` away from every job).
{ config, lib, ... }:
let
  cfg = config.gitlabRunnerVm.base;
in
{
  options.gitlabRunnerVm.base = {
    user = lib.mkOption {
      type = lib.types.str;
      default = "runner";
      description = ''
        Name of the CI user, the user jobs run as. With `userCanBecomeRoot` (the base and
        CircleCI images) it has passwordless sudo and is in the docker group.
      '';
    };

    userCanBecomeRoot = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether the CI user can become root: in `wheel` with passwordless sudo (which also lets
        it read the whole journal), and in the `docker` group when Docker is on (the Docker
        socket is root). On in the base and CircleCI images. Runner images set it from
        `gitlabRunnerVm.runner.jobsCanBecomeRoot`, off by default; set that option there, not
        this one.
      '';
    };

    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... ops@example.com" ];
      description = ''
        SSH public keys allowed to log in as the CI user. None are baked in by default; clouds
        add keys at boot through their metadata.
      '';
    };
  };

  config = {
    users.users.${cfg.user} = {
      isNormalUser = true;
      description = "CI jobs";
      extraGroups = lib.optionals cfg.userCanBecomeRoot
        ([ "wheel" ] ++ lib.optional config.virtualisation.docker.enable "docker");
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.wheelNeedsPassword = lib.mkDefault false;
    # SSH itself (keys only): ../common.nix.
  };
}
