#!/usr/bin/env bash
# A fleet of GitLab CI runner Droplets on DigitalOcean that replaces itself, kept by this script
# from a machine that stays up (runner-fleet.service beside it runs `watch`; or cron runs
# `reconcile` every minute: docs/digital-ocean.md).
#
# DigitalOcean has nothing that destroys a Droplet which powered itself off: a powered-off
# Droplet keeps its disk, IP and CPU reserved and is billed as if it ran, and Droplet autoscale
# pools are documented to scale on CPU or memory use or to hold a fixed size, not to replace a
# member that is off. So each run of `reconcile`:
#   1. takes the fleet's lock (LOCK_FILE): a run that finds it held does nothing and exits 0,
#      so overlapping runs (doctl retries a 429 for minutes) never both create;
#   2. lists the fleet's Droplets and makes sure its cloud firewall exists; if either fails or
#      the list is not the JSON array doctl prints, it stops there: nothing is created or
#      destroyed on a failed, partial or malformed answer;
#   3. destroys the fleet's Droplets whose status is `off` (runners that finished their jobs),
#      and those created more than MAX_AGE seconds ago (the lifetime cap: a job that keeps its
#      VM up, or patched and rebooted it, loses it then). A destroy is no shutdown (the API
#      deletes the Droplet; DigitalOcean documents a graceful shutdown only for the `shutdown`
#      action), so a Droplet still up is first shut down (`droplet-action shutdown --wait`, the
#      power button: the agent aborts its job and deregisters), up to SHUTDOWN_TIMEOUT seconds;
#   4. creates Droplets until COUNT are `new` or `active`. A failed call stops the run there.
# The cloud firewall (named and applied by TAG) lets in SSH only from SSH_SOURCE (nothing when
# unset) and lets everything out. Every doctl call is given at most CLI_TIMEOUT seconds.
#
#   examples/digital-ocean/runner-fleet.sh reconcile   # once (cron: every minute)
#   examples/digital-ocean/runner-fleet.sh watch       # reconcile every INTERVAL seconds, for ever
#   examples/digital-ocean/runner-fleet.sh status      # the fleet's Droplets
#   examples/digital-ocean/runner-fleet.sh delete      # shut down and destroy all of the fleet
#
# Settings (environment; fleet.env beside this script lists them all):
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
#                agent's --hold-max (4 h) with margin); older Droplets are shut down and destroyed
#   SSH_SOURCE   optional comma-separated addresses or CIDRs allowed to reach port 22; empty: no
#                inbound traffic at all. Read when the firewall is created: to change it later,
#                `doctl compute firewall delete` it and reconcile.
#   INTERVAL     seconds between runs of `watch` (default 60)
#   SHUTDOWN_TIMEOUT  seconds a Droplet gets to shut down before it is destroyed anyway
#                (default 120: the agent's --stop-timeout (40 s) and --deregister-timeout (30 s)
#                with margin)
#   CLI_TIMEOUT  seconds one doctl call may take, its own retries included (default 300)
#   LOCK_FILE    the fleet's lock (default /run/lock/gitlab-runner-fleet-TAG.lock)
# doctl's own settings apply (DIGITALOCEAN_ACCESS_TOKEN, `doctl auth`). The token needs to read,
# create and delete Droplets and firewalls, to act on Droplets (shutdown) and to read tags,
# images, sizes, regions and SSH keys. jq reads doctl's JSON, flock(1) takes the lock.
set -euo pipefail

tag=${TAG:-gitlab-runners}

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

# doctl, given at most CLI_TIMEOUT seconds (a hung connection must not hold the lock for ever),
# without the lock's descriptor (a doctl left behind must not keep the lock).
do_ctl() {
  local status=0
  timeout --kill-after=10 "$cli_timeout" doctl "$@" 9>&- || status=$?
  [ "$status" -ne 124 ] || warn "doctl ${*:1:3} did not finish within $cli_timeout s (CLI_TIMEOUT)"
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

# "ID STATUS CREATED_AT" for each of the fleet's Droplets (created_at as the API gives it:
# 2026-12-06T06:00:00Z). Fails when doctl fails or prints anything but a JSON array of Droplets
# (`null` is doctl's empty list), so that a bad answer never looks like an empty fleet: nothing
# at all, or more than one JSON value, is no list either.
droplets() {
  local json
  json=$(do_ctl compute droplet list --tag-name "$tag" --output json) || return 1
  jq -r --slurp '
    if length != 1 then error("not one JSON value") else .[0] end
    | if . == null then empty
      elif type != "array" then error("not a list of Droplets")
      else .[] end
    | if (.id | type) == "number" and (.status | type) == "string" and (.created_at | type) == "string"
      then "\(.id) \(.status) \(.created_at)"
      else error("a Droplet without id, status or created_at") end' <<<"$json"
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
  list=$(do_ctl compute firewall list --format ID,Name --no-header) || return 1
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
  do_ctl compute firewall create "${args[@]}"
}

# Shuts the given Droplets down (ACPI, as the power button), all at once, each for at most
# SHUTDOWN_TIMEOUT seconds. A Droplet that does not go off in time, or whose shutdown action
# fails, is reported: it is destroyed all the same (the cap is a ceiling), and its runner
# manager may then stay registered in GitLab until GitLab forgets it.
shut_down() {
  [ $# -gt 0 ] || return 0
  local id pids=() i=0
  echo "shutting down $# Droplet(s) before destroying them: $*"
  for id in "$@"; do
    timeout --kill-after=10 "$shutdown_timeout" doctl compute droplet-action shutdown "$id" --wait >/dev/null 9>&- &
    pids+=($!)
  done
  for id in "$@"; do
    wait "${pids[i]}" || warn "Droplet $id did not shut down within $shutdown_timeout s (SHUTDOWN_TIMEOUT) or its shutdown failed; destroying it anyway"
    i=$((i + 1))
  done
}

reconcile() {
  local count runner_json=${RUNNER_JSON:-runner.json} max_age
  local id status created born list now live=0 off=() old=() names=() i
  need IMAGE
  need REGION
  count=$(whole COUNT 2)
  max_age=$(whole MAX_AGE 21600)
  [ -r "$runner_json" ] || die "cannot read $runner_json (set RUNNER_JSON)"
  command -v jq >/dev/null || die "jq is required"
  lock now
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
    shut_down "${old[@]}"
    # A failed destroy stops the run: no replacement for Droplets that may still be up.
    do_ctl compute droplet delete --force "${off[@]}" "${old[@]}" || die "destroying Droplets failed; nothing created"
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
    do_ctl compute droplet create "${names[@]:i:10}" "${args[@]}" || die "creating Droplets failed; the next run creates what is still missing"
  done
}

# Runs reconcile in a process of its own every INTERVAL seconds: a failed run (doctl failing,
# a 429, a timeout) is reported and the next one comes INTERVAL seconds later; set -e holds in
# each run, which a subshell on the left of || would switch off.
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

command -v doctl >/dev/null || die "the DigitalOcean CLI (doctl) is required"
command -v flock >/dev/null || die "flock (util-linux) is required"
cli_timeout=$(whole CLI_TIMEOUT 300)
shutdown_timeout=$(whole SHUTDOWN_TIMEOUT 120)
case ${1:-} in
  reconcile) reconcile ;;
  watch) watch ;;
  status) do_ctl compute droplet list --tag-name "$tag" --format ID,Name,Status,PublicIPv4,CreatedAt ;;
  delete)
    # Waits for a running reconcile, shuts every Droplet of the fleet down (each agent aborts
    # its job and deregisters), destroys them, then the fleet's firewall. Stop the service or
    # cron job first, or it creates new ones.
    lock wait
    list=$(droplets) || die "listing the fleet's Droplets failed; nothing destroyed"
    mapfile -t up < <(awk 'NF && $2 != "off" { print $1 }' <<<"$list")
    shut_down "${up[@]}"
    do_ctl compute droplet delete --force --tag-name "$tag"
    do_ctl compute firewall list --format ID,Name --no-header | while read -r id name; do
      [ "$name" != "$tag" ] || do_ctl compute firewall delete --force "$id"
    done
    ;;
  *)
    sed -n 's|^#   examples/digital-ocean/\(runner-fleet.sh .*\)|\1|p' "$0" >&2
    exit 2
    ;;
esac
