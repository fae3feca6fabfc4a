//! One training step: forward and backward over the micro-batches of an
//! iteration, then the optimizer's update. The trainer and `bench-step` run
//! this same code.

use tch::Tensor;

use crate::error::{Error, Result};
use crate::model::glm::{Batch, Glm};
use crate::optim::optimizer::{Optimizer, StepStats};
use crate::parallel::Parallel;

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
}

/// One optimizer step over `plan.accum` micro-batches (`batch(m)` gives this
/// rank's share of micro-batch `m`).
///
/// Dropout is seeded from `it_seed` (and the micro-batch index, for
/// tensor-parallel streams), so a step is a function of its inputs. Each
/// micro-step's loss is the summed cross entropy of this rank's masked
/// tokens divided by the masked-token count of the whole global micro-batch
/// (all data-parallel ranks), so summing gradients over the data-parallel
/// group gives exactly the gradient of one process holding the whole batch.
pub fn train_step(model: &mut Glm, opt: &mut Optimizer, par: &Parallel, plan: StepPlan, batch: &mut dyn FnMut(usize) -> Result<Batch>) -> Result<StepOutput> {
    let StepPlan { it_seed, accum, lr } = plan;
    tch::manual_seed(it_seed);
    let scale = opt.loss_scale();
    let mut loss_sum = 0.0;
    for m in 0..accum {
        model.rng_base.set(it_seed.wrapping_mul(64).wrapping_add(m as i64));
        let b = batch(m)?;
        let (sum, _, n) = model.loss_terms(&b, true)?;
        let mut stats = Tensor::from_slice(&[n as f64, sum.double_value(&[])]);
        par.dp_sum(&mut stats)?;
        let (global_n, global_sum) = (stats.double_value(&[0]).max(1.0), stats.double_value(&[1]));
        loss_sum += global_sum / global_n;
        let loss = sum / (global_n * accum as f64);
        let loss = if scale != 1.0 { loss * scale } else { loss };
        // a failure inside backward (a collective of a tensor-parallel region,
        // a recomputed chunk) is an error here, not a panic
        loss.f_backward().map_err(|e| Error::Runtime(format!("backward: {}", crate::runtime::report::torch_error(&e.to_string()))))?;
        opt.accumulate(&mut model.params)?;
    }
    let stats = opt.step(&mut model.params, lr)?;
    Ok(StepOutput { loss: loss_sum / accum as f64, stats })
}
