//! The distributed optimizer: everything between backward and the next
//! forward, in one module (llm.c's `zero.cuh` is the model).
//!
//! It owns the data-parallel gradient reduction, the global gradient norm
//! (each parameter once across tensor- and data-parallel ranks), the
//! overflow check agreed over the whole world, unscale and clip, the fp16
//! loss scaler, the fp32 master weights (bf16/fp16), AdamW's moments, the
//! parameter all-gather and the optimizer's checkpoint state. The trainer
//! and `bench-step` call it the same way; the model never sees any of it.
//!
//! ZeRO (`zero_optimization.stage`, geometry in `optim::zero`):
//! - stage 0: every data-parallel rank keeps full gradients, masters and
//!   moments; gradients are all-reduced in `reduce_bucket_size` buckets;
//! - stage 1: masters and moments are partitioned; the full gradient is
//!   reduce-scattered onto its owners at the step, each rank updates its
//!   shard, and the updated parameters are all-gathered (in
//!   `allgather_bucket_size` chunks);
//! - stage 2: gradients are partitioned too: a hook takes each parameter's
//!   gradient as autograd finishes it, and every bucket is reduce-scattered
//!   onto its owners as soon as it is complete, during backward; only the
//!   fp32 shard gradient persists.
//!
//! Precision: fp32 updates the parameters in place (stage 0: no copies).
//! bf16 (DeepSpeed's bf16 optimizer): gradients are accumulated in fp32
//! across micro-batches, no loss scaling. fp16: the loss is multiplied by
//! the loss scale; an inf/NaN anywhere skips the update (and the
//! learning-rate schedule), and the scaler adapts (`optim::scaler`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor};

use super::adamw::{AdamW, AdamWConfig};
use super::scaler::{LossScaler, ScaleEvent, ScalerConfig, ScalerRules, ScalerState};
use super::zero::{Piece, Shards, ZeroConfig};
use crate::comm::{Comm, ReduceOp};
use crate::error::{Error, Result};
use crate::model::params::Params;
use crate::parallel::mappings::{all_reduce_nograd, Group};
use crate::parallel::Parallel;

/// The compute dtype of parameters and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
            Precision::Fp16 => Kind::Half,
        }
    }

    /// Optimizer-state bytes per parameter (the ZeRO paper's K): the Adam
    /// moments in fp32, plus fp32 master weights in mixed precision.
    pub fn optimizer_bytes_per_param(self) -> u64 {
        if self == Precision::Fp32 {
            8
        } else {
            12
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fp32" => Some(Precision::Fp32),
            "bf16" => Some(Precision::Bf16),
            "fp16" => Some(Precision::Fp16),
            _ => None,
        }
    }
}

/// What the optimizer is asked to do.
#[derive(Clone, Debug)]
pub struct OptimConfig {
    pub precision: Precision,
    pub adam: AdamWConfig,
    /// Gradient clipping (global norm); 0 = off.
    pub clip: f64,
    /// The fp16 loss scaler (fp16 only; defaults when `None`).
    pub scaler: Option<ScalerConfig>,
    pub zero: ZeroConfig,
}

impl OptimConfig {
    pub fn new(precision: Precision, adam: AdamWConfig, clip: f64) -> Self {
        OptimConfig { precision, adam, clip, scaler: None, zero: ZeroConfig::default() }
    }
}

/// What one step did.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    /// Global gradient norm before clipping (unscaled).
    pub grad_norm: f64,
    /// The update was skipped (fp16 overflow).
    pub skipped: bool,
    /// The loss scale this step's backward used (1 without fp16).
    pub loss_scale: f64,
    /// What the fp16 scaler did.
    pub scale_event: Option<ScaleEvent>,
}

/// Bytes of model state one rank holds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryBytes {
    pub params: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// Stage 2: the largest total of gradient buckets held at once during
    /// backward (`grads` counts the buckets held when it is measured: none
    /// between steps).
    pub bucket_peak: u64,
}

impl MemoryBytes {
    pub fn total(&self) -> u64 {
        self.params + self.grads + self.optimizer
    }

    /// The ZeRO paper's model-state bytes per rank for `numel` parameters
    /// over `dp` ranks at `stage`: compute-dtype parameters and gradients,
    /// and K bytes of optimizer state per parameter (K = 12 with fp32
    /// masters, 8 in fp32 training), partitioned as the stage says.
    pub fn theory(numel: i64, precision: Precision, dp: usize, stage: u8) -> MemoryBytes {
        let n = numel as f64;
        let d = dp as f64;
        let cb = precision.kind().elt_size_in_bytes() as f64;
        let k = precision.optimizer_bytes_per_param() as f64;
        let (g, o) = match stage {
            0 => (cb * n, k * n),
            1 => (cb * n, k * n / d),
            _ => (cb * n / d, k * n / d),
        };
        MemoryBytes { params: (cb * n) as u64, grads: g as u64, optimizer: o as u64, bucket_peak: 0 }
    }
}

fn bytes(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// Σ t² over the `ranges` of a flat tensor, accumulated in f64 (so it does
/// not depend on the order of the elements), in chunks that bound the
/// temporary memory; a 0-dim f64 tensor on `t`'s device (no sync).
fn sum_sq(t: &Tensor, ranges: &[(i64, i64)]) -> Tensor {
    const CHUNK: i64 = 1 << 24;
    tch::no_grad(|| {
        let mut acc: Option<Tensor> = None;
        for &(o, n) in ranges {
            let mut off = 0;
            while off < n {
                let s = t.narrow(0, o + off, CHUNK.min(n - off)).square().sum(Kind::Double);
                acc = Some(match acc {
                    None => s,
                    Some(a) => a + s,
                });
                off += CHUNK;
            }
        }
        acc.unwrap_or_else(|| Tensor::zeros([], (Kind::Double, t.device())))
    })
}

/// Stage 2's gradient path: the hooks hand it each parameter's gradient as
/// autograd finishes it; it copies them into their units' buckets and
/// reduce-scatters every complete unit (in unit order, so every rank runs
/// the same collectives in the same order) into the fp32 shard gradient.
struct Reducer {
    dp: Option<Comm>,
    pieces: Vec<Piece>,
    units: Vec<(i64, i64)>,
    /// (offset, numel) of every parameter, by declaration index.
    params: Vec<(i64, i64)>,
    /// Parameter elements of every unit.
    expected: Vec<i64>,
    /// Elements still to come in this micro-batch, per unit.
    pending: Vec<i64>,
    /// Which parameters' gradients arrived in this micro-batch.
    delivered: Vec<bool>,
    buckets: BTreeMap<usize, Tensor>,
    next: usize,
    kind: Kind,
    device: tch::Device,
    /// The fp32 shard gradient, summed over ranks and micro-batches.
    grad: Tensor,
    held: u64,
    peak: u64,
    /// The first failure inside backward, reported by `finish`.
    error: Option<String>,
}

impl Reducer {
    fn on_grad(&mut self, index: usize, g: &Tensor) -> Result<()> {
        // after a failure this rank issues no more collectives: `finish`
        // reports it (the peers stop at their next collective)
        if self.error.is_some() {
            return Err(Error::Runtime("an earlier gradient reduction of this micro-batch failed".into()));
        }
        if std::mem::replace(&mut self.delivered[index], true) {
            return Err(Error::Runtime(format!(
                "parameter {index} received its gradient twice in one micro-batch (ZeRO stage 2 reduces each gradient once, as autograd finishes it)"
            )));
        }
        let (off, n) = self.params[index];
        let flat = g.reshape([-1]);
        let first = self.units.partition_point(|&(s, l)| s + l <= off);
        for u in first..self.units.len() {
            let (start, len) = self.units[u];
            if start >= off + n {
                break;
            }
            let (a, b) = (off.max(start), (off + n).min(start + len));
            if !self.buckets.contains_key(&u) {
                let t = Tensor::zeros([len], (self.kind, self.device));
                self.held += bytes(&t);
                self.peak = self.peak.max(self.held);
                self.buckets.insert(u, t);
            }
            let bucket = self.buckets.get_mut(&u).expect("just inserted");
            tch::no_grad(|| bucket.narrow(0, a - start, b - a).copy_(&flat.narrow(0, a - off, b - a)));
            self.pending[u] -= b - a;
        }
        while self.next < self.units.len() && self.pending[self.next] <= 0 {
            self.reduce(self.next)?;
            self.next += 1;
        }
        Ok(())
    }

    /// Reduce-scatters unit `u`'s bucket into the shard gradient.
    fn reduce(&mut self, u: usize) -> Result<()> {
        let (_, len) = self.units[u];
        let bucket = match self.buckets.remove(&u) {
            Some(b) => {
                self.held -= bytes(&b);
                b
            }
            None => Tensor::zeros([len], (self.kind, self.device)),
        };
        let piece = self.pieces[u];
        let mut mine = self.grad.narrow(0, piece.shard, piece.len);
        match &self.dp {
            Some(c) => {
                let mut part = Tensor::empty([piece.len], (self.kind, self.device));
                c.reduce_scatter_into(&bucket, &mut part)?;
                tch::no_grad(|| {
                    let _ = mine.g_add_(&part);
                });
            }
            None => tch::no_grad(|| {
                let _ = mine.g_add_(&bucket);
            }),
        }
        Ok(())
    }

    /// Ends a micro-batch: reduces the units still open (parameters that
    /// received no gradient count as zeros), in order, and rearms.
    fn finish(&mut self) -> Result<()> {
        let mut result = match self.error.take() {
            Some(e) => Err(Error::Runtime(e)),
            None => Ok(()),
        };
        while result.is_ok() && self.next < self.units.len() {
            result = self.reduce(self.next);
            self.next += 1;
        }
        self.next = 0;
        self.pending.clone_from(&self.expected);
        self.delivered.iter_mut().for_each(|d| *d = false);
        self.buckets.clear();
        self.held = 0;
        result
    }
}

/// How a state's moments are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moments {
    /// This rank's shard, as the optimizer's partition says
    /// (`Optimizer::shards`; at ZeRO stage 0 the whole padded buffer).
    Shard,
    /// The whole padded buffer, the same on every data-parallel rank (a
    /// checkpoint of another layout, re-partitioned): each rank keeps its
    /// shard.
    Whole,
}

/// What a checkpoint stores of the optimizer besides the weights:
/// `Optimizer::state` hands it out, `Optimizer::load_state` takes it back.
pub struct OptimizerState {
    /// AdamW's first and second moments, laid out as `moments` says.
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    pub moments: Moments,
    /// AdamW's step count (bias correction).
    pub step: u64,
    /// Updates skipped for fp16 overflow (the learning-rate schedule lags
    /// the iteration by this).
    pub skipped_steps: u64,
    /// The fp16 loss scaler's state (fp16 runs).
    pub loss_scaler: Option<ScalerState>,
}

pub struct Optimizer {
    precision: Precision,
    zero: ZeroConfig,
    adam: AdamW,
    scaler: Option<LossScaler>,
    /// Updates skipped for overflow (the schedule's step lags the iteration by this).
    skipped_steps: u64,
    clip: f64,
    /// The partition of the flat buffers (stage 0: over one rank).
    shards: Shards,
    dp_rank: usize,
    pieces: Vec<Piece>,
    dp: Option<Comm>,
    tp: Option<Group>,
    world: Option<Comm>,
    /// fp32 master weights of this rank's shard (bf16/fp16).
    master: Option<Tensor>,
    /// fp32 gradient accumulator over the whole buffer (bf16/fp16, stages 0 and 1).
    grad32: Option<Tensor>,
    /// fp32 gradient of this rank's shard (stage 1).
    shard_grad: Option<Tensor>,
    /// Stage 2's gradient path (shared with the parameters' hooks).
    reducer: Option<Arc<Mutex<Reducer>>>,
    /// Weight-decayed, tensor-parallel-split and replicated ranges, in shard coordinates.
    decay_ranges: Vec<(i64, i64)>,
    split_ranges: Vec<(i64, i64)>,
    replicated_ranges: Vec<(i64, i64)>,
    /// Test hook (`test_hooks::inf_gradient`): at these steps (iterations,
    /// counted from 1 over the run) an inf is written into this element of
    /// the reduced gradient this rank holds.
    inject_inf: Option<(Vec<u64>, i64)>,
    /// AdamW through libtorch's fused kernel (on CUDA; CPU keeps the plain
    /// arithmetic of the golden losses).
    pub(crate) fused: bool,
    steps_taken: u64,
}

fn lock(r: &Arc<Mutex<Reducer>>) -> std::sync::MutexGuard<'_, Reducer> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

impl Optimizer {
    /// The optimizer of `params` (whose dtype must be `cfg.precision`'s)
    /// for this rank of `par`. Master weights start as the parameters'
    /// values (DeepSpeed does the same). Stage 2 takes over the parameters'
    /// gradients (their flat buffer is released; hooks feed the buckets).
    pub fn new(params: &mut Params, cfg: &OptimConfig, par: &Parallel) -> Result<Self> {
        let precision = cfg.precision;
        if params.kind() != precision.kind() {
            return Err(Error::Config(format!("parameters are {:?}, the optimizer was asked for {}", params.kind(), precision.name())));
        }
        cfg.zero.validate()?;
        let zero = cfg.zero;
        let (dp, dp_rank) = match (&par.dp, zero.stage) {
            (Some(c), s) if s > 0 => (c.size(), c.rank()),
            _ => (1, 0),
        };
        let padded = params.padded_numel();
        let bucket = if zero.stage == 0 { padded.max(1) } else { zero.reduce_bucket_size };
        let shards = Shards::new(padded, bucket, dp)
            .map_err(|e| Error::Config(format!("{e} (the model pads its flat buffers to a multiple of 64 × data-parallel size)")))?;
        let pieces = shards.pieces(dp_rank);
        let device = params.device();
        let owned: i64 = pieces.iter().map(|p| p.len).sum();
        let _doing = crate::runtime::report::doing(format!(
            "allocating the optimizer state ({} on {}: Adam moments{} for {} parameters)",
            crate::runtime::units::human_bytes(owned as u64 * precision.optimizer_bytes_per_param()),
            crate::runtime::units::device_name(device),
            if precision != Precision::Fp32 { " and fp32 master weights" } else { "" },
            crate::runtime::units::human_count(owned as u64)
        ));
        let fp32 = |n: i64| Tensor::zeros([n], (Kind::Float, device));
        let mixed = precision != Precision::Fp32;
        let staged = zero.stage > 0;
        let master = mixed.then(|| tch::no_grad(|| own(params.flat(), &pieces).to_kind(Kind::Float)));
        let scaler = match (precision, cfg.scaler.clone()) {
            (Precision::Fp16, c) => {
                // an `fp16` block with `enabled` only: DeepSpeed's defaults on this stage's path
                let c = c.unwrap_or_else(|| ScalerConfig::defaults(zero.stage));
                c.validate()?;
                if c.rules != ScalerRules::for_stage(zero.stage) {
                    return Err(Error::Config(format!("the fp16 loss scaler follows {}, and the optimizer runs ZeRO stage {}", c.rules.name(), zero.stage)));
                }
                Some(LossScaler::new(c))
            }
            _ => None,
        };
        let n = params.padded_numel();
        let split_flat = params.split_ranges();
        let replicated_flat = crate::model::params::complement(&split_flat, n);
        let map = |r: &[(i64, i64)]| if staged { shards.to_shard(dp_rank, r) } else { r.to_vec() };
        let world_rank = par.dims.rank;
        // the first element of the gradient it holds (of a split range when asked)
        let inject_inf = crate::test_hooks::inf_gradient(world_rank).and_then(|h| {
            let at = if h.in_split_range { map(&split_flat).first()?.0 } else { 0 };
            Some((h.steps, at))
        });
        let reducer = if zero.stage == 2 {
            let units = shards.units();
            let infos: Vec<(i64, i64)> = params.infos.iter().map(|i| (i.offset, i.numel)).collect();
            let expected: Vec<i64> = units.iter().map(|&(s, l)| infos.iter().map(|&(o, k)| ((o + k).min(s + l) - o.max(s)).max(0)).sum()).collect();
            let r = Arc::new(Mutex::new(Reducer {
                dp: par.dp.clone(),
                pieces: pieces.clone(),
                units,
                params: infos,
                pending: expected.clone(),
                expected,
                delivered: vec![false; params.infos.len()],
                buckets: BTreeMap::new(),
                next: 0,
                kind: precision.kind(),
                device,
                grad: fp32(shards.shard_len()),
                held: 0,
                peak: 0,
                error: None,
            }));
            params.release_grad_buffer();
            for (i, v) in params.views().iter().enumerate() {
                let r = r.clone();
                crate::model::autograd::set_grad_hook(
                    v,
                    Box::new(move |g: &Tensor| {
                        let mut r = lock(&r);
                        let out = r.on_grad(i, g);
                        if let Err(e) = &out {
                            r.error.get_or_insert_with(|| e.to_string());
                        }
                        out
                    }),
                )?;
            }
            Some(r)
        } else {
            None
        };
        Ok(Optimizer {
            precision,
            zero,
            adam: AdamW::new(cfg.adam, &fp32(shards.shard_len())),
            scaler,
            skipped_steps: 0,
            clip: cfg.clip,
            shards,
            dp_rank,
            pieces,
            dp: par.dp.clone(),
            tp: par.tp.clone(),
            world: par.world.clone(),
            master,
            grad32: (mixed && zero.stage < 2).then(|| fp32(n)),
            shard_grad: (zero.stage == 1).then(|| fp32(shards.shard_len())),
            reducer,
            decay_ranges: map(&params.decay_ranges()),
            split_ranges: map(&split_flat),
            replicated_ranges: map(&replicated_flat),
            inject_inf,
            fused: device.is_cuda(),
            steps_taken: 0,
        })
    }

    /// What backward's loss is multiplied by (1 without fp16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, LossScaler::scale)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The ZeRO settings (stage, buckets) this optimizer runs with.
    pub fn zero_config(&self) -> ZeroConfig {
        self.zero
    }

    /// The fp16 loss scaler (fp16 runs).
    pub fn scaler(&self) -> Option<&LossScaler> {
        self.scaler.as_ref()
    }

    /// Updates skipped for overflow so far: the learning-rate schedule
    /// stands at the iteration minus these.
    pub fn skipped_steps(&self) -> u64 {
        self.skipped_steps
    }

    /// Sets where a resumed run stands: `iteration` steps done, `skipped`
    /// of them skipped for overflow (the learning-rate schedule stands at
    /// the difference; a resume that does not load the optimizer state
    /// still continues the schedule).
    pub fn set_position(&mut self, iteration: u64, skipped: u64) {
        self.steps_taken = iteration;
        self.skipped_steps = skipped;
    }

    /// This rank's optimizer state, for a checkpoint (the moments are
    /// shallow: they alias the optimizer's own buffers).
    pub fn state(&self) -> OptimizerState {
        OptimizerState {
            exp_avg: self.adam.exp_avg.shallow_clone(),
            exp_avg_sq: self.adam.exp_avg_sq.shallow_clone(),
            moments: Moments::Shard,
            step: self.adam.step,
            skipped_steps: self.skipped_steps,
            loss_scaler: self.scaler.as_ref().map(|s| s.state.clone()),
        }
    }

    /// Takes back a checkpoint's optimizer state: the moments (this rank's
    /// shard of whole ones, or the shard as saved), AdamW's step, the
    /// skipped steps and, when one was saved, the loss scaler's state
    /// (`LossScaler::resume`). Returns a line for the log when the scaler's
    /// state is not taken exactly as saved.
    pub fn load_state(&mut self, s: OptimizerState) -> Result<Option<String>> {
        let (want, what) = match s.moments {
            Moments::Whole => (self.shards.padded, "whole moments"),
            Moments::Shard => (self.adam.exp_avg.size()[0], "a shard of the moments"),
        };
        if s.exp_avg.size() != [want] || s.exp_avg_sq.size() != [want] {
            return Err(Error::Runtime(format!(
                "optimizer state: {what} of {:?} and {:?} elements where this rank takes {want}",
                s.exp_avg.size(),
                s.exp_avg_sq.size()
            )));
        }
        tch::no_grad(|| match s.moments {
            Moments::Whole => {
                self.adam.exp_avg.copy_(&own(&s.exp_avg, &self.pieces));
                self.adam.exp_avg_sq.copy_(&own(&s.exp_avg_sq, &self.pieces));
            }
            Moments::Shard => {
                self.adam.exp_avg.copy_(&s.exp_avg);
                self.adam.exp_avg_sq.copy_(&s.exp_avg_sq);
            }
        });
        self.adam.step = s.step;
        self.skipped_steps = s.skipped_steps;
        Ok(self.resume_scaler(s.loss_scaler))
    }

    /// Resumes the fp16 loss scaler from a checkpoint's state
    /// (`LossScaler::resume`); returns a line for the log when the state is
    /// not taken exactly as saved (another path, another precision, none
    /// saved).
    pub fn resume_scaler(&mut self, saved: Option<ScalerState>) -> Option<String> {
        match (self.scaler.take(), saved) {
            (Some(scaler), Some(saved)) => {
                let (resumed, note) = LossScaler::resume(scaler.cfg, saved);
                self.scaler = Some(resumed);
                note
            }
            (Some(fresh), None) => {
                let note = format!("fp16 loss scaler: the checkpoint has no loss-scaler state (not an fp16 run); it starts afresh: {}", fresh.describe());
                self.scaler = Some(fresh);
                Some(note)
            }
            (None, Some(saved)) => {
                Some(format!("the checkpoint's fp16 loss-scaler state (scale {}) is not used: this run trains in {}", saved.scale, self.precision.name()))
            }
            (None, None) => None,
        }
    }

    /// The partition of the flat buffers and this rank's index in it.
    pub fn shards(&self) -> (Shards, usize) {
        (self.shards, self.dp_rank)
    }

    /// Whether optimizer state is partitioned over the data-parallel ranks.
    pub fn partitioned(&self) -> bool {
        self.zero.stage > 0
    }

    /// Sets the weights from `fp32` (the whole flat buffer, laid out like
    /// the parameters, identical on every data-parallel rank): this rank's
    /// masters and the parameters (cast).
    pub fn set_weights(&mut self, params: &mut Params, fp32: &Tensor) {
        tch::no_grad(|| {
            if let Some(m) = &mut self.master {
                m.copy_(&own(fp32, &self.pieces));
            }
            params.flat_mut().copy_(fp32);
        });
    }

    /// The whole fp32 weights on data-parallel rank 0 (`None` elsewhere):
    /// the parameters in fp32 training, else the masters, gathered from
    /// their shards. Collective over the data-parallel group.
    pub fn full_weights(&self, params: &Params) -> Result<Option<Tensor>> {
        let main = self.dp.as_ref().is_none_or(|c| c.rank() == 0);
        let Some(m) = &self.master else {
            return Ok(main.then(|| params.flat().shallow_clone()));
        };
        if !self.partitioned() {
            return Ok(main.then(|| m.shallow_clone()));
        }
        self.gather_shards(m).map(|full| full.filter(|_| main))
    }

    /// Whether `t` shares memory with a buffer training updates in place
    /// (the parameters' flat buffer, the masters, the moments): what
    /// `full_weights` and `state` hand out mostly does, and a checkpoint
    /// written while training goes on must copy it first.
    pub fn is_live(&self, params: &Params, t: &Tensor) -> bool {
        let live = [Some(params.flat()), self.master.as_ref(), Some(&self.adam.exp_avg), Some(&self.adam.exp_avg_sq)];
        live.into_iter().flatten().any(|b| b.data_ptr() == t.data_ptr())
    }

    /// The whole buffer of a shard-laid-out fp32 tensor `t` (weights or a
    /// moment), gathered over the data-parallel group unit by unit; on
    /// rank 0 only. Collective.
    fn gather_shards(&self, t: &Tensor) -> Result<Option<Tensor>> {
        let c = match &self.dp {
            Some(c) if self.partitioned() => c,
            _ => return Ok(Some(t.shallow_clone())),
        };
        let main = c.rank() == 0;
        let full = main.then(|| Tensor::zeros([self.shards.padded], (Kind::Float, t.device())));
        let d = self.shards.dp as i64;
        for (u, &(start, len)) in self.shards.units().iter().enumerate() {
            let p = self.pieces[u];
            gather_unit(c.as_ref(), &t.narrow(0, p.shard, p.len), full.as_ref().map(|f| f.narrow(0, start, len)).as_ref(), d, self.gather_chunk())?;
        }
        Ok(full)
    }

    /// Elements per rank in one all-gather call (`allgather_bucket_size` over dp).
    fn gather_chunk(&self) -> i64 {
        (self.zero.allgather_bucket_size / self.shards.dp as i64).max(1)
    }

    /// Folds what backward produced for one micro-batch into the step's
    /// gradient: the fp32 accumulator (bf16/fp16 at stages 0 and 1), or the
    /// buckets still open (stage 2). Call after every micro-batch's backward.
    pub fn accumulate(&mut self, params: &mut Params) -> Result<()> {
        if let Some(r) = &self.reducer {
            return lock(r).finish();
        }
        if let Some(g32) = &mut self.grad32 {
            tch::no_grad(|| {
                let _ = g32.g_add_(params.grad());
            });
            params.zero_grad();
        }
        Ok(())
    }

    /// The reduced gradient this rank updates with: stage 0 all-reduces the
    /// whole buffer in buckets, stage 1 reduce-scatters it onto the owners,
    /// stage 2 has reduced it during backward.
    fn reduce(&mut self, params: &Params) -> Result<Tensor> {
        if let Some(r) = &self.reducer {
            return Ok(lock(r).grad.shallow_clone());
        }
        let full = match &self.grad32 {
            Some(g) => g.shallow_clone(),
            None => params.grad().shallow_clone(),
        };
        let Some(sg) = &self.shard_grad else {
            if let Some(c) = &self.dp {
                let n = full.size()[0];
                let bucket = self.zero.reduce_bucket_size;
                let mut off = 0;
                while off < n {
                    let len = bucket.min(n - off);
                    c.all_reduce(&mut full.narrow(0, off, len), ReduceOp::Sum)?;
                    off += len;
                }
            }
            return Ok(full);
        };
        for (u, &(start, len)) in self.shards.units().iter().enumerate() {
            let p = self.pieces[u];
            let mut out = sg.narrow(0, p.shard, p.len);
            match &self.dp {
                Some(c) => c.reduce_scatter_into(&full.narrow(0, start, len), &mut out)?,
                None => tch::no_grad(|| out.copy_(&full.narrow(0, start, len))),
            }
        }
        Ok(sg.shallow_clone())
    }

    /// One update with learning rate `lr`, after `accumulate` saw every
    /// micro-batch. Collective over the world (every rank calls it).
    pub fn step(&mut self, params: &mut Params, lr: f64) -> Result<StepStats> {
        self.steps_taken += 1;
        let loss_scale = self.loss_scale();
        let mut grad = self.reduce(params)?;
        if let Some((steps, at)) = &self.inject_inf {
            let at = *at;
            if steps.contains(&self.steps_taken) {
                tch::no_grad(|| {
                    let _ = grad.get(at).fill_(f64::INFINITY);
                });
                log::warn!("GLM_INJECT_INF_GRAD: wrote inf into gradient element {at} at step {}", self.steps_taken);
            }
        }
        let (norm, local_finite) = self.global_norm(&grad)?;
        // an inf/NaN on any rank (data- or tensor-parallel), agreed by all
        let mut flag = Tensor::from_slice(&[i64::from(!(local_finite && norm.is_finite()))]);
        if let Some(w) = &self.world {
            w.all_reduce(&mut flag, ReduceOp::Max)?;
        }
        let overflow = flag.int64_value(&[0]) != 0;
        let Some(scaler) = &mut self.scaler else {
            // without loss scaling there is nothing to adapt: stop before the
            // weights (and a checkpoint of them) take the inf/NaN
            if overflow {
                return Err(Error::Runtime(format!(
                    "the gradients hold inf/NaN (global norm {norm}) at optimizer step {}; the update is not applied. Lower the learning rate or check the data",
                    self.adam.step + 1
                )));
            }
            self.apply(params, &mut grad, norm, 1.0, lr)?;
            return Ok(StepStats { grad_norm: norm, skipped: false, loss_scale, scale_event: None });
        };
        let event = scaler.update(overflow)?;
        if overflow {
            self.skipped_steps += 1;
            self.zero(params);
            return Ok(StepStats { grad_norm: norm, skipped: true, loss_scale, scale_event: Some(event) });
        }
        self.apply(params, &mut grad, norm, loss_scale, lr)?;
        Ok(StepStats { grad_norm: norm / loss_scale, skipped: false, loss_scale, scale_event: Some(event) })
    }

    /// The global gradient norm, every parameter once: tensor-parallel
    /// slices' squares summed over the tensor-parallel group, replicas
    /// counted once; with partitioned gradients each rank's shard summed
    /// over the data-parallel group. Also whether this rank's gradient is
    /// free of inf/NaN.
    fn global_norm(&self, grad: &Tensor) -> Result<(f64, bool)> {
        if !self.partitioned() && self.tp.is_none() {
            let total = sum_sq(grad, &[(0, grad.size()[0])]).double_value(&[]);
            return Ok((total.sqrt(), total.is_finite()));
        }
        // both partial sums read back in one device sync
        let sums = Tensor::stack(&[sum_sq(grad, &self.split_ranges), sum_sq(grad, &self.replicated_ranges)], 0).to_device(tch::Device::Cpu);
        let local_finite = sums.isfinite().all().int64_value(&[]) != 0;
        let mut sums = sums;
        if let (Some(c), true) = (&self.dp, self.partitioned()) {
            c.all_reduce(&mut sums, ReduceOp::Sum)?;
        }
        let (mut split, replicated) = (sums.double_value(&[0]), sums.double_value(&[1]));
        if let Some(g) = &self.tp {
            let mut t = Tensor::from_slice(&[split]);
            all_reduce_nograd(&mut t, g, ReduceOp::Sum)?;
            split = t.double_value(&[0]);
        }
        Ok(((split + replicated).sqrt(), local_finite))
    }

    /// Unscale and clip (one multiply), AdamW on the fp32 weights, the
    /// parameters from them (all-gathered when partitioned), zero the
    /// gradients.
    fn apply(&mut self, params: &mut Params, grad: &mut Tensor, norm: f64, scale: f64, lr: f64) -> Result<()> {
        let coef = if scale == 1.0 {
            // torch's clip_grad_norm_ (the golden losses depend on this exact form)
            if self.clip > 0.0 && norm > self.clip {
                self.clip / (norm + 1e-6)
            } else {
                1.0
            }
        } else {
            // DeepSpeed's fp16 optimizer: grads /= scale · max(1, (norm/scale + 1e-6) / clip)
            let mut combined = scale;
            if self.clip > 0.0 {
                let c = (norm / scale + 1e-6) / self.clip;
                if c > 1.0 {
                    combined = c * scale;
                }
            }
            1.0 / combined
        };
        if coef != 1.0 {
            tch::no_grad(|| {
                let _ = grad.g_mul_scalar_(coef);
            });
        }
        // the fp32 weights of this rank's shard: the masters, the whole
        // parameter buffer (stage 0) or its one run, or a gathered copy of
        // its runs (written back after the update)
        let one_run = self.pieces.len() == 1;
        let partitioned = self.partitioned();
        let mut copied = None;
        let weights = match &mut self.master {
            Some(m) => m,
            None if !partitioned => params.flat_mut(),
            None if one_run => {
                let p = self.pieces[0];
                copied = Some(params.flat().narrow(0, p.flat, p.len));
                copied.as_mut().expect("set")
            }
            None => {
                copied = Some(own(params.flat(), &self.pieces));
                copied.as_mut().expect("set")
            }
        };
        if self.fused {
            // one fused pass on the GPU; CPU keeps the plain arithmetic (bitwise golden losses)
            self.adam.update_fused(weights, &self.decay_ranges, grad, lr)?;
        } else {
            self.adam.update(weights, &self.decay_ranges, grad, lr);
        }
        // the parameters := the fp32 weights (rounded), this rank's runs
        let src = self.master.as_ref().or(copied.as_ref().filter(|_| !one_run));
        if let Some(src) = src {
            tch::no_grad(|| {
                for p in &self.pieces {
                    params.flat().narrow(0, p.flat, p.len).copy_(&src.narrow(0, p.shard, p.len));
                }
            });
        }
        self.gather_params(params)?;
        self.zero(params);
        Ok(())
    }

    /// Every rank's updated runs into everyone's parameters: an in-place
    /// all-gather per unit, in chunks of `allgather_bucket_size` elements
    /// (through a scratch buffer when a unit is larger).
    fn gather_params(&self, params: &mut Params) -> Result<()> {
        let c = match &self.dp {
            Some(c) if self.partitioned() => c,
            _ => return Ok(()),
        };
        let d = self.shards.dp as i64;
        for (u, &(start, len)) in self.shards.units().iter().enumerate() {
            let p = self.pieces[u];
            let unit = params.flat().narrow(0, start, len);
            gather_unit(c.as_ref(), &params.flat().narrow(0, p.flat, p.len), Some(&unit), d, self.gather_chunk())?;
        }
        Ok(())
    }

    fn zero(&mut self, params: &mut Params) {
        tch::no_grad(|| {
            for t in [&mut self.grad32, &mut self.shard_grad].into_iter().flatten() {
                let _ = t.zero_();
            }
            if let Some(r) = &self.reducer {
                let _ = lock(r).grad.zero_();
            }
        });
        params.zero_grad();
    }

    /// Bytes this rank holds for parameters, gradients and optimizer state,
    /// measured from the buffers it keeps.
    pub fn memory(&self, params: &Params) -> MemoryBytes {
        let (mut grads, mut bucket_peak) = (bytes(params.grad()), 0);
        for t in [&self.grad32, &self.shard_grad].into_iter().flatten() {
            grads += bytes(t);
        }
        if let Some(r) = &self.reducer {
            let r = lock(r);
            grads += bytes(&r.grad) + r.held;
            bucket_peak = r.peak;
        }
        let optimizer = bytes(&self.adam.exp_avg) + bytes(&self.adam.exp_avg_sq) + self.master.as_ref().map_or(0, bytes);
        MemoryBytes { params: bytes(params.flat()), grads, optimizer, bucket_peak }
    }
}

/// All-gathers one unit: every rank's run `own` into `unit` (dp runs, rank
/// by rank), `chunk` elements per rank per call — in one call straight into
/// `unit` when it fits (in place when `own` is `unit`'s slot), else through
/// a scratch buffer of `dp × chunk` elements. `unit` is `None` on ranks
/// that only take part.
fn gather_unit(c: &dyn crate::comm::Communicator, own: &Tensor, unit: Option<&Tensor>, d: i64, chunk: i64) -> Result<()> {
    let len = own.size()[0];
    if let (Some(u), true) = (unit, chunk >= len) {
        return c.all_gather_into(own, &mut u.shallow_clone());
    }
    let mut col = 0;
    while col < len {
        let n = chunk.min(len - col);
        let mut scratch = Tensor::empty([d * n], (own.kind(), own.device()));
        c.all_gather_into(&own.narrow(0, col, n), &mut scratch)?;
        if let Some(u) = unit {
            tch::no_grad(|| u.view([d, len]).narrow(1, col, n).copy_(&scratch.view([d, n])));
        }
        col += n;
    }
    Ok(())
}

/// This rank's runs of a whole-buffer tensor, end to end (a view when it
/// is one run).
fn own(full: &Tensor, pieces: &[Piece]) -> Tensor {
    if let [p] = pieces {
        return full.narrow(0, p.flat, p.len);
    }
    Tensor::cat(&pieces.iter().map(|p| full.narrow(0, p.flat, p.len)).collect::<Vec<_>>(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::{Init, ParamBuilder};
    use tch::Device;

    fn params(kind: Kind) -> Params {
        let mut pb = ParamBuilder::default();
        pb.add("w", &[2], Init::Ones, true);
        pb.add("b", &[1], Init::Zeros, false);
        pb.build(Device::Cpu, kind, 0, 4).unwrap()
    }

    fn set_grad(p: &mut Params, g: &[f32]) {
        let t = Tensor::from_slice(g).to_kind(p.kind());
        tch::no_grad(|| {
            p.grad_mut().narrow(0, 0, 3).copy_(&t);
        });
    }

    const ADAM: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.0 };

    /// fp32: torch's clip_grad_norm_ (coefficient clip / (norm + 1e-6) when
    /// above), then AdamW, whose first step moves each weight by lr · sign(g).
    #[test]
    fn fp32_clips_and_updates_in_place() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Float);
        let mut opt = Optimizer::new(&mut p, &OptimConfig::new(Precision::Fp32, ADAM, 1.0), &Parallel::single()).unwrap();
        set_grad(&mut p, &[3.0, 4.0, 0.0]);
        let s = opt.step(&mut p, 0.1).unwrap();
        assert_eq!(s.grad_norm, 5.0);
        assert!(!s.skipped && s.scale_event.is_none());
        let w: Vec<f32> = Vec::try_from(p.flat()).unwrap();
        assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] - 0.9).abs() < 1e-5 && w[2] == 0.0, "{w:?}");
        assert_eq!(p.grad().abs().max().double_value(&[]), 0.0, "gradients zeroed after the step");
        let m = opt.memory(&p);
        assert_eq!((m.params, m.grads, m.optimizer), (16, 16, 32));
    }

    /// bf16: gradients of several micro-batches add up in fp32; the update
    /// happens on fp32 masters, and the bf16 parameters are their rounding.
    #[test]
    fn bf16_accumulates_in_fp32_and_updates_masters() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::BFloat16);
        let mut opt = Optimizer::new(&mut p, &OptimConfig::new(Precision::Bf16, ADAM, 0.0), &Parallel::single()).unwrap();
        for _ in 0..3 {
            set_grad(&mut p, &[1.0, -1.0, 0.001]);
            opt.accumulate(&mut p).unwrap();
            assert_eq!(p.grad().abs().max().double_value(&[]), 0.0, "bf16 gradients folded into fp32");
        }
        let g32: Vec<f32> = Vec::try_from(opt.grad32.as_ref().unwrap()).unwrap();
        assert_eq!(&g32[..2], &[3.0, -3.0]);
        opt.step(&mut p, 1e-3).unwrap();
        let master: Vec<f32> = Vec::try_from(opt.full_weights(&p).unwrap().unwrap()).unwrap();
        assert!((master[0] - 0.999).abs() < 1e-6 && (master[1] - 1.001).abs() < 1e-6, "{master:?}");
        // the bf16 parameters are the masters rounded (1 ± 0.001 rounds to 1 in bf16)
        assert!(p.flat().equal(&opt.full_weights(&p).unwrap().unwrap().to_kind(Kind::BFloat16)));
        assert_eq!(p.flat().double_value(&[0]), 1.0);
    }

    /// fp16: an inf gradient skips the update and leaves weights and
    /// moments alone; a clean step unscales and clips as DeepSpeed does.
    #[test]
    fn fp16_skips_overflow_and_unscales() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Half);
        let cfg = ScalerConfig { initial_scale_power: 4, ..ScalerConfig::defaults(0) };
        let mut opt = Optimizer::new(&mut p, &OptimConfig { scaler: Some(cfg), ..OptimConfig::new(Precision::Fp16, ADAM, 1.0) }, &Parallel::single()).unwrap();
        assert_eq!(opt.loss_scale(), 16.0);
        set_grad(&mut p, &[f32::INFINITY, 1.0, 0.0]);
        opt.accumulate(&mut p).unwrap();
        let s = opt.step(&mut p, 0.1).unwrap();
        assert!(s.skipped && opt.skipped_steps == 1 && opt.adam.step == 0);
        assert_eq!(s.scale_event, Some(ScaleEvent::Overflow { from: 16.0, to: 8.0, hysteresis: None, at_minimum: false }));
        assert_eq!(opt.full_weights(&p).unwrap().unwrap().double_value(&[0]), 1.0);
        assert_eq!(opt.adam.exp_avg.abs().max().double_value(&[]), 0.0);
        // scaled by 8: the true gradient is (0.3, 0.4), norm 0.5 (below clip 1)
        set_grad(&mut p, &[2.4, 3.2, 0.0]);
        opt.accumulate(&mut p).unwrap();
        let s = opt.step(&mut p, 0.1).unwrap();
        assert!(!s.skipped && (s.grad_norm - 0.5).abs() < 1e-3 && s.loss_scale == 8.0);
        assert!((opt.adam.exp_avg.double_value(&[0]) - 0.03).abs() < 1e-4, "m = (1 - β1) · unscaled gradient");
    }

    /// The fused AdamW path (CUDA's) through the whole step, forced on CPU,
    /// against the plain one: fp32 in place and bf16 masters, with decay ranges.
    #[test]
    fn fused_steps_match_plain_steps() {
        let _rng = crate::torch_rng_lock();
        for (kind, precision) in [(Kind::Float, Precision::Fp32), (Kind::BFloat16, Precision::Bf16)] {
            let adam = AdamWConfig { weight_decay: 0.1, ..ADAM };
            let (mut pa, mut pb) = (params(kind), params(kind));
            let mut a = Optimizer::new(&mut pa, &OptimConfig::new(precision, adam, 1.0), &Parallel::single()).unwrap();
            let mut b = Optimizer::new(&mut pb, &OptimConfig::new(precision, adam, 1.0), &Parallel::single()).unwrap();
            b.fused = true;
            for g in [[0.3f32, -0.2, 0.1], [0.05, 0.4, -0.3], [2.0, 1.0, -1.0]] {
                for (p, o) in [(&mut pa, &mut a), (&mut pb, &mut b)] {
                    set_grad(p, &g);
                    o.accumulate(p).unwrap();
                    o.step(p, 0.05).unwrap();
                }
            }
            assert!(a.full_weights(&pa).unwrap().unwrap().allclose(&b.full_weights(&pb).unwrap().unwrap(), 1e-5, 1e-6, false), "{precision:?}");
            assert_eq!((a.adam.step, b.adam.step), (3, 3));
        }
    }

    /// Without a loss scaler an inf gradient is an error before the update.
    #[test]
    fn fp32_inf_gradient_stops_before_the_update() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Float);
        let mut opt = Optimizer::new(&mut p, &OptimConfig::new(Precision::Fp32, ADAM, 1.0), &Parallel::single()).unwrap();
        set_grad(&mut p, &[f32::NAN, 1.0, 0.0]);
        let e = opt.step(&mut p, 0.1).err().unwrap().to_string();
        assert!(e.contains("inf/NaN") && e.contains("not applied"), "{e}");
        assert_eq!(p.flat().double_value(&[0]), 1.0, "weights untouched");
    }

    #[test]
    fn dtype_mismatch_is_refused() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Float);
        let e = Optimizer::new(&mut p, &OptimConfig::new(Precision::Bf16, ADAM, 1.0), &Parallel::single()).err().unwrap().to_string();
        assert!(e.contains("asked for bf16"), "{e}");
    }
}
