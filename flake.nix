{
  description = "gitlab-runner-vm: disposable NixOS VMs that run GitLab CI jobs, and their images";

  # Locked in flake.lock; `nix flake update` moves the lock to the branch's head.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # What an image is made of: profiles (nixos-modules/) and image formats (images/).
      modules = {
        gitlab-runner-vm = ./nixos-modules/gitlab-runner-vm.nix;
        base = ./nixos-modules/base;
        runner = ./nixos-modules/runner.nix;
        circleci = ./nixos-modules/circleci.nix;
        proxmox-template = ./nixos-modules/proxmox-template.nix;
        plain = ./nixos-modules/plain.nix;
        kubevirt-image = ./images/kubevirt.nix;
        amazon-image = ./images/amazon.nix;
        google-compute-image = ./images/google-compute.nix;
        digital-ocean-image = ./images/digital-ocean.nix;
        proxmox-image = ./images/proxmox.nix;
        proxmox-runner-image = ./images/proxmox-runner.nix;
      };

      # Runner images without a config disk: on clouds the agent fetches runner.json from the
      # instance's user-data (no cloud-init), and the platform's SSH keys for the CI user; on
      # KubeVirt with the broker it writes the runner.json of the broker's answer.
      configSource = source: {
        services.gitlab-runner-vm.settings.config-source = source;
      };

      # Every image: its modules, the attribute of its build, and the systems it exists for.
      images = {
        nixos-base = {
          modules = [ modules.base modules.kubevirt-image ];
          build = "kubevirtImage";
        };
        nixos-runner = {
          modules = [ modules.runner modules.kubevirt-image ];
          build = "kubevirtImage";
        };
        # KubeVirt, no runner token in the VM: a runner of its own for every boot from the broker
        # (docs/broker.md), for the pod's token on KubeVirt's serviceAccount disk.
        nixos-runner-broker = {
          modules = [ modules.runner modules.kubevirt-image (configSource "broker") ];
          build = "kubevirtImage";
        };
        runner-amazon = {
          modules = [ modules.runner modules.amazon-image (configSource "aws") ];
          build = "amazonImage";
        };
        runner-gce = {
          modules = [ modules.runner modules.google-compute-image (configSource "gce") ];
          build = "googleComputeImage";
        };
        circleci-amazon = {
          modules = [ modules.circleci modules.amazon-image ];
          build = "amazonImage";
        };
        circleci-gce = {
          modules = [ modules.circleci modules.google-compute-image ];
          build = "googleComputeImage";
        };
        proxmox-template = {
          modules = [ modules.proxmox-template modules.proxmox-image ];
          build = "VMA";
          systems = [ "x86_64-linux" ];
        };
        # Imported as a Proxmox template's disk; runner.json on a CD-ROM per VM (examples/proxmox).
        runner-proxmox = {
          modules = [ modules.runner modules.proxmox-runner-image ];
          build = "image";
          systems = [ "x86_64-linux" ];
        };
        runner-digital-ocean = {
          modules = [ modules.runner modules.digital-ocean-image (configSource "digitalocean") ];
          build = "digitalOceanImage";
          systems = [ "x86_64-linux" ];
        };
        # Plain images: a login over SSH with the platform's keys, nothing else.
        amazon = {
          modules = [ modules.plain modules.amazon-image ];
          build = "amazonImage";
        };
        digital-ocean = {
          modules = [ modules.plain modules.digital-ocean-image ];
          build = "digitalOceanImage";
          systems = [ "x86_64-linux" ];
        };
      };

      # A default only, so `extendModules` can move an image to the other system.
      mkSystem = name: system: extraModules:
        lib.nixosSystem {
          modules = [
            ({ config, pkgs, ... }: {
              nixpkgs.hostPlatform = lib.mkDefault system;
              nixpkgs.overlays = [ self.overlays.default ];
              # result/<image>-<NixOS label>-<system>.<ext>; weaker than a format's own name
              # (Proxmox needs vzdump-qemu-*).
              image.baseName = lib.mkOverride 1200 "${name}-${config.system.nixos.label}-${pkgs.stdenv.hostPlatform.system}";
            })
          ]
          ++ extraModules;
        };

      imageSystems = lib.mapAttrs (name: image: lib.genAttrs (image.systems or systems) (system: mkSystem name system image.modules)) images;

      # Boots the runner qcow2 locally with a sample (or the given) runner.json on a config disk
      # and an empty scratch disk, the way KubeVirt presents them.
      runnerVm = pkgs:
        let
          image = imageSystems.nixos-runner.${pkgs.stdenv.hostPlatform.system};
        in
        pkgs.callPackage ./images/run-vm.nix {
          image = image.config.system.build.kubevirtImage;
          inherit (image.config.image) filePath;
          inherit (image.config.gitlabRunnerVm.kubevirt) partitionTableType;
        };

      # `nix fmt` with no arguments formats the whole tree.
      formatterFor = pkgs:
        pkgs.writeShellScriptBin "nixpkgs-fmt-tree" ''
          if [ $# -eq 0 ]; then set -- .; fi
          exec ${lib.getExe pkgs.nixpkgs-fmt} "$@"
        '';
    in
    {
      overlays.default = import ./nix/overlay.nix;

      nixosModules = modules // {
        default = modules.gitlab-runner-vm;
      };

      nixosConfigurations =
        lib.mapAttrs (_: bySystem: bySystem.x86_64-linux) imageSystems
        // {
          # As in seed 000: nix build .#nixosConfigurations.amazonImage.config.system.build.amazonImage
          amazonImage = imageSystems.circleci-amazon.x86_64-linux;
          googleComputeImage = imageSystems.circleci-gce.x86_64-linux;
        };

      packages = forAllSystems (pkgs:
        let
          inherit (pkgs.stdenv.hostPlatform) system;
          # Each image carries the configuration it was built from and its file's path, as
          # nixpkgs' system.build.images do: `nix eval .#nixos-runner.config.image.fileName`.
          imagePackages = lib.mapAttrs
            (name: bySystem:
              let nixos = bySystem.${system}; in
              lib.extendDerivation true { inherit (nixos) config; inherit (nixos.config.image) filePath; }
                nixos.config.system.build.${images.${name}.build})
            (lib.filterAttrs (_: bySystem: bySystem ? ${system}) imageSystems);
          runner = imageSystems.nixos-runner.${system}.config;
          runnerBroker = imageSystems.nixos-runner-broker.${system}.config;
          broker = pkgs.callPackage ./nix/broker-package.nix { };
        in
        imagePackages // {
          inherit (self.overlays.default pkgs pkgs) gitlab-runner-vm;
          nixos-runner-containerdisk = pkgs.callPackage ./images/containerdisk.nix {
            image = runner.system.build.kubevirtImage;
            inherit (runner.image) filePath;
          };
          nixos-runner-broker-containerdisk = pkgs.callPackage ./images/containerdisk.nix {
            image = runnerBroker.system.build.kubevirtImage;
            inherit (runnerBroker.image) filePath;
            name = "nixos-runner-broker";
          };
          gitlab-runner-vm-broker = broker;
          broker-image = pkgs.callPackage ./images/broker-oci.nix { inherit broker; };
          nix-oci = pkgs.callPackage ./images/nix-oci.nix { };
          default = imagePackages.nixos-runner;
        });

      apps = forAllSystems (pkgs: {
        runner-vm = {
          type = "app";
          program = lib.getExe (runnerVm pkgs);
          meta.description = "Boot the runner image in QEMU with a sample runner.json";
        };
      });

      checks = forAllSystems (pkgs:
        let
          tests = import ./tests/nix/vm-tests.nix { inherit pkgs modules; };
        in
        tests // {
          gitlab-runner-vm = self.packages.${pkgs.stdenv.hostPlatform.system}.gitlab-runner-vm;
        });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [
            cargo
            rustc
            rustfmt
            clippy
            gitlab-runner
            nixpkgs-fmt
            deadnix
            qemu_kvm
            xorriso
            skopeo
            jq
          ];
        };
      });

      formatter = forAllSystems formatterFor;
    };
}
