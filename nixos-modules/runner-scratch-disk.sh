#!/usr/bin/env bash
# Mounts the scratch disk at boot, when the platform has one: the first whole disk that one of
# the patterns names (nixos-modules/runner.nix: a KubeVirt emptyDisk by its serial, AWS
# instance-store NVMe, GCE local SSD), formatted ext4 when it is blank. runner.nix runs it from
# runner-scratch.service, before local-fs.target, and then moves /tmp and the others onto it.
#
# It never waits for a disk: it lets udev finish naming the block devices the kernel already has
# (`udevadm wait` on each of /sys/class/block, bounded by --udev-timeout; not the whole event
# queue of the boot), then looks at the names udev made. A platform without such a disk, or
# without patterns at all, boots on without one; everything then stays on the root file system.
# It never fails the boot either: what it cannot use, it says why and leaves.
#
# Usage: runner-scratch-disk.sh --mount-point DIR [--device PATTERN]... [--udev-timeout SECONDS]
#                               [--block-dir DIR]
# A PATTERN is a path with shell wildcards, e.g. /dev/disk/by-id/google-local-nvme-ssd-*;
# links to partitions (…-partN) are skipped: a partitioned disk is someone's, never scratch.
# --block-dir is where the kernel lists its block devices (/sys/class/block; tests point it
# elsewhere).
set -uo pipefail

mount_point=
udev_timeout=10
block_dir=/sys/class/block
patterns=()
while [ $# -gt 0 ]; do
  case $1 in
    --mount-point) mount_point=${2:?--mount-point needs a directory}; shift 2 ;;
    --device) patterns+=("${2:?--device needs a pattern}"); shift 2 ;;
    --udev-timeout) udev_timeout=${2:?--udev-timeout needs seconds}; shift 2 ;;
    --block-dir) block_dir=${2:?--block-dir needs a directory}; shift 2 ;;
    *) echo "runner-scratch-disk: unknown argument '$1' (see the usage in $0)" >&2; exit 2 ;;
  esac
done
if [ -z "$mount_point" ]; then
  echo "runner-scratch-disk: --mount-point is missing (see the usage in $0)" >&2
  exit 2
fi

say() { echo "runner-scratch-disk: $*"; }

if [ ${#patterns[@]} -eq 0 ]; then
  say "no scratch disk on this platform: jobs write to the root file system"
  exit 0
fi
if mountpoint -q "$mount_point"; then
  say "$mount_point is already mounted"
  exit 0
fi

# udev names the disks the kernel found (/dev/disk/by-id): wait until it has initialized the
# block devices the kernel has now, never for one that is not there.
mapfile -t blocks < <(compgen -G "$block_dir/*")
if [ ${#blocks[@]} -gt 0 ]; then
  udevadm wait --timeout="$udev_timeout" -- "${blocks[@]}" ||
    say "udev did not name the ${#blocks[@]} block devices within $udev_timeout s; looking at the disks named so far"
fi

# The first existing whole disk, in the order of the patterns (and of the names within one).
disk=
for pattern in "${patterns[@]}"; do
  while IFS= read -r link; do
    case $link in *-part[0-9]*) continue ;; esac
    [ -e "$link" ] || continue
    disk=$(readlink -f -- "$link")
    say "scratch disk $link ($disk)"
    break 2
  done < <(compgen -G "$pattern" | LC_ALL=C sort)
done
if [ -z "$disk" ]; then
  say "no disk matches ${patterns[*]}: jobs write to the root file system"
  exit 0
fi

# blkid -p: 0 found a signature, 2 found none (a blank disk), anything else could not read it.
probe=$(blkid -p -o export -- "$disk" 2>&1)
status=$?
type=$(sed -n 's/^TYPE=//p' <<<"$probe")
table=$(sed -n 's/^PTTYPE=//p' <<<"$probe")
case $status in
  0)
    if [ -n "$table" ] || [ "$type" != ext4 ]; then
      say "$disk holds ${type:-a $table partition table}, not a scratch file system (ext4): left alone; jobs write to the root file system"
      exit 0
    fi
    ;;
  2)
    say "formatting the blank $disk as ext4"
    # nodiscard: a new cloud or KubeVirt disk reads as zeros already, and discarding a large
    # NVMe disk whole can take minutes of the boot. No blocks reserved for root: scratch.
    if ! mkfs.ext4 -q -F -m 0 -E nodiscard -L scratch -- "$disk"; then
      say "mkfs.ext4 $disk failed: jobs write to the root file system"
      exit 0
    fi
    ;;
  *)
    say "blkid could not read $disk (status $status: $probe): left alone; jobs write to the root file system"
    exit 0
    ;;
esac

mkdir -p -- "$mount_point"
if ! mount -t ext4 -- "$disk" "$mount_point"; then
  say "mounting $disk on $mount_point failed: jobs write to the root file system"
  exit 0
fi
say "mounted $disk on $mount_point"
