# Proxmox VE golden template (seed 002): a small general-purpose NixOS that clones configure
# with Proxmox's cloud-init drive (host name, static IP or DHCP, SSH keys, user), the QEMU guest
# agent for the Proxmox UI, SSH with keys only, and an admin user with passwordless sudo.
# The image format (images/proxmox.nix) enables cloud-init with networking and the guest agent.
#
# Clones are administered with nixos-rebuild, as in seed 002: at first boot each gets an
# /etc/nixos/configuration.nix that imports the files making the template (this module and
# images/proxmox.nix, copied to /etc/nixos/gitlab-runner-vm/ in the repository's layout, so
# their relative paths hold there too) and repeats its settings; the admin edits it and runs
# `nixos-rebuild switch`, which builds from the root channel, the nixpkgs the template was
# built from. The files are copied only where none exist, so an edit is never overwritten.
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.proxmoxTemplate;

  # This repository's files that make the template, by their path in the repository.
  templateFiles = {
    "nixos-modules/proxmox-template.nix" = ./proxmox-template.nix;
    "nixos-modules/common.nix" = ./common.nix;
    "images/proxmox.nix" = ../images/proxmox.nix;
  };

  nixList = values: if values == [ ] then "[ ]" else "[ ${lib.concatMapStringsSep " " lib.strings.escapeNixString values} ]";
  configurationNix = ''
    # /etc/nixos/configuration.nix of a clone of the gitlab-runner-vm Proxmox template.
    # `sudo nixos-rebuild switch` builds the template's system plus your changes below, from the
    # root channel: the nixpkgs the template was built from (`sudo nix-channel --update` moves it).
    { pkgs, ... }:
    {
      imports = [
        # The template as it was built: its profile, and the VM's hardware (disk, boot loader,
        # cloud-init drive, QEMU guest agent). Copied here at first boot; leave them as they are.
        ${lib.concatMapStringsSep "\n    " (file: "./gitlab-runner-vm/${file}") (lib.attrNames templateFiles)}
      ];

      nixpkgs.hostPlatform = ${lib.strings.escapeNixString config.nixpkgs.hostPlatform.system};

      # The template's settings.
      gitlabRunnerVm.proxmoxTemplate.adminUser = ${lib.strings.escapeNixString cfg.adminUser};
      gitlabRunnerVm.proxmoxTemplate.authorizedKeys = ${nixList cfg.authorizedKeys};

      # Your changes, for example:
      # services.nginx.enable = true;
      # environment.systemPackages = [ pkgs.ripgrep ];
    }
  '';
in
{
  imports = [
    # stateVersion, SSH with keys only, flakes.
    ./common.nix
    (lib.mkRenamedOptionModule [ "proxmoxTemplate" ] [ "gitlabRunnerVm" "proxmoxTemplate" ])
  ];

  options.gitlabRunnerVm.proxmoxTemplate = {
    adminUser = lib.mkOption {
      type = lib.types.str;
      default = "admin";
      example = "wdiaz";
      description = "Name of the administrator account (passwordless sudo, SSH keys only).";
    };
    configurationNix = lib.mkOption {
      type = lib.types.lines;
      readOnly = true;
      default = configurationNix;
      defaultText = lib.literalMD "imports of the template's modules, its settings, room for the admin's changes";
      description = "The text of a clone's /etc/nixos/configuration.nix, as the template writes it at first boot.";
    };
    etcNixos = lib.mkOption {
      type = lib.types.attrsOf lib.types.path;
      readOnly = true;
      default = { "configuration.nix" = builtins.toFile "configuration.nix" cfg.configurationNix; }
        // lib.mapAttrs' (file: source: lib.nameValuePair "gitlab-runner-vm/${file}" source) templateFiles;
      defaultText = lib.literalMD "`configuration.nix` and this module's files under `gitlab-runner-vm/`";
      description = ''
        The files a clone's /etc/nixos starts with, by their path in /etc/nixos: a
        configuration.nix that rebuilds the template, and the modules it imports. Each is copied
        at boot where no file of that name exists yet.
      '';
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
    users.users.${cfg.adminUser} = {
      isNormalUser = true;
      extraGroups = [ "wheel" ];
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.wheelNeedsPassword = lib.mkDefault false;

    # SSH with keys only (common.nix); people log in as the admin user, never as root. Above
    # common.nix's default, below a clone's own plain setting.
    services.openssh.settings.PermitRootLogin = lib.mkOverride 900 "no";

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
      trusted-users = [ "root" "@wheel" ];
    };

    # nixos-rebuild on a clone: <nixpkgs> is the root channel (copied into the image) and
    # <nixos-config> /etc/nixos/configuration.nix, as on any NixOS with channels. A system built
    # from a flake would otherwise point NIX_PATH's nixpkgs at that flake and name no
    # nixos-config. The channel to update from is the release the template was built from.
    nixpkgs.flake.setNixPath = false;
    system.defaultChannel = lib.mkDefault "https://channels.nixos.org/nixos-${config.system.nixos.release}";
    systemd.tmpfiles.rules =
      map (dir: "d /etc/nixos/${dir} 0755 root root -")
        (lib.unique (map dirOf (lib.filter (lib.hasInfix "/") (lib.attrNames cfg.etcNixos))))
      ++ lib.mapAttrsToList (file: source: "C /etc/nixos/${file} - - - - ${source}") cfg.etcNixos
      ++ [ "z /etc/nixos/configuration.nix 0644 root root -" ];

    environment.systemPackages = with pkgs; [ vim git htop curl jq tmux ];
    time.timeZone = lib.mkDefault "UTC";
  };
}
