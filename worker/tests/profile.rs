//! `bench-step --profile-out` (the device profile the planner reads) and
//! `bench-step --tp` (tensor parallelism under mpirun), on a tiny model.

use std::process::Command;

use glm_common::plan::profile::{Dtype, Profile};

mod common;
use common::{mpirun, ok};

/// bench-step on the tiny model: 1 layer, hidden 64, `heads` heads, seq
/// 32, micro-batch 2, vocabulary `vocab`, one timed step.
fn tiny(heads: &str, vocab: &str) -> Vec<String> {
    let args =
        ["bench-step", "--iters", "1", "--warmup", "0", "--layers", "1", "--hidden", "64", "--heads", heads, "--seq", "32", "--batch", "2", "--vocab", vocab];
    args.iter().map(|s| s.to_string()).collect()
}

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-worker"));
    c.env("OMP_NUM_THREADS", "1");
    c
}

/// The value of `key=` on bench-step's result line.
fn field<'a>(out: &'a str, key: &str) -> &'a str {
    let line = out.lines().find(|l| l.starts_with("rust device=")).unwrap_or_else(|| panic!("no result line:\n{out}"));
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')).unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// Model-state bytes of the tiny model in fp32 at ZeRO stage 0 on one
/// tensor-parallel rank of `tp`: 16 bytes per parameter (fp32 weight,
/// gradient, two AdamW moments), the flat buffer padded to 64 elements.
fn tiny_model_states(tp: u64) -> u64 {
    let (h, v, rows) = (64, 256, 33); // position tables: seq + 1 rows
    let embeddings = v / tp * h + 2 * rows * h; // word (split by rows), position, block position
    let layernorm = 2 * h;
    let layer = layernorm // input_layernorm
        + 3 * h / tp * h + 3 * h / tp // query_key_value (column split)
        + h * (h / tp) + h // attention.dense (row split, bias whole)
        + layernorm // post_attention_layernorm
        + 4 * h / tp * h + 4 * h / tp // dense_h_to_4h (column split)
        + h * (4 * h / tp) + h; // dense_4h_to_h (row split, bias whole)
    let numel = embeddings + layer + layernorm; // + final_layernorm
    numel.div_ceil(64) * 64 * 16
}

#[test]
fn a_tiny_run_writes_a_profile_the_planner_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cpu.json");
    let t = std::time::Instant::now();
    let out = ok(&worker().args(tiny("2", "256")).arg("--profile-out").arg(&path).output().unwrap());
    eprintln!("{out}({:.1} s)", t.elapsed().as_secs_f64());
    assert!(out.contains(&format!("profile written: {}", path.display())), "{out}");
    assert!(!dir.path().join("cpu.json.tmp").exists(), "the temporary was renamed");
    assert_eq!(field(&out, "model_states_bytes"), tiny_model_states(1).to_string());
    assert_eq!((field(&out, "tp"), field(&out, "dp"), field(&out, "bucket_peak_bytes")), ("1", "1", "0"));
    assert!(field(&out, "peak_rss_rank0_mb").parse::<f64>().unwrap() > 0.0);
    assert_eq!(field(&out, "peak_rss_rank0_mb"), field(&out, "peak_mem_mb"), "one rank: its peak is the largest");

    let p = Profile::load(&path).unwrap();
    assert_eq!((p.kind.as_str(), p.threads), ("cpu", 1));
    assert!(!p.device.is_empty());
    assert!(p.baseline_bytes > 0 && p.baseline_bytes < p.memory_bytes, "baseline {} of {}", p.baseline_bytes, p.memory_bytes);
    for d in [Dtype::Fp32, Dtype::Bf16] {
        let g: Vec<_> = p.gemm.iter().filter(|g| g.dtype == d).collect();
        // the model's own shapes: m = 2 × 32 tokens (the logits: the 32 loss positions)
        for (m, n, k) in [(64, 192, 64), (64, 64, 64), (64, 256, 64), (64, 64, 256), (32, 256, 64)] {
            assert!(g.iter().any(|g| (g.m, g.n, g.k) == (m, n, k)), "{d:?} {m}x{n}x{k}: {g:?}");
        }
        // squares up to 4× the largest dimension (256)
        assert!(g.iter().any(|g| (g.m, g.n, g.k) == (256, 256, 256)), "{g:?}");
        assert!(!g.iter().any(|g| g.m == 2048), "{g:?}");
        let a: Vec<_> = p.attention.iter().filter(|a| a.dtype == d).collect();
        assert_eq!(a.iter().map(|a| a.dropout).collect::<Vec<_>>(), [false, true], "bench-step's default dropout 0.1: both kernels");
        assert!(a.iter().all(|a| (a.batch, a.heads, a.seq, a.head_dim) == (2, 2, 32, 32) && a.saved_bytes_per_score.is_none()), "{a:?}");
        assert!(p.elementwise_gbps[d.name()] > 0.0, "{:?}", p.elementwise_gbps);
    }
    assert!(p.gemm.iter().all(|g| g.tflops > 0.0 && g.tflops.is_finite()), "{:?}", p.gemm);
    assert!(p.attention.iter().all(|a| a.tflops > 0.0 && a.tflops.is_finite()), "{:?}", p.attention);
    assert!(p.collectives.is_empty(), "alone: no collectives");
    assert!(p.command.contains("bench-step") && p.command.contains("--profile-out"), "{}", p.command);
    assert!(p.created.len() == 20 && p.created.ends_with('Z'), "{}", p.created);
}

#[test]
fn tensor_parallel_ranks_split_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tp2.json");
    let worker = env!("CARGO_BIN_EXE_glm-worker");
    let out = ok(&mpirun(2).arg(worker).args(tiny("2", "256")).args(["--tp", "2", "--profile-out"]).arg(&path).output().unwrap());
    eprintln!("{out}");
    assert_eq!((field(&out, "tp"), field(&out, "dp")), ("2", "1"));
    assert_eq!(field(&out, "model_states_bytes"), tiny_model_states(2).to_string());
    assert!(tiny_model_states(2) < tiny_model_states(1));
    // rank 0's profile: the split model's shapes, an all-reduce over both
    // ranks, half the host's memory per rank
    let p = Profile::load(&path).unwrap();
    assert!(p.gemm.iter().any(|g| (g.m, g.n, g.k) == (64, 96, 64)), "the query_key_value split over 2: {:?}", p.gemm);
    assert!(p.gemm.iter().any(|g| (g.m, g.n, g.k) == (32, 128, 64)), "the logits of half the vocabulary: {:?}", p.gemm);
    assert!(p.attention.iter().all(|a| a.heads == 1), "{:?}", p.attention);
    assert_eq!(p.collectives.len(), 1, "{:?}", p.collectives);
    let c = &p.collectives[0];
    assert!(c.op == "all_reduce" && c.ranks == 2 && c.bytes == 64 << 20 && c.bus_gbps > 0.0, "{c:?}");
    let kb = |key: &str| {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap()))
            .unwrap_or(0)
    };
    assert_eq!(p.memory_bytes, (kb("MemTotal:") + kb("SwapTotal:")) * 1024, "the host's RAM and swap, whole (the planner shares it out)");

    // a split that does not divide: one clear error
    let o = mpirun(2).arg(worker).args(tiny("1", "256")).args(["--tp", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("glm-worker: error: --tp 2: num_attention_heads 1 is not divisible by model_parallel_size 2 (world 2 = tp 2 × dp 1)"), "{err}");
    let o = mpirun(2).arg(worker).args(tiny("2", "255")).args(["--tp", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("glm-worker: error: --tp 2: --vocab 255 is not divisible by model_parallel_size 2 (world 2 = tp 2 × dp 1)"), "{err}");
    // alone: no group of 2
    let o = Command::new(worker).env("OMP_NUM_THREADS", "1").args(tiny("2", "256")).args(["--tp", "2"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("glm-worker: error: --tp 2: 1 rank(s) do not form groups of 2 (run under mpirun -np <a multiple of 2>)"), "{err}");
}
