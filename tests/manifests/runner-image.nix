# What the KubeVirt manifests rely on in the runner image, read from its evaluated NixOS
# configuration (tests/nix/eval-json tests/manifests/runner-image.nix): the disks by serial and
# their mount points, where the agent reads runner.json, the job user, the operator user (whom
# accessCredentials must name: the QEMU guest agent writes its ~/.ssh/authorized_keys, the one
# home sshd reads keys from), the guest agent, and the unit's stop timeout when the module
# raises it.
{ flake }:
let
  inherit (flake.nixosConfigurations.nixos-runner) config;
  inherit (flake.nixosConfigurations.nixos-runner.pkgs) lib;
  runner = config.gitlabRunnerVm.runner;
  mount = point: {
    inherit (config.fileSystems.${point}) device fsType options;
  };
  unit = config.systemd.services.gitlab-runner-vm;
in
{
  configDisk = runner.configDisk // { mount = mount runner.configDisk.mountPoint; };
  # The scratch disk has no fstab entry: runner-scratch mounts it when it is there.
  scratchDisk = {
    inherit (runner.scratchDisk) enable serial mountPoint devices;
  };
  agent = {
    inherit (config.services.gitlab-runner-vm) enable;
    config = unit.environment.GITLAB_RUNNER_VM_CONFIG;
    # The user jobs run as (GITLAB_RUNNER_VM_JOB_USER); runnerUser is its name of before.
    jobUser = unit.environment.GITLAB_RUNNER_VM_JOB_USER;
    runnerUser = unit.environment.GITLAB_RUNNER_VM_JOB_USER;
    timeoutStopSec = unit.serviceConfig.TimeoutStopSec or null;
  };
  ciUser = config.gitlabRunnerVm.base.user;
  operatorUser = runner.operator.user;
  operatorHomedirKeys = runner.operator.homedirKeys;
  normalUsers = builtins.attrNames (lib.filterAttrs (_: user: user.isNormalUser) config.users.users);
  qemuGuest = config.services.qemuGuest.enable;
  diskSizeMiB = config.virtualisation.diskSize;
  # The runner image for the broker (examples/kubevirt/broker/pool.yaml).
  broker =
    let
      b = flake.nixosConfigurations.nixos-runner-broker.config;
      identity = b.gitlabRunnerVm.runner.identityDisk;
      env = b.systemd.services.gitlab-runner-vm.environment;
    in
    {
      identityDisk = identity // {
        mount = { inherit (b.fileSystems.${identity.mountPoint}) device fsType options; };
      };
      configDisk = b.fileSystems ? ${b.gitlabRunnerVm.runner.configDisk.mountPoint};
      configSource = env.GITLAB_RUNNER_VM_CONFIG_SOURCE;
      tokenFile = env.GITLAB_RUNNER_VM_BROKER_TOKEN_FILE;
      brokerUrl = env.GITLAB_RUNNER_VM_BROKER_URL or null;
    };
}
