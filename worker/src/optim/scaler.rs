//! DeepSpeed's fp16 loss scaling, on each of DeepSpeed's two code paths.
//!
//! DeepSpeed scales the loss in fp16 with one of two pieces of code, chosen
//! by the ZeRO stage, and they do not follow the same rules
//! (`../shared/reference.md`, "Dynamic loss scaling"):
//!
//! - **ZeRO stage 0** runs `FP16_Optimizer._update_scale`
//!   (`deepspeed/runtime/fp16/fused_optimizer.py`; `FP16_UnfusedOptimizer`,
//!   which DeepSpeed takes for `optimizer.params.torch_adam: true`, has the
//!   same rule, but without dynamic keys a minimum of 0.25: the
//!   configuration passes that as `min_loss_scale`): no hysteresis, an overflow halves the scale (never
//!   below `min_loss_scale`, and at the minimum it simply stays and keeps
//!   skipping), a clean step doubles it when the clean steps since the last
//!   overflow, *not counting this one*, are a positive multiple of the window.
//! - **ZeRO stage 1-3** runs `DynamicLossScaler.update_scale`
//!   (`deepspeed/runtime/fp16/loss_scaler.py`): hysteresis (`delayed_shift`)
//!   absorbs overflows before one halves the scale, an overflow that must
//!   halve at the minimum is an error, and a clean step doubles the scale
//!   when the steps since the last overflow, *this one included*, are a
//!   multiple of the window.
//!
//! Both count every update (`iter`), skipped or not, and both skip the
//! optimizer and learning-rate steps on overflow. A static scale
//! (`loss_scale > 0`) never changes; an overflow still skips the step.
//! [`ScalerRules`] names the path; [`LossScaler::update`] follows it, one
//! function per path, each a few lines to read beside DeepSpeed's.

use crate::error::{Error, Result};

/// Which of DeepSpeed's fp16 code paths the scaler follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScalerRules {
    /// ZeRO stage 0: `FP16_Optimizer` (no hysteresis, no error at the minimum).
    Fp16Optimizer,
    /// ZeRO stages 1-3: `DynamicLossScaler` (hysteresis, error at the minimum).
    DynamicLossScaler,
}

impl ScalerRules {
    /// The path DeepSpeed takes at ZeRO stage `stage`.
    pub fn for_stage(stage: u8) -> Self {
        if stage == 0 {
            ScalerRules::Fp16Optimizer
        } else {
            ScalerRules::DynamicLossScaler
        }
    }

    /// The DeepSpeed code and the stages that run it, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ScalerRules::Fp16Optimizer => "FP16_Optimizer's rules (ZeRO stage 0)",
            ScalerRules::DynamicLossScaler => "DynamicLossScaler's rules (ZeRO stages 1-3)",
        }
    }
}

/// The `fp16` block's dynamic-scaling keys as given (`None`: absent).
/// DeepSpeed treats them as a group: if any is given, the absent ones take
/// the `dynamic_loss_scale_args` defaults (16, 1000, 2, false, 1); if none
/// is, each code path's constructor defaults apply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DynamicKeys {
    pub initial_scale_power: Option<u32>,
    pub loss_scale_window: Option<u64>,
    pub hysteresis: Option<u32>,
    pub consecutive_hysteresis: Option<bool>,
    pub min_loss_scale: Option<f64>,
}

impl DynamicKeys {
    pub fn any(&self) -> bool {
        self.initial_scale_power.is_some()
            || self.loss_scale_window.is_some()
            || self.hysteresis.is_some()
            || self.consecutive_hysteresis.is_some()
            || self.min_loss_scale.is_some()
    }
}

/// The resolved fp16 loss-scaling settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalerConfig {
    /// The code path (from the ZeRO stage).
    pub rules: ScalerRules,
    /// 0 = dynamic (DeepSpeed's `fp16.loss_scale: 0`); > 0 = a static scale.
    pub loss_scale: f64,
    /// Dynamic start: `2^initial_scale_power`.
    pub initial_scale_power: u32,
    /// The growth window (W).
    pub loss_scale_window: u64,
    /// `DynamicLossScaler` only: overflows absorbed before halving (1 = halve
    /// on every overflow). `FP16_Optimizer` reads the key and ignores it.
    pub hysteresis: u32,
    /// `DynamicLossScaler` only: refill the hysteresis on every clean step
    /// instead of only on growth.
    pub consecutive_hysteresis: bool,
    /// The scale never goes below this.
    pub min_loss_scale: f64,
}

impl ScalerConfig {
    /// DeepSpeed's settings for `fp16.loss_scale` and the dynamic keys as
    /// given, on `rules`' path: any key given, the others default to
    /// power 16, window 1000, hysteresis 2, not consecutive, min 1
    /// (`runtime/config.py`); none given, the path's constructor defaults:
    /// `FP16_Optimizer` 2^16 (`initial_scale_power`'s default), window 1000,
    /// min 1; `DynamicLossScaler` 2^32, window 1000, hysteresis 1, min 1.
    pub fn resolve(loss_scale: f64, keys: &DynamicKeys, rules: ScalerRules) -> Self {
        let (power, hysteresis) = match (keys.any(), rules) {
            (true, _) => (16, 2),
            (false, ScalerRules::Fp16Optimizer) => (16, 1),
            (false, ScalerRules::DynamicLossScaler) => (32, 1),
        };
        ScalerConfig {
            rules,
            loss_scale,
            initial_scale_power: keys.initial_scale_power.unwrap_or(power),
            loss_scale_window: keys.loss_scale_window.unwrap_or(1000),
            hysteresis: keys.hysteresis.unwrap_or(hysteresis),
            consecutive_hysteresis: keys.consecutive_hysteresis.unwrap_or(false),
            min_loss_scale: keys.min_loss_scale.unwrap_or(1.0),
        }
    }

    /// DeepSpeed's defaults on the path of ZeRO stage `stage` (an `fp16`
    /// block with `enabled` only).
    pub fn defaults(stage: u8) -> Self {
        Self::resolve(0.0, &DynamicKeys::default(), ScalerRules::for_stage(stage))
    }

    pub fn is_dynamic(&self) -> bool {
        self.loss_scale == 0.0
    }

    /// The first scale: the static one, or `2^initial_scale_power`.
    pub fn start_scale(&self) -> f64 {
        if self.is_dynamic() {
            2f64.powi(self.initial_scale_power.min(i32::MAX as u32) as i32)
        } else {
            self.loss_scale
        }
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
        let start = self.start_scale();
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
    /// `DynamicLossScaler`'s hysteresis left (unused by `FP16_Optimizer`).
    pub cur_hysteresis: u32,
    /// Iteration of the last overflow; -1 before the first one.
    pub last_overflow_iter: i64,
    /// Number of `update` calls so far.
    pub iter: i64,
    /// The path this state was produced under (absent in checkpoints
    /// written before the scaler followed DeepSpeed's paths separately).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<ScalerRules>,
}

/// A loss scaler: its settings and its checkpointed state.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub cfg: ScalerConfig,
    pub state: ScalerState,
}

/// A doubling of the scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Growth {
    pub from: f64,
    pub to: f64,
    /// Clean iterations since the last overflow (or the start), this one included.
    pub clean_iters: i64,
}

/// What one `update` did (the trainer logs it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleEvent {
    /// No overflow; `grown` when the scale doubled this step.
    Clean { grown: Option<Growth> },
    /// Overflow: the optimizer step (and the LR-schedule step) must be
    /// skipped. `from`/`to`: the scale before/after (equal when hysteresis
    /// absorbed it, the scale is static, or it stays at the minimum).
    Overflow {
        from: f64,
        to: f64,
        /// `DynamicLossScaler` absorbed the overflow: the hysteresis it had
        /// (DeepSpeed logs "hysteresis is {h}. Reducing hysteresis to {h-1}").
        hysteresis: Option<u32>,
        /// `FP16_Optimizer` at `min_loss_scale`: it stays there and keeps skipping.
        at_minimum: bool,
    },
}

impl LossScaler {
    /// A fresh scaler: the static scale, or `2^initial_scale_power` when dynamic.
    pub fn new(cfg: ScalerConfig) -> Self {
        let state = ScalerState { scale: cfg.start_scale(), cur_hysteresis: cfg.hysteresis.max(1), last_overflow_iter: -1, iter: 0, rules: Some(cfg.rules) };
        LossScaler { cfg, state }
    }

    /// Resumes from a checkpointed state under this run's settings (`cfg`):
    /// the scale, the iteration and the last overflow carry over exactly.
    /// Returns a line for the log when the state is not taken as saved: it
    /// was produced on the other code path (another ZeRO stage: the
    /// hysteresis count starts full, or is dropped), before the paths were
    /// told apart, or this run has a static scale.
    pub fn resume(cfg: ScalerConfig, saved: ScalerState) -> (Self, Option<String>) {
        let mut state = ScalerState { rules: Some(cfg.rules), ..saved.clone() };
        let mut notes = Vec::new();
        // hysteresis left within this run's (a saved count above a lowered
        // hysteresis, or 0 from a static scaler's settings, cannot go on)
        let cap = cfg.hysteresis.max(1);
        if cfg.rules == ScalerRules::DynamicLossScaler && saved.rules == Some(cfg.rules) && !(1..=cap).contains(&saved.cur_hysteresis) {
            state.cur_hysteresis = saved.cur_hysteresis.clamp(1, cap);
            notes.push(format!("the saved hysteresis count {} is outside this run's 1..={cap}: continued at {}", saved.cur_hysteresis, state.cur_hysteresis));
        }
        match saved.rules {
            Some(r) if r == cfg.rules => {}
            Some(r) => {
                let hyst = match cfg.rules {
                    ScalerRules::DynamicLossScaler => {
                        state.cur_hysteresis = cfg.hysteresis;
                        format!("hysteresis starts full ({})", cfg.hysteresis)
                    }
                    ScalerRules::Fp16Optimizer => format!("its hysteresis count ({}) is dropped: this path has none", saved.cur_hysteresis),
                };
                notes.push(format!(
                    "saved under {}, continued under {}: scale {}, iteration {} and last overflow {} carried over; {hyst}",
                    r.name(),
                    cfg.rules.name(),
                    saved.scale,
                    saved.iter,
                    saved.last_overflow_iter
                ));
            }
            None => notes.push(format!(
                "the checkpoint predates per-stage loss-scaler rules; its state (scale {}, hysteresis {}, iteration {}) continues under {}",
                saved.scale,
                saved.cur_hysteresis,
                saved.iter,
                cfg.rules.name()
            )),
        }
        if !cfg.is_dynamic() && saved.scale != cfg.loss_scale {
            state.scale = cfg.loss_scale;
            notes.push(format!("this run's static loss scale {} replaces the saved scale {}", cfg.loss_scale, saved.scale));
        }
        let note = (!notes.is_empty()).then(|| format!("fp16 loss scaler: {}", notes.join("; ")));
        (LossScaler { cfg, state }, note)
    }

    /// The current factor the loss is multiplied by.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    /// One line for the log, e.g. "dynamic loss scale 65536 (FP16_Optimizer's
    /// rules (ZeRO stage 0): window 1000, min 1, no hysteresis)".
    pub fn describe(&self) -> String {
        let c = &self.cfg;
        if !c.is_dynamic() {
            return format!("static loss scale {}", self.state.scale);
        }
        let hysteresis = match c.rules {
            ScalerRules::Fp16Optimizer => "no hysteresis".to_string(),
            ScalerRules::DynamicLossScaler => format!("hysteresis {}{}", c.hysteresis, if c.consecutive_hysteresis { " consecutive" } else { "" }),
        };
        format!("dynamic loss scale {} ({}: window {}, min {}, {hysteresis})", self.state.scale, c.rules.name(), c.loss_scale_window, c.min_loss_scale)
    }

    /// Applies one iteration's outcome on the configured path. Fails
    /// (leaving the state untouched, as DeepSpeed raises before recording
    /// anything) when `DynamicLossScaler` must halve a scale already at
    /// `min_loss_scale`.
    pub fn update(&mut self, overflow: bool) -> Result<ScaleEvent> {
        let event = if !self.cfg.is_dynamic() {
            let s = self.state.scale;
            if overflow {
                self.state.last_overflow_iter = self.state.iter;
                ScaleEvent::Overflow { from: s, to: s, hysteresis: None, at_minimum: false }
            } else {
                ScaleEvent::Clean { grown: None }
            }
        } else {
            match self.cfg.rules {
                ScalerRules::Fp16Optimizer => self.update_fp16_optimizer(overflow),
                ScalerRules::DynamicLossScaler => self.update_dynamic_loss_scaler(overflow)?,
            }
        };
        self.state.iter += 1;
        Ok(event)
    }

    /// `FP16_Optimizer._update_scale` (ZeRO stage 0).
    fn update_fp16_optimizer(&mut self, overflow: bool) -> ScaleEvent {
        let (c, s) = (&self.cfg, &mut self.state);
        let from = s.scale;
        if overflow {
            s.scale = (s.scale / 2.0).max(c.min_loss_scale);
            s.last_overflow_iter = s.iter;
            return ScaleEvent::Overflow { from, to: s.scale, hysteresis: None, at_minimum: from == c.min_loss_scale && s.scale == from };
        }
        let stable = s.iter - s.last_overflow_iter - 1;
        ScaleEvent::Clean { grown: (stable > 0 && stable % window(c) == 0).then(|| grow(s, stable + 1)) }
    }

    /// `DynamicLossScaler.update_scale` (ZeRO stages 1-3).
    fn update_dynamic_loss_scaler(&mut self, overflow: bool) -> Result<ScaleEvent> {
        let (c, s) = (&self.cfg, &mut self.state);
        let from = s.scale;
        if overflow {
            let mut absorbed = None;
            if c.hysteresis == 1 || s.cur_hysteresis == 1 {
                if s.scale == c.min_loss_scale {
                    return Err(Error::Runtime(format!(
                        "Current loss scale already at minimum - cannot decrease scale anymore. Exiting run. (DeepSpeed's words: the fp16 \
                         gradients overflow with the loss scale at min_loss_scale {}, and ZeRO stages 1-3 stop there. Lower the learning \
                         rate, check the data for bad samples, lower fp16.min_loss_scale, or train in bf16: --set fp16.enabled=false --set \
                         bf16.enabled=true)",
                        c.min_loss_scale
                    )));
                }
                s.scale = (s.scale / 2.0).max(c.min_loss_scale);
            } else {
                absorbed = Some(s.cur_hysteresis);
                s.cur_hysteresis = s.cur_hysteresis.saturating_sub(1);
            }
            s.last_overflow_iter = s.iter;
            return Ok(ScaleEvent::Overflow { from, to: s.scale, hysteresis: absorbed, at_minimum: false });
        }
        if c.consecutive_hysteresis {
            s.cur_hysteresis = c.hysteresis;
        }
        let since = s.iter - s.last_overflow_iter;
        let grown = (since % window(c) == 0).then(|| {
            if !c.consecutive_hysteresis {
                s.cur_hysteresis = c.hysteresis;
            }
            grow(s, since)
        });
        Ok(ScaleEvent::Clean { grown })
    }

    /// The log line of `event` (without the iteration), in DeepSpeed's words
    /// where DeepSpeed logs one: a user comparing logs finds the same events.
    pub fn event_line(&self, event: &ScaleEvent) -> Option<String> {
        const SKIP: &str = "OVERFLOW! Skipping step (inf/NaN gradient on some rank; learning-rate schedule held).";
        Some(match *event {
            ScaleEvent::Clean { grown: None } => return None,
            ScaleEvent::Clean { grown: Some(g) } => {
                format!("no overflow for {} iterations; increasing dynamic loss scale from {} to {}", g.clean_iters, g.from, g.to)
            }
            ScaleEvent::Overflow { from, .. } if !self.cfg.is_dynamic() => format!("{SKIP} Using static loss scale of {from}"),
            ScaleEvent::Overflow { from, hysteresis: Some(h), .. } => {
                format!("{SKIP} Attempted loss scale: {from}, but hysteresis is {h}. Reducing hysteresis to {}", h - 1)
            }
            ScaleEvent::Overflow { from, to, at_minimum: true, .. } => format!(
                "{SKIP} Attempted loss scale: {from}, reducing to {to}: already at min_loss_scale; at ZeRO stage 0 DeepSpeed keeps the \
                 minimum and skips every overflowing step (consider bf16, a lower learning rate, or a lower fp16.min_loss_scale)"
            ),
            ScaleEvent::Overflow { from, to, .. } => format!("{SKIP} Attempted loss scale: {from}, reducing to {to}"),
        })
    }
}

/// The window as the iteration counters' type (a window of 0 is refused by
/// `validate`; `max(1)` keeps the arithmetic defined regardless).
fn window(c: &ScalerConfig) -> i64 {
    i64::try_from(c.loss_scale_window).unwrap_or(i64::MAX).max(1)
}

fn grow(s: &mut ScalerState, clean_iters: i64) -> Growth {
    let from = s.scale;
    s.scale *= 2.0;
    Growth { from, to: s.scale, clean_iters }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(power: Option<u32>, window: Option<u64>, hysteresis: Option<u32>) -> DynamicKeys {
        DynamicKeys { initial_scale_power: power, loss_scale_window: window, hysteresis, ..Default::default() }
    }

    #[test]
    fn defaults_per_path_and_describe() {
        let s0 = LossScaler::new(ScalerConfig::defaults(0));
        assert_eq!((s0.scale(), s0.cfg.loss_scale_window, s0.cfg.min_loss_scale), (65536.0, 1000, 1.0));
        assert_eq!(s0.describe(), "dynamic loss scale 65536 (FP16_Optimizer's rules (ZeRO stage 0): window 1000, min 1, no hysteresis)");
        for stage in [1, 2, 3] {
            let s = LossScaler::new(ScalerConfig::defaults(stage));
            assert_eq!((s.scale(), s.cfg.hysteresis, s.cfg.loss_scale_window, s.cfg.min_loss_scale), (4294967296.0, 1, 1000, 1.0), "stage {stage}");
            assert_eq!(s.describe(), "dynamic loss scale 4294967296 (DynamicLossScaler's rules (ZeRO stages 1-3): window 1000, min 1, hysteresis 1)");
        }
        // any dynamic key given: the others take runtime/config.py's defaults, on either path
        for rules in [ScalerRules::Fp16Optimizer, ScalerRules::DynamicLossScaler] {
            let c = ScalerConfig::resolve(0.0, &keys(None, Some(7), None), rules);
            assert_eq!((c.start_scale(), c.loss_scale_window, c.hysteresis, c.min_loss_scale), (65536.0, 7, 2, 1.0));
            let c = ScalerConfig::resolve(0.0, &DynamicKeys { consecutive_hysteresis: Some(false), ..Default::default() }, rules);
            assert_eq!((c.start_scale(), c.hysteresis), (65536.0, 2));
        }
        let st = LossScaler::new(ScalerConfig::resolve(128.0, &DynamicKeys::default(), ScalerRules::DynamicLossScaler));
        assert_eq!(st.describe(), "static loss scale 128");
        let d = ScalerConfig::defaults(2);
        assert!(d.validate().is_ok());
        assert!(ScalerConfig { loss_scale_window: 0, ..d.clone() }.validate().is_err());
        assert!(ScalerConfig { hysteresis: 0, ..d.clone() }.validate().is_err());
        assert!(ScalerConfig { min_loss_scale: 0.0, ..d.clone() }.validate().is_err());
        assert!(ScalerConfig { loss_scale: -1.0, ..d.clone() }.validate().is_err());
        assert!(ScalerConfig { initial_scale_power: 1, min_loss_scale: 4.0, ..d }.validate().is_err());
    }

    #[test]
    fn event_lines_carry_what_deepspeeds_carry() {
        let mut s = LossScaler::new(ScalerConfig::resolve(0.0, &keys(Some(4), Some(2), Some(2)), ScalerRules::DynamicLossScaler));
        let e = s.update(true).unwrap();
        assert!(s.event_line(&e).unwrap().ends_with("Attempted loss scale: 16, but hysteresis is 2. Reducing hysteresis to 1"), "{e:?}");
        let e = s.update(true).unwrap();
        assert!(s.event_line(&e).unwrap().ends_with("Attempted loss scale: 16, reducing to 8"), "{e:?}");
        let mut z = LossScaler::new(ScalerConfig::resolve(0.0, &keys(Some(1), Some(2), Some(2)), ScalerRules::Fp16Optimizer));
        z.update(true).unwrap();
        let e = z.update(true).unwrap();
        assert_eq!(e, ScaleEvent::Overflow { from: 1.0, to: 1.0, hysteresis: None, at_minimum: true });
        assert!(z.event_line(&e).unwrap().contains("Attempted loss scale: 1, reducing to 1: already at min_loss_scale"), "{e:?}");
        let e = [false, false, false].map(|_| z.update(false).unwrap());
        assert_eq!(e[2], ScaleEvent::Clean { grown: Some(Growth { from: 1.0, to: 2.0, clean_iters: 3 }) });
        assert_eq!(z.event_line(&e[2]).unwrap(), "no overflow for 3 iterations; increasing dynamic loss scale from 1 to 2");
        assert_eq!(z.event_line(&e[0]), None);
    }

    #[test]
    fn the_minimum_error_uses_deepspeeds_words_and_a_working_hint() {
        let mut s = LossScaler::new(ScalerConfig::resolve(0.0, &keys(Some(0), None, Some(1)), ScalerRules::DynamicLossScaler));
        let before = s.state.clone();
        let e = s.update(true).unwrap_err().to_string();
        assert!(e.contains("Current loss scale already at minimum - cannot decrease scale anymore. Exiting run."), "{e}");
        assert!(e.contains("--set fp16.enabled=false --set bf16.enabled=true"), "{e}");
        assert_eq!(s.state, before, "an error leaves the state untouched");
    }

    #[test]
    fn resume_carries_state_and_says_how_across_paths() {
        let stage0 = ScalerConfig::resolve(0.0, &keys(Some(10), Some(5), Some(3)), ScalerRules::Fp16Optimizer);
        let stage2 = ScalerConfig { rules: ScalerRules::DynamicLossScaler, ..stage0.clone() };
        let mut a = LossScaler::new(stage2.clone());
        for ov in [true, false, true, false] {
            a.update(ov).unwrap();
        }
        assert_eq!(a.state.cur_hysteresis, 1);
        // same path: exact, silent
        let (b, note) = LossScaler::resume(stage2.clone(), a.state.clone());
        assert_eq!((b.state, note), (a.state.clone(), None));
        // stage 2 -> 0: hysteresis dropped
        let (b, note) = LossScaler::resume(stage0.clone(), a.state.clone());
        let note = note.unwrap();
        assert!(note.contains("saved under DynamicLossScaler's rules (ZeRO stages 1-3), continued under FP16_Optimizer's rules (ZeRO stage 0)"), "{note}");
        assert!(note.contains("hysteresis count (1) is dropped"), "{note}");
        assert_eq!((b.state.scale, b.state.iter, b.state.last_overflow_iter), (a.state.scale, 4, 2));
        // stage 0 -> 2: hysteresis starts full
        let (c, note) = LossScaler::resume(stage2.clone(), b.state.clone());
        assert!(note.unwrap().contains("hysteresis starts full (3)"));
        assert_eq!((c.state.cur_hysteresis, c.state.rules), (3, Some(ScalerRules::DynamicLossScaler)));
        // an old checkpoint's state: taken as is, said so
        let (d, note) = LossScaler::resume(stage2.clone(), ScalerState { rules: None, ..a.state.clone() });
        assert!(note.unwrap().contains("predates per-stage"));
        assert_eq!(d.state.cur_hysteresis, 1);
        // a hysteresis count this run cannot go on from (0, or above its hysteresis) is clamped, and said
        let (f, note) = LossScaler::resume(stage2.clone(), ScalerState { cur_hysteresis: 0, ..a.state.clone() });
        assert!(note.unwrap().contains("saved hysteresis count 0 is outside this run's 1..=3: continued at 1"));
        assert_eq!(f.state.cur_hysteresis, 1);
        // a static scale replaces the saved one
        let (e, note) = LossScaler::resume(ScalerConfig { loss_scale: 64.0, ..stage2 }, a.state.clone());
        assert!(note.unwrap().contains("static loss scale 64 replaces the saved scale 1024"));
        assert_eq!(e.scale(), 64.0);
    }

    #[test]
    fn state_reads_back_exactly_from_json() {
        for scale in [2f64.powi(67), 2f64.powi(-24), 2f64.powi(32), 65536.0, 0.25, 3.0e-300, 1.0 / 3.0] {
            let s = ScalerState { scale, cur_hysteresis: 2, last_overflow_iter: 41, iter: 1 << 40, rules: Some(ScalerRules::DynamicLossScaler) };
            let back: ScalerState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(back.scale.to_bits(), scale.to_bits(), "{scale:e}");
            assert_eq!(back, s);
        }
        // a state written before `rules` existed still reads
        let old: ScalerState = serde_json::from_str(r#"{"scale": 1024.0, "cur_hysteresis": 2, "last_overflow_iter": -1, "iter": 7}"#).unwrap();
        assert_eq!(old.rules, None);
    }
}
