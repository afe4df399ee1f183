# What the platform images do, as JSON for tests/nix/check-platforms.py: the AMI builds' postVM
# next to nixpkgs' own amazon image's (both are run and compared there), the plain images, and
# the Proxmox template's /etc/nixos for its clones. Everything is read from evaluated
# configurations and derivations.
{ flake }:
let
  inherit (flake.nixosConfigurations.amazon.pkgs) lib;
  systems = [ "x86_64-linux" "aarch64-linux" ];
  nixpkgsPath = flake.nixosConfigurations.amazon.pkgs.path;

  # nixpkgs' own amazon image, as `nixos-rebuild build-image --image-variant amazon` makes it.
  nixpkgsAmazon = system: (import (nixpkgsPath + "/nixos/lib/eval-config.nix") {
    system = null;
    modules = [
      (nixpkgsPath + "/nixos/maintainers/scripts/ec2/amazon-image.nix")
      { nixpkgs.hostPlatform = system; }
    ];
  }).config;

  amazonImages = [ "runner-amazon" "amazon" "circleci-amazon" ];

  postVM = lib.genAttrs systems (system: {
    ours = lib.genAttrs amazonImages (name:
      let image = flake.packages.${system}.${name}; in {
        inherit (image) postVM;
        version = image.config.system.nixos.version;
        efi = image.config.ec2.efi;
      });
    nixpkgs = let config = nixpkgsAmazon system; in {
      inherit (config.system.build.amazonImage) postVM;
      version = config.system.nixos.version;
      efi = config.ec2.efi;
    };
  });

  normalUsers = config: lib.mapAttrs (_: u: { inherit (u) extraGroups; keys = u.openssh.authorizedKeys.keys; })
    (lib.filterAttrs (_: u: u.isNormalUser) config.users.users);

  plain = name: system:
    let config = flake.packages.${system}.${name}.config; in {
      agent = config.services.gitlab-runner-vm.enable or false;
      services = lib.attrNames (lib.filterAttrs (_: s: s.enable) config.systemd.services);
      docker = config.virtualisation.docker.enable;
      users = normalUsers config;
      ssh = {
        inherit (config.services.openssh) enable;
        inherit (config.services.openssh.settings) PasswordAuthentication KbdInteractiveAuthentication PermitRootLogin;
      };
      packages = lib.sort lib.lessThan (map lib.getName config.environment.systemPackages);
      amazonInit = config.virtualisation.amazon-init.enable or null;
      doRebuildFromUserData = config.virtualisation.digitalOcean.rebuildFromUserData or null;
      doSshKeys = config.virtualisation.digitalOcean.setSshKeys or null;
      cloudInit = config.services.cloud-init.enable;
      channel = config.nix.channel.enable;
      hostPlatform = config.nixpkgs.hostPlatform.system;
    };

  template = flake.nixosConfigurations.proxmox-template.config;

  # CircleCI's machine runner, with a stand-in for the binary this repository does not fetch,
  # for both systems (the image moved to aarch64 as extendModules allows).
  machineRunner = name: source: singleTask: lib.genAttrs systems (system:
    let
      nixos = flake.nixosConfigurations.${name};
      config = (nixos.extendModules {
        modules = [{
          nixpkgs.hostPlatform = system;
          gitlabRunnerVm.circleci.machineRunner = {
            enable = true;
            package = nixos.pkgs.writeShellScriptBin "circleci-runner" "exit 0";
            token.source = source;
            inherit singleTask;
          };
        }];
      }).config;
      service = config.systemd.services.circleci-runner;
    in
    {
      inherit (service) wantedBy after wants;
      serviceConfig = lib.filterAttrs (_: v: builtins.isString v || builtins.isBool v) service.serviceConfig;
      path = map toString service.path;
      display = service.environment.DISPLAY or null;
      ciUser = config.gitlabRunnerVm.base.user;
      hostPlatform = config.nixpkgs.hostPlatform.system;
      # The units of this image that could name the host (whether they exist, and the host name
      # the image is built with: empty when the platform names it).
      hostNameUnits = lib.genAttrs [ "apply-ec2-data" "gce-set-hostname" "digitalocean-set-hostname" ]
        (unit: config.systemd.services ? ${unit} && config.systemd.services.${unit}.enable);
      builtHostName = config.networking.hostName;
      ssmAgent = config.services.amazon-ssm-agent.enable or null;
    });
in
{
  inherit postVM;
  plain = {
    amazon = lib.genAttrs systems (plain "amazon");
    digital-ocean.x86_64-linux = plain "digital-ocean" "x86_64-linux";
    runner-digital-ocean.x86_64-linux = plain "runner-digital-ocean" "x86_64-linux";
  };
  machineRunner = {
    aws = machineRunner "circleci-amazon" "ec2-user-data" true;
    gce = machineRunner "circleci-gce" "gce-metadata" false;
    off = (flake.nixosConfigurations.circleci-amazon.config.systemd.services ? circleci-runner);
  };
  proxmox = {
    inherit (template.gitlabRunnerVm.proxmoxTemplate) configurationNix;
    # Where each file of a clone's /etc/nixos comes from: the text above, or a file of this
    # checkout (read-only evaluation writes nothing to the store, so these are not store paths).
    etcNixos = lib.mapAttrs (_: toString) (removeAttrs template.gitlabRunnerVm.proxmoxTemplate.etcNixos [ "configuration.nix" ]);
    tmpfiles = lib.filter (lib.hasInfix " /etc/nixos") template.systemd.tmpfiles.rules;
    inherit (template.nix) nixPath;
    inherit (template.system) defaultChannel;
    channelRelease = template.system.nixos.release;
  };
}
