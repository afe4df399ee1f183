#!/usr/bin/env bash
# A fleet of GitLab CI runner Droplets on DigitalOcean that replaces itself, kept by this script
# run every minute from a machine that stays up (cron, a systemd timer: docs/digital-ocean.md).
#
# DigitalOcean has nothing that destroys a Droplet which powered itself off: a powered-off
# Droplet keeps its disk, IP and CPU reserved and is billed as if it ran, and Droplet autoscale
# pools are documented to scale on CPU or memory use or to hold a fixed size, not to replace a
# member that is off. So each run of `reconcile`:
#   1. destroys the fleet's Droplets whose status is `off` (runners that finished their jobs);
#   2. creates Droplets until COUNT are `new` or `active`.
#
#   examples/digital-ocean/runner-fleet.sh reconcile   # once (cron: every minute)
#   examples/digital-ocean/runner-fleet.sh watch       # reconcile every INTERVAL seconds
#   examples/digital-ocean/runner-fleet.sh status      # the fleet's Droplets
#   examples/digital-ocean/runner-fleet.sh delete      # destroy all of the fleet's Droplets
#
# Settings (environment):
#   IMAGE        id of the custom image uploaded from `nix build .#runner-digital-ocean` (reconcile)
#   REGION       region of that image, e.g. ams3 (reconcile)
#   SIZE         Droplet size (default s-2vcpu-4gb)
#   COUNT        Droplets to keep (default 2; 0 lets the fleet drain: finished ones are not replaced)
#   RUNNER_JSON  runner.json given to every Droplet as user-data (default ./runner.json)
#   TAG          tag marking the fleet's Droplets, prefix of their names (default gitlab-runners)
#   SSH_KEYS     optional comma-separated SSH key ids or fingerprints (the CI user `runner` may
#                log in with them)
#   VPC_UUID     optional VPC
#   INTERVAL     seconds between runs of `watch` (default 60)
# doctl's own settings apply (DIGITALOCEAN_ACCESS_TOKEN, `doctl auth`). The token needs to read,
# create and delete Droplets and to read tags, images, sizes, regions and SSH keys.
set -euo pipefail

tag=${TAG:-gitlab-runners}

die() {
  echo "runner-fleet: $*" >&2
  exit 1
}

need() {
  [ -n "${!1:-}" ] || die "set $1 (see the comment at the top of $0)"
}

# "ID STATUS" for each of the fleet's Droplets.
droplets() {
  doctl compute droplet list --tag-name "$tag" --format ID,Status --no-header
}

reconcile() {
  local count=${COUNT:-2} runner_json=${RUNNER_JSON:-runner.json} id status live=0 off=() names=() i
  need IMAGE
  need REGION
  [ -r "$runner_json" ] || die "cannot read $runner_json (set RUNNER_JSON)"
  while read -r id status; do
    case $status in
      off) off+=("$id") ;;
      new | active) live=$((live + 1)) ;;
    esac
  done < <(droplets)

  if [ ${#off[@]} -gt 0 ]; then
    echo "destroying ${#off[@]} powered-off Droplet(s): ${off[*]}"
    doctl compute droplet delete --force "${off[@]}"
  fi

  local missing=$((count - live))
  [ "$missing" -gt 0 ] || { echo "$live Droplet(s) up, $count wanted"; return 0; }
  for ((i = 0; i < missing; i++)); do
    names+=("$tag-$(date -u +%Y%m%d%H%M%S)-$i")
  done
  local args=(
    --image "$IMAGE"
    --region "$REGION"
    --size "${SIZE:-s-2vcpu-4gb}"
    --tag-names "$tag"
    # runner.json; the agent reads the user-data as runner.json and writes it to
    # /run/runner-info/runner.json (mode 0600); nothing runs it.
    --user-data-file "$runner_json"
    --format "ID,Name" --no-header
  )
  [ -z "${SSH_KEYS:-}" ] || args+=(--ssh-keys "$SSH_KEYS")
  [ -z "${VPC_UUID:-}" ] || args+=(--vpc-uuid "$VPC_UUID")
  echo "$live Droplet(s) up, $count wanted: creating $missing"
  # At most ten names per request, the API's limit for creating several Droplets at once.
  for ((i = 0; i < ${#names[@]}; i += 10)); do
    doctl compute droplet create "${names[@]:i:10}" "${args[@]}"
  done
}

command -v doctl >/dev/null || die "the DigitalOcean CLI (doctl) is required"
case ${1:-} in
  reconcile) reconcile ;;
  watch)
    while :; do
      reconcile || echo "runner-fleet: reconcile failed; trying again in ${INTERVAL:-60} s" >&2
      sleep "${INTERVAL:-60}"
    done
    ;;
  status) doctl compute droplet list --tag-name "$tag" --format ID,Name,Status,Created ;;
  delete)
    # Each Droplet is shut down (the agent aborts its job and deregisters) and destroyed.
    doctl compute droplet delete --force --tag-name "$tag"
    ;;
  *)
    sed -n '12,15p' "$0" | sed 's/^# *//' >&2
    exit 2
    ;;
esac
