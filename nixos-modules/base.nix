# The base image: a comprehensive CI build environment, like a hosted runner, independent of
# where it runs (the image formats in images/ add boot loader, file systems and cloud agents).
#
# - a CI user (`runner` by default) with passwordless sudo, in the docker group; SSH keys are an
#   option, none are baked in;
# - Docker and Podman side by side (Podman without dockerCompat, which Docker would conflict with);
# - OpenSSH with keys only; Nix with flakes and configurable substituters;
# - no nixpkgs channel, no documentation, bounded journald, sysctl tuning for CI workloads.
{ config, lib, pkgs, ... }:
let
  cfg = config.baseImage;
  inherit (lib) mkDefault mkOption types;
in
{
  options.baseImage = {
    user = mkOption {
      type = types.str;
      default = "runner";
      description = "Name of the CI user (passwordless sudo, docker group).";
    };

    authorizedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... ops@example.com" ];
      description = ''
        SSH public keys allowed to log in as the CI user. None are baked in by default; clouds
        add keys at boot through their metadata.
      '';
    };

    substituters = mkOption {
      type = types.listOf types.str;
      default = [ "https://cache.nixos.org" ];
      description = "Binary caches for Nix builds in jobs (`nix.settings.substituters`).";
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = "Keys that sign the substituters' paths (`nix.settings.trusted-public-keys`).";
    };

    pinNixpkgs = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether `nixpkgs` in the flake registry and NIX_PATH point at the nixpkgs the image was
        built from, so `nix shell nixpkgs#hello` and `nix-shell -p` work offline. This puts the
        nixpkgs source (a few hundred MiB) into the image; off by default.
      '';
    };

    tools.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether to install the hosted-runner tool set (compilers, language runtimes, cloud and
        container CLIs). Off only for small test VMs; images keep it.
      '';
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      description = "More packages for the system profile, beside the base tool set.";
    };
  };

  config = {
    system.stateVersion = mkDefault "25.11";

    # ---- Tools, like a hosted CI runner ----------------------------------------------------
    environment.systemPackages =
      lib.optionals cfg.tools.enable
        (with pkgs; [
          # shell and core utilities
          bashInteractive
          coreutils
          findutils
          gnugrep
          gnused
          gawk
          diffutils
          patch
          file
          which
          tree
          less
          vim
          htop
          lsof
          procps
          psmisc
          util-linux
          parallel
          moreutils
          time
          # archives and compression
          gnutar
          gzip
          bzip2
          xz
          zstd
          zip
          unzip
          p7zip
          # version control
          git
          git-lfs
          gh
          glab
          # network and data
          curl
          wget
          openssh
          rsync
          dnsutils
          iputils
          netcat-openbsd
          openssl
          cacert
          gnupg
          jq
          yq-go
          sqlite
          # build tool chains
          gnumake
          gcc
          binutils
          cmake
          ninja
          meson
          pkg-config
          autoconf
          automake
          libtool
          gettext
          (python3.withPackages (ps: [ ps.pip ps.virtualenv ]))
          pipx
          nodejs
          yarn
          pnpm
          go
          rustc
          cargo
          rustfmt
          clippy
          jdk21
          maven
          gradle
          ruby
          php
          # containers and clouds
          docker-compose
          docker-buildx
          buildah
          skopeo
          kubectl
          kubernetes-helm
          kind
          awscli2
          # linters
          shellcheck
          yamllint
        ])
      ++ cfg.extraPackages;

    # Prebuilt binaries that jobs download (Node, JDKs, tool caches) expect a generic Linux.
    programs.nix-ld.enable = true;

    # ---- Containers --------------------------------------------------------------------------
    virtualisation.docker = {
      enable = true;
      # Jobs may use overlay networks and restart the daemon; containers do not outlive a VM.
      daemon.settings.live-restore = false;
    };
    # Podman beside Docker: dockerCompat and dockerSocket would conflict with Docker, so both
    # stay off and `podman` is used by its own name.
    virtualisation.podman = {
      enable = true;
      dockerCompat = false;
      dockerSocket.enable = false;
    };

    # ---- Users, sudo, SSH ----------------------------------------------------------------------
    users.users.${cfg.user} = {
      isNormalUser = true;
      description = "CI jobs";
      extraGroups = [ "wheel" "docker" ];
      openssh.authorizedKeys.keys = cfg.authorizedKeys;
    };
    security.sudo.wheelNeedsPassword = false;

    services.openssh = {
      enable = true;
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = mkDefault "prohibit-password";
      };
    };

    # ---- Nix ----------------------------------------------------------------------------------
    nix = {
      channel.enable = false;
      settings = {
        experimental-features = [ "nix-command" "flakes" ];
        substituters = cfg.substituters;
        trusted-public-keys = cfg.trustedPublicKeys;
        trusted-users = [ "root" cfg.user ];
        auto-optimise-store = true;
      };
      registry = lib.mkIf cfg.pinNixpkgs {
        nixpkgs.to = {
          type = "path";
          path = pkgs.path;
        };
      };
      nixPath = lib.mkIf cfg.pinNixpkgs [ "nixpkgs=${pkgs.path}" ];
    };

    # ---- Kernel and system tuning ----------------------------------------------------------------
    boot.kernel.sysctl = {
      # From the seed: CI workloads write a lot and rarely benefit from swapping.
      "vm.swappiness" = 10;
      "vm.dirty_ratio" = 15;
      "vm.dirty_background_ratio" = 5;
      # File watchers (webpack, jest, IDE servers) and many containers.
      "fs.inotify.max_user_watches" = 524288;
      "fs.inotify.max_user_instances" = 1024;
      # Elasticsearch and similar services in jobs.
      "vm.max_map_count" = 262144;
    };

    # Bounded logs: the VM is short-lived, the disk is small.
    services.journald.extraConfig = ''
      SystemMaxUse=256M
      RuntimeMaxUse=128M
    '';

    # Grow the root partition and file system to the disk at boot.
    boot.growPartition = true;

    time.timeZone = mkDefault "UTC";

    # ---- Size: no documentation, no channel (above), no default extras ---------------------------
    documentation = {
      enable = false;
      doc.enable = false;
      info.enable = false;
      man.enable = false;
      nixos.enable = false;
    };
    programs.command-not-found.enable = false;
  };
}
