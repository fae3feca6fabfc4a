#!/usr/bin/env python3
"""The planner against measured runs on this machine: glm-launch plan's
model states, peak memory and step time next to glm-worker bench-step's
measurements of the same layouts, side by side.

    python3 bench/plan_grid.py [--iters 8] [--profile FILE] [--mmap] [--only I ...]

First it measures this machine's profile (glm-worker bench-step
--profile-out, one thread: every run of the grid gives each rank one
thread), unless --profile names one. Then, for each layout of the grid
(two model shapes: the default one, 4 × 256, and GLM-Base's width, 2 × 768,
reduced to fit 2 cores; TP 1/2, DP 1/2, ZeRO 0/1/2, fp32/bf16,
checkpointing on/off, micro-batch 2-16), it runs bench-step (under mpirun
for 2 ranks) and glm-launch plan --json with the same shape, and prints:
model-state bytes (exact: the worker's buffers), peak resident memory of
rank 0 (target within 15%), and ms per step (the median of the timed
steps; target within 25%).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "target/release/glm-launch")
WORKER = os.path.join(ROOT, "target/release/glm-worker")

# (name, layers, hidden, heads, seq)
SHAPES = {"default": (4, 256, 4, 128), "base": (2, 768, 12, 256)}
# a multiple of make_vocab_size_divisible_by (128): bench-step does not pad
VOCAB = 16000
assert VOCAB % 128 == 0

# (shape, precision, tp, dp, zero, micro, checkpointing)
GRID = [
    ("default", "fp32", 1, 1, 0, 2, False),
    ("default", "fp32", 1, 1, 0, 8, False),
    ("default", "fp32", 1, 1, 0, 16, False),
    ("default", "fp32", 1, 1, 0, 16, True),
    ("default", "bf16", 1, 1, 0, 2, False),
    ("default", "fp32", 2, 1, 0, 8, False),
    ("default", "fp32", 1, 2, 0, 8, False),
    ("default", "fp32", 1, 2, 1, 8, False),
    ("default", "fp32", 1, 2, 2, 8, False),
    ("default", "bf16", 1, 2, 2, 2, False),
    ("base", "fp32", 1, 1, 0, 2, False),
    ("base", "fp32", 1, 1, 0, 4, True),
    ("base", "fp32", 2, 1, 0, 4, False),
    ("base", "fp32", 1, 2, 1, 2, False),
]


MMAP = False


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if MMAP:
        # every allocation of 64 kB or more its own mapping, returned at once:
        # the resident set is what is alive, without the heap's retention
        e["MALLOC_MMAP_THRESHOLD_"] = "65536"
    return e


def fields(line):
    return dict(kv.split("=", 1) for kv in line.split() if "=" in kv)


def bench_args(shape, prec, tp, micro, ckpt, iters):
    layers, hidden, heads, seq = SHAPES[shape]
    a = ["bench-step", "--threads", "1", "--iters", str(iters), "--warmup", "2", "--layers", str(layers), "--hidden", str(hidden),
         "--heads", str(heads), "--seq", str(seq), "--batch", str(micro), "--vocab", str(VOCAB), "--precision", prec, "--tp", str(tp)]
    if ckpt:
        a.append("--checkpoint-activations")
    return a


def measure(shape, prec, tp, dp, zero, micro, ckpt, iters):
    a = bench_args(shape, prec, tp, micro, ckpt, iters) + ["--zero-stage", str(zero)]
    np_ = tp * dp
    cmd = [WORKER] + a if np_ == 1 else ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", WORKER] + a
    out = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("rust ")), None)
    if out.returncode != 0 or line is None:
        sys.exit(f"bench-step failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    return fields(line)


def plan(shape, prec, tp, dp, zero, micro, ckpt, profile):
    layers, hidden, heads, seq = SHAPES[shape]
    sets = [f"num_layers={layers}", f"hidden_size={hidden}", f"num_attention_heads={heads}", f"seq_length={seq}",
            f"max_position_embeddings={seq}", "hidden_dropout=0.1", "attention_dropout=0.1", "save=null",
            f"model_parallel_size={tp}", f"ds.train_micro_batch_size_per_gpu={micro}", "ds.gradient_accumulation_steps=1",
            f"ds.train_batch_size={micro * dp}", f"ds.zero_optimization.stage={zero}",
            f"checkpoint_activations={'true' if ckpt else 'false'}", "checkpoint_num_layers=1"]
    if prec == "bf16":
        sets.append("ds.bf16.enabled=true")
    cmd = [LAUNCH, "plan", "--profile", profile, "--nodes", "1", "--gpus-per-node", str(tp * dp), "--vocab", str(VOCAB),
           "--loss-fraction", "0.5", "--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json",
           "--no-search", "--json"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"glm-launch plan failed: {' '.join(cmd)}\n{out.stderr}")
    return json.loads(out.stdout)["plan"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--profile")
    ap.add_argument("--mmap", action="store_true", help="run the steps with MALLOC_MMAP_THRESHOLD_=65536 (what is alive, without glibc's heap retention)")
    ap.add_argument("--only", type=int, nargs="*", help="grid rows to run (0-based)")
    a = ap.parse_args()
    global MMAP
    MMAP = a.mmap
    tmp = tempfile.mkdtemp()
    profile = a.profile
    if profile is None:
        profile = os.path.join(tmp, "profile.json")
        # the default shape's GEMMs at micro-batch 8 and the square sizes;
        # two ranks, for the all-reduce's bandwidth (measured with glibc's
        # default allocator)
        mmap, MMAP = MMAP, False
        out = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", WORKER]
                             + bench_args("default", "fp32", 1, 8, False, 2) + ["--profile-out", profile],
                             cwd=ROOT, env=env(), capture_output=True, text=True)
        MMAP = mmap
        if out.returncode != 0:
            sys.exit(f"profile failed:\n{out.stdout}\n{out.stderr}")
        print(f"profile: {profile}", file=sys.stderr)
    rows = []
    worst = {"mem": (0, None), "time": (0, None)}
    for i, g in enumerate(GRID):
        if a.only and i not in a.only:
            continue
        shape, prec, tp, dp, zero, micro, ckpt = g
        m = measure(shape, prec, tp, dp, zero, micro, ckpt, a.iters)
        p = plan(shape, prec, tp, dp, zero, micro, ckpt, profile)
        states_m, states_p = int(m["model_states_bytes"]), p["memory"]["states"]["total"]
        peak_m, peak_p = float(m["peak_rss_rank0_mb"]), p["memory"]["peak"] / 1e6
        if MMAP:
            # against what is alive: the plan without its allocator overhead
            peak_p -= p["memory"]["fragmentation"] / 1e6
        ms_m, ms_p = float(m["ms_median"]), p["speed"]["step_s"] * 1e3
        dmem, dtime = peak_p / peak_m - 1, ms_p / ms_m - 1
        name = f"{shape} {prec} tp{tp} dp{dp} z{zero} mb{micro}{' ckpt' if ckpt else ''}"
        for k, d in (("mem", dmem), ("time", dtime)):
            if abs(d) > abs(worst[k][0]):
                worst[k] = (d, name)
        rows.append((name, states_m, states_p, peak_m, peak_p, dmem, ms_m, ms_p, dtime))
        print(f"  {name}: states {states_m} / {states_p}, peak {peak_m:.0f} / {peak_p:.0f} MB ({dmem:+.0%}), "
              f"step {ms_m:.1f} / {ms_p:.1f} ms ({dtime:+.0%})", file=sys.stderr, flush=True)
    head = "| layout | model states, measured / planned (bytes) | peak resident MB, measured / planned | | ms per step, measured / planned | |"
    print(head)
    print("|---|---|---|---|---|---|")
    for (name, sm, sp, pm, pp, dm, tm, tp_, dt) in rows:
        same = "equal" if sm == sp else f"{sp - sm:+d}"
        print(f"| {name} | {sm:,} / {sp:,} ({same}) | {pm:.0f} / {pp:.0f} | {dm:+.0%} | {tm:.1f} / {tp_:.1f} | {dt:+.0%} |")
    exact = sum(1 for r in rows if r[1] == r[2])
    within_mem = sum(1 for r in rows if abs(r[5]) <= 0.15)
    within_time = sum(1 for r in rows if abs(r[8]) <= 0.25)
    print(f"\nmodel states exact in {exact}/{len(rows)}; peak memory within 15% in {within_mem}/{len(rows)} "
          f"(furthest: {worst['mem'][1]}, {worst['mem'][0]:+.0%}); step time within 25% in {within_time}/{len(rows)} "
          f"(furthest: {worst['time'][1]}, {worst['time'][0]:+.0%})")


if __name__ == "__main__":
    main()
