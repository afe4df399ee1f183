# KubeVirt qcow2 image format (used directly or inside a containerDisk).
#
# Like nixpkgs' virtualisation/kubevirt.nix (guest agent, SSH, cloud-init, serial console,
# growing root), with what a runner image needs beyond it:
# - an explicit virtual disk size (`virtualisation.diskSize`, default 20 GiB): a containerDisk's
#   disk keeps the image's virtual size forever, so "auto" (about 512 MiB free) is too small;
#   the qcow2 stays sparse, so the file is not larger for it;
# - UEFI where the architecture needs it: aarch64 KubeVirt boots UEFI only, so the image has an
#   ESP there; x86_64 gets a hybrid GPT that boots with BIOS (KubeVirt's default) or UEFI;
# - no nixpkgs channel copied into the image.
{ config, lib, pkgs, modulesPath, ... }:
let
  cfg = config.gitlabRunnerVm.kubevirt;
  efi = cfg.partitionTableType != "legacy";
  bios = cfg.partitionTableType != "efi";
  serialConsole = if pkgs.stdenv.hostPlatform.isAarch64 then "ttyAMA0" else "ttyS0";
in
{
  imports = [
    (modulesPath + "/profiles/qemu-guest.nix")
    (modulesPath + "/image/file-options.nix")
    (modulesPath + "/virtualisation/disk-size-option.nix")
    (lib.mkRenamedOptionModule [ "kubevirtImage" ] [ "gitlabRunnerVm" "kubevirt" ])
  ];

  options.gitlabRunnerVm.kubevirt = {
    partitionTableType = lib.mkOption {
      type = lib.types.enum [ "legacy" "efi" "hybrid" ];
      default = if pkgs.stdenv.hostPlatform.isx86 then "hybrid" else "efi";
      defaultText = lib.literalExpression ''if pkgs.stdenv.hostPlatform.isx86 then "hybrid" else "efi"'';
      description = ''
        Partition table of the image: `legacy` (MBR, BIOS only), `efi` (GPT with an ESP, UEFI
        only; needed on aarch64) or `hybrid` (GPT booting with either firmware).
      '';
    };
    cloudInit = lib.mkOption {
      type = lib.types.bool;
      default = !(config.services.gitlab-runner-vm.enable or false);
      defaultText = lib.literalExpression "!config.services.gitlab-runner-vm.enable";
      description = ''
        Whether cloud-init runs, for SSH keys and settings from a cloudInitNoCloud or
        cloudInitConfigDrive volume. Off in runner images, which take runner.json from their
        config disk and SSH keys from the QEMU guest agent (accessCredentials): without a
        cloud-init volume it would only fail at every boot. When on, a VM without such a volume
        falls back to cloud-init's `None` data source and boots clean.
      '';
    };
    compress = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Whether to write a compressed qcow2 (a smaller containerDisk layer).";
    };
  };

  config = {
    virtualisation.diskSize = lib.mkDefault (20 * 1024);

    fileSystems."/" = {
      device = "/dev/disk/by-label/nixos";
      fsType = "ext4";
      autoResize = true;
    };
    fileSystems."/boot" = lib.mkIf efi {
      device = "/dev/disk/by-label/ESP";
      fsType = "vfat";
    };
    boot.growPartition = true;

    boot.loader.grub = {
      device = if bios then "/dev/vda" else "nodev";
      efiSupport = efi;
      # No NVRAM entries in a fresh VM: install to the removable-media path firmware looks at.
      efiInstallAsRemovable = efi;
    };
    boot.loader.timeout = 0;
    boot.kernelParams = [ "console=${serialConsole}" ];
    systemd.services."serial-getty@${serialConsole}".enable = true;

    services.qemuGuest.enable = lib.mkDefault true;
    services.openssh.enable = lib.mkDefault true;
    # SSH keys from a cloudInitNoCloud or cloudInitConfigDrive volume; both are local disks, so
    # nothing is probed on the network. `None` last: no such volume is not an error.
    services.cloud-init = {
      enable = lib.mkDefault cfg.cloudInit;
      settings.datasource_list = lib.mkDefault [ "NoCloud" "ConfigDrive" "None" ];
    };

    system.nixos.tags = [ "kubevirt" ];
    image.extension = "qcow2";
    system.build.image = config.system.build.kubevirtImage;
    system.build.kubevirtImage = import (modulesPath + "/../lib/make-disk-image.nix") {
      inherit lib config pkgs;
      inherit (config.image) baseName;
      inherit (config.virtualisation) diskSize;
      inherit (cfg) partitionTableType;
      format = if cfg.compress then "qcow2-compressed" else "qcow2";
      copyChannel = false;
    };
  };
}
