//! Learning-rate schedules: the original's AnnealingLR and DeepSpeed's
//! WarmupLR / WarmupDecayLR / WarmupCosineLR (which take precedence when the
//! DeepSpeed config has a `scheduler` block).

use glm_common::ds::SchedulerCfg;

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// GLM's AnnealingLR: linear warmup over `warmup_iters` from 0 to `lr`,
    /// then `style` decay to `lr · decay_ratio` at `decay_iters`, flat after.
    Annealing {
        lr: f64,
        warmup_iters: u64,
        decay_iters: u64,
        style: Decay,
        decay_ratio: f64,
    },
    DeepSpeed {
        cfg: SchedulerCfg,
        base_lr: f64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

impl Decay {
    pub fn parse(s: &str) -> Option<Decay> {
        match s {
            "cosine" => Some(Decay::Cosine),
            "linear" => Some(Decay::Linear),
            "constant" | "None" | "none" => Some(Decay::Constant),
            _ => None,
        }
    }
}

impl Schedule {
    /// Learning rate of iteration `it` (1-based: the first update is it = 1).
    pub fn lr(&self, it: u64) -> f64 {
        match self {
            Schedule::Annealing { lr, warmup_iters, decay_iters, style, decay_ratio } => {
                if *warmup_iters > 0 && it <= *warmup_iters {
                    return lr * it as f64 / *warmup_iters as f64;
                }
                let min = lr * decay_ratio;
                let span = decay_iters.saturating_sub(*warmup_iters).max(1) as f64;
                let p = ((it.saturating_sub(*warmup_iters)) as f64 / span).min(1.0);
                match style {
                    Decay::Constant => *lr,
                    Decay::Linear => min + (lr - min) * (1.0 - p),
                    Decay::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
                }
            }
            Schedule::DeepSpeed { cfg, base_lr } => {
                // DeepSpeed counts its scheduler steps from 0 at the first update
                let t = it.saturating_sub(1) as f64;
                let warm = |w: u64, log: bool| -> f64 {
                    if t >= w as f64 {
                        1.0
                    } else if log {
                        (t + 1.0).ln() / (w as f64).ln()
                    } else {
                        t / w as f64
                    }
                };
                match *cfg {
                    SchedulerCfg::WarmupLr { min_lr, max_lr, warmup_steps, log } => {
                        let max = max_lr.unwrap_or(*base_lr);
                        min_lr + (max - min_lr) * warm(warmup_steps, log)
                    }
                    SchedulerCfg::WarmupDecayLr { min_lr, max_lr, warmup_steps, log, total_steps } => {
                        let max = max_lr.unwrap_or(*base_lr);
                        let g = if t < warmup_steps as f64 {
                            warm(warmup_steps, log)
                        } else {
                            ((total_steps as f64 - t) / (total_steps.saturating_sub(warmup_steps)).max(1) as f64).max(0.0)
                        };
                        min_lr + (max - min_lr) * g
                    }
                    SchedulerCfg::WarmupCosineLr { warmup_min_ratio, cos_min_ratio, warmup_steps, total_steps, log } => {
                        let ratio = if t < warmup_steps as f64 {
                            warmup_min_ratio + warm(warmup_steps, log) * (1.0 - warmup_min_ratio)
                        } else {
                            let p = ((t - warmup_steps as f64 + 1.0) / (total_steps.saturating_sub(warmup_steps)).max(1) as f64).min(1.0);
                            (cos_min_ratio + (1.0 - cos_min_ratio) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0).max(0.0)
                        };
                        base_lr * ratio
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annealing_warms_up_then_decays_to_the_floor() {
        let s = Schedule::Annealing { lr: 1.0, warmup_iters: 10, decay_iters: 110, style: Decay::Cosine, decay_ratio: 0.1 };
        assert!((s.lr(1) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        let s = Schedule::Annealing { lr: 1.0, warmup_iters: 0, decay_iters: 100, style: Decay::Linear, decay_ratio: 0.0 };
        assert!((s.lr(50) - 0.5).abs() < 1e-12);
        let s = Schedule::Annealing { lr: 2.0, warmup_iters: 0, decay_iters: 100, style: Decay::Constant, decay_ratio: 0.0 };
        assert_eq!(s.lr(70), 2.0);
    }

    #[test]
    fn deepspeed_schedules() {
        let w = Schedule::DeepSpeed { cfg: SchedulerCfg::WarmupLr { min_lr: 0.0, max_lr: Some(1.0), warmup_steps: 10, log: false }, base_lr: 5.0 };
        assert_eq!(w.lr(1), 0.0);
        assert!((w.lr(6) - 0.5).abs() < 1e-12);
        assert_eq!(w.lr(100), 1.0);
        let l = Schedule::DeepSpeed { cfg: SchedulerCfg::WarmupLr { min_lr: 0.0, max_lr: None, warmup_steps: 100, log: true }, base_lr: 1.0 };
        assert!((l.lr(10) - (10f64).ln() / (100f64).ln()).abs() < 1e-12);
        let d = Schedule::DeepSpeed {
            cfg: SchedulerCfg::WarmupDecayLr { min_lr: 0.0, max_lr: Some(1.0), warmup_steps: 10, log: false, total_steps: 110 },
            base_lr: 1.0,
        };
        assert!((d.lr(61) - 0.5).abs() < 1e-12);
        assert_eq!(d.lr(500), 0.0);
        let c = Schedule::DeepSpeed {
            cfg: SchedulerCfg::WarmupCosineLr { warmup_min_ratio: 0.0, cos_min_ratio: 0.0, warmup_steps: 10, total_steps: 110, log: false },
            base_lr: 2.0,
        };
        assert!((c.lr(6) - 1.0).abs() < 1e-12);
        assert!((c.lr(60) - 1.0).abs() < 1e-12); // p = 0.5 -> ratio 0.5
        assert!(c.lr(200).abs() < 1e-12);
    }
}
