//! DeepSpeed's fp16 loss scaler (`fp16.loss_scale`, `initial_scale_power`,
//! `loss_scale_window`, `hysteresis`, `consecutive_hysteresis`,
//! `min_loss_scale`), re-stated from DeepSpeed's documented behaviour.
//!
//! A *static* scaler (`loss_scale > 0`) multiplies the loss by a fixed factor;
//! an iteration whose gradients overflow is still skipped.
//!
//! A *dynamic* scaler (`loss_scale == 0`) starts at `2^initial_scale_power`
//! and, after each iteration:
//! - on overflow, records the iteration as the last overflow; if hysteresis is
//!   off (`hysteresis == 1`) or used up (`cur_hysteresis == 1`) the scale is
//!   halved, but never below `min_loss_scale` (and overflowing while already at
//!   the minimum is an error); otherwise one unit of hysteresis is spent and the
//!   scale is kept;
//! - on a clean step, refills the hysteresis when `consecutive_hysteresis` is
//!   set; then, counting the clean steps since the last overflow (excluding the
//!   current one), doubles the scale whenever that count is a positive multiple
//!   of `loss_scale_window` and, without `consecutive_hysteresis`, refills the
//!   hysteresis only then;
//! - in both cases advances the iteration counter.
//!
//! Every overflow means the optimizer step and the LR-schedule step are skipped.

use crate::error::{Error, Result};

/// The resolved fp16 loss-scaling settings.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerConfig {
    /// 0 = dynamic (DeepSpeed's `fp16.loss_scale: 0`); > 0 = a static scale.
    pub loss_scale: f64,
    /// Dynamic start: `2^initial_scale_power`.
    pub initial_scale_power: u32,
    /// Clean iterations between two doublings (W).
    pub loss_scale_window: u64,
    /// Overflows tolerated before halving (H); 1 = halve on every overflow.
    pub hysteresis: u32,
    /// Refill the hysteresis on every clean step instead of only on growth.
    pub consecutive_hysteresis: bool,
    /// The scale never goes below this.
    pub min_loss_scale: f64,
}

impl Default for ScalerConfig {
    /// DeepSpeed's defaults.
    fn default() -> Self {
        ScalerConfig { loss_scale: 0.0, initial_scale_power: 16, loss_scale_window: 1000, hysteresis: 2, consecutive_hysteresis: false, min_loss_scale: 1.0 }
    }
}

impl ScalerConfig {
    pub fn is_dynamic(&self) -> bool {
        self.loss_scale == 0.0
    }

    /// Rejects values the rules cannot work with (negative or non-finite
    /// scales; for a dynamic scaler a zero window or hysteresis, a
    /// non-positive minimum, or a start scale below the minimum).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        if !self.loss_scale.is_finite() || self.loss_scale < 0.0 {
            return bad(format!("fp16.loss_scale must be 0 (dynamic) or positive, got {}", self.loss_scale));
        }
        if !self.is_dynamic() {
            return Ok(());
        }
        if self.loss_scale_window == 0 {
            return bad("fp16.loss_scale_window must be at least 1".into());
        }
        if self.hysteresis == 0 {
            return bad("fp16.hysteresis must be at least 1".into());
        }
        if !self.min_loss_scale.is_finite() || self.min_loss_scale <= 0.0 {
            return bad(format!("fp16.min_loss_scale must be positive, got {}", self.min_loss_scale));
        }
        let start = 2f64.powi(self.initial_scale_power.min(i32::MAX as u32) as i32);
        if !start.is_finite() || start < self.min_loss_scale {
            return bad(format!(
                "fp16.initial_scale_power {} gives a start scale {start} outside [min_loss_scale {}, f64 range)",
                self.initial_scale_power, self.min_loss_scale
            ));
        }
        Ok(())
    }
}

/// Everything that must survive a checkpoint (serialised into the checkpoint's state.json).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerState {
    pub scale: f64,
    pub cur_hysteresis: u32,
    /// Iteration of the last overflow; -1 before the first one.
    pub last_overflow_iter: i64,
    /// Number of `update` calls so far.
    pub iter: i64,
}

/// A loss scaler: its settings and its checkpointed state.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub cfg: ScalerConfig,
    pub state: ScalerState,
}

/// What one `update` did (the trainer logs it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleEvent {
    /// No overflow; `grown` = Some((from, to)) when the scale doubled this step.
    Clean { grown: Option<(f64, f64)> },
    /// Overflow: the optimizer step (and the LR-schedule step) must be skipped.
    /// `from`/`to` = the scale before/after (equal when hysteresis absorbed it or the scale is static).
    Overflow { from: f64, to: f64, hysteresis_left: u32 },
}

impl LossScaler {
    /// A fresh scaler: the static scale, or `2^initial_scale_power` when dynamic.
    pub fn new(cfg: ScalerConfig) -> Self {
        let scale = if cfg.is_dynamic() { 2f64.powi(cfg.initial_scale_power.min(i32::MAX as u32) as i32) } else { cfg.loss_scale };
        let state = ScalerState { scale, cur_hysteresis: cfg.hysteresis, last_overflow_iter: -1, iter: 0 };
        LossScaler { cfg, state }
    }

    /// Resumes from a checkpointed state.
    pub fn from_state(cfg: ScalerConfig, state: ScalerState) -> Self {
        LossScaler { cfg, state }
    }

    /// The current factor the loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// One line for the log, e.g. "dynamic loss scale 65536 (window 1000, hysteresis 2, min 1)".
    pub fn describe(&self) -> String {
        let c = &self.cfg;
        if !c.is_dynamic() {
            return format!("static loss scale {}", self.state.scale);
        }
        format!(
            "dynamic loss scale {} (window {}, hysteresis {}{}, min {})",
            self.state.scale,
            c.loss_scale_window,
            c.hysteresis,
            if c.consecutive_hysteresis { " consecutive" } else { "" },
            c.min_loss_scale
        )
    }

    /// Applies one iteration's outcome. Fails (leaving the state untouched,
    /// as DeepSpeed raises before recording anything) when a dynamic scaler
    /// overflows while already at `min_loss_scale` and would have to halve.
    pub fn update(&mut self, overflow: bool) -> Result<ScaleEvent> {
        let (c, s) = (&self.cfg, &mut self.state);
        let from = s.scale;
        let event = if !c.is_dynamic() {
            if overflow {
                s.last_overflow_iter = s.iter;
                ScaleEvent::Overflow { from, to: from, hysteresis_left: s.cur_hysteresis }
            } else {
                ScaleEvent::Clean { grown: None }
            }
        } else if overflow {
            if c.hysteresis == 1 || s.cur_hysteresis == 1 {
                if s.scale == c.min_loss_scale {
                    return Err(Error::Config(format!(
                        "fp16 loss scale is already at its minimum {} (min_loss_scale) and gradients \
                         overflow even so at iteration {}; lower the learning rate, check the data \
                         for bad samples, or train in bf16 instead of fp16",
                        c.min_loss_scale, s.iter
                    )));
                }
                s.scale = (s.scale / 2.0).max(c.min_loss_scale);
            } else {
                // Saturating: a hysteresis of 0 (rejected by `validate`) then never halves.
                s.cur_hysteresis = s.cur_hysteresis.saturating_sub(1);
            }
            s.last_overflow_iter = s.iter;
            ScaleEvent::Overflow { from, to: s.scale, hysteresis_left: s.cur_hysteresis }
        } else {
            if c.consecutive_hysteresis {
                s.cur_hysteresis = c.hysteresis;
            }
            let stable = s.iter - s.last_overflow_iter - 1;
            // `checked_rem`: a window of 0 (rejected by `validate`) never grows.
            let window = i64::try_from(c.loss_scale_window).unwrap_or(i64::MAX);
            let grown = if stable > 0 && stable.checked_rem(window) == Some(0) {
                s.scale *= 2.0;
                if !c.consecutive_hysteresis {
                    s.cur_hysteresis = c.hysteresis;
                }
                Some((from, s.scale))
            } else {
                None
            };
            ScaleEvent::Clean { grown }
        };
        s.iter += 1;
        Ok(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic(power: u32, window: u64, hysteresis: u32, consecutive: bool, min: f64) -> ScalerConfig {
        ScalerConfig {
            loss_scale: 0.0,
            initial_scale_power: power,
            loss_scale_window: window,
            hysteresis,
            consecutive_hysteresis: consecutive,
            min_loss_scale: min,
        }
    }

    /// Independent re-statement of the rules over plain variables: the
    /// (scale, cur_hysteresis, last_overflow_iter, iter) after each step,
    /// ending early (with `true`) at the step that hits the minimum.
    fn reference(cfg: &ScalerConfig, overflows: &[bool]) -> (Vec<(f64, u32, i64, i64)>, bool) {
        let mut scale = 2f64.powi(cfg.initial_scale_power as i32);
        let mut hyst = cfg.hysteresis;
        let mut last: i64 = -1;
        let mut trace = Vec::new();
        for (i, &ov) in overflows.iter().enumerate() {
            let i = i as i64;
            if ov {
                let must_halve = cfg.hysteresis == 1 || hyst == 1;
                if must_halve && scale == cfg.min_loss_scale {
                    return (trace, true);
                }
                if must_halve {
                    scale = if scale / 2.0 < cfg.min_loss_scale { cfg.min_loss_scale } else { scale / 2.0 };
                } else {
                    hyst -= 1;
                }
                last = i;
            } else {
                let clean_before = i - last - 1;
                let grow = clean_before > 0 && clean_before % cfg.loss_scale_window as i64 == 0;
                if grow {
                    scale *= 2.0;
                }
                if cfg.consecutive_hysteresis || grow {
                    hyst = cfg.hysteresis;
                }
            }
            trace.push((scale, hyst, last, i + 1));
        }
        (trace, false)
    }

    /// Deterministic overflow pattern: `true` with probability ~`percent`%.
    fn lcg_pattern(seed: u64, n: usize, percent: u64) -> Vec<bool> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (x >> 33) % 100 < percent
            })
            .collect()
    }

    /// `update` with the error as text, so results can be compared.
    fn up(s: &mut LossScaler, overflow: bool) -> std::result::Result<ScaleEvent, String> {
        s.update(overflow).map_err(|e| e.to_string())
    }

    fn tuple(s: &ScalerState) -> (f64, u32, i64, i64) {
        (s.scale, s.cur_hysteresis, s.last_overflow_iter, s.iter)
    }

    #[test]
    fn defaults_and_describe() {
        let cfg = ScalerConfig::default();
        assert!(cfg.is_dynamic());
        assert!(cfg.validate().is_ok());
        let s = LossScaler::new(cfg);
        assert_eq!(s.scale(), 65536.0);
        assert_eq!(s.state, ScalerState { scale: 65536.0, cur_hysteresis: 2, last_overflow_iter: -1, iter: 0 });
        assert_eq!(s.describe(), "dynamic loss scale 65536 (window 1000, hysteresis 2, min 1)");
        let st = LossScaler::new(ScalerConfig { loss_scale: 128.0, ..Default::default() });
        assert_eq!(st.describe(), "static loss scale 128");
        assert!(ScalerConfig { loss_scale_window: 0, ..Default::default() }.validate().is_err());
        assert!(ScalerConfig { hysteresis: 0, ..Default::default() }.validate().is_err());
        assert!(ScalerConfig { min_loss_scale: 0.0, ..Default::default() }.validate().is_err());
        assert!(ScalerConfig { loss_scale: -1.0, ..Default::default() }.validate().is_err());
        assert!(dynamic(1, 10, 2, false, 4.0).validate().is_err());
    }

    #[test]
    fn window_growth() {
        // last_overflow_iter = -1, so stable = iter: doubles at iters 3, 6, 9.
        let mut s = LossScaler::new(dynamic(0, 3, 2, false, 1.0));
        let mut scales = Vec::new();
        for i in 0..10 {
            let ev = up(&mut s, false).unwrap();
            let grew = matches!(ev, ScaleEvent::Clean { grown: Some(_) });
            assert_eq!(grew, i == 3 || i == 6 || i == 9, "iter {i}");
            scales.push(s.scale());
        }
        assert_eq!(scales, [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0, 8.0]);
        assert_eq!(s.state.iter, 10);
    }

    #[test]
    fn hysteresis_non_consecutive() {
        let mut s = LossScaler::new(dynamic(4, 4, 2, false, 1.0));
        let ov = |from, to| Ok(ScaleEvent::Overflow { from, to, hysteresis_left: 1 });
        let clean = Ok(ScaleEvent::Clean { grown: None });
        assert_eq!(up(&mut s, true), ov(16.0, 16.0)); // iter 0: absorbed
        assert_eq!(up(&mut s, true), ov(16.0, 8.0)); // iter 1: halves
        assert_eq!(up(&mut s, false), clean); // iters 2, 3: no refill
        assert_eq!(up(&mut s, false), clean);
        assert_eq!(s.state.cur_hysteresis, 1);
        assert_eq!(up(&mut s, true), ov(8.0, 4.0)); // iter 4: halves at once
        for _ in 5..9 {
            assert_eq!(up(&mut s, false), clean);
            assert_eq!(s.state.cur_hysteresis, 1);
        }
        // iter 9: stable = 9 - 4 - 1 = 4 = W, grows and refills.
        assert_eq!(up(&mut s, false), Ok(ScaleEvent::Clean { grown: Some((4.0, 8.0)) }));
        assert_eq!(s.state.cur_hysteresis, 2);
        assert_eq!(up(&mut s, true), ov(8.0, 8.0)); // iter 10: absorbed again
        assert_eq!(s.state, ScalerState { scale: 8.0, cur_hysteresis: 1, last_overflow_iter: 10, iter: 11 });
    }

    #[test]
    fn hysteresis_consecutive_refills() {
        let mut s = LossScaler::new(dynamic(4, 1000, 2, true, 1.0));
        for _ in 0..50 {
            assert_eq!(up(&mut s, true), Ok(ScaleEvent::Overflow { from: 16.0, to: 16.0, hysteresis_left: 1 }));
            assert_eq!(up(&mut s, false), Ok(ScaleEvent::Clean { grown: None }));
            assert_eq!(s.state.cur_hysteresis, 2);
        }
        // The same pattern without consecutive hysteresis halves on the second overflow.
        let mut n = LossScaler::new(dynamic(4, 1000, 2, false, 1.0));
        for ov in [true, false, true] {
            n.update(ov).unwrap();
        }
        assert_eq!(n.scale(), 8.0);
    }

    #[test]
    fn minimum_is_an_error() {
        let mut s = LossScaler::new(dynamic(3, 1000, 1, false, 4.0));
        assert_eq!(up(&mut s, true), Ok(ScaleEvent::Overflow { from: 8.0, to: 4.0, hysteresis_left: 1 }));
        let before = s.state.clone();
        let err = s.update(true).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        let msg = err.to_string();
        assert!(msg.contains("minimum 4") && msg.contains("bf16"), "{msg}");
        assert_eq!(s.state, before, "an error leaves the state untouched");

        let mut s = LossScaler::new(dynamic(4, 1000, 1, false, 4.0));
        assert_eq!(up(&mut s, true).map(|_| s.scale()), Ok(8.0));
        assert_eq!(up(&mut s, true).map(|_| s.scale()), Ok(4.0));
        assert!(up(&mut s, true).unwrap_err().contains("minimum"));

        // Halving clamps to the minimum rather than going below it.
        let mut s = LossScaler::new(dynamic(2, 1000, 1, false, 3.0));
        assert_eq!(up(&mut s, true), Ok(ScaleEvent::Overflow { from: 4.0, to: 3.0, hysteresis_left: 1 }));
        assert!(up(&mut s, true).is_err());
    }

    #[test]
    fn static_scaler() {
        let mut s = LossScaler::new(ScalerConfig { loss_scale: 128.0, ..Default::default() });
        for (i, ov) in lcg_pattern(7, 3000, 30).into_iter().enumerate() {
            let ev = s.update(ov).unwrap();
            if ov {
                assert_eq!(ev, ScaleEvent::Overflow { from: 128.0, to: 128.0, hysteresis_left: 2 });
            } else {
                assert_eq!(ev, ScaleEvent::Clean { grown: None });
            }
            assert_eq!(s.state.iter, i as i64 + 1);
            assert_eq!(s.scale(), 128.0);
        }
    }

    #[test]
    fn state_round_trip_resumes_identically() {
        let cfg = dynamic(16, 5, 2, false, 1.0);
        let pattern = lcg_pattern(42, 200, 10);
        let mut whole = LossScaler::new(cfg.clone());
        let mut part = LossScaler::new(cfg.clone());
        for (i, &ov) in pattern.iter().enumerate() {
            if i % 37 == 0 {
                let json = serde_json::to_string(&part.state).unwrap();
                let state: ScalerState = serde_json::from_str(&json).unwrap();
                assert_eq!(state, part.state);
                part = LossScaler::from_state(cfg.clone(), state);
            }
            assert_eq!(up(&mut whole, ov), up(&mut part, ov));
            assert_eq!(whole.state, part.state, "step {i}");
        }
        assert!(whole.state.iter == 200 && whole.state.last_overflow_iter >= 0);
    }

    #[test]
    fn long_sequences_match_reference() {
        let cases = [(16, 10, 1.0, 1u64), (4, 10, 1.0, 2), (5, 45, 2.0, 3), (3, 60, 1.0, 4)];
        for consecutive in [false, true] {
            for &(power, percent, min, seed) in &cases {
                let cfg = dynamic(power, 7, 3, consecutive, min);
                let pattern = lcg_pattern(seed, 500, percent);
                let (expected, ref_err) = reference(&cfg, &pattern);
                let mut s = LossScaler::new(cfg);
                for (i, &ov) in pattern.iter().enumerate() {
                    match s.update(ov) {
                        Ok(_) => assert_eq!(Some(&tuple(&s.state)), expected.get(i), "step {i}"),
                        Err(_) => {
                            assert!(ref_err && expected.len() == i, "implementation erred alone at {i}");
                            break;
                        }
                    }
                }
                if !ref_err {
                    assert_eq!(s.state.iter, 500);
                }
            }
        }
    }
}
