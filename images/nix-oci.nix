# A minimal OCI container with Nix (not NixOS), for CI jobs and development (seed 004): nix, bash,
# coreutils, git, curl and CA certificates; a Nix database that knows the image's own store
# paths; build users; flakes enabled; the sandbox off (containers rarely allow its namespaces).
# Load it with `docker load < result` or `podman load -i result`.
{ lib
, dockerTools
, buildEnv
, runCommand
, nix
, bashInteractive
, coreutils
, gnugrep
, gnused
, gnutar
, gzip
, xz
, findutils
, which
, less
, git
, curl
, cacert
, tag ? "latest"
}:
let
  buildUsers = 8;
  nixbld = map (n: "nixbld${toString n}") (lib.range 1 buildUsers);

  etc = runCommand "nix-oci-etc" { } ''
    mkdir -p $out/etc/nix
    {
      echo "root:x:0:0:root:/root:${bashInteractive}/bin/bash"
      ${lib.concatMapStrings (n: ''
        echo "nixbld${toString n}:x:${toString (30000 + n)}:30000:Nix build user ${toString n}:/var/empty:/sbin/nologin"
      '') (lib.range 1 buildUsers)}
      echo "nobody:x:65534:65534:nobody:/var/empty:/sbin/nologin"
    } > $out/etc/passwd
    {
      echo "root:x:0:"
      echo "nixbld:x:30000:${lib.concatStringsSep "," nixbld}"
      echo "nogroup:x:65534:"
    } > $out/etc/group
    {
      echo "root:!:1::::::"
      ${lib.concatMapStrings (u: ''
        echo "${u}:!:1::::::"
      '') nixbld}
      echo "nobody:!:1::::::"
    } > $out/etc/shadow
    cat > $out/etc/nix/nix.conf <<'CONF'
    build-users-group = nixbld
    experimental-features = nix-command flakes
    sandbox = false
    substituters = https://cache.nixos.org
    trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=
    CONF
  '';

  profile = buildEnv {
    name = "nix-oci-profile";
    paths = [ nix bashInteractive coreutils gnugrep gnused gnutar gzip xz findutils which less git curl cacert ];
  };
in
dockerTools.buildLayeredImageWithNixDb {
  name = "nix";
  inherit tag;
  contents = [ profile etc dockerTools.binSh dockerTools.usrBinEnv ];
  fakeRootCommands = ''
    mkdir -p tmp root var/tmp
    chmod 1777 tmp var/tmp
    chmod 0700 root
  '';
  config = {
    Cmd = [ "${bashInteractive}/bin/bash" ];
    Env = [
      "PATH=/root/.nix-profile/bin:/nix/var/nix/profiles/default/bin:/bin:/usr/bin"
      "NIX_SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt"
      "USER=root"
      "HOME=/root"
    ];
    WorkingDir = "/root";
  };
}
