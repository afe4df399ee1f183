# Kernel tuning for CI workloads, bounded journald, the root partition grown to the disk, and
# nothing the short-lived VM does not need (documentation, command-not-found).
{ lib, ... }:
{
  boot.kernel.sysctl = {
    # From the seed: CI workloads write a lot and rarely benefit from swapping. (inotify limits
    # and vm.max_map_count are left to NixOS, whose defaults are higher than CI needs.)
    "vm.swappiness" = lib.mkDefault 10;
    "vm.dirty_ratio" = lib.mkDefault 15;
    "vm.dirty_background_ratio" = lib.mkDefault 5;
  };

  # Bounded logs: the VM is short-lived, the disk is small.
  services.journald.extraConfig = ''
    SystemMaxUse=256M
    RuntimeMaxUse=128M
  '';

  # Grow the root partition and file system to the disk at boot.
  boot.growPartition = lib.mkDefault true;

  time.timeZone = lib.mkDefault "UTC";

  # Size: no documentation, no command-not-found database.
  documentation = {
    enable = lib.mkDefault false;
    doc.enable = lib.mkDefault false;
    info.enable = lib.mkDefault false;
    man.enable = lib.mkDefault false;
    nixos.enable = lib.mkDefault false;
  };
  programs.command-not-found.enable = lib.mkDefault false;
}
