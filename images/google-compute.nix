# Google Compute Engine image format: nixpkgs' GCE configuration (guest agent, OS Login, NVMe,
# MTU 1460), UEFI on aarch64 (Axion/T2A), a root disk sized to its contents and grown at boot,
# no nixpkgs channel. The result is GCE's import format: disk.raw in a gzipped tar.
{ config, lib, pkgs, modulesPath, ... }:
let
  cfg = config.virtualisation.googleComputeImage;
  gce = config.gitlabRunnerVm.gce;
  runner = config.services.gitlab-runner-vm.enable or false;
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
in
{
  imports = [ (modulesPath + "/virtualisation/google-compute-image.nix") ./host-key-fingerprints.nix ];

  # Access paths of nixpkgs' GCE configuration that a runner image (where user-data is data and
  # SSH keys go to the operator user) leaves off unless asked: each one is root for whoever
  # controls the instance's metadata or IAM, besides the SSH key.
  options.gitlabRunnerVm.gce = {
    startupScripts = lib.mkOption {
      type = lib.types.bool;
      default = !runner;
      defaultText = lib.literalExpression "!config.services.gitlab-runner-vm.enable";
      description = "Whether metadata `startup-script`s and `shutdown-script`s run (as root).";
    };
    osLogin = lib.mkOption {
      type = lib.types.bool;
      default = !runner;
      defaultText = lib.literalExpression "!config.services.gitlab-runner-vm.enable";
      description = "Whether OS Login (IAM users, admin sudo with roles/compute.osAdminLogin) is on.";
    };
    accountsDaemon = lib.mkOption {
      type = lib.types.bool;
      default = !runner && config.users.mutableUsers;
      defaultText = lib.literalExpression "!config.services.gitlab-runner-vm.enable && config.users.mutableUsers";
      description = ''
        Whether the guest agent creates a sudo user for each `user:key` of the `ssh-keys`
        metadata. Off in runner images: `gitlab-runner-vm ssh-keys` gives the keys for the
        operator user (`operator:KEY`) to that user (gitlabRunnerVm.runner.platformSshKeys), and
        no other user is made.
      '';
    };
  };

  config = {
    virtualisation.googleComputeImage.efi = lib.mkDefault pkgs.stdenv.hostPlatform.isAarch64;

    # gVNIC, Google's virtual NIC: the only one of the third-generation and Arm machine series
    # (C4A, C3, N4...; T2A), which take an image only when it declares GVNIC among its guest OS
    # features (docs/gce.md). nixpkgs' GCE configuration loads virtio_net only; its kernel builds
    # gve as a module. Listed for the initrd so that a kernel without it fails the build rather
    # than a boot (udev loads it for the device).
    boot.initrd.availableKernelModules = [ "gve" ];

    # The host name: nixpkgs leaves it to DHCP, whose client may not set it without polkit
    # (off here), and the guest agent of nixpkgs (20230821) does not set it. As nixpkgs does
    # for EC2 and DigitalOcean: the instance's name, from the metadata service (the runner
    # images' metadata firewall lets this unit through). The agent names the runner after it.
    systemd.services.gce-set-hostname = lib.mkIf (config.networking.hostName == "") {
      description = "Set the host name to the GCE instance's name";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      before = lib.optional runner "gitlab-runner-vm.service";
      path = [ pkgs.curl config.systemd.package ];
      script = ''
        name=$(curl -fsS --retry 5 --retry-connrefused --retry-delay 1 --max-time 10 \
          -H 'Metadata-Flavor: Google' \
          http://169.254.169.254/computeMetadata/v1/instance/hostname)
        # The short name, as cloud-init sets it: <instance>.<zone>.c.<project>.internal
        hostnamectl hostname --transient "''${name%%.*}"
      '';
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
      };
    };

    security.googleOsLogin.enable = lib.mkOverride 90 gce.osLogin;
    systemd.services.google-startup-scripts.enable = lib.mkDefault gce.startupScripts;
    systemd.services.google-shutdown-scripts.enable = lib.mkDefault gce.startupScripts;
    # nixpkgs writes this file whole, with accounts_daemon = users.mutableUsers.
    environment.etc."default/instance_configs.cfg".text = lib.mkIf (!gce.accountsDaemon && config.users.mutableUsers) (lib.mkForce ''
      [Accounts]
      useradd_cmd = useradd -m -s /run/current-system/sw/bin/bash -p * {user}

      [Daemons]
      accounts_daemon = false

      [InstanceSetup]
      set_host_keys = false

      [MetadataScripts]
      default_shell = ${pkgs.stdenv.shell}
      startup = ${lib.boolToString gce.startupScripts}
      shutdown = ${lib.boolToString gce.startupScripts}

      [NetworkInterfaces]
      dhclient_script = ${pkgs.google-guest-configs}/bin/google-dhclient-script
      setup = false
    '');

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
  };
}
