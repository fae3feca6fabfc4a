#!/usr/bin/env bash
# The GPU check: runs prebuilt glm-worker binaries on a machine with an NVIDIA
# GPU, its driver and torch 2.11 (python3's), and checks the CUDA and NCCL
# paths that CPU-only CI cannot:
#   1. environment: GPU, torch, what glm-worker sees (libtorch_cuda, NCCL);
#   2. NCCL world of one on cuda:0: every collective and the tensor-parallel
#      autograd regions checked by value, all-reduce timing (comm-check);
#   3. training on cuda:0: the default run (1000 iterations of the default model)
#      with a checkpoint, then a resume from it; tokens/s;
#   4. the training step against eager PyTorch on the same GPU (bench-step vs
#      bench/glm_torch.py), default shape and a GLM-base-sized one;
#   5. generation on CUDA from the checkpoint.
# Every step runs even if an earlier one failed; the summary lists each
# step's result and the exit status is non-zero if any failed.
#
# Binaries: GLM_BIN_DIR, else <bundle>/bin (scripts/gpu_bundle.sh makes a
# bundle: binaries, OpenMPI runtime, default corpus), else target/release.
# Usage: scripts/gpu_check.sh [bundle-dir] [log-file]
# GLM_CHECK_DEVICE=cpu GLM_CHECK_QUICK=1 runs the same steps on the CPU, in
# seconds, to test this script itself where there is no GPU.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUNDLE="${1:-$ROOT/.gpu}"
LOG="${2:-/dev/null}"
exec > >(tee -a "$LOG") 2>&1
BIN_DIR="${GLM_BIN_DIR:-}"
[ -z "$BIN_DIR" ] && [ -x "$BUNDLE/bin/glm-worker" ] && BIN_DIR="$BUNDLE/bin"
[ -z "$BIN_DIR" ] && BIN_DIR="$ROOT/target/release"
BIN="$BIN_DIR/glm-worker"
[ -x "$BIN" ] || { echo "gpu_check: no glm-worker in $BIN_DIR (build it, or make a bundle with scripts/gpu_bundle.sh)"; exit 2; }

# OpenMPI: the bundle's when there is a bundle (the build's own; a singleton
# world with no daemon: a world of one needs no mpirun), else the system's.
if [ -d "$BUNDLE/mpi/lib" ] && [ -z "${GLM_SYSTEM_MPI:-}" ]; then
  export LD_LIBRARY_PATH="$BUNDLE/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export OMPI_MCA_mca_base_component_path="$BUNDLE/mpi/lib/openmpi3"
  export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_pmix=isolated
  export OMPI_MCA_mca_base_component_show_load_errors=0
  echo "gpu_check: OpenMPI from the bundle ($BUNDLE/mpi)"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ ! -f glm_pretrain/data/data.json ] && [ -f "$BUNDLE/data/data.json" ]; then
  mkdir -p glm_pretrain/data && cp "$BUNDLE/data/data.json" glm_pretrain/data/
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"
DEV="${GLM_CHECK_DEVICE:-cuda}"
QUICK="${GLM_CHECK_QUICK:-}"
ITERS=1000; [ -n "$QUICK" ] && ITERS=40

declare -a RESULTS=()
step() { # step <name> <command...>: runs it, records PASS/FAIL and the time
  local name="$1"; shift
  echo; echo "=== $name"
  local t0=$SECONDS
  if "$@"; then RESULTS+=("PASS  $name ($((SECONDS - t0)) s)"); else RESULTS+=("FAIL  $name (exit $?, $((SECONDS - t0)) s)"); fi
}

env_step() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c 'import torch; print("python3 torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo "python3 has no torch"
  "$BIN" env || return 1
  [ "$DEV" = cpu ] || "$BIN" env | grep -q 'cuda available: true'
}

train_step() {
  local common=(--config configs/config_block_tiny.json --args configs/configs_tiny.json --device "$DEV"
    --set save="$WORK/ckpt" --set save_interval=$((ITERS / 2)) --set eval_interval=100 --set log_interval=50
    --store "$WORK/store" --tokenizer-cache "$WORK/model")
  "$BIN" "${common[@]}" --set train_iters=$ITERS || return 1
  echo "--- resume from the checkpoint of iteration $ITERS, to $((ITERS + 40))"
  "$BIN" "${common[@]}" --set train_iters=$((ITERS + 40)) --set load="$WORK/ckpt" | tee "$WORK/resume.log" || return 1
  grep -q "resumed from" "$WORK/resume.log"
}

bench_pair() { # bench_pair <args...>: the Rust step and the eager PyTorch step on cuda:0
  local r p
  r=$("$BIN" bench-step --device "$DEV" "$@") || return 1
  echo "  $r"
  p=$("$PY" bench/glm_torch.py --device "$DEV" "$@" 2>/dev/null) || { echo "  (eager PyTorch reference failed)"; return 1; }
  echo "  $p"
  awk -v r="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$r")" -v p="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$p")" \
    'BEGIN { printf "  ratio rust/torch: %.3f\n", r / p }'
}

bench_step() {
  echo "-- default shape: GLM 4x256, 4 heads, seq 256, micro-batch 8, vocab 16000, fp32"
  if [ -n "$QUICK" ]; then bench_pair --iters 2 --warmup 1; return; fi
  bench_pair --iters 30 --warmup 5 || return 1
  echo "-- GLM-base shape: 12x768, 12 heads, seq 512, micro-batch 16, vocab 30592, fp32"
  bench_pair --iters 20 --warmup 5 --layers 12 --hidden 768 --heads 12 --seq 512 --batch 16 --vocab 30592
}

generate_step() {
  "$BIN" generate --load "$WORK/ckpt" --text "天下[MASK]，莫柔弱于水。" --max-tokens 16
}

step "environment" env_step
step "NCCL world of one on $DEV (comm-check)" "$BIN" comm-check --device "$DEV" --mib 1,64,512 --iters 20
step "training on $DEV ($ITERS iterations, checkpoint, resume)" train_step
step "training step vs eager PyTorch on $DEV" bench_step
step "generation from the checkpoint (device auto)" generate_step

echo; echo "=== summary"
printf '%s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
