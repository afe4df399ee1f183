# CircleCI's self-hosted machine runner 3 in a CircleCI machine image (docs/circleci.md): it
# claims the jobs of one resource class and runs them as the CI user (`circleci`), with the
# image's tool set and its Xvfb display.
#
# Machine runner 3 is not in nixpkgs and this repository does not fetch it (its download cannot
# be checked here, and a Nix package needs its hash): `package` is the one you package in your
# own flake. Its token is never in the image or the Nix store: before the runner starts, a
# root-only step reads it from the instance's metadata (the EC2 user-data, a GCE metadata
# value) or from a file, into a file under /run only the runner's user can read. Jobs run as
# that user, so they can read the token too: one resource class per group of projects that
# trust each other.
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.circleci.machineRunner;
  user = config.gitlabRunnerVm.base.user;
  env = "/run/circleci-runner/env";

  settings = lib.recursiveUpdate
    {
      runner = {
        working_directory = "/var/lib/circleci-runner/workdir";
        cleanup_working_directory = true;
      } // lib.optionalAttrs cfg.singleTask { mode = "single-task"; };
    }
    cfg.settings;
  configFile = (pkgs.formats.yaml { }).generate "circleci-runner-config.yaml" settings;

  readToken = {
    ec2-user-data = "tr -d '[:space:]' < /etc/ec2-metadata/user-data";
    gce-metadata = "${lib.getExe pkgs.curl} --silent --show-error --fail --retry 10 --retry-connrefused -H 'Metadata-Flavor: Google' "
      + lib.escapeShellArg "http://metadata.google.internal/computeMetadata/v1/instance/attributes/${cfg.token.metadataKey}";
    file = "tr -d '[:space:]' < ${lib.escapeShellArg cfg.token.file}";
  }.${cfg.token.source};

  prepare = pkgs.writeShellScript "circleci-runner-prepare" ''
    set -eu
    umask 077
    token=$(${readToken})
    [ -n "$token" ] || { echo "circleci-runner: no token from ${cfg.token.source}" >&2; exit 1; }
    printf 'CIRCLECI_RUNNER_API_AUTH_TOKEN=%s\nCIRCLECI_RUNNER_NAME=%s\n' "$token" "$(${pkgs.coreutils}/bin/uname -n)" > ${env}
    chown ${lib.escapeShellArg user} ${env}
  '';

  # The units that name the host after the VM (nixpkgs' EC2 and DigitalOcean modules, this
  # repository's GCE image), those of them this image has: the runner's name is `uname -n` when
  # the token step runs, so it must run after them, or every runner of a fleet registers under
  # the name the image was built with.
  hostNameUnits = map (name: "${name}.service") (lib.filter (name: config.systemd.services ? ${name})
    [ "apply-ec2-data" "gce-set-hostname" "digitalocean-set-hostname" ]);

  # One job, then the VM powers off for the platform to replace it; a runner that failed waits a
  # minute first, so that a broken fleet does not boot VMs in a tight loop.
  powerOff = pkgs.writeShellScript "circleci-runner-poweroff" ''
    if [ "$SERVICE_RESULT" != success ]; then sleep 60; fi
    exec ${config.systemd.package}/bin/systemctl poweroff
  '';
in
{
  options.gitlabRunnerVm.circleci.machineRunner = {
    enable = lib.mkEnableOption "CircleCI's self-hosted machine runner 3, claiming jobs as the CI user";

    package = lib.mkOption {
      type = lib.types.package;
      example = lib.literalExpression "circleci-runner  # packaged in your flake, docs/circleci.md";
      description = ''
        Machine runner 3: a package with `bin/circleci-runner`. Not in nixpkgs and not fetched by
        this repository; package CircleCI's release in your own flake (docs/circleci.md).
      '';
    };

    token = {
      source = lib.mkOption {
        type = lib.types.enum [ "ec2-user-data" "gce-metadata" "file" ];
        example = "gce-metadata";
        description = ''
          Where the resource class's token comes from at boot: the instance's EC2 user-data (the
          token alone), the GCE metadata value `token.metadataKey`, or `token.file`.
        '';
      };
      metadataKey = lib.mkOption {
        type = lib.types.str;
        default = "circleci-runner-token";
        description = "With `source = \"gce-metadata\"`: the instance metadata key holding the token.";
      };
      file = lib.mkOption {
        type = lib.types.nullOr (lib.types.strMatching "/.+");
        default = null;
        example = "/run/keys/circleci-runner-token";
        description = "With `source = \"file\"`: the absolute path of a file on the VM (outside the Nix store) holding the token.";
      };
    };

    singleTask = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Whether the runner takes one job (machine runner's `runner.mode: single-task`) and the VM
        then powers off, for fleets that replace powered-off VMs (docs/aws.md, docs/gce.md).
      '';
    };

    settings = lib.mkOption {
      type = (pkgs.formats.yaml { }).type;
      default = { };
      example = { runner.idle_timeout = "10m"; logging.level = "debug"; };
      description = ''
        More of machine runner's configuration file (CircleCI's machine runner 3 configuration
        reference), merged over the working directory and mode set here.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.token.source == "file" -> cfg.token.file != null;
        message = "gitlabRunnerVm.circleci.machineRunner.token.source = \"file\" needs token.file.";
      }
      {
        assertion = cfg.token.file == null || !(lib.hasPrefix builtins.storeDir cfg.token.file);
        message = "gitlabRunnerVm.circleci.machineRunner.token.file is in the Nix store, which anyone can read.";
      }
    ];

    systemd.services.circleci-runner = {
      description = "CircleCI machine runner";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ] ++ hostNameUnits;
      after = [ "network-online.target" ] ++ hostNameUnits
        ++ lib.optional (cfg.token.source == "ec2-user-data") "fetch-ec2-metadata.service";
      # The jobs' tool set, and sudo.
      path = config.environment.systemPackages ++ [ "/run/wrappers" ];
      environment.DISPLAY = config.gitlabRunnerVm.circleci.display;
      serviceConfig = {
        User = user;
        StateDirectory = "circleci-runner";
        RuntimeDirectory = "circleci-runner";
        RuntimeDirectoryMode = "0700";
        # Root-only (+): the token into a file of the runner's user. Read for ExecStart, after
        # it exists ("-": not yet there for this first command).
        ExecStartPre = "+${prepare}";
        EnvironmentFile = "-${env}";
        ExecStart = "${lib.getExe' cfg.package "circleci-runner"} machine -c ${configFile}";
        Restart = if cfg.singleTask then "no" else "always";
        RestartSec = "5s";
      } // lib.optionalAttrs cfg.singleTask {
        ExecStopPost = "+${powerOff}";
      };
    };
  };
}
