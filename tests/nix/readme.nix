# The README's "Customise an image" section, evaluated (tests/nix/check-readme.py): its example
# module added to the runner image, and each row of its table of images, modules and build
# attributes looked up in the flake.
{ flake, module, rows }:
let
  runner = flake.nixosConfigurations.nixos-runner;
  inherit (runner.pkgs) lib;
  custom = (runner.extendModules { modules = [ module ]; }).config;
in
{
  example = {
    substituters = custom.nix.settings.substituters;
    trustedPublicKeys = custom.nix.settings.trusted-public-keys;
    authorizedKeys = custom.users.users.${custom.gitlabRunnerVm.base.user}.openssh.authorizedKeys.keys;
    systemPackages = map lib.getName custom.environment.systemPackages;
    agentPath = map lib.getName custom.systemd.services.gitlab-runner-vm.path;
    environment = removeAttrs custom.systemd.services.gitlab-runner-vm.environment [ "PATH" ];
    podman = custom.virtualisation.podman.enable;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) custom.assertions);
    inherit (custom) warnings;
  };
  rows = map
    (row: {
      inherit (row) configurations attributes modules;
      missingConfigurations = lib.filter (n: !(flake.nixosConfigurations ? ${n})) row.configurations;
      missingModules = lib.filter (n: !(flake.nixosModules ? ${n})) row.modules;
      # Configurations that build none of the row's attributes.
      missingAttributes = lib.filter
        (n: !lib.any (a: flake.nixosConfigurations.${n}.config.system.build ? ${a}) row.attributes)
        (lib.filter (n: flake.nixosConfigurations ? ${n}) row.configurations);
    })
    rows;
}
