//! AdamW (decoupled weight decay, as DeepSpeed's Adam and torch.optim.AdamW)
//! over a flat fp32 buffer; clipping and the rest of the step live in
//! `optim::optimizer`.

use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// The AdamW of the seed's DeepSpeed configs (config_block_*.json):
    /// betas (0.9, 0.98), eps 1e-6, weight decay 0.01. `bench-step` and
    /// bench/glm_torch.py train with it.
    pub const GLM: AdamWConfig = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.01 };
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// Updates applied so far (bias correction uses step + 1 on the next).
    pub step: u64,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, like: &Tensor) -> Self {
        AdamW { cfg, exp_avg: like.zeros_like(), exp_avg_sq: like.zeros_like(), step: 0 }
    }

    /// One update of `flat` (the `decay` ranges decayed) with gradient `grad`
    /// (consumed as scratch space). Same arithmetic as torch.optim.AdamW:
    /// p *= 1 - lr·wd; m = β1 m + (1-β1) g; v = β2 v + (1-β2) g²;
    /// p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps).
    pub fn update(&mut self, flat: &mut Tensor, decay: &[(i64, i64)], grad: &mut Tensor, lr: f64) {
        let c = self.cfg;
        self.step += 1;
        let t = self.step as i32;
        // Everything in place, `grad` doubling as scratch: no allocation of
        // parameter-sized temporaries per step.
        tch::no_grad(|| {
            if c.weight_decay != 0.0 {
                for &(o, n) in decay {
                    let _ = flat.narrow(0, o, n).g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
            }
            let _ = self.exp_avg.lerp_(grad, 1.0 - c.beta1); // m = β1 m + (1-β1) g
            let _ = grad.g_mul_scalar_((1.0 - c.beta2).sqrt());
            let _ = self.exp_avg_sq.g_mul_scalar_(c.beta2);
            let _ = self.exp_avg_sq.addcmul_(grad, grad); // v = β2 v + (1-β2) g²
            let bc1 = 1.0 - c.beta1.powi(t);
            let bc2 = 1.0 - c.beta2.powi(t);
            let _ = self.exp_avg_sq.sqrt_out(grad); // scratch = sqrt(v)
            let _ = grad.g_div_scalar_(bc2.sqrt()).g_add_scalar_(c.eps); // denominator
            let _ = self.exp_avg.div_out(grad, grad); // scratch = m / denominator
            let _ = grad.g_mul_scalar_(lr / bc1);
            let _ = flat.g_sub_(grad);
        });
    }
}

extern "C" {
    fn glm_fused_adamw(
        params: *const *mut torch_sys::C_tensor,
        grads: *const *mut torch_sys::C_tensor,
        exp_avgs: *const *mut torch_sys::C_tensor,
        exp_avg_sqs: *const *mut torch_sys::C_tensor,
        n: i32,
        step: f64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
    ) -> i32;
}

impl AdamW {
    /// The same update through libtorch's fused multi-tensor kernel
    /// (`_fused_adamw_`, torch.optim.AdamW(fused=True)): one pass over
    /// weights, gradient and moments instead of a dozen. Used on CUDA; the
    /// arithmetic equals `update`'s up to rounding, so CPU runs keep `update`
    /// (their golden losses are bitwise).
    pub fn update_fused(&mut self, flat: &mut Tensor, decay: &[(i64, i64)], grad: &mut Tensor, lr: f64) -> crate::Result<()> {
        let c = self.cfg;
        let step = self.step + 1;
        let n = flat.size()[0];
        // the decayed ranges, and the rest (no decay)
        let plain = crate::model::params::complement(decay, n);
        for (ranges, wd) in [(decay, c.weight_decay), (&plain[..], 0.0)] {
            if ranges.is_empty() {
                continue;
            }
            let views = |t: &Tensor| -> Vec<Tensor> { ranges.iter().map(|&(o, len)| t.narrow(0, o, len)).collect() };
            let (p, g, m, v) = (views(flat), views(grad), views(&self.exp_avg), views(&self.exp_avg_sq));
            let ptrs = |ts: &[Tensor]| -> Vec<*mut torch_sys::C_tensor> { ts.iter().map(|t| t.as_ptr() as *mut torch_sys::C_tensor).collect() };
            let (pp, gp, mp, vp) = (ptrs(&p), ptrs(&g), ptrs(&m), ptrs(&v));
            // SAFETY: four arrays of live tensors of equal length, borrowed for the call
            let rc =
                unsafe { glm_fused_adamw(pp.as_ptr(), gp.as_ptr(), mp.as_ptr(), vp.as_ptr(), pp.len() as i32, step as f64, lr, c.beta1, c.beta2, wd, c.eps) };
            if rc != 0 {
                return Err(crate::Error::Extension { op: "fused AdamW".into(), msg: crate::model::autograd::last_error() });
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a scalar re-derivation of AdamW.
    #[test]
    fn matches_scalar_adamw() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.1 };
        let mut flat = Tensor::from_slice(&[1.0f32, -2.0, 0.5]);
        let mut opt = AdamW::new(cfg, &flat);
        let grads = [[0.1f32, -0.2, 0.3], [0.05, 0.4, -0.1]];
        let (mut p, mut m, mut v) = ([1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for (t, g) in grads.iter().enumerate() {
            let lr = 0.01;
            let mut gt = Tensor::from_slice(g);
            opt.update(&mut flat, &[(0, 2)], &mut gt, lr);
            for i in 0..3 {
                let wd = if i < 2 { 0.1 } else { 0.0 };
                p[i] *= 1.0 - lr * wd;
                m[i] = 0.9 * m[i] + 0.1 * g[i] as f64;
                v[i] = 0.98 * v[i] + 0.02 * (g[i] as f64).powi(2);
                let bc1 = 1.0 - 0.9f64.powi(t as i32 + 1);
                let bc2 = 1.0 - 0.98f64.powi(t as i32 + 1);
                p[i] -= lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-6);
            }
        }
        let got: Vec<f32> = Vec::try_from(&flat).unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-6, "{got:?} vs {p:?}");
        }
    }

    /// The fused kernel (CPU build of it here) against the plain update.
    #[test]
    fn fused_update_matches_the_plain_one() {
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.1 };
        let p0 = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 0.25, -1.0]);
        let (mut a, mut b) = (p0.copy(), p0.copy());
        let (mut oa, mut ob) = (AdamW::new(cfg, &a), AdamW::new(cfg, &b));
        let decay = [(0, 2), (3, 1)];
        for g in [[0.1f32, -0.2, 0.3, 0.05, -0.4], [0.05, 0.4, -0.1, 0.2, 0.0]] {
            oa.update(&mut a, &decay, &mut Tensor::from_slice(&g), 0.01);
            ob.update_fused(&mut b, &decay, &mut Tensor::from_slice(&g), 0.01).unwrap();
        }
        assert!(a.allclose(&b, 1e-6, 1e-7, false), "{a} vs {b}");
        assert!(oa.exp_avg_sq.allclose(&ob.exp_avg_sq, 1e-6, 1e-9, false));
        assert_eq!(ob.step, 2);
    }
}
