#!/usr/bin/env bash
# A fleet of GitLab CI runner VMs on a Proxmox VE node that replaces itself, kept by this script
# run as root on that node (runner-fleet.service beside it runs `watch`; or cron runs
# `reconcile` every minute: docs/proxmox.md).
#
# Each runner VM is a clone of TEMPLATE (the `runner-proxmox` image imported as a template),
# with runner.json on an ISO 9660 CD-ROM of its own (ide2), labelled `cfgdata`, which the image
# mounts read-only at /runner-info, root's only. The ISO carries the runner token, so it is no
# Proxmox storage volume: it is a file in ISO_DIR (0700, root's), attached by its absolute path
# (only root may attach one), made for one VM (runner.json's `name` is the VM's name) and
# deleted with it. The agent registers, runs its jobs, deregisters and powers the VM off;
# nothing in Proxmox removes a VM that is off. So each run of `reconcile`:
#   1. takes the fleet's lock (LOCK_FILE): a run that finds it held does nothing and exits 0;
#   2. lists the node's VMs (`pvesh get /nodes/NODE/qemu`); if that fails, or the answer is not
#      one JSON array of VMs, it stops there: nothing is created or destroyed;
#   3. destroys the fleet's VMs that are stopped (runners that finished) and those created more
#      than MAX_AGE seconds ago (the lifetime cap), after a shutdown (`qm shutdown`: ACPI or
#      the guest agent, as the power button; the agent aborts its job and deregisters) of at
#      most SHUTDOWN_TIMEOUT seconds, then a hard stop; then removes their ISOs and any ISO of
#      the fleet without a VM;
#   4. clones VMs until COUNT run: an ISO, `qm clone`, `qm set` (the CD-ROM, a scratch disk
#      when asked, the tag), `qm start`. A failed call stops the run there; a VM left stopped
#      by it is destroyed by the next run.
# The fleet's VMs are the node's VMs named TAG-<UTC creation time>-<n>; nothing else is touched.
# Every qm and pvesh call is given at most CLI_TIMEOUT seconds.
#
#   examples/proxmox/runner-fleet.sh reconcile   # once (cron: every minute)
#   examples/proxmox/runner-fleet.sh watch       # reconcile every INTERVAL seconds, for ever
#   examples/proxmox/runner-fleet.sh status      # the fleet's VMs
#   examples/proxmox/runner-fleet.sh delete      # shut down and destroy all of the fleet
#
# Settings (environment; fleet.env beside this script lists them all):
#   TEMPLATE     VM id of the runner template on NODE (reconcile)
#   NODE         the Proxmox node (default: this host's name, as Proxmox names its node)
#   COUNT        VMs to keep (default 2; 0 lets the fleet drain: finished ones are not replaced)
#   RUNNER_JSON  runner.json for every VM (default ./runner.json); its `name` is set per VM
#   TAG          prefix of the VMs' names, and their Proxmox tag (default gitlab-runners)
#   MAX_AGE      lifetime cap in seconds (default 21600, 6 h: a job's timeout (1 h) and the
#                agent's --hold-max (4 h) with margin); older VMs are shut down and destroyed
#   ISO_DIR      where each VM's config ISO is written (default /var/lib/gitlab-runner-fleet/iso;
#                made 0700; not a Proxmox storage, so no Proxmox user can attach an ISO)
#   CLONE_STORAGE  optional storage for full clones; unset: linked clones of the template
#   SCRATCH      optional scratch disk per VM, STORAGE:GiB (e.g. local-lvm:50), attached as a
#                virtio disk with serial `scratch`, destroyed with the VM
#   INTERVAL     seconds between runs of `watch` (default 60)
#   SHUTDOWN_TIMEOUT  seconds a VM gets to shut down before it is stopped hard (default 120:
#                the agent's --stop-timeout (40 s) and --deregister-timeout (30 s) with margin)
#   CLI_TIMEOUT  seconds one qm or pvesh call may take (default 300)
#   LOCK_FILE    the fleet's lock (default /run/lock/gitlab-runner-fleet-TAG.lock)
# jq reads pvesh's JSON, genisoimage (which Proxmox VE installs for its cloud-init drives) or
# xorriso writes the ISOs, flock(1) takes the lock.
set -euo pipefail

tag=${TAG:-gitlab-runners}
iso_dir=${ISO_DIR:-/var/lib/gitlab-runner-fleet/iso}

die() {
  echo "runner-fleet: $*" >&2
  exit 1
}

warn() {
  echo "runner-fleet: $*" >&2
}

need() {
  [ -n "${!1:-}" ] || die "set $1 (see the comment at the top of $0)"
}

whole() { # whole NAME DEFAULT: the setting, checked to be a whole number
  local value=${!1:-$2}
  [[ $value =~ ^[0-9]+$ ]] || die "$1 must be a whole number, not '$value' (see the comment at the top of $0)"
  echo "$value"
}

# A Proxmox CLI (qm, pvesh), given at most CLI_TIMEOUT seconds (a call stuck on the cluster file
# system must not hold the lock for ever), without the lock's descriptor.
pve() {
  local status=0
  timeout --kill-after=10 "$cli_timeout" "$@" 9>&- || status=$?
  [ "$status" -ne 124 ] || warn "${*:1:3} did not finish within $cli_timeout s (CLI_TIMEOUT)"
  return "$status"
}

# Takes the fleet's lock on file descriptor 9 for the rest of this process: at once (`now`: a
# run that finds it held exits 0), or waiting up to CLI_TIMEOUT seconds (`wait`).
lock() {
  local file=${LOCK_FILE:-/run/lock/gitlab-runner-fleet-$tag.lock}
  exec 9>>"$file" || die "cannot open the lock file $file (set LOCK_FILE to a file this user may write)"
  if [ "$1" = now ]; then
    flock -n 9 || {
      warn "another run holds the fleet's lock ($file): nothing done this time"
      exit 0
    }
  else
    flock -w "$cli_timeout" 9 || die "the fleet's lock ($file) is still held after $cli_timeout s; nothing done"
  fi
}

# One line per VM of the node: "vm VMID STATUS NAME LOCK" for the fleet's (LOCK `-` when none),
# "template VMID" for templates. Fails when pvesh fails or prints anything but one JSON array of
# VMs, so that a bad answer never looks like an empty fleet.
vms() {
  local json
  json=$(pve pvesh get "/nodes/$node/qemu" --output-format json) || return 1
  jq -r --slurp --arg tag "$tag" '
    if length != 1 then error("not one JSON value") else .[0] end
    | if type != "array" then error("not a list of VMs") else .[] end
    | if (.vmid | type) != "number" or (.status | type) != "string" then error("a VM without vmid or status")
      elif .template == 1 then "template \(.vmid)"
      elif ((.name // "") | test("^" + $tag + "-[0-9]{14}-[0-9]+$")) then "vm \(.vmid) \(.status) \(.name) \(.lock // "-")"
      else empty end' <<<"$json"
}

# Seconds since the epoch of the UTC time in a VM's name (TAG-20261206060000-0), in awk.
born() {
  awk -v ts="${1%-*}" 'BEGIN {
    ts = substr(ts, length(ts) - 13)
    if (ts !~ /^[0-9]+$/) exit 1
    y = substr(ts, 1, 4); m = substr(ts, 5, 2) + 0; d = substr(ts, 7, 2) + 0
    y -= (m <= 2)
    era = int(y / 400); yoe = y - era * 400
    doy = int((153 * (m > 2 ? m - 3 : m + 9) + 2) / 5) + d - 1
    printf "%.0f\n", (era * 146097 + yoe * 365 + int(yoe / 4) - int(yoe / 100) + doy - 719468) * 86400 + substr(ts, 9, 2) * 3600 + substr(ts, 11, 2) * 60 + substr(ts, 13, 2)
  }'
}

# Shuts the given VMs down, all at once: `qm shutdown` (the power button) for at most
# SHUTDOWN_TIMEOUT seconds, then a hard stop (--forceStop; qm gets 15 s more for it); one whose
# shutdown fails or hangs is stopped with `qm stop`, with a warning (its runner manager may then stay in GitLab until GitLab
# forgets it).
shut_down() {
  [ $# -gt 0 ] || return 0
  local id pids=() i=0
  echo "shutting down $# VM(s) before destroying them: $*"
  for id in "$@"; do
    {
      timeout --kill-after=5 "$((shutdown_timeout + 15))" qm shutdown "$id" --timeout "$shutdown_timeout" --forceStop 1 9>&- >/dev/null || {
        warn "VM $id did not shut down within $shutdown_timeout s (SHUTDOWN_TIMEOUT) or its shutdown failed; stopping it"
        pve qm stop "$id" >/dev/null
      }
    } &
    pids+=($!)
  done
  for id in "$@"; do
    wait "${pids[i]}" || warn "VM $id could not be stopped"
    i=$((i + 1))
  done
}

# Destroys the given VMs (their disks with them) and their ISOs. Fails at the first VM that
# cannot be destroyed.
destroy() {
  local entry id name
  for entry in "$@"; do
    id=${entry%% *} name=${entry#* }
    pve qm destroy "$id" --purge 1 --destroy-unreferenced-disks 1 >/dev/null || return 1
    rm -f "$iso_dir/$name.iso"
  done
}

# Writes the ISO for VM NAME: runner.json with `name` set, volume label cfgdata (what the image
# mounts), root's only (umask 077). The staging copy holds the token too: removed at once, and
# by the next run if this one was killed first.
write_iso() {
  local name=$1 stage ok=true out
  stage=$(mktemp -d "$iso_dir/.stage.XXXXXX")
  # xorriso greets on stderr even when quiet: its output is shown only when it fails.
  jq --arg name "$name" '.name = $name' "$runner_json" >"$stage/runner.json" &&
    out=$("${mkisofs[@]}" -quiet -J -R -V cfgdata -o "$iso_dir/$name.iso.part" "$stage" 2>&1) &&
    mv "$iso_dir/$name.iso.part" "$iso_dir/$name.iso" || ok=false
  rm -rf "$stage" "$iso_dir/$name.iso.part"
  $ok || die "writing the config ISO for $name failed; nothing more created${out:+: $out}"
}

reconcile() {
  local count max_age now kind id status name vmlock list live=0 gone=() old=() i
  local template_ok=false alive=() iso vmid
  need TEMPLATE
  [[ $TEMPLATE =~ ^[0-9]+$ ]] || die "TEMPLATE must be a VM id, not '$TEMPLATE'"
  count=$(whole COUNT 2)
  max_age=$(whole MAX_AGE 21600)
  runner_json=${RUNNER_JSON:-runner.json}
  [ -r "$runner_json" ] || die "cannot read $runner_json (set RUNNER_JSON)"
  jq -e 'type == "object"' "$runner_json" >/dev/null 2>&1 || die "$runner_json is not a JSON object (gitlab-runner-vm check --config $runner_json)"
  if [ -n "${SCRATCH:-}" ] && ! [[ $SCRATCH =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*:[0-9]+$ ]]; then
    die "SCRATCH must be STORAGE:GiB (e.g. local-lvm:50), not '$SCRATCH'"
  fi
  if command -v genisoimage >/dev/null; then
    mkisofs=(genisoimage)
  elif command -v xorriso >/dev/null; then
    mkisofs=(xorriso -as mkisofs)
  else
    die "genisoimage or xorriso is required to write the config ISOs"
  fi
  lock now
  umask 077
  install -d -m 0700 "$iso_dir" || die "cannot make $iso_dir (set ISO_DIR)"
  rm -rf "$iso_dir"/.stage.*
  list=$(vms) || die "listing the VMs of node $node failed; nothing created or destroyed"
  now=$(date -u +%s)
  while read -r kind id status name vmlock; do
    case $kind in
      template) [ "$id" != "$TEMPLATE" ] || template_ok=true ;;
      vm)
        if [ "$vmlock" != - ]; then
          # A task of Proxmox's (a clone, a backup) holds it: left alone, counted.
          warn "VM $id ($name) is locked ($vmlock): left alone; if no task runs on it, qm unlock $id"
          live=$((live + 1))
          alive+=("$name")
        elif [ "$status" = stopped ]; then
          gone+=("$id $name")
        elif [ $((now - $(born "$name"))) -gt "$max_age" ]; then
          old+=("$id $name")
        else
          live=$((live + 1))
          alive+=("$name")
        fi
        ;;
    esac
  done <<<"$list"

  if [ ${#gone[@]} -gt 0 ] || [ ${#old[@]} -gt 0 ]; then
    [ ${#gone[@]} -eq 0 ] || echo "destroying ${#gone[@]} stopped VM(s): ${gone[*]%% *}"
    if [ ${#old[@]} -gt 0 ]; then
      echo "destroying ${#old[@]} VM(s) older than $max_age s: ${old[*]%% *}"
      # shellcheck disable=SC2046 # the ids, one word each
      shut_down $(printf '%s\n' "${old[@]%% *}")
    fi
    # A failed destroy stops the run: no replacement for VMs that may still be up.
    destroy "${gone[@]}" "${old[@]}" || die "destroying VMs failed; nothing created"
  fi
  # ISOs of the fleet whose VM is gone (a run that stopped between the ISO and the clone).
  for iso in "$iso_dir/$tag"-*.iso; do
    [ -e "$iso" ] || continue
    name=$(basename "$iso" .iso)
    [[ " ${alive[*]} " == *" $name "* ]] || rm -f "$iso"
  done

  local missing=$((count - live))
  [ "$missing" -gt 0 ] || { echo "$live VM(s) up, $count wanted"; return 0; }
  $template_ok || die "VM $TEMPLATE is no template on node $node (qm template $TEMPLATE, or set TEMPLATE); nothing created"
  echo "$live VM(s) up, $count wanted: creating $missing"
  for ((i = 0; i < missing; i++)); do
    name="$tag-$(date -u +%Y%m%d%H%M%S)-$i"
    vmid=$(pve pvesh get /cluster/nextid) || die "no free VM id (pvesh get /cluster/nextid failed)"
    [[ $vmid =~ ^[0-9]+$ ]] || die "pvesh get /cluster/nextid answered '$vmid', not a VM id"
    write_iso "$name"
    local clone=(qm clone "$TEMPLATE" "$vmid" --name "$name")
    [ -z "${CLONE_STORAGE:-}" ] || clone+=(--full 1 --storage "$CLONE_STORAGE")
    pve "${clone[@]}" >/dev/null || { rm -f "$iso_dir/$name.iso"; die "cloning VM $vmid ($name) failed"; }
    local set=(qm set "$vmid" --ide2 "$iso_dir/$name.iso,media=cdrom" --tags "$tag")
    [ -z "${SCRATCH:-}" ] || set+=(--virtio1 "$SCRATCH,serial=scratch")
    pve "${set[@]}" >/dev/null || die "configuring VM $vmid ($name) failed; the next run destroys it"
    pve qm start "$vmid" >/dev/null || die "starting VM $vmid ($name) failed; the next run destroys it"
    echo "started VM $vmid ($name)"
  done
}

# Runs reconcile in a process of its own every INTERVAL seconds: a failed run is reported and
# the next one comes INTERVAL seconds later; set -e holds in each run.
watch() {
  local interval status
  interval=$(whole INTERVAL 60)
  while :; do
    status=0
    "$BASH" "${BASH_SOURCE[0]}" reconcile || status=$?
    [ "$status" -eq 0 ] || warn "reconcile failed (exit $status); trying again in $interval s"
    sleep "$interval"
  done
}

for tool in qm pvesh jq flock; do
  command -v "$tool" >/dev/null || die "$tool is required (run this on the Proxmox VE node, as root)"
done
# The tag is a Proxmox tag and starts each VM name (a DNS label of at most 63 characters).
[[ $tag =~ ^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$ ]] || die "TAG must be lower-case letters, digits and dashes (at most 32), not '$tag'"
node=${NODE:-$(hostname)}
cli_timeout=$(whole CLI_TIMEOUT 300)
shutdown_timeout=$(whole SHUTDOWN_TIMEOUT 120)
case ${1:-} in
  reconcile) reconcile ;;
  watch) watch ;;
  status)
    list=$(vms) || die "listing the VMs of node $node failed"
    awk '$1 == "vm" { printf "%-8s %-9s %-40s %s\n", $2, $3, $4, ($5 == "-" ? "" : "locked: " $5) }' <<<"$list"
    ;;
  delete)
    # Waits for a running reconcile, shuts every VM of the fleet down (each agent aborts its job
    # and deregisters), destroys them and their ISOs. Stop the service or cron job first.
    lock wait
    list=$(vms) || die "listing the VMs of node $node failed; nothing destroyed"
    mapfile -t up < <(awk '$1 == "vm" && $3 != "stopped" { print $2 }' <<<"$list")
    mapfile -t all < <(awk '$1 == "vm" { print $2 " " $4 }' <<<"$list")
    shut_down "${up[@]}"
    destroy "${all[@]}" || die "destroying VMs failed"
    rm -f "$iso_dir/$tag"-*.iso
    ;;
  *)
    sed -n 's|^#   examples/proxmox/\(runner-fleet.sh .*\)|\1|p' "$0" >&2
    exit 2
    ;;
esac
