# The options this project declares, as JSON for docs/render-options.py: evaluated from the
# modules themselves (lib.optionAttrSetToDocList), so docs/options.md cannot drift from them.
# One configuration imports every module that declares options: the runner image (base and
# agent modules, KubeVirt format) plus the CircleCI and Proxmox template profiles.
{ flake }:
let
  nixos = flake.nixosConfigurations.nixos-runner.extendModules {
    modules = [ flake.nixosModules.circleci flake.nixosModules.proxmox-template ];
  };
  inherit (nixos.pkgs) lib;
  docs = options: lib.filter (o: o.visible && !o.internal) (lib.optionAttrSetToDocList options);
in
docs nixos.options.services.gitlab-runner-vm ++ docs nixos.options.gitlabRunnerVm
