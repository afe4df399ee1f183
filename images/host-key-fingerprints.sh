#!/bin/sh
# Prints the SSH host keys' fingerprints, one line per key in the agent's console format
# (PREFIX, the agent's console prefix, then "ssh host key 256 SHA256:... (ED25519)"), for
# people who check a first login against them: on GCE (serial port output) and DigitalOcean,
# where no cloud-init prints them any more. Only what ssh-keygen computed is printed, checked against its shapes: a key
# file's comment (user@host when it was made) is left out, so nothing but the fingerprint
# reaches the console.
#
# Usage: host-key-fingerprints.sh PREFIX SSH-KEYGEN [KEY-DIR]   (KEY-DIR: /etc/ssh)
set -u
prefix=$1
keygen=$2
dir=${3:-/etc/ssh}
printed=0
for pub in "$dir"/ssh_host_*_key.pub; do
  [ -f "$pub" ] || continue
  # "<bits> SHA256:<base64> <comment...> (<TYPE>)"
  line=$("$keygen" -l -E sha256 -f "$pub" 2>/dev/null) || continue
  bits=${line%% *}
  rest=${line#* }
  fingerprint=${rest%% *}
  type=${line##* }
  case $bits in '' | *[!0-9]*) continue ;; esac
  case $fingerprint in SHA256:*) ;; *) continue ;; esac
  case ${fingerprint#SHA256:} in '' | *[!A-Za-z0-9+/=]*) continue ;; esac
  case $type in '('*')') ;; *) continue ;; esac
  name=${type#(}
  name=${name%)}
  case $name in '' | *[!A-Z0-9-]*) continue ;; esac
  printf '%sssh host key %s %s %s\n' "$prefix" "$bits" "$fingerprint" "$type"
  printed=$((printed + 1))
done
if [ "$printed" = 0 ]; then
  printf '%sno SSH host keys in %s to print\n' "$prefix" "$dir"
fi
exit 0
