# Proxmox VE runner disk (x86_64): the KubeVirt qcow2 format (images/kubevirt.nix: a hybrid GPT
# that boots with SeaBIOS, Proxmox's default, or OVMF; the kernel console on ttyS0 for
# `qm terminal`; the QEMU guest agent; no cloud-init in a runner image), imported as a Proxmox
# template's disk (`qm set --scsi0 STORAGE:0,import-from=...`, docs/proxmox.md). runner.json
# comes from an ISO 9660 CD-ROM that examples/proxmox/runner-fleet.sh writes for each VM with the
# volume label KubeVirt gives its config disks, `cfgdata`: a CD-ROM has no virtio serial, so the
# config disk is found by that label, on whatever bus Proxmox puts it (ide2), and mounted at
# /runner-info exactly as on KubeVirt (read-only, runner.json root's only).
{ lib, options, ... }:
{
  imports = [ ./kubevirt.nix ];

  config = lib.mkMerge [
    { system.nixos.tags = lib.mkForce [ ]; }
    # A plain image (no runner module) has no config disk.
    (lib.optionalAttrs (options ? gitlabRunnerVm.runner.configDisk) {
      gitlabRunnerVm.runner.configDisk.device = "/dev/disk/by-label/cfgdata";
    })
  ];
}
