# What jobs may reach in a runner image, and what operators can rely on (issue 13):
#
# - the cloud metadata service (169.254.169.254, fd00:ec2::254), which serves runner.json as
#   user-data and instance credentials, is reachable only from the units that need it, matched
#   by cgroup: metadata-firewall.nix (gitlabRunnerVm.runner.metadataFirewall);
# - the firewall is on (GCE turns it off by default) with only SSH open;
# - SSH: no root login; the platform's keys go to the operator user, not root and not the job
#   user (runner.nix's gitlab-runner-vm-ssh-keys on clouds; cloud-init's default user where
#   cloud-init runs); no job-writable ~/.ssh/authorized_keys is read (runner.nix).
#
# Imported by runner.nix, so it applies to every runner image; each setting is an option or a
# default a user's module overrides (PermitRootLogin with lib.mkForce: the amazon format sets it).
{ config, lib, ... }:
let
  inherit (lib) mkOption types;
in
{
  options.gitlabRunnerVm.runner = {
    rootLogin = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether root may log in over SSH (with a key). Off: the platform's SSH keys go to the
        operator user (`gitlabRunnerVm.runner.operator.user`), who has sudo.
      '';
    };
  };

  config = lib.mkMerge [
    {
      # On by default in NixOS, off in nixpkgs' GCE configuration (mkDefault): on in runner
      # images, with only SSH open (services.openssh.openFirewall).
      networking.firewall.enable = lib.mkOverride 900 true;

      # The amazon format sets "prohibit-password" without mkDefault, hence the stronger priority.
      services.openssh.settings.PermitRootLogin = lib.mkOverride 90 (if config.gitlabRunnerVm.runner.rootLogin then "prohibit-password" else "no");

      # Where a runner image runs cloud-init (the cloud images do not; a KubeVirt runner with
      # gitlabRunnerVm.kubevirt.cloudInit does): its keys go to the operator user (never the job
      # user), cloud-init's "default" user, root gets none, and user-data is data. cloud-init
      # stores it but neither runs nor parses it, so it quotes none of it (its "Unhandled
      # non-multipart" warning did, on the console): no scripts, cloud-config or part handlers.
      services.cloud-init.settings = lib.mkIf config.services.cloud-init.enable {
        allow_userdata = false;
        # Data only: keys, host name, files, partition growth. No bootcmd, runcmd or user
        # scripts, no phone-home or power-state-change, no password changes.
        cloud_init_modules = [
          "migrator"
          "seed_random"
          "write-files"
          "growpart"
          "resizefs"
          "update_hostname"
          "resolv_conf"
          "users-groups"
        ];
        cloud_config_modules = [ "ssh" ];
        cloud_final_modules = [ "ssh-authkey-fingerprints" "final-message" ];
        users = [ "default" ];
        disable_root = !config.gitlabRunnerVm.runner.rootLogin;
        system_info = {
          distro = "nixos";
          network.renderers = [ "networkd" ];
          default_user = {
            name = config.gitlabRunnerVm.runner.operator.user;
            lock_passwd = true;
          };
        };
      };
    }
  ];
}
