# The CI user, passwordless sudo, and OpenSSH with keys only. No keys are baked in by default;
# clouds add them at boot through their metadata, KubeVirt through the QEMU guest agent.
{ config, lib, ... }:
let
  cfg = config.gitlabRunnerVm.base;
in
{
  options.gitlabRunnerVm.base = {
    user = lib.mkOption {
      type = lib.types.str;
      default = "runner";
      description = "Name of the CI user (passwordless sudo, docker group).";
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
      extraGroups = [ "wheel" ] ++ lib.optional config.virtualisation.docker.enable "docker";
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.wheelNeedsPassword = lib.mkDefault false;

    services.openssh = {
      enable = lib.mkDefault true;
      settings = {
        PasswordAuthentication = lib.mkDefault false;
        KbdInteractiveAuthentication = lib.mkDefault false;
        PermitRootLogin = lib.mkDefault "prohibit-password";
      };
    };
  };
}
