# What every image of this flake shares, written once (as srvos' nixos/common): the NixOS
# release its stateful defaults follow, SSH with keys only, and Nix with flakes. Every value is
# a default (lib.mkDefault): a profile or a user's own module overrides it without lib.mkForce.
{ lib, ... }:
{
  # Kept at the release the images were first built with: stateful defaults (Docker's
  # live-restore, for one) must not change under a running fleet when nixpkgs moves on.
  system.stateVersion = lib.mkDefault "25.11";

  # Keys only: no password or keyboard-interactive login, root only with a key. Which keys,
  # and which users, is each profile's business.
  services.openssh = {
    enable = lib.mkDefault true;
    settings = {
      PasswordAuthentication = lib.mkDefault false;
      KbdInteractiveAuthentication = lib.mkDefault false;
      PermitRootLogin = lib.mkDefault "prohibit-password";
    };
  };

  nix.settings.experimental-features = [ "nix-command" "flakes" ];
}
