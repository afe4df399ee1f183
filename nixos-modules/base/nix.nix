# Nix for jobs: flakes on, configurable binary caches, the CI user not trusted, no channel.
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.base;
in
{
  options.gitlabRunnerVm.base = {
    substituters = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "https://cache.nixos.org" ];
      example = [ "https://cache.nixos.org" "https://nix-community.cachix.org" ];
      description = "Binary caches for Nix builds in jobs (`nix.settings.substituters`).";
    };

    trustedPublicKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      example = [
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
        "nix-community.cachix.org-1:mB9FSh9qf2dCimDSUo8Zy7bkq5CX+/rkCWyvRCYg3Fs="
      ];
      description = "Keys that sign the substituters' paths (`nix.settings.trusted-public-keys`).";
    };

    nixTrustedUser = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether the CI user is a Nix trusted user (`nix.settings.trusted-users`). A trusted user
        can make the daemon trust any binary cache and key, or import unsigned paths: it is
        root-equivalent, and every job runs as this user. Off: jobs build with the daemon as
        any ordinary user does (the configured substituters, the sandbox).
      '';
    };

    pinNixpkgs = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether `nixpkgs` in the flake registry and NIX_PATH point at the nixpkgs the image was
        built from, so `nix shell nixpkgs#hello` and `nix-shell -p` work offline. This puts the
        nixpkgs source (a few hundred MiB) into the image; off by default, which also turns off
        what `lib.nixosSystem` sets up (`nixpkgs.flake.setFlakeRegistry` and `setNixPath`).
      '';
    };
  };

  # lib.nixosSystem sets nixpkgs.flake.source, whose module then pins the registry and NIX_PATH
  # (and so the source into the closure) unless told otherwise.
  config.nixpkgs.flake = {
    setFlakeRegistry = lib.mkDefault cfg.pinNixpkgs;
    setNixPath = lib.mkDefault cfg.pinNixpkgs;
  };

  config.nix = {
    channel.enable = lib.mkDefault false;
    settings = {
      # experimental-features (flakes): ../common.nix.
      substituters = cfg.substituters;
      trusted-public-keys = cfg.trustedPublicKeys;
      trusted-users = [ "root" ] ++ lib.optional cfg.nixTrustedUser cfg.user;
      auto-optimise-store = lib.mkDefault true;
    };
    registry = lib.mkIf cfg.pinNixpkgs {
      nixpkgs.to = {
        type = "path";
        path = pkgs.path;
      };
    };
    nixPath = lib.mkIf cfg.pinNixpkgs [ "nixpkgs=${pkgs.path}" ];
  };
}
