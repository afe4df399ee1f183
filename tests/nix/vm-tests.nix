# NixOS VM tests (flake checks; they need a builder with KVM and the nixos-test feature).
# Node `runner` is the runner image's configuration (runner.nix, without the large tool set) with
# runner.json on an ISO 9660 disk of serial `runner-info` and an empty `scratch` disk, as
# KubeVirt presents them. It runs the real agent and the real gitlab-runner against node
# `gitlab`, a fake GitLab (fake-gitlab.py) that hands out one shell job.
{ pkgs, modules }:
let
  inherit (pkgs) lib;

  runnerJson = pkgs.writeText "runner.json" (builtins.toJSON {
    url = "http://gitlab";
    token = "glrt-vm.test.token.0123456789";
    executor = "shell";
    max_jobs = 1;
    idle_timeout = 300;
  });

  # What virt-launcher makes of a Secret volume: an ISO 9660 image, one file per key.
  runnerInfoIso = pkgs.runCommand "runner-info.iso" { nativeBuildInputs = [ pkgs.xorriso ]; } ''
    mkdir info
    cp ${runnerJson} info/runner.json
    xorriso -as mkisofs -quiet -J -R -V cfgdata -o $out info
  '';

  gitlabNode = {
    networking.firewall.allowedTCPPorts = [ 80 ];
    systemd.services.fake-gitlab = {
      wantedBy = [ "multi-user.target" ];
      environment.STATE_DIR = "/var/lib/fake-gitlab";
      serviceConfig.ExecStart = "${pkgs.python3.interpreter} ${./fake-gitlab.py} 80";
    };
  };

  runnerNode = extra: {
    imports = [ modules.runner extra ];
    gitlabRunnerVm.base.tools.enable = false;
    # The agent gives up quickly in a test instead of after the production delays.
    services.gitlab-runner-vm.settings = {
      failure-delay = 5;
      config-wait = 60;
    };
    virtualisation = {
      memorySize = 2048;
      cores = 2;
      emptyDiskImages = [
        {
          size = 2048;
          driveConfig.deviceExtraOpts.serial = "scratch";
        }
      ];
      qemu.drives = lib.mkAfter [
        {
          name = "runner-info";
          file = "${runnerInfoIso}";
          driveExtraOpts = {
            format = "raw";
            readonly = "on";
          };
          deviceExtraOpts.serial = "runner-info";
        }
      ];
    };
  };

  # The fake GitLab saw a request with this method and path.
  seen = method: path: ''grep -F '"method": "${method}", "path": "${path}"' /var/lib/fake-gitlab/requests.jsonl'';
in
{
  vm-lifecycle = pkgs.testers.runNixOSTest {
    name = "gitlab-runner-vm-lifecycle";
    nodes = {
      gitlab = gitlabNode;
      runner = runnerNode { };
    };
    testScript = ''
      gitlab.start()
      gitlab.wait_for_open_port(80)
      runner.start()

      with subtest("runner.json comes from the config disk"):
          runner.wait_for_unit("runner-info.mount")
          runner.succeed("test -s /runner-info/runner.json")

      with subtest("the agent verifies its token"):
          gitlab.wait_until_succeeds("${seen "POST" "/api/v4/runners/verify"}", timeout=300)

      with subtest("gitlab-runner runs the job as the runner user"):
          gitlab.wait_until_succeeds("grep -qx success /var/lib/fake-gitlab/job-1.state", timeout=300)
          gitlab.succeed("grep -q 'job user: runner' /var/lib/fake-gitlab/job-1.trace")


      with subtest("the manager is deleted and the VM powers itself off"):
          gitlab.wait_until_succeeds("${seen "DELETE" "/api/v4/runners/managers"}", timeout=120)
          runner.wait_for_shutdown()
    '';
  };

  vm-keep-runner = pkgs.testers.runNixOSTest {
    name = "gitlab-runner-vm-keep-runner";
    nodes = {
      gitlab = gitlabNode;
      runner = runnerNode {
        # A debug image: the keep file exists from boot on, so the VM is held after its job.
        systemd.tmpfiles.rules = [ "f /etc/keep-runner 0644 root root -" ];
      };
    };
    testScript = ''
      import time

      gitlab.start()
      gitlab.wait_for_open_port(80)
      runner.start()

      with subtest("the job runs and the manager is deleted before the hold"):
          gitlab.wait_until_succeeds("grep -qx success /var/lib/fake-gitlab/job-1.state", timeout=300)
          gitlab.wait_until_succeeds("${seen "DELETE" "/api/v4/runners/managers"}", timeout=120)

      with subtest("the VM is held while /etc/keep-runner exists"):
          runner.wait_until_succeeds("grep -q holding /run/gitlab-runner-vm/status.json", timeout=60)
          time.sleep(5)
          runner.succeed("systemctl is-active gitlab-runner-vm.service")
          runner.succeed("test -e /etc/keep-runner")

      with subtest("builds and Docker used the scratch disk"):
          runner.succeed("findmnt -n -o SOURCE /var/lib/scratch | grep -q /dev/vd")
          runner.succeed("test -L /home/runner/builds")
          runner.succeed("find /var/lib/scratch/builds -mindepth 1 | grep -q .")
          runner.wait_for_unit("docker.service")
          runner.succeed("test -d /var/lib/scratch/docker")

      with subtest("release ends the hold and the VM powers off"):
          runner.succeed("gitlab-runner-vm release")
          runner.wait_for_shutdown()
    '';
  };
}
