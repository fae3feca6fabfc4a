//! Learning-rate schedules: the original's AnnealingLR and DeepSpeed's
//! WarmupLR / WarmupDecayLR / WarmupCosineLR (which take precedence when the
//! DeepSpeed config has a `scheduler` block).

use glm_common::ds::SchedulerCfg;

#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    /// GLM's AnnealingLR (learning_rates.py, as pretrain_glm.py builds
    /// it): linear warmup over `warmup_iters` (= warmup × decay_iters, not
    /// rounded) from 0 to `lr`, then `style` decay over the next
    /// `decay_iters - warmup_iters` updates to `lr · decay_ratio`, flat
    /// after. (The original's linear decay keeps falling past decay_iters,
    /// below zero in the end; here it stays at the floor, which the run
    /// announces.)
    Annealing {
        lr: f64,
        warmup_iters: f64,
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
    /// Learning rate of the update that follows `done` applied updates (0
    /// for the first), as both the original's AnnealingLR and DeepSpeed's
    /// schedulers count: they step after each update, so the first update
    /// runs at the schedule's value for 0 (lr 0 under warmup).
    pub fn lr(&self, done: u64) -> f64 {
        match self {
            Schedule::Annealing { lr, warmup_iters, decay_iters, style, decay_ratio } => {
                let n = done as f64;
                if *warmup_iters > 0.0 && n <= *warmup_iters {
                    return lr * n / warmup_iters;
                }
                let min = lr * decay_ratio;
                let span = (*decay_iters as f64 - warmup_iters).max(1.0);
                let p = ((n - warmup_iters) / span).clamp(0.0, 1.0);
                match style {
                    Decay::Constant => *lr,
                    Decay::Linear => min + (lr - min) * (1.0 - p),
                    Decay::Cosine => min + (lr - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
                }
            }
            Schedule::DeepSpeed { cfg, base_lr } => {
                let t = done as f64;
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

    /// The original's AnnealingLR, stepped as its train_step steps it:
    /// `num_iters` = updates done, warmup_iter = warmup × decay iters
    /// (a float), decay over decay_iters − warmup_iter.
    #[test]
    fn annealing_counts_updates_done_as_the_original() {
        let s = Schedule::Annealing { lr: 1.0, warmup_iters: 10.0, decay_iters: 110, style: Decay::Cosine, decay_ratio: 0.1 };
        assert_eq!(s.lr(0), 0.0, "the first update runs at lr 0");
        assert!((s.lr(1) - 0.1).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        // warmup 0.05 of 30 iterations: 1.5 warmup iterations, not 1
        let s = Schedule::Annealing { lr: 1.0, warmup_iters: 1.5, decay_iters: 30, style: Decay::Linear, decay_ratio: 0.0 };
        assert!((s.lr(1) - 1.0 / 1.5).abs() < 1e-12);
        assert!((s.lr(2) - (1.0 - 0.5 / 28.5)).abs() < 1e-12);
        let s = Schedule::Annealing { lr: 1.0, warmup_iters: 0.0, decay_iters: 100, style: Decay::Linear, decay_ratio: 0.0 };
        assert_eq!(s.lr(0), 1.0, "no warmup: the first update at lr");
        assert!((s.lr(50) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(150), 0.0, "linear stays at the floor past decay_iters");
        let s = Schedule::Annealing { lr: 2.0, warmup_iters: 0.0, decay_iters: 100, style: Decay::Constant, decay_ratio: 0.0 };
        assert_eq!(s.lr(70), 2.0);
    }

    #[test]
    fn deepspeed_schedules() {
        let w = Schedule::DeepSpeed { cfg: SchedulerCfg::WarmupLr { min_lr: 0.0, max_lr: Some(1.0), warmup_steps: 10, log: false }, base_lr: 5.0 };
        assert_eq!(w.lr(0), 0.0);
        assert!((w.lr(5) - 0.5).abs() < 1e-12);
        assert_eq!(w.lr(100), 1.0);
        let l = Schedule::DeepSpeed { cfg: SchedulerCfg::WarmupLr { min_lr: 0.0, max_lr: None, warmup_steps: 100, log: true }, base_lr: 1.0 };
        assert!((l.lr(9) - (10f64).ln() / (100f64).ln()).abs() < 1e-12);
        let d = Schedule::DeepSpeed {
            cfg: SchedulerCfg::WarmupDecayLr { min_lr: 0.0, max_lr: Some(1.0), warmup_steps: 10, log: false, total_steps: 110 },
            base_lr: 1.0,
        };
        assert!((d.lr(60) - 0.5).abs() < 1e-12);
        assert_eq!(d.lr(500), 0.0);
        let c = Schedule::DeepSpeed {
            cfg: SchedulerCfg::WarmupCosineLr { warmup_min_ratio: 0.0, cos_min_ratio: 0.0, warmup_steps: 10, total_steps: 110, log: false },
            base_lr: 2.0,
        };
        assert!((c.lr(5) - 1.0).abs() < 1e-12);
        assert!((c.lr(59) - 1.0).abs() < 1e-12); // p = 0.5 -> ratio 0.5
        assert!(c.lr(200).abs() < 1e-12);
    }
}
