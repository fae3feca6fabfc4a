//! ZeRO stages 1 and 2 against stage 0, in one process: the ranks are
//! threads (`comm::local`), so these parity tests take seconds. Real
//! `mpirun` worlds run the same code in `tests/parallel.rs`.
//!
//! Every run trains the same small dropout-free GLM on the same synthetic
//! global batch (split over the data-parallel ranks), with gradient
//! accumulation and active clipping, and reports per rank its losses,
//! gradient norms, the fp32 weights (gathered on data-parallel rank 0),
//! the bytes it holds and the bytes it sent.

use std::path::Path;
use std::sync::Mutex;

mod common;

use glm_worker::checkpoint::{self, State};
use glm_worker::comm::local::run_ranks;
use glm_worker::model::glm::{Batch, Glm, GlmConfig};
use glm_worker::optim::adamw::AdamWConfig;
use glm_worker::optim::optimizer::{MemoryBytes, OptimConfig, Optimizer, Precision};
use glm_worker::optim::scaler::{DynamicKeys, ScalerConfig, ScalerRules};
use glm_worker::optim::zero::ZeroConfig;
use glm_worker::parallel::Parallel;
use glm_worker::train::build::{build, Recipe};
use glm_worker::train::step::{train_step, StepPlan};
use tch::{Device, Tensor};

const SEQ: i64 = 32;
const VOCAB: usize = 256;
/// Clipping threshold: below the gradient norms of these steps, so every
/// step is clipped.
const CLIP: f64 = 0.05;

fn model_cfg() -> GlmConfig {
    common::small_glm(SEQ, VOCAB)
}

#[derive(Clone, Copy)]
struct Setup {
    world: usize,
    tp: usize,
    stage: u8,
    precision: Precision,
    /// Micro-batches per step.
    accum: usize,
    /// Samples of one global micro-batch (over all data-parallel ranks).
    global_micro: usize,
    /// ZeRO's buckets, in elements.
    bucket: i64,
    allgather: i64,
    /// Layers per recomputed chunk (activation checkpointing); 0 = off.
    ckpt: usize,
}

impl Setup {
    fn new(world: usize, tp: usize, stage: u8) -> Self {
        Setup { world, tp, stage, precision: Precision::Fp32, accum: 2, global_micro: 4, bucket: 3000, allgather: 1000, ckpt: 0 }
    }
    fn dp(&self) -> usize {
        self.world / self.tp
    }
}

struct RankOut {
    losses: Vec<f64>,
    norms: Vec<f64>,
    /// Steps skipped for overflow (fp16).
    skipped: u64,
    /// The fp32 weights of this rank's tensor-parallel part (data-parallel rank 0).
    weights: Option<Tensor>,
    mem: MemoryBytes,
    /// Bytes sent through the rank's groups during the steps.
    sent: u64,
    tp_rank: usize,
}

/// Sample `i` of the synthetic corpus: random tokens, Part A the first
/// half, the loss on Part B.
fn batch(indices: std::ops::Range<u64>) -> Batch {
    common::random_batch(indices.map(|i| 1000 + i), SEQ, VOCAB, SEQ / 2)
}

fn optim_cfg(s: &Setup) -> OptimConfig {
    // fp16: 2^16 and no hysteresis on either path, so that stages 0 and 2
    // scale alike (DeepSpeed's defaults differ by stage: 2^16 / 2^32)
    let keys = DynamicKeys { initial_scale_power: Some(16), hysteresis: Some(1), ..Default::default() };
    OptimConfig {
        zero: ZeroConfig { stage: s.stage, reduce_bucket_size: s.bucket, allgather_bucket_size: s.allgather, overlap_comm: true },
        scaler: (s.precision == Precision::Fp16).then(|| ScalerConfig::resolve(0.0, &keys, ScalerRules::for_stage(s.stage))),
        ..OptimConfig::new(s.precision, AdamWConfig::GLM, CLIP)
    }
}

/// What every rank trains with `s`.
fn recipe(s: &Setup) -> Recipe {
    Recipe { checkpoint_num_layers: s.ckpt, ..Recipe::new(model_cfg(), optim_cfg(s), 7) }
}

/// Every rank's layout, model and optimizer, built one after another as
/// training builds them (initialisation draws from libtorch's global
/// generator).
fn ranks(s: &Setup) -> Vec<Mutex<Option<(Parallel, Glm, Optimizer)>>> {
    let pars = Parallel::local(s.world, s.tp).unwrap();
    pars.into_iter()
        .map(|p| {
            let (model, opt) = build(&recipe(s), &p, Device::Cpu).unwrap();
            Mutex::new(Some((p, model, opt)))
        })
        .collect()
}

/// Steps `from..to` of the run (1-based), on an existing rank.
fn steps(s: &Setup, par: &Parallel, model: &mut Glm, opt: &mut Optimizer, from: u64, to: u64) -> (Vec<f64>, Vec<f64>) {
    let micro = (s.global_micro / s.dp()) as u64;
    let dp_rank = par.dims.dp_rank() as u64;
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for step in from..to {
        let plan = StepPlan { it_seed: step as i64, accum: s.accum, lr: 2e-3, norm: Default::default() };
        let out = train_step(model, opt, par, plan, &mut |m| {
            let first = ((step * s.accum as u64 + m as u64) * s.global_micro as u64) + dp_rank * micro;
            Ok(batch(first..first + micro))
        })
        .unwrap();
        losses.push(out.loss);
        norms.push(out.stats.grad_norm);
    }
    (losses, norms)
}

fn train(s: Setup, n: u64) -> Vec<RankOut> {
    run_from(s, None, 0, n, None)
}

/// max |a - b| / max |a|.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / a.abs().max().double_value(&[])
}

fn assert_same_run(a: &[RankOut], b: &[RankOut], rel: f64, what: &str) {
    for (x, y) in a.iter().zip(b) {
        for (i, (la, lb)) in x.losses.iter().zip(&y.losses).enumerate() {
            assert!((la - lb).abs() <= rel * la.abs(), "{what}: step {} loss {la} vs {lb}", i + 1);
        }
        // (a skipped fp16 step's norm is the rank's own view of the overflow)
        for (i, (na, nb)) in x.norms.iter().zip(&y.norms).enumerate().filter(|(_, (a, b))| a.is_finite() && b.is_finite()) {
            assert!((na - nb).abs() <= rel * na.abs(), "{what}: step {} gradient norm {na} vs {nb}", i + 1);
        }
    }
    for tp_rank in 0..a.iter().map(|o| o.tp_rank + 1).max().unwrap() {
        let wa = a.iter().find(|o| o.tp_rank == tp_rank && o.weights.is_some()).unwrap().weights.as_ref().unwrap();
        let wb = b.iter().find(|o| o.tp_rank == tp_rank && o.weights.is_some()).unwrap().weights.as_ref().unwrap();
        let d = rel_diff(wa, wb);
        let dl = a.iter().zip(b).flat_map(|(x, y)| x.losses.iter().zip(&y.losses).map(|(p, q)| (p - q).abs() / p.abs())).fold(0.0, f64::max);
        eprintln!("{what}: tensor-parallel rank {tp_rank}: losses differ by {dl:e}, weights by {d:e} (relative)");
        assert!(d <= rel, "{what}: tensor-parallel rank {tp_rank}: weights differ by {d:e} (relative to the largest weight)");
    }
}

#[test]
fn stages_one_and_two_match_stage_zero_with_accumulation_and_clipping() {
    let _lock = glm_worker_test_lock();
    let base = train(Setup::new(2, 1, 0), 4);
    assert!(base[0].norms.iter().all(|&n| n > CLIP), "clipping active: {:?}", base[0].norms);
    assert!(base[0].losses[3] < base[0].losses[0], "it learns: {:?}", base[0].losses);
    let s1 = train(Setup::new(2, 1, 1), 4);
    let s2 = train(Setup::new(2, 1, 2), 4);
    assert_same_run(&base, &s1, 1e-6, "stage 1 vs stage 0");
    assert_same_run(&base, &s2, 1e-6, "stage 2 vs stage 0");
    // the same result with buckets larger than the model (one unit) and
    // the reduce-scatter order of a single bucket
    let big = train(Setup { bucket: 1 << 30, allgather: 1 << 30, ..Setup::new(2, 1, 2) }, 4);
    assert_same_run(&base, &big, 1e-6, "stage 2, one bucket");

    // measured: optimizer state at stages 1/2 and gradients at stage 2 are
    // 1/dp of stage 0's (the flat buffers are padded to a multiple of 64·dp)
    for (s0, s1, s2) in base.iter().zip(&s1).zip(&s2).map(|((a, b), c)| (a.mem, b.mem, c.mem)) {
        assert_eq!(s1.optimizer, s0.optimizer / 2, "stage 1 optimizer bytes");
        assert_eq!(s2.optimizer, s0.optimizer / 2, "stage 2 optimizer bytes");
        assert_eq!(s2.grads, s0.grads / 2, "stage 2 gradient bytes (the fp32 shard; buckets freed after backward)");
        assert_eq!((s1.params, s2.params), (s0.params, s0.params), "parameters stay whole");
        assert!(s2.bucket_peak > 0 && s2.bucket_peak < s0.grads / 4, "stage 2 held at most a few buckets at once: {} bytes", s2.bucket_peak);
    }
    // communicated: reduce-scatter + all-gather move what one all-reduce
    // moves (stage 2 reduce-scatters every micro-batch: accum times)
    let sent = |o: &[RankOut]| o[0].sent as f64;
    eprintln!(
        "bytes sent by rank 0 in 4 steps: stage 0 {}, stage 1 {}, stage 2 {}; model states held: {:?} / {:?} / {:?}",
        sent(&base),
        sent(&s1),
        sent(&s2),
        base[0].mem,
        s1[0].mem,
        s2[0].mem
    );
    assert!((sent(&s1) / sent(&base) - 1.0).abs() < 0.02, "stage 1 sent {} bytes, stage 0 {}", sent(&s1), sent(&base));
    let grad_bytes = base[0].mem.grads as f64; // the fp32 gradient buffer
    let per_step_rs = grad_bytes / 2.0; // (p-1)/p of the buffer, p = 2
    let expected2 = sent(&base) + 4.0 * per_step_rs * (2.0 - 1.0);
    assert!((sent(&s2) / expected2 - 1.0).abs() < 0.02, "stage 2 sent {} bytes, expected about {expected2}", sent(&s2));
}

#[test]
fn tensor_and_data_parallel_stages_match_stage_zero() {
    let _lock = glm_worker_test_lock();
    let base = train(Setup::new(4, 2, 0), 3);
    for stage in [1, 2] {
        let z = train(Setup::new(4, 2, stage), 3);
        assert_same_run(&base, &z, 1e-6, &format!("TP=2 × DP=2, stage {stage} vs stage 0"));
    }
    // stage 2's hooks also fire inside activation recomputation (a nested
    // backward per chunk of layers)
    let ck = |stage: u8| Setup { ckpt: 1, ..Setup::new(4, 2, stage) };
    assert_same_run(&train(ck(0), 3), &train(ck(2), 3), 1e-6, "TP=2 × DP=2 with activation checkpointing, stage 2 vs stage 0");
    // and stage 0 at TP=2 × DP=2 is one process with the whole batch
    let one = train(Setup { world: 2, tp: 2, global_micro: 4, ..Setup::new(2, 2, 0) }, 3);
    for (a, b) in base[0].losses.iter().zip(&one[0].losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "DP=2 vs DP=1: {a} vs {b}");
    }
}

/// bf16 with stage 2 at DP=2 against one bf16 process: the buckets are
/// reduced in bf16 (as DeepSpeed does: half the bytes), so each summed
/// gradient is rounded to bf16 once more than in one process; losses agree
/// within 1e-3 relative and the fp32 master weights within 1e-2 of the
/// largest weight.
#[test]
fn bf16_stage_two_matches_one_bf16_process() {
    let _lock = glm_worker_test_lock();
    let bf = |world: usize, stage: u8| Setup { precision: Precision::Bf16, ..Setup::new(world, 1, stage) };
    let one = train(bf(1, 0), 4);
    let two = train(bf(2, 2), 4);
    for (a, b) in one[0].losses.iter().zip(&two[0].losses) {
        assert!((a - b).abs() <= 1e-3 * a.abs(), "bf16 stage 2 DP=2 vs one process: loss {a} vs {b}");
    }
    let d = rel_diff(one[0].weights.as_ref().unwrap(), two[0].weights.as_ref().unwrap());
    eprintln!("bf16 stage 2 DP=2 vs one bf16 process: losses {:?} vs {:?}, weights differ by {d:e}", one[0].losses, two[0].losses);
    assert!(d <= 1e-2, "bf16 stage 2 master weights differ by {d:e}");
    // masters and moments sharded: 12 bytes per parameter over 2 ranks
    assert_eq!(two[0].mem.optimizer, one[0].mem.optimizer / 2);
}

/// fp16 with sharded gradients: an inf that only data-parallel rank 1
/// sees (written into its gradient shard after the reduction) skips the
/// step on every rank, as at stage 0, and the runs stay identical.
#[test]
fn fp16_overflow_on_one_shard_skips_the_step_everywhere() {
    let _lock = glm_worker_test_lock();
    let fp16 = |stage: u8| Setup { precision: Precision::Fp16, ..Setup::new(2, 1, stage) };
    // read when the optimizers are made; this file's tests run one at a time
    std::env::set_var("GLM_INJECT_INF_GRAD", "1:2");
    let runs: Vec<Vec<RankOut>> = [0, 2].iter().map(|&z| train(fp16(z), 4)).collect();
    std::env::remove_var("GLM_INJECT_INF_GRAD");
    for (z, r) in [0, 2].iter().zip(&runs) {
        assert_eq!((r[0].skipped, r[1].skipped), (1, 1), "stage {z}: every rank skipped step 2");
    }
    assert_same_run(&runs[0], &runs[1], 1e-3, "fp16 stage 2 vs stage 0 with an overflow on rank 1");
}

fn state(iteration: u64, dp: usize) -> State {
    State {
        schedule_start: 0,
        format_version: checkpoint::FORMAT_VERSION,
        iteration,
        consumed_samples: 0,
        mode_group: 0,
        optimizer_step: 0,
        skipped_steps: 0,
        precision: Precision::Fp32,
        loss_scaler: None,
        model: model_cfg(),
        tp: 1,
        dp,
        zero: None,
        has_optimizer: false,
        imported_from: None,
        first_sample: 0,
        tokenizer_sha256: "synthetic".into(),
        deepspeed_config: serde_json::json!({}),
        args: serde_json::json!({}),
        files: Default::default(),
    }
}

/// Trains `n` steps with `s` from scratch, or from the checkpoint `load`
/// at iteration `from`; saves the end under `save` when given. The bytes
/// sent and held are those of the steps.
fn run_from(s: Setup, load: Option<&Path>, from: u64, n: u64, save: Option<&Path>) -> Vec<RankOut> {
    let jobs = ranks(&s);
    run_ranks(s.world, |r| {
        let (par, mut model, mut opt) = jobs[r].lock().unwrap().take().unwrap();
        if let Some(dir) = load {
            let mut dir = checkpoint::resolve(dir).unwrap();
            if let Some(g) = &par.tp {
                dir = dir.join(checkpoint::mp_rank_dir(g.rank));
            }
            let st = checkpoint::read_state(&dir).unwrap();
            checkpoint::load(&dir, &st, &mut model, &mut opt, true).unwrap();
        }
        let before = par.bytes_sent();
        let (losses, norms) = steps(&s, &par, &mut model, &mut opt, from + 1, from + n + 1);
        let sent = par.bytes_sent() - before;
        // measured after the steps, before a save's transient buffers
        let mem = opt.memory(&model.params);
        if let Some(dir) = save {
            let st = State { tp: par.dims.tp, ..state(from + n, par.dims.dp) };
            checkpoint::save(dir, &model, &opt, &par, true, "{}", st).unwrap();
        }
        let weights = opt.full_weights(&model.params).unwrap().map(|w| w.narrow(0, 0, model.params.numel()).copy());
        RankOut { losses, norms, skipped: opt.skipped_steps(), weights, mem, sent, tp_rank: par.dims.tp_rank() }
    })
}

#[test]
fn resume_continues_bitwise_with_the_same_layout_and_within_1e6_resharded() {
    let _lock = glm_worker_test_lock();
    let d = tempfile::tempdir().unwrap();
    let saved = d.path().join("s2dp2");
    let s2 = Setup::new(2, 1, 2);
    let whole = run_from(s2, None, 0, 5, None);
    run_from(s2, None, 0, 2, Some(&saved));
    assert!(saved.join("2").join(checkpoint::shard_file(1)).is_file(), "one optimizer shard per data-parallel rank");
    // the same layout: bitwise
    let same = run_from(s2, Some(&saved), 2, 3, None);
    assert_eq!(same[0].losses, whole[0].losses[2..].to_vec(), "stage 2 DP=2 resumed at DP=2");
    assert!(same[0].weights.as_ref().unwrap().equal(whole[0].weights.as_ref().unwrap()), "final weights bitwise");
    // re-partitioned: DP 2 -> 1 (stage 0), DP 2 -> 4, stage 2 -> 1
    for (what, s) in [("DP=1 stage 0", Setup::new(1, 1, 0)), ("DP=4 stage 2", Setup::new(4, 1, 2)), ("DP=2 stage 1", Setup::new(2, 1, 1))] {
        let r = run_from(s, Some(&saved), 2, 3, None);
        for (a, b) in whole[0].losses[2..].iter().zip(&r[0].losses) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{what}: loss {a} vs uninterrupted {b}");
        }
        let dw = rel_diff(whole[0].weights.as_ref().unwrap(), r[0].weights.as_ref().unwrap());
        assert!(dw <= 1e-6, "{what}: final weights differ by {dw:e}");
    }
}

/// `checkpoint merge --with-optimizer` of a TP=2 × DP=2 stage-2 checkpoint
/// (two tensor-parallel parts of two shards each) resumes in one process
/// on the uninterrupted run's losses.
#[test]
fn merging_tensor_parallel_zero_shards_resumes_in_one_process() {
    let _lock = glm_worker_test_lock();
    let d = tempfile::tempdir().unwrap();
    let (saved, merged) = (d.path().join("tp2dp2"), d.path().join("merged"));
    let s = Setup::new(4, 2, 2);
    let whole = run_from(s, None, 0, 4, None);
    run_from(s, None, 0, 2, Some(&saved));
    assert!(saved.join("2/mp_rank_01").join(checkpoint::shard_file(1)).is_file());
    // an incomplete set of parts is refused
    let partial = d.path().join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::rename(saved.join("2/mp_rank_01"), partial.join("mp_rank_01")).unwrap();
    let e = checkpoint::merge(&saved.join("2"), &d.path().join("m0"), true).unwrap_err().to_string();
    assert!(e.contains("mp_rank_01: tensor-parallel part 1 is missing (saved with tensor-parallel 2: mp_rank_00 .. mp_rank_01)"), "{e}");
    std::fs::rename(partial.join("mp_rank_01"), saved.join("2/mp_rank_01")).unwrap();
    // ... and so is a part that is not the checkpoint's (judged by the layout it recorded)
    copy_dir(&saved.join("2/mp_rank_01"), &saved.join("2/mp_rank_02"));
    let e = checkpoint::merge(&saved.join("2"), &d.path().join("m1"), true).unwrap_err().to_string();
    assert!(e.contains("mp_rank_02: not a part of this checkpoint (saved with tensor-parallel 2"), "{e}");
    std::fs::remove_dir_all(saved.join("2/mp_rank_02")).unwrap();
    assert!(!d.path().join("m0").exists() && !d.path().join("m1").exists(), "nothing written");
    let (parts, st) = checkpoint::merge(&saved.join("2"), &merged, true).unwrap();
    assert_eq!((parts, st.tp, st.has_optimizer), (2, 1, true));
    let one = run_from(Setup::new(1, 1, 0), Some(&merged), 2, 2, None);
    for (a, b) in whole[0].losses[2..].iter().zip(&one[0].losses) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "merged TP=2 × DP=2 stage 2 resumed in one process: loss {b} vs uninterrupted {a}");
    }
}

/// A save that fails on one rank (here: tensor-parallel rank 1 cannot
/// create its part's directory) fails on every rank, installs no part and
/// leaves `latest` alone, instead of leaving the other ranks waiting.
#[test]
fn a_save_failing_on_one_rank_fails_everywhere_and_installs_nothing() {
    let _lock = glm_worker_test_lock();
    let d = tempfile::tempdir().unwrap();
    let saved = d.path().join("ck");
    std::fs::create_dir_all(saved.join("1")).unwrap();
    std::fs::write(saved.join("1/.tmp-mp_rank_01"), "in the way").unwrap();
    let s = Setup::new(4, 2, 2);
    let jobs = ranks(&s);
    let errors = run_ranks(s.world, |r| {
        let (par, mut model, mut opt) = jobs[r].lock().unwrap().take().unwrap();
        steps(&s, &par, &mut model, &mut opt, 1, 2);
        let st = State { tp: 2, ..state(1, 2) };
        checkpoint::save(&saved, &model, &opt, &par, true, "{}", st).err().map(|e| e.to_string())
    });
    assert!(errors.iter().all(Option::is_some), "every rank reports the failure: {errors:?}");
    // the rank that failed names the path; the others say another rank failed
    assert!(errors[1].as_ref().unwrap().contains(".tmp-mp_rank_01"), "{errors:?}");
    assert!(errors[0].as_ref().unwrap().contains("another rank failed to create its part's directory"), "{errors:?}");
    assert!(!saved.join("latest").exists() && !saved.join("1/mp_rank_00").exists() && !saved.join("1/.tmp-mp_rank_00").exists());
}

#[test]
fn a_truncated_or_mismatched_shard_is_refused_by_name() {
    let _lock = glm_worker_test_lock();
    let d = tempfile::tempdir().unwrap();
    let saved = d.path().join("ck");
    run_from(Setup::new(2, 1, 1), None, 0, 1, Some(&saved));
    let dir = saved.join("1");
    let shard = dir.join(checkpoint::shard_file(1));
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = checkpoint::read_state(&dir).unwrap_err().to_string();
    assert!(e.contains(&checkpoint::shard_file(1)) && e.contains("checksum mismatch"), "{e}");
    // a shard whose size contradicts the manifest (checksums made to match)
    std::fs::write(&shard, &bytes).unwrap();
    let mut st = checkpoint::read_state(&dir).unwrap();
    let z = st.zero.as_mut().unwrap();
    z.files[1].pieces[0].len += 64;
    let (mut model, mut opt) = build(&recipe(&Setup::new(1, 1, 0)), &Parallel::single(), Device::Cpu).unwrap();
    let e = checkpoint::load(&dir, &st, &mut model, &mut opt, true).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains(&checkpoint::shard_file(1)) && e.contains("do not match the partition"), "{e}");
}

/// The tests of this file run one at a time: each starts several threads
/// that share libtorch's global generator and the 2 cores.
fn glm_worker_test_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
