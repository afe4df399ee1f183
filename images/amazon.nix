# AWS AMI format: nixpkgs' amazon image (ENA, NVMe, SSM agent, EC2 metadata, SSH keys from the
# key pair), UEFI on aarch64 (Graviton), a root disk sized to its contents and grown at boot,
# no nixpkgs channel. User-data may carry runner tokens, so amazon-init, which runs it as a
# script or turns it into /etc/nixos/configuration.nix and rebuilds, is off.
{ config, lib, pkgs, modulesPath, ... }:
let
  diskImage = import ./disk-image.nix { inherit config lib pkgs modulesPath; };
in
{
  imports = [ (modulesPath + "/../maintainers/scripts/ec2/amazon-image.nix") ];

  options.gitlabRunnerVm.amazon.ssmAgent = lib.mkOption {
    type = lib.types.bool;
    default = !(config.services.gitlab-runner-vm.enable or false);
    defaultText = lib.literalExpression "!config.services.gitlab-runner-vm.enable";
    description = ''
      Whether amazon-ssm-agent runs (Session Manager and Run Command: a root shell for whoever
      holds the IAM permissions). Off in runner images, on in the others as in Amazon's AMIs.
    '';
  };

  config = {
    virtualisation.amazon-init.enable = false;
    # nixpkgs' amazon configuration sets it to true without mkDefault.
    services.amazon-ssm-agent.enable = lib.mkOverride 90 config.gitlabRunnerVm.amazon.ssmAgent;
    ec2.efi = lib.mkDefault pkgs.stdenv.hostPlatform.isAarch64;
    # The tool set does not fit the format's 4 GiB default; the EBS volume sets the real size.
    virtualisation.diskSize = lib.mkDefault "auto";

    system.build.amazonImage = lib.mkForce (diskImage {
      name = config.image.baseName;
      inherit (config.amazonImage) contents format;
      partitionTableType = if config.ec2.efi then "efi" else "legacy+gpt";
      postVM = ''
        mkdir -p $out/nix-support
        echo "file ${config.amazonImage.format} $diskImage" >> $out/nix-support/hydra-build-products
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
