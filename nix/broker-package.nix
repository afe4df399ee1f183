# The broker (docs/broker.md), built from this repository with the committed Cargo.lock. Its
# tests, and the end-to-end test of the agent against it, run in the agent's package
# (nix/package.nix runs the whole workspace's tests), so not a second time here.
{ lib, rustPlatform }:
let
  crate = lib.importTOML ../broker/Cargo.toml;
in
rustPlatform.buildRustPackage {
  pname = crate.package.name;
  inherit (crate.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      # A workspace member, and the broker compiles the agent's masking rule (secret.rs).
      ../agent
      ../broker
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [ "--package" crate.package.name ];
  doCheck = false;

  meta = {
    inherit (crate.package) description;
    license = lib.licenses.mit;
    platforms = lib.platforms.linux;
    mainProgram = "gitlab-runner-vm-broker";
  };
}
