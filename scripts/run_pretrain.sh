#!/usr/bin/env bash
# Sets up what is missing, then prepares the default corpus for pretraining:
# tokenizer (trained on the corpus and cached under glm_pretrain/model/, or the
# one given with --tokenizer), token store under glm_pretrain/data/store, and a
# look at a few blank-infilling samples. Extra arguments go to `glm-worker prepare`,
# e.g. scripts/run_pretrain.sh --tokenizer ../shared/seed/vocab.txt
#
# The trainer (GLM model, optimizer, checkpoints) is not part of this release
# yet; the script stops after data preparation and says so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
BIN="$ROOT/target/release/glm-worker"
STORE=glm_pretrain/data/store
"$BIN" prepare --data glm_pretrain/data/data.json --out "$STORE" "$@"
"$BIN" samples --store "$STORE" --count 2 --seq-length 96
echo "run_pretrain: data is ready in $STORE. Training is not implemented in this release yet (GLM model and trainer come next); stopping after data preparation."
