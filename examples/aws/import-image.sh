#!/usr/bin/env bash
# Turns an AMI disk built by this flake into an AMI, for x86_64 and aarch64 (Graviton) alike:
# upload to S3, import as an EBS snapshot (VM Import/Export), register the snapshot as an AMI.
#
#   nix build .#runner-amazon                       # or .#amazon, .#circleci-amazon; for
#                                                   # Graviton: .#packages.aarch64-linux.runner-amazon
#   examples/aws/import-image.sh role BUCKET        # once per account: the vmimport service role
#   examples/aws/import-image.sh import BUCKET [RESULT [AMI_NAME]]
#
# The architecture (x86_64 or arm64) and boot mode (legacy-bios or uefi) come from
# RESULT/nix-support/image-info.json, which the image build writes as nixpkgs' own amazon image
# does. Needs the AWS CLI (credentials and region configured, e.g. AWS_PROFILE and AWS_REGION)
# and jq. Prints the AMI id on its last line. The upload is deleted from S3 afterwards; the
# snapshot stays, since the AMI needs it (see docs/aws.md, "Remove everything").
set -euo pipefail

usage() {
  echo "usage: $0 role BUCKET | import BUCKET [RESULT [AMI_NAME]]" >&2
  exit 2
}

role_name=${VMIMPORT_ROLE:-vmimport}

# The service role VM Import/Export assumes to read the upload and create the snapshot.
create_role() {
  local bucket=$1 trust policy
  trust=$(jq -n '{
    Version: "2012-10-17",
    Statement: [{
      Effect: "Allow",
      Principal: { Service: "vmie.amazonaws.com" },
      Action: "sts:AssumeRole",
      Condition: { StringEquals: { "sts:Externalid": "vmimport" } }
    }]
  }')
  policy=$(jq -n --arg bucket "$bucket" '{
    Version: "2012-10-17",
    Statement: [
      {
        Effect: "Allow",
        Action: ["s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket"],
        Resource: ["arn:aws:s3:::\($bucket)", "arn:aws:s3:::\($bucket)/*"]
      },
      {
        Effect: "Allow",
        Action: ["ec2:ModifySnapshotAttribute", "ec2:CopySnapshot", "ec2:RegisterImage", "ec2:Describe*"],
        Resource: "*"
      }
    ]
  }')
  if aws iam get-role --role-name "$role_name" >/dev/null 2>&1; then
    echo "role $role_name exists; updating its trust policy"
    aws iam update-assume-role-policy --role-name "$role_name" --policy-document "$trust"
  else
    aws iam create-role --role-name "$role_name" --assume-role-policy-document "$trust" >/dev/null
    echo "created role $role_name"
  fi
  # One inline policy per bucket, so several buckets can be allowed side by side.
  aws iam put-role-policy --role-name "$role_name" --policy-name "vmimport-$bucket" --policy-document "$policy"
  echo "role $role_name may read s3://$bucket"
}

import_image() {
  local bucket=$1 result=${2:-result} name=${3:-} info file system arch boot_mode label format key task status snapshot ami
  info=$result/nix-support/image-info.json
  [ -r "$info" ] || { echo "import-image: $info is missing; pass the result of an amazon image build" >&2; exit 1; }
  file=$(jq -er '.disks.root.file' "$info")
  system=$(jq -er '.system' "$info")
  boot_mode=$(jq -er '.boot_mode' "$info")
  label=$(jq -er '.label' "$info")
  case $system in
    x86_64-linux) arch=x86_64 ;;
    aarch64-linux) arch=arm64 ;;
    *) echo "import-image: unsupported system $system" >&2; exit 1 ;;
  esac
  case $file in
    *.vhd) format=VHD ;;
    *.img | *.raw) format=RAW ;;
    *) echo "import-image: $file is neither VHD nor raw (amazonImage.format = \"qcow2\" cannot be imported)" >&2; exit 1 ;;
  esac
  # AMI names are unique per account and region: the file name holds the image, label and system.
  [ -n "$name" ] || name=$(basename "$file" | sed 's/\.[^.]*$//')
  key=gitlab-runner-vm/$(basename "$file")

  echo "uploading $file to s3://$bucket/$key ($arch, $boot_mode, NixOS $label)"
  aws s3 cp --only-show-errors "$file" "s3://$bucket/$key"

  task=$(aws ec2 import-snapshot \
    --role-name "$role_name" \
    --description "$name" \
    --disk-container "Format=$format,UserBucket={S3Bucket=$bucket,S3Key=$key}" \
    --query ImportTaskId --output text)
  echo "importing as a snapshot: $task"
  while :; do
    read -r status snapshot < <(aws ec2 describe-import-snapshot-tasks --import-task-ids "$task" \
      --query 'ImportSnapshotTasks[0].SnapshotTaskDetail.[Status,SnapshotId]' --output text)
    case $status in
      completed) break ;;
      active) sleep "${POLL_INTERVAL:-15}" ;;
      *)
        aws ec2 describe-import-snapshot-tasks --import-task-ids "$task" \
          --query 'ImportSnapshotTasks[0].SnapshotTaskDetail.StatusMessage' --output text >&2
        echo "import-image: the import ended as '$status'" >&2
        exit 1
        ;;
    esac
  done
  echo "snapshot $snapshot"
  aws s3 rm --only-show-errors "s3://$bucket/$key"

  ami=$(aws ec2 register-image \
    --name "$name" \
    --description "gitlab-runner-vm image, NixOS $label" \
    --architecture "$arch" \
    --boot-mode "$boot_mode" \
    --virtualization-type hvm \
    --ena-support \
    --sriov-net-support simple \
    --imds-support v2.0 \
    --root-device-name /dev/xvda \
    --block-device-mappings "DeviceName=/dev/xvda,Ebs={SnapshotId=$snapshot,VolumeType=gp3,DeleteOnTermination=true}" \
    --query ImageId --output text)
  aws ec2 create-tags --resources "$ami" "$snapshot" --tags "Key=Name,Value=$name"
  echo "$ami"
}

command -v aws >/dev/null || { echo "import-image: the AWS CLI (aws) is required" >&2; exit 1; }
command -v jq >/dev/null || { echo "import-image: jq is required" >&2; exit 1; }
case ${1:-} in
  role) [ $# -eq 2 ] || usage; create_role "$2" ;;
  import)
    if [ $# -lt 2 ] || [ $# -gt 4 ]; then usage; fi
    import_image "$2" "${3:-}" "${4:-}"
    ;;
  *) usage ;;
esac
