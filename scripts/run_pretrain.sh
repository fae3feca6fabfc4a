#!/usr/bin/env bash
# Sets up what is missing, then pretrains the default model — GLM with 4 layers,
# hidden 256, 4 heads, seq 256 (configs/config_block_tiny.json +
# configs/configs_tiny.json) — on the default corpus (fortunes-zh), on CPU (or
# cuda:0 when CUDA is available): about 8 minutes on 2 cores.
#
# The token store and tokenizer are prepared on the way. Checkpoints,
# metrics.jsonl and loss.png go to glm_pretrain/model/checkpoints/glm-tiny.
# Extra arguments go to glm-worker, e.g.
#   scripts/run_pretrain.sh --set train_iters=200
#   scripts/run_pretrain.sh --set load=glm_pretrain/model/checkpoints/glm-tiny   # resume (a second plain run is refused)
#   scripts/run_pretrain.sh --set overwrite=true                                 # start over, removing the earlier run
#   scripts/run_pretrain.sh --set tokenizer_path=configs/seed/vocab.txt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup.sh
exec "$ROOT/target/release/glm-worker" --config configs/config_block_tiny.json --args configs/configs_tiny.json "$@"
