# Sourced by tests/nix/run and tests/nix/eval-json: how this machine evaluates the flake.
#
#   evaluator_choose   sets EVALUATOR to one of
#     flake      the user's own Nix, when it has flakes enabled: `nix flake check`, `nix eval`;
#     nix-eval   ../shared/nix-eval beside the checkout (set up here if it is not yet): Nix 2.26
#                and a nixpkgs snapshot shipped there, nothing fetched (what CI uses);
#     none       neither; EVALUATOR_WHY says why;
#     error      ../shared/nix-eval is there but its setup failed (EVALUATOR_WHY): a failure,
#                not a reason to skip.
#   TESTS_NIX_EVALUATOR=flake|nix-eval|none forces the choice.
#   evaluator_json FILE   prints, as JSON, `import FILE { flake = <the flake's outputs>; }`.
#
# With `flake`, the flake is the git work tree as Nix sees it: files git does not know are
# invisible to it, as to any `nix build`.

repo_root=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
nix_eval_dir=${NIX_EVAL_DIR:-$repo_root/../shared/nix-eval}
# A clean clone made elsewhere (a CI run in a scratch directory) of a local checkout: nix-eval is
# then beside the checkout it was cloned from.
origin=$(git -C "$repo_root" config --get remote.origin.url 2>/dev/null || true)
if [ -z "${NIX_EVAL_DIR:-}" ] && [ ! -d "$nix_eval_dir" ] && [ -d "$origin/../shared/nix-eval" ]; then
  nix_eval_dir=$origin/../shared/nix-eval
fi
nix_eval_home=${NIX_EVAL_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/nix-eval}

# The user's Nix has flakes: `nix` runs and its experimental-features include flakes (Nix 2.18
# or later, the README's minimum). Debian's nix-bin, installed only to parse files, does not.
evaluator_has_flakes() {
  command -v nix >/dev/null 2>&1 || return 1
  local features version
  version=$(nix --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+' | head -1)
  [ -n "$version" ] || return 1
  [ "$(printf '%s\n' 2.18 "$version" | sort -V | head -1)" = 2.18 ] || return 1
  features=$(nix --extra-experimental-features nix-command config show experimental-features 2>/dev/null ||
    nix --extra-experimental-features nix-command show-config 2>/dev/null | sed -n 's/^experimental-features = //p')
  grep -qw flakes <<<"$features"
}

evaluator_nix_eval_ready() {
  [ -x "$nix_eval_home/bin/nix-instantiate" ] && [ -f "$nix_eval_home/nixpkgs/.prepared" ]
}

evaluator_choose() {
  EVALUATOR=${TESTS_NIX_EVALUATOR:-}
  EVALUATOR_WHY=
  if [ -z "$EVALUATOR" ]; then
    if evaluator_has_flakes; then
      EVALUATOR=flake
    elif [ -d "$nix_eval_dir" ]; then
      EVALUATOR=nix-eval
    else
      EVALUATOR=none
      EVALUATOR_WHY="no Nix with flakes enabled on PATH and no $nix_eval_dir beside the checkout"
    fi
  fi
  case $EVALUATOR in
    nix-eval)
      [ -d "$nix_eval_dir" ] || { EVALUATOR=none EVALUATOR_WHY="$nix_eval_dir does not exist"; return; }
      if ! evaluator_nix_eval_ready; then
        echo "tests/nix: preparing $nix_eval_dir (once per machine)" >&2
        "$nix_eval_dir/setup" >&2 || { EVALUATOR=error EVALUATOR_WHY="$nix_eval_dir/setup failed"; return; }
      fi
      ;;
    flake | none | error) ;;
    *)
      EVALUATOR_WHY="TESTS_NIX_EVALUATOR=$EVALUATOR is not one of flake, nix-eval, none"
      EVALUATOR=none
      ;;
  esac
  [ "$EVALUATOR" != none ] || [ -n "$EVALUATOR_WHY" ] || EVALUATOR_WHY="TESTS_NIX_EVALUATOR=none"
}

# nix-instantiate of the nix-eval setup, as its eval-flake runs it.
evaluator_instantiate() {
  "$nix_eval_home/bin/nix-instantiate" "$@"
}

# The flake's outputs as a Nix expression.
evaluator_flake_expr() {
  case $EVALUATOR in
    flake) printf '(builtins.getFlake "%s")' "$repo_root" ;;
    nix-eval) printf '(import (/. + "%s/outputs.nix") { project = /. + "%s"; nixpkgs = /. + "%s/nixpkgs"; })' \
      "$(cd "$nix_eval_dir" && pwd)" "$repo_root" "$nix_eval_home" ;;
  esac
}

evaluator_json() {
  local file
  file=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
  local expr="import (/. + \"$file\") { flake = $(evaluator_flake_expr); }"
  case $EVALUATOR in
    flake) nix --extra-experimental-features 'nix-command flakes' eval --impure --json --expr "$expr" ;;
    nix-eval) evaluator_instantiate --eval --strict --json -E "$expr" ;;
    error) echo "cannot evaluate: $EVALUATOR_WHY" >&2; return 1 ;;
    *) echo "no evaluator: $EVALUATOR_WHY" >&2; return 3 ;;
  esac
}
