# The SSH host keys' fingerprints on the console once the keys exist, for GCE and DigitalOcean,
# where nothing else prints them (nixpkgs' EC2 configuration has its own print-host-key unit;
# cloud-init, which printed them, is not in these images). People compare a first login's host
# key with them: `gcloud compute instances get-serial-port-output VM | grep 'ssh host key'`.
# They go where the agent writes its own console lines (`settings.console`, else /dev/console).
{ config, lib, pkgs, ... }:
let
  agentConsole = config.services.gitlab-runner-vm.settings.console or null;
  # The agent's console prefix, from the facts the agent prints (`gitlab-runner-vm facts`).
  consolePrefix = (lib.importJSON ../agent/facts.json).console_prefix;
  keyDir = dirOf (lib.head config.services.openssh.hostKeys).path;
  console = if builtins.isString agentConsole && agentConsole != "off" then agentConsole else "/dev/console";
in
{
  systemd.services.print-host-key-fingerprints = lib.mkIf config.services.openssh.enable {
    description = "Print the SSH host keys' fingerprints on the console";
    wantedBy = [ "multi-user.target" ];
    after = [ "sshd-keygen.service" ];
    serviceConfig = {
      Type = "oneshot";
      RemainAfterExit = true;
      ExecStart = "${pkgs.runtimeShell} ${./host-key-fingerprints.sh} ${lib.escapeShellArg consolePrefix} ${config.programs.ssh.package}/bin/ssh-keygen ${keyDir}";
      StandardOutput = "file:${console}";
      # A serial port stopped by flow control must not hold multi-user.target up for long.
      TimeoutStartSec = 15;
    };
  };
}
