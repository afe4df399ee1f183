# A plain NixOS for a cloud image (seed 003's simple DigitalOcean image, seed 004's minimal AMI):
# no agent, no CI tool set, no nixpkgs channel. SSH takes keys only; the keys are the platform's,
# which the image format's own services give root at boot (the EC2 key pair, the Droplet's SSH
# keys). Nothing else logs in.
{ lib, options, ... }:
{
  # stateVersion, SSH with keys only, flakes.
  imports = [ ./common.nix ];

  config = lib.mkMerge [
    {
      # The image holds no channel (images/disk-image.nix): administer it from a flake.
      nix.channel.enable = lib.mkDefault false;

      time.timeZone = lib.mkDefault "UTC";
    }
    # AWS: no SSM agent (Session Manager and Run Command, a root shell for whoever holds the IAM
    # permissions), so SSH stays the only way in; `gitlabRunnerVm.amazon.ssmAgent = true` brings
    # it back.
    (lib.optionalAttrs (options ? gitlabRunnerVm.amazon.ssmAgent) {
      gitlabRunnerVm.amazon.ssmAgent = lib.mkDefault false;
    })
  ];
}
