# DigitalOcean custom image format (x86_64): nixpkgs' DigitalOcean configuration (metadata, SSH
# keys, do-agent), gzipped qcow2, no nixpkgs channel. User-data may carry runner tokens, so the
# rebuild from user-data (a Nix expression in user-data becomes the system) is off.
{ config, lib, pkgs, modulesPath, ... }:
let
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
  runner = config.services.gitlab-runner-vm.enable or false;
in
{
  imports = [ (modulesPath + "/virtualisation/digital-ocean-image.nix") ./host-key-fingerprints.nix ];

  virtualisation.digitalOcean.rebuildFromUserData = false;

  # The agent names the runner after the host name, which nixpkgs' DigitalOcean module sets.
  # (mkIf on the whole set: a plain image must not get a gitlab-runner-vm unit at all.)
  # do-agent (metrics) reads the droplet's metadata: the metadata firewall lets its unit
  # through (nixos-modules/metadata-firewall.nix, by cgroup), whatever user it runs as.
  systemd.services = lib.mkIf runner { gitlab-runner-vm.after = [ "digitalocean-set-hostname.service" ]; };

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
