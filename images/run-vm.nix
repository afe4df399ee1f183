# `nix run .#runner-vm [-- RUNNER_JSON]`: boots the runner qcow2 in QEMU the way KubeVirt runs
# it: a throw-away overlay on the image, runner.json on an ISO 9660 disk with serial
# `runner-info`, an empty disk with serial `scratch`, user networking (SSH on localhost:2222),
# the serial console on the terminal. Without an argument a sample runner.json is used, which
# names no reachable GitLab: the agent reports the failure, waits its failure delay and powers
# the VM off. Extra QEMU arguments may follow in $QEMU_OPTS.
{ lib
, stdenv
, writeShellApplication
, writeText
, qemu_kvm
, xorriso
, coreutils
, OVMF
, image
, filePath
, partitionTableType
}:
let
  sample = writeText "runner.json" (builtins.toJSON {
    name = "runner-vm-sample";
    url = "https://gitlab.example.com";
    token = "glrt-xxxxxxxxxxxxxxxxxxxx";
    executor = "shell";
  });
  inherit (stdenv.hostPlatform) qemuArch isAarch64;
  # aarch64 boots UEFI only; on x86_64 the hybrid image boots with SeaBIOS.
  firmware = lib.optionalString (isAarch64 || partitionTableType == "efi")
    "-bios ${if isAarch64 then "${OVMF.fd}/FV/QEMU_EFI.fd" else OVMF.mergedFirmware}";
  machine = if isAarch64 then "-machine virt,accel=kvm:tcg -cpu max" else "-machine q35,accel=kvm:tcg -cpu max";
in
writeShellApplication {
  name = "runner-vm";
  runtimeInputs = [ qemu_kvm xorriso coreutils ];
  text = ''
    config=''${1:-${sample}}
    [ -r "$config" ] || { echo "runner-vm: cannot read $config" >&2; exit 1; }
    work=$(mktemp -d -t runner-vm.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    mkdir "$work/info"
    cp "$config" "$work/info/runner.json"
    xorriso -as mkisofs -quiet -J -R -V cfgdata -o "$work/runner-info.iso" "$work/info"
    qemu-img create -q -f qcow2 -F qcow2 -b ${image}/${filePath} "$work/root.qcow2"
    qemu-img create -q -f qcow2 "$work/scratch.qcow2" 20G
    echo "runner-vm: booting ${filePath} with $config (SSH: ssh -p 2222 runner@localhost; quit: Ctrl-a x)"
    # shellcheck disable=SC2086
    qemu-system-${qemuArch} ${machine} ${firmware} -m 4096 -smp 2 -nographic \
      -drive file="$work/root.qcow2",if=virtio,format=qcow2 \
      -drive file="$work/runner-info.iso",if=none,id=runnerinfo,format=raw,readonly=on \
      -device virtio-blk-pci,drive=runnerinfo,serial=runner-info \
      -drive file="$work/scratch.qcow2",if=none,id=scratch,format=qcow2 \
      -device virtio-blk-pci,drive=scratch,serial=scratch \
      -nic user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22 \
      -device virtio-rng-pci \
      ''${QEMU_OPTS:-}
  '';
}
