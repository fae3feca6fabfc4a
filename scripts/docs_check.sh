#!/usr/bin/env bash
# Runs every command the README and docs/*.md show in a fenced ```sh block,
# as written, on this (CPU) machine, and fails if one fails. scripts/test.sh
# runs it after the tests; alone it needs a set-up checkout (scripts/setup.sh).
#
# - A block whose info string is `sh` runs; `sh validate` runs with
#   `--set train_iters=0` appended to training commands (validation only: the
#   GLM-Base/Large shapes and multi-rank launches, too slow on 2 cores); any
#   other block (```text, indented) is not run.
# - Training commands (those with --config, and scripts/run_pretrain.sh) are
#   shortened: `--set train_iters=2` is appended (a later --set wins).
# - A line ending in a backslash continues; `# ...` comments are shell comments.
# - Each file runs in its own scratch copy of the checkout, so runs write
#   their checkpoints, stores and tokenizers there, never in the checkout: the
#   sources, binaries and the virtual environment are symlinks, the token
#   store and tokenizer cache are copied when present, and scripts/setup.sh
#   is a no-op there (the checkout is set up already). Commands of one file
#   run in order and may use what earlier ones wrote.
#
# Usage: scripts/docs_check.sh [file.md ...]   (default: README.md docs/*.md)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[ -x target/release/glm-worker ] || { echo "docs_check: target/release/glm-worker is missing (run scripts/setup.sh)"; exit 2; }
files=("$@")
((${#files[@]})) || files=(README.md docs/*.md)

# several ranks on 2 cores: one thread each; mpirun as root, oversubscribed, unbound
export OMP_NUM_THREADS=1 OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# scratch <dir>: a checkout whose outputs are its own (see above)
scratch() {
  local s="$1"
  mkdir -p "$s/scripts" "$s/glm_pretrain/data" "$s/glm_pretrain/model"
  # what git tracks at the top (and the build, the venv) as links; run outputs
  # (glm_runs/, glm_pretrain/) are the scratch copy's own
  for x in "$ROOT"/* "$ROOT"/.venv; do
    local b; b="$(basename "$x")"
    case "$b" in scripts | glm_pretrain | glm_runs) ;;
      *) if [ "$b" = target ] || [ "$b" = .venv ] || [ -n "$(git -C "$ROOT" ls-files -- "$b" | head -n 1)" ]; then ln -s "$x" "$s/$b"; fi ;;
    esac
  done
  mkdir -p "$s/glm_runs"
  for x in "$ROOT"/scripts/*; do ln -s "$x" "$s/scripts/$(basename "$x")"; done
  rm "$s/scripts/setup.sh"
  printf '#!/usr/bin/env bash\n# docs_check: the checkout is set up already\nexit 0\n' >"$s/scripts/setup.sh"
  chmod +x "$s/scripts/setup.sh"
  [ -e "$ROOT/glm_pretrain/data/data.json" ] && ln -s "$ROOT/glm_pretrain/data/data.json" "$s/glm_pretrain/data/data.json"
  # of glm_pretrain/ only what git tracks (a user's own corpora and stores
  # there are not touched), the default corpus, and copies of the store and
  # the cached tokenizers
  git -C "$ROOT" ls-files -- glm_pretrain | while read -r f; do mkdir -p "$s/$(dirname "$f")"; ln -s "$ROOT/$f" "$s/$f"; done
  [ -d "$ROOT/glm_pretrain/data/store" ] && cp -r "$ROOT/glm_pretrain/data/store" "$s/glm_pretrain/data/store"
  for x in "$ROOT"/glm_pretrain/model/tokenizer-*.json; do [ -f "$x" ] && cp "$x" "$s/glm_pretrain/model/"; done
  # ../shared beside the checkout
  [ -e "$ROOT/../shared" ] && ln -s "$(cd "$ROOT/../shared" && pwd)" "$(dirname "$s")/shared"
}

# commands <file>: "<mode>\t<line number>\t<command>" for each command of its ```sh blocks
commands() {
  awk '
    /^```/ {
      cont = ""
      if (!inblock) { inblock = 1; info = substr($0, 4); gsub(/^[ \t]+|[ \t]+$/, "", info); split(info, w, /[ \t]+/)
                      mode = (w[1] == "sh") ? (w[2] == "validate" ? "validate" : "run") : ""; next }
      inblock = 0; mode = ""; next
    }
    inblock && mode != "" {
      line = $0
      if (cont != "") { cmd = cmd " " line } else { cmd = line; start = NR }
      if (line ~ /\\$/) { sub(/\\$/, "", cmd); cont = 1; next }
      cont = ""
      c = cmd; sub(/^[ \t]+/, "", c)
      if (c == "" || c ~ /^#/) next
      printf "%s\t%d\t%s\n", mode, start, cmd
    }
  ' "$1"
}

# shorten <mode> <command>: training commands get train_iters appended
shorten() {
  local mode="$1" cmd="$2" iters=2
  [ "$mode" = validate ] && iters=0
  # strip a trailing comment, so that the appended --set is not commented out
  local body="${cmd%%  #*}"
  if [[ "$body" =~ (glm-worker|glm-launch|run_pretrain\.sh) ]] && [[ "$body" =~ (--config|run_pretrain\.sh) ]] && ! [[ "$body" =~ [[:space:]](eval|generate|prepare|samples|checkpoint|bench-step|bench-comm|comm-check|env)[[:space:]] ]]; then
    echo "$body --set train_iters=$iters"
  else
    echo "$body"
  fi
}

n=0 failed=()
for f in "${files[@]}"; do
  [ -f "$f" ] || { echo "docs_check: $f: no such file"; failed+=("$f"); continue; }
  list="$(commands "$f")"
  [ -n "$list" ] || continue
  s="$TMP/$(basename "$f" .md)/main"
  scratch "$s"
  while IFS=$'\t' read -r mode lineno cmd; do
    n=$((n + 1))
    run="$(shorten "$mode" "$cmd")"
    t0=$SECONDS
    if (cd "$s" && timeout 900 bash -o pipefail -c "$run") </dev/null >"$TMP/out" 2>&1; then
      echo "docs_check: PASS $f:$lineno ($((SECONDS - t0)) s): $run"
    else
      rc=$?
      echo "docs_check: FAIL $f:$lineno (exit $rc, $((SECONDS - t0)) s): $run"
      tail -n 15 "$TMP/out" | sed 's/^/    | /'
      failed+=("$f:$lineno")
    fi
  done <<<"$list"
done
if ((${#failed[@]})); then
  echo "docs_check: FAILED ${#failed[@]} of $n commands: ${failed[*]}"
  exit 1
fi
echo "docs_check: all $n commands of ${#files[@]} files ran"
