# CircleCI machine image (seed 000: CircleCI's Packer images converted to NixOS): the base tool
# set with a `circleci` user (passwordless sudo, docker group), Docker, a virtual display for
# browser tests (Xvfb on :99, DISPLAY=:99 for everyone) and the tools CircleCI's machine images
# carry beside the base set (browsers and their drivers, the CircleCI and cloud CLIs, JVM build
# tools).
{ config, lib, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.circleci;
in
{
  imports = [
    ./base
    (lib.mkRenamedOptionModule [ "circleciImage" ] [ "gitlabRunnerVm" "circleci" ])
  ];

  options.gitlabRunnerVm.circleci = {
    display = lib.mkOption {
      type = lib.types.str;
      default = ":99";
      description = "X display served by Xvfb; exported as DISPLAY to every session.";
    };
    screen = lib.mkOption {
      type = lib.types.str;
      default = "1920x1080x24";
      description = "Xvfb screen geometry and depth (WIDTHxHEIGHTxDEPTH).";
    };
  };

  config = {
    gitlabRunnerVm.base.user = lib.mkDefault "circleci";

    environment.systemPackages = with pkgs; [
      circleci-cli
      google-cloud-sdk
      chromium
      chromedriver
      firefox
      geckodriver
      xvfb-run
      ant
      sbt
      postgresql
      imagemagick
    ];

    environment.variables.DISPLAY = lib.mkDefault cfg.display;

    # nixpkgs has no Xvfb module and services.xserver would pull in a whole desktop stack.
    systemd.tmpfiles.rules = [ "d /tmp/.X11-unix 1777 root root -" ];
    systemd.services.xvfb = {
      description = "Virtual X display ${cfg.display} for browser tests";
      wantedBy = [ "multi-user.target" ];
      after = [ "systemd-tmpfiles-setup.service" ];
      serviceConfig = {
        ExecStart = "${lib.getExe' pkgs.xvfb "Xvfb"} ${cfg.display} -screen 0 ${cfg.screen} -nolisten tcp";
        User = config.gitlabRunnerVm.base.user;
        Restart = "always";
        RestartSec = "2s";
      };
    };
  };
}
