#!/usr/bin/env bash
# A fleet of GitLab CI runner VMs on Google Compute Engine that replaces itself: an instance
# template (the runner image, runner.json as `user-data` metadata) and a managed instance group
# (MIG) that keeps SIZE VMs. Each VM runs its jobs, deregisters and powers itself off; the MIG
# repairs a VM that stopped without the MIG asking by recreating it from its template, with a
# fresh boot disk. See docs/gce.md for the image upload and what each step costs.
#
# Network: `create` gives the fleet a VPC network of its own (named FLEET, one subnet in ZONE's
# region), never the project's `default` network with its default-allow-internal rule. Its
# firewall rules: ingress only SSH (TCP 22) from SSH_SOURCE_RANGES, and nothing at all when that
# is unset (the VPC's implied deny); egress denied to private ranges (RFC 1918, 100.64.0.0/10),
# except GITLAB_RANGES on TCP 443 when set; the rest of the internet allowed. The metadata
# server (169.254.169.254, also the VM's DNS) is not filtered by VPC firewall rules.
# Lifetime cap: each VM is deleted MAX_RUN_DURATION after it started (default 6h: a job's
# timeout, 1 h, and the agent's --hold-max, 4 h, with margin), and the MIG recreates it.
#
#   examples/gce/runner-fleet.sh image NAME FILE BUCKET
#                                            # upload FILE (result/*.raw.tar.gz) through
#                                            # gs://BUCKET and register it as image NAME
#   examples/gce/runner-fleet.sh create      # template + MIG of SIZE VMs
#   examples/gce/runner-fleet.sh update      # new template (new IMAGE or runner.json); each VM
#                                            # takes it when it is next recreated, no job is cut
#   examples/gce/runner-fleet.sh resize N    # N VMs (0 stops the fleet, keeps the MIG)
#   examples/gce/runner-fleet.sh status      # the MIG's VMs and their state
#   examples/gce/runner-fleet.sh delete      # the MIG, its VMs and the fleet's templates
#
# Settings (environment):
#   ZONE          the MIG's zone, e.g. europe-west1-b (required)
#   IMAGE         the runner image, registered with `image` from .#runner-gce (create, update)
#   IMAGE_PROJECT project holding IMAGE (default: the current project)
#   RUNNER_JSON   runner.json to give every VM (default ./runner.json)
#   METADATA_KEY  the metadata key RUNNER_JSON's content is given under (default user-data, which
#                 the runner image reads); circleci-runner-token, with RUNNER_JSON naming a file
#                 that holds the token, for CircleCI's machine runner (docs/circleci.md)
#   FLEET         name of the MIG, prefix of its VMs and templates (default gitlab-runners)
#   SIZE          VMs to keep (default 2)
#   MACHINE_TYPE  default e2-standard-4; an aarch64 image needs an Arm type, e.g. t2a-standard-4
#                 or c4a-standard-4
#   DISK_SIZE     boot disk per VM, at least the image's size (default 50GB)
#   DISK_TYPE     default pd-balanced (c4a needs hyperdisk-balanced)
#   NETWORK, SUBNET  an existing network and subnetwork to use instead of the fleet's own (then
#                 its firewall rules are yours: the script creates none)
#   SUBNET_RANGE  the fleet subnet's range (default 10.128.0.0/20)
#   SSH_SOURCE_RANGES  optional comma-separated CIDRs allowed to reach port 22 (e.g. your
#                 bastion's, or 35.235.240.0/20 for IAP TCP forwarding); unset: no inbound traffic
#   GITLAB_RANGES optional comma-separated CIDRs of a GitLab on a private address (TCP 443)
#   MAX_RUN_DURATION  lifetime cap per VM, gcloud's duration format (default 6h)
#   NO_ADDRESS    1: no external IP (the subnet then needs Cloud NAT to reach GitLab)
#   SSH_PUBLIC_KEY  optional public key file: the operator user `operator` may log in with it
#                 (the image takes `ssh-keys` metadata entries `operator:KEY` at boot)
#   ARCH          (image) X86_64 or ARM64; by default read from FILE's name (*-x86_64-linux.*,
#                 *-aarch64-linux.*, as `nix build` names it)
#   IMAGE_FAMILY  (image) the image's family (default gitlab-runner-vm, or gitlab-runner-vm-arm64)
# gcloud's own settings (project, account) apply: CLOUDSDK_CORE_PROJECT, `gcloud config`.
set -euo pipefail

fleet=${FLEET:-gitlab-runners}

die() {
  echo "runner-fleet: $*" >&2
  exit 1
}

need() {
  [ -n "${!1:-}" ] || die "set $1 (see the comment at the top of $0)"
}

# Stops before anything is created when a template's settings are missing.
check_template_settings() {
  need IMAGE
  [ -r "${RUNNER_JSON:-runner.json}" ] || die "cannot read ${RUNNER_JSON:-runner.json} (set RUNNER_JSON)"
  # Compute Engine's metadata keys; a comma or `=` would also break --metadata-from-file's list.
  [[ ${METADATA_KEY:-user-data} =~ ^[A-Za-z0-9_-]{1,128}$ ]] ||
    die "METADATA_KEY '${METADATA_KEY}' is not a metadata key (letters, digits, - and _, at most 128)"
  [ -z "${SSH_PUBLIC_KEY:-}" ] || [ -r "$SSH_PUBLIC_KEY" ] || die "cannot read $SSH_PUBLIC_KEY (SSH_PUBLIC_KEY)"
}

# Creates a new instance template and prints its name.
create_template() {
  check_template_settings
  local runner_json=${RUNNER_JSON:-runner.json} name metadata keys=
  # runner.json; the agent reads the user-data as runner.json and writes it to
  # /run/runner-info/runner.json (mode 0600); nothing runs it.
  metadata=${METADATA_KEY:-user-data}=$runner_json
  if [ -n "${SSH_PUBLIC_KEY:-}" ]; then
    [ -r "$SSH_PUBLIC_KEY" ] || die "cannot read $SSH_PUBLIC_KEY (SSH_PUBLIC_KEY)"
    keys=$(mktemp)
    printf 'operator:%s\n' "$(head -n 1 "$SSH_PUBLIC_KEY")" >"$keys"
    metadata+=,ssh-keys=$keys
  fi
  # Template names are unique and kept while VMs use them: time of creation and a random part.
  name=$fleet-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x' "$RANDOM")
  local args=(
    --machine-type "${MACHINE_TYPE:-e2-standard-4}"
    --image "$IMAGE"
    --boot-disk-size "${DISK_SIZE:-50GB}"
    --boot-disk-type "${DISK_TYPE:-pd-balanced}"
    --metadata-from-file "$metadata"
    # No service account: jobs get no Google Cloud credentials from the metadata server.
    --no-service-account
    --no-scopes
    --tags "$fleet"
    --labels "gitlab-runner-vm-fleet=$fleet"
  )
  [ -z "${IMAGE_PROJECT:-}" ] || args+=(--image-project "$IMAGE_PROJECT")
  # The cap: deleted (not stopped) at the deadline; the MIG then recreates the VM.
  args+=(--max-run-duration "${MAX_RUN_DURATION:-6h}" --instance-termination-action DELETE)
  if [ -n "${NETWORK:-}" ]; then
    args+=(--network "$NETWORK")
    [ -z "${SUBNET:-}" ] || args+=(--subnet "$SUBNET")
  else
    need ZONE
    args+=(--network "$fleet" --subnet "$fleet" --region "$(region)")
  fi
  [ "${NO_ADDRESS:-0}" != 1 ] || args+=(--no-address)
  local status=0
  gcloud compute instance-templates create "$name" "${args[@]}" >&2 || status=$?
  [ -z "$keys" ] || rm -f "$keys"
  [ "$status" -eq 0 ] || exit "$status"
  echo "$name"
}

region() {
  echo "${ZONE%-*}"
}

# Uploads an image file of `nix build .#runner-gce` (or .#circleci-gce) and registers it as the
# Compute Engine image NAME, with the guest OS features its architecture needs: GVNIC always
# (gVNIC is the only network interface of C4A, T2A and the third-generation x86 series, which
# refuse an image without it), UEFI_COMPATIBLE on Arm (the aarch64 image boots UEFI only).
# The upload is deleted afterwards: the image keeps its own copy.
create_image() {
  [ $# -eq 3 ] || die "usage: $0 image NAME FILE BUCKET"
  local name=$1 file=$2 bucket=${3#gs://} arch features family
  [ -r "$file" ] || die "cannot read $file (the result/*.raw.tar.gz of nix build .#runner-gce)"
  case ${ARCH:-$(basename "$file")} in
    ARM64 | *-aarch64-linux.*) arch=ARM64 features=GVNIC,UEFI_COMPATIBLE family=gitlab-runner-vm-arm64 ;;
    X86_64 | *-x86_64-linux.*) arch=X86_64 features=GVNIC family=gitlab-runner-vm ;;
    *) die "cannot tell the architecture of $file from its name: set ARCH=X86_64 or ARCH=ARM64" ;;
  esac
  local object=gs://$bucket/$name.raw.tar.gz status=0
  gcloud storage cp "$file" "$object"
  gcloud compute images create "$name" --source-uri "$object" --family "${IMAGE_FAMILY:-$family}" \
    --architecture "$arch" --guest-os-features "$features" || status=$?
  gcloud storage rm "$object" || [ "$status" -ne 0 ]
  return "$status"
}

# The fleet's own network, subnet and firewall rules, created when missing (not with NETWORK).
ensure_network() {
  [ -z "${NETWORK:-}" ] || return 0
  need ZONE
  if ! gcloud compute networks describe "$fleet" --format='value(name)' >/dev/null 2>&1; then
    gcloud compute networks create "$fleet" --subnet-mode custom
    gcloud compute networks subnets create "$fleet" --network "$fleet" --region "$(region)" \
      --range "${SUBNET_RANGE:-10.128.0.0/20}"
    gcloud compute firewall-rules create "$fleet-deny-private" --network "$fleet" \
      --direction EGRESS --action DENY --rules all --priority 1000 \
      --destination-ranges 10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10
    if [ -n "${GITLAB_RANGES:-}" ]; then
      gcloud compute firewall-rules create "$fleet-allow-gitlab" --network "$fleet" \
        --direction EGRESS --action ALLOW --rules tcp:443 --priority 900 \
        --destination-ranges "$GITLAB_RANGES"
    fi
    if [ -n "${SSH_SOURCE_RANGES:-}" ]; then
      gcloud compute firewall-rules create "$fleet-allow-ssh" --network "$fleet" \
        --direction INGRESS --action ALLOW --rules tcp:22 --source-ranges "$SSH_SOURCE_RANGES" \
        --target-tags "$fleet"
    fi
  fi
}

mig() {
  need ZONE
  gcloud compute instance-groups managed "$@" --zone "$ZONE"
}

command -v gcloud >/dev/null || die "the Google Cloud CLI (gcloud) is required"
case ${1:-} in
  image)
    shift
    create_image "$@"
    ;;
  create)
    need ZONE
    check_template_settings
    ensure_network
    template=$(create_template)
    # repair (the default, spelled out): a VM that stops or is deleted without the MIG asking is
    # recreated. force-update-on-repair: the recreated VM takes the MIG's current template, so
    # `update` rolls out as VMs finish their jobs.
    mig create "$fleet" \
      --template "$template" \
      --size "${SIZE:-2}" \
      --base-instance-name "$fleet" \
      --default-action-on-vm-failure repair \
      --force-update-on-repair
    ;;
  update)
    template=$(create_template)
    mig set-instance-template "$fleet" --template "$template"
    echo "VMs take $template as they are recreated; delete older templates once none uses them:"
    echo "  gcloud compute instance-templates list --filter='name ~ ^$fleet-'"
    ;;
  resize)
    [ $# -eq 2 ] || die "usage: $0 resize N"
    mig resize "$fleet" --size "$2"
    ;;
  status)
    mig list-instances "$fleet"
    ;;
  delete)
    # Deleting the MIG deletes its VMs: each is shut down (the agent aborts its job and
    # deregisters) and its boot disk is deleted.
    mig delete "$fleet" --quiet
    gcloud compute instance-templates list --filter="name ~ ^$fleet-" --format='value(name)' |
      while read -r template; do
        gcloud compute instance-templates delete "$template" --quiet
      done
    if [ -z "${NETWORK:-}" ]; then
      gcloud compute firewall-rules list --filter="network ~ /$fleet\$" --format='value(name)' |
        while read -r rule; do
          gcloud compute firewall-rules delete "$rule" --quiet
        done
      gcloud compute networks subnets delete "$fleet" --region "$(region)" --quiet
      gcloud compute networks delete "$fleet" --quiet
    fi
    ;;
  *)
    sed -n '17,25p' "$0" | sed 's/^# *//' >&2
    exit 2
    ;;
esac
