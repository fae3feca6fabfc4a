//! One training step: forward and backward over the micro-batches of an
//! iteration, then the optimizer's update. The trainer and `bench-step` run
//! this same code.

use tch::Tensor;

use crate::config::ds::LossNormalization;
use crate::error::{Error, Result};
use crate::model::glm::{Batch, Glm};
use crate::optim::optimizer::{Optimizer, StepStats};
use crate::parallel::Parallel;
use crate::runtime::progress::{self, Phase};

/// What one step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepOutput {
    /// Mean loss over the global batch.
    pub loss: f64,
    pub stats: StepStats,
}

/// What one step runs with, besides the model, optimizer and layout.
#[derive(Clone, Copy, Debug)]
pub struct StepPlan {
    /// Seed of the iteration's dropout.
    pub it_seed: i64,
    /// Micro-batches per step (gradient accumulation).
    pub accum: usize,
    pub lr: f64,
    /// How the loss is normalised over the data-parallel ranks.
    pub norm: LossNormalization,
}

/// One optimizer step over `plan.accum` micro-batches (`batch(m)` gives this
/// rank's share of micro-batch `m`): `forward_backward`, then the update.
pub fn train_step(model: &mut Glm, opt: &mut Optimizer, par: &Parallel, plan: StepPlan, batch: &mut dyn FnMut(usize) -> Result<Batch>) -> Result<StepOutput> {
    let loss = forward_backward(model, opt, par, plan, batch)?;
    progress::set_phase(Phase::Optimizer);
    let stats = opt.step(&mut model.params, plan.lr)?;
    Ok(StepOutput { loss, stats })
}

/// Forward and backward over the step's micro-batches, each folded into
/// the optimizer's gradient (`Optimizer::accumulate`); returns the step's
/// logged loss. The data-parallel reduction of the gradient is the
/// optimizer's (a sum over the ranks).
///
/// Dropout is seeded from `it_seed` (and the micro-batch index, for
/// tensor-parallel streams), so a step is a function of its inputs.
///
/// With `LossNormalization::GlobalTokens` every micro-step's loss is the
/// summed cross entropy of this rank's loss tokens divided by the
/// loss-token count of the whole global batch (every micro-batch of every
/// data-parallel rank: the step's micro-batches are built first and their
/// tokens counted, one scalar all-reduce), so the gradient summed over
/// micro-batches and ranks is exactly the gradient of one process holding
/// the whole global batch in one micro-batch, however the batch is factored
/// into data-parallel size × accumulation × micro-batch; the logged loss is
/// the global batch's token mean (a second scalar all-reduce). With
/// `PerRankMean` (the original's rule, which depends on the factoring) it
/// is this rank's micro-batch mean divided by the data-parallel size and
/// by `accum`, so the sum over ranks is the average of the ranks'
/// gradients (DeepSpeed's), and the logged loss is the mean over
/// micro-batches of the mean of the ranks' means.
pub fn forward_backward(model: &mut Glm, opt: &mut Optimizer, par: &Parallel, plan: StepPlan, batch: &mut dyn FnMut(usize) -> Result<Batch>) -> Result<f64> {
    let StepPlan { it_seed, accum, norm, .. } = plan;
    tch::manual_seed(it_seed);
    let scale = opt.loss_scale();
    let dp = par.dims.dp as f64;
    progress::set_phase(Phase::Data);
    let batches = (0..accum).map(batch).collect::<Result<Vec<Batch>>>()?;
    // global_tokens: the loss tokens of the whole global batch
    let global_n = match norm {
        LossNormalization::GlobalTokens => {
            let own: i64 = batches.iter().map(Batch::loss_tokens).sum();
            let mut n = Tensor::from_slice(&[own as f64]);
            par.dp_sum(&mut n)?;
            n.double_value(&[0]).max(1.0)
        }
        LossNormalization::PerRankMean => 0.0,
    };
    let mut loss_sum = 0.0;
    for (m, b) in batches.iter().enumerate() {
        model.rng_base.set(it_seed.wrapping_mul(64).wrapping_add(m as i64));
        progress::set_phase(Phase::Forward);
        let (sum, _, n) = model.loss_terms(b, true)?;
        let loss = match norm {
            LossNormalization::GlobalTokens => {
                // this rank's summed cross entropy, all-reduced for the log after the loop
                loss_sum += sum.double_value(&[]);
                sum / global_n
            }
            LossNormalization::PerRankMean => {
                // a rank without loss tokens contributes 0, as in the original (which divides only by a positive count)
                let own_n = (n as f64).max(1.0);
                let mut mean = Tensor::from_slice(&[sum.double_value(&[]) / own_n]);
                par.dp_sum(&mut mean)?;
                loss_sum += mean.double_value(&[0]) / dp;
                sum / (own_n * dp * accum as f64)
            }
        };
        let loss = if scale != 1.0 { loss * scale } else { loss };
        // a failure inside backward (a collective of a tensor-parallel region,
        // a recomputed chunk) is an error here, not a panic
        progress::set_phase(Phase::Backward);
        loss.f_backward().map_err(|e| Error::Runtime(format!("backward: {}", crate::runtime::report::torch_error(&e.to_string()))))?;
        opt.accumulate(&mut model.params)?;
    }
    Ok(match norm {
        LossNormalization::GlobalTokens => {
            let mut total = Tensor::from_slice(&[loss_sum]);
            par.dp_sum(&mut total)?;
            total.double_value(&[0]) / global_n
        }
        LossNormalization::PerRankMean => loss_sum / accum as f64,
    })
}
