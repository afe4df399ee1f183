# The one definition of pkgs.gitlab-runner-vm: the flake's overlays.default, its packages and
# checks, and the default of services.gitlab-runner-vm.package all come from here.
final: _prev: {
  gitlab-runner-vm = final.callPackage ./package.nix { };
}
