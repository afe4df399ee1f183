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

  # A cloud runner's user-data: runner.json on one line, so that a warning quoting its first
  # line would quote the token. As cloud-init's NoCloud data source reads it (label cidata).
  cloudToken = "glrt-x.x.x.x.x.x.x.x.x.x.x.x.x.x";
  userDataIso = pkgs.runCommand "user-data.iso" { nativeBuildInputs = [ pkgs.xorriso ]; } ''
    mkdir seed
    cat > seed/user-data <<'JSON'
    ${builtins.toJSON { token = cloudToken; url = "http://gitlab"; executor = "shell"; max_jobs = 1; idle_timeout = 300; }}
    JSON
    printf 'instance-id: runner-test\nlocal-hostname: runner\n' > seed/meta-data
    xorriso -as mkisofs -quiet -J -R -V cidata -o $out seed
  '';

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

      with subtest("runner.json comes from the config disk, readable by root only"):
          runner.wait_for_unit("runner-info.mount")
          runner.succeed("test -s /runner-info/runner.json")
          runner.succeed("[ $(stat -c %a /runner-info/runner.json) = 400 ]")
          runner.fail("su runner -s /bin/sh -c 'cat /runner-info/runner.json'")

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

      with subtest("the boot is clean: no failed unit"):
          runner.wait_until_succeeds("[ $(systemctl is-system-running) = running ]", timeout=60)

      with subtest("builds, /tmp, the home and Docker use the scratch disk"):
          runner.succeed("findmnt -n -o SOURCE /var/lib/scratch | grep -q /dev/vd")
          for path in ["/tmp", "/var/tmp", "/var/lib/containers", "/home/runner"]:
              runner.succeed(f"findmnt -n -o SOURCE {path} | grep -q /dev/vd")
          runner.succeed("test -L /home/runner/builds")
          runner.succeed("find /var/lib/scratch/builds -mindepth 1 | grep -q .")
          runner.wait_for_unit("docker.service")
          runner.succeed("test -d /var/lib/scratch/docker")

      with subtest("release ends the hold and the VM powers off"):
          runner.succeed("gitlab-runner-vm release")
          runner.wait_for_shutdown()
    '';
  };

  # A cloud runner image (runner.nix with cloud-init and user-data, as runner-amazon, runner-gce
  # and digital-ocean are; NoCloud stands in for their metadata services): the JSON user-data
  # becomes runner.json, and nothing of it reaches the console or the journal.
  vm-cloud-user-data = pkgs.testers.runNixOSTest {
    name = "gitlab-runner-vm-cloud-user-data";
    nodes = {
      gitlab = gitlabNode;
      runner = {
        imports = [ modules.runner ];
        gitlabRunnerVm.base.tools.enable = false;
        gitlabRunnerVm.runner.userData.datasources = [ "NoCloud" ];
        services.cloud-init.enable = true;
        services.gitlab-runner-vm.settings = {
          failure-delay = 5;
          config-wait = 60;
        };
        virtualisation = {
          memorySize = 2048;
          cores = 2;
          qemu.drives = lib.mkAfter [
            {
              name = "cidata";
              file = "${userDataIso}";
              driveExtraOpts = {
                format = "raw";
                readonly = "on";
              };
            }
          ];
        };
      };
    };
    testScript = ''
      gitlab.start()
      gitlab.wait_for_open_port(80)
      runner.start()

      with subtest("runner.json comes from the user-data, readable by root only"):
          runner.wait_for_unit("runner-info-user-data.service")
          runner.succeed("[ $(stat -c %a /runner-info/runner.json) = 600 ]")
          gitlab.wait_until_succeeds("${seen "POST" "/api/v4/runners/verify"}", timeout=300)

      with subtest("no token characters on the console or in any log"):
          token = "${cloudToken}"
          # The console shows what the units print (StandardOutput=journal+console) and the
          # kernel's messages: all of it is in the journal too.
          for piece in [token[i:i + 8] for i in range(0, len(token) - 8)]:
              runner.fail(f"journalctl -b --no-pager | grep -F -- '{piece}'")
              runner.fail(f"cat /var/log/cloud-init*.log | grep -F -- '{piece}'")
          runner.fail("journalctl -b --no-pager | grep -F 'non-multipart'")
    '';
  };
}
