# The runner image: the base image plus gitlab-runner-vm, which at boot reads runner.json,
# registers with GitLab, runs N jobs, deregisters and powers the VM off.
#
# Where runner.json comes from:
# - KubeVirt: a Secret (key `runner.json`) attached as a disk with serial `runner-info`, which
#   KubeVirt presents as an ISO 9660 image; it is mounted read-only at /runner-info (nofail: a VM
#   without it still boots, and the agent waits for the file, then fails clearly), readable by
#   root only whatever modes the image's Rock Ridge entries carry (KubeVirt keeps the Secret
#   file's 0644).
# - Clouds without such a disk (AWS, GCE, DigitalOcean): the instance's user-data, which the
#   agent fetches from the platform's metadata service itself (`settings.config-source`) and
#   writes to /run/runner-info/runner.json (0600, in a 0700 directory: root's only, and on a
#   tmpfs, so the token never reaches the instance's disk). No cloud-init: user-data is data,
#   never run, and nothing rebuilds the system from it. The platform's SSH keys go to the
#   operator user through `gitlab-runner-vm ssh-keys` (/run/ssh-keys/<user>); host name and
#   partition growth come from nixpkgs' platform modules (images/).
# - KubeVirt with the broker (`settings.config-source = "broker"`, docs/broker.md): no runner.json
#   anywhere; KubeVirt's serviceAccount volume, a disk with serial `identity` (ISO 9660, label
#   cfgdata), holds the virt-launcher pod's token. It is mounted read-only at /runner-identity
#   the same way as the config disk (whenever it appears, root's only whatever Rock Ridge says),
#   and the agent sends the token to the broker and writes the runner.json of its answer to
#   /run/runner-info/runner.json, as on the clouds.
#
# Who is who (the trust boundary, issue 17):
# - jobs run as the job user (`gitlabRunnerVm.base.user`, "runner"): not in wheel, docker,
#   podman, adm or systemd-journal, no sudo rule, unless `jobsCanBecomeRoot` (a warning says
#   what that costs). Shell jobs that need containers use rootless Podman (subuid/subgid ranges,
#   a lingering user manager for /run/user/<uid>). gitlab-runner, which holds the token, runs
#   as root;
# - people who debug a VM log in as the operator user (`operator.user`, "operator"): SSH keys
#   only, passwordless sudo, a home no job can write. sshd never reads a job user's
#   ~/.ssh/authorized_keys (a job would plant a key there and log in later): keys come from
#   /etc/ssh/authorized_keys.d, /run/ssh-keys (the clouds' metadata), and, where the QEMU guest
#   agent or cloud-init writes them (KubeVirt's accessCredentials), the operator's home only.
#
# An optional scratch disk holds what jobs write: Docker's data, builds, Nix's build directories,
# /tmp, /var/tmp, Podman's storage and the CI user's home (caches, rootless containers), since a
# containerDisk's root file system cannot grow. It is what the platform offers: on KubeVirt an
# emptyDisk with serial `scratch`, on AWS the first instance-store NVMe disk, on GCE the first
# local SSD, on DigitalOcean none. Formatted ext4 when blank; looked for once udev has named the
# block devices the kernel has, never waited for (runner-scratch-disk.sh).
#
# The config disk is mounted whenever it appears, at boot or later (the mount is wanted by the
# disk's device unit, with no device timeout): the agent waits for runner.json (--config-wait)
# and sees the mount come.
# Nothing unique is baked in: machine id and SSH host keys are made at first boot, the runner
# system id by the agent at every boot.
{ config, lib, options, pkgs, utils, ... }:
let
  cfg = config.gitlabRunnerVm.runner;
  inherit (lib) mkIf mkOption types;
  agent = config.services.gitlab-runner-vm;
  mountUnit = path: "${utils.escapeSystemdPath path}.mount";
  configMount = mountUnit cfg.configDisk.mountPoint;
  # The platforms whose metadata service serves runner.json (the agent's --config-source).
  metadataSource = lib.elem agent.settings.config-source [ "aws" "gce" "digitalocean" ];
  # The broker answers with this boot's runner (KubeVirt's serviceAccount disk proves the VM).
  brokerSource = agent.settings.config-source == "broker";
  sshKeysDir = "/run/ssh-keys";
  # With runner.json from a file, the keys still come from whichever platform the VM is on.
  sshKeysSource = if metadataSource then agent.settings.config-source else "auto";
  sshKeyUsers = [ cfg.operator.user ] ++ lib.optional config.gitlabRunnerVm.runner.rootLogin "root";
  jobUser = agent.settings.job-user;
  # How long runner-scratch lets udev finish naming the block devices the kernel has (seconds):
  # the disks already there, never a wait for one that is not.
  scratchUdevTimeout = 10;
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
  runnerUser = lib.escapeShellArg jobUser;
  runnerHome = lib.escapeShellArg config.users.users.${jobUser}.home;
  # A KubeVirt config disk (a Secret or serviceAccount volume: an ISO 9660 image), read-only.
  isoMount = device: {
    inherit device;
    fsType = "iso9660";
    options = [
      "ro"
      # Mounted when the disk appears, whenever that is (x-systemd.wanted-by: the disk's device
      # unit wants the mount, and nothing else does): no device timeout that a slow boot
      # outlasts, and nothing waits for a disk that is not attached. nofail: never ordered
      # before local-fs.target.
      "nofail"
      "x-systemd.wanted-by=${utils.escapeSystemdPath device}.device"
      # Rock Ridge keeps the Secret file's 0644: override it, readable by root (the agent) only.
      "overriderockperm"
      "mode=0400"
      "dmode=0500"
    ];
  };
  mounts = lib.optionalAttrs cfg.configDisk.enable { ${cfg.configDisk.mountPoint} = isoMount cfg.configDisk.device; }
    // lib.optionalAttrs cfg.identityDisk.enable { ${cfg.identityDisk.mountPoint} = isoMount cfg.identityDisk.device; };
  # Jobs' Nix builds run in the daemon's build directories: on the scratch disk.
  nixBuildDir = "${cfg.scratchDisk.mountPoint}/nix-builds";
  source = agent.settings.config-source;
  # The local disks each platform offers for scratch (see scratchDisk.devices).
  platformScratch = {
    aws = [ "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*" ];
    gce = [ "/dev/disk/by-id/google-local-nvme-ssd-*" "/dev/disk/by-id/google-local-ssd-*" ];
    digitalocean = [ ];
  };
in
{
  imports = [
    ./base
    ./caches.nix
    ./gitlab-runner-vm.nix
    ./hardening.nix
    ./metadata-firewall.nix
    (lib.mkRenamedOptionModule [ "runnerImage" ] [ "gitlabRunnerVm" "runner" ])
    (lib.mkRemovedOptionModule [ "gitlabRunnerVm" "runner" "userData" ] ''
      cloud-init no longer copies user-data to runner.json: the agent fetches the instance's
      user-data from the metadata service itself. Set
      services.gitlab-runner-vm.settings.config-source = "aws", "gce" or "digitalocean"
      (the runner-amazon, runner-gce and runner-digital-ocean images do), and leave
      services.cloud-init off.
    '')
  ];

  options.gitlabRunnerVm.runner = {
    configDisk = {
      enable = mkOption {
        type = types.bool;
        default = !(metadataSource || brokerSource);
        defaultText = lib.literalExpression ''!(lib.elem config.services.gitlab-runner-vm.settings.config-source [ "aws" "gce" "digitalocean" "broker" ])'';
        description = ''
          Whether runner.json comes from a config disk (KubeVirt, Proxmox, QEMU), mounted at
          `mountPoint` whenever the disk appears (at boot or later; nothing waits for it, and
          the agent waits for runner.json within `settings.config-wait`). Off when the agent
          fetches it from a cloud's metadata service (those clouds attach no such disk) or
          writes it from the broker's answer. The agent then writes runner.json to
          /run/runner-info/runner.json.
        '';
      };
      serial = mkOption {
        type = types.str;
        default = "runner-info";
        description = ''
          Serial of the disk holding runner.json (the KubeVirt disk's `serial`, at most 20
          characters); it appears as /dev/disk/by-id/virtio-<serial>.
        '';
      };
      device = mkOption {
        type = types.str;
        default = "/dev/disk/by-id/virtio-${cfg.configDisk.serial}";
        defaultText = lib.literalExpression ''"/dev/disk/by-id/virtio-''${config.gitlabRunnerVm.runner.configDisk.serial}"'';
        description = ''
          The config disk's device: the virtio disk with `serial` (KubeVirt, QEMU), or, for a
          CD-ROM on any bus, the ISO 9660 volume's label: `/dev/disk/by-label/cfgdata` in the
          Proxmox VE runner image (`runner-proxmox`), whose fleet script writes one such ISO
          per VM. Mounted the same way whatever the device.
        '';
      };
      mountPoint = mkOption {
        type = types.str;
        default = "/runner-info";
        description = "Where the config disk is mounted (read-only); the agent reads runner.json there.";
      };
    };

    identityDisk = {
      enable = mkOption {
        type = types.bool;
        default = brokerSource;
        defaultText = lib.literalExpression ''config.services.gitlab-runner-vm.settings.config-source == "broker"'';
        description = ''
          Whether KubeVirt's serviceAccount disk (the virt-launcher pod's token, `namespace` and
          `ca.crt` as an ISO 9660 image) is mounted at `mountPoint`, read-only, root's only,
          whenever it appears, for the agent to prove to the broker which VM it is
          (`settings.config-source = "broker"`, docs/broker.md). The agent reads
          `<mountPoint>/token` (`settings.broker-token-file`).
        '';
      };
      serial = mkOption {
        type = types.str;
        default = "identity";
        description = ''
          Serial of the serviceAccount disk (the KubeVirt disk's `serial`, as
          examples/kubevirt/broker/pool.yaml sets it); it appears as
          /dev/disk/by-id/virtio-<serial>. KubeVirt labels every serviceAccount disk `cfgdata`,
          as it does a config disk without `volumeLabel`, so the serial is what tells them apart.
        '';
      };
      device = mkOption {
        type = types.str;
        default = "/dev/disk/by-id/virtio-${cfg.identityDisk.serial}";
        defaultText = lib.literalExpression ''"/dev/disk/by-id/virtio-''${config.gitlabRunnerVm.runner.identityDisk.serial}"'';
        description = "The serviceAccount disk's device.";
      };
      mountPoint = mkOption {
        type = types.str;
        default = "/runner-identity";
        description = "Where the serviceAccount disk is mounted (read-only, files 0400 and root's).";
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
          Serial of the optional scratch disk where the config comes from a file (a KubeVirt
          emptyDisk, a Proxmox or QEMU disk); it appears as /dev/disk/by-id/virtio-<serial>, the
          default of `devices` there.
        '';
      };
      devices = mkOption {
        type = types.listOf types.str;
        default = platformScratch.${source} or [ "/dev/disk/by-id/virtio-${cfg.scratchDisk.serial}" ];
        defaultText = lib.literalExpression ''
          {
            aws = [ "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*" ];
            gce = [ "/dev/disk/by-id/google-local-nvme-ssd-*" "/dev/disk/by-id/google-local-ssd-*" ];
            digitalocean = [ ];
          }.''${config.services.gitlab-runner-vm.settings.config-source}
            or [ "/dev/disk/by-id/virtio-''${config.gitlabRunnerVm.runner.scratchDisk.serial}" ]'';
        example = [ "/dev/disk/by-id/virtio-scratch" "/dev/disk/by-id/nvme-Amazon_EC2_NVMe_Instance_Storage_*" ];
        description = ''
          Where to look for the scratch disk: paths, shell wildcards allowed; the first existing
          whole disk is used (links to partitions, `-partN`, never). Formatted as ext4 when it
          is blank; a disk that holds anything else is left alone. By platform: on AWS the
          first instance-store NVMe disk (instance types with `d`, e.g. m6id), on GCE the first
          local SSD (NVMe or SCSI), on DigitalOcean none (a Droplet has no local disk besides
          its root), elsewhere the virtio disk with `serial`. One disk only: a second
          instance-store disk or local SSD stays unused. Nothing waits for a disk: at boot the
          patterns are matched once udev has named the disks the kernel found; with none,
          everything stays on the root file system.
        '';
      };
      mountPoint = mkOption {
        type = types.str;
        default = "/var/lib/scratch";
        description = ''
          Where the scratch disk is mounted. Docker keeps its data in `docker/` there and jobs
          build in `builds/` (the job user's ~/builds links to it);
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
          when the disk is there): where jobs write besides Docker, builds and Nix's build
          directories. The CI user's home holds the caches of language tools and rootless
          Podman's storage. /nix/store stays on the root file system: Nix builds in
          `<mountPoint>/nix-builds` (`nix.settings.build-dir`), and collects garbage when the
          root file system runs low (`nix.settings.min-free`, `max-free`).
        '';
      };
    };

    jobsCanBecomeRoot = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether jobs can become root: the job user (`gitlabRunnerVm.base.user`) in `wheel` with
        passwordless sudo and in the `docker` group. Off by default: jobs run unprivileged,
        use rootless Podman for containers, and cannot read the runner token, which
        gitlab-runner (root) holds. On, the token is one `sudo` away from every job, which can
        then take other projects' jobs with it for as long as it lives: safe only when every
        project of this runner trusts the others, or with a credential that dies with the VM (a
        runner created for each boot). The module warns at evaluation when it is on.
      '';
    };

    operator = {
      user = mkOption {
        type = types.str;
        default = "operator";
        description = ''
          The user people log in as to debug a VM (SSH keys only, passwordless sudo), never the
          job user: the platform's SSH keys go to it (`platformSshKeys`), and KubeVirt's
          accessCredentials must name it (its QEMU guest agent writes the keys to this user's
          ~/.ssh/authorized_keys). Its home (0700) is out of every job's reach.
        '';
      };
      authorizedKeys = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... ops@example.com" ];
        description = "SSH public keys baked into the image for the operator user (none by default).";
      };
      homedirKeys = mkOption {
        type = types.bool;
        default = !cfg.platformSshKeys;
        defaultText = lib.literalExpression "!config.gitlabRunnerVm.runner.platformSshKeys";
        description = ''
          Whether sshd reads the operator user's ~/.ssh/authorized_keys (and only that user's:
          `services.openssh.authorizedKeysInHomedir` is off for everyone else), where KubeVirt's
          accessCredentials (QEMU guest agent propagation) and cloud-init write keys. Off where
          the keys come from the platform's metadata into /run/ssh-keys.
        '';
      };
    };

    platformSshKeys = mkOption {
      type = types.bool;
      default = metadataSource;
      defaultText = lib.literalExpression ''lib.elem config.services.gitlab-runner-vm.settings.config-source [ "aws" "gce" "digitalocean" ]'';
      description = ''
        Whether the platform's SSH public keys (the EC2 key pair, GCE `ssh-keys` metadata for
        the operator user, `operator:KEY`, the Droplet's keys) are given to the operator user
        (`operator.user`, and root with `rootLogin`) at boot: `gitlab-runner-vm ssh-keys`
        fetches them from the metadata service of `settings.config-source` into
        /run/ssh-keys/<user>, which sshd reads besides the usual files. sshd does not wait for them: a login before they arrive is refused, the
        next one works.
      '';
    };
  };

  config = lib.mkMerge [
    {
      services.gitlab-runner-vm = {
        enable = lib.mkDefault true;
        settings = {
          job-user = lib.mkDefault config.gitlabRunnerVm.base.user;
          config = lib.mkDefault (if cfg.configDisk.enable then "${cfg.configDisk.mountPoint}/runner.json" else "/run/runner-info/runner.json");
          # Where identityDisk puts the pod's token (read only with config-source broker).
          broker-token-file = lib.mkDefault "${cfg.identityDisk.mountPoint}/token";
        };
      };

      # ---- Users: jobs unprivileged, operators apart ---------------------------------------------
      gitlabRunnerVm.base.userCanBecomeRoot = cfg.jobsCanBecomeRoot;
      # (The CI user, which base/users.nix defines: a definition for settings.job-user would
      # define that user, and hide a misspelt one from the module's assertion.)
      users.users.${config.gitlabRunnerVm.base.user} = {
        # Rootless Podman: the job user's ranges in /etc/subuid and /etc/subgid (newuidmap), and
        # a user manager from boot on, so that /run/user/<uid> exists for Podman's runtime files
        # although jobs start without a login session.
        autoSubUidGidRange = lib.mkDefault true;
        linger = lib.mkDefault true;
      };
      users.users.${cfg.operator.user} = {
        isNormalUser = true;
        description = "Operators debugging the VM (SSH keys only)";
        extraGroups = [ "wheel" ];
        openssh.authorizedKeys.keys = cfg.operator.authorizedKeys;
      };
      # Only wheel (the operator, and the job user with jobsCanBecomeRoot) may even run sudo.
      security.sudo.execWheelOnly = lib.mkDefault true;

      # sshd never reads a job-writable ~/.ssh/authorized_keys; the operator's home, which the
      # QEMU guest agent (KubeVirt's accessCredentials) or cloud-init writes, with homedirKeys.
      services.openssh.authorizedKeysInHomedir = lib.mkDefault false;
      services.openssh.extraConfig = mkIf cfg.operator.homedirKeys (lib.mkOrder 2000 ''
        Match User ${cfg.operator.user}
          AuthorizedKeysFile ${toString ([ "%h/.ssh/authorized_keys" ] ++ lib.remove "%h/.ssh/authorized_keys" config.services.openssh.authorizedKeysFiles)}
      '');

      # The host name comes from DHCP or the cloud; the agent names the runner after it.
      # Weaker than mkDefault, so test frameworks and images that name the host win.
      networking.hostName = lib.mkOverride 1200 "";

      fileSystems = mounts;

      # The scratch disk (when the platform has one) and what moves onto it, before local-fs.target
      # so before anything writes to /tmp or the home; without a disk, everything stays on the
      # root file system. It waits for udev to name the disks the kernel has, never for a disk.
      systemd.services.runner-scratch = mkIf cfg.scratchDisk.enable {
        description = "Prepare the scratch space for what jobs write";
        wantedBy = [ "local-fs.target" "multi-user.target" ];
        after = [ "local-fs-pre.target" "systemd-udevd.service" "systemd-udev-trigger.service" ];
        before = [ "local-fs.target" "systemd-tmpfiles-setup.service" "docker.service" "podman.service" "podman.socket" "gitlab-runner-vm.service" "nix-daemon.service" ];
        unitConfig.DefaultDependencies = false;
        path = [ pkgs.util-linux pkgs.coreutils pkgs.e2fsprogs pkgs.gnused config.systemd.package ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          # A disk that hangs mkfs or mount must not hold the boot forever (wanted, not required).
          TimeoutStartSec = "5min";
        };
        script = ''
          ${pkgs.bash}/bin/bash ${./runner-scratch-disk.sh} --mount-point ${scratch} \
            --udev-timeout ${toString scratchUdevTimeout}${lib.concatMapStrings (d: " --device ${lib.escapeShellArg d}") cfg.scratchDisk.devices}
          if mountpoint -q ${scratch}; then
          ${binds}
          fi
          install -d -m 0711 ${scratch}
          install -d -m 0755 -o ${runnerUser} -g users ${builds}
          # Nix's build directories (nix.settings.build-dir): the daemon's, root's.
          install -d -m 0755 ${lib.escapeShellArg nixBuildDir}
          # gitlab-runner runs in the runner's home and builds in ./builds by default.
          if [ ! -e ${runnerHome}/builds ]; then
            ln -s ${builds} ${runnerHome}/builds
            chown -h ${runnerUser}:users ${runnerHome}/builds
          fi
        '';
      };
      virtualisation.docker.daemon.settings.data-root = mkIf cfg.scratchDisk.enable "${cfg.scratchDisk.mountPoint}/docker";
      # Jobs that build with Nix: the builds' directories (sources, objects: often more than the
      # outputs) on the scratch disk, and the store, which stays on the root file system (20 GiB
      # on a containerDisk, whatever the scratch disk holds), collected during a build when it
      # runs low: below min-free free, until max-free is free (paths no root refers to).
      nix.settings = {
        build-dir = mkIf cfg.scratchDisk.enable (lib.mkDefault nixBuildDir);
        min-free = lib.mkDefault (2 * 1024 * 1024 * 1024);
        max-free = lib.mkDefault (6 * 1024 * 1024 * 1024);
      };
      systemd.services.docker = mkIf cfg.scratchDisk.enable {
        wants = [ "runner-scratch.service" ];
        after = [ "runner-scratch.service" ];
      };

      systemd.services.gitlab-runner-vm = {
        after = lib.optional cfg.configDisk.enable configMount
          ++ lib.optional cfg.identityDisk.enable (mountUnit cfg.identityDisk.mountPoint)
          ++ lib.optional cfg.scratchDisk.enable "runner-scratch.service";
        wants = lib.optional cfg.scratchDisk.enable "runner-scratch.service";
      };

      # ---- runner.json and SSH keys from the cloud's metadata service -----------------------------
      # The agent (root) writes runner.json here (0600); tmpfs, so it ends with the VM.
      systemd.tmpfiles.rules = lib.optional (!cfg.configDisk.enable) "d /run/runner-info 0700 root root -";

      # sshd reads the AuthorizedKeysFile list at each login, so it need not wait for the keys.
      services.openssh.authorizedKeysFiles = lib.mkIf cfg.platformSshKeys [ "${sshKeysDir}/%u" ];
      systemd.services.gitlab-runner-vm-ssh-keys = mkIf cfg.platformSshKeys {
        description = "Give the platform's SSH keys to ${lib.concatStringsSep " and " sshKeyUsers}";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # The agent's own metadata settings (a test points --metadata-url elsewhere).
        environment = lib.filterAttrs (name: _: lib.elem name [ "GITLAB_RUNNER_VM_METADATA_URL" "GITLAB_RUNNER_VM_DMI_DIR" ])
          config.systemd.services.gitlab-runner-vm.environment;
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          # The metadata firewall (metadata-firewall.nix) lets this unit's cgroup through.
          ExecStart = map
            (user: "${lib.getExe agent.package} ssh-keys --user ${user} --config-source ${sshKeysSource} --authorized-keys-dir ${sshKeysDir}")
            sshKeyUsers;
          # /run/ssh-keys, root's 0755 as sshd's StrictModes wants; kept after the unit stops.
          RuntimeDirectory = baseNameOf sshKeysDir;
          RuntimeDirectoryMode = "0755";
          RuntimeDirectoryPreserve = true;
          # It parses what the network says: nothing beyond writing that directory.
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          NoNewPrivileges = true;
          CapabilityBoundingSet = "";
          RestrictAddressFamilies = "AF_INET AF_INET6 AF_UNIX";
          TimeoutStartSec = "5min";
        };
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
          assertion = cfg.operator.user != jobUser && cfg.operator.user != "root";
          message = ''
            gitlabRunnerVm.runner.operator.user is "${cfg.operator.user}": it must be neither root
            nor the job user (services.gitlab-runner-vm.settings.job-user), whose home jobs write.
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
