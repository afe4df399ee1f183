#!/usr/bin/env bash
# A fleet of GitLab CI runner Droplets on DigitalOcean that replaces itself, kept by this script
# run every minute from a machine that stays up (cron, a systemd timer: docs/digital-ocean.md).
#
# DigitalOcean has nothing that destroys a Droplet which powered itself off: a powered-off
# Droplet keeps its disk, IP and CPU reserved and is billed as if it ran, and Droplet autoscale
# pools are documented to scale on CPU or memory use or to hold a fixed size, not to replace a
# member that is off. So each run of `reconcile`:
#   1. lists the fleet's Droplets and makes sure its cloud firewall exists; if either fails,
#      it stops there: nothing is created or destroyed on a failed or partial answer;
#   2. destroys the fleet's Droplets whose status is `off` (runners that finished their jobs)
#      and those created more than MAX_AGE seconds ago (the lifetime cap: a job that keeps its
#      VM up, or patched and rebooted it, loses it then);
#   3. creates Droplets until COUNT are `new` or `active`.
# The cloud firewall (named and applied by TAG) lets in SSH only from SSH_SOURCE (nothing when
# unset) and lets everything out.
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
#   SSH_KEYS     optional comma-separated SSH key ids or fingerprints (the operator user
#                `operator` may log in with them)
#   VPC_UUID     optional VPC; give the fleet a VPC of its own: the firewall lets the runners
#                reach everything, other Droplets of their VPC included
#   MAX_AGE      lifetime cap in seconds (default 21600, 6 h: a job's timeout (1 h) and the
#                agent's --hold-max (4 h) with margin); older Droplets are destroyed
#   SSH_SOURCE   optional comma-separated addresses or CIDRs allowed to reach port 22; empty: no
#                inbound traffic at all. Read when the firewall is created: to change it later,
#                `doctl compute firewall delete` it and reconcile.
#   INTERVAL     seconds between runs of `watch` (default 60)
# doctl's own settings apply (DIGITALOCEAN_ACCESS_TOKEN, `doctl auth`). The token needs to read,
# create and delete Droplets and firewalls and to read tags, images, sizes, regions and SSH keys.
# jq reads doctl's JSON (the creation times).
set -euo pipefail

tag=${TAG:-gitlab-runners}

die() {
  echo "runner-fleet: $*" >&2
  exit 1
}

need() {
  [ -n "${!1:-}" ] || die "set $1 (see the comment at the top of $0)"
}

# "ID STATUS CREATED_AT" for each of the fleet's Droplets (created_at as the API gives it:
# 2026-12-06T06:00:00Z). Fails when doctl or its JSON fails.
droplets() {
  local json
  json=$(doctl compute droplet list --tag-name "$tag" --output json) || return 1
  jq -r '(. // [])[] | "\(.id) \(.status) \(.created_at)"' <<<"$json"
}

# Seconds since the epoch of an RFC 3339 UTC time (2026-12-06T06:00:00Z), in awk: no GNU date.
epoch() {
  awk -v ts="$1" 'BEGIN {
    if (ts !~ /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9](\.[0-9]+)?Z$/) exit 1
    split(ts, p, /[-T:Z.]/)
    y = p[1] - (p[2] <= 2); m = p[2] + 0; d = p[3] + 0
    era = int(y / 400); yoe = y - era * 400
    doy = int((153 * (m > 2 ? m - 3 : m + 9) + 2) / 5) + d - 1
    printf "%.0f\n", (era * 146097 + yoe * 365 + int(yoe / 4) - int(yoe / 100) + doy - 719468) * 86400 + p[4] * 3600 + p[5] * 60 + p[6]
  }'
}

# The id of the fleet's cloud firewall (named TAG), created if missing. Fails when doctl does.
firewall() {
  local list id name
  list=$(doctl compute firewall list --format ID,Name --no-header) || return 1
  while read -r id name; do
    [ "$name" = "$tag" ] && { echo "$id"; return 0; }
  done <<<"$list"
  local args=(
    --name "$tag"
    --tag-names "$tag"
    --outbound-rules "protocol:tcp,ports:all,address:0.0.0.0/0,address:::/0 protocol:udp,ports:all,address:0.0.0.0/0,address:::/0 protocol:icmp,address:0.0.0.0/0,address:::/0"
    --format ID --no-header
  )
  if [ -n "${SSH_SOURCE:-}" ]; then
    local source rule=protocol:tcp,ports:22
    IFS=, read -ra sources <<<"$SSH_SOURCE"
    for source in "${sources[@]}"; do rule+=",address:$source"; done
    args+=(--inbound-rules "$rule")
  fi
  echo "creating the cloud firewall $tag (inbound: ${SSH_SOURCE:+SSH from $SSH_SOURCE}${SSH_SOURCE:-nothing}; outbound: all)" >&2
  doctl compute firewall create "${args[@]}"
}

reconcile() {
  local count=${COUNT:-2} runner_json=${RUNNER_JSON:-runner.json} max_age=${MAX_AGE:-21600}
  local id status created born list now live=0 off=() old=() names=() i
  need IMAGE
  need REGION
  [ -r "$runner_json" ] || die "cannot read $runner_json (set RUNNER_JSON)"
  [[ $max_age =~ ^[0-9]+$ ]] || die "MAX_AGE must be a number of seconds"
  command -v jq >/dev/null || die "jq is required"
  # Listed into a variable, not read from a process substitution, so that a failed list stops
  # the run here instead of looking like an empty fleet.
  list=$(droplets) || die "listing the fleet's Droplets failed; nothing created or destroyed"
  firewall >/dev/null || die "the cloud firewall $tag could not be listed or created; nothing created or destroyed"
  now=$(date -u +%s)
  while read -r id status created; do
    [ -n "$id" ] || continue
    born=$(epoch "$created") || die "Droplet $id: unreadable created_at '$created'; nothing created or destroyed"
    case $status in
      off) off+=("$id") ;;
      new | active)
        if [ $((now - born)) -gt "$max_age" ]; then
          old+=("$id")
        else
          live=$((live + 1))
        fi
        ;;
    esac
  done <<<"$list"

  if [ ${#off[@]} -gt 0 ] || [ ${#old[@]} -gt 0 ]; then
    [ ${#off[@]} -eq 0 ] || echo "destroying ${#off[@]} powered-off Droplet(s): ${off[*]}"
    [ ${#old[@]} -eq 0 ] || echo "destroying ${#old[@]} Droplet(s) older than $max_age s: ${old[*]}"
    # A failed destroy stops the run: no replacement for Droplets that may still be up.
    doctl compute droplet delete --force "${off[@]}" "${old[@]}" || die "destroying Droplets failed; nothing created"
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
      # In a subshell: a failed run (die) ends that run, not the loop.
      (reconcile) || echo "runner-fleet: reconcile failed; trying again in ${INTERVAL:-60} s" >&2
      sleep "${INTERVAL:-60}"
    done
    ;;
  status) doctl compute droplet list --tag-name "$tag" --format ID,Name,Status,PublicIPv4 ;;
  delete)
    # Each Droplet is shut down (the agent aborts its job and deregisters) and destroyed; then
    # the fleet's firewall.
    doctl compute droplet delete --force --tag-name "$tag"
    doctl compute firewall list --format ID,Name --no-header | while read -r id name; do
      [ "$name" != "$tag" ] || doctl compute firewall delete --force "$id"
    done
    ;;
  *)
    sed -n '18,21p' "$0" | sed 's/^# *//' >&2
    exit 2
    ;;
esac
