# KubeVirt containerDisk: a container image holding one qcow2 at /disk/disk.qcow2 (mode 0444,
# /disk 0555, both owned by 107:107, the qemu user of virt-launcher), nothing else: no store
# paths, no shell. The result is an OCI archive; push it with
#   skopeo copy oci-archive:result docker://registry.example.com/gitlab-runner-vm:TAG
{ lib, dockerTools, runCommand, skopeo, image, filePath, name ? "gitlab-runner-vm", tag ? "latest" }:
let
  dockerArchive = dockerTools.buildLayeredImage {
    inherit name tag;
    contents = [ ];
    includeStorePaths = false;
    compressor = "none";
    fakeRootCommands = ''
      mkdir disk
      cp ${image}/${filePath} disk/disk.qcow2
      chmod 0444 disk/disk.qcow2
      chmod 0555 disk
      chown -R 107:107 disk
    '';
  };
in
runCommand "${name}-containerdisk-${tag}.oci.tar"
{
  nativeBuildInputs = [ skopeo ];
  passthru = { inherit dockerArchive image; };
  meta.description = "KubeVirt containerDisk (OCI archive) of ${image.name}";
}
  ''
    export HOME=$TMPDIR
    skopeo --insecure-policy --tmpdir "$TMPDIR" copy \
      --dest-compress-format gzip \
      docker-archive:${dockerArchive} oci-archive:$out:${lib.escapeShellArg tag}
  ''
