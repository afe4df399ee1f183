# Docker and Podman side by side. Podman's dockerCompat and dockerSocket would conflict with
# Docker, so both stay off and `podman` is used by its own name.
{ lib, ... }:
{
  virtualisation.docker = {
    enable = lib.mkDefault true;
    # Jobs may use overlay networks and restart the daemon; containers do not outlive a VM.
    daemon.settings.live-restore = lib.mkDefault false;
  };
  virtualisation.podman = {
    enable = lib.mkDefault true;
    dockerCompat = lib.mkDefault false;
    dockerSocket.enable = lib.mkDefault false;
  };
}
