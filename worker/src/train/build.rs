//! Building what trains, in one place (torchtitan's `parallelize` step): the
//! model of this rank's slice of the parallel layout, then its optimizer.
//! The trainer, `bench-step` and the tests all build through `build`, so
//! the padding ZeRO needs, the dtype the precision asks for and the
//! tensor-parallel group are decided once.

use tch::Device;

use crate::config::run::RunConfig;
use crate::error::Result;
use crate::model::glm::{Glm, GlmConfig, ModelOptions};
use crate::optim::optimizer::{OptimConfig, Optimizer};
use crate::parallel::Parallel;

/// What decides a model and its optimizer, apart from the parallel layout
/// and the device: the model's shape, its initialisation seed and numerics,
/// activation checkpointing, and the optimizer's settings (precision,
/// AdamW, clipping, loss scaling, ZeRO).
#[derive(Clone, Debug)]
pub struct Recipe {
    pub model: GlmConfig,
    pub optim: OptimConfig,
    /// Seed of the initialisation.
    pub seed: i64,
    pub fp32_layernorm: bool,
    pub fp32_embedding: bool,
    pub attention_scale: f64,
    /// Layers per recomputed chunk (activation checkpointing); 0 = off.
    pub checkpoint_num_layers: usize,
}

impl Recipe {
    /// `model` trained by `optim`, initialised from `seed`, with the plain
    /// numerics (no fp32 LayerNorm or embedding, no attention scaling) and
    /// no activation checkpointing.
    pub fn new(model: GlmConfig, optim: OptimConfig, seed: i64) -> Self {
        Recipe { model, optim, seed, fp32_layernorm: false, fp32_embedding: false, attention_scale: 1.0, checkpoint_num_layers: 0 }
    }

    /// A run's recipe, for a tokenizer of `vocab_size` ids (padded here as
    /// the run's `make_vocab_size_divisible_by` says).
    pub fn from_run(cfg: &RunConfig, vocab_size: usize) -> Self {
        let a = &cfg.args.args;
        let padded = crate::data::tokenizer::padded_vocab_size(vocab_size, a.make_vocab_size_divisible_by, a.model_parallel_size);
        Recipe {
            model: cfg.model_config(padded),
            optim: OptimConfig { precision: cfg.precision, adam: cfg.adam, clip: cfg.clip, scaler: cfg.scaler.clone(), zero: cfg.zero },
            seed: a.seed as i64,
            fp32_layernorm: cfg.fp32_layernorm,
            fp32_embedding: cfg.fp32_embedding,
            attention_scale: cfg.attention_scale,
            checkpoint_num_layers: cfg.checkpoint_num_layers,
        }
    }
}

/// The flat parameter buffers are padded to a multiple of this many
/// elements per data-parallel rank, so ZeRO splits them evenly.
pub const PAD_PER_DP_RANK: i64 = glm_common::plan::model::PAD_PER_DP_RANK as i64;

/// The model of this rank's slice of `par` (its tensor-parallel part), in
/// the dtype of the recipe's precision, on `device`, and its optimizer
/// (which may take over the parameters' gradients: ZeRO stage 2).
/// Initialisation draws from libtorch's global generator.
pub fn build(r: &Recipe, par: &Parallel, device: Device) -> Result<(Glm, Optimizer)> {
    let mo = ModelOptions {
        device,
        kind: r.optim.precision.kind(),
        seed: r.seed,
        tp: par.tp.clone(),
        pad_multiple: PAD_PER_DP_RANK * par.dims.dp as i64,
        fp32_layernorm: r.fp32_layernorm,
        fp32_embedding: r.fp32_embedding,
        attention_scale: r.attention_scale,
        checkpoint_num_layers: r.checkpoint_num_layers,
    };
    let mut model = Glm::build(r.model.clone(), &mo)?;
    let opt = Optimizer::new(&mut model.params, &r.optim, par)?;
    Ok((model, opt))
}
