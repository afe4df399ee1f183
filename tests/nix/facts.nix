# What the evaluated configurations do, as JSON for tests/nix/check-facts.py: the images' file
# names on both systems, the runner image's disks, unit and users, the service module on its
# own, and what happens when a user's module overrides the profiles or uses the old option
# names. Everything here is read from evaluated NixOS configurations, none of it from source.
{ flake }:
let
  runnerX86 = flake.nixosConfigurations.nixos-runner;
  inherit (runnerX86.pkgs) lib;
  systems = [ "x86_64-linux" "aarch64-linux" ];

  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);

  unit = config: name: {
    inherit (config.systemd.services.${name}) wantedBy after wants before;
    environment = removeAttrs config.systemd.services.${name}.environment [ "PATH" ];
    path = map lib.getName config.systemd.services.${name}.path;
    serviceConfig = lib.filterAttrs (_: v: builtins.isString v || builtins.isInt v || builtins.isBool v)
      config.systemd.services.${name}.serviceConfig;
  };

  # cloud-init anywhere in a system: its units, its package, units that run it (or Python), by
  # a store path of it (/nix/store/<hash>-cloud-init-<version>) in their command, script or path.
  cloudInitFacts = config:
    let
      runs = what: lib.attrNames (lib.filterAttrs
        (_: s: s.enable && lib.hasInfix what (toString (s.serviceConfig.ExecStart or "") + s.script + toString (map toString s.path)))
        config.systemd.services);
    in
    {
      inherit (config.services.cloud-init) enable;
      units = lib.filter (n: lib.hasPrefix "cloud-" n || lib.hasInfix "cloud-init" n) (lib.attrNames config.systemd.units);
      packages = lib.filter (lib.hasInfix "cloud-init") (map lib.getName (config.environment.systemPackages ++ config.systemd.packages));
      unitsRunningIt = runs "-cloud-init-";
      unitsRunningPython = runs "-python3-";
      pythonPackages = lib.filter (lib.hasPrefix "python") (map lib.getName config.environment.systemPackages);
    };

  # The platform's SSH keys: the unit that fetches them and where sshd looks.
  sshKeysFacts = config: {
    unit = lib.optionalAttrs (config.systemd.services ? gitlab-runner-vm-ssh-keys) (unit config "gitlab-runner-vm-ssh-keys" // {
      execStart = lib.toList config.systemd.services.gitlab-runner-vm-ssh-keys.serviceConfig.ExecStart;
    });
    inherit (config.services.openssh) authorizedKeysFiles;
  };

  mount = config: point: lib.optionalAttrs (config.fileSystems ? ${point}) {
    inherit (config.fileSystems.${point}) device fsType options autoFormat;
  };

  # Who can get in, and what jobs can reach: SSH, the firewall (its evaluated script, run by
  # check-facts.py against a stand-in iptables), cloud-init's users, the platforms' agents.
  access = config: {
    firewall = {
      inherit (config.networking.firewall) enable allowedTCPPorts allowedUDPPorts allowedTCPPortRanges allowedUDPPortRanges extraCommands extraStopCommands;
      nftables = config.networking.nftables.enable;
    };
    # Without allowedUsers: a removed option throws when read.
    metadataFirewall = lib.mapNullable (m: removeAttrs m [ "allowedUsers" ]) (config.gitlabRunnerVm.runner.metadataFirewall or null);
    inherit (config.services.openssh.settings) PermitRootLogin;
    sshOpenFirewall = config.services.openssh.openFirewall;
    sshPorts = config.services.openssh.ports;
    cloudInit = {
      inherit (config.services.cloud-init) enable;
      users = config.services.cloud-init.settings.users or null;
      disableRoot = config.services.cloud-init.settings.disable_root or null;
      defaultUser = config.services.cloud-init.settings.system_info.default_user.name or null;
      allowUserdata = config.services.cloud-init.settings.allow_userdata or true;
      datasources = config.services.cloud-init.settings.datasource_list or null;
      modules = config.services.cloud-init.settings.cloud_init_modules or null;
    };
    sshKeys = sshKeysFacts config;
    ssmAgent = config.services.amazon-ssm-agent.enable;
    osLogin = config.security.googleOsLogin.enable;
    gceStartupScripts = config.systemd.services.google-startup-scripts.enable or null;
    gceInstanceConfigs = config.environment.etc."default/instance_configs.cfg".text or null;
    doAgent = {
      enable = config.services.do-agent.enable;
      user = config.systemd.services.do-agent.serviceConfig.User or null;
    };
  };

  # Nix for jobs: trusted users, and whether the image's nixpkgs source is pinned (and so in
  # its closure): the registry file's and NIX_PATH's string context name it when it is.
  nixFacts = config:
    let
      registryText = config.environment.etc."nix/registry.json".text or "";
      source = config.nixpkgs.flake.source;
      sourcePath = if source == null then null else builtins.unsafeDiscardStringContext (toString source);
      refersToSource = value:
        sourcePath != null && (lib.hasInfix sourcePath value
        || lib.any (p: lib.hasInfix (baseNameOf sourcePath) p) (lib.attrNames (builtins.getContext value)));
    in
    {
      trustedUsers = config.nix.settings.trusted-users;
      registryNixpkgs = config.nix.registry ? nixpkgs;
      inherit (config.nix) nixPath;
      inherit (config.nixpkgs.flake) setFlakeRegistry setNixPath;
      sourceIsSet = source != null;
      registryRefersToSource = refersToSource registryText;
      nixPathRefersToSource = refersToSource (toString (config.environment.sessionVariables.NIX_PATH or ""));
    };

  # Who a job is, and who else logs in: the job user's groups (primary, extra, and groups that
  # list it), the sudo rules naming it or one of those groups, rootless Podman's ranges; the
  # operator user; what sshd reads for keys (the global AuthorizedKeysFile and the Match blocks
  # that extraConfig ends with).
  groupsOf = config: name:
    let u = config.users.users.${name}; in
    lib.unique ([ u.group ] ++ u.extraGroups ++ lib.attrNames (lib.filterAttrs (_: g: lib.elem name g.members) config.users.groups));
  sudoRulesOf = config: name:
    let groups = groupsOf config name; in
    map (r: { inherit (r) users groups; commands = map (c: if builtins.isString c then c else c.command) r.commands; })
      (lib.filter (r: lib.elem name r.users || lib.any (g: lib.elem g groups) r.groups) config.security.sudo.extraRules);
  trustFacts = config:
    let
      jobUser = config.services.gitlab-runner-vm.settings.job-user;
      operator = config.gitlabRunnerVm.runner.operator.user;
      extra = config.services.openssh.extraConfig;
      lines = lib.splitString "\n" extra;
      matchAt = lib.lists.findFirstIndex (lib.hasPrefix "Match ") null lines;
    in
    {
      jobUser = {
        name = jobUser;
        groups = groupsOf config jobUser;
        sudoRules = sudoRulesOf config jobUser;
        inherit (config.users.users.${jobUser}) autoSubUidGidRange subUidRanges subGidRanges linger homeMode;
      };
      operator = {
        name = operator;
        groups = groupsOf config operator;
        sudoRules = sudoRulesOf config operator;
        inherit (config.users.users.${operator}) isNormalUser homeMode createHome;
      };
      sudo = {
        inherit (config.security.sudo) enable execWheelOnly wheelNeedsPassword;
        sudoRs = config.security.sudo-rs.enable;
      };
      podman = config.virtualisation.podman.enable;
      sshd = {
        inherit (config.services.openssh) authorizedKeysInHomedir authorizedKeysFiles authorizedKeysCommand;
        # Everything from the first Match line on (NixOS writes its own lines, AuthorizedKeysFile
        # among them, before): what applies to some users only.
        match = if matchAt == null then [ ] else lib.filter (l: l != "") (lib.drop matchAt lines);
        globalAuthorizedKeysFile = lib.filter (lib.hasPrefix "AuthorizedKeysFile ") (lib.take (if matchAt == null then lib.length lines else matchAt) lines);
      };
      warnings = lib.filter (lib.hasInfix "jobs can become root") config.warnings;
    };

  # A configuration plus a user's module.
  extend = nixos: module: (nixos.extendModules { modules = [ module ]; }).config;

  # Caches (issue 20): what dockerd reads (the file the agent merges runner.json's mirrors
  # into), Podman's drop-in of the image's mirrors, nix.conf's substituters, keys, trusted users
  # and the file of the fleet's that it includes.
  cachesFacts = config: {
    dockerExecStart = config.systemd.services.docker.serviceConfig.ExecStart or null;
    dockerSettings = config.virtualisation.docker.daemon.settings;
    etcDaemonJson = config.environment.etc."docker/daemon.json".text or null;
    podmanMirrors = config.environment.etc."containers/registries.conf.d/40-gitlab-runner-vm-image.conf".text or null;
    agentSettings = lib.filterAttrs (n: _: lib.elem n [ "docker-daemon-config" "registries-conf" "nix-conf" ]) config.services.gitlab-runner-vm.settings;
    nixExtraOptions = config.nix.extraOptions;
    inherit (config.nix.settings) substituters trusted-public-keys trusted-users;
    trustedSubstituters = config.nix.settings.trusted-substituters or [ ];
  };
  # The module options set, on both systems.
  withCaches = lib.genAttrs systems (system: cachesFacts (extend runnerX86 {
    nixpkgs.hostPlatform = system;
    gitlabRunnerVm.runner.registryMirrors = [ "https://mirror.gcr.io" "http://registry-cache.ci.svc.cluster.local:5000" ];
    gitlabRunnerVm.base.substituters = [ "https://cache.nixos.org" "https://nix-cache.example.com" ];
    gitlabRunnerVm.base.trustedPublicKeys = [
      "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
      "nix-cache.example.com-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
    ];
  }));

  runner = config: {
    inherit (config.gitlabRunnerVm.runner) configDisk scratchDisk identityDisk;
    inherit (config.gitlabRunnerVm.runner) platformSshKeys;
    runnerInfoTmpfiles = lib.filter (lib.hasInfix "/runner-info") config.systemd.tmpfiles.rules;
    sshKeys = sshKeysFacts config;
    hostName = config.networking.hostName;
    gceSetHostname = lib.optionalAttrs (config.systemd.services ? gce-set-hostname) {
      inherit (config.systemd.services.gce-set-hostname) before after wantedBy;
    };
    ciUser = config.gitlabRunnerVm.base.user;
    users = lib.mapAttrs (_: u: { inherit (u) isNormalUser extraGroups home; })
      (lib.filterAttrs (_: u: u.isNormalUser) config.users.users);
    agent = {
      inherit (config.services.gitlab-runner-vm) enable powerOff dockerExecutor;
      settings = removeAttrs config.services.gitlab-runner-vm.settings [ "gitlab-runner" "poweroff-command" ];
      packageName = lib.getName config.services.gitlab-runner-vm.package;
      unitFromPackage = lib.elem config.services.gitlab-runner-vm.package config.systemd.packages;
      unit = unit config "gitlab-runner-vm";
      gitlabRunner = config.services.gitlab-runner-vm.settings.gitlab-runner
        == lib.getExe config.services.gitlab-runner-vm.gitlabRunnerPackage;
      poweroffCommand = config.services.gitlab-runner-vm.settings.poweroff-command;
    };
    mounts = {
      config = mount config config.gitlabRunnerVm.runner.configDisk.mountPoint;
      identity = mount config config.gitlabRunnerVm.runner.identityDisk.mountPoint;
      scratch = mount config config.gitlabRunnerVm.runner.scratchDisk.mountPoint;
    };
    dockerDataRoot = config.virtualisation.docker.daemon.settings.data-root or null;
    services = lib.attrNames (lib.filterAttrs (n: _: lib.hasPrefix "runner-" n) config.systemd.services);
    cloudInit = cloudInitFacts config;
    qemuGuest = config.services.qemuGuest.enable;
    ssh = { inherit (config.services.openssh) enable; inherit (config.services.openssh.settings) PasswordAuthentication KbdInteractiveAuthentication; };
    nixChannel = config.nix.channel.enable;
    inherit (config.gitlabRunnerVm.runner.scratchDisk) paths;
    scratchUnit = lib.optionalAttrs (config.systemd.services ? runner-scratch) (unit config "runner-scratch" // {
      inherit (config.systemd.services.runner-scratch.unitConfig) DefaultDependencies;
    });
    access = access config;
    trust = trustFacts config;
    nix = nixFacts config;
    caches = cachesFacts config;
    docker = {
      logDriver = config.virtualisation.docker.daemon.settings.log-driver;
      logOpts = config.virtualisation.docker.daemon.settings.log-opts or null;
    };
    machineId = config.environment.etc ? machine-id;
    failedAssertions = failedAssertions config;
    inherit (config) warnings;
  };

  # What a runner image's boot waits for, disk by disk: the config disk's mount (its device, the
  # options that say when it is mounted), the scratch disk's patterns and how runner-scratch
  # looks for them (its ordering, the arguments its script passes), and every reference to a
  # virtio serial (/dev/disk/by-id/virtio-*, its device unit) in file systems and units.
  diskFacts = config:
    let
      r = config.gitlabRunnerVm.runner;
      services = lib.filterAttrs (_: s: s.enable) config.systemd.services;
      deps = s: s.after ++ s.wants ++ s.requires ++ s.bindsTo ++ s.requisite;
      virtio = lib.hasInfix "virtio";
      scratch = services.runner-scratch or null;
    in
    {
      configMount = mount config r.configDisk.mountPoint;
      identityMount = mount config r.identityDisk.mountPoint;
      scratchMount = mount config r.scratchDisk.mountPoint;
      scratchDevices = r.scratchDisk.devices;
      scratchUnit = lib.mapNullable
        (s: {
          inherit (s) after wants requires bindsTo wantedBy before script;
          inherit (s.serviceConfig) TimeoutStartSec;
        })
        scratch;
      deviceTimeouts = lib.concatMap (fs: lib.filter (lib.hasPrefix "x-systemd.device-timeout") fs.options) (lib.attrValues config.fileSystems);
      virtioFileSystems = lib.attrNames (lib.filterAttrs (_: fs: virtio (toString fs.device) || lib.any virtio fs.options) config.fileSystems);
      virtioUnits = lib.attrNames (lib.filterAttrs (_: s: lib.any virtio (deps s)) services);
      nixBuildDir = config.nix.settings.build-dir or null;
      nixMinFree = config.nix.settings.min-free or null;
      nixMaxFree = config.nix.settings.max-free or null;
    };

  # The images of `nix build .#<name>` on each system.
  images = lib.genAttrs systems (system:
    lib.mapAttrs
      (_: p: {
        inherit (p) filePath;
        system = p.config.nixpkgs.hostPlatform.system;
        label = p.config.system.nixos.label;
        partitionTableType = p.config.gitlabRunnerVm.kubevirt.partitionTableType or null;
        amazonInit = p.config.virtualisation.amazon-init.enable or null;
        ec2Efi = p.config.ec2.efi or null;
        gceEfi = p.config.virtualisation.googleComputeImage.efi or null;
        initrdModules = p.config.boot.initrd.availableKernelModules;
        doRebuildFromUserData = p.config.virtualisation.digitalOcean.rebuildFromUserData or null;
        cloudInitDatasources = p.config.services.cloud-init.settings.datasource_list or null;
        cloudInitUnits = (cloudInitFacts p.config).units;
        configSource = p.config.services.gitlab-runner-vm.settings.config-source or null;
        agentAfter = p.config.systemd.services.gitlab-runner-vm.after or [ ];
        hostKeyFingerprints = lib.mapNullable
          (u: {
            inherit (u) wantedBy after;
            inherit (u.serviceConfig) ExecStart StandardOutput Type;
          })
          (p.config.systemd.services.print-host-key-fingerprints or null);
        ec2PrintHostKey = p.config.systemd.services ? print-host-key;
        disks = if p.config ? gitlabRunnerVm.runner then diskFacts p.config else null;
      })
      (lib.filterAttrs (_: p: p ? config) flake.packages.${system}));

  # A user's module of their own: every profile choice overridden without lib.mkForce.
  overridden = extend runnerX86 {
    virtualisation.docker.enable = false;
    virtualisation.podman.enable = false;
    security.sudo.wheelNeedsPassword = true;
    programs.nix-ld.enable = false;
    boot.kernel.sysctl."vm.swappiness" = 60;
    documentation.man.enable = true;
    services.openssh.settings.PasswordAuthentication = true;
    gitlabRunnerVm.base.user = "ci";
    services.gitlab-runner-vm = {
      settings.job-user = "jobs";
      settings.config = "/etc/gitlab-runner-vm/runner.json";
    };
    users.users.jobs.isNormalUser = true;
  };

  # The cloud-init user-data options, removed: a definition fails with what to do instead.
  removedUserData = failedAssertions (extend runnerX86 { gitlabRunnerVm.runner.userData.datasources = [ "Ec2" ]; });

  # The options of the first releases still work, with a warning each.
  oldNames = extend runnerX86 {
    baseImage.user = "ci";
    runnerImage.scratchDisk.enable = false;
    kubevirtImage.compress = false;
    services.gitlab-runner-vm.failureDelay = 7;
    services.gitlab-runner-vm.runnerUser = "ci";
  };
  # The setting's old name (the agent's --runner-user): job-user, with a warning.
  oldSetting = extend runnerX86 {
    gitlabRunnerVm.base.user = "ci";
    services.gitlab-runner-vm.settings.runner-user = "ci";
  };

  # Settings: the agent's flags by name, typed or freeform.
  settings = extend runnerX86 {
    services.gitlab-runner-vm = {
      powerOff = false;
      extraPackages = [ runnerX86.pkgs.hello ];
      settings = {
        stop-timeout = 100;
        some-future-flag = "a value";
        a-future-switch = true;
        a-future-count = 3;
        a-future-default = null;
      };
    };
  };

  # nixosModules.default alone, in a configuration of the user's own.
  standalone = runnerX86.pkgs.nixos [
    flake.nixosModules.default
    {
      services.gitlab-runner-vm.enable = true;
      users.users.runner.isNormalUser = true;
      fileSystems."/" = { device = "/dev/vda"; fsType = "ext4"; };
      boot.loader.grub.device = "/dev/vda";
      system.stateVersion = "26.05";
    }
  ];

  circleci = flake.nixosConfigurations.circleci-amazon.config;
  proxmox = flake.nixosConfigurations.proxmox-template.config;
in
{
  inherit images withCaches;
  packages = lib.genAttrs systems (system: lib.attrNames flake.packages.${system});
  runner = lib.genAttrs systems (system: runner flake.packages.${system}.nixos-runner.config);
  runnerBroker = lib.genAttrs systems (system: runner flake.packages.${system}.nixos-runner-broker.config);
  # The broker's container image: what it runs, as whom, and what the process sees.
  brokerImage = lib.genAttrs systems (system:
    let
      image = flake.packages.${system}.broker-image;
      broker = flake.packages.${system}.gitlab-runner-vm-broker;
    in
    {
      inherit (image) imageName imageTag imageConfig;
      sameBroker = image.broker == broker;
      brokerExe = lib.getExe broker;
      brokerName = lib.getName broker;
    });
  runnerAmazon = runner flake.nixosConfigurations.runner-amazon.config;
  runnerGce = runner flake.nixosConfigurations.runner-gce.config;
  runnerDo = runner flake.nixosConfigurations.runner-digital-ocean.config;
  runnerProxmox = runner flake.nixosConfigurations.runner-proxmox.config;
  runnerProxmoxDiskMiB = flake.nixosConfigurations.runner-proxmox.config.virtualisation.diskSize;
  # The same images with the options that open what they close.
  opened = {
    amazon = access (extend flake.nixosConfigurations.runner-amazon {
      gitlabRunnerVm.amazon.ssmAgent = true;
      gitlabRunnerVm.runner.rootLogin = true;
    });
    gce = access (extend flake.nixosConfigurations.runner-gce {
      gitlabRunnerVm.gce = { startupScripts = true; osLogin = true; accountsDaemon = true; };
    });
    kubevirtCloudInit = (access (extend runnerX86 { gitlabRunnerVm.kubevirt.cloudInit = true; })).cloudInit;
    trusted = (extend runnerX86 { gitlabRunnerVm.base.nixTrustedUser = true; }).nix.settings.trusted-users;
    # Root for jobs, on both systems: wheel, sudo, docker, and the warning that says what it costs.
    jobsCanBecomeRoot = lib.genAttrs systems (system: trustFacts (extend runnerX86 {
      nixpkgs.hostPlatform = system;
      gitlabRunnerVm.runner.jobsCanBecomeRoot = true;
    }));
    # The job user made root by hand, without the option: the module still warns.
    byHand = trustFacts (extend runnerX86 { users.users.runner.extraGroups = [ "wheel" ]; });
    pinned = nixFacts (extend runnerX86 { gitlabRunnerVm.base.pinNixpkgs = true; });
  };
  baseImage = {
    access = access flake.nixosConfigurations.nixos-base.config;
    circleciAmazonSsm = flake.nixosConfigurations.circleci-amazon.config.services.amazon-ssm-agent.enable;
    circleciGceStartupScripts = flake.nixosConfigurations.circleci-gce.config.systemd.services.google-startup-scripts.enable;
  };
  base = {
    agent = flake.nixosConfigurations.nixos-base.config.services ? gitlab-runner-vm;
    ciUser = flake.nixosConfigurations.nixos-base.config.gitlabRunnerVm.base.user;
  };
  overridden = {
    docker = overridden.virtualisation.docker.enable;
    podman = overridden.virtualisation.podman.enable;
    sudoPassword = overridden.security.sudo.wheelNeedsPassword;
    nixLd = overridden.programs.nix-ld.enable;
    swappiness = overridden.boot.kernel.sysctl."vm.swappiness";
    man = overridden.documentation.man.enable;
    passwordAuthentication = overridden.services.openssh.settings.PasswordAuthentication;
    inherit (overridden.services.gitlab-runner-vm) dockerExecutor;
    ciUserGroups = overridden.users.users.ci.extraGroups;
    environment = (unit overridden "gitlab-runner-vm").environment;
    failedAssertions = failedAssertions overridden;
  };
  inherit removedUserData;
  oldNames = {
    ciUser = oldNames.gitlabRunnerVm.base.user;
    scratch = oldNames.gitlabRunnerVm.runner.scratchDisk.enable;
    compress = oldNames.gitlabRunnerVm.kubevirt.compress;
    failureDelay = oldNames.services.gitlab-runner-vm.settings.failure-delay;
    runnerUser = oldNames.services.gitlab-runner-vm.settings.job-user;
    inherit (oldNames) warnings;
    failedAssertions = failedAssertions oldNames;
    setting = {
      jobUser = oldSetting.services.gitlab-runner-vm.settings.job-user;
      environment = (unit oldSetting "gitlab-runner-vm").environment;
      inherit (oldSetting) warnings;
      failedAssertions = failedAssertions oldSetting;
    };
  };
  settings = {
    unit = unit settings "gitlab-runner-vm";
    inherit (settings.services.gitlab-runner-vm.settings) poweroff-command;
    failedAssertions = failedAssertions settings;
  };
  standalone = {
    unit = unit standalone.config "gitlab-runner-vm";
    unitFromPackage = lib.elem standalone.config.services.gitlab-runner-vm.package standalone.config.systemd.packages;
    packageName = lib.getName standalone.config.services.gitlab-runner-vm.package;
    failedAssertions = failedAssertions standalone.config;
    toplevel = standalone.config.system.build.toplevel.drvPath;
  };
  circleci = {
    ciUser = circleci.gitlabRunnerVm.base.user;
    users = lib.attrNames (lib.filterAttrs (_: u: u.isNormalUser) circleci.users.users);
    circleciGroups = circleci.users.users.circleci.extraGroups;
    circleciSudoRules = sudoRulesOf circleci "circleci";
    inherit (circleci.security.sudo) wheelNeedsPassword;
    display = circleci.environment.variables.DISPLAY;
    xvfb = unit circleci "xvfb";
    agent = circleci.services.gitlab-runner-vm.enable or false;
  };
  proxmox = {
    inherit (proxmox.gitlabRunnerVm.proxmoxTemplate) adminUser;
    users = lib.attrNames (lib.filterAttrs (_: u: u.isNormalUser) proxmox.users.users);
    cloudInit = { inherit (proxmox.services.cloud-init) enable; network = proxmox.services.cloud-init.network.enable; };
    defaultUser = proxmox.services.cloud-init.settings.system_info.default_user.name;
    permitRootLogin = proxmox.services.openssh.settings.PermitRootLogin;
  };
  # The agent's package: the same derivation wherever it is used.
  package = {
    overlay = flake.packages.x86_64-linux.gitlab-runner-vm.drvPath;
    check = flake.checks.x86_64-linux.gitlab-runner-vm.drvPath;
    image = flake.nixosConfigurations.nixos-runner.config.services.gitlab-runner-vm.package.drvPath;
    standalone = standalone.config.services.gitlab-runner-vm.package.drvPath;
    postInstall = flake.packages.x86_64-linux.gitlab-runner-vm.postInstall;
  };
  # An image's system is a default: extendModules moves it to aarch64-linux.
  moved = (extend runnerX86 { nixpkgs.hostPlatform = "aarch64-linux"; }).image.fileName;
}
