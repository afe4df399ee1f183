# Proxmox VE VMA format (vzdump-qemu-*.vma.zst, restored with `qmrestore`): nixpkgs' Proxmox
# image with cloud-init (networking from the Proxmox cloud-init drive, host name from the VM
# name) and the QEMU guest agent. Unlike the CI images, the golden template keeps the nixpkgs
# channel: it is a long-lived machine administered with nixos-rebuild, as in seed 002.
{ config, lib, modulesPath, ... }:
{
  imports = [ (modulesPath + "/virtualisation/proxmox-image.nix") ];

  proxmox = {
    qemuConf = {
      name = lib.mkDefault "nixos-golden-template";
      cores = lib.mkDefault 2;
      memory = lib.mkDefault 2048;
      agent = lib.mkDefault true;
    };
    cloudInit.enable = true;
    # nixpkgs' VMA build writes every attribute of proxmox.qemuConf into qemu-server.conf,
    # including `diskSize`, which nixpkgs itself renamed to virtualisation.diskSize (24.11) and
    # whose alias warns "Obsolete option ... is used" whenever it is read, though nothing here
    # sets it. The build merges `qemuConf // qemuExtraConf`, so the same line given here hides
    # the alias: qemu-server.conf (and the derivation) stay byte for byte the same.
    qemuExtraConf.diskSize = config.virtualisation.diskSize;
  };
  virtualisation.diskSize = lib.mkDefault (8 * 1024);
}
