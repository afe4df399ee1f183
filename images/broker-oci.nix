# The broker's container image (examples/kubevirt/broker/broker.yaml): the binary and CA
# certificates for GitLab's and the API server's TLS, nothing else (no shell). It runs as
# 65534:65534 on a read-only root file system; settings come from BROKER_* variables and flags.
# The result is a docker archive (gzip); push it with
#   skopeo copy docker-archive:result docker://registry.example.com/ci/gitlab-runner-vm-broker:TAG
{ lib, dockerTools, cacert, broker, tag ? "latest" }:
let
  config = {
    Entrypoint = [ (lib.getExe broker) ];
    User = "65534:65534";
    Env = [ "SSL_CERT_FILE=${cacert}/etc/ssl/certs/ca-bundle.crt" ];
    ExposedPorts."8080/tcp" = { };
  };
in
dockerTools.buildLayeredImage {
  name = "gitlab-runner-vm-broker";
  inherit tag config;
  contents = [ ];
  # What the image runs, for tests/nix (the built image's config is a derivation's output).
  passthru = { imageConfig = config; inherit broker; };
}
