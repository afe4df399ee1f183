# The base image: a comprehensive CI build environment, like a hosted runner, independent of
# where it runs (the image formats in images/ add boot loader, file systems and cloud agents).
# One file per concern, as in srvos:
#
# - tools.nix: the hosted-runner tool set and nix-ld;
# - containers.nix: Docker and Podman side by side;
# - users.nix: the CI user (`runner` by default), with passwordless sudo and in the docker group
#   unless `userCanBecomeRoot` is off (runner images turn it off by default); OpenSSH with keys
#   only, none baked in;
# - nix.nix: Nix with flakes and configurable substituters, no channel;
# - system.nix: kernel tuning for CI workloads, bounded journald, no documentation.
#
# Every choice here is a default (lib.mkDefault, or an option of gitlabRunnerVm.base): a user's
# own module overrides it without lib.mkForce.
{ lib, ... }:
{
  imports = [
    ./tools.nix
    ./containers.nix
    ./users.nix
    ./nix.nix
    ./system.nix
    # stateVersion, SSH with keys only, flakes.
    ../common.nix
    (lib.mkRenamedOptionModule [ "baseImage" ] [ "gitlabRunnerVm" "base" ])
  ];
}
