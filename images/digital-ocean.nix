# DigitalOcean custom image format (x86_64): nixpkgs' DigitalOcean configuration (metadata, SSH
# keys, do-agent), gzipped qcow2, no nixpkgs channel. User-data may carry runner tokens, so the
# rebuild from user-data (a Nix expression in user-data becomes the system) is off.
{ config, lib, pkgs, modulesPath, ... }:
let
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
  runner = config.services.gitlab-runner-vm.enable or false;
  doAgent = runner && config.services.do-agent.enable;
in
{
  imports = [ (modulesPath + "/virtualisation/digital-ocean-image.nix") ];

  virtualisation.digitalOcean.rebuildFromUserData = false;

  systemd.services = lib.mkMerge [
    # do-agent (metrics) reads the droplet's metadata. In runner images, which keep users other
    # than root away from it (nixos-modules/hardening.nix), it runs as a user of its own
    # instead of a dynamic one, so that the firewall lets it through by name.
    {
      do-agent.serviceConfig = lib.mkIf doAgent {
        DynamicUser = lib.mkForce false;
        User = "do-agent";
        Group = "do-agent";
      };
    }
    # The agent names the runner after the host name, which nixpkgs' DigitalOcean module sets.
    # (mkIf on the whole set: a plain image must not get a gitlab-runner-vm unit at all.)
    (lib.mkIf runner { gitlab-runner-vm.after = [ "digitalocean-set-hostname.service" ]; })
  ];
  users.users.do-agent = lib.mkIf doAgent {
    isSystemUser = true;
    group = "do-agent";
  };
  users.groups.do-agent = lib.mkIf doAgent { };

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
