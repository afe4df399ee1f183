# Proxmox VE golden template (seed 002): a small general-purpose NixOS that clones configure
# with Proxmox's cloud-init drive (host name, static IP or DHCP, SSH keys, user), the QEMU guest
# agent for the Proxmox UI, SSH with keys only, and an admin user with passwordless sudo.
# The image format (images/proxmox.nix) enables cloud-init with networking and the guest agent.
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.proxmoxTemplate;
in
{
  imports = [
    (lib.mkRenamedOptionModule [ "proxmoxTemplate" ] [ "gitlabRunnerVm" "proxmoxTemplate" ])
  ];

  options.gitlabRunnerVm.proxmoxTemplate = {
    adminUser = lib.mkOption {
      type = lib.types.str;
      default = "admin";
      example = "wdiaz";
      description = "Name of the administrator account (passwordless sudo, SSH keys only).";
    };
    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = ''
        SSH public keys of the admin user baked into the template. Clones can add more through
        the cloud-init drive (Proxmox "SSH public key" or Terraform `user_account.keys`).
      '';
    };
  };

  config = {
    system.stateVersion = lib.mkDefault "25.11";

    users.users.${cfg.adminUser} = {
      isNormalUser = true;
      extraGroups = [ "wheel" ];
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.wheelNeedsPassword = lib.mkDefault false;

    services.openssh = {
      enable = lib.mkDefault true;
      settings = {
        PasswordAuthentication = lib.mkDefault false;
        KbdInteractiveAuthentication = lib.mkDefault false;
        PermitRootLogin = lib.mkDefault "no";
      };
    };

    services.qemuGuest.enable = lib.mkDefault true;
    services.cloud-init = {
      enable = lib.mkDefault true;
      network.enable = lib.mkDefault true;
      settings = {
        # Proxmox attaches its cloud-init drive as NoCloud (or ConfigDrive with "configdrive2").
        datasource_list = [ "NoCloud" "ConfigDrive" ];
        # SSH keys and the user name from the cloud-init drive go to the admin account
        # (cloud-init's "default" user). system_info is replaced whole, so it repeats the
        # NixOS module's distro and network renderer.
        users = [ "default" ];
        system_info = {
          distro = "nixos";
          network.renderers = [ "networkd" ];
          default_user = {
            name = cfg.adminUser;
            groups = [ "wheel" ];
            lock_passwd = true;
          };
        };
      };
    };

    nix.settings = {
      experimental-features = [ "nix-command" "flakes" ];
      trusted-users = [ "root" "@wheel" ];
    };

    environment.systemPackages = with pkgs; [ vim git htop curl jq tmux ];
    time.timeZone = lib.mkDefault "UTC";
  };
}
