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
#      bench/glm_torch.py), default shape and a GLM-base-sized one, fp32;
#   5. mixed precision at the GLM-Large shape (24x1024, 16 heads, seq 512,
#      micro-batch 16, vocab 30592) against eager PyTorch autocast: bf16,
#      fp16 (loss scaling), bf16 with activation checkpointing; tokens/s
#      ratio, peak memory and MFU (of the H200's 989 TFLOP/s dense bf16) of
#      each side;
#   6. a bf16 training run (50 iterations) of configs/config_block_large.json
#      with configs/configs.json, its fp16 section switched off by --set;
#      checks that the run reports precision = bf16;
#   7. generation on CUDA from the checkpoint;
#   8. ZeRO on CUDA in a world of one (NCCL group of one: the stage 1 and 2
#      code paths, hooks, reduce-scatter and all-gather through NCCL): the
#      bench step at stages 0/1/2 in bf16 (model-state bytes and tokens/s),
#      and a stage-2 bf16 training run with a checkpoint, a resume from it
#      and `checkpoint inspect`;
#   9. two ranks on one GPU (mpirun -np 2, GLM_COMM_BACKEND=host-staged:
#      every collective through host memory over MPI, since NCCL refuses two
#      ranks on one device): TP=2, and DP=2 with ZeRO stage 2, in bf16, each
#      against one bf16 rank, per-iteration losses within 1e-3 relative (the
#      CPU parity tests' tolerance). This runs the multi-rank CUDA training
#      path (TP regions, ZeRO reduce-scatter/all-gather of CUDA buffers, the
#      agreement on overflow and norms) on one GPU, all but NCCL itself.
#  10. the collective deadline with CUDA tensors: the same two host-staged
#      ranks, rank 1 frozen (GLM_TEST_FAULT=stop:1:3), --collective-timeout 10:
#      rank 0's watchdog stops the job naming the operation. (NCCL's own
#      non-blocking abort path is not used: see docs/training.md, When things
#      fail.)
# Every step runs even if an earlier one failed; the summary lists each
# step's result and the exit status is non-zero if any failed.
#
# Binaries: GLM_BIN_DIR, else <bundle>/bin (scripts/gpu_bundle.sh makes a
# bundle: binaries, OpenMPI runtime and mpirun, default corpus), else
# target/release.
# Usage: scripts/gpu_check.sh [bundle-dir] [log-file]
# GLM_CHECK_DEVICE=cpu GLM_CHECK_QUICK=1 runs the same steps on the CPU, in
# seconds, to test this script itself where there is no GPU (steps 5 and 6
# then use tiny shapes, never GLM-Large; GLM_CHECK_QUICK alone keeps the GPU
# but shrinks steps 5 and 6 to the default shape and 4 iterations).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
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
MPIRUN=mpirun
if [ -d "$BUNDLE/mpi/lib" ] && [ -z "${GLM_SYSTEM_MPI:-}" ]; then
  export LD_LIBRARY_PATH="$BUNDLE/mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export OMPI_MCA_mca_base_component_path="$BUNDLE/mpi/lib/openmpi3"
  export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_pmix=isolated
  export OMPI_MCA_mca_base_component_show_load_errors=0
  # the bundle's mpirun (step 9) finds its help texts (share/openmpi), PMIx's
  # plugins and Debian's MCA settings in the bundle; OPAL_PREFIX relocates
  # the installation (a bundle without mpirun leaves the system's alone)
  if [ -x "$BUNDLE/mpi/bin/mpirun" ]; then
    MPIRUN="$BUNDLE/mpi/bin/mpirun"
    export OPAL_PREFIX="$BUNDLE/mpi" PMIX_MCA_mca_base_component_path="$BUNDLE/mpi/lib/pmix"
    [ -f "$BUNDLE/mpi/etc/openmpi-mca-params.conf" ] && export OMPI_MCA_mca_base_param_files="$BUNDLE/mpi/etc/openmpi-mca-params.conf"
  fi
  echo "gpu_check: OpenMPI from the bundle ($BUNDLE/mpi)"
fi
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ ! -f glm_pretrain/data/data.json ] && [ -f "$BUNDLE/data/data.json" ]; then
  mkdir -p glm_pretrain/data && cp "$BUNDLE/data/data.json" glm_pretrain/data/
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# the torch scripts/setup.sh chose (target/torch.env) where it exists here,
# else python3's (a GPU machine's own torch 2.11); PYTHON overrides both
PY="${PYTHON:-}"
if [ -z "$PY" ] && [ -f target/torch.env ]; then
  PY="$(. target/torch.env; [ -x "${TORCH_PYTHON:-}" ] && echo "$TORCH_PYTHON")" || PY=""
fi
PY="${PY:-python3}"
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
  "$PY" -c 'import torch; print("python torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>/dev/null || echo "$PY has no torch"
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
  grep -q "resumed from" "$WORK/resume.log" || return 1
  # the curve is drawn with the font compiled in (the GPU machine has no system fonts)
  [ -s "$WORK/ckpt/loss.png" ] || { echo "loss.png missing"; return 1; }
}

field() { # field <key> <bench line>: the value of " key=value", "?" if absent
  local v
  v=$(sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2")
  echo "${v:-?}"
}

bench_pair() { # bench_pair <fp32|bf16|fp16> <args...>: the Rust step and the eager PyTorch step on $DEV
  local prec="$1"; shift
  local r p rc rprec=()
  [ "$prec" = fp32 ] || rprec=(--precision "$prec") # fp32 is bench-step's default
  r=$("$BIN" bench-step --device "$DEV" ${rprec[@]+"${rprec[@]}"} "$@") || { echo "  (glm-worker bench-step failed)"; return 1; }
  echo "  $r"
  p=$("$PY" bench/glm_torch.py --device "$DEV" --dtype "$prec" "$@" 2>"$WORK/torch.err"); rc=$?
  if [ "$rc" -eq 2 ] && [ "$DEV" = cpu ] && [ "$prec" = fp16 ] && grep -q '^glm_torch: fp16 autocast' "$WORK/torch.err"; then
    echo "  (eager PyTorch fp16 skipped on the CPU: $(grep '^glm_torch:' "$WORK/torch.err" | tail -n 1))"
    return 0
  fi
  if [ "$rc" -ne 0 ]; then
    echo "  (eager PyTorch reference failed, exit $rc)"; tail -n 5 "$WORK/torch.err" | sed 's/^/    /'
    return 1
  fi
  echo "  $p"
  awk -v r="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$r")" -v p="$(sed 's/.*tokens\/s=\([0-9]*\).*/\1/' <<<"$p")" \
    'BEGIN { if (p > 0) printf "  ratio rust/torch: %.3f\n", r / p; else print "  ratio rust/torch: ?" }'
  echo "  peak memory: rust $(field peak_mem_mb "$r") MB, torch $(field peak_mem_mb "$p") MB"
  [ "$prec" = fp32 ] && return 0
  awk -v r="$(field tflops "$r")" -v p="$(field tflops "$p")" 'function mfu(t) { return t == "?" ? "?" : sprintf("%.1f%%", 100 * t / 989) }
    BEGIN { printf "  MFU (of 989 TFLOP/s, H200 dense bf16): rust %s, torch %s\n", mfu(r), mfu(p) }'
}

bench_step() {
  echo "-- default shape: GLM 4x256, 4 heads, seq 256, micro-batch 8, vocab 16000, fp32"
  if [ -n "$QUICK" ]; then bench_pair fp32 --iters 2 --warmup 1; return; fi
  bench_pair fp32 --iters 30 --warmup 5 || return 1
  echo "-- GLM-base shape: 12x768, 12 heads, seq 512, micro-batch 16, vocab 30592, fp32"
  bench_pair fp32 --iters 20 --warmup 5 --layers 12 --hidden 768 --heads 12 --seq 512 --batch 16 --vocab 30592
}

mixed_step() { # bf16, fp16, bf16 + activation checkpointing; runs all three, fails if a command failed
  local shape=(--iters 20 --warmup 5 --layers 24 --hidden 1024 --heads 16 --seq 512 --batch 16 --vocab 30592)
  local what="GLM-Large shape: 24x1024, 16 heads, seq 512, micro-batch 16, vocab 30592"
  if [ "$DEV" = cpu ]; then
    shape=(--iters 2 --warmup 1 --layers 2 --hidden 64 --heads 2 --seq 64 --batch 2 --vocab 500)
    what="tiny CPU shape: 2x64, 2 heads, seq 64, micro-batch 2, vocab 500"
  elif [ -n "$QUICK" ]; then
    shape=(--iters 2 --warmup 1)
    what="default shape: GLM 4x256, 4 heads, seq 256, micro-batch 8, vocab 16000"
  fi
  local fail=0
  echo "-- bf16 autocast, $what"
  bench_pair bf16 "${shape[@]}" || fail=1
  echo "-- fp16 autocast with loss scaling, $what"
  bench_pair fp16 "${shape[@]}" || fail=1
  echo "-- bf16 autocast + activation checkpointing (per layer), $what"
  bench_pair bf16 --checkpoint-activations "${shape[@]}" || fail=1
  return "$fail"
}

train_bf16_step() { # the real trainer, bf16 via dotted --set keys over the DeepSpeed JSON
  local n=50 log=10 model=(--args configs/configs_large.json)
  [ -n "$QUICK" ] && n=4 log=2
  # on the CPU: the tiny model at seq 64 (the DeepSpeed JSON's micro-batch 16 stays)
  [ "$DEV" = cpu ] && model=(--args configs/configs_tiny.json --set num_layers=2 --set hidden_size=64
    --set num_attention_heads=2 --set seq_length=64)
  "$BIN" --config configs/config_block_large.json "${model[@]}" --device "$DEV" \
    --set fp16.enabled=false --set bf16.enabled=true --set train_iters=$n --set log_interval=$log \
    --set eval_interval=0 --set save=null --store "$WORK/store" --tokenizer-cache "$WORK/model" \
    --set train_data=glm_pretrain/data/data.json --set tokenizer_path=null 2>&1 | tee "$WORK/bf16.log" || return 1
  # the effective-configuration line "precision = bf16 (...)", not the fp32 fall-back warning
  grep -Eq 'precision[ :=]+bf16' "$WORK/bf16.log" || { echo "gpu_check: the run does not report precision = bf16"; return 1; }
  ! grep -q 'trains in fp32' "$WORK/bf16.log" || { echo "gpu_check: the run fell back to fp32"; return 1; }
}

plan_step() { # the planner against this device: its profile, and the table entry, vs the measured step
  local shape=(--layers 24 --hidden 1024 --heads 16 --seq 512 --batch 16 --vocab 30592) sets=()
  if [ "$DEV" = cpu ]; then shape=(--layers 2 --hidden 64 --heads 2 --seq 64 --batch 2 --vocab 512)
  elif [ -n "$QUICK" ]; then shape=(--layers 4 --hidden 256 --heads 4 --seq 256 --batch 8 --vocab 16000); fi
  local launch="$BIN_DIR/glm-launch"
  [ -x "$launch" ] || launch=target/release/glm-launch
  [ -x "$launch" ] || { echo "gpu_check: no glm-launch beside glm-worker (scripts/gpu_bundle.sh packs it)"; return 1; }
  local line
  line=$("$BIN" bench-step --device "$DEV" --precision bf16 --iters 10 --warmup 3 "${shape[@]}" --profile-out "$WORK/profile.json") || return 1
  echo "$line"
  # the same shape for the planner: configs_tiny.json's keys over the bench's sizes
  sets=(--set num_layers="${shape[1]}" --set hidden_size="${shape[3]}" --set num_attention_heads="${shape[5]}"
    --set seq_length="${shape[7]}" --set max_position_embeddings="${shape[7]}" --set ds.train_micro_batch_size_per_gpu="${shape[9]}"
    --set ds.gradient_accumulation_steps=1 --set ds.train_batch_size="${shape[9]}" --set ds.bf16.enabled=true --set save=null
    --set checkpoint_activations=false --set hidden_dropout=0.1 --set attention_dropout=0.1)
  local common=(--vocab "${shape[11]}" --loss-fraction 0.5 --config configs/config_block_tiny.json --args configs/configs_tiny.json --no-search "${sets[@]}")
  echo "-- plan from this device's profile"
  "$launch" plan --profile "$WORK/profile.json" "${common[@]}" | grep -E "model states|peak per|time per|tokens/s" || return 1
  local gpu=""
  if [ "$DEV" != cpu ]; then
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
      *H200*) gpu=h200 ;; *H100*PCIe*) gpu=h100-pcie ;; *H100*) gpu=h100-sxm ;; *A100*80GB*) gpu=a100-80gb ;; *A100*) gpu=a100-40gb ;;
    esac
  fi
  if [ -n "$gpu" ]; then
    echo "-- plan from the table entry $gpu"
    "$launch" plan --gpu "$gpu" "${common[@]}" | grep -E "peak per|time per|tokens/s" || return 1
  fi
  echo "-- measured: ms/it=$(field ms/it "$line") peak_mem_mb=$(field peak_mem_mb "$line") model_states_bytes=$(field model_states_bytes "$line")"
}

generate_step() {
  "$BIN" generate --load "$WORK/ckpt" --text "天下[MASK]，莫柔弱于水。" --max-tokens 16
}

zero_step() {
  local shape=(--iters 10 --warmup 3 --layers 12 --hidden 768 --heads 12 --seq 512 --batch 16 --vocab 30592)
  [ -n "$QUICK" ] && shape=(--iters 2 --warmup 1)
  [ "$DEV" = cpu ] && shape=(--iters 2 --warmup 1 --layers 2 --hidden 64 --heads 2 --seq 64 --batch 2 --vocab 500)
  local fail=0 z
  for z in 0 1 2; do
    echo "-- bench-step bf16, ZeRO stage $z, reduce/allgather buckets of 5e7 elements"
    "$BIN" bench-step --device "$DEV" --precision bf16 --zero-stage "$z" --reduce-bucket-size 50000000 --allgather-bucket-size 50000000 "${shape[@]}" | sed 's/^/  /' || fail=1
  done
  echo "-- stage-2 bf16 training run, checkpoint, resume, inspect"
  local n=20 tiny=()
  [ -n "$QUICK" ] && n=4
  # on the CPU (16-bit matmuls emulated): the tiny model at seq 64
  [ "$DEV" = cpu ] && tiny=(--set num_layers=2 --set hidden_size=64 --set num_attention_heads=2 --set seq_length=64)
  local common=(--config configs/config_block_tiny.json --args configs/configs_tiny.json --device "$DEV" ${tiny[@]+"${tiny[@]}"}
    --set bf16.enabled=true --set zero_optimization.stage=2 --set zero_optimization.reduce_bucket_size=200000
    --set save="$WORK/zero" --set save_interval=$((n / 2)) --set eval_interval=0 --set log_interval=$((n / 2))
    --store "$WORK/store" --tokenizer-cache "$WORK/model")
  "$BIN" "${common[@]}" --set train_iters=$n | tee "$WORK/zero.log" || fail=1
  grep -q "memory: this rank (ZeRO stage 2" "$WORK/zero.log" || { echo "gpu_check: no ZeRO memory report"; fail=1; }
  "$BIN" "${common[@]}" --set train_iters=$((n + n / 2)) --set load="$WORK/zero/$((n / 2))" | grep -E "resumed|iteration +$((n + n / 2))/" || fail=1
  "$BIN" checkpoint inspect "$WORK/zero" || fail=1
  return "$fail"
}

staged_step() { # two ranks on one device, collectives staged through host memory, vs one rank
  local n=6 shape=()
  [ -n "$QUICK" ] && n=4
  [ "$DEV" = cpu ] && shape=(--set num_layers=2 --set hidden_size=64 --set num_attention_heads=2 --set seq_length=64)
  local adam='"optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}}'
  printf '{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 1.0, %s, "bf16": {"enabled": true}}\n' "$adam" >"$WORK/staged_one.json"
  printf '{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, %s, "bf16": {"enabled": true},
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 200000, "allgather_bucket_size": 200000}}\n' "$adam" >"$WORK/staged_dp2.json"
  local common=(--args configs/configs_tiny.json --device "$DEV" ${shape[@]+"${shape[@]}"} --store "$WORK/store" --tokenizer-cache "$WORK/model"
    --set train_iters=$n --set log_interval=1 --set eval_interval=0 --set save_interval=0
    --set hidden_dropout=0 --set attention_dropout=0 --set output_dropout=0)
  # one rank pads the vocabulary to 256, the embedding TP=2 gets from 128 x 2
  "$BIN" --config "$WORK/staged_one.json" "${common[@]}" --set make_vocab_size_divisible_by=256 --set save="$WORK/staged_one" \
    >"$WORK/staged_one.log" 2>&1 || { tail -n 20 "$WORK/staged_one.log"; return 1; }
  # mpirun's PMIx server must not be the singleton's "isolated" one
  local mpi=(env -u OMPI_MCA_pmix -u OMPI_MCA_ess_singleton_isolated "$MPIRUN" -np 2 --oversubscribe --bind-to none -x GLM_COMM_BACKEND=host-staged)
  echo "-- TP=2 on one device"
  GLM_COMM_BACKEND=host-staged "${mpi[@]}" "$BIN" --config "$WORK/staged_one.json" "${common[@]}" --set model_parallel_size=2 \
    --set save="$WORK/staged_tp2" >"$WORK/staged_tp2.log" 2>&1 || { tail -n 20 "$WORK/staged_tp2.log"; return 1; }
  echo "-- DP=2 with ZeRO stage 2 on one device"
  GLM_COMM_BACKEND=host-staged "${mpi[@]}" "$BIN" --config "$WORK/staged_dp2.json" "${common[@]}" --set make_vocab_size_divisible_by=256 \
    --set save="$WORK/staged_dp2" >"$WORK/staged_dp2.log" 2>&1 || { tail -n 20 "$WORK/staged_dp2.log"; return 1; }
  grep -h "^parallel:" "$WORK/staged_tp2.log" "$WORK/staged_dp2.log"
  grep -q "host memory over MPI" "$WORK/staged_dp2.log" || { echo "gpu_check: the DP=2 run does not report staged collectives"; return 1; }
  grep -q "memory: this rank (ZeRO stage 2" "$WORK/staged_dp2.log" || { echo "gpu_check: the DP=2 run did not run ZeRO stage 2"; return 1; }
  "$PY" - "$WORK" <<'PYEOF'
import json, sys
work = sys.argv[1]
def losses(name):
    with open(f"{work}/{name}/metrics.jsonl") as f:
        return [e["loss"] for e in map(json.loads, f) if e.get("type") == "train"]
one = losses("staged_one")
ok = bool(one)
for name in ("staged_tp2", "staged_dp2"):
    other = losses(name)
    worst = max((abs(a - b) / a for a, b in zip(one, other)), default=float("inf"))
    good = len(other) == len(one) and worst <= 1e-3
    ok &= good
    print(f"  {name[7:].upper()} vs one rank over {len(one)} iterations: largest relative loss difference {worst:.2e} (tolerance 1e-3): {'ok' if good else 'FAIL'}")
print("  losses, one rank:", " ".join(f"{x:.5f}" for x in one))
sys.exit(0 if ok else 1)
PYEOF
}

timeout_step() { # the collective deadline on the device: one of two host-staged ranks frozen
  # NCCL refuses two ranks on one GPU, so the ranks stage their collectives
  # through host memory over MPI (as step 9), with CUDA tensors: rank 1
  # stops itself (SIGSTOP) at iteration 3, rank 0 waits in its collective,
  # and its watchdog must stop the job at the deadline, naming the operation
  local shape=()
  [ "$DEV" = cpu ] && shape=(--set num_layers=2 --set hidden_size=64 --set num_attention_heads=2 --set seq_length=64)
  printf '{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "bf16": {"enabled": true}}\n' >"$WORK/timeout.json"
  local mpi=(env -u OMPI_MCA_pmix -u OMPI_MCA_ess_singleton_isolated "$MPIRUN" -np 2 --oversubscribe --bind-to none
    -x GLM_COMM_BACKEND=host-staged -x GLM_TEST_FAULT=stop:1:3 -x GLM_TEST_FAULT_MARK="$WORK/timeout.fired")
  local t0=$SECONDS
  GLM_COMM_BACKEND=host-staged "${mpi[@]}" "$BIN" --config "$WORK/timeout.json" --args configs/configs_tiny.json --device "$DEV" ${shape[@]+"${shape[@]}"} \
    --store "$WORK/store" --tokenizer-cache "$WORK/model" --collective-timeout 10 --set train_iters=20 --set log_interval=1 --set eval_interval=0 \
    --set save=null >"$WORK/timeout.log" 2>&1
  local rc=$? took=$((SECONDS - t0))
  grep -h "collective timeout" "$WORK/timeout.log"
  echo "  mpirun exited $rc after $took s (the fault fired: $([ -f "$WORK/timeout.fired" ] && echo yes || echo no))"
  [ "$rc" != 0 ] && [ -f "$WORK/timeout.fired" ] && grep -q "collective timeout: .* on group .* past --collective-timeout 10 s" "$WORK/timeout.log" \
    || { tail -n 20 "$WORK/timeout.log"; return 1; }
}

step "environment" env_step
step "NCCL world of one on $DEV (comm-check)" "$BIN" comm-check --device "$DEV" --mib 1,64,512 --iters 20
step "training on $DEV ($ITERS iterations, checkpoint, resume)" train_step
step "training step vs eager PyTorch on $DEV" bench_step
SHAPE="GLM-Large shape"; [ -n "$QUICK" ] && SHAPE="default shape (quick)"; [ "$DEV" = cpu ] && SHAPE="tiny CPU shape"
step "mixed precision at $SHAPE vs eager PyTorch autocast on $DEV" mixed_step
step "bf16 training run of configs/config_block_large.json on $DEV$([ "$DEV" = cpu ] && echo ", tiny model")" train_bf16_step
step "the planner vs the measured bf16 step on $DEV (profile and table entry)" plan_step
step "generation from the checkpoint (device auto)" generate_step
step "ZeRO stages 0/1/2 on $DEV (world of one: NCCL group of one)" zero_step
step "two ranks on one $DEV, collectives staged through host memory: TP=2, DP=2 ZeRO-2, bf16 vs one rank" staged_step
step "collective deadline on one $DEV: two host-staged ranks, one frozen, --collective-timeout 10" timeout_step

echo; echo "=== summary"
printf '%s\n' "${RESULTS[@]}"
! printf '%s\n' "${RESULTS[@]}" | grep -q '^FAIL'
