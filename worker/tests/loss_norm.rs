//! Loss normalisation over data-parallel ranks (`loss_normalization` in the
//! DeepSpeed file), in one process with thread ranks (`comm::local`).
//!
//! The two ranks hold different numbers of loss tokens, which is where the
//! two rules differ. The expected gradients are computed here from each
//! rank's micro-batches one by one (the summed loss's gradient and its
//! token count), not through `train::step`:
//! - `global_tokens` (the default): Σ over ranks and micro-batches of
//!   ∇sum / (tokens of the whole global batch: every micro-batch of every
//!   rank), the gradient of one process holding the whole batch in one
//!   micro-batch;
//! - `per_rank_mean` (the original's): Σ of ∇sum / (own tokens · dp ·
//!   accumulation steps), the average over ranks of each rank's mean.

use std::sync::Mutex;

mod common;

use glm_worker::comm::local::run_ranks;
use glm_worker::config::ds::LossNormalization;
use glm_worker::model::glm::{Batch, Glm, GlmConfig};
use glm_worker::optim::adamw::AdamWConfig;
use glm_worker::optim::optimizer::{OptimConfig, Optimizer, Precision};
use glm_worker::parallel::Parallel;
use glm_worker::train::build::{build, Recipe};
use glm_worker::train::step::{forward_backward, train_step, StepPlan};
use tch::{Device, Tensor};

const SEQ: i64 = 32;
const VOCAB: usize = 256;
const ACCUM: usize = 2;
const MICRO: u64 = 2;

fn model_cfg() -> GlmConfig {
    common::small_glm(SEQ, VOCAB)
}

/// Data-parallel rank `dp_rank`'s share of micro-batch `m`: random tokens,
/// the loss on the last `loss_len` positions, where `loss_len` differs by
/// rank (and micro-batch), so the ranks' token counts differ.
fn batch(dp_rank: u64, m: u64) -> Batch {
    let loss_len = [[24, 20], [4, 9]][dp_rank as usize % 2][m as usize % 2];
    common::random_batch((0..MICRO).map(|i| 5000 + 100 * dp_rank + 10 * m + i), SEQ, VOCAB, SEQ - loss_len)
}

fn recipe() -> Recipe {
    Recipe::new(model_cfg(), OptimConfig::new(Precision::Fp32, AdamWConfig::GLM, 0.0), 11)
}

/// Every rank's layout, model and optimizer (built in turn: initialisation
/// draws from libtorch's global generator).
fn ranks(world: usize, tp: usize) -> Vec<Mutex<Option<(Parallel, Glm, Optimizer)>>> {
    Parallel::local(world, tp)
        .unwrap()
        .into_iter()
        .map(|p| {
            let (model, opt) = build(&recipe(), &p, Device::Cpu).unwrap();
            Mutex::new(Some((p, model, opt)))
        })
        .collect()
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per data-parallel rank: (the gradient `forward_backward` left on it
/// before any reduction, the logged loss); and the model of rank 0.
fn one_step(norm: LossNormalization) -> (Vec<(Tensor, f64)>, Glm) {
    let jobs = ranks(2, 1);
    let model0 = Mutex::new(None);
    let out = run_ranks(2, |r| {
        let (par, mut model, mut opt) = jobs[r].lock().unwrap().take().unwrap();
        let dp_rank = par.dims.dp_rank() as u64;
        let plan = StepPlan { it_seed: 1, accum: ACCUM, lr: 1e-3, norm };
        let loss = forward_backward(&mut model, &mut opt, &par, plan, &mut |m| Ok(batch(dp_rank, m as u64))).unwrap();
        let grad = model.params.grad().copy();
        if r == 0 {
            *model0.lock().unwrap() = Some(model);
        }
        (grad, loss)
    });
    (out, model0.into_inner().unwrap().unwrap())
}

/// ∇ of the summed loss of one rank's micro-batch, and its token count and
/// summed loss, on `model` (its gradient is left zeroed).
fn summed(model: &mut Glm, b: &Batch) -> (Tensor, f64, f64) {
    model.params.zero_grad();
    let (sum, _, n) = model.loss_terms(b, true).unwrap();
    let s = sum.double_value(&[]);
    sum.backward();
    let g = model.params.grad().copy();
    model.params.zero_grad();
    (g, n as f64, s)
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
fn each_rule_gives_its_gradient_and_logged_loss() {
    let _l = lock();
    let (per_rank, mut model) = one_step(LossNormalization::PerRankMean);
    let (global, _) = one_step(LossNormalization::GlobalTokens);
    // the independent computation, micro-batch by micro-batch and rank by rank
    let (dp, accum) = (2.0, ACCUM as f64);
    let mut want_per_rank = model.params.grad().zeros_like();
    let mut want_global = model.params.grad().zeros_like();
    let (mut loss_per_rank, mut loss_global) = (0.0, 0.0);
    let parts: Vec<Vec<(Tensor, f64, f64)>> = (0..ACCUM as u64).map(|m| (0..2).map(|r| summed(&mut model, &batch(r, m))).collect()).collect();
    let global_n: f64 = parts.iter().flatten().map(|p| p.1).sum();
    for micro in &parts {
        assert_ne!(micro[0].1, micro[1].1, "the ranks hold different token counts");
        for (g, n, s) in micro {
            want_per_rank += g / (n * dp * accum);
            want_global += g / global_n;
            loss_per_rank += s / n / dp / accum;
            loss_global += s / global_n;
        }
    }
    // the micro-batches hold different token counts too: normalising each
    // by its own global count (1 / accumulation steps each) would differ
    let per_micro: Vec<f64> = parts.iter().map(|micro| micro.iter().map(|p| p.1).sum()).collect();
    assert_ne!(per_micro[0], per_micro[1], "the micro-batches hold different token counts");
    let reduced = |v: &[(Tensor, f64)]| v.iter().map(|(g, _)| g.shallow_clone()).reduce(|a, b| a + b).unwrap();
    let (got_per_rank, got_global) = (reduced(&per_rank), reduced(&global));
    eprintln!(
        "gradient vs the independent sum: per_rank_mean {:.1e}, global_tokens {:.1e}; the two rules differ by {:.1e}",
        rel(&got_per_rank, &want_per_rank),
        rel(&got_global, &want_global),
        rel(&want_per_rank, &want_global)
    );
    assert!(rel(&got_per_rank, &want_per_rank) < 1e-5, "per_rank_mean: the data-parallel sum of the ranks' gradients");
    assert!(rel(&got_global, &want_global) < 1e-5, "global_tokens: the data-parallel sum of the ranks' gradients");
    assert!(rel(&want_per_rank, &want_global) > 1e-2, "the rules differ on these batches (else the test shows nothing)");
    // the logged loss: the same on every rank
    for (_, l) in &per_rank {
        assert!((l - loss_per_rank).abs() <= 1e-6 * loss_per_rank, "per_rank_mean logs the mean of the ranks' means: {l} vs {loss_per_rank}");
    }
    for (_, l) in &global {
        assert!((l - loss_global).abs() <= 1e-6 * loss_global, "global_tokens logs the global mean: {l} vs {loss_global}");
    }
    assert!((loss_per_rank - loss_global).abs() > 1e-4 * loss_global);
}

/// Losses of 3 steps on the same batches under `per_rank_mean` on `world` ranks of
/// tensor-parallel size `tp` (data-parallel 2 either way), rank 0's view.
fn per_rank_losses(world: usize, tp: usize) -> Vec<f64> {
    let jobs = ranks(world, tp);
    let out = run_ranks(world, |r| {
        let (par, mut model, mut opt) = jobs[r].lock().unwrap().take().unwrap();
        let dp_rank = par.dims.dp_rank() as u64;
        (1..=3)
            .map(|step| {
                let plan = StepPlan { it_seed: step, accum: ACCUM, lr: 2e-3, norm: LossNormalization::PerRankMean };
                train_step(&mut model, &mut opt, &par, plan, &mut |m| Ok(batch(dp_rank, m as u64))).unwrap().loss
            })
            .collect::<Vec<f64>>()
    });
    out.into_iter().next().unwrap()
}

#[test]
fn per_rank_mean_under_tensor_parallelism_trains_as_without_it() {
    let _l = lock();
    let (plain, tp2) = (per_rank_losses(2, 1), per_rank_losses(4, 2));
    eprintln!("per_rank_mean losses: DP=2 {plain:?}, TP=2 x DP=2 {tp2:?}");
    assert!(plain[2] < plain[0], "it learns: {plain:?}");
    for (i, (a, b)) in plain.iter().zip(&tp2).enumerate() {
        // fp32 sums in another order under tensor parallelism
        assert!((a - b).abs() <= 1e-5 * a, "step {}: DP=2 {a}, TP=2 x DP=2 {b}", i + 1);
    }
}
