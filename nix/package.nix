# The gitlab-runner-vm package, built from this repository with the committed Cargo.lock; the
# crate's unit and integration tests (a fake GitLab on loopback, /bin/sh scripts) run in the
# build. Installs bin/gitlab-runner-vm and lib/systemd/system/gitlab-runner-vm.service (the
# canonical unit from agent/dist with /usr/bin/gitlab-runner-vm replaced by the binary's path).
{ lib, rustPlatform, cacert }:
let
  root = ../.;
  crate = lib.importTOML ../agent/Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = crate.package.name;
  inherit (crate.package) version;

  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../agent
      # A workspace member: cargo reads its manifest (and `--workspace` runs its tests) even
      # though only the agent is installed here.
      ../broker
      # The crate's tests check the README's flag, key and phase tables against the code.
      ../README.md
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--package" crate.package.name ];
  cargoTestFlags = [ "--workspace" ];

  # rustls reads the system's trust store when a client is built, even for http:// tests.
  nativeCheckInputs = [ cacert ];
  preCheck = ''
    export SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt
  '';

  postInstall = ''
    install -D -m 0644 agent/dist/gitlab-runner-vm.service $out/lib/systemd/system/gitlab-runner-vm.service
    substituteInPlace $out/lib/systemd/system/gitlab-runner-vm.service \
      --replace-fail /usr/bin/gitlab-runner-vm $out/bin/gitlab-runner-vm
  '';

  meta = {
    description = crate.package.description or "Lifecycle agent of disposable GitLab CI runner VMs";
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "gitlab-runner-vm";
  };
}
