//! The optimizer: everything between backward and the next forward.
//!
//! It owns the fp32 master weights (when parameters are bf16/fp16), the fp32
//! gradient accumulator across micro-batches (bf16/fp16), AdamW's moments
//! and the fp16 loss scaler, and runs one step: data-parallel gradient sum,
//! global norm (each parameter once across tensor-parallel ranks), the
//! overflow check agreed over the whole world (fp16), unscale and clip,
//! AdamW on the fp32 weights, and the copy back into the compute-dtype
//! parameters. The model never sees master weights or moments.
//!
//! fp32: AdamW updates the parameters in place and the gradient buffer is
//! the parameters' own (no copies). bf16 (DeepSpeed's bf16 optimizer):
//! bf16 gradients are added into the fp32 accumulator after every
//! micro-batch, no loss scaling. fp16: the loss is multiplied by the loss
//! scale before backward; an inf/NaN anywhere skips the update (and the
//! learning-rate schedule), and the scaler adapts (`optim::scaler`).

use tch::{Kind, Tensor};

use super::adamw::{AdamW, AdamWConfig};
use super::scaler::{LossScaler, ScaleEvent, ScalerConfig};
use crate::comm::ReduceOp;
use crate::error::{Error, Result};
use crate::model::params::Params;
use crate::parallel::mappings::all_reduce_nograd;
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

pub struct Optimizer {
    pub precision: Precision,
    pub adam: AdamW,
    /// fp32 master weights, laid out like the parameters (bf16/fp16).
    master: Option<Tensor>,
    /// fp32 gradient accumulator (bf16/fp16).
    grad32: Option<Tensor>,
    pub scaler: Option<LossScaler>,
    /// Updates skipped for overflow (the schedule's step lags the iteration by this).
    pub skipped_steps: u64,
    clip: f64,
    decay_ranges: Vec<(i64, i64)>,
    split_ranges: Vec<(i64, i64)>,
    /// Test hook (`GLM_INJECT_INF_GRAD=<world rank or *>:<step>[:split]`):
    /// the rank (every rank with `*`) writes an inf into its gradient after
    /// the data-parallel sum at that step (counted from 1 in this process),
    /// at element 0, or with `split` at the first element of a
    /// tensor-parallel slice. The value is the element.
    inject_inf: Option<(u64, i64)>,
    /// AdamW through libtorch's fused kernel (on CUDA; CPU keeps the plain
    /// arithmetic of the golden losses).
    pub(crate) fused: bool,
    /// The ranges that hold no tensor-parallel slice (complement of `split_ranges`).
    replicated_ranges: Vec<(i64, i64)>,
    steps_taken: u64,
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

impl Optimizer {
    /// The optimizer of `params` (whose dtype must be `precision`'s): master
    /// weights start as the parameters' values (DeepSpeed does the same).
    pub fn new(params: &Params, precision: Precision, adam: AdamWConfig, clip: f64, scaler: Option<ScalerConfig>, world_rank: usize) -> Result<Self> {
        if params.kind() != precision.kind() {
            return Err(Error::Config(format!("parameters are {:?}, the optimizer was asked for {}", params.kind(), precision.name())));
        }
        let fp32 = || Tensor::zeros([params.padded_numel()], (Kind::Float, params.device()));
        let mixed = precision != Precision::Fp32;
        let master = mixed.then(|| tch::no_grad(|| params.flat().to_kind(Kind::Float).detach()));
        let scaler = match (precision, scaler) {
            (Precision::Fp16, cfg) => {
                let cfg = cfg.unwrap_or_default();
                cfg.validate()?;
                Some(LossScaler::new(cfg))
            }
            _ => None,
        };
        let split_ranges = params.split_ranges();
        let inject_inf = std::env::var("GLM_INJECT_INF_GRAD").ok().and_then(|v| {
            let mut f = v.split(':').map(str::trim);
            let (rank, step, at) = (f.next()?, f.next()?.parse::<u64>().ok()?, f.next());
            let mine = rank == "*" || rank.parse::<usize>().ok()? == world_rank;
            let offset = if at == Some("split") { split_ranges.first()?.0 } else { 0 };
            mine.then_some((step, offset))
        });
        let replicated_ranges = crate::model::params::complement(&split_ranges, params.padded_numel());
        Ok(Optimizer {
            precision,
            adam: AdamW::new(adam, &fp32()),
            master,
            grad32: mixed.then(fp32),
            scaler,
            skipped_steps: 0,
            clip,
            decay_ranges: params.decay_ranges(),
            split_ranges,
            replicated_ranges,
            inject_inf,
            fused: params.device().is_cuda(),
            steps_taken: 0,
        })
    }

    /// What backward's loss is multiplied by (1 without fp16).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.as_ref().map_or(1.0, LossScaler::scale)
    }

    /// The fp32 weights: the masters, or the fp32 parameters themselves.
    pub fn fp32_weights<'a>(&'a self, params: &'a Params) -> &'a Tensor {
        self.master.as_ref().unwrap_or(params.flat())
    }

    /// Sets the weights from `fp32` (laid out like the parameters): the
    /// masters and the parameters (cast).
    pub fn set_weights(&mut self, params: &mut Params, fp32: &Tensor) {
        match &mut self.master {
            Some(m) => {
                tch::no_grad(|| m.copy_(fp32));
                self.params_from_master(params);
            }
            None => tch::no_grad(|| params.flat_mut().copy_(fp32)),
        }
    }

    /// Copies data-parallel rank 0's weights to every rank of the group.
    pub fn broadcast_weights(&mut self, params: &mut Params, par: &Parallel) -> Result<()> {
        match &mut self.master {
            Some(m) => {
                par.dp_broadcast(m)?;
                self.params_from_master(params);
                Ok(())
            }
            None => par.dp_broadcast(params.flat_mut()),
        }
    }

    /// The compute-dtype parameters := the masters, rounded (bf16/fp16).
    fn params_from_master(&self, params: &mut Params) {
        if let Some(m) = &self.master {
            tch::no_grad(|| params.flat_mut().copy_(m));
        }
    }

    /// Folds what backward just accumulated in the parameters' gradient
    /// buffer into the fp32 accumulator (bf16/fp16); call after every
    /// micro-batch's backward. fp32 accumulates in place already.
    pub fn accumulate(&mut self, params: &mut Params) {
        if let Some(g32) = &mut self.grad32 {
            tch::no_grad(|| {
                let _ = g32.g_add_(params.grad());
            });
            params.zero_grad();
        }
    }

    /// One update with learning rate `lr`, after `accumulate` saw every
    /// micro-batch. Collective over the world (every rank calls it).
    pub fn step(&mut self, params: &mut Params, par: &Parallel, bucket: i64, lr: f64) -> Result<StepStats> {
        self.steps_taken += 1;
        let loss_scale = self.loss_scale();
        let mut grad = match &self.grad32 {
            Some(g) => g.shallow_clone(),
            None => params.grad().shallow_clone(),
        };
        par.dp_sum_buckets(&mut grad, bucket)?;
        if let Some((step, at)) = self.inject_inf {
            if step == self.steps_taken {
                tch::no_grad(|| {
                    let _ = grad.get(at).fill_(f64::INFINITY);
                });
                log::warn!("GLM_INJECT_INF_GRAD: wrote inf into gradient element {at} at step {}", self.steps_taken);
            }
        }
        // global norm: every parameter once (slices' squares summed over the
        // tensor-parallel group, replicas counted here); `local_finite` says
        // whether this rank's gradient is free of inf/NaN
        let (norm, local_finite) = match par.tp {
            Some(g) => {
                // both partial sums read back in one device sync
                let sums = Tensor::stack(&[sum_sq(&grad, &self.split_ranges), sum_sq(&grad, &self.replicated_ranges)], 0).to_device(tch::Device::Cpu);
                let (split, replicated) = (sums.double_value(&[0]), sums.double_value(&[1]));
                let mut t = Tensor::from_slice(&[split]);
                all_reduce_nograd(&mut t, g, ReduceOp::Sum)?;
                ((replicated + t.double_value(&[0])).sqrt(), split.is_finite() && replicated.is_finite())
            }
            None => {
                let total = sum_sq(&grad, &[(0, grad.size()[0])]).double_value(&[]);
                (total.sqrt(), total.is_finite())
            }
        };
        // an inf/NaN on any rank (data- or tensor-parallel), agreed by all
        let overflow = par.world_max(i64::from(!(local_finite && norm.is_finite())))? != 0;
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

    /// Unscale and clip (one multiply), AdamW on the fp32 weights, copy
    /// back, zero the gradients.
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
        let weights = match &mut self.master {
            Some(m) => m,
            None => params.flat_mut(),
        };
        if self.fused {
            // one fused pass on the GPU; CPU keeps the plain arithmetic (bitwise golden losses)
            self.adam.update_fused(weights, &self.decay_ranges, grad, lr)?;
        } else {
            self.adam.update(weights, &self.decay_ranges, grad, lr);
        }
        self.params_from_master(params);
        self.zero(params);
        Ok(())
    }

    fn zero(&mut self, params: &mut Params) {
        if let Some(g) = &mut self.grad32 {
            tch::no_grad(|| {
                let _ = g.zero_();
            });
        }
        params.zero_grad();
    }

    /// Bytes this rank holds for parameters, gradients and optimizer state.
    pub fn memory_bytes(&self, params: &Params) -> (u64, u64, u64) {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let p = bytes(params.flat());
        let g = bytes(params.grad()) + self.grad32.as_ref().map_or(0, bytes);
        let o = bytes(&self.adam.exp_avg) + bytes(&self.adam.exp_avg_sq) + self.master.as_ref().map_or(0, bytes);
        (p, g, o)
    }
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
        let mut opt = Optimizer::new(&p, Precision::Fp32, ADAM, 1.0, None, 0).unwrap();
        set_grad(&mut p, &[3.0, 4.0, 0.0]);
        let s = opt.step(&mut p, &Parallel::single(), 1 << 20, 0.1).unwrap();
        assert_eq!(s.grad_norm, 5.0);
        assert!(!s.skipped && s.scale_event.is_none());
        let w: Vec<f32> = Vec::try_from(p.flat()).unwrap();
        assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] - 0.9).abs() < 1e-5 && w[2] == 0.0, "{w:?}");
        assert_eq!(p.grad().abs().max().double_value(&[]), 0.0, "gradients zeroed after the step");
        assert_eq!(opt.memory_bytes(&p), (16, 16, 32));
    }

    /// bf16: gradients of several micro-batches add up in fp32; the update
    /// happens on fp32 masters, and the bf16 parameters are their rounding.
    #[test]
    fn bf16_accumulates_in_fp32_and_updates_masters() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::BFloat16);
        let mut opt = Optimizer::new(&p, Precision::Bf16, ADAM, 0.0, None, 0).unwrap();
        for _ in 0..3 {
            set_grad(&mut p, &[1.0, -1.0, 0.001]);
            opt.accumulate(&mut p);
            assert_eq!(p.grad().abs().max().double_value(&[]), 0.0, "bf16 gradients folded into fp32");
        }
        let g32: Vec<f32> = Vec::try_from(opt.grad32.as_ref().unwrap()).unwrap();
        assert_eq!(&g32[..2], &[3.0, -3.0]);
        opt.step(&mut p, &Parallel::single(), 1 << 20, 1e-3).unwrap();
        let master: Vec<f32> = Vec::try_from(opt.fp32_weights(&p)).unwrap();
        assert!((master[0] - 0.999).abs() < 1e-6 && (master[1] - 1.001).abs() < 1e-6, "{master:?}");
        // the bf16 parameters are the masters rounded (1 ± 0.001 rounds to 1 in bf16)
        assert!(p.flat().equal(&opt.fp32_weights(&p).to_kind(Kind::BFloat16)));
        assert_eq!(p.flat().double_value(&[0]), 1.0);
    }

    /// fp16: an inf gradient skips the update and leaves weights and
    /// moments alone; a clean step unscales and clips as DeepSpeed does.
    #[test]
    fn fp16_skips_overflow_and_unscales() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Half);
        let cfg = ScalerConfig { initial_scale_power: 4, hysteresis: 1, ..ScalerConfig::default() };
        let mut opt = Optimizer::new(&p, Precision::Fp16, ADAM, 1.0, Some(cfg), 0).unwrap();
        assert_eq!(opt.loss_scale(), 16.0);
        set_grad(&mut p, &[f32::INFINITY, 1.0, 0.0]);
        opt.accumulate(&mut p);
        let s = opt.step(&mut p, &Parallel::single(), 1 << 20, 0.1).unwrap();
        assert!(s.skipped && opt.skipped_steps == 1 && opt.adam.step == 0);
        assert_eq!(s.scale_event, Some(ScaleEvent::Overflow { from: 16.0, to: 8.0, hysteresis_left: 1 }));
        assert_eq!(opt.fp32_weights(&p).double_value(&[0]), 1.0);
        assert_eq!(opt.adam.exp_avg.abs().max().double_value(&[]), 0.0);
        // scaled by 8: the true gradient is (0.3, 0.4), norm 0.5 (below clip 1)
        set_grad(&mut p, &[2.4, 3.2, 0.0]);
        opt.accumulate(&mut p);
        let s = opt.step(&mut p, &Parallel::single(), 1 << 20, 0.1).unwrap();
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
            let mut a = Optimizer::new(&pa, precision, adam, 1.0, None, 0).unwrap();
            let mut b = Optimizer::new(&pb, precision, adam, 1.0, None, 0).unwrap();
            b.fused = true;
            for g in [[0.3f32, -0.2, 0.1], [0.05, 0.4, -0.3], [2.0, 1.0, -1.0]] {
                for (p, o) in [(&mut pa, &mut a), (&mut pb, &mut b)] {
                    set_grad(p, &g);
                    o.accumulate(p);
                    o.step(p, &Parallel::single(), 1 << 20, 0.05).unwrap();
                }
            }
            assert!(a.fp32_weights(&pa).allclose(b.fp32_weights(&pb), 1e-5, 1e-6, false), "{precision:?}");
            assert_eq!((a.adam.step, b.adam.step), (3, 3));
        }
    }

    /// Without a loss scaler an inf gradient is an error before the update.
    #[test]
    fn fp32_inf_gradient_stops_before_the_update() {
        let _rng = crate::torch_rng_lock();
        let mut p = params(Kind::Float);
        let mut opt = Optimizer::new(&p, Precision::Fp32, ADAM, 1.0, None, 0).unwrap();
        set_grad(&mut p, &[f32::NAN, 1.0, 0.0]);
        let e = opt.step(&mut p, &Parallel::single(), 1 << 20, 0.1).err().unwrap().to_string();
        assert!(e.contains("inf/NaN") && e.contains("not applied"), "{e}");
        assert_eq!(p.flat().double_value(&[0]), 1.0, "weights untouched");
    }

    #[test]
    fn dtype_mismatch_is_refused() {
        let _rng = crate::torch_rng_lock();
        let p = params(Kind::Float);
        let e = Optimizer::new(&p, Precision::Bf16, ADAM, 1.0, None, 0).err().unwrap().to_string();
        assert!(e.contains("asked for bf16"), "{e}");
    }
}
