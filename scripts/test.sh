#!/usr/bin/env bash
# Sets up what is missing (scripts/setup.sh), checks formatting (cargo fmt)
# and lints (clippy, warnings are errors), then runs every test: every test
# binary runs even when an earlier one fails; then every command of the
# README's and docs' ```sh blocks (scripts/docs_check.sh). The last line
# says what failed (or that all passed). Extra arguments go to `cargo test` (e.g.
# `-p glm-worker --test golden`, or a test name filter).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh --test
# the torch setup.sh chose (LIBTORCH for torch-sys)
source target/torch.env
unset LIBTORCH_USE_PYTORCH
# Several test processes share 2 cores: one intra-op thread each.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
LOG="target/test.log"
t0=$SECONDS
checks=()
cargo fmt --all -- --check || checks+=("cargo fmt --check (run cargo fmt --all)")
cargo clippy --release --workspace --all-targets --quiet -- -D warnings || checks+=("clippy -D warnings")
set +e
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
# every command the README and docs show in a ```sh block, run as written
# (shortened); skipped when a test filter was given
if [ $# -eq 0 ]; then
  scripts/docs_check.sh 2>&1 | tee target/docs_check.log
  [ "${PIPESTATUS[0]}" = 0 ] || checks+=("scripts/docs_check.sh (see target/docs_check.log)")
fi
set -e
# One summary line from the log: the failed checks and tests (by binary), or
# the count passed.
awk -v rc="$rc" -v secs="$((SECONDS - t0))" -v checks="$(IFS=';'; echo "${checks[*]:-}")" '
  /^ *Running / { bin = $2; sub(/^.*\//, "", bin); sub(/\.rs$/, "", bin); if ($2 ~ /^unittests/) { bin = $4; gsub(/[()]/, "", bin); sub(/^.*\/deps\//, "", bin); sub(/-[0-9a-f]+$/, "", bin); bin = bin " (unit)" } }
  /^ *Doc-tests / { bin = $2 " (doc)" }
  /^test .* \.\.\. FAILED$/ { name = $0; sub(/^test /, "", name); sub(/ \.\.\. FAILED$/, "", name); failed[++nf] = bin ": " name }
  /^test result: / { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) passed += $i; if ($(i+1) ~ /^failed/) nfail += $i } }
  END {
    pre = checks == "" ? "" : "FAILED: " checks "; "
    gsub(/;/, "; ", pre); sub(/;  $/, "; ", pre)
    if (nf > 0) {
      line = ""; for (i = 1; i <= nf; i++) line = line (i > 1 ? ", " : "") failed[i]
      printf "test.sh: %sFAILED: %d of %d tests in %d s: %s\n", pre, nf, passed + nfail, secs, line
    } else if (rc != 0) {
      printf "test.sh: %sFAILED (exit %d) in %d s with no failed test reported: a build error or a crashed test binary (see above)\n", pre, rc, secs
    } else {
      printf "test.sh: %sall %d tests passed in %d s\n", pre, passed, secs
    }
  }' "$LOG"
((${#checks[@]})) && [ "$rc" = 0 ] && rc=1
exit "$rc"
