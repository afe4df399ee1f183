# Caches that outlive the VM (issue 20), on the runner images: pull-through caches of Docker
# Hub for Docker and Podman, set at build time here and per fleet in runner.json
# (`registry_mirrors`), which the agent merges into the same files before registering, so that
# one image serves fleets with different mirrors.
#
# - Docker: dockerd reads /etc/docker/daemon.json (the image's settings, as nixpkgs' docker
#   module would write them to the store), so that the agent can merge the fleet's mirrors into
#   it and reload Docker (SIGHUP rereads `registry-mirrors`) before the first job.
# - Podman: a containers-registries.conf.d drop-in (version 2, as drop-ins must be; nixpkgs
#   writes the main registries.conf in version 1, which drop-ins may follow). The agent's own
#   drop-in (60-...) comes after the image's (40-...) and wins for docker.io.
# - Nix: the image's substituters and keys are gitlabRunnerVm.base's (nix.settings); a fleet's
#   (runner.json's nix_substituters, nix_trusted_public_keys) go to a file that nix.conf
#   includes last, `extra-` settings that add to the image's, written by the agent before the
#   first job, which then restarts a running nix-daemon (it reads nix.conf when it starts).
#   `!include`: no such file (a fleet without them, an image without the agent) is no error.
{ config, lib, ... }:
let
  cfg = config.gitlabRunnerVm.runner;
  docker = config.virtualisation.docker;
  inherit (lib) mkIf mkOption types;

  # `https://host[:port]` -> `host[:port]`, and whether it is plain http.
  hostOf = url: lib.removeSuffix "/" (lib.last (lib.splitString "://" url));
  registriesConf = lib.concatStrings ([
    ''
      # Written by the image (gitlabRunnerVm.runner.registryMirrors).
      [[registry]]
      prefix = "docker.io"
      location = "docker.io"
    ''
  ] ++ map
    (url: ''

      [[registry.mirror]]
      location = "${hostOf url}"
    '' + lib.optionalString (lib.hasPrefix "http://" url) ''
      insecure = true
    '')
    cfg.registryMirrors);
in
{
  options.gitlabRunnerVm.runner.registryMirrors = mkOption {
    # As the agent accepts them in runner.json: a scheme and a host, no path, no credentials.
    type = types.listOf (types.strMatching "https?://[]A-Za-z0-9.:[-]+/?");
    default = [ ];
    example = [ "https://mirror.gcr.io" "http://registry-cache.ci.svc.cluster.local:5000" ];
    description = ''
      Pull-through caches of Docker Hub, tried in turn before Docker Hub itself, for Docker
      (`registry-mirrors` in /etc/docker/daemon.json) and Podman (a drop-in of
      /etc/containers/registries.conf.d). runner.json's `registry_mirrors` adds a fleet's own,
      first, at boot. Use a cache that pulls from Docker Hub only and takes no pushes (Docker's
      registry in proxy mode, a cloud's pull-through cache): a writable registry here would let
      one job serve images to the next.
    '';
  };

  config = lib.mkMerge [
    {
      nix.extraOptions = ''
        !include /etc/nix/gitlab-runner-vm.conf
      '';
    }
    (mkIf docker.enable {
      virtualisation.docker.daemon.settings.registry-mirrors = mkIf (cfg.registryMirrors != [ ]) cfg.registryMirrors;
      environment.etc."docker/daemon.json".text = builtins.toJSON docker.daemon.settings;
      # nixpkgs' ExecStart, reading the file above instead of the store's copy.
      systemd.services.docker.serviceConfig.ExecStart = lib.mkForce [
        ""
        "${docker.package}/bin/dockerd --config-file=/etc/docker/daemon.json ${docker.extraOptions}"
      ];
    })
    (mkIf (config.virtualisation.podman.enable && cfg.registryMirrors != [ ]) {
      environment.etc."containers/registries.conf.d/40-gitlab-runner-vm-image.conf".text = registriesConf;
    })
  ];
}
