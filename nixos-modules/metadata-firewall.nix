# The metadata firewall (issue 17): only the units that need the cloud metadata service reach
# it, matched by cgroup v2, never by uid. The metadata service serves runner.json (the
# instance's user-data) and instance credentials to whoever asks, and a root job or a
# `docker run --network host` container is uid 0 like the platform's agents.
#
# The rules are written once, in metadata-firewall.sh (run here by the iptables or the
# nftables firewall, and as it is by the VM test on Debian):
# - static, with the firewall: DNS (53) and NTP (123) to the metadata addresses stay open (GCE
#   serves both there); packets to them from containers (any bridge: Docker, Podman) are
#   dropped in PREROUTING; local ones go through an allow chain and are rejected unless a rule
#   there accepts them;
# - dynamic, per unit: a cgroup is resolved when its rule is inserted (xt_cgroup and nft's
#   `socket cgroupv2` both), so a unit cannot be named before it starts. Each allowed unit
#   adds the rule for its own cgroup in ExecStartPre=+ and removes it in ExecStopPost=+ (and,
#   for a oneshot, in ExecStartPost=+: its work is done, and systemd removes the cgroup of an
#   exited oneshot). A rule never matches a cgroup made later at the same path: a restarted
#   unit allows itself again.
# - the agent's unit delegates its cgroup: the agent moves itself into the sub-cgroup `agent`,
#   starts gitlab-runner in `runner`, and every shell job's stage moves into `jobs` (job-exec
#   --cgroup; a stage that cannot move does not run). `agent` is allowed at start; `runner`
#   only by the agent itself (`--metadata-firewall`: `allow <unit>/runner`) when runner.json's
#   cache uses the instance's identity, which gitlab-runner fetches to sign the cache's URLs.
#   `jobs` is a sibling of both (a rule admits a cgroup and its descendants), never allowed.
#   ExecStopPost revokes `agent` and every extra sub-cgroup. If the agent fails to move itself
#   its requests are refused (fail closed).
#
# User-data at rest: nixpkgs' fetch-ec2-metadata leaves it in /etc/ec2-metadata/user-data on
# the EBS root disk, DigitalOcean's digitalocean-metadata in /run/do-metadata/v1.json; a
# oneshot removes it once the units that read it have run. The agent fetches runner.json from
# the metadata service itself.
{ config, lib, options, pkgs, ... }:
let
  cfg = config.gitlabRunnerVm.runner.metadataFirewall;
  inherit (lib) mkOption types;

  nftables = config.networking.nftables.enable;
  # Which platform's modules this system has (from their options: reading systemd.services
  # here would depend on the units this module adds to it).
  aws = options ? amazonImage;
  gce = options.virtualisation ? googleComputeImage;
  digitalOcean = options.virtualisation ? digitalOcean;
  agentEnabled = config.services.gitlab-runner-vm.enable or false;

  script = pkgs.writeShellApplication {
    name = "gitlab-runner-vm-metadata-firewall";
    runtimeInputs = [ pkgs.coreutils ] ++ (if nftables then [ pkgs.nftables ] else [ config.networking.firewall.package ]);
    runtimeEnv = {
      METADATA_FIREWALL_BACKEND = if nftables then "nftables" else "iptables";
      METADATA_FIREWALL_ADDRESSES = lib.concatStringsSep " " cfg.addresses;
      METADATA_FIREWALL_OPEN_UDP = "53 123";
      METADATA_FIREWALL_OPEN_TCP = "53";
    };
    # writeShellApplication writes its own shebang (shellcheck wants one, first).
    text = lib.removePrefix "#!/usr/bin/env bash\n" (builtins.readFile ./metadata-firewall.sh);
  };
  exe = lib.getExe script;

  # systemd.services.<name> for "name" or "name.service".
  unitName = name: lib.removeSuffix ".service" name;
  units = map unitName cfg.allowedUnits;
  # A unit exists when something other than this module made it: a command, something that
  # wants it, or a timer of its name (units from systemd.packages have no ExecStart here).
  exists = name:
    let s = config.systemd.services.${name}; in
    s.enable && (s.script != "" || s.serviceConfig ? ExecStart || s.wantedBy != [ ] || s.requiredBy != [ ]
    || s.upheldBy != [ ] || config.systemd.timers ? ${name});
  hooks = name:
    let
      sub = cfg.allowedSubgroups.${name} or null;
      arg = lib.optionalString (sub != null) " ${sub}";
      extra = cfg.extraSubgroups.${name} or [ ];
      # Not read from the unit's Type: serviceConfig would then depend on itself.
      oneshot = lib.elem name (map unitName cfg.revokeAfterStart);
    in
    {
      serviceConfig = {
        # `+`: privileged whatever the unit's sandbox; first, before the unit's own commands.
        ExecStartPre = lib.mkBefore (lib.optional (extra != [ ]) "+${exe} mkdir-self ${lib.concatStringsSep " " extra}"
          ++ [ "+${exe} allow-self${arg}" ]);
        # The extra sub-cgroups too: the agent admits `runner` itself for an identity cache.
        ExecStopPost = [ "+${exe} revoke-self${arg}" ] ++ map (sub: "+${exe} revoke-self ${sub}") extra;
      } // lib.optionalAttrs oneshot {
        ExecStartPost = lib.mkAfter [ "+${exe} revoke-self${arg}" ];
      };
    };

  ec2UserData = "/etc/ec2-metadata/user-data";
  doMetadata = "/run/do-metadata/v1.json";
  scrub = aws || digitalOcean;
in
{
  imports = [
    (lib.mkRemovedOptionModule [ "gitlabRunnerVm" "runner" "metadataFirewall" "allowedUsers" ] ''
      The metadata firewall matches units by cgroup, no longer users by uid (a root job or a
      host-network container is uid 0 too). List the systemd units that need the metadata
      service in gitlabRunnerVm.runner.metadataFirewall.allowedUnits instead.
    '')
  ];

  options.gitlabRunnerVm.runner.metadataFirewall = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Whether jobs are kept from the cloud metadata service, which serves runner.json (the
        instance's user-data) and instance credentials. Only the processes of `allowedUnits`
        reach `addresses`, matched by cgroup (a root job and a host-network container are
        refused too); traffic to them from containers (any bridge: Docker, Podman) is dropped;
        DNS and NTP to those addresses stay open. Works with the iptables firewall
        (`networking.firewall.enable`) and with nftables (`networking.nftables.enable`: a
        table of its own, `inet gitlab-runner-vm-metadata`).
      '';
    };
    addresses = mkOption {
      type = types.listOf types.str;
      # GCE: Google's page on IPv6 for instances says that VMs reach the metadata server over
      # IPv4 only (https://cloud.google.com/compute/docs/ip-addresses/configure-ipv6-address,
      # "Specifications"); IPv6-only instances (preview) use fd20:ce::254, an address found in
      # the metadata deny-lists of SSRF filters, not in a Google document we could read.
      # Refusing an address nothing here uses costs nothing, so it is guarded on GCE.
      default = [ "169.254.169.254" "fd00:ec2::254" ] ++ lib.optional gce "fd20:ce::254";
      defaultText = lib.literalMD ''
        `[ "169.254.169.254" "fd00:ec2::254" ]`, and `"fd20:ce::254"` on GCE
      '';
      description = "Addresses of the metadata service (AWS, GCE, DigitalOcean; AWS's IPv6, and GCE's on GCE).";
    };
    allowedUnits = mkOption {
      type = types.listOf types.str;
      default =
        lib.optional agentEnabled "gitlab-runner-vm"
        ++ lib.optional (config.gitlabRunnerVm.runner.platformSshKeys or false) "gitlab-runner-vm-ssh-keys"
        ++ lib.optionals aws ([ "fetch-ec2-metadata" ]
        ++ lib.optional config.services.amazon-ssm-agent.enable "amazon-ssm-agent")
        ++ lib.optionals gce ([ "google-guest-agent" ]
        ++ lib.optional (config.networking.hostName == "") "gce-set-hostname"
        ++ lib.optionals (config.gitlabRunnerVm.gce.startupScripts or false) [ "google-startup-scripts" "google-shutdown-scripts" ]
        # OS Login looks users up at the metadata service: through nscd, sshd's
        # AuthorizedKeysCommand, and its cache's timer.
        ++ lib.optionals config.security.googleOsLogin.enable ([ "google-oslogin-cache" "sshd" ]
        ++ lib.optional config.services.nscd.enable "nscd"))
        ++ lib.optionals digitalOcean ([ "digitalocean-metadata" ]
        ++ lib.optional (config.networking.hostName == "") "digitalocean-set-hostname"
        ++ lib.optional config.services.do-agent.enable "do-agent");
      defaultText = lib.literalMD ''
        the agent (`gitlab-runner-vm`, its sub-cgroup `agent` only), `gitlab-runner-vm-ssh-keys`
        with `platformSshKeys`, and the platform's own units that reach the service: AWS
        `fetch-ec2-metadata` (and `amazon-ssm-agent` when on); GCE `google-guest-agent`,
        `gce-set-hostname`, the startup and shutdown scripts and OS Login's units when on;
        DigitalOcean `digitalocean-metadata`, `digitalocean-set-hostname`, `do-agent`
      '';
      description = ''
        The systemd services whose processes reach the metadata service. Each adds an allow
        rule for its own cgroup when it starts (ExecStartPre) and removes it when it stops
        (ExecStopPost; a oneshot also once it has run). Every name must be a service of this
        system. Anything else (jobs, root or not, containers, login sessions) is refused.
      '';
    };
    revokeAfterStart = mkOption {
      type = types.listOf types.str;
      default = lib.intersectLists cfg.allowedUnits [
        "gitlab-runner-vm-ssh-keys"
        "fetch-ec2-metadata"
        "gce-set-hostname"
        "digitalocean-metadata"
        "digitalocean-set-hostname"
      ];
      defaultText = lib.literalMD "the oneshots among the default `allowedUnits`";
      description = ''
        Units of `allowedUnits` that are done with the metadata service once started (oneshots,
        `Type=oneshot`): their rule is removed after the start too (ExecStartPost), not only
        when they stop, which a oneshot with `RemainAfterExit` does at shutdown only.
      '';
    };
    allowedSubgroups = mkOption {
      type = types.attrsOf types.str;
      default = lib.optionalAttrs agentEnabled { gitlab-runner-vm = "agent"; };
      defaultText = lib.literalExpression ''{ gitlab-runner-vm = "agent"; }'';
      description = ''
        Units of `allowedUnits` whose allow rule names a sub-cgroup of their cgroup rather than
        the whole (made when missing): the agent's unit delegates its cgroup, keeps the agent
        in `agent`, gitlab-runner in `runner` and every shell job's stage in `jobs`.
      '';
    };
    extraSubgroups = mkOption {
      type = types.attrsOf (types.listOf types.str);
      default = lib.optionalAttrs agentEnabled { gitlab-runner-vm = [ "runner" "jobs" ]; };
      defaultText = lib.literalExpression ''{ gitlab-runner-vm = [ "runner" "jobs" ]; }'';
      description = ''
        Sub-cgroups made (not allowed) before the allowed one, for units of `allowedSubgroups`;
        their rules are revoked when the unit stops (the agent allows `runner` itself when
        runner.json's cache uses the instance's identity).
      '';
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      systemd.services = lib.genAttrs units hooks;
    }
    # The agent admits gitlab-runner's cgroup with this script when the cache needs it.
    (lib.optionalAttrs (options.services ? gitlab-runner-vm) {
      services.gitlab-runner-vm.settings.metadata-firewall = lib.mkIf agentEnabled (lib.mkDefault exe);
    })
    {

      assertions = [
        {
          assertion = nftables || config.networking.firewall.enable;
          message = ''
            gitlabRunnerVm.runner.metadataFirewall needs a firewall: networking.firewall.enable
            (iptables) or networking.nftables.enable. Turn it off with
            gitlabRunnerVm.runner.metadataFirewall.enable = false, knowing that jobs can then
            read runner.json from the cloud metadata service.
          '';
        }
      ] ++ map
        (name: {
          assertion = exists name;
          message = ''
            gitlabRunnerVm.runner.metadataFirewall.allowedUnits lists "${name}", but this system
            has no such service (or it is disabled): a unit that does not exist cannot allow
            itself. Remove it from allowedUnits, or name the service as systemd does
            (systemd.services.<name>).
          '';
        })
        units
      ++ map
        (name: {
          assertion = lib.elem name units;
          message = ''
            gitlabRunnerVm.runner.metadataFirewall.allowedSubgroups names "${name}", which is not
            in allowedUnits.
          '';
        })
        (lib.attrNames cfg.allowedSubgroups);
    }
    (lib.mkIf (!nftables) {
      networking.firewall.extraCommands = "${exe} setup\n";
      # A reload is the stop commands, then the start ones: teardown keeps the allow rules of
      # running units.
      networking.firewall.extraStopCommands = "${exe} teardown\n";
    })
    (lib.mkIf nftables {
      # Not networking.nftables.tables: nftables.service deletes and remakes each of those on
      # every reload, which would drop the allow rules of running units. The table is ours,
      # set up after nixpkgs' rules are loaded (last: a ruleset that flushes everything would
      # remove it otherwise) and on each reload.
      systemd.services.nftables.serviceConfig = {
        ExecStartPost = lib.mkAfter [ "${exe} setup" ];
        ExecReload = lib.mkAfter [ "${exe} setup" ];
        ExecStopPost = [ "${exe} teardown --all" ];
      };
    })
    (lib.mkIf scrub {
      systemd.services.gitlab-runner-vm-scrub-user-data = {
        description = "Remove the user-data that the platform's units left at rest";
        wantedBy = [ "multi-user.target" ];
        # After every unit that reads the copy (nixpkgs' apply-ec2-data reads SSH host keys
        # from user-data; DigitalOcean's units read keys, the root password and the entropy
        # seed from v1.json); before the agent, so before any job.
        after = lib.optionals aws [ "fetch-ec2-metadata.service" "apply-ec2-data.service" ]
          ++ lib.optionals digitalOcean [
          "digitalocean-metadata.service"
          "digitalocean-ssh-keys.service"
          "digitalocean-set-root-password.service"
          "digitalocean-entropy-seed.service"
          "digitalocean-init.service"
        ];
        before = [ "gitlab-runner-vm.service" ];
        path = [ pkgs.coreutils pkgs.jq ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
        };
        script = lib.optionalString aws ''
          # On the EBS root disk: overwritten, then removed.
          if [ -e ${ec2UserData} ]; then
            shred --remove ${ec2UserData} || rm -f ${ec2UserData}
          fi
        '' + lib.optionalString digitalOcean ''
          # A tmpfs; kept without user_data, since digitalocean-metadata does not fetch again
          # while it exists (ConditionPathExists) and the other units read the rest.
          if [ -e ${doMetadata} ]; then
            (umask 077 && jq 'del(.user_data)' ${doMetadata} >${doMetadata}.scrubbed)
            mv ${doMetadata}.scrubbed ${doMetadata}
          fi
        '';
      };
    })
  ]);
}
