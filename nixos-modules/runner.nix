# The runner image: the base image plus gitlab-runner-vm, which at boot reads runner.json,
# registers with GitLab, runs N jobs, deregisters and powers the VM off.
#
# Where runner.json comes from:
# - KubeVirt: a Secret (key `runner.json`) attached as a disk with serial `runner-info`, which
#   KubeVirt presents as an ISO 9660 image; it is mounted read-only at /runner-info (nofail: a VM
#   without it still boots, and the agent waits for the file, then fails clearly), readable by
#   root only whatever modes the image's Rock Ridge entries carry (KubeVirt keeps the Secret
#   file's 0644).
# - Clouds without such a disk (AWS, GCE, DigitalOcean): the instance's user-data, fetched by
#   cloud-init. JSON user-data is copied to /runner-info/runner.json (mode 0600). User-data is
#   data here: cloud-init stores it but does not interpret it (`allow_userdata: false`), so it
#   runs no scripts, cloud-config or part handlers from it and prints none of it to the console;
#   nothing rebuilds the system from it.
#
# An optional scratch disk (serial `scratch`, e.g. a KubeVirt emptyDisk) is formatted on first use
# and holds what jobs write: Docker's data, builds, /tmp, /var/tmp, Podman's storage and the CI
# user's home (caches, rootless containers), since a containerDisk's root file system cannot grow.
# Nothing unique is baked in: machine id and SSH host keys are made at first boot, the runner
# system id by the agent at every boot.
{ config, lib, options, pkgs, utils, ... }:
let
  cfg = config.gitlabRunnerVm.runner;
  inherit (lib) mkIf mkOption types;
  agent = config.services.gitlab-runner-vm;
  mountUnit = path: "${utils.escapeSystemdPath path}.mount";
  configMount = mountUnit cfg.configDisk.mountPoint;
  scratchMount = mountUnit cfg.scratchDisk.mountPoint;
  builds = lib.escapeShellArg "${cfg.scratchDisk.mountPoint}/builds";
  scratch = lib.escapeShellArg cfg.scratchDisk.mountPoint;
  # A bind mount of <scratch>/binds/<path> on each path, made before local-fs.target.
  binds = lib.concatMapStrings
    (path:
      let
        source = lib.escapeShellArg "${cfg.scratchDisk.mountPoint}/binds${path}";
        target = lib.escapeShellArg path;
      in
      ''
        mkdir -p ${target}
        if [ ! -e ${source} ]; then
          mkdir -p ${source}
          # The directory's owner and mode as the image made them (1777 for /tmp).
          chown --reference=${target} ${source} && chmod --reference=${target} ${source}
          cp -a ${target}/. ${source}/
        fi
        mountpoint -q ${target} || mount --bind ${source} ${target}
      '')
    cfg.scratchDisk.paths;
  runnerUser = lib.escapeShellArg agent.settings.runner-user;
  runnerHome = lib.escapeShellArg config.users.users.${agent.settings.runner-user}.home;
  mounts = {
    ${cfg.configDisk.mountPoint} = {
      device = "/dev/disk/by-id/virtio-${cfg.configDisk.serial}";
      fsType = "iso9660";
      # Rock Ridge keeps the Secret file's 0644: override it, readable by root (the agent) only.
      options = [ "ro" "nofail" "x-systemd.device-timeout=10s" "overriderockperms" "mode=0400" "dmode=0500" ];
    };
  }
  // lib.optionalAttrs cfg.scratchDisk.enable {
    ${cfg.scratchDisk.mountPoint} = {
      device = "/dev/disk/by-id/virtio-${cfg.scratchDisk.serial}";
      fsType = "ext4";
      # systemd-makefs formats the disk when it holds no file system yet.
      autoFormat = true;
      options = [ "nofail" "x-systemd.device-timeout=10s" ];
    };
  };
in
{
  imports = [
    ./base
    ./gitlab-runner-vm.nix
    ./hardening.nix
    (lib.mkRenamedOptionModule [ "runnerImage" ] [ "gitlabRunnerVm" "runner" ])
  ];

  options.gitlabRunnerVm.runner = {
    configDisk = {
      serial = mkOption {
        type = types.str;
        default = "runner-info";
        description = ''
          Serial of the disk holding runner.json (the KubeVirt disk's `serial`, at most 20
          characters); it appears as /dev/disk/by-id/virtio-<serial>.
        '';
      };
      mountPoint = mkOption {
        type = types.str;
        default = "/runner-info";
        description = "Where the config disk is mounted (read-only); the agent reads runner.json there.";
      };
    };

    scratchDisk = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = "Whether to use a scratch disk when one is attached.";
      };
      serial = mkOption {
        type = types.str;
        default = "scratch";
        description = ''
          Serial of the optional scratch disk (a KubeVirt emptyDisk); formatted as ext4 on first
          use, it appears as /dev/disk/by-id/virtio-<serial>.
        '';
      };
      mountPoint = mkOption {
        type = types.str;
        default = "/var/lib/scratch";
        description = ''
          Where the scratch disk is mounted. Docker keeps its data in `docker/` there and jobs
          build in `builds/` (the runner user's ~/builds, gitlab-runner's default, links to it);
          the `paths` are bind mounts of `binds/<path>`. Without a scratch disk all of these
          are plain directories on the root file system.
        '';
      };
      paths = mkOption {
        type = types.listOf types.str;
        default = [ "/tmp" "/var/tmp" "/var/lib/containers" config.users.users.${config.gitlabRunnerVm.base.user}.home ];
        defaultText = lib.literalExpression ''[ "/tmp" "/var/tmp" "/var/lib/containers" config.users.users.''${config.gitlabRunnerVm.base.user}.home ]'';
        description = ''
          Directories moved to the scratch disk (bind mounts made at boot, before local-fs.target,
          when the disk is there): where jobs write besides Docker and builds. The CI user's home
          holds the caches of language tools and rootless Podman's storage. /nix/store stays on
          the root file system.
        '';
      };
    };

    userData = {
      enable = mkOption {
        type = types.bool;
        default = config.services.cloud-init.enable;
        defaultText = lib.literalExpression "config.services.cloud-init.enable";
        description = ''
          Whether JSON user-data fetched by cloud-init becomes runner.json when no config disk
          provides one (cloud-init itself is enabled by the image format). cloud-init then
          stores user-data without interpreting it (`allow_userdata: false`: no scripts,
          cloud-config or part handlers, and nothing of it on the console) and applies only the
          platform's metadata: host name, SSH keys (to the CI user), partition growth.
        '';
      };
      datasources = mkOption {
        type = types.listOf types.str;
        default = [ "NoCloud" "ConfigDrive" ];
        example = [ "Ec2" ];
        description = "cloud-init `datasource_list`: the platforms probed for user-data.";
      };
    };
  };

  config = lib.mkMerge [
    {
      services.gitlab-runner-vm = {
        enable = lib.mkDefault true;
        settings = {
          runner-user = lib.mkDefault config.gitlabRunnerVm.base.user;
          config = lib.mkDefault "${cfg.configDisk.mountPoint}/runner.json";
        };
      };

      # The host name comes from DHCP or the cloud; the agent names the runner after it.
      # Weaker than mkDefault, so test frameworks and images that name the host win.
      networking.hostName = lib.mkOverride 1200 "";

      fileSystems = mounts;

      # The scratch mount is nofail, so it is not ordered before local-fs.target: order its users.
      # Early (before local-fs.target, so before anything writes to /tmp or the home) when the
      # disk is there; without it, everything stays on the root file system.
      systemd.services.runner-scratch = mkIf cfg.scratchDisk.enable {
        description = "Prepare the scratch space for what jobs write";
        wantedBy = [ "local-fs.target" "multi-user.target" ];
        wants = [ scratchMount ];
        after = [ scratchMount "local-fs-pre.target" ];
        before = [ "local-fs.target" "systemd-tmpfiles-setup.service" "docker.service" "podman.service" "podman.socket" "gitlab-runner-vm.service" ];
        unitConfig.DefaultDependencies = false;
        path = [ pkgs.util-linux pkgs.coreutils ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = ''
          if mountpoint -q ${scratch}; then
          ${binds}
          fi
          install -d -m 0711 ${scratch}
          install -d -m 0755 -o ${runnerUser} -g users ${builds}
          # gitlab-runner runs in the runner's home and builds in ./builds by default.
          if [ ! -e ${runnerHome}/builds ]; then
            ln -s ${builds} ${runnerHome}/builds
            chown -h ${runnerUser}:users ${runnerHome}/builds
          fi
        '';
      };
      virtualisation.docker.daemon.settings.data-root = mkIf cfg.scratchDisk.enable "${cfg.scratchDisk.mountPoint}/docker";
      systemd.services.docker = mkIf cfg.scratchDisk.enable {
        wants = [ "runner-scratch.service" ];
        after = [ "runner-scratch.service" ];
      };

      systemd.services.gitlab-runner-vm = {
        after = [ configMount ] ++ lib.optional cfg.scratchDisk.enable "runner-scratch.service";
        wants = lib.optional cfg.scratchDisk.enable "runner-scratch.service";
      };

      # ---- runner.json from cloud-init user-data ---------------------------------------------------
      services.cloud-init.settings = mkIf cfg.userData.enable {
        datasource_list = cfg.userData.datasources;
        # User-data is runner.json, which runner-info-user-data takes from user-data.txt; cloud-init
        # stores it there but neither runs nor parses it, so it quotes none of it (its "Unhandled
        # non-multipart" warning did, on the console).
        allow_userdata = false;
        # Data only: keys, host name, files, partition growth. No bootcmd, runcmd or user
        # scripts, no phone-home or power-state-change, no password changes.
        cloud_init_modules = [
          "migrator"
          "seed_random"
          "write-files"
          "growpart"
          "resizefs"
          "update_hostname"
          "resolv_conf"
          "users-groups"
        ];
        cloud_config_modules = [ "ssh" ];
        cloud_final_modules = [ "ssh-authkey-fingerprints" "final-message" ];
      };

      systemd.services.runner-info-user-data = mkIf cfg.userData.enable {
        description = "Take runner.json from cloud-init user-data when no config disk provides it";
        wantedBy = [ "multi-user.target" ];
        wants = [ "cloud-init.service" ];
        after = [ "cloud-init.service" configMount ];
        before = [ "gitlab-runner-vm.service" ];
        path = [ pkgs.jq ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          UMask = "0077";
        };
        script = ''
          target=${lib.escapeShellArg agent.settings.config}
          userdata=/var/lib/cloud/instance/user-data.txt
          if [ -e "$target" ]; then
            echo "$target exists; user-data is not used"
          elif [ ! -s "$userdata" ]; then
            echo "no user-data; $target must come from a config disk"
          elif jq -e 'type == "object"' "$userdata" >/dev/null 2>&1; then
            install -D -m 0600 "$userdata" "$target"
            echo "runner.json taken from user-data"
          else
            echo "user-data is not a JSON object, so not a runner.json"
          fi
        '';
      };

      # ---- Nothing unique in the image ---------------------------------------------------------------
      assertions = [
        {
          assertion = !(config.environment.etc ? "machine-id");
          message = ''
            A runner image must not contain /etc/machine-id (environment.etc."machine-id"): every
            VM booted from the image would share it. systemd creates one at first boot.
          '';
        }
        {
          assertion = lib.all (key: !(lib.hasPrefix builtins.storeDir (toString key.path))) config.services.openssh.hostKeys;
          message = ''
            services.openssh.hostKeys points into the Nix store: every VM would share its SSH host
            keys. Leave them to sshd-keygen, which makes them at first boot.
          '';
        }
      ];
    }
    # NixOS test VMs and `nixos-rebuild build-vm` replace fileSystems with
    # virtualisation.fileSystems: the disks are wanted there too.
    (lib.optionalAttrs (options ? virtualisation.fileSystems) {
      virtualisation.fileSystems = mounts;
    })
  ];
}
