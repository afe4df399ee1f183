# DigitalOcean custom image format (x86_64): nixpkgs' DigitalOcean configuration (metadata, SSH
# keys, do-agent), gzipped qcow2, no nixpkgs channel. User-data may carry runner tokens, so the
# rebuild from user-data (a Nix expression in user-data becomes the system) is off.
{ config, lib, pkgs, modulesPath, ... }:
let
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
in
{
  imports = [ (modulesPath + "/virtualisation/digital-ocean-image.nix") ];

  virtualisation.digitalOcean.rebuildFromUserData = false;

  system.build.digitalOceanImage = lib.mkForce (diskImage {
    name = "digital-ocean-image";
    format = "qcow2";
    postVM = ''
      ${pkgs.gzip}/bin/gzip "$diskImage"
    '';
  });

  assertions = [
    {
      assertion = config.virtualisation.digitalOceanImage.compressionMethod == "gzip";
      message = "images/digital-ocean.nix writes gzip only; leave virtualisation.digitalOceanImage.compressionMethod at \"gzip\".";
    }
  ];
}
