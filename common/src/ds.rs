//! DeepSpeed's JSON configuration, with DeepSpeed's rules.
//!
//! Read: the batch triple, `gradient_clipping`, `optimizer` (`Adam`/`AdamW`
//! with `lr`, `betas`, `eps`, `weight_decay`; DeepSpeed's Adam decays weights
//! decoupled, as AdamW), `scheduler` (`WarmupLR`, `WarmupDecayLR`,
//! `WarmupCosineLR`), `fp16`, `bf16`, `zero_optimization`, `steps_per_print`,
//! `checkpoint.writer.decoupled`.
//! Errors name the file and the key path (`optimizer.params.betas`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerCfg {
    pub kind: String,
    pub lr: Option<f64>,
    pub betas: Option<(f64, f64)>,
    pub eps: Option<f64>,
    pub weight_decay: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerCfg {
    WarmupLr { min_lr: f64, max_lr: Option<f64>, warmup_steps: u64, log: bool },
    WarmupDecayLr { min_lr: f64, max_lr: Option<f64>, warmup_steps: u64, log: bool, total_steps: u64 },
    WarmupCosineLr { warmup_min_ratio: f64, cos_min_ratio: f64, warmup_steps: u64, total_steps: u64, log: bool },
}

/// The `fp16` block as written: keys it leaves out may come from the
/// original's configs.json, else from DeepSpeed's defaults
/// (`config::run::RunConfig` decides).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Fp16Cfg {
    pub enabled: Option<bool>,
    pub loss_scale: Option<f64>,
    pub initial_scale_power: Option<u32>,
    pub loss_scale_window: Option<u64>,
    pub hysteresis: Option<u32>,
    pub consecutive_hysteresis: Option<bool>,
    pub min_loss_scale: Option<f64>,
}

/// How a step's loss is normalised over the data-parallel ranks (the
/// top-level key `loss_normalization`, this program's own).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LossNormalization {
    /// `"global_tokens"` (the default): the summed loss over the loss-token
    /// count of the whole global micro-batch, so data-parallel N trains
    /// exactly what one process with the whole batch trains.
    #[default]
    GlobalTokens,
    /// `"per_rank_mean"`: the original's rule (`pretrain_glm.py`'s
    /// `forward_step`): each rank's mean over its own loss tokens,
    /// gradients averaged over the data-parallel ranks, the logged loss
    /// the mean of the ranks' means.
    PerRankMean,
}

impl LossNormalization {
    pub const NAMES: [&'static str; 2] = ["global_tokens", "per_rank_mean"];

    pub fn name(self) -> &'static str {
        match self {
            LossNormalization::GlobalTokens => "global_tokens",
            LossNormalization::PerRankMean => "per_rank_mean",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct DsConfig {
    pub path: PathBuf,
    /// The file as loaded (recorded in every checkpoint's state).
    pub raw: Value,
    pub train_batch_size: Option<usize>,
    pub micro_batch: Option<usize>,
    pub grad_accum: Option<usize>,
    pub gradient_clipping: Option<f64>,
    pub steps_per_print: Option<u64>,
    pub optimizer: Option<OptimizerCfg>,
    pub scheduler: Option<SchedulerCfg>,
    pub fp16: Option<Fp16Cfg>,
    /// `bf16.enabled` (or `bfloat16.enabled`) as written.
    pub bf16: Option<bool>,
    /// Keys overridden on the command line (`--set fp16.enabled=false`), as
    /// dotted paths, with their values.
    pub sets: Vec<(String, Value)>,
    /// `loss_normalization` (this program's key, beside DeepSpeed's): how
    /// the loss is normalised over data-parallel ranks.
    pub loss_normalization: LossNormalization,
    pub zero_stage: u32,
    /// `zero_optimization.reduce_bucket_size` (elements per gradient reduction).
    pub reduce_bucket_size: Option<u64>,
    /// `zero_optimization.allgather_bucket_size` (elements per parameter all-gather).
    pub allgather_bucket_size: Option<u64>,
    /// `zero_optimization.overlap_comm`.
    pub overlap_comm: Option<bool>,
    /// `checkpoint.writer.decoupled`: checkpoints written while training
    /// goes on (true) or with training waiting (false); unset, this
    /// program's default (in the background).
    pub checkpoint_decoupled: Option<bool>,
    /// The `tensorboard` block, when `enabled`: DeepSpeed's monitor writes
    /// TensorBoard events to `output_path/job_name`.
    pub tensorboard: Option<TensorboardCfg>,
    /// `zero_optimization` keys DeepSpeed has that change nothing here
    /// (`contiguous_gradients`, `reduce_scatter`, ...), or that ask for what
    /// this program does not do (offloading).
    pub zero_unused: Vec<String>,
    /// Top-level keys DeepSpeed has that this program does not read.
    pub unused: Vec<String>,
}

/// DeepSpeed's `tensorboard` monitor block (enabled).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorboardCfg {
    /// `output_path` (DeepSpeed's default: "", the working directory).
    pub output_path: PathBuf,
    /// `job_name` (DeepSpeed's default: "DeepSpeedJobName").
    pub job_name: String,
}

impl TensorboardCfg {
    /// Where DeepSpeed writes: `os.path.join(output_path, job_name)`.
    pub fn log_dir(&self) -> PathBuf {
        self.output_path.join(&self.job_name)
    }
}

const TENSORBOARD_KEYS: &[&str] = &["enabled", "output_path", "job_name"];

/// The `zero_optimization` keys this program acts on.
const ZERO_READ: &[&str] = &["stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm"];

/// Keys DeepSpeed accepts that change nothing here (monitoring, offload and
/// stage-3 tuning, other engines): listed as "no effect here", never an error.
/// Any other key is an error with the nearest known one suggested.
const ACCEPTED: &[&str] = &[
    "wall_clock_breakdown", "activation_checkpointing", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "amp", "aio", "sparse_attention", "flops_profiler", "dump_state", "wandb", "csv_monitor", "comet", "comms_logger",
    "elasticity", "autotuning", "data_efficiency", "curriculum_learning", "data_types", "compression_training", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "memory_breakdown", "eigenvalue", "progressive_layer_drop", "quantize_training", "pipeline", "disable_allgather", "timers",
    "hybrid_engine", "nebula", "weight_quantization", "graph_harvesting", "use_data_before_expert_parallelism", "dataloader_drop_last",
    "load_universal_checkpoint", "use_node_local_storage", "fp16_auto_cast",
];
const ZERO_ACCEPTED: &[&str] = &[
    "contiguous_gradients",
    "reduce_scatter",
    "allgather_partitions",
    "load_from_fp32_weights",
    "elastic_checkpoint",
    "offload_param",
    "offload_optimizer",
    "sub_group_size",
    "cpu_offload",
    "cpu_offload_params",
    "cpu_offload_use_pin_memory",
    "stage3_max_live_parameters",
    "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
    "stage3_model_persistence_threshold",
    "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save",
    "ignore_unused_parameters",
    "legacy_stage1",
    "round_robin_gradients",
    "zero_hpz_partition_size",
    "zero_quantized_weights",
    "zero_quantized_gradients",
    "mics_shard_size",
    "mics_hierarchical_params_gather",
    "memory_efficient_linear",
    "pipeline_loading_checkpoint",
    "override_module_apply",
    "use_all_reduce_for_fetch_params",
    "log_trace_cache_warnings",
];
const FP16_KEYS: &[&str] = &[
    "enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "consecutive_hysteresis", "min_loss_scale", "auto_cast",
    "fp16_master_weights_and_grads",
];
/// DeepSpeed's `checkpoint` block: `writer.decoupled` (DeepSpeed's
/// decoupled checkpoint engine: the save overlaps training) is read; the
/// other keys choose DeepSpeed's I/O engines and tag checks and change
/// nothing here.
const CHECKPOINT_KEYS: &[&str] = &["tag_validation", "checkpoint_serialization", "load_universal", "use_node_local_storage", "parallel_write", "writer"];
const CHECKPOINT_WRITER_KEYS: &[&str] = &["type", "decoupled", "io_buffer_size", "io_buffer_double", "show_statistics", "data_parallel", "io_multiplier"];
const BF16_KEYS: &[&str] = &["enabled", "immediate_grad_update", "check_grad_overflow"];
const ADAM_KEYS: &[&str] = &["lr", "betas", "eps", "weight_decay", "bias_correction", "adam_w_mode", "torch_adam", "fused", "foreach", "capturable"];

/// Refuses a key of `obj` (at `prefix`) that is in none of `known`, with
/// the nearest known key suggested by its whole path (as a `--set` names
/// it, where a `--set` gave the unknown key).
fn check_keys(c: &Ctx, obj: &Map<String, Value>, prefix: &str, known: &[&[&str]]) -> Result<()> {
    for k in obj.keys() {
        if known.iter().any(|l| l.contains(&k.as_str())) {
            continue;
        }
        let by_set = set_for(c.sets, &format!("{prefix}{k}")).is_some();
        let hint = crate::args::closest(k, known.iter().flat_map(|l| l.iter().copied()))
            .map(|m| {
                let full = format!("{prefix}{m}");
                // a plain key configs.json has too reaches this file only with "ds."
                let full = if by_set { as_typed(&full) } else { full };
                format!(" (did you mean \"{full}\"?)")
            })
            .unwrap_or_default();
        return Err(c.err(&format!("{prefix}{k}"), format!("unknown key{hint}")));
    }
    Ok(())
}

/// The override that gave the value at `key`: one at `key`, above it
/// (`--set fp16={...}`), or below it (`--set fp16.enabled=true` for an
/// error about `fp16`).
fn set_for<'a>(sets: &'a [(String, Value)], key: &str) -> Option<&'a (String, Value)> {
    let under = |a: &str, b: &str| a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'.';
    sets.iter().rev().find(|(k, _)| k == key || under(key, k) || under(k, key))
}

/// A DeepSpeed key path as a `--set` must spell it: behind `ds.` where
/// configs.json has a key of the same name.
fn as_typed(path: &str) -> String {
    if !path.contains('.') && crate::args::is_key(path) {
        format!("{SET_PREFIX}{path}")
    } else {
        path.to_string()
    }
}

/// Batch sizes after DeepSpeed's derivation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    pub global: usize,
    pub micro: usize,
    pub accum: usize,
}

const READ: &[&str] = &[
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "steps_per_print", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "zero_optimization", "loss_normalization", "checkpoint", "tensorboard",
];

/// Whether `key` is a top-level key of a DeepSpeed file (one DeepSpeed
/// reads, or this program's `loss_normalization`).
pub fn is_top_level_key(key: &str) -> bool {
    READ.contains(&key) || ACCEPTED.contains(&key)
}

/// A `--set` of the DeepSpeed file: the dotted key path and its value.
pub type Override = (String, Value);

/// The prefix that sends a `--set` to the DeepSpeed file whatever the key
/// (`--set ds.gradient_accumulation_steps=4`, where configs.json has a key
/// of the same name).
pub const SET_PREFIX: &str = "ds.";

/// Splits `--set KEY=VALUE` arguments between the DeepSpeed file and
/// configs.json: `ds.`-prefixed keys (prefix dropped) and dotted paths go to
/// the DeepSpeed file, as does a plain key that configs.json does not have
/// and a DeepSpeed file does (`train_micro_batch_size_per_gpu`); every
/// other plain key goes to configs.json. Values are JSON, or a string
/// where they do not parse.
pub fn split_sets(sets: &[String]) -> Result<(Vec<Override>, Vec<String>)> {
    let (mut ds, mut args) = (Vec::new(), Vec::new());
    for s in sets {
        let Some((k, v)) = s.split_once('=') else {
            return Err(Error::Config(format!("--set {s}: expected KEY=VALUE")));
        };
        let k = k.trim();
        let to_ds = match k.strip_prefix(SET_PREFIX) {
            Some(rest) => Some(rest),
            None if k.contains('.') => Some(k),
            None if !crate::args::is_key(k) && is_top_level_key(k) => Some(k),
            // a typo: the nearest key of either file
            None if !crate::args::is_key(k) => {
                return Err(Error::Config(format!("--set {s}: unknown key \"{k}\"{}", crate::args::did_you_mean(k, READ))));
            }
            None => None,
        };
        match to_ds {
            Some("") => return Err(Error::Config(format!("--set {s}: a key of the DeepSpeed file is missing after \"{SET_PREFIX}\""))),
            Some(path) => ds.push((path.to_string(), serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string())))),
            None => args.push(s.clone()),
        }
    }
    Ok((ds, args))
}

struct Ctx<'a> {
    path: &'a Path,
    /// The command line's overrides: an error at or under one names it.
    sets: &'a [(String, Value)],
}

impl Ctx<'_> {
    /// An error at `key`: blamed on the `--set` that gave the value, when
    /// one did, else on the file.
    fn err(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        match set_for(self.sets, key) {
            Some((k, v)) => Error::Config(format!("--set {}={v}: {key}: {msg} (overriding {})", as_typed(k), self.path.display())),
            None => Error::invalid(self.path, format!("{key}: {msg}")),
        }
    }
    fn num(&self, obj: &Map<String, Value>, key: &str, full: &str) -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(self.err(full, format!("expected a number, found {v}"))),
        }
    }
    fn uint(&self, obj: &Map<String, Value>, key: &str, full: &str) -> Result<Option<u64>> {
        match self.num(obj, key, full)? {
            None => Ok(None),
            Some(x) if x >= 0.0 && x.fract() == 0.0 => Ok(Some(x as u64)),
            Some(x) => Err(self.err(full, format!("expected a non-negative integer, found {x}"))),
        }
    }
    fn boolean(&self, obj: &Map<String, Value>, key: &str, full: &str) -> Result<Option<bool>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(full, format!("expected true or false, found {v}"))),
        }
    }
    fn obj<'v>(&self, v: &'v Value, full: &str) -> Result<&'v Map<String, Value>> {
        v.as_object().ok_or_else(|| self.err(full, format!("expected an object, found {v}")))
    }
}

impl DsConfig {
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, &[])
    }

    /// Reads `path`, then applies `overrides` (`("fp16.enabled", false)`:
    /// dotted key paths; objects on the way are created) before validating.
    pub fn load_with(path: &Path, overrides: &[(String, Value)]) -> Result<Self> {
        let overrides: Vec<(String, Value)> = overrides.iter().map(|(k, v)| (k.strip_prefix(SET_PREFIX).unwrap_or(k).to_string(), v.clone())).collect();
        let mut v: Value = crate::text::read_json(path, "malformed JSON")?;
        for (key, value) in &overrides {
            let mut at = &mut v;
            let parts: Vec<&str> = key.split('.').collect();
            for (i, k) in parts.iter().enumerate() {
                let Value::Object(m) = at else {
                    return Err(Error::Config(format!("--set {key}: {} is not an object in {}", parts[..i].join("."), path.display())));
                };
                if i + 1 == parts.len() {
                    m.insert(k.to_string(), value.clone());
                    break;
                }
                at = m.entry(k.to_string()).or_insert_with(|| Value::Object(Map::new()));
            }
        }
        Self::parse(path, &v, &overrides)
    }

    /// Where a value under `prefix` (e.g. "fp16") came from: "--set" when
    /// the command line overrode a key there, else the file's name.
    pub fn source(&self, prefix: &str) -> String {
        if set_for(&self.sets, prefix).is_some() {
            "--set".into()
        } else {
            self.path.file_name().unwrap_or_default().to_string_lossy().into_owned()
        }
    }

    /// An error about the value at `key`: blamed on the `--set` that gave
    /// it (`--set zero_optimization.stage=3: ...`) when one did, else on the
    /// file.
    pub fn blame(&self, key: &str, msg: impl std::fmt::Display) -> Error {
        Ctx { path: &self.path, sets: &self.sets }.err(key, msg)
    }

    pub fn from_value(path: &Path, v: &Value) -> Result<Self> {
        Self::parse(path, v, &[])
    }

    fn parse(path: &Path, v: &Value, sets: &[(String, Value)]) -> Result<Self> {
        let c = Ctx { path, sets };
        let top = v.as_object().ok_or_else(|| Error::parse(path, 1, 1, "expected a JSON object (a DeepSpeed config)"))?;
        let positive = |key: &str| -> Result<Option<usize>> {
            match c.uint(top, key, key)? {
                Some(0) => Err(c.err(key, "must be positive")),
                x => Ok(x.map(|x| x as usize)),
            }
        };
        let train_batch_size = positive("train_batch_size")?;
        let micro_batch = positive("train_micro_batch_size_per_gpu")?;
        let grad_accum = positive("gradient_accumulation_steps")?;
        check_keys(&c, top, "", &[READ, ACCEPTED])?;
        let gradient_clipping = c.num(top, "gradient_clipping", "gradient_clipping")?;
        if gradient_clipping.is_some_and(|g| g < 0.0) {
            return Err(c.err("gradient_clipping", "must be >= 0 (0 disables clipping)"));
        }
        let steps_per_print = c.uint(top, "steps_per_print", "steps_per_print")?;

        let optimizer = match top.get("optimizer") {
            None | Some(Value::Null) => None,
            Some(o) => {
                let o = c.obj(o, "optimizer")?;
                let kind = match o.get("type") {
                    Some(Value::String(s)) => s.clone(),
                    other => return Err(c.err("optimizer.type", format!("expected a string such as \"Adam\", found {}", other.unwrap_or(&Value::Null)))),
                };
                if !["adam", "adamw"].contains(&kind.to_ascii_lowercase().as_str()) {
                    return Err(c.err("optimizer.type", format!("\"{kind}\" is not supported (Adam or AdamW)")));
                }
                let empty = Map::new();
                let p = match o.get("params") {
                    None => &empty,
                    Some(p) => c.obj(p, "optimizer.params")?,
                };
                check_keys(&c, p, "optimizer.params.", &[ADAM_KEYS, &["amsgrad"]])?;
                if p.get("amsgrad").is_some_and(|v| v != &Value::Bool(false)) {
                    return Err(c.err("optimizer.params.amsgrad", "not supported (AdamW without amsgrad)"));
                }
                let betas = match p.get("betas") {
                    None | Some(Value::Null) => None,
                    Some(Value::Array(a)) if a.len() == 2 && a.iter().all(|x| x.as_f64().is_some_and(|b| (0.0..1.0).contains(&b))) => {
                        Some((a[0].as_f64().unwrap(), a[1].as_f64().unwrap()))
                    }
                    Some(v) => return Err(c.err("optimizer.params.betas", format!("expected two numbers in [0, 1), found {v}"))),
                };
                let lr = c.num(p, "lr", "optimizer.params.lr")?;
                if lr.is_some_and(|l| l < 0.0) {
                    return Err(c.err("optimizer.params.lr", "must be >= 0 (0: the weights do not move)"));
                }
                let eps = c.num(p, "eps", "optimizer.params.eps")?;
                if eps.is_some_and(|e| e <= 0.0) {
                    return Err(c.err("optimizer.params.eps", "must be positive"));
                }
                let weight_decay = c.num(p, "weight_decay", "optimizer.params.weight_decay")?;
                if weight_decay.is_some_and(|w| w < 0.0) {
                    return Err(c.err("optimizer.params.weight_decay", "must be >= 0"));
                }
                Some(OptimizerCfg { kind, lr, betas, eps, weight_decay })
            }
        };

        let scheduler = match top.get("scheduler") {
            None | Some(Value::Null) => None,
            Some(s) => {
                let s = c.obj(s, "scheduler")?;
                let kind = s.get("type").and_then(Value::as_str).unwrap_or("");
                let empty = Map::new();
                let p = match s.get("params") {
                    None => &empty,
                    Some(p) => c.obj(p, "scheduler.params")?,
                };
                let warmup_steps = c.uint(p, "warmup_num_steps", "scheduler.params.warmup_num_steps")?.unwrap_or(1000).max(2);
                let log = match p.get("warmup_type").and_then(Value::as_str).unwrap_or("log") {
                    "log" => true,
                    "linear" => false,
                    other => return Err(c.err("scheduler.params.warmup_type", format!("\"{other}\": expected \"log\" or \"linear\""))),
                };
                let total = |c: &Ctx| -> Result<u64> {
                    c.uint(p, "total_num_steps", "scheduler.params.total_num_steps")?
                        .ok_or_else(|| c.err("scheduler.params.total_num_steps", format!("required by {kind}")))
                };
                // learning rates >= 0 (the peak > 0 and not below the floor), ratios in [0, 1]
                let lr_min = c.num(p, "warmup_min_lr", "scheduler.params.warmup_min_lr")?;
                if lr_min.is_some_and(|l| l < 0.0) {
                    return Err(c.err("scheduler.params.warmup_min_lr", "must be >= 0"));
                }
                if let Some(m) = c.num(p, "warmup_max_lr", "scheduler.params.warmup_max_lr")? {
                    if m <= 0.0 || m < lr_min.unwrap_or(0.0) {
                        return Err(c.err("scheduler.params.warmup_max_lr", "must be positive and >= warmup_min_lr"));
                    }
                }
                for key in ["warmup_min_ratio", "cos_min_ratio"] {
                    if c.num(p, key, &format!("scheduler.params.{key}"))?.is_some_and(|r| !(0.0..=1.0).contains(&r)) {
                        return Err(c.err(&format!("scheduler.params.{key}"), "must be in [0, 1]"));
                    }
                }
                match kind {
                    "WarmupLR" => Some(SchedulerCfg::WarmupLr {
                        min_lr: c.num(p, "warmup_min_lr", "scheduler.params.warmup_min_lr")?.unwrap_or(0.0),
                        max_lr: c.num(p, "warmup_max_lr", "scheduler.params.warmup_max_lr")?,
                        warmup_steps,
                        log,
                    }),
                    "WarmupDecayLR" => Some(SchedulerCfg::WarmupDecayLr {
                        min_lr: c.num(p, "warmup_min_lr", "scheduler.params.warmup_min_lr")?.unwrap_or(0.0),
                        max_lr: c.num(p, "warmup_max_lr", "scheduler.params.warmup_max_lr")?,
                        warmup_steps,
                        log,
                        total_steps: total(&c)?,
                    }),
                    "WarmupCosineLR" => Some(SchedulerCfg::WarmupCosineLr {
                        warmup_min_ratio: c.num(p, "warmup_min_ratio", "scheduler.params.warmup_min_ratio")?.unwrap_or(0.0),
                        cos_min_ratio: c.num(p, "cos_min_ratio", "scheduler.params.cos_min_ratio")?.unwrap_or(1e-4),
                        warmup_steps,
                        total_steps: total(&c)?,
                        log,
                    }),
                    other => return Err(c.err("scheduler.type", format!("\"{other}\" is not supported (WarmupLR, WarmupDecayLR, WarmupCosineLR)"))),
                }
            }
        };

        let fp16 = match top.get("fp16") {
            None | Some(Value::Null) => None,
            Some(f) => {
                let f = c.obj(f, "fp16")?;
                check_keys(&c, f, "fp16.", &[FP16_KEYS])?;
                let loss_scale = c.num(f, "loss_scale", "fp16.loss_scale")?;
                if loss_scale.is_some_and(|l| !(l >= 0.0 && l.is_finite())) {
                    return Err(c.err("fp16.loss_scale", "must be >= 0 and finite (0 = dynamic)"));
                }
                let small = |key: &str, max: u64| -> Result<Option<u32>> {
                    let full = format!("fp16.{key}");
                    match c.uint(f, key, &full)? {
                        Some(v) if v > max => Err(c.err(&full, format!("{v} is too large (at most {max})"))),
                        v => Ok(v.map(|v| v as u32)),
                    }
                };
                let window = c.uint(f, "loss_scale_window", "fp16.loss_scale_window")?;
                if window == Some(0) {
                    return Err(c.err("fp16.loss_scale_window", "must be positive"));
                }
                let hysteresis = small("hysteresis", 1 << 20)?;
                if hysteresis == Some(0) {
                    return Err(c.err("fp16.hysteresis", "must be positive"));
                }
                let min_loss_scale = c.num(f, "min_loss_scale", "fp16.min_loss_scale")?;
                if min_loss_scale.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
                    return Err(c.err("fp16.min_loss_scale", "must be positive and finite"));
                }
                Some(Fp16Cfg {
                    enabled: c.boolean(f, "enabled", "fp16.enabled")?,
                    loss_scale,
                    initial_scale_power: small("initial_scale_power", 64)?,
                    loss_scale_window: window,
                    hysteresis,
                    consecutive_hysteresis: c.boolean(f, "consecutive_hysteresis", "fp16.consecutive_hysteresis")?,
                    min_loss_scale,
                })
            }
        };
        let bf16 = match top.get("bf16").or_else(|| top.get("bfloat16")) {
            None | Some(Value::Null) => None,
            Some(b) => {
                let b = c.obj(b, "bf16")?;
                check_keys(&c, b, "bf16.", &[BF16_KEYS])?;
                c.boolean(b, "enabled", "bf16.enabled")?
            }
        };
        if bf16 == Some(true) && fp16.as_ref().is_some_and(|f| f.enabled == Some(true)) {
            // blamed on whichever of the two a --set turned on
            let key = if set_for(sets, "fp16.enabled").is_some() { "fp16.enabled" } else { "bf16.enabled" };
            // the hint keeps the one blamed (a --set turned it on) and turns the other off
            let (keep, other) = if key == "fp16.enabled" { ("fp16", "bf16") } else { ("bf16", "fp16") };
            return Err(c.err(key, format!("fp16 and bf16 are both enabled; enable one (to train in {keep}: --set {other}.enabled=false)")));
        }
        let loss_normalization = match top.get("loss_normalization") {
            None | Some(Value::Null) => LossNormalization::default(),
            Some(Value::String(s)) if s == "global_tokens" => LossNormalization::GlobalTokens,
            Some(Value::String(s)) if s == "per_rank_mean" => LossNormalization::PerRankMean,
            Some(v) => return Err(c.err("loss_normalization", format!("{v}: expected \"{}\"", LossNormalization::NAMES.join("\" or \"")))),
        };
        let (zero_stage, reduce_bucket_size, allgather_bucket_size, overlap_comm, zero_unused) = match top.get("zero_optimization") {
            None | Some(Value::Null) => (0, None, None, None, Vec::new()),
            Some(z) => {
                let z = c.obj(z, "zero_optimization")?;
                check_keys(&c, z, "zero_optimization.", &[ZERO_READ, ZERO_ACCEPTED])?;
                let stage = c.uint(z, "stage", "zero_optimization.stage")?.unwrap_or(0);
                if stage > 3 {
                    return Err(c.err("zero_optimization.stage", format!("{stage}: expected 0, 1, 2 or 3")));
                }
                let mut buckets = [None, None];
                for (slot, key) in buckets.iter_mut().zip(["reduce_bucket_size", "allgather_bucket_size"]) {
                    let full = format!("zero_optimization.{key}");
                    *slot = c.uint(z, key, &full)?;
                    if *slot == Some(0) {
                        return Err(c.err(&full, "must be positive"));
                    }
                }
                let overlap = c.boolean(z, "overlap_comm", "zero_optimization.overlap_comm")?;
                let unused = z.keys().filter(|k| !ZERO_READ.contains(&k.as_str())).map(|k| format!("zero_optimization.{k}")).collect();
                (stage as u32, buckets[0], buckets[1], overlap, unused)
            }
        };
        let mut unused: Vec<String> = top.keys().filter(|k| !READ.contains(&k.as_str())).cloned().collect();
        let checkpoint_decoupled = match top.get("checkpoint") {
            None | Some(Value::Null) => None,
            Some(b) => {
                let b = c.obj(b, "checkpoint")?;
                check_keys(&c, b, "checkpoint.", &[CHECKPOINT_KEYS])?;
                unused.extend(b.keys().filter(|k| *k != "writer").map(|k| format!("checkpoint.{k}")));
                match b.get("writer") {
                    None | Some(Value::Null) => None,
                    Some(w) => {
                        let w = c.obj(w, "checkpoint.writer")?;
                        check_keys(&c, w, "checkpoint.writer.", &[CHECKPOINT_WRITER_KEYS])?;
                        unused.extend(w.keys().filter(|k| *k != "decoupled").map(|k| format!("checkpoint.writer.{k}")));
                        c.boolean(w, "decoupled", "checkpoint.writer.decoupled")?
                    }
                }
            }
        };
        let tensorboard = match top.get("tensorboard") {
            None | Some(Value::Null) => None,
            Some(b) => {
                let b = c.obj(b, "tensorboard")?;
                check_keys(&c, b, "tensorboard.", &[TENSORBOARD_KEYS])?;
                let text = |key: &str, default: &str| -> Result<String> {
                    match b.get(key) {
                        None | Some(Value::Null) => Ok(default.to_string()),
                        Some(Value::String(s)) => Ok(s.clone()),
                        Some(v) => Err(c.err(&format!("tensorboard.{key}"), format!("expected a string, found {v}"))),
                    }
                };
                let (output_path, job_name) = (text("output_path", "")?, text("job_name", "DeepSpeedJobName")?);
                if job_name.is_empty() {
                    return Err(c.err("tensorboard.job_name", "must name the run's directory (DeepSpeed writes to output_path/job_name)"));
                }
                c.boolean(b, "enabled", "tensorboard.enabled")?.unwrap_or(false).then(|| TensorboardCfg { output_path: PathBuf::from(output_path), job_name })
            }
        };
        Ok(DsConfig {
            path: path.to_path_buf(),
            tensorboard,
            raw: v.clone(),
            train_batch_size,
            micro_batch,
            grad_accum,
            gradient_clipping,
            steps_per_print,
            optimizer,
            scheduler,
            fp16,
            bf16,
            sets: sets.to_vec(),
            loss_normalization,
            zero_stage,
            reduce_bucket_size,
            allgather_bucket_size,
            overlap_comm,
            checkpoint_decoupled,
            zero_unused,
            unused,
        })
    }

    /// DeepSpeed's batch rule: `global = micro × accum × dp`; any two given
    /// determine the third; all three must agree. `fallback_micro` (the
    /// original's `batch_size`) applies when the config names no batch size.
    pub fn batch(&self, dp: usize, fallback_micro: usize, fallback_accum: usize) -> Result<Batch> {
        // blamed on a --set of one of the three, when one gave it
        let err = |msg: String| match ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"]
            .into_iter()
            .find(|k| set_for(&self.sets, k).is_some())
        {
            Some(k) => self.blame(k, msg),
            None => Error::invalid(&self.path, msg),
        };
        let (g, m, a) = (self.train_batch_size, self.micro_batch, self.grad_accum);
        let b = match (g, m, a) {
            (Some(g), Some(m), Some(a)) => {
                if g != m * a * dp {
                    return Err(err(format!(
                        "train_batch_size {g} != train_micro_batch_size_per_gpu {m} × gradient_accumulation_steps {a} × data-parallel size {dp}"
                    )));
                }
                Batch { global: g, micro: m, accum: a }
            }
            (Some(g), Some(m), None) => Batch { global: g, micro: m, accum: g / (m * dp) },
            (Some(g), None, Some(a)) => Batch { global: g, micro: g / (a * dp), accum: a },
            (None, Some(m), Some(a)) => Batch { global: m * a * dp, micro: m, accum: a },
            (Some(g), None, None) => Batch { global: g, micro: g / dp, accum: 1 },
            (None, Some(m), None) => Batch { global: m * dp, micro: m, accum: 1 },
            (None, None, a) => {
                let a = a.unwrap_or(fallback_accum);
                Batch { global: fallback_micro * a * dp, micro: fallback_micro, accum: a }
            }
        };
        if b.micro == 0 || b.accum == 0 || b.global != b.micro * b.accum * dp {
            let given = [(g, "train_batch_size"), (m, "train_micro_batch_size_per_gpu"), (a, "gradient_accumulation_steps")]
                .iter()
                .filter_map(|(v, k)| v.map(|v| format!("{k} {v}")))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(err(format!(
                "{given} cannot satisfy train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × data-parallel size {dp}"
            )));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> Result<DsConfig> {
        DsConfig::from_value(Path::new("ds.json"), &v)
    }

    #[test]
    fn seed_configs_load() {
        for (name, micro, lr) in [("config_block_base.json", 32, 4e-4), ("config_block_large.json", 16, 2e-4), ("config_block_large_chinese.json", 32, 4e-4)] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seed").join(name);
            let c = DsConfig::load(&p).unwrap();
            assert_eq!(c.micro_batch, Some(micro));
            assert_eq!(c.fp16.as_ref().unwrap().enabled, Some(true));
            let o = c.optimizer.as_ref().unwrap();
            assert_eq!((o.lr, o.betas, o.eps), (Some(lr), Some((0.9, 0.98)), Some(1e-6)));
            assert_eq!(c.batch(1, 4, 1).unwrap(), Batch { global: micro, micro, accum: 1 });
            assert_eq!(c.batch(2, 4, 1).unwrap(), Batch { global: 2 * micro, micro, accum: 1 });
        }
    }

    #[test]
    fn batch_rules() {
        let c = cfg(json!({"train_batch_size": 32, "gradient_accumulation_steps": 2})).unwrap();
        assert_eq!(c.batch(2, 1, 1).unwrap(), Batch { global: 32, micro: 8, accum: 2 });
        let c = cfg(json!({"train_batch_size": 32})).unwrap();
        assert_eq!(c.batch(4, 1, 1).unwrap(), Batch { global: 32, micro: 8, accum: 1 });
        let c = cfg(json!({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2})).unwrap();
        let e = c.batch(4, 1, 1).unwrap_err().to_string();
        assert!(e.contains("train_batch_size 30 != train_micro_batch_size_per_gpu 4 × gradient_accumulation_steps 2 × data-parallel size 4"), "{e}");
        let c = cfg(json!({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4})).unwrap();
        assert!(c.batch(1, 1, 1).is_err());
        let c = cfg(json!({})).unwrap();
        assert_eq!(c.batch(1, 6, 3).unwrap(), Batch { global: 18, micro: 6, accum: 3 });
    }

    #[test]
    fn errors_name_the_key_path() {
        for (v, want) in [
            (json!({"optimizer": {"type": "SGD"}}), "optimizer.type: \"SGD\" is not supported"),
            (json!({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}}), "optimizer.params.betas"),
            (json!({"optimizer": {"type": "Adam", "params": {"lr": "x"}}}), "optimizer.params.lr: expected a number"),
            (json!({"fp16": {"enabled": "yes"}}), "fp16.enabled: expected true or false"),
            (json!({"fp16": {"loss_scale": -1}}), "fp16.loss_scale"),
            (json!({"train_micro_batch_size_per_gpu": 0}), "train_micro_batch_size_per_gpu: must be positive"),
            (json!({"scheduler": {"type": "WarmupDecayLR", "params": {}}}), "scheduler.params.total_num_steps: required"),
            (json!({"scheduler": {"type": "OneCycle"}}), "scheduler.type"),
            (json!({"zero_optimization": {"stage": 5}}), "zero_optimization.stage"),
            (json!({"fp16": {"enabled": true}, "bf16": {"enabled": true}}), "fp16 and bf16"),
            (json!({"fp16": {"loss_scale_window": 0}}), "fp16.loss_scale_window: must be positive"),
            (json!({"fp16": {"hysteresis": 0}}), "fp16.hysteresis: must be positive"),
            (json!({"fp16": {"min_loss_scale": 0}}), "fp16.min_loss_scale"),
            (json!({"fp16": {"initial_scale_power": 99}}), "fp16.initial_scale_power: 99 is too large"),
            // unknown keys, with the nearest known one; DeepSpeed's other keys are fine
            (json!({"train_micro_batch_size_per_gpus": 2}), "train_micro_batch_size_per_gpus: unknown key (did you mean \"train_micro_batch_size_per_gpu\"?)"),
            (
                json!({"zero_optimization": {"stage": 1, "reduce_bucket_sise": 5}}),
                "zero_optimization.reduce_bucket_sise: unknown key (did you mean \"zero_optimization.reduce_bucket_size\"?)",
            ),
            (json!({"fp16": {"loss_scale_windows": 5}}), "fp16.loss_scale_windows: unknown key (did you mean \"fp16.loss_scale_window\"?)"),
            (
                json!({"optimizer": {"type": "Adam", "params": {"weight_decays": 0.1}}}),
                "optimizer.params.weight_decays: unknown key (did you mean \"optimizer.params.weight_decay\"?)",
            ),
            (json!({"optimizer": {"type": "Adam", "params": {"amsgrad": true}}}), "optimizer.params.amsgrad: not supported"),
            (json!({"bf16": {"enable": true}}), "bf16.enable: unknown key (did you mean \"bf16.enabled\"?)"),
            (json!({"optimizer": {"type": "Adam", "params": {"eps": 0}}}), "optimizer.params.eps: must be positive"),
            (json!({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": -1}}}), "scheduler.params.warmup_max_lr: must be positive"),
            (json!({"checkpoint": {"writer": {"decoupld": false}}}), "checkpoint.writer.decoupld: unknown key (did you mean \"checkpoint.writer.decoupled\"?)"),
            (json!({"checkpoint": {"writer": {"decoupled": "no"}}}), "checkpoint.writer.decoupled: expected true or false"),
            (json!({"checkpoint": {"tag_validations": "Warn"}}), "checkpoint.tag_validations: unknown key (did you mean \"checkpoint.tag_validation\"?)"),
        ] {
            let e = cfg(v).unwrap_err().to_string();
            assert!(e.starts_with("ds.json: ") && e.contains(want), "want {want:?}: {e}");
        }
    }

    #[test]
    fn the_checkpoint_block_decides_the_writer_and_lists_the_rest() {
        assert_eq!(cfg(json!({})).unwrap().checkpoint_decoupled, None);
        let c = cfg(json!({"checkpoint": {"tag_validation": "Warn", "writer": {"decoupled": false, "type": "fast"}}})).unwrap();
        assert_eq!(c.checkpoint_decoupled, Some(false));
        assert_eq!(c.unused, vec!["checkpoint.tag_validation".to_string(), "checkpoint.writer.type".to_string()]);
        let c = cfg(json!({"checkpoint": {"writer": {"decoupled": true}}})).unwrap();
        assert_eq!((c.checkpoint_decoupled, c.unused.len()), (Some(true), 0));
    }

    #[test]
    fn dotted_overrides_apply_before_validation() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/config_block_large.json");
        let c = DsConfig::load_with(&p, &[("fp16.enabled".into(), json!(false)), ("bf16.enabled".into(), json!(true))]).unwrap();
        assert_eq!((c.fp16.as_ref().unwrap().enabled, c.bf16), (Some(false), Some(true)));
        assert_eq!(c.source("bf16"), "--set");
        assert_eq!(c.source("optimizer"), "config_block_large.json");
        let e = DsConfig::load_with(&p, &[("bf16.enabled".into(), json!(true))]).unwrap_err().to_string();
        assert!(e.contains("fp16 and bf16 are both enabled"), "{e}");
        let e = DsConfig::load_with(&p, &[("steps_per_print.x".into(), json!(1))]).unwrap_err().to_string();
        assert!(e.contains("--set steps_per_print.x: steps_per_print is not an object"), "{e}");
    }
}
