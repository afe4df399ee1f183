# Proxmox VE VMA format (vzdump-qemu-*.vma.zst, restored with `qmrestore`): nixpkgs' Proxmox
# image with cloud-init (networking from the Proxmox cloud-init drive, host name from the VM
# name) and the QEMU guest agent. Unlike the CI images, the golden template keeps the nixpkgs
# channel: it is a long-lived machine administered with nixos-rebuild, as in seed 002.
{ lib, modulesPath, ... }:
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
  };
  virtualisation.diskSize = lib.mkDefault (8 * 1024);
}
