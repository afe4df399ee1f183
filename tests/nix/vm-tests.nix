# NixOS VM tests (flake checks; they need a builder with KVM and the nixos-test feature).
# Node `runner` is the runner image's configuration (runner.nix, without the large tool set) with
# runner.json on an ISO 9660 disk of serial `runner-info` and an empty `scratch` disk, as
# KubeVirt presents them. It runs the real agent and the real gitlab-runner against node
# `gitlab`, a fake GitLab (fake-gitlab.py) that hands out one shell job.
{ pkgs, modules }:
let
  inherit (pkgs) lib;
  # Where the agent keeps status.json, from the facts it prints (`gitlab-runner-vm facts`).
  stateDir = (lib.importJSON ../../agent/facts.json).state_dir;

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

  # A cloud runner's user-data: runner.json on one line, so that a message quoting its first
  # line would quote the token.
  cloudToken = "glrt-x.x.x.x.x.x.x.x.x.x.x.x.x.x";
  userData = pkgs.writeText "user-data" (builtins.toJSON { token = cloudToken; url = "http://gitlab"; executor = "shell"; max_jobs = 1; idle_timeout = 300; });
  keyPairKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHbUr2/vf4pyrTwMy0qnzsmIv5GuUDlfCNGXd1oBHGkp key-pair";

  # The fake metadata service's address in vm-cloud-user-data: a second address of `gitlab`.
  metadataAddress = "192.168.1.254";

  # As the job user, the way a job runs: no login session, a shell with the system's PATH.
  asJob = command: "su runner -s /bin/sh -c ${lib.escapeShellArg command}";

  # What a job cannot do (issue 17), and that the operator can, so that each check can fail. Run
  # in a held VM (vm-keep-runner): one that powers off after its job could do so mid-check.
  jobCannotBecomeRoot = ''
    with subtest("a job cannot become root: no sudo, no docker, no journal; the operator can"):
        runner.wait_for_unit("docker.service")
        groups = runner.succeed("id -nG runner").split()
        assert not {"wheel", "docker", "podman", "adm", "systemd-journal"} & set(groups), f"the job user is in {groups}"
        runner.fail("${asJob "/run/wrappers/bin/sudo -n true"}")
        runner.succeed("su operator -s /bin/sh -c '/run/wrappers/bin/sudo -n true'")
        runner.fail("${asJob "docker ps"}")
        runner.succeed("docker ps")
        runner.succeed("journalctl -q -b -u gitlab-runner-vm.service --no-pager | grep -q .")
        runner.succeed("[ -z \"$(${asJob "journalctl -q -b -u gitlab-runner-vm.service --no-pager"})\" ]")

    with subtest("shell jobs get rootless Podman: the job user's subuid range maps"):
        runner.succeed("grep -q '^runner:' /etc/subuid && grep -q '^runner:' /etc/subgid")
        runner.succeed("[ $(su -l runner -c 'podman unshare cat /proc/self/uid_map' | wc -l) -ge 2 ]")
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
          runner.wait_until_succeeds("grep -q holding ${stateDir}/status.json", timeout=60)
          time.sleep(5)
          runner.succeed("systemctl is-active gitlab-runner-vm.service")
          runner.succeed("test -e /etc/keep-runner")

      ${jobCannotBecomeRoot}

      with subtest("sshd reads the operator's ~/.ssh/authorized_keys (the guest agent's), no job's"):
          runner.succeed("sshd -T -C user=operator,host=h,addr=127.0.0.1 | grep -i '^authorizedkeysfile %h/.ssh/authorized_keys '")
          runner.fail("sshd -T -C user=runner,host=h,addr=127.0.0.1 | grep -i '^authorizedkeysfile .*\\.ssh'")
          runner.succeed("[ $(stat -c %a:%U /home/operator) = 700:operator ]")

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

  # A cloud runner image as runner-amazon is (config-source aws, no cloud-init), its metadata
  # service a fake IMDSv2 on node `gitlab` (fake-imds.py, port 8254): runner.json comes from
  # the user-data, the key pair's key reaches the CI user, and nothing of the user-data reaches
  # the console or the journal.
  vm-cloud-user-data = pkgs.testers.runNixOSTest {
    name = "gitlab-runner-vm-cloud-user-data";
    nodes = {
      gitlab = lib.recursiveUpdate gitlabNode {
        networking.firewall.allowedTCPPorts = [ 80 8254 ];
        # The metadata service's own address, apart from GitLab's (which jobs must reach): the
        # runner's metadata firewall guards this one as it guards 169.254.169.254 on a cloud.
        networking.interfaces.eth1.ipv4.addresses = lib.mkAfter [{ address = metadataAddress; prefixLength = 24; }];
        systemd.services.fake-imds = {
          wantedBy = [ "multi-user.target" ];
          environment.STATE_DIR = "/var/lib/fake-imds";
          serviceConfig.ExecStart = "${pkgs.python3.interpreter} ${./fake-imds.py} 8254 ${userData} ${lib.escapeShellArg keyPairKey}";
        };
      };
      runner = {
        imports = [ modules.runner ];
        gitlabRunnerVm.base.tools.enable = false;
        gitlabRunnerVm.runner.metadataFirewall.addresses = [ metadataAddress ];
        environment.systemPackages = [ pkgs.curl ];
        services.gitlab-runner-vm.settings = {
          config-source = "aws";
          metadata-url = "http://${metadataAddress}:8254";
          failure-delay = 5;
          config-wait = 60;
        };
        virtualisation = {
          memorySize = 2048;
          cores = 2;
        };
      };
    };
    testScript = ''
      gitlab.start()
      gitlab.wait_for_open_port(80)
      gitlab.wait_for_open_port(8254)
      runner.start()

      with subtest("runner.json comes from the user-data over IMDSv2, readable by root only"):
          gitlab.wait_until_succeeds("${seen "POST" "/api/v4/runners/verify"}", timeout=300)
          gitlab.succeed("""grep -F '"method": "PUT", "path": "/latest/api/token"' /var/lib/fake-imds/requests.jsonl""")
          gitlab.succeed("""grep -F '"path": "/latest/user-data", "token": true' /var/lib/fake-imds/requests.jsonl""")
          runner.succeed("[ $(stat -c %a /run/runner-info/runner.json) = 600 ]")
          runner.succeed("[ $(stat -c %a:%U /run/runner-info) = 700:root ]")
          runner.fail("su runner -s /bin/sh -c 'cat /run/runner-info/runner.json'")

      with subtest("the metadata service answers the agent's cgroup only: not a job, not root elsewhere"):
          # The agent got runner.json through the firewall above (its `agent` cgroup is allowed).
          # Refused is curl's exit 7 (the REJECT's "connection refused"), not a missing curl.
          runner.succeed("iptables -S | grep -F -- '-d ${metadataAddress}'")
          runner.succeed("${asJob "curl -s -m 5 http://${metadataAddress}:8254/latest/meta-data/; test $? = 7"}")
          # Root outside the allowed units (this shell is the test driver's service) is refused too.
          runner.succeed("curl -s -m 5 http://${metadataAddress}:8254/latest/meta-data/; test $? = 7")
          # GitLab, on the same host, stays reachable for jobs.
          runner.succeed("${asJob "curl -s -m 5 -o /dev/null http://gitlab/"}")

      with subtest("no cloud-init, no config disk to wait for"):
          runner.fail("systemctl cat cloud-init.service")
          runner.succeed("systemctl cat gitlab-runner-vm.service")
          runner.fail("systemctl cat 'runner\\x2dinfo.mount'")

      with subtest("the key pair's key goes to the operator, in a file sshd reads, none to the job user"):
          runner.wait_for_unit("gitlab-runner-vm-ssh-keys.service")
          runner.succeed("grep -qF '${keyPairKey}' /run/ssh-keys/operator")
          runner.succeed("[ $(stat -c %a:%U /run/ssh-keys/operator) = 644:root ]")
          runner.fail("test -e /run/ssh-keys/runner")
          runner.succeed("sshd -T -C user=operator,host=h,addr=127.0.0.1 | grep -i '^authorizedkeysfile .*/run/ssh-keys/'")
          runner.fail("sshd -T -C user=runner,host=h,addr=127.0.0.1 | grep -i '^authorizedkeysfile .*\\.ssh'")

      with subtest("no token characters on the console or in any log"):
          token = "${cloudToken}"
          # The console shows what the units print and the kernel's messages: all of it is in
          # the journal too.
          for piece in [token[i:i + 8] for i in range(0, len(token) - 8)]:
              runner.fail(f"journalctl -b --no-pager | grep -F -- '{piece}'")
    '';
  };
}
