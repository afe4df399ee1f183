# What jobs may reach in a runner image, and what operators can rely on (issue 13):
#
# - the cloud metadata service (169.254.169.254, fd00:ec2::254) serves runner.json as user-data
#   and instance credentials to anything in the VM: traffic to it from container bridges (any
#   forwarded packet: Docker, Podman/netavark) is dropped in the raw table's PREROUTING, and
#   from local processes of users other than root (and `allowedUsers`) rejected in OUTPUT.
#   DNS (53) and NTP (123) stay open: GCE serves both at the metadata address;
# - the firewall is on (GCE turns it off by default) with only SSH open;
# - SSH: no root login; the platform's keys go to the operator user, not root and not the job
#   user (runner.nix's gitlab-runner-vm-ssh-keys on clouds; cloud-init's default user where
#   cloud-init runs); no job-writable ~/.ssh/authorized_keys is read (runner.nix).
#
# Imported by runner.nix, so it applies to every runner image; each setting is an option or a
# default a user's module overrides (PermitRootLogin with lib.mkForce: the amazon format sets it).
{ config, lib, ... }:
let
  cfg = config.gitlabRunnerVm.runner.metadataFirewall;
  inherit (lib) mkOption types;

  v6 = address: lib.hasInfix ":" address;
  tool = address: if v6 address then "ip6tables" else "iptables";
  # Chains of our own, flushed and re-linked on every firewall (re)start.
  forward = "runner-metadata-fwd";
  output = "runner-metadata-out";
  setup = tables: ''
    ${lib.concatMapStrings (t: ''
      ${t} -w -t raw -N ${forward} 2>/dev/null || ${t} -w -t raw -F ${forward}
      ${t} -w -t raw -D PREROUTING -j ${forward} 2>/dev/null || true
      ${t} -w -t raw -I PREROUTING -j ${forward}
      ${t} -w -N ${output} 2>/dev/null || ${t} -w -F ${output}
      ${t} -w -D OUTPUT -j ${output} 2>/dev/null || true
      ${t} -w -I OUTPUT -j ${output}
    '') tables}
  '';
  rules = address:
    let t = tool address; in ''
      ${t} -w -t raw -A ${forward} -d ${address} -p udp -m multiport --dports 53,123 -j RETURN
      ${t} -w -t raw -A ${forward} -d ${address} -p tcp --dport 53 -j RETURN
      ${t} -w -t raw -A ${forward} -d ${address} -j DROP
      ${t} -w -A ${output} -d ${address} -p udp -m multiport --dports 53,123 -j RETURN
      ${t} -w -A ${output} -d ${address} -p tcp --dport 53 -j RETURN
      ${lib.concatMapStrings (u: ''
        ${t} -w -A ${output} -d ${address} -m owner --uid-owner ${u} -j RETURN
      '') cfg.allowedUsers}
      ${t} -w -A ${output} -d ${address} -j REJECT
    '';
  teardown = tables: lib.concatMapStrings
    (t: ''
      ${t} -w -t raw -D PREROUTING -j ${forward} 2>/dev/null || true
      ${t} -w -t raw -F ${forward} 2>/dev/null || true
      ${t} -w -t raw -X ${forward} 2>/dev/null || true
      ${t} -w -D OUTPUT -j ${output} 2>/dev/null || true
      ${t} -w -F ${output} 2>/dev/null || true
      ${t} -w -X ${output} 2>/dev/null || true
    '')
    tables;
  tables = lib.unique (map tool cfg.addresses);
in
{
  options.gitlabRunnerVm.runner = {
    metadataFirewall = {
      enable = mkOption {
        type = types.bool;
        default = true;
        description = ''
          Whether jobs are kept from the cloud metadata service, which serves runner.json (the
          instance's user-data) and instance credentials. Traffic to `addresses` from
          containers (any bridge: Docker, Podman) is dropped, and from local processes of users
          other than `allowedUsers` rejected; DNS and NTP to those addresses stay open. Needs
          the iptables firewall (`networking.firewall.enable`, not nftables).
        '';
      };
      addresses = mkOption {
        type = types.listOf types.str;
        default = [ "169.254.169.254" "fd00:ec2::254" ];
        description = "Addresses of the metadata service (AWS, GCE, DigitalOcean; AWS's IPv6).";
      };
      allowedUsers = mkOption {
        type = types.listOf types.str;
        default = [ "root" ] ++ lib.optional (config.services.do-agent.enable && config.users.users ? do-agent) "do-agent";
        defaultText = lib.literalExpression ''[ "root" ] ++ lib.optional (config.services.do-agent.enable && config.users.users ? do-agent) "do-agent"'';
        description = ''
          Users whose processes still reach the metadata service: gitlab-runner-vm (which
          fetches runner.json and SSH keys there) and the platform's own units and guest
          agents run as root; DigitalOcean's do-agent runs as its own user in the runner image
          (images/digital-ocean.nix).
        '';
      };
    };

    rootLogin = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Whether root may log in over SSH (with a key). Off: the platform's SSH keys go to the
        operator user (`gitlabRunnerVm.runner.operator.user`), who has sudo.
      '';
    };
  };

  config = lib.mkMerge [
    {
      # On by default in NixOS, off in nixpkgs' GCE configuration (mkDefault): on in runner
      # images, with only SSH open (services.openssh.openFirewall).
      networking.firewall.enable = lib.mkOverride 900 true;

      # The amazon format sets "prohibit-password" without mkDefault, hence the stronger priority.
      services.openssh.settings.PermitRootLogin = lib.mkOverride 90 (if config.gitlabRunnerVm.runner.rootLogin then "prohibit-password" else "no");

      # Where a runner image runs cloud-init (the cloud images do not; a KubeVirt runner with
      # gitlabRunnerVm.kubevirt.cloudInit does): its keys go to the operator user (never the job
      # user), cloud-init's "default" user, root gets none, and user-data is data. cloud-init
      # stores it but neither runs nor parses it, so it quotes none of it (its "Unhandled
      # non-multipart" warning did, on the console): no scripts, cloud-config or part handlers.
      services.cloud-init.settings = lib.mkIf config.services.cloud-init.enable {
        allow_userdata = false;
        # Data only: keys, host name, files, partition growth. No bootcmd, runcmd or user
        # scripts, no phone-home or power-state-change, no password changes.
        cloud_init_modules = [
          "migrator"
          "seed_random"
          "write-files"
          "growpart"
          "resizefs"
          "update_hostname"
          "resolv_conf"
          "users-groups"
        ];
        cloud_config_modules = [ "ssh" ];
        cloud_final_modules = [ "ssh-authkey-fingerprints" "final-message" ];
        users = [ "default" ];
        disable_root = !config.gitlabRunnerVm.runner.rootLogin;
        system_info = {
          distro = "nixos";
          network.renderers = [ "networkd" ];
          default_user = {
            name = config.gitlabRunnerVm.runner.operator.user;
            lock_passwd = true;
          };
        };
      };
    }
    (lib.mkIf cfg.enable {
      networking.firewall.extraCommands = setup tables + lib.concatMapStrings rules cfg.addresses;
      networking.firewall.extraStopCommands = teardown tables;
      assertions = [
        {
          assertion = config.networking.firewall.enable && !config.networking.nftables.enable;
          message = ''
            gitlabRunnerVm.runner.metadataFirewall needs the iptables firewall
            (networking.firewall.enable = true, networking.nftables.enable = false); turn it off
            with gitlabRunnerVm.runner.metadataFirewall.enable = false, knowing that jobs can
            then read runner.json from the cloud metadata service.
          '';
        }
      ];
    })
  ];
}
