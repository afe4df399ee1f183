# The metadata firewall of every runner image, both systems, as JSON for
# tests/nix/check-firewall.py: the evaluated firewall commands, the allowed units and their
# hooks, every unit whose commands name the metadata address, the nftables variant of each
# x86_64 image, the unit that removes user-data at rest, and refusals (an allowed unit that
# does not exist, the removed allowedUsers).
{ flake }:
let
  inherit (flake.nixosConfigurations.nixos-runner.pkgs) lib;
  names = [ "nixos-runner" "runner-amazon" "runner-gce" "runner-digital-ocean" ];
  systems = [ "x86_64-linux" "aarch64-linux" ];
  nixosOf = name: system: if system == "x86_64-linux" then flake.nixosConfigurations.${name} else flake.packages.${system}.${name};
  extend = nixos: module: (nixos.extendModules { modules = [ module ]; }).config;
  failedAssertions = config: map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
  commands = v: map toString (lib.toList v);

  facts = config:
    let
      cfg = config.gitlabRunnerVm.runner.metadataFirewall;
      services = config.systemd.services;
      allowed = map (lib.removeSuffix ".service") cfg.allowedUnits;
      unitFacts = name:
        let s = services.${name}; in {
          exists = s.enable && (s.script != "" || s.serviceConfig ? ExecStart || s.wantedBy != [ ] || config.systemd.timers ? ${name});
          type = s.serviceConfig.Type or "simple";
          execStartPre = commands (s.serviceConfig.ExecStartPre or [ ]);
          execStartPost = commands (s.serviceConfig.ExecStartPost or [ ]);
          execStopPost = commands (s.serviceConfig.ExecStopPost or [ ]);
        };
      # Units whose own commands name a metadata address: they must be allowed.
      namesMetadata = lib.attrNames (lib.filterAttrs
        (_: s: s.enable && lib.any (a: lib.hasInfix a (s.script + toString (s.serviceConfig.ExecStart or ""))) cfg.addresses)
        services);
      scrub = services.gitlab-runner-vm-scrub-user-data or null;
    in
    {
      failedAssertions = failedAssertions config;
      inherit (cfg) enable addresses;
      allowedUnits = allowed;
      subgroups = cfg.allowedSubgroups;
      platform = config.services.gitlab-runner-vm.settings.config-source or "file";
      firewall = config.networking.firewall.enable;
      nftables = config.networking.nftables.enable;
      inherit (config.networking.firewall) extraCommands extraStopCommands;
      backend = if config.networking.nftables.enable then "nftables" else "iptables";
      # The script's path, as the agent's unit runs it (its last ExecStartPre).
      exe = lib.head (lib.splitString " " (lib.removePrefix "+" (lib.last (commands services.gitlab-runner-vm.serviceConfig.ExecStartPre))));
      nftablesService =
        if config.networking.nftables.enable then {
          execStartPost = commands services.nftables.serviceConfig.ExecStartPost;
          execReload = commands services.nftables.serviceConfig.ExecReload;
          execStopPost = commands (services.nftables.serviceConfig.ExecStopPost or [ ]);
        } else null;
      # The script the agent runs to admit gitlab-runner's cgroup for an identity cache.
      agentFirewall = services.gitlab-runner-vm.environment.GITLAB_RUNNER_VM_METADATA_FIREWALL or null;
      units = lib.genAttrs (lib.unique (allowed ++ namesMetadata ++ [ "gitlab-runner-vm" ])) unitFacts;
      inherit namesMetadata;
      scrub = if scrub == null then null else {
        inherit (scrub) before after wantedBy script;
        type = scrub.serviceConfig.Type;
      };
    };

  images = lib.listToAttrs (lib.concatMap
    (name: lib.concatMap
      (system:
        let nixos = nixosOf name system; in
        lib.optionals (system == "x86_64-linux" || flake.packages.${system} ? ${name}) ([
          { name = "${name}/${system}"; value = facts nixos.config; }
        ] ++ lib.optional (system == "x86_64-linux") {
          name = "${name}/${system}/nftables";
          value = facts (extend nixos { networking.nftables.enable = true; });
        }))
      systems)
    names);
  runner = flake.nixosConfigurations.runner-amazon;
in
{
  inherit images;
  typo = failedAssertions (extend runner ({ options, ... }: {
    gitlabRunnerVm.runner.metadataFirewall.allowedUnits = options.gitlabRunnerVm.runner.metadataFirewall.allowedUnits.default ++ [ "no-such-unit" ];
  }));
  removedOption =
    let config = extend runner { gitlabRunnerVm.runner.metadataFirewall.allowedUsers = [ "root" ]; };
    in failedAssertions config ++ config.warnings;
  # The nftables variant builds a whole system, not only these facts.
  nftablesToplevel = builtins.unsafeDiscardStringContext
    (extend flake.nixosConfigurations.nixos-runner { networking.nftables.enable = true; }).system.build.toplevel.drvPath;
}
