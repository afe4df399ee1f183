# The hosted-runner tool set: compilers, language runtimes, cloud and container CLIs, and nix-ld
# for the prebuilt binaries that jobs download.
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.base;
in
{
  options.gitlabRunnerVm.base = {
    tools.enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Whether to install the hosted-runner tool set (compilers, language runtimes, cloud and
        container CLIs). Off only for small test VMs; images keep it.
      '';
    };

    extraPackages = lib.mkOption {
      type = lib.types.listOf lib.types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.opentofu pkgs.ansible ]";
      description = "More packages for the system profile, beside the base tool set.";
    };
  };

  config = {
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
    programs.nix-ld.enable = lib.mkDefault true;
  };
}
