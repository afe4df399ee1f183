# services.gitlab-runner-vm: the lifecycle agent of a disposable CI runner VM.
#
# The unit itself is the package's lib/systemd/system/gitlab-runner-vm.service (the one unit
# definition, agent/dist/gitlab-runner-vm.service); this module installs it through
# systemd.packages and adds only wantedBy, path and the agent's GITLAB_RUNNER_VM_* environment
# variables (its flags), plus an ExecStart drop-in when extraArgs is not empty.
{ config, lib, pkgs, utils, ... }:
let
  cfg = config.services.gitlab-runner-vm;
  inherit (lib) mkOption types;

  # The unit's TimeoutStopSec (90 s) covers --stop-timeout + --deregister-timeout (70 s by
  # default) plus a margin; longer agent timeouts raise it so systemd never kills a teardown.
  unitStopTimeout = 90;
  neededStopTimeout = cfg.stopTimeout + cfg.deregisterTimeout + 20;

  seconds = description: default: mkOption {
    type = types.ints.unsigned;
    inherit default description;
  };
in
{
  options.services.gitlab-runner-vm = {
    enable = lib.mkEnableOption ''
      gitlab-runner-vm, the agent that registers this VM with GitLab at boot, runs N jobs with
      gitlab-runner, deregisters and powers the VM off
    '';

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalMD "the agent built from this repository (`nixos-modules/package.nix`)";
      description = "The gitlab-runner-vm package: the agent's binary and its systemd unit.";
    };

    gitlabRunnerPackage = lib.mkPackageOption pkgs "gitlab-runner" { };

    configFile = mkOption {
      type = types.str;
      default = "/runner-info/runner.json";
      description = "Path of runner.json, read at boot (`GITLAB_RUNNER_VM_CONFIG`).";
    };

    keepFile = mkOption {
      type = types.str;
      default = "/etc/keep-runner";
      description = ''
        While this file exists the VM is held after deregistration instead of powering off
        (`GITLAB_RUNNER_VM_KEEP_FILE`); `gitlab-runner-vm release` removes it.
      '';
    };

    runnerUser = mkOption {
      type = types.str;
      default = "runner";
      description = "Unprivileged user that gitlab-runner and so every job runs as (`GITLAB_RUNNER_VM_RUNNER_USER`).";
    };

    failureDelay = seconds "Seconds between a fatal error and the power-off (`GITLAB_RUNNER_VM_FAILURE_DELAY`)." 60;
    configWait = seconds "Seconds to wait for runner.json to appear (`GITLAB_RUNNER_VM_CONFIG_WAIT`)." 300;
    registerTimeout = seconds "Deadline in seconds for registration, retries included (`GITLAB_RUNNER_VM_REGISTER_TIMEOUT`)." 300;
    deregisterTimeout = seconds "Deadline in seconds for deregistration, retries included (`GITLAB_RUNNER_VM_DEREGISTER_TIMEOUT`)." 30;
    stopTimeout = seconds "Seconds gitlab-runner gets to stop after SIGTERM (`GITLAB_RUNNER_VM_STOP_TIMEOUT`)." 40;
    holdMax = seconds "Longest hold in seconds after the keep file's last modification (`GITLAB_RUNNER_VM_HOLD_MAX`)." 86400;

    powerOff = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether the agent powers the VM off at the end. Debug images set this to false: the
        agent then only logs that power-off is disabled and exits.
      '';
    };

    dockerExecutor = mkOption {
      type = types.bool;
      default = config.virtualisation.docker.enable;
      defaultText = lib.literalExpression "config.virtualisation.docker.enable";
      description = ''
        Whether jobs may use the docker executor (`"executor": "docker"` in runner.json): puts the
        Docker client on the agent's path. Requires `virtualisation.docker.enable` and the
        runner user in the `docker` group.
      '';
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--config-wait" "600" ];
      description = ''
        Extra arguments for `gitlab-runner-vm run`. When not empty, a drop-in replaces the
        unit's ExecStart. Prefer the options above, which set environment variables.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = config.users.users ? ${cfg.runnerUser};
        message = ''
          services.gitlab-runner-vm.runnerUser is "${cfg.runnerUser}", but no such user is
          defined. Define users.users.${cfg.runnerUser} (nixos-modules/base.nix defines "runner")
          or set services.gitlab-runner-vm.runnerUser to an existing user.
        '';
      }
      {
        assertion = cfg.runnerUser != "root";
        message = "services.gitlab-runner-vm.runnerUser must not be root: jobs would run as root.";
      }
      {
        assertion = cfg.dockerExecutor -> config.virtualisation.docker.enable;
        message = ''
          services.gitlab-runner-vm.dockerExecutor is true, but Docker is off: the docker
          executor needs virtualisation.docker.enable = true.
        '';
      }
      {
        assertion =
          cfg.dockerExecutor && config.users.users ? ${cfg.runnerUser}
          -> lib.elem "docker" config.users.users.${cfg.runnerUser}.extraGroups;
        message = ''
          services.gitlab-runner-vm.dockerExecutor is true, but the runner user
          "${cfg.runnerUser}" is not in the docker group: add "docker" to
          users.users.${cfg.runnerUser}.extraGroups.
        '';
      }
    ];

    # `gitlab-runner-vm status`, `release` and `drain` for whoever debugs the VM.
    environment.systemPackages = [ cfg.package ];

    systemd.packages = [ cfg.package ];

    systemd.services.gitlab-runner-vm = {
      wantedBy = [ "multi-user.target" ];
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
      ++ lib.optional cfg.dockerExecutor config.virtualisation.docker.package;
      environment = {
        GITLAB_RUNNER_VM_CONFIG = cfg.configFile;
        GITLAB_RUNNER_VM_STATE_DIR = "/run/gitlab-runner-vm";
        GITLAB_RUNNER_VM_KEEP_FILE = cfg.keepFile;
        GITLAB_RUNNER_VM_GITLAB_RUNNER = lib.getExe cfg.gitlabRunnerPackage;
        GITLAB_RUNNER_VM_RUNNER_USER = cfg.runnerUser;
        GITLAB_RUNNER_VM_POWEROFF_COMMAND =
          if cfg.powerOff then
            "${config.systemd.package}/bin/systemctl poweroff"
          else
            "echo 'gitlab-runner-vm: power-off is disabled in this image (services.gitlab-runner-vm.powerOff = false); the VM stays up'";
        GITLAB_RUNNER_VM_FAILURE_DELAY = toString cfg.failureDelay;
        GITLAB_RUNNER_VM_CONFIG_WAIT = toString cfg.configWait;
        GITLAB_RUNNER_VM_REGISTER_TIMEOUT = toString cfg.registerTimeout;
        GITLAB_RUNNER_VM_DEREGISTER_TIMEOUT = toString cfg.deregisterTimeout;
        GITLAB_RUNNER_VM_STOP_TIMEOUT = toString cfg.stopTimeout;
        GITLAB_RUNNER_VM_HOLD_MAX = toString cfg.holdMax;
      };
      serviceConfig = lib.mkMerge [
        (lib.mkIf (cfg.extraArgs != [ ]) {
          ExecStart = [
            ""
            "${cfg.package}/bin/gitlab-runner-vm run ${utils.escapeSystemdExecArgs cfg.extraArgs}"
          ];
        })
        (lib.mkIf (neededStopTimeout > unitStopTimeout) {
          TimeoutStopSec = "${toString neededStopTimeout}s";
        })
      ];
    };
  };
}
