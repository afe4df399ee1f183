# Google Compute Engine image format: nixpkgs' GCE configuration (guest agent, OS Login, NVMe,
# MTU 1460), UEFI on aarch64 (Axion/T2A), a root disk sized to its contents and grown at boot,
# no nixpkgs channel. The result is GCE's import format: disk.raw in a gzipped tar.
{ config, lib, pkgs, modulesPath, ... }:
let
  cfg = config.virtualisation.googleComputeImage;
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
in
{
  imports = [ (modulesPath + "/virtualisation/google-compute-image.nix") ];

  virtualisation.googleComputeImage.efi = lib.mkDefault pkgs.stdenv.hostPlatform.isAarch64;

  system.build.googleComputeImage = lib.mkForce (diskImage {
    name = "google-compute-image";
    format = "raw";
    inherit (cfg) contents;
    partitionTableType = if cfg.efi then "efi" else "legacy";
    memSize = cfg.buildMemSize;
    postVM = ''
      PATH=$PATH:${lib.makeBinPath [ pkgs.gnutar pkgs.gzip ]}
      cd $out
      mv "$diskImage" disk.raw
      tar --sparse --create disk.raw | gzip -${toString cfg.compressionLevel} > ${config.image.fileName}
      rm disk.raw
    '';
  });
}
