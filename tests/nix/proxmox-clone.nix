# A clone of the Proxmox template rebuilding itself, as `nixos-rebuild switch` does on it:
# <nixpkgs/nixos> (the template's own nixpkgs, its root channel) with the configuration.nix of
# the /etc/nixos that tests/nix/check-platforms.py laid out from the template's etcNixos
# ($CLONE_ETC_NIXOS), and of a copy with an admin's edit ($CLONE_ETC_NIXOS_EDITED). As JSON:
# what the template and each clone do, to be compared.
{ flake }:
let
  template = flake.nixosConfigurations.proxmox-template;
  inherit (template.pkgs) lib;
  nixpkgsPath = template.pkgs.path;

  # ../shared/nix-eval's nixpkgs lacks the generated Haskell package set; its flake wrapper
  # gives every configuration stand-ins for the Haskell-built lint tools, and so does this
  # evaluation (nothing that a clone's system depends on at run time).
  slim = !builtins.pathExists (nixpkgsPath + "/pkgs/development/haskell-modules/hackage-packages.nix");
  stubs = lib.optional slim (_: prev: {
    shellcheck = prev.hello;
    shellcheck-minimal = prev.hello // { compiler.bootstrapAvailable = false; };
    pandoc = prev.hello;
  });

  rebuild = dir: (import (nixpkgsPath + "/nixos/lib/eval-config.nix") {
    # nixos-rebuild evaluates <nixpkgs/nixos>, which passes the machine's system.
    system = "x86_64-linux";
    modules = [ (/. + "${dir}/configuration.nix") { nixpkgs.overlays = stubs; } ];
  }).config;

  facts = config: {
    users = lib.mapAttrs (_: u: { inherit (u) extraGroups; keys = u.openssh.authorizedKeys.keys; })
      (lib.filterAttrs (_: u: u.isNormalUser) config.users.users);
    wheelNeedsPassword = config.security.sudo.wheelNeedsPassword;
    ssh = {
      inherit (config.services.openssh) enable;
      inherit (config.services.openssh.settings) PasswordAuthentication KbdInteractiveAuthentication PermitRootLogin;
    };
    cloudInit = {
      inherit (config.services.cloud-init) enable;
      network = config.services.cloud-init.network.enable;
      datasources = config.services.cloud-init.settings.datasource_list or null;
      defaultUser = config.services.cloud-init.settings.system_info.default_user.name or null;
    };
    qemuGuest = config.services.qemuGuest.enable;
    grub = { inherit (config.boot.loader.grub) enable devices efiSupport; };
    root = { inherit (config.fileSystems."/") device fsType autoResize; };
    growPartition = config.boot.growPartition;
    kernelParams = config.boot.kernelParams;
    packages = lib.sort lib.lessThan (lib.unique (map lib.getName config.environment.systemPackages));
    services = lib.attrNames (lib.filterAttrs (_: s: s.enable) config.systemd.services);
    nixPath = config.nix.nixPath;
    inherit (config.system) stateVersion;
    hostPlatform = config.nixpkgs.hostPlatform.system;
    nginx = config.services.nginx.enable;
    toplevel = config.system.build.toplevel.drvPath;
  };
in
{
  template = facts template.config;
  clone = facts (rebuild (builtins.getEnv "CLONE_ETC_NIXOS"));
  edited = facts (rebuild (builtins.getEnv "CLONE_ETC_NIXOS_EDITED"));
}
