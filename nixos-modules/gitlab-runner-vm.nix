# services.gitlab-runner-vm: the lifecycle agent of a disposable CI runner VM.
#
# The unit itself is the package's lib/systemd/system/gitlab-runner-vm.service (the one unit
# definition, agent/dist/gitlab-runner-vm.service); this module installs it through
# systemd.packages and adds only wantedBy, path and the agent's environment, plus an ExecStart
# drop-in when extraArgs is not empty.
#
# `settings` follows RFC 42: a freeform attribute set whose keys are the agent's own flag names
# (`failure-delay` for `--failure-delay`). Every flag `--foo-bar` reads `GITLAB_RUNNER_VM_FOO_BAR`,
# so each setting becomes that variable (true/false, decimal integers, strings as they are; a
# freeform null leaves the flag at the agent's default), and a new agent flag needs no change here.
#
# The trust boundary: gitlab-runner, which holds the runner token, runs as the agent's own user
# (root in the unit); jobs run as `settings.job-user`, which must be neither root nor able to
# become root without saying so (a warning names what that costs).
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.gitlab-runner-vm;
  inherit (lib) mkOption types;

  jobUser = cfg.settings.job-user;
  # The job user's groups (primary, extraGroups, and groups that list it as a member), and the
  # sudo rules that name it or one of those groups: what makes a job root without a kernel bug.
  jobUserGroups = lib.optionals (config.users.users ? ${jobUser})
    ([ config.users.users.${jobUser}.group ] ++ config.users.users.${jobUser}.extraGroups)
  ++ lib.attrNames (lib.filterAttrs (_: g: lib.elem jobUser g.members) config.users.groups);
  sudoRulesFor = rules: lib.filter (r: lib.elem jobUser r.users || lib.any (g: lib.elem g jobUserGroups) r.groups) rules;
  jobUserSudoRules = lib.optionals config.security.sudo.enable (sudoRulesFor config.security.sudo.extraRules)
    ++ lib.optionals (config.security.sudo-rs.enable or false) (sudoRulesFor config.security.sudo-rs.extraRules);
  rootGroups = lib.filter (g: lib.elem g jobUserGroups) ([ "wheel" ] ++ lib.optional config.virtualisation.docker.enable "docker");
  jobsCanBecomeRoot = rootGroups != [ ] || jobUserSudoRules != [ ];

  envName = flag: "GITLAB_RUNNER_VM_" + lib.toUpper (builtins.replaceStrings [ "-" ] [ "_" ] flag);
  envValue = value: if lib.isBool value then lib.boolToString value else toString value;
  environment = lib.mapAttrs' (flag: value: lib.nameValuePair (envName flag) (envValue value))
    (lib.filterAttrs (flag: value: value != null && flag != "runner-user") cfg.settings);

  # What the agent is (its flags, their environment variables and defaults, its config sources):
  # `gitlab-runner-vm facts`, checked in as agent/facts.json and kept current by the agent's
  # tests, so that nothing here repeats it.
  agentFacts = lib.importJSON ../agent/facts.json;
  flags = agentFacts.run_flags;

  # The unit's TimeoutStopSec covers --stop-timeout + --deregister-timeout plus the agent's
  # margin (the unit file's value with the defaults; agent/tests/unit_file.rs checks it); longer
  # agent timeouts raise it so systemd never kills a teardown.
  stopBudget = stop: deregister: stop + deregister + agentFacts.unit_stop_margin_seconds;
  unitStopTimeout = stopBudget flags.stop-timeout.default flags.deregister-timeout.default;
  neededStopTimeout = stopBudget cfg.settings.stop-timeout cfg.settings.deregister-timeout;

  # A typed setting for the agent's flag `name`: its type, default and help from the facts.
  flagOption = name:
    let flag = flags.${name}; in
    mkOption {
      type = {
        seconds = types.ints.unsigned;
        switch = types.bool;
        choice = types.enum (flag.choices or [ ]);
        text = types.str;
      }.${flag.kind};
      inherit (flag) default;
      description = "${flag.help}. The agent's `--${name}` (`${flag.env}`).";
    };

  # Options of the first releases, now settings named after the agent's flags.
  renamed = {
    configFile = "config";
    keepFile = "keep-file";
    runnerUser = "job-user";
    failureDelay = "failure-delay";
    configWait = "config-wait";
    registerTimeout = "register-timeout";
    deregisterTimeout = "deregister-timeout";
    stopTimeout = "stop-timeout";
    holdMax = "hold-max";
  };
in
{
  imports = lib.mapAttrsToList
    (old: flag: lib.mkRenamedOptionModule [ "services" "gitlab-runner-vm" old ] [ "services" "gitlab-runner-vm" "settings" flag ])
    renamed;

  options.services.gitlab-runner-vm = {
    enable = lib.mkEnableOption "gitlab-runner-vm, the agent that registers the VM with GitLab at boot, runs N jobs, deregisters and powers the VM off";

    package = mkOption {
      type = types.package;
      default = pkgs.gitlab-runner-vm or (import ../nix/overlay.nix pkgs pkgs).gitlab-runner-vm;
      defaultText = lib.literalExpression "pkgs.gitlab-runner-vm";
      description = ''
        The gitlab-runner-vm package: the agent's binary and its systemd unit. Taken from `pkgs`
        when an overlay provides it (this flake's `overlays.default`), else built from this
        repository (`nix/package.nix`).
      '';
    };

    gitlabRunnerPackage = lib.mkPackageOption pkgs "gitlab-runner" { };

    settings = mkOption {
      default = { };
      example = lib.literalExpression ''
        {
          failure-delay = 10;
          hold-max = 3600;
          # any other flag of `gitlab-runner-vm run`, by its name
          no-poweroff = true;
        }
      '';
      description = ''
        Flags of `gitlab-runner-vm run`, by their names without the leading `--`: each one
        becomes the agent's environment variable `GITLAB_RUNNER_VM_<NAME>` (upper case, `-` as
        `_`). Booleans are `true` or `false`, integers decimal, strings as they are. Flags
        without an option below are set the same way, so every flag of the agent is available
        here; `null` leaves such a flag at the agent's default. Durations are whole seconds.
      '';
      type = types.submodule (settings: {
        freeformType = types.attrsOf (types.nullOr (types.oneOf [ types.bool types.int types.str ]));
        # `runner-user`, the name of the first releases (the agent's --runner-user), is `job-user`;
        # a warning below says so (mkRenamedOptionModule cannot reach into a freeform submodule).
        config = lib.mkIf (settings.config ? runner-user && settings.config.runner-user != null) {
          job-user = settings.config.runner-user;
        };
        options = {
          config = flagOption "config";
          config-source = flagOption "config-source";
          broker-url = flagOption "broker-url";
          broker-token-file = flagOption "broker-token-file";
          keep-file = flagOption "keep-file";
          gitlab-runner = mkOption {
            type = types.str;
            default = lib.getExe cfg.gitlabRunnerPackage;
            defaultText = lib.literalExpression "lib.getExe config.services.gitlab-runner-vm.gitlabRunnerPackage";
            description = "The gitlab-runner program the agent starts.";
          };
          job-user = mkOption {
            type = types.str;
            default = "runner";
            description = ''
              The user jobs run as; gitlab-runner itself runs as root and never as this user.
              Shell jobs drop to it (the agent's custom executor, `gitlab-runner-vm job-exec`);
              docker-executor jobs run in containers that gitlab-runner (root) starts, so this
              user needs no `docker` group. It must not be root, and it should not be able to
              become root (wheel, sudo, docker): a job could then read the runner token.
            '';
          };
          poweroff-command = mkOption {
            type = types.str;
            default = "${config.systemd.package}/bin/systemctl poweroff";
            defaultText = lib.literalExpression ''"''${config.systemd.package}/bin/systemctl poweroff"'';
            description = "Command (run with /bin/sh -c) that powers the VM off at the end.";
          };
          failure-delay = flagOption "failure-delay";
          config-wait = flagOption "config-wait";
          register-timeout = flagOption "register-timeout";
          deregister-timeout = flagOption "deregister-timeout";
          stop-timeout = flagOption "stop-timeout";
          hold-max = flagOption "hold-max";
          hold-extend = flagOption "hold-extend";
          daemon-reload-timeout = flagOption "daemon-reload-timeout";
        };
      });
    };

    powerOff = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether the agent powers the VM off at the end. Debug images set this to false: the
        agent then does the whole teardown and exits (`settings.no-poweroff = true`, the
        agent's `--no-poweroff`), and the VM stays up.
      '';
    };

    dockerExecutor = mkOption {
      type = types.bool;
      default = config.virtualisation.docker.enable;
      defaultText = lib.literalExpression "config.virtualisation.docker.enable";
      description = ''
        Whether jobs may use the docker executor (`"executor": "docker"` in runner.json): puts the
        Docker client on the agent's path. Requires `virtualisation.docker.enable`. gitlab-runner
        (root) talks to Docker itself: the job user needs no `docker` group, which would make
        every shell job root.
      '';
    };

    extraPackages = mkOption {
      type = types.listOf types.package;
      default = [ ];
      example = lib.literalExpression "[ pkgs.nodejs pkgs.python3 ]";
      description = ''
        More packages on the path of the agent and so of gitlab-runner and shell-executor jobs,
        beside gitlab-runner, bash, git, git-lfs, tar, gzip and curl (and Docker's client with
        `dockerExecutor`).
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--config-wait" "600" ];
      description = ''
        Extra arguments for `gitlab-runner-vm run`. When not empty, a drop-in replaces the
        unit's ExecStart. Prefer `settings`, which sets environment variables.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    services.gitlab-runner-vm.settings.no-poweroff = lib.mkIf (!cfg.powerOff) (lib.mkDefault true);

    warnings =
      lib.optional (cfg.settings ? runner-user && cfg.settings.runner-user != null) ''
        The option `services.gitlab-runner-vm.settings.runner-user' has been renamed to
        `services.gitlab-runner-vm.settings.job-user' (the user jobs run as; gitlab-runner itself
        runs as root).
      ''
      ++ lib.optional jobsCanBecomeRoot ''
        services.gitlab-runner-vm: jobs can become root
        (gitlabRunnerVm.runner.jobsCanBecomeRoot = true, or a definition of your own): the job user "${jobUser}" is ${lib.concatStringsSep ", " (map (g: "in ${g}") rootGroups ++ lib.optional (jobUserSudoRules != [ ]) "named by a sudo rule")}.
        The runner token (config.toml, runner.json) is then one `sudo` away from every job, which
        can take other projects' jobs (their sources, CI_JOB_TOKEN, protected variables) with it
        for as long as the token lives. This is safe only when every project this runner serves
        trusts the others, or with a credential that dies with the VM (a runner created for each
        boot).
      '';

    assertions = [
      {
        assertion = config.users.users ? ${jobUser};
        message = ''
          services.gitlab-runner-vm.settings.job-user is "${jobUser}", but no such user is
          defined. Define users.users.${jobUser} (the base module defines "runner") or set the
          setting to an existing user.
        '';
      }
      {
        assertion = jobUser != "root" && (config.users.users.${jobUser}.uid or null) != 0;
        message = "services.gitlab-runner-vm.settings.job-user must not be root: jobs would run as root.";
      }
      {
        assertion = cfg.dockerExecutor -> config.virtualisation.docker.enable;
        message = ''
          services.gitlab-runner-vm.dockerExecutor is true, but Docker is off: the docker
          executor needs virtualisation.docker.enable = true.
        '';
      }
      {
        assertion = lib.all (flag: builtins.match "[a-z][a-z0-9-]*" flag != null) (lib.attrNames cfg.settings);
        message = ''
          services.gitlab-runner-vm.settings takes the agent's flag names (lower case, words
          joined by `-`, e.g. failure-delay), not ${lib.concatStringsSep ", " (lib.filter (flag: builtins.match "[a-z][a-z0-9-]*" flag == null) (lib.attrNames cfg.settings))}.
        '';
      }
    ];

    # `gitlab-runner-vm status`, `release` and `drain` for whoever debugs the VM.
    environment.systemPackages = [ cfg.package ];

    systemd.packages = [ cfg.package ];

    systemd.services.gitlab-runner-vm = {
      wantedBy = [ "multi-user.target" ];
      # Stopped before what jobs use (systemd stops in reverse start order): on a shutdown the
      # agent aborts the job and deregisters while Docker and Podman still run.
      after = lib.optionals cfg.dockerExecutor [ "docker.service" "docker.socket" ]
        ++ lib.optional config.virtualisation.podman.enable "podman.socket";
      # A configuration switch on a held debug VM must not kill a running job.
      restartIfChanged = false;
      path = [
        cfg.gitlabRunnerPackage
        pkgs.bash
        pkgs.git
        pkgs.git-lfs
        pkgs.gnutar
        pkgs.gzip
        pkgs.curl
      ]
      ++ lib.optional cfg.dockerExecutor config.virtualisation.docker.package
      ++ cfg.extraPackages;
      inherit environment;
      serviceConfig = lib.mkMerge [
        (lib.mkIf (cfg.extraArgs != [ ]) {
          ExecStart = [
            ""
            "${lib.getExe cfg.package} run ${utils.escapeSystemdExecArgs cfg.extraArgs}"
          ];
        })
        (lib.mkIf (neededStopTimeout > unitStopTimeout) {
          TimeoutStopSec = "${toString neededStopTimeout}s";
        })
      ];
    };
  };
}
