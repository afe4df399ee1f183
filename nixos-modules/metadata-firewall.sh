#!/usr/bin/env bash
# metadata-firewall: keeps everything but the units that need it from the cloud metadata
# service (169.254.169.254 and its IPv6 twins), matched by cgroup v2, not by uid: a root job
# or a `docker run --network host` container is refused like any other process.
#
# The one place where these rules are written; the NixOS module (metadata-firewall.nix) runs
# it with the addresses and backend baked in, and the VM test runs it on Debian as it is.
#
# Usage: metadata-firewall [--backend iptables|nftables] [--address ADDR]... COMMAND
#   setup                 install the static rules (idempotent; keeps the allow rules of
#                         running units): DNS (53 udp/tcp) and NTP (123 udp) to the metadata
#                         addresses stay open, the rest goes through the allow chain and is
#                         rejected unless a rule there accepted it; packets to them that come
#                         from containers (any bridge: PREROUTING) are dropped. A stand-in
#                         that holds the address locally (a test) works: its replies (the
#                         reply direction of a connection) and packets on lo pass.
#   teardown [--all]      remove the static rules; --all also the allow rules.
#   allow-self [SUBDIR]   allow the caller's own cgroup (read from /proc/self/cgroup), or its
#                         sub-cgroup SUBDIR (made when missing). For systemd units:
#                         ExecStartPre=+metadata-firewall allow-self
#   revoke-self [SUBDIR]  remove that allow rule (idempotent): ExecStopPost=+... revoke-self
#   mkdir-self SUBDIR...  make sub-cgroups of the caller's own cgroup (no rule).
#   allow PATH | revoke PATH   the same for a cgroup path relative to the cgroup2 root,
#                         e.g. system.slice/gitlab-runner-vm.service/agent.
#   list                  print the allow rules.
#
# A cgroup is resolved when its rule is inserted (iptables' xt_cgroup takes a reference to
# it, nft stores its 64-bit id): the cgroup must exist then, and a rule never matches a
# cgroup created later at the same path (after a restart the unit allows itself again).
# Sockets carry the cgroup of the process that created them, and a rule matches that cgroup
# and its descendants. The control processes of a unit with Delegate=yes run in its
# `.control` sub-cgroup: allow-self counts them as the unit's own.
#
# Environment (the options win): METADATA_FIREWALL_BACKEND (iptables), _ADDRESSES
# ("169.254.169.254 fd00:ec2::254"), _OPEN_UDP ("53 123"), _OPEN_TCP ("53"), _PROC (/proc)
# and _CGROUP (/sys/fs/cgroup) for tests, _PREFIX (runner-metadata: iptables chains
# <prefix>-fwd, -out, -allow) and _TABLE (gitlab-runner-vm-metadata: the nft table, inet).
set -euo pipefail

backend=${METADATA_FIREWALL_BACKEND:-iptables}
addresses=${METADATA_FIREWALL_ADDRESSES:-169.254.169.254 fd00:ec2::254}
open_udp=${METADATA_FIREWALL_OPEN_UDP:-53 123}
open_tcp=${METADATA_FIREWALL_OPEN_TCP:-53}
proc_root=${METADATA_FIREWALL_PROC:-/proc}
cgroup_root=${METADATA_FIREWALL_CGROUP:-/sys/fs/cgroup}
prefix=${METADATA_FIREWALL_PREFIX:-runner-metadata}
table=${METADATA_FIREWALL_TABLE:-gitlab-runner-vm-metadata}
# Rules added for a cgroup carry this comment with its path: how revoke finds them.
tag=gitlab-runner-vm-allow

die() {
  echo "metadata-firewall: $*" >&2
  exit 1
}
usage() {
  sed -n '/^# Usage:/,/^#   list/s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

cli_addresses=
while [ $# -gt 0 ]; do
  case $1 in
    --backend) [ $# -ge 2 ] || usage; backend=$2; shift 2 ;;
    --backend=*) backend=${1#*=}; shift ;;
    --address) [ $# -ge 2 ] || usage; cli_addresses="$cli_addresses $2"; shift 2 ;;
    --address=*) cli_addresses="$cli_addresses ${1#*=}"; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) usage ;;
    *) break ;;
  esac
done
[ -z "$cli_addresses" ] || addresses=$cli_addresses
case $backend in
  iptables | nftables) ;;
  *) die "unknown backend '$backend' (iptables or nftables)" ;;
esac

v4=()
v6=()
for address in $addresses; do
  case $address in
    *[!0-9a-fA-F.:]* | '') die "not an IP address: '$address'" ;;
    *:*) v6+=("$address") ;;
    *) v4+=("$address") ;;
  esac
done
[ $((${#v4[@]} + ${#v6[@]})) -gt 0 ] || die "no metadata addresses"
for port in $open_udp $open_tcp; do
  case $port in *[!0-9]* | '') die "not a port: '$port'" ;; esac
done

# The iptables tools that have addresses to guard.
tools=()
[ ${#v4[@]} -eq 0 ] || tools+=(iptables)
[ ${#v6[@]} -eq 0 ] || tools+=(ip6tables)
addresses_of() { # addresses_of TOOL
  if [ "$1" = iptables ]; then printf '%s\n' "${v4[@]}"; else printf '%s\n' "${v6[@]}"; fi
}
fwd=$prefix-fwd
out=$prefix-out
allow=$prefix-allow

# ---- cgroups -----------------------------------------------------------------------------

# The caller's cgroup v2 path, relative to the root ("system.slice/foo.service"), without
# the `.control` sub-cgroup where systemd runs the control processes of a delegated unit.
own_cgroup() {
  local line path=
  [ -r "$proc_root/self/cgroup" ] || die "cannot read $proc_root/self/cgroup"
  while IFS= read -r line; do
    case $line in 0::*) path=${line#0::} ;; esac
  done <"$proc_root/self/cgroup"
  [ -n "$path" ] || die "no cgroup v2 entry (0::) in $proc_root/self/cgroup: is the unified hierarchy mounted?"
  path=${path%/.control}
  path=${path#/}
  printf '%s\n' "$path"
}

# Refuses what would widen a rule (the root, "..", an empty component) or could not be
# quoted safely in an nft rule.
check_path() {
  local path=$1
  [ -n "$path" ] || die "refusing the root cgroup: it holds every process"
  case $path in
    /* | */ | *//*) die "not a relative cgroup path: '$path'" ;;
    *[!A-Za-z0-9_.@:+/-]*) die "unexpected character in cgroup path '$path'" ;;
  esac
  case /$path/ in
    */../* | */./*) die "'.' or '..' in cgroup path '$path'" ;;
  esac
  [ ${#path} -le 100 ] || die "cgroup path too long for a rule comment: '$path'"
}

with_subdir() { # with_subdir PATH [SUBDIR]
  local path=$1 subdir=${2-}
  if [ -n "$subdir" ]; then
    case $subdir in */* | . | ..) die "SUBDIR is one name: '$subdir'" ;; esac
    path=$path/$subdir
  fi
  check_path "$path"
  printf '%s\n' "$path"
}

make_cgroup() { # make_cgroup PATH: the rule needs it to exist
  mkdir -p "$cgroup_root/$1" || die "cannot create the cgroup $cgroup_root/$1"
}

# ---- iptables ----------------------------------------------------------------------------

ipt() { # ipt TOOL ARGS...: -w waits for the xtables lock (iptables-legacy; iptables-nft ignores it)
  local tool=$1
  shift
  "$tool" -w "$@"
}

ipt_setup() {
  local t address
  for t in "${tools[@]}"; do
    # Bridged traffic (containers): dropped early, before conntrack. Packets on lo were
    # sent by this machine, so they passed OUTPUT (a local stand-in of the service).
    ipt "$t" -t raw -N "$fwd" 2>/dev/null || ipt "$t" -t raw -F "$fwd"
    ipt "$t" -t raw -A "$fwd" -i lo -j RETURN
    # Local traffic: the allow chain is created once and never flushed here, so that a
    # firewall reload keeps the rules of units that are running.
    ipt "$t" -N "$out" 2>/dev/null || ipt "$t" -F "$out"
    ipt "$t" -N "$allow" 2>/dev/null || true
    while read -r address; do
      # Replies (conntrack's reply direction) of a stand-in that holds the address locally, a
      # test: requests to the service are the original direction, whoever sends them.
      ipt "$t" -A "$out" -d "$address" -m conntrack --ctdir REPLY -j RETURN
      ipt "$t" -t raw -A "$fwd" -d "$address" -p udp -m multiport --dports "${open_udp// /,}" -j RETURN
      ipt "$t" -t raw -A "$fwd" -d "$address" -p tcp -m multiport --dports "${open_tcp// /,}" -j RETURN
      ipt "$t" -t raw -A "$fwd" -d "$address" -j DROP
      ipt "$t" -A "$out" -d "$address" -p udp -m multiport --dports "${open_udp// /,}" -j RETURN
      ipt "$t" -A "$out" -d "$address" -p tcp -m multiport --dports "${open_tcp// /,}" -j RETURN
      ipt "$t" -A "$out" -d "$address" -j "$allow"
      ipt "$t" -A "$out" -d "$address" -j REJECT
    done < <(addresses_of "$t")
    # First in PREROUTING and OUTPUT, once.
    ipt "$t" -t raw -C PREROUTING -j "$fwd" 2>/dev/null || ipt "$t" -t raw -I PREROUTING -j "$fwd"
    ipt "$t" -C OUTPUT -j "$out" 2>/dev/null || ipt "$t" -I OUTPUT -j "$out"
  done
}

ipt_teardown() { # ipt_teardown [--all]
  local t
  for t in "${tools[@]}"; do
    while ipt "$t" -t raw -D PREROUTING -j "$fwd" 2>/dev/null; do :; done
    ipt "$t" -t raw -F "$fwd" 2>/dev/null || true
    ipt "$t" -t raw -X "$fwd" 2>/dev/null || true
    while ipt "$t" -D OUTPUT -j "$out" 2>/dev/null; do :; done
    ipt "$t" -F "$out" 2>/dev/null || true
    ipt "$t" -X "$out" 2>/dev/null || true
    if [ "${1-}" = --all ]; then
      ipt "$t" -F "$allow" 2>/dev/null || true
      ipt "$t" -X "$allow" 2>/dev/null || true
    fi
  done
}

ipt_rule() { # ipt_rule PATH: the allow rule of a cgroup, as iptables arguments
  printf '%s\n' -m cgroup --path "$1" -m comment --comment "$tag $1" -j ACCEPT
}

ipt_revoke() {
  local t rule
  mapfile -t rule < <(ipt_rule "$1")
  for t in "${tools[@]}"; do
    # Deleting compares the rule's text, so it works after the cgroup is gone.
    while ipt "$t" -D "$allow" "${rule[@]}" 2>/dev/null; do :; done
  done
}

ipt_allow() {
  local t rule
  mapfile -t rule < <(ipt_rule "$1")
  ipt_revoke "$1"
  for t in "${tools[@]}"; do
    ipt "$t" -N "$allow" 2>/dev/null || true
    ipt "$t" -A "$allow" "${rule[@]}" || die "$t could not add the rule for $1 (is xt_cgroup available?)"
  done
}

ipt_list() {
  local t
  for t in "${tools[@]}"; do ipt "$t" -S "$allow" 2>/dev/null || true; done
}

# ---- nftables ----------------------------------------------------------------------------

set_of() { # set_of WORDS...: an nft anonymous set, "{ a, b }"
  local IFS=,
  printf '{ %s }' "$*"
}

nft_setup() {
  local address family rules udp tcp
  # shellcheck disable=SC2086 # word splitting of the port lists is meant
  udp=$(set_of $open_udp)
  # shellcheck disable=SC2086
  tcp=$(set_of $open_tcp)
  rules="add rule inet $table prerouting iifname lo return
"
  for address in "${v4[@]}" "${v6[@]}"; do
    case $address in *:*) family=ip6 ;; *) family=ip ;; esac
    rules+="add rule inet $table prerouting $family daddr $address udp dport $udp return
add rule inet $table prerouting $family daddr $address tcp dport $tcp return
add rule inet $table prerouting $family daddr $address drop
add rule inet $table output $family daddr $address ct direction reply return
add rule inet $table output $family daddr $address udp dport $udp return
add rule inet $table output $family daddr $address tcp dport $tcp return
add rule inet $table output $family daddr $address jump allow
add rule inet $table output $family daddr $address reject
"
  done
  # One transaction: the table and its allow chain are made when missing (never flushed:
  # the rules of running units stay), the base chains rebuilt.
  nft -f - <<EOF
add table inet $table
add chain inet $table allow
add chain inet $table prerouting { type filter hook prerouting priority raw; policy accept; }
add chain inet $table output { type filter hook output priority filter; policy accept; }
flush chain inet $table prerouting
flush chain inet $table output
$rules
EOF
}

nft_teardown() { # nft_teardown [--all]
  if [ "${1-}" = --all ]; then
    nft delete table inet "$table" 2>/dev/null || true
  else
    local chain
    for chain in prerouting output; do
      { nft flush chain inet "$table" "$chain" && nft delete chain inet "$table" "$chain"; } 2>/dev/null || true
    done
  fi
}

nft_handles() { # nft_handles PATH: handles of the allow rules of that cgroup
  local line
  nft -a list chain inet "$table" allow 2>/dev/null | while IFS= read -r line; do
    case $line in
      *"comment \"$tag $1\""*"# handle "*) printf '%s\n' "${line##*# handle }" ;;
    esac
  done
}

nft_revoke() {
  local handle
  for handle in $(nft_handles "$1"); do
    case $handle in *[!0-9]* | '') continue ;; esac
    nft delete rule inet "$table" allow handle "$handle" 2>/dev/null || true
  done
}

nft_allow() {
  local level
  # The level is the path's depth: system.slice/foo.service is 2.
  level=$(($(tr -cd / <<<"$1" | wc -c) + 1))
  nft_revoke "$1"
  nft add chain inet "$table" allow 2>/dev/null || true
  nft add rule inet "$table" allow socket cgroupv2 level "$level" "\"$1\"" accept comment "\"$tag $1\"" ||
    die "nft could not add the rule for $1 (is nft_socket with cgroup v2 available?)"
}

nft_list() {
  nft -a list chain inet "$table" allow 2>/dev/null || true
}

# ---- commands ----------------------------------------------------------------------------

[ $# -ge 1 ] || usage
command=$1
shift
case $backend in
  iptables) impl=ipt ;;
  nftables) impl=nft ;;
esac
case $command in
  setup)
    [ $# -eq 0 ] || usage
    "${impl}_setup"
    ;;
  teardown)
    [ $# -eq 0 ] || { [ $# -eq 1 ] && [ "$1" = --all ]; } || usage
    "${impl}_teardown" "$@"
    ;;
  allow-self | revoke-self)
    [ $# -le 1 ] || usage
    path=$(own_cgroup)
    path=$(with_subdir "$path" "${1-}")
    if [ "$command" = allow-self ]; then
      make_cgroup "$path"
      "${impl}_allow" "$path"
    else
      "${impl}_revoke" "$path"
    fi
    ;;
  mkdir-self)
    [ $# -ge 1 ] || usage
    own=$(own_cgroup)
    for subdir in "$@"; do make_cgroup "$(with_subdir "$own" "$subdir")"; done
    ;;
  allow | revoke)
    [ $# -eq 1 ] || usage
    path=${1#/}
    check_path "$path"
    if [ "$command" = allow ]; then
      [ -d "$cgroup_root/$path" ] || die "no cgroup $cgroup_root/$path"
      "${impl}_allow" "$path"
    else
      "${impl}_revoke" "$path"
    fi
    ;;
  list)
    [ $# -eq 0 ] || usage
    "${impl}_list"
    ;;
  *) usage ;;
esac
