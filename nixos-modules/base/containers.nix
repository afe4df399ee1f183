# Docker and Podman side by side. Podman's dockerCompat and dockerSocket would conflict with
# Docker, so both stay off and `podman` is used by its own name.
{ lib, ... }:
{
  virtualisation.docker = {
    enable = lib.mkDefault true;
    # Jobs may use overlay networks and restart the daemon; containers do not outlive a VM.
    daemon.settings.live-restore = lib.mkDefault false;
    # Not journald: it would keep job containers' raw output (secrets they print, unmasked) in
    # the persistent journal, for later jobs and held VMs to read. `local` keeps a small
    # rotated file per container, deleted with the container.
    logDriver = lib.mkDefault "local";
    daemon.settings.log-opts = lib.mkDefault {
      max-size = "10m";
      max-file = "2";
    };
  };
  virtualisation.podman = {
    enable = lib.mkDefault true;
    dockerCompat = lib.mkDefault false;
    dockerSocket.enable = lib.mkDefault false;
  };
}
