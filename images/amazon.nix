# AWS AMI format: nixpkgs' amazon image (ENA, NVMe, SSM agent, EC2 metadata, SSH keys from the
# key pair), UEFI on aarch64 (Graviton), a root disk sized to its contents and grown at boot,
# no nixpkgs channel. User-data may carry runner tokens, so amazon-init, which runs it as a
# script or turns it into /etc/nixos/configuration.nix and rebuilds, is off.
#
# The build replaces nixpkgs' (which copies the nixpkgs channel into the image) and keeps its
# metadata: nix-support/hydra-build-products and nix-support/image-info.json (label, boot mode,
# system, the disk's file and size), which nixpkgs' AMI tools (upload-ami, and create-amis.sh
# before it) and examples/aws/import-image.sh read. tests/nix runs this postVM and nixpkgs' own
# against the same disk and compares what they write.
{ config, lib, pkgs, modulesPath, ... }:
let
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
  runner = config.services.gitlab-runner-vm.enable or false;
  # CircleCI's machine runner (circleci images only): a runner VM too, holding a token.
  machineRunner = config.gitlabRunnerVm.circleci.machineRunner.enable or false;
  jq = lib.getExe pkgs.jq;
  qemu-img = lib.getExe' pkgs.qemu-utils "qemu-img";
in
{
  imports = [ (modulesPath + "/../maintainers/scripts/ec2/amazon-image.nix") ];

  options.gitlabRunnerVm.amazon.ssmAgent = lib.mkOption {
    type = lib.types.bool;
    default = !(runner || machineRunner);
    defaultText = lib.literalExpression "!(config.services.gitlab-runner-vm.enable || config.gitlabRunnerVm.circleci.machineRunner.enable)";
    description = ''
      Whether amazon-ssm-agent runs (Session Manager and Run Command: a root shell for whoever
      holds the IAM permissions, once the instance can register with Systems Manager through an
      instance profile or the account's Default Host Management Configuration). Off in runner
      images (the agent's, and CircleCI's machine runner when enabled), on in the others as in
      Amazon's AMIs.
    '';
  };

  config = {
    virtualisation.amazon-init.enable = false;
    # nixpkgs' amazon configuration sets it to true without mkDefault.
    services.amazon-ssm-agent.enable = lib.mkOverride 90 config.gitlabRunnerVm.amazon.ssmAgent;
    ec2.efi = lib.mkDefault pkgs.stdenv.hostPlatform.isAarch64;
    # The agent names the runner after the host name, which nixpkgs' apply-ec2-data sets.
    # (mkIf on the whole set: a plain image must not get a gitlab-runner-vm unit at all.)
    systemd.services = lib.mkIf runner { gitlab-runner-vm.after = [ "apply-ec2-data.service" ]; };
    # The tool set does not fit the format's 4 GiB default; the EBS volume sets the real size.
    virtualisation.diskSize = lib.mkDefault "auto";

    system.build.amazonImage = lib.mkForce (diskImage {
      name = config.image.baseName;
      inherit (config.amazonImage) contents format;
      partitionTableType = if config.ec2.efi then "efi" else "legacy+gpt";
      postVM = ''
        mkdir -p $out/nix-support
        echo "file ${config.amazonImage.format} $diskImage" >> $out/nix-support/hydra-build-products

        logical_bytes=$(${qemu-img} info --output json "$diskImage" | ${jq} '."virtual-size"')
        ${jq} -n \
          --arg system_version ${lib.escapeShellArg config.system.nixos.version} \
          --arg system ${lib.escapeShellArg pkgs.stdenv.hostPlatform.system} \
          --arg logical_bytes "$logical_bytes" \
          --arg boot_mode ${if config.ec2.efi then "uefi" else "legacy-bios"} \
          --arg file "$diskImage" \
          '{}
          | .label = $system_version
          | .boot_mode = $boot_mode
          | .system = $system
          | .logical_bytes = $logical_bytes
          | .file = $file
          | .disks.root.logical_bytes = $logical_bytes
          | .disks.root.file = $file
          ' > $out/nix-support/image-info.json
      '';
    });

    assertions = [
      {
        assertion = !config.ec2.zfs.enable;
        message = "images/amazon.nix builds ext4 images only; ec2.zfs.enable is not supported here.";
      }
    ];
  };
}
