#!/usr/bin/env bash
# Benchmarks (not tests) of the data pipeline on this machine:
#   - corpus -> token store throughput (MB/s of text), with a trained WordPiece
#     tokenizer and with the seed's bert-base-chinese vocab.txt, on all cores
#     and on one;
#   - blank-infilling sample construction rate for the three modes;
#   - the training step (forward, backward, clipping, AdamW) of the default
#     model shape (GLM 4 layers, hidden 256, 4 heads, seq 256, micro-batch 8,
#     vocab 16000) against the same model in eager PyTorch (the torch setup.sh chose)
#     (bench/glm_torch.py), on 1 and on 2 threads, in the same run; then with
#     activation checkpointing (tokens/s and peak memory), and in bf16 against
#     autocast at a smaller shape;
#   - the MPI back end: all-reduce bus bandwidth of the tensor collective
#     against a plain MPI_Allreduce of the same bytes (2 ranks);
#   - training tokens/s of the default model on (TP, DP) = (1, 1), (1, 2), (2, 1);
#   - ZeRO stages 0/1/2 at DP=2 (2 MPI ranks): tokens/s, peak resident memory
#     of the larger rank, model-state bytes per rank (measured from the
#     buffers) and bytes each rank sends per step, against the theory;
#   - the stall of saving checkpoints: ms per training step without saving,
#     and saving every other step with the files written inline (training
#     waits) or in the background, at the default model and at a 108 M
#     parameter one (also alone: scripts/bench.sh save);
#   - the planner against measured runs (glm-launch plan --profile vs
#     glm-worker bench-step on 14 layouts: bench/plan_grid.py; also alone:
#     scripts/bench.sh plan);
#   - prepare at scale (bench/prepare_bench.py; also alone: scripts/bench.sh
#     prepare): a JSON Lines corpus drawn from the default corpus and this
#     machine's Debian text, prepared with the seed's vocab.txt and with a
#     trained WordPiece at 1 and 2 workers against the tokenizers library's
#     batch encoding of the same text in Python at 1 and 2 threads (MB/s,
#     tokens/s, peak memory), then peak memory at every size with 2 workers.
#     Sizes in GB: GLM_BENCH_PREPARE_GB (0.5,1,2 alone; 0.25 in `all`).
# Corpus (the other data lines): the default corpus repeated 8 times (about 17 MB of JSON).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ONLY="${1:-all}"
case "$ONLY" in all | save | plan | prepare) ;; *) echo "usage: scripts/bench.sh [save|plan|prepare]" >&2; exit 2 ;; esac
scripts/setup.sh
source target/torch.env
BIN="$ROOT/target/release/glm-worker"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# the stall of a checkpoint save: bench-step's training step with a save
# every other step, written inline or in the background (its time counts:
# the snapshot, the install, waiting for the writer before the next save
# and at the end, and the writer's competition for the cores), against
# the same steps without saving. The three modes alternate, twice.
bench_save() {
  local dir="$WORK/saving"
  mkdir -p "$dir"
  echo "== checkpoint saving: ms per training step without saving, and saving every other step inline (training waits) or in the background; 2 threads, the three alternating twice"
  echo "   held_ms_per_save: time the training thread spent per save installed within the timed steps (the copy, the install, any wait for the writer);"
  echo "   writer_ms_per_save: time the files took to write and checksum; end_wait_ms: the last background save, waited for after the timed steps"
  local shape
  for shape in "default model: GLM 4x256, seq 256, micro-batch 8, vocab 16000 (7.3 M parameters); 8 steps after 1 warm-up|--iters 8 --warmup 1 --layers 4 --hidden 256 --heads 4 --seq 256 --batch 8 --vocab 16000" \
               "GLM 12x768 (GLM-Base's shape), seq 128, micro-batch 1, vocab 30592 (108 M parameters); 6 steps after 1 warm-up|--iters 6 --warmup 1 --layers 12 --hidden 768 --heads 12 --seq 128 --batch 1 --vocab 30592"; do
    echo "  ${shape%%|*}"
    local args
    read -r -a args <<<"${shape#*|}"
    local round mode line
    : >"$dir/results"
    for round in 1 2; do
      for mode in none inline background; do
        rm -rf "$dir/save"
        if [ "$mode" = none ]; then
          line=$("$BIN" bench-step --threads 2 "${args[@]}")
        else
          line=$("$BIN" bench-step --threads 2 "${args[@]}" --save "$dir/save" --save-every 2 --save-writer "$mode")
        fi
        echo "    $mode: $line"
        echo "$mode $(sed 's/.*ms\/it=\([0-9.]*\).*/\1/' <<<"$line") $(sed -n 's/.*held_ms_per_save=\([0-9.]*\).*/\1/p' <<<"$line")" >>"$dir/results"
      done
    done
    awk '{ s[$1] += $2; h[$1] += $3; n[$1]++ } END {
      b = s["none"] / n["none"]
      printf "    mean ms/step: no saving %.0f; inline %.0f (held %.0f ms per save); background %.0f (held %.0f ms per save)\n",
        b, s["inline"] / n["inline"], h["inline"] / n["inline"], s["background"] / n["background"], h["background"] / n["background"]
    }' "$dir/results"
  done
  rm -rf "$dir"
}
if [ "$ONLY" = save ]; then
  bench_save
  exit 0
fi
bench_plan() {
  echo; echo "== the planner against measured runs (bench/plan_grid.py; 2 ranks a layout at most, one thread each)"
  python3 "$ROOT/bench/plan_grid.py"
}
if [ "$ONLY" = plan ]; then
  bench_plan
  exit 0
fi
# prepare at scale against the tokenizers library (its Python package, in .venv)
bench_prepare() {
  local sizes="$1"
  echo; echo "== prepare at scale: corpora of $sizes GB (bench/prepare_bench.py)"
  local py="$ROOT/.venv/bin/python"
  "$py" -c 'import tokenizers' 2>/dev/null || { echo "bench: prepare's comparison needs the tokenizers package in .venv: scripts/setup.sh --test" >&2; return 1; }
  "$py" "$ROOT/bench/prepare_bench.py" --bin "$BIN" --vocab "$ROOT/../shared/seed/vocab.txt" --sizes "$sizes" --work "$WORK/prepare"
  rm -rf "$WORK/prepare"
}
if [ "$ONLY" = prepare ]; then
  bench_prepare "${GLM_BENCH_PREPARE_GB:-0.5,1,2}"
  exit 0
fi
PY="${TORCH_PYTHON:-}"
[ -n "$PY" ] || { echo "bench: the torch in use (LIBTORCH=$LIBTORCH) has no python to run eager PyTorch beside it; point LIBTORCH at a python torch package or unset it" >&2; exit 1; }
VOCAB="$ROOT/../shared/seed/vocab.txt"

"$PY" - "$ROOT/glm_pretrain/data/data.json" "$WORK/big.json" <<'PY'
import json, sys
docs = json.load(open(sys.argv[1], encoding="utf-8"))
with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(docs * 8, f, ensure_ascii=False)
PY
echo "bench: corpus $(du -h "$WORK/big.json" | cut -f1) ($(nproc) cores)"

rate() { grep -E "tokenized|trained WordPiece" | sed 's/^prepare: /  /'; }
echo "== prepare, WordPiece trained on the corpus (training time shown separately)"
"$BIN" prepare --data "$WORK/big.json" --out "$WORK/s1" --tokenizer-cache "$WORK/model" | rate
echo "== prepare, seed vocab.txt (bert-base-chinese), one worker per core (a JSON array is one shard: its encoding uses every core)"
"$BIN" prepare --data "$WORK/big.json" --out "$WORK/s2" --tokenizer "$VOCAB" | rate
echo "== prepare, seed vocab.txt, one worker"
"$BIN" prepare --data "$WORK/big.json" --out "$WORK/s2" --tokenizer "$VOCAB" --force --workers 1 | rate
echo "== sample construction, seq_length 512, task_mask"
for mode in span sentence generation; do
  "$BIN" samples --store "$WORK/s2" --count 50000 --seq-length 512 --mode "$mode" --task-mask --summary | head -1 | sed 's/^samples: /  /'
done

echo "== training step, GLM 4x256, seq 256, micro-batch 8, vocab 16000, CPU (model TFLOP/s: 6·N + 12·L·h·s per token)"
for t in 1 2; do
  r=$("$BIN" bench-step --threads "$t" --iters 20)
  p=$("$PY" "$ROOT/bench/glm_torch.py" --threads "$t" --iters 20)
  echo "  $r"
  echo "  $p"
  rt=$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$r"); pt=$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$p")
  awk -v r="$rt" -v p="$pt" -v t="$t" 'BEGIN { printf "  ratio rust/torch at %d thread(s): %.3f\n", t, r / p }'
done
pair() { # pair <label> <rust args> -- <torch args>: both lines, the tokens/s ratio, peak memory
  local label="$1"; shift
  local rargs=() targs=()
  while [ "$1" != "--" ]; do rargs+=("$1"); shift; done; shift
  targs=("$@")
  local r p
  r=$("$BIN" bench-step "${rargs[@]}")
  p=$("$PY" "$ROOT/bench/glm_torch.py" "${targs[@]}" 2>"$WORK/torch.err") || { echo "  eager PyTorch failed:"; tail -5 "$WORK/torch.err"; return 1; }
  echo "  $r"
  echo "  $p"
  awk -v r="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$r")" -v p="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$p")" -v l="$label" \
    'BEGIN { printf "  ratio rust/torch, %s: %.3f\n", l, r / p }'
}
echo "== fp32 with activation checkpointing (every layer), default shape, 2 threads (peak_mem_mb: peak resident memory)"
pair "fp32 + checkpointing" --threads 2 --iters 10 --checkpoint-activations -- --threads 2 --iters 10 --checkpoint-activations
echo "== bf16 vs eager PyTorch autocast bf16, GLM 4x256, seq 128, micro-batch 4, 2 threads (16-bit matmuls are emulated on most CPUs: slow on both sides)"
SMALL=(--threads 2 --iters 3 --warmup 1 --seq 128 --batch 4)
pair "bf16" "${SMALL[@]}" --precision bf16 -- "${SMALL[@]}" --dtype bf16
echo "== practical peak: fp32 2048x2048 matmul (torch, 2 threads)"
"$PY" - 2>/dev/null <<'PY'
import time, torch
torch.set_num_threads(2)
a = torch.randn(2048, 2048)
a @ a
t = time.perf_counter()
for _ in range(10):
    a @ a
dt = (time.perf_counter() - t) / 10
print(f"  {2 * 2048 ** 3 / dt / 1e12:.3f} TFLOP/s")
PY
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
echo "== MPI back end: all-reduce bus bandwidth, 2 ranks (2(p-1)/p x bytes / time)"
mpirun -np 2 --oversubscribe --bind-to none "$BIN" bench-comm | sed 's/^/  /'
echo "== training throughput, default model, 30 iterations (mean of the last 20)"
TRAIN=(--config configs/config_block_tiny.json --args configs/configs_tiny.json --set train_iters=30 --set log_interval=10 --set eval_interval=0 --set save=null --device cpu)
tps() { grep -E " iteration +(20|30)/" | sed 's/.*| \([0-9]*\) tokens\/s.*/\1/' | awk '{s+=$1} END {printf "%.0f tokens/s\n", s/NR}'; }
echo "  (TP, DP) = (1, 1), 1 process x 2 threads: $(OMP_NUM_THREADS=2 "$BIN" "${TRAIN[@]}" | tps)"
echo "  (TP, DP) = (1, 2), 2 processes x 1 thread: $(OMP_NUM_THREADS=1 mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS "$BIN" "${TRAIN[@]}" | tr '\r' '\n' | tps)"
echo "  (TP, DP) = (2, 1), 2 processes x 1 thread: $(OMP_NUM_THREADS=1 mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS "$BIN" "${TRAIN[@]}" --set model_parallel_size=2 | tr '\r' '\n' | tps)"
echo "== ZeRO at DP=2 (2 ranks x 1 thread), GLM 4x256, micro-batch 4 x seq 128 per rank in fp32, 2 x 32 in bf16 (emulated on this CPU); buckets of 2e6 elements"
echo "   theory: every stage sends 2(p-1)/p x the gradient bytes per step (stage 1/2: reduce-scatter + all-gather = one all-reduce);"
echo "   model states per rank, fp32 (4+4+8 B/param at stage 0): stage 1 keeps 8/p B/param of moments, stage 2 also 4/p of gradients"
ZB=(bench-step --layers 4 --hidden 256 --reduce-bucket-size 2000000 --allgather-bucket-size 2000000)
for prec in fp32 bf16; do
  shape=(--iters 6 --warmup 2 --seq 128 --batch 4)
  [ "$prec" = bf16 ] && shape=(--iters 3 --warmup 1 --seq 32 --batch 2)
  for z in 0 1 2; do
    echo "  $(OMP_NUM_THREADS=1 mpirun -np 2 --oversubscribe --bind-to none -x OMP_NUM_THREADS "$BIN" "${ZB[@]}" "${shape[@]}" --precision "$prec" --zero-stage "$z" | tail -n 1)"
  done
done
bench_save
bench_plan
bench_prepare "${GLM_BENCH_PREPARE_GB:-0.25}"
