//! The effective run configuration: DeepSpeed JSON + `configs.json` +
//! `--set`, merged with DeepSpeed's precedence (the DeepSpeed file decides
//! batch sizes, optimizer hyper-parameters, clipping and precision; its
//! `scheduler` block, when present, replaces the original's AnnealingLR),
//! each value remembered with where it came from.

use std::path::{Path, PathBuf};

use super::args::LoadedArgs;
use super::ds::{Batch, DsConfig, SchedulerCfg};
use crate::data::blocklm::BlockConfig;
use crate::data::corpus::{parse_entry, CorpusSpec, Reader};
use crate::data::mixture::TrainData;
use crate::error::{Error, Result};
use crate::optim::adamw::AdamWConfig;
use crate::optim::optimizer::Precision;
use crate::optim::scaler::{DynamicKeys, ScalerConfig, ScalerRules};
use crate::optim::schedule::{Decay, Schedule};
use crate::optim::zero::ZeroConfig;

/// One line of the effective-configuration report.
pub struct Entry {
    pub key: String,
    pub value: String,
    pub source: String,
}

pub struct RunConfig {
    pub ds: DsConfig,
    pub args: LoadedArgs,
    pub batch: Batch,
    pub lr: f64,
    pub adam: AdamWConfig,
    pub clip: f64,
    pub schedule: Schedule,
    pub block: BlockConfig,
    /// Corpus files or folders and their reader (train_data, with "wudao"
    /// meaning the default corpus and `wudao:<path>` the WuDao reader), or
    /// a weighted mixture of corpora.
    pub train_data: TrainData,
    /// valid_data and test_data, read as train_data.
    pub valid_data: Option<CorpusSpec>,
    pub test_data: Option<CorpusSpec>,
    /// The train/valid/test shares of `split`, as the original's `get_split`.
    pub split: [f64; 3],
    pub eval_batch: usize,
    /// ZeRO stage and bucket sizes (DeepSpeed's zero_optimization).
    pub zero: ZeroConfig,
    /// Compute dtype, and the fp16 loss scaler's settings.
    pub precision: Precision,
    pub scaler: Option<ScalerConfig>,
    pub fp32_layernorm: bool,
    pub fp32_embedding: bool,
    pub attention_scale: f64,
    /// Layers per recomputed chunk; 0 = activation checkpointing off.
    pub checkpoint_num_layers: usize,
    /// Checkpoint files written by a background thread while training goes
    /// on (`checkpoint.writer.decoupled`, true unless the DeepSpeed file
    /// says false), else with training waiting.
    pub background_save: bool,
    pub report: Vec<Entry>,
    /// Things the user must know: unsupported-yet settings that fall back.
    pub warnings: Vec<String>,
    /// configs.json keys this program reads otherwise than the original, by
    /// choice: announced once at start, each with its key.
    pub notes: Vec<String>,
}

/// The deliberate differences from the original that this run's keys
/// touch, each naming its key (docs/configuration.md has them all).
fn differences(args: &LoadedArgs) -> Vec<String> {
    let a = &args.args;
    let src = |key: &str| args.source(key).to_string();
    let given = |key: &str| args.source(key) != super::args::Source::Default;
    let mut notes = Vec::new();
    if a.save.is_some() && (given("experiment_name") || a.new_save_directory) {
        notes.push(format!(
            "experiment_name \"{}\" ({}): checkpoints go to save itself; the original saves under save/<experiment_name><MM-DD-HH-MM> (on resume without new_save_directory, the loaded run's folder name), a new folder each start, which a resume or a script cannot name in advance{}",
            a.experiment_name,
            src("experiment_name"),
            if a.new_save_directory { "; new_save_directory = true changes nothing here" } else { "" }
        ));
    }
    // (given: the original's configs.json files have it, "")
    if a.summary_dir.is_empty() && given("summary_dir") && a.train_iters > 0 {
        notes.push(format!(
            "summary_dir \"\" ({}): no TensorBoard files are written (metrics.jsonl and loss.png in save hold the run's numbers); the original writes runs/<experiment_name> under the working directory even then: set summary_dir (\".\" for that place) to write them",
            src("summary_dir")
        ));
    }
    if a.no_save_optim {
        notes.push(format!(
            "no_save_optim = true ({}): checkpoints leave out the optimizer state (a resume starts Adam's moments afresh); the original's DeepSpeed path saves it regardless",
            src("no_save_optim")
        ));
    }
    for key in ["no_save_rng", "no_load_rng"] {
        let on = if key == "no_save_rng" { a.no_save_rng } else { a.no_load_rng };
        if on {
            notes.push(format!(
                "{key} = true ({}): has no effect: this program keeps no random state to save or skip; every random stream (samples, masks, dropout) derives from seed and the iteration, so a resumed run draws what the uninterrupted one draws",
                src(key)
            ));
        }
    }
    if a.shuffle {
        notes.push(format!(
            "shuffle = true ({}): has no effect: every sample is drawn at random from (seed, sample index), shuffled or not (the original's random sampler with replacement draws other samples)",
            src("shuffle")
        ));
    }
    let tp = a.model_parallel_size.max(1);
    if a.make_vocab_size_divisible_by % tp != 0 {
        notes.push(format!(
            "make_vocab_size_divisible_by = {} ({}) is not a multiple of model_parallel_size {tp}: the vocabulary is padded to a multiple of both, so its rows always split over the ranks; the original pads to a multiple of {} only, which fails to split for some vocabulary sizes",
            a.make_vocab_size_divisible_by,
            src("make_vocab_size_divisible_by"),
            a.make_vocab_size_divisible_by
        ));
    }
    if a.intermediate_size.is_some_and(|i| i != 4 * a.hidden_size) {
        notes.push(format!(
            "intermediate_size = {} ({}): the original's GLM always uses 4 × hidden_size = {}: a checkpoint of this model does not load there",
            a.intermediate_size.unwrap_or_default(),
            src("intermediate_size"),
            4 * a.hidden_size
        ));
    }
    if a.layernorm_epsilon != 1e-5 {
        notes.push(format!(
            "layernorm_epsilon = {} ({}): the original's GLM always uses 1e-5: the same weights give other outputs there",
            a.layernorm_epsilon,
            src("layernorm_epsilon")
        ));
    }
    notes
}

/// The original project's dataset name for its `data.json`.
pub const DEFAULT_CORPUS: &str = "glm_pretrain/data/data.json";

/// What to do about a `train_data` entry `d` that does not exist: build the
/// default corpus, or name one that exists (the default one where it does).
pub fn missing_corpus_hint(d: &Path) -> String {
    let default = Path::new(DEFAULT_CORPUS);
    if d == default {
        "scripts/setup.sh builds the default corpus there; for your own corpus see docs/corpus.md".into()
    } else if default.is_file() {
        format!("point train_data at an existing corpus file or folder (see docs/corpus.md), e.g. the default corpus: --set train_data={DEFAULT_CORPUS}")
    } else {
        format!(
            "point train_data at an existing corpus file or folder (see docs/corpus.md), or build the default corpus {DEFAULT_CORPUS} with scripts/setup.sh"
        )
    }
}

/// The corpus files under `roots`, the entries of configs.json's `key`
/// (train_data, valid_data, test_data); a missing one is an error naming
/// the key, with a hint.
pub fn files_of(key: &str, roots: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for d in roots {
        files.extend(crate::data::corpus::corpus_files(d).map_err(|e| match e {
            Error::Io { path, error } if error.kind() == std::io::ErrorKind::NotFound => Error::invalid(
                path,
                format!("{key}: no such file or folder; hint: {}", missing_corpus_hint(d).replace("point train_data", &format!("point {key}"))),
            ),
            e => e,
        })?);
    }
    Ok(files)
}

impl RunConfig {
    pub fn build(ds: DsConfig, args: LoadedArgs, dp: usize) -> Result<Self> {
        let a = &args.args;
        // the model's shape, before anything is built (vocabulary aside)
        model_of(a, 1).validate()?;
        let dsname = ds.path.file_name().unwrap_or_default().to_string_lossy().to_string();
        let src = |key: &str| args.source(key).to_string();
        let mut report = Vec::new();
        let mut put = |key: &str, value: String, source: String| report.push(Entry { key: key.into(), value, source });

        let batch = ds.batch(dp, a.batch_size, a.gradient_accumulation_steps)?;
        // the DeepSpeed file's batch keys (or a --set of them) decide, else configs.json's
        let ds_batch_src = |keys: &[&str]| {
            if keys.iter().any(|k| ds.source(k) == "--set") {
                "--set".to_string()
            } else {
                dsname.clone()
            }
        };
        let batch_keys = ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"];
        let batch_src = if ds.micro_batch.is_some() || ds.train_batch_size.is_some() { ds_batch_src(&batch_keys) } else { src("batch_size") };
        put("train_batch_size", batch.global.to_string(), batch_src.clone());
        put("train_micro_batch_size_per_gpu", batch.micro.to_string(), batch_src);
        put(
            "gradient_accumulation_steps",
            batch.accum.to_string(),
            if ds.grad_accum.is_some() || ds.micro_batch.is_some() || ds.train_batch_size.is_some() {
                ds_batch_src(&batch_keys)
            } else {
                src("gradient_accumulation_steps")
            },
        );

        let o = ds.optimizer.clone();
        // (value, where it came from, whether the DeepSpeed file gave it)
        // The learning rate: the DeepSpeed file's where it names one, except
        // over an explicit --set of lr (said in the source column).
        let lr = match (o.as_ref().and_then(|o| o.lr), args.source("lr")) {
            (Some(_), super::args::Source::Set) => (a.lr, format!("--set, over {dsname}"), false),
            (Some(v), _) => (v, ds.source("optimizer.params.lr"), true),
            (None, s) => (a.lr, s.to_string(), false),
        };
        // The rest as the original: with DeepSpeed's optimizer, the DeepSpeed
        // file decides betas, eps, weight decay and clipping, a value it lacks
        // being DeepSpeed's default (FusedAdam's; no clipping), and
        // configs.json's keys have no effect; without an optimizer block
        // (which the original's DeepSpeed path cannot train without),
        // configs.json decides, as on the original's non-DeepSpeed path.
        let decide = |ds_v: Option<f64>, ds_key: &str, ds_default: f64, key: &str, arg: f64| -> (f64, String, bool) {
            match (&o, ds_v) {
                (Some(_), Some(v)) => (v, ds.source(ds_key), true),
                (Some(_), None) => (ds_default, format!("DeepSpeed's default: {dsname} has no {ds_key}"), true),
                (None, _) => (arg, src(key), false),
            }
        };
        let b1 = decide(o.as_ref().and_then(|o| o.betas.map(|b| b.0)), "optimizer.params.betas", 0.9, "adam_beta1", a.adam_beta1);
        let b2 = decide(o.as_ref().and_then(|o| o.betas.map(|b| b.1)), "optimizer.params.betas", 0.999, "adam_beta2", a.adam_beta2);
        let eps = decide(o.as_ref().and_then(|o| o.eps), "optimizer.params.eps", 1e-8, "adam_eps", a.adam_eps);
        let wd = decide(o.as_ref().and_then(|o| o.weight_decay), "optimizer.params.weight_decay", 0.0, "weight_decay", a.weight_decay);
        // clipping is the DeepSpeed file's own key: where it names one, it
        // decides with or without an optimizer block
        let clip = match (&o, ds.gradient_clipping) {
            (None, Some(v)) => (v, ds.source("gradient_clipping"), true),
            _ => decide(ds.gradient_clipping, "gradient_clipping", 0.0, "clip_grad", a.clip_grad),
        };
        // configs.json's values that the DeepSpeed file overrules: named once
        let mut overruled = Vec::new();
        if o.is_some() {
            for (key, arg, (v, _, _), there) in [
                ("adam_beta1", a.adam_beta1, &b1, "optimizer.params.betas"),
                ("adam_beta2", a.adam_beta2, &b2, "optimizer.params.betas"),
                ("adam_eps", a.adam_eps, &eps, "optimizer.params.eps"),
                ("weight_decay", a.weight_decay, &wd, "optimizer.params.weight_decay"),
                ("clip_grad", a.clip_grad, &clip, "gradient_clipping"),
            ] {
                if args.source(key) != super::args::Source::Default && arg != *v {
                    overruled.push(format!("{key} = {arg} ({}; {there} = {v} decides)", src(key)));
                }
            }
            if args.source("optimizer") != super::args::Source::Default && !a.optimizer.eq_ignore_ascii_case("adam") {
                overruled.push(format!("optimizer = {:?} ({}; the DeepSpeed file's optimizer decides)", a.optimizer, src("optimizer")));
            }
            if let (Some(ds_lr), super::args::Source::File(_)) = (o.as_ref().and_then(|o| o.lr), args.source("lr")) {
                if ds_lr != a.lr {
                    overruled.push(format!("lr = {} ({}; optimizer.params.lr = {ds_lr} decides here, where the original's AnnealingLR starts from configs.json's lr: --set lr= to decide here)", a.lr, src("lr")));
                }
            }
        }
        let decay = (a.lr_decay_ratio, src("lr_decay_ratio"), false);
        // ranges, named by the key and the file that gave the value (the
        // DeepSpeed file checks its own keys as it is read)
        for (key, (v, from, from_ds), ok, what) in [
            ("lr", &lr, lr.0 >= 0.0 && lr.0.is_finite(), "must be >= 0 (0: the weights do not move)"),
            ("adam_beta1", &b1, (0.0..1.0).contains(&b1.0), "must be in [0, 1)"),
            ("adam_beta2", &b2, (0.0..1.0).contains(&b2.0), "must be in [0, 1)"),
            ("adam_eps", &eps, eps.0 > 0.0, "must be positive"),
            ("weight_decay", &wd, wd.0 >= 0.0, "must be >= 0"),
            ("clip_grad", &clip, clip.0 >= 0.0, "must be >= 0 (0 = no clipping)"),
            ("lr_decay_ratio", &decay, (0.0..=1.0).contains(&decay.0), "must be in [0, 1] (the floor as a fraction of lr)"),
        ] {
            if !ok && !from_ds {
                return Err(Error::Config(format!("{key} = {v} ({from}): {what}")));
            }
        }
        let ((lr, lr_src, _), (b1, b1_src, _), (b2, _, _), (eps, eps_src, _), (wd, wd_src, _), (clip, clip_src, _)) = (lr, b1, b2, eps, wd, clip);
        if a.eval_batch_size == Some(0) {
            return Err(Error::Config(format!("eval_batch_size = 0 ({}): must be positive (or null: the micro-batch)", src("eval_batch_size"))));
        }
        if a.eval_interval > 0 && a.eval_iters == 0 {
            return Err(Error::Config(format!("eval_iters = 0 ({}): must be positive when eval_interval ({}) is", src("eval_iters"), a.eval_interval)));
        }
        if !a.optimizer.eq_ignore_ascii_case("adam") && o.is_none() {
            return Err(Error::Config(format!("optimizer = \"{}\" ({}): only adam (AdamW) is supported", a.optimizer, src("optimizer"))));
        }
        put(
            "optimizer",
            "AdamW (decoupled weight decay; no decay for biases and LayerNorm)".to_string(),
            o.as_ref().map_or(src("optimizer"), |_| dsname.clone()),
        );
        put("lr", lr.to_string(), lr_src.clone());
        put("betas", format!("({b1}, {b2})"), b1_src);
        put("eps", eps.to_string(), eps_src);
        put("weight_decay", wd.to_string(), wd_src);
        put("gradient_clipping", clip.to_string(), clip_src);

        let mut early_warnings = Vec::new();
        let schedule = match &ds.scheduler {
            Some(s) => {
                put("scheduler", format!("{s:?}"), dsname.clone());
                Schedule::DeepSpeed { cfg: s.clone(), base_lr: lr }
            }
            None => {
                let style = Decay::parse(&a.lr_decay_style).ok_or_else(|| {
                    Error::Config(format!("lr_decay_style = \"{}\" ({}): expected cosine, linear or constant", a.lr_decay_style, src("lr_decay_style")))
                })?;
                // as pretrain_glm.py: at least one decay iteration; warmup a
                // fraction of them, not rounded
                let decay_iters = a.lr_decay_iters.unwrap_or(a.train_iters).max(1);
                let warmup_iters = a.warmup * decay_iters as f64;
                if !(0.0..=1.0).contains(&a.warmup) {
                    return Err(Error::Config(format!("warmup = {} ({}): a fraction in [0, 1]", a.warmup, src("warmup"))));
                }
                if a.warmup > 0.5 {
                    early_warnings.push(format!(
                        "warmup = {} ({}): more than half of lr_decay_iters warms up; the original refuses it (AnnealingLR asserts warmup × lr_decay_iters <= the decay iterations that follow)",
                        a.warmup,
                        src("warmup")
                    ));
                }
                // named by the keys that make it, from where the last of them came
                let source = args.source_of(&["lr_decay_style", "lr_decay_iters", "warmup", "lr_decay_ratio"]).to_string();
                put(
                    "lr schedule",
                    format!(
                        "AnnealingLR {} over lr_decay_iters {decay_iters}, warmup {} ({warmup_iters} iterations), floor lr × lr_decay_ratio {}",
                        a.lr_decay_style, a.warmup, a.lr_decay_ratio
                    ),
                    source,
                );
                if style == Decay::Linear && a.train_iters > decay_iters && a.lr_decay_ratio < 1.0 {
                    // the original's line keeps falling: where it ends
                    let end = lr - lr * (1.0 - a.lr_decay_ratio) * ((a.train_iters - 1) as f64 - warmup_iters) / (decay_iters as f64 - warmup_iters).max(1.0);
                    early_warnings.push(format!(
                        "lr_decay_style linear ({}) with train_iters {} > lr_decay_iters {decay_iters}: the learning rate stays at its floor lr × lr_decay_ratio = {} after iteration {decay_iters}; the original's keeps falling past it (to {end:.3e} at the last iteration, below zero if it gets there)",
                        src("lr_decay_style"),
                        a.train_iters,
                        lr * a.lr_decay_ratio
                    ));
                }
                Schedule::Annealing { lr, warmup_iters, decay_iters, style, decay_ratio: a.lr_decay_ratio }
            }
        };

        let mut warnings = early_warnings;
        if !overruled.is_empty() {
            warnings.push(format!(
                "configs.json's optimizer keys have no effect where the DeepSpeed file has an optimizer, as in the original: {} (change them there, e.g. --set optimizer.params.weight_decay=0.1, --set gradient_clipping=1.0)",
                overruled.join(", ")
            ));
        }
        // a DeepSpeed WarmupLR/WarmupDecayLR with its own learning rates moves the weights at lr 0
        let scheduled = match &ds.scheduler {
            Some(SchedulerCfg::WarmupLr { min_lr, max_lr, .. } | SchedulerCfg::WarmupDecayLr { min_lr, max_lr, .. }) => {
                *min_lr > 0.0 || max_lr.is_some_and(|m| m > 0.0)
            }
            _ => false,
        };
        if lr == 0.0 && !scheduled {
            warnings.push(format!(
                "lr = 0 ({lr_src}): the weights will not move (AdamW's update and decoupled weight decay both scale with lr); the run measures the loss through the training path"
            ));
        }
        let dz = ZeroConfig::default();
        let zero = ZeroConfig {
            stage: ds.zero_stage as u8,
            reduce_bucket_size: ds.reduce_bucket_size.map_or(dz.reduce_bucket_size, |b| b as i64),
            allgather_bucket_size: ds.allgather_bucket_size.map_or(dz.allgather_bucket_size, |b| b as i64),
            overlap_comm: ds.overlap_comm.unwrap_or(dz.overlap_comm),
        };
        zero.validate().map_err(|e| {
            // "zero_optimization.<key> <value>: why", blamed on the --set that gave the value, if one did
            let msg = e.to_string();
            let msg = msg.trim_start_matches("config: ");
            let key = msg.split(' ').next().unwrap_or("zero_optimization");
            ds.blame(key, msg[key.len()..].trim_start())
        })?;
        let zsrc = if ds.raw.get("zero_optimization").is_some() || ds.sets.iter().any(|(k, _)| k.starts_with("zero_optimization")) {
            ds.source("zero_optimization")
        } else {
            "default".into()
        };
        put(
            "zero_optimization",
            format!(
                "stage {} ({}), reduce_bucket_size {}, allgather_bucket_size {}",
                zero.stage,
                ["full optimizer state on every data-parallel rank", "optimizer state partitioned", "optimizer state and gradients partitioned"]
                    [zero.stage as usize],
                zero.reduce_bucket_size,
                zero.allgather_bucket_size
            ),
            zsrc,
        );
        let norm = ds.loss_normalization;
        let norm_given = ds.raw.get("loss_normalization").is_some() || ds.sets.iter().any(|(k, _)| k == "loss_normalization");
        if norm_given || dp > 1 {
            let what = match norm {
                crate::config::ds::LossNormalization::GlobalTokens => {
                    "loss over the loss tokens of the whole global batch: data-parallel N trains what one process would"
                }
                crate::config::ds::LossNormalization::PerRankMean => {
                    "each rank's mean over its own loss tokens, gradients averaged over data-parallel ranks (the original's rule)"
                }
            };
            put("loss_normalization", format!("{} ({what})", norm.name()), if norm_given { ds.source("loss_normalization") } else { "default".into() });
        }
        if zero.stage > 0 && dp == 1 {
            warnings.push(format!(
                "{dsname}: zero_optimization.stage {} with one data-parallel rank partitions nothing (start more ranks to shard optimizer state)",
                zero.stage
            ));
        }
        for k in &ds.zero_unused {
            let offload = k.contains("offload");
            if offload {
                warnings.push(format!("{dsname}: {k} is not supported (no CPU/NVMe offloading); the optimizer state stays on the training device"));
            }
        }
        // a --set of a configs.json key that the DeepSpeed file decides is not
        // dropped silently; the hint is the --set that does it, with the user's value
        let has_batch = ds.micro_batch.is_some() || ds.train_batch_size.is_some();
        // with any of its batch keys the DeepSpeed file decides the
        // accumulation steps too (1 where it names none, as in DeepSpeed)
        let has_accum = ds.grad_accum.is_some() || has_batch;
        let fp16_block = ds.fp16.is_some();
        for (key, ds_key, decides, why) in [
            ("batch_size", "train_micro_batch_size_per_gpu", has_batch, "its batch sizes decide the micro-batch"),
            ("gradient_accumulation_steps", "ds.gradient_accumulation_steps", has_accum, "its batch sizes decide the accumulation steps"),
            ("loss_scale", "fp16.loss_scale", fp16_block, "its fp16 block decides the loss scaler"),
            ("loss_scale_window", "fp16.loss_scale_window", fp16_block, "its fp16 block decides the loss scaler"),
            ("hysteresis", "fp16.hysteresis", fp16_block, "its fp16 block decides the loss scaler"),
            ("min_scale", "fp16.min_loss_scale", fp16_block, "its fp16 block decides the loss scaler"),
        ] {
            if decides && args.source(key) == super::args::Source::Set {
                let v = serde_json::to_value(a).ok().and_then(|m| m.get(key).cloned()).unwrap_or_default();
                let v = if v.is_null() { "0".to_string() } else { v.to_string() };
                // a train_batch_size the file gives must still hold the batch rule:
                // the hint gives the one of the new micro-batch or accumulation
                let global = match (key, ds.train_batch_size.is_some(), v.parse::<usize>()) {
                    ("batch_size", true, Ok(m)) => Some(m * batch.accum * dp),
                    ("gradient_accumulation_steps", true, Ok(g)) => Some(batch.micro * g * dp),
                    _ => None,
                };
                let global = global.map(|g| format!(" --set train_batch_size={g}")).unwrap_or_default();
                // at ZeRO stage 0 DeepSpeed has no hysteresis: the hint takes a stage that has
                let stage = if key == "hysteresis" && ds.zero_stage == 0 { " --set zero_optimization.stage=1" } else { "" };
                let why = if stage.is_empty() { why.to_string() } else { format!("{why}, and at ZeRO stage 0 DeepSpeed's fp16 optimizer has no hysteresis") };
                warnings.push(format!("--set {key}={v} has no effect: {why} in {dsname} (to change it there: --set {ds_key}={v}{global}{stage})"));
            }
        }
        if args.source("output_dropout") != super::args::Source::Default && a.output_dropout != a.hidden_dropout {
            warnings.push(format!(
                "output_dropout = {} ({}) has no effect in pretraining: as in GLM, the residual dropouts use hidden_dropout ({}); output_dropout feeds only classification heads",
                a.output_dropout,
                src("output_dropout"),
                a.hidden_dropout
            ));
        }
        let (precision, scaler, ds_decides) = Self::precision(&ds, &args, zero.stage, &mut warnings)?;
        if ds_decides && args.source("fp16") != super::args::Source::Default && a.fp16 != (precision == Precision::Fp16) {
            warnings.push(format!("fp16 = {} ({}) has no effect: {} decides the precision ({})", a.fp16, src("fp16"), dsname, precision.name()));
        }
        match &scaler {
            Some(sc) => {
                let s = crate::optim::scaler::LossScaler::new(sc.clone());
                put(
                    "precision",
                    format!("fp16 (fp32 master weights and optimizer state), {}", s.describe()),
                    if ds_decides { ds.source("fp16") } else { src("fp16") },
                );
            }
            None if precision == Precision::Bf16 => {
                put("precision", "bf16 (fp32 master weights, gradient accumulation and optimizer state)".into(), ds.source("bf16"))
            }
            None => put("precision", "fp32".into(), if ds_decides { ds.source("fp16") } else { src("fp16") }),
        }
        if precision != Precision::Fp32 {
            put("fp32_layernorm / fp32_embedding", format!("{} / {}", a.fp32_layernorm, a.fp32_embedding), src("fp32_layernorm"));
        }
        if a.attention_scale < 1.0 || !a.attention_scale.is_finite() {
            return Err(Error::Config(format!("attention_scale = {} ({}): must be >= 1 (1 = off)", a.attention_scale, src("attention_scale"))));
        }
        if a.attention_scale != 1.0 {
            put("attention_scale", a.attention_scale.to_string(), src("attention_scale"));
        }
        let checkpoint_num_layers = if a.checkpoint_activations {
            if a.checkpoint_num_layers == 0 {
                return Err(Error::Config(format!(
                    "checkpoint_num_layers = 0 ({}): must be positive when checkpoint_activations is on",
                    src("checkpoint_num_layers")
                )));
            }
            put(
                "activation checkpointing",
                format!("every {} layer(s) recomputed in backward (checkpoint_activations, checkpoint_num_layers)", a.checkpoint_num_layers),
                src("checkpoint_activations"),
            );
            a.checkpoint_num_layers
        } else {
            0
        };

        if a.seq_length > a.max_position_embeddings {
            return Err(Error::Config(format!(
                "seq_length {} ({}) exceeds max_position_embeddings {} ({})",
                a.seq_length,
                src("seq_length"),
                a.max_position_embeddings,
                src("max_position_embeddings")
            )));
        }
        if a.train_iters > 0 && a.log_interval == 0 {
            return Err(Error::Config(format!("log_interval ({}): must be positive", src("log_interval"))));
        }
        if !(a.save_interval_minutes >= 0.0 && a.save_interval_minutes.is_finite()) {
            return Err(Error::Config(format!(
                "save_interval_minutes = {} ({}): must be >= 0 and finite (fractions allowed; 0 = no saves by time)",
                a.save_interval_minutes,
                src("save_interval_minutes")
            )));
        }
        let block = block_config(a);
        block.validate().map_err(|e| Error::Config(format!("{e} (blank-infilling settings)")))?;

        // the original's tokenizer_type, tokenizer_model_type and fix_command_token
        use crate::data::tokenizer::{TokenizerSpec, TokenizerType};
        let kind = TokenizerType::parse(&a.tokenizer_type).ok_or_else(|| {
            Error::Config(format!("tokenizer_type = \"{}\" ({}): expected one of {}", a.tokenizer_type, src("tokenizer_type"), TokenizerType::names()))
        })?;
        let spec = TokenizerSpec::new(kind, &a.tokenizer_model_type, a.fix_command_token);
        let source = args.source_of(&["tokenizer_type", "tokenizer_model_type", "fix_command_token"]).to_string();
        put("tokenizer_type", spec.describe(&a.tokenizer_model_type), source);
        let train_data = train_data_of(a).map_err(|e| match e {
            Error::Config(m) => Error::Config(m.replacen("train_data: ", &format!("train_data ({}): ", src("train_data")), 1)),
            e => e,
        })?;
        if let TrainData::Mixture(_) = &train_data {
            // one index order names one corpus's documents
            for (k, p) in [("load_splits", &a.load_splits), ("save_splits", &a.save_splits)] {
                if p.is_some() {
                    return Err(Error::Config(format!(
                        "{k} ({}): train_data is a mixture, and {k} holds one corpus's document order; each corpus of a mixture is split on its own with the fixed seed {}: set {k} to null",
                        src(k),
                        crate::data::split::SPLIT_SEED
                    )));
                }
            }
        }
        let valid_data = a.valid_data.as_deref().map(|v| corpus_spec("valid_data", v)).transpose()?;
        let test_data = a.test_data.as_deref().map(|v| corpus_spec("test_data", v)).transpose()?;
        let split = crate::data::split::get_split(&a.split, valid_data.is_some(), test_data.is_some()).map_err(|e| match e {
            Error::Config(m) => Error::Config(m.replacen("\": ", &format!("\" ({}): ", src("split")), 1)),
            e => e,
        })?;
        // "wudao" is the default corpus read by the default reader, not the original's WuDao reader
        let named: Vec<&str> = [("train_data", Some(&a.train_data)), ("valid_data", a.valid_data.as_ref()), ("test_data", a.test_data.as_ref())]
            .into_iter()
            .filter(|(_, v)| v.is_some_and(|v| v.iter().any(|e| e.split_whitespace().any(|t| t == "wudao"))))
            .map(|(k, _)| k)
            .collect();
        if !named.is_empty() {
            warnings.push(format!(
                "{} \"wudao\" ({}) is the default corpus {DEFAULT_CORPUS} read by this project's reader: title and content joined without a separator, punctuation standardised (curly quotes, en dashes), every record kept. The original's WuDao reader joins title.strip() + \" \" + content, keeps only texts over {} characters and leaves the punctuation: name the data wudao:<file or folder> for that reader (docs/corpus.md)",
                named.join(", "),
                named.iter().map(|k| src(k)).collect::<Vec<_>>().join(", "),
                crate::data::corpus::WUDAO_MIN_CHARS
            ));
        }
        let splits = crate::data::split::should_split(&split);
        let no_split = |k: &str| format!("{k} ({}) has no effect: split \"{}\" does not split the documents (as in the original)", src(k), a.split);
        if !splits {
            for (k, given) in
                [("load_splits", a.load_splits.is_some()), ("save_splits", a.save_splits.is_some()), ("save_test_data", a.save_test_data.is_some())]
            {
                if given {
                    warnings.push(no_split(k));
                }
            }
        } else {
            if a.load_splits.is_some() && a.save_splits.is_some() {
                warnings.push(format!(
                    "save_splits ({}) has no effect beside load_splits ({}): the loaded order is not saved again (as in the original)",
                    src("save_splits"),
                    src("load_splits")
                ));
            }
            if a.save_test_data.is_some() && split[2] == 0.0 {
                let why = if test_data.is_some() { format!("test_data ({}) takes the test share", src("test_data")) } else { "its test share is 0".into() };
                return Err(Error::Config(format!(
                    "save_test_data ({}): split \"{}\" ({}) has no test split to save: {why} (the original fails there too); set save_test_data=null",
                    src("save_test_data"),
                    a.split,
                    src("split")
                )));
            }
        }
        let eval_batch = a.eval_batch_size.unwrap_or(batch.micro);

        for (k, v) in [
            ("num_layers", a.num_layers.to_string()),
            ("hidden_size", a.hidden_size.to_string()),
            ("num_attention_heads", a.num_attention_heads.to_string()),
            ("intermediate_size", a.intermediate_size.unwrap_or(4 * a.hidden_size).to_string()),
            ("max_position_embeddings", a.max_position_embeddings.to_string()),
            ("seq_length", a.seq_length.to_string()),
            ("hidden_dropout", a.hidden_dropout.to_string()),
            ("attention_dropout", a.attention_dropout.to_string()),
            ("train_iters", a.train_iters.to_string()),
            ("seed", a.seed.to_string()),
            ("train_data", train_data.describe()),
            ("split", describe_split(&a.split, &split)),
            ("valid_data", valid_data.as_ref().map_or("(none: the valid split of train_data)".into(), |v| format!("{:?}", v.entries()))),
            ("test_data", test_data.as_ref().map_or("(none: the test split of train_data)".into(), |v| format!("{:?}", v.entries()))),
            ("tokenizer_path", a.tokenizer_path.as_ref().map_or("(train on the corpus)".into(), |p| p.display().to_string())),
            ("bert_prob / gap_sentence_prob", format!("{} / {}", a.bert_prob, a.gap_sentence_prob)),
            ("task_mask", a.task_mask.to_string()),
            ("log_interval", a.log_interval.to_string()),
            ("eval_interval / eval_iters", format!("{} / {}", a.eval_interval, a.eval_iters)),
            (
                "save / save_interval",
                format!(
                    "{} / {}{}",
                    a.save.as_ref().map_or("(none)".into(), |p| p.display().to_string()),
                    a.save_interval,
                    if a.overwrite { " (overwrite: an earlier run there is removed)" } else { "" }
                ),
            ),
            ("load", a.load.as_ref().map_or("(none)".into(), |p| p.display().to_string())),
            (
                "summary_dir",
                if a.summary_dir.is_empty() {
                    "\"\" (no TensorBoard files)".to_string()
                } else {
                    format!("{} (TensorBoard: {})", a.summary_dir, Path::new(&a.summary_dir).join("runs").join(&a.experiment_name).display())
                },
            ),
        ] {
            let key = k.split(' ').next().unwrap();
            let s = args.source(key);
            report.push(Entry { key: k.into(), value: v, source: s.to_string() });
        }
        if let Some(tb) = &ds.tensorboard {
            report.push(Entry {
                key: "tensorboard".into(),
                value: format!("{} (DeepSpeed's monitor: Train/Samples/... against samples)", tb.log_dir().display()),
                source: ds.source("tensorboard").to_string(),
            });
        }
        // how checkpoints are written, kept and timed
        let background_save = ds.checkpoint_decoupled.unwrap_or(true);
        if a.save.is_some() {
            // (separate lines: a longer key would widen every aligned line)
            report.push(Entry {
                key: "save_interval_minutes".into(),
                value: if a.save_interval_minutes == 0.0 {
                    "0 (no saves by time)".to_string()
                } else {
                    format!("{} (a save when as long has passed since the last)", a.save_interval_minutes)
                },
                source: src("save_interval_minutes"),
            });
            report.push(Entry {
                key: "keep_last".into(),
                value: if a.keep_last == 0 { "0 (every checkpoint kept)".to_string() } else { format!("{} (older complete checkpoints removed)", a.keep_last) },
                source: src("keep_last"),
            });
            let (value, source) = match ds.checkpoint_decoupled {
                Some(true) => ("true (files written in the background while training goes on)".to_string(), ds.source("checkpoint.writer.decoupled")),
                Some(false) => ("false (training waits while the files are written)".to_string(), ds.source("checkpoint.writer.decoupled")),
                None => {
                    ("true (files written in the background while training goes on; the default here, DeepSpeed's is false)".to_string(), "default".to_string())
                }
            };
            report.push(Entry { key: "checkpoint.writer.decoupled".into(), value, source });
        } else {
            for (key, given) in [("keep_last", a.keep_last != 0), ("save_interval_minutes", a.save_interval_minutes != 0.0)] {
                if given {
                    warnings.push(format!("{key} ({}) has no effect: save is null (no checkpoints)", src(key)));
                }
            }
            if ds.checkpoint_decoupled.is_some() {
                warnings
                    .push(format!("checkpoint.writer.decoupled ({}) has no effect: save is null (no checkpoints)", ds.source("checkpoint.writer.decoupled")));
            }
        }
        // the other keys read, where they differ from the original's default
        // (what they do in this run said beside them)
        let d = glm_common::args::Args::default();
        let fp32 = precision == Precision::Fp32;
        let scaler_here = precision == Precision::Fp16 && ds.fp16.is_none();
        for (key, differs, value) in [
            ("make_vocab_size_divisible_by", a.make_vocab_size_divisible_by != d.make_vocab_size_divisible_by, a.make_vocab_size_divisible_by.to_string()),
            ("no_block_position", a.no_block_position, "true (1D positions: no block-position embedding)".to_string()),
            ("fp32_layernorm", fp32 && a.fp32_layernorm, "true (no effect: the run is fp32)".to_string()),
            ("fp32_embedding", fp32 && a.fp32_embedding, "true (no effect: the run is fp32)".to_string()),
            (
                "checkpoint_num_layers",
                a.checkpoint_num_layers != d.checkpoint_num_layers && !a.checkpoint_activations,
                format!("{} (no effect: checkpoint_activations is off)", a.checkpoint_num_layers),
            ),
            (
                "loss_scale",
                a.loss_scale != d.loss_scale && !scaler_here,
                format!("{:?} (no effect: {})", a.loss_scale, if ds.fp16.is_some() { "the DeepSpeed file's fp16 block decides" } else { "no fp16" }),
            ),
            (
                "loss_scale_window",
                a.loss_scale_window != d.loss_scale_window && !scaler_here,
                format!("{} (no effect here: the scaler is not configs.json's)", a.loss_scale_window),
            ),
            ("hysteresis", a.hysteresis != d.hysteresis && !scaler_here, format!("{} (no effect here: the scaler is not configs.json's)", a.hysteresis)),
            ("min_scale", a.min_scale != d.min_scale && !scaler_here, format!("{} (no effect here: the scaler is not configs.json's)", a.min_scale)),
            ("eval_batch_size", a.eval_batch_size.is_some(), eval_batch.to_string()),
            ("text_key", a.text_key != d.text_key, format!("{:?} (the text of JSON Lines records)", a.text_key)),
            (
                "eval_text_key",
                a.eval_text_key.is_some(),
                format!(
                    "{:?} (the text of valid_data/test_data records{})",
                    a.eval_text_key.clone().unwrap_or_default(),
                    if a.valid_data.is_none() && a.test_data.is_none() { "; no effect: neither is given" } else { "" }
                ),
            ),
            ("gpt_infill_prob", a.gpt_infill_prob != d.gpt_infill_prob, a.gpt_infill_prob.to_string()),
            ("gpt_min_ratio", a.gpt_min_ratio != d.gpt_min_ratio, a.gpt_min_ratio.to_string()),
            ("gap_sentence_ratio", a.gap_sentence_ratio != d.gap_sentence_ratio, a.gap_sentence_ratio.to_string()),
            ("avg_block_length", a.avg_block_length != d.avg_block_length, a.avg_block_length.to_string()),
            ("no_shuffle_block", a.no_shuffle_block, "true (Part B spans in text order)".to_string()),
            ("sample_one_document", a.sample_one_document, "true (one document per sample)".to_string()),
            ("no_load_optim", a.no_load_optim, format!("true{}", if a.load.is_none() { " (no effect: no load)" } else { "" })),
            ("no_load_lr_scheduler", a.no_load_lr_scheduler, format!("true{}", if a.load.is_none() { " (no effect: no load)" } else { "" })),
        ] {
            if differs {
                report.push(Entry { key: key.into(), value, source: src(key) });
            }
        }
        // generation settings: glm-worker generate takes its own flags
        for (key, differs, flag) in [
            ("temperature", a.temperature != d.temperature, "--temperature"),
            ("top_p", a.top_p != d.top_p, "--top-p"),
            ("top_k", a.top_k != d.top_k, "--top-k"),
            ("out_seq_length", a.out_seq_length != d.out_seq_length, "--max-tokens"),
        ] {
            if differs {
                warnings.push(format!("{key} ({}) has no effect in training: glm-worker generate takes {flag}", src(key)));
            }
        }
        for (k, p) in [("load_splits", &a.load_splits), ("save_splits", &a.save_splits), ("save_test_data", &a.save_test_data)] {
            if let Some(p) = p {
                let value = if k == "save_splits" { crate::data::split::npy_path(p) } else { p.clone() };
                report.push(Entry { key: k.into(), value: value.display().to_string(), source: args.source(k).to_string() });
            }
        }
        let mut notes = differences(&args);
        if ds.scheduler.is_some() {
            notes.push(format!(
                "scheduler ({}): decides the learning rate here; in the original its AnnealingLR (configs.json's lr, warmup, lr_decay_*) steps after DeepSpeed's scheduler and overrides it every iteration",
                ds.source("scheduler")
            ));
        }
        let (fp32_layernorm, fp32_embedding, attention_scale) = (a.fp32_layernorm, a.fp32_embedding, a.attention_scale);
        Ok(RunConfig {
            ds,
            precision,
            scaler,
            fp32_layernorm,
            fp32_embedding,
            attention_scale,
            checkpoint_num_layers,
            background_save,
            args,
            batch,
            lr,
            zero,
            adam: AdamWConfig { beta1: b1, beta2: b2, eps, weight_decay: wd },
            clip,
            schedule,
            block,
            train_data,
            valid_data,
            test_data,
            split,
            eval_batch,
            report,
            warnings,
            notes,
        })
    }

    /// The compute dtype and fp16 loss-scaler settings: the DeepSpeed file's
    /// `fp16`/`bf16` blocks decide; an `fp16` block decides the whole scaler
    /// (keys it leaves out take DeepSpeed's defaults for the path ZeRO stage
    /// `stage` takes, `ScalerConfig::resolve`). Without an `fp16` block the
    /// original's configs.json keys (`fp16`, `loss_scale` — null = dynamic
    /// —, `loss_scale_window`, `hysteresis`, `min_scale`) apply when given,
    /// counting as dynamic keys written in the block. At stage 0, where DeepSpeed's
    /// `FP16_Optimizer` has no hysteresis, a given `hysteresis` or
    /// `consecutive_hysteresis` is announced in `warnings` as having no
    /// effect. The flag says whether the DeepSpeed file (rather than
    /// configs.json) decided the precision.
    fn precision(ds: &DsConfig, args: &LoadedArgs, stage: u8, warnings: &mut Vec<String>) -> Result<(Precision, Option<ScalerConfig>, bool)> {
        let a = &args.args;
        let f = ds.fp16.clone().unwrap_or_default();
        if ds.bf16 == Some(true) {
            return Ok((Precision::Bf16, None, true));
        }
        if !f.enabled.unwrap_or(a.fp16) {
            return Ok((Precision::Fp32, None, f.enabled.is_some()));
        }
        // configs.json's scaler keys fill in only where the DeepSpeed file has no `fp16` block
        let given = |k: &str| ds.fp16.is_none() && args.source(k) != super::args::Source::Default;
        // configs.json values that fill in: each checked under its own name and source
        let from_args = |key: &str, ok: bool, what: &str| -> Result<bool> {
            if !given(key) {
                return Ok(false);
            }
            if !ok {
                let v = serde_json::to_value(a).ok().and_then(|m| m.get(key).cloned()).unwrap_or_default();
                return Err(Error::Config(format!("{key} = {v} ({}): {what}", args.source(key))));
            }
            Ok(true)
        };
        let loss_scale = match f.loss_scale {
            Some(l) => l,
            None if from_args("loss_scale", a.loss_scale.is_none_or(|l| l >= 0.0 && l.is_finite()), "must be null (dynamic) or a number >= 0")? => {
                a.loss_scale.unwrap_or(0.0)
            }
            None => 0.0,
        };
        // a static scale ignores the dynamic scaler's settings: nothing to check
        let dynamic = loss_scale == 0.0;
        let keys = DynamicKeys {
            initial_scale_power: f.initial_scale_power,
            loss_scale_window: match f.loss_scale_window {
                Some(w) => Some(w),
                None if from_args("loss_scale_window", !dynamic || a.loss_scale_window > 0, "must be positive")? => Some(a.loss_scale_window),
                None => None,
            },
            hysteresis: match f.hysteresis {
                Some(h) => Some(h),
                None if from_args("hysteresis", !dynamic || a.hysteresis > 0, "must be positive")? => Some(a.hysteresis),
                None => None,
            },
            consecutive_hysteresis: f.consecutive_hysteresis,
            min_loss_scale: match f.min_loss_scale {
                Some(m) => Some(m),
                None if from_args("min_scale", !dynamic || (a.min_scale > 0.0 && a.min_scale.is_finite()), "must be positive")? => Some(a.min_scale),
                None => None,
            },
        };
        let rules = ScalerRules::for_stage(stage);
        let mut keys = keys;
        // DeepSpeed's stage 0 with torch's Adam (`torch_adam: true`) takes
        // FP16_UnfusedOptimizer: the same rules, but a minimum of 0.25 when
        // no dynamic key is given
        if rules == ScalerRules::Fp16Optimizer && !keys.any() && ds.raw.pointer("/optimizer/params/torch_adam") == Some(&serde_json::Value::Bool(true)) {
            keys.min_loss_scale = Some(0.25);
        }
        let cfg = ScalerConfig::resolve(loss_scale, &keys, rules);
        if dynamic && rules == ScalerRules::Fp16Optimizer {
            let why = "DeepSpeed's ZeRO stage-0 fp16 optimizer (FP16_Optimizer) has no hysteresis: every overflow halves the scale";
            if let Some(h) = f.hysteresis {
                warnings.push(format!("fp16.hysteresis = {h} ({}) has no effect at ZeRO stage 0: {why}", ds.source("fp16.hysteresis")));
            } else if given("hysteresis") {
                warnings.push(format!("hysteresis = {} ({}) has no effect at ZeRO stage 0: {why}", a.hysteresis, args.source("hysteresis")));
            }
            if let Some(c) = f.consecutive_hysteresis {
                warnings.push(format!("fp16.consecutive_hysteresis = {c} ({}) has no effect at ZeRO stage 0: {why}", ds.source("fp16.consecutive_hysteresis")));
            }
        }
        cfg.validate().map_err(|e| {
            if f.min_loss_scale.is_none() && given("min_scale") {
                Error::Config(format!("min_scale = {} ({}) with {}: {e}", a.min_scale, args.source("min_scale"), ds.path.display()))
            } else {
                // "fp16.<key> ...": blamed on the --set of that key, if one gave it
                let msg = e.to_string();
                let msg = msg.trim_start_matches("config: ");
                let key = msg.split(' ').next().filter(|k| k.starts_with("fp16.")).unwrap_or("fp16");
                ds.blame(key, format!("loss scaler: {}", msg.strip_prefix(key).unwrap_or(msg).trim_start()))
            }
        })?;
        Ok((Precision::Fp16, Some(cfg), f.enabled.is_some()))
    }

    /// Lines of the "effective configuration" block printed at start. The
    /// keys that change nothing here are one line with their count, listed
    /// in full with `show_ignored`.
    pub fn describe(&self, show_ignored: bool) -> Vec<String> {
        let w = self.report.iter().map(|e| e.key.len()).max().unwrap_or(0);
        let mut out: Vec<String> = self.report.iter().map(|e| format!("  {:<w$} = {}  ({})", e.key, e.value, e.source)).collect();
        let ds_name = self.ds.path.file_name().unwrap_or_default().to_string_lossy().to_string();
        let zero_noop: Vec<String> = self.ds.zero_unused.iter().filter(|k| !k.contains("offload")).cloned().collect();
        let ds_keys: Vec<String> = self.ds.unused.iter().cloned().chain(zero_noop).collect();
        let args_name = self
            .args
            .sources
            .values()
            .find_map(|s| match s {
                super::args::Source::File(p) => Some(p.file_name().unwrap_or_default().to_string_lossy().to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "configs.json".into());
        let groups = [(args_name.as_str(), &self.args.ignored), (ds_name.as_str(), &ds_keys)];
        let total: usize = groups.iter().map(|(_, k)| k.len()).sum();
        if total > 0 {
            if show_ignored {
                for (from, keys) in groups.iter().filter(|(_, k)| !k.is_empty()) {
                    out.push(format!("  no effect here ({from}): {}", keys.join(", ")));
                }
            } else {
                let counts: Vec<String> = groups.iter().filter(|(_, k)| !k.is_empty()).map(|(f, k)| format!("{} in {f}", k.len())).collect();
                out.push(format!("  no effect here: {total} keys ({}); --show-ignored lists them", counts.join(", ")));
            }
        }
        out
    }

    /// The model these arguments describe, with `vocab_size` embedding rows.
    pub fn model_config(&self, vocab_size: usize) -> crate::model::glm::GlmConfig {
        model_of(&self.args.args, vocab_size)
    }

    pub fn save_dir(&self) -> Option<&Path> {
        self.args.args.save.as_deref()
    }
}

/// The blank-infilling settings of `a` (validated by the caller).
pub fn block_config(a: &super::args::Args) -> BlockConfig {
    BlockConfig {
        seq_length: a.seq_length,
        bert_prob: a.bert_prob,
        gap_sentence_prob: a.gap_sentence_prob,
        gpt_infill_prob: a.gpt_infill_prob,
        gpt_min_ratio: a.gpt_min_ratio,
        gap_sentence_ratio: a.gap_sentence_ratio,
        avg_block_length: a.avg_block_length,
        shuffle_blocks: !a.no_shuffle_block,
        block_position_encoding: !a.no_block_position,
        task_mask: a.task_mask,
        sample_across_doc: !a.sample_one_document,
        seed: a.seed,
        ..BlockConfig::default()
    }
}

/// `split` as given and the shares it gives (what trains, what validates).
fn describe_split(given: &str, shares: &[f64; 3]) -> String {
    let how = if crate::data::split::should_split(shares) {
        format!("documents shuffled with the original's fixed seed {}", crate::data::split::SPLIT_SEED)
    } else {
        "no split: every document trains, none validates".into()
    };
    let share = |x: f64| {
        let s = format!("{x:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    };
    format!("{given} (train {} / valid {} / test {}; {how})", share(shares[0]), share(shares[1]), share(shares[2]))
}

/// `train_data`: one corpus (none: the default corpus) or a weighted mixture.
pub fn train_data_of(a: &super::args::Args) -> Result<TrainData> {
    if a.train_data.is_empty() {
        return train_corpus(a).map(TrainData::Corpus);
    }
    crate::data::mixture::parse_train_data("train_data", &a.train_data, corpus_spec)
}

/// `train_data` (none: the default corpus), as `corpus_spec` reads it.
pub fn train_corpus(a: &super::args::Args) -> Result<CorpusSpec> {
    if a.train_data.is_empty() {
        Ok(CorpusSpec { roots: vec![PathBuf::from(DEFAULT_CORPUS)], reader: Reader::Default })
    } else {
        corpus_spec("train_data", &a.train_data)
    }
}

/// The corpus entries of configs.json's `key`: `"wudao"` is the default
/// corpus (default reader), `wudao:<path>` a path read by the original's
/// WuDao reader, anything else a path (default reader). One corpus has one
/// reader: mixing them is refused.
pub fn corpus_spec(key: &str, entries: &[String]) -> Result<CorpusSpec> {
    let mut roots = Vec::new();
    let mut readers = Vec::new();
    for e in entries {
        let (root, reader) = if e == "wudao" { (PathBuf::from(DEFAULT_CORPUS), Reader::Default) } else { parse_entry(e) };
        if root.as_os_str().is_empty() {
            return Err(Error::Config(format!("{key}: \"{e}\" names no file or folder (wudao:<file or folder>, or a path)")));
        }
        roots.push(root);
        readers.push(reader);
    }
    if readers.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Config(format!(
            "{key} = {entries:?}: mixes wudao:<path> entries (the original's WuDao reader) with others (this project's reader); one corpus has one reader: prefix every entry with wudao: or none"
        )));
    }
    Ok(CorpusSpec { roots, reader: readers.first().copied().unwrap_or_default() })
}

/// The model `a` describes, with `vocab_size` embedding rows.
pub fn model_of(a: &super::args::Args, vocab_size: usize) -> crate::model::glm::GlmConfig {
    crate::model::glm::GlmConfig {
        vocab_size,
        hidden_size: a.hidden_size,
        num_layers: a.num_layers,
        num_attention_heads: a.num_attention_heads,
        intermediate_size: a.intermediate_size.unwrap_or(4 * a.hidden_size),
        max_position_embeddings: a.max_position_embeddings,
        layernorm_epsilon: a.layernorm_epsilon,
        hidden_dropout: a.hidden_dropout,
        attention_dropout: a.attention_dropout,
        // GLM's pretraining builds its model with output_dropout_prob =
        // hidden_dropout: the residual dropouts use hidden_dropout, and the
        // original's output_dropout only feeds classification heads
        output_dropout: a.hidden_dropout,
        block_position_encoding: !a.no_block_position,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{args::LoadedArgs, ds::DsConfig};

    #[test]
    fn a_configs_json_value_is_range_checked_whatever_the_deepspeed_file_is_called() {
        // a DeepSpeed file named like the start of configs.json's name used to
        // pass configs.json's values unchecked (the source was told by prefix)
        let d = tempfile::tempdir().unwrap();
        let ds = d.path().join("configs");
        std::fs::write(&ds, r#"{"train_micro_batch_size_per_gpu": 2}"#).unwrap();
        let args = d.path().join("configs_run.json");
        std::fs::write(&args, r#"{"lr": -0.5}"#).unwrap();
        let e =
            RunConfig::build(DsConfig::load_with(&ds, &[]).unwrap(), LoadedArgs::load(Some(&args), &[]).unwrap(), 1).err().expect("a negative lr is refused");
        assert_eq!(e.to_string(), "config: lr = -0.5 (configs_run.json): must be >= 0 (0: the weights do not move)");
    }

    fn build(ds_json: &str, args_json: &str, sets: &[&str]) -> Result<RunConfig> {
        let d = tempfile::tempdir().unwrap();
        let (ds, args) = (d.path().join("ds.json"), d.path().join("configs.json"));
        std::fs::write(&ds, ds_json).unwrap();
        std::fs::write(&args, args_json).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        RunConfig::build(DsConfig::load_with(&ds, &[]).unwrap(), LoadedArgs::load(Some(&args), &sets)?, 1)
    }

    /// As the original with DeepSpeed: the DeepSpeed file's optimizer
    /// decides betas, eps, weight decay and clipping (DeepSpeed's defaults
    /// where it is silent), configs.json's keys then have no effect and a
    /// differing one is named; without an optimizer block configs.json decides.
    #[test]
    fn the_deepspeed_optimizer_decides_as_in_the_original() {
        let ds = r#"{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.98]}}}"#;
        let args = r#"{"clip_grad": 1.0, "weight_decay": 0.1, "adam_eps": 1e-8, "adam_beta2": 0.999, "lr": 0.002}"#;
        let c = build(ds, args, &[]).unwrap();
        assert_eq!((c.clip, c.adam.weight_decay, c.adam.eps, c.adam.beta2, c.lr), (0.0, 0.0, 1e-8, 0.98, 0.001));
        let w = c.warnings.iter().find(|w| w.contains("configs.json's optimizer keys have no effect")).expect("named");
        for part in [
            "adam_beta2 = 0.999 (configs.json; optimizer.params.betas = 0.98 decides)",
            "weight_decay = 0.1 (configs.json; optimizer.params.weight_decay = 0 decides)",
            "clip_grad = 1 (configs.json; gradient_clipping = 0 decides)",
            "lr = 0.002 (configs.json; optimizer.params.lr = 0.001 decides here",
        ] {
            assert!(w.contains(part), "{part}: {w}");
        }
        assert!(!w.contains("adam_eps"), "equal to DeepSpeed's default: not named: {w}");
        let clip = c.report.iter().find(|e| e.key == "gradient_clipping").unwrap();
        assert_eq!((clip.value.as_str(), clip.source.as_str()), ("0", "DeepSpeed's default: ds.json has no gradient_clipping"));
        // a --set of such a key is named too, not applied
        let c = build(ds, args, &["weight_decay=0.3"]).unwrap();
        assert_eq!(c.adam.weight_decay, 0.0);
        assert!(c.warnings.iter().any(|w| w.contains("weight_decay = 0.3 (--set; optimizer.params.weight_decay = 0 decides)")), "{:?}", c.warnings);
        // no optimizer block: configs.json decides, as the original's plain path
        let c = build(r#"{"train_micro_batch_size_per_gpu": 2}"#, args, &[]).unwrap();
        assert_eq!((c.clip, c.adam.weight_decay, c.adam.beta2, c.lr), (1.0, 0.1, 0.999, 0.002));
        assert!(!c.warnings.iter().any(|w| w.contains("have no effect")), "{:?}", c.warnings);
        // the original's non-DeepSpeed switch and data-stream restart are refused
        for (set, key) in [("deepspeed=false", "deepspeed"), ("resume_dataloader=false", "resume_dataloader")] {
            let e = build(ds, "{}", &[set]).err().expect(set).to_string();
            assert!(e.contains(&format!("{key} = false (--set): not supported")), "{e}");
        }
    }

    /// Deliberate differences are announced once, each naming its key.
    #[test]
    fn differences_from_the_original_are_announced_with_their_keys() {
        let ds = r#"{"train_micro_batch_size_per_gpu": 2}"#;
        let c = build(ds, r#"{"experiment_name": "blocklm-blank"}"#, &[]).unwrap();
        assert!(c.notes.is_empty(), "no save, nothing saved elsewhere: {:?}", c.notes);
        let sets = [
            "save=/tmp/x", "no_save_optim=true", "no_load_rng=true", "shuffle=true", "make_vocab_size_divisible_by=100", "model_parallel_size=8",
            "num_attention_heads=16", "intermediate_size=100", "layernorm_epsilon=1e-6", "train_iters=2000", "lr_decay_iters=1000", "lr_decay_style=linear",
            "warmup=0", "summary_dir=",
        ];
        let c = build(ds, r#"{"experiment_name": "blocklm-blank"}"#, &sets).unwrap();
        for key in [
            "experiment_name \"blocklm-blank\"", "no_save_optim", "no_load_rng", "shuffle", "make_vocab_size_divisible_by = 100", "intermediate_size = 100",
            "layernorm_epsilon", "summary_dir \"\"",
        ] {
            assert_eq!(c.notes.iter().filter(|n| n.starts_with(key)).count(), 1, "{key}: {:?}", c.notes);
        }
        let w = c.warnings.iter().find(|w| w.starts_with("lr_decay_style linear")).expect("the linear floor is announced");
        assert!(w.contains("to -7.991e-5 at the last iteration"), "{w}");
    }

    /// Every key of the seed's configs.json, changed on its own from the
    /// runnable tiny configuration: it is refused naming the key, listed as
    /// having no effect (`--show-ignored`), or it shows in what the run
    /// prints at start — a line of the effective configuration that changes
    /// and names it or comes from the --set, a note or a warning naming it.
    /// None is read and silently unused.
    #[test]
    fn every_key_of_the_seed_configs_json_is_used_announced_or_refused() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let seed: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(repo.join("configs/seed/configs.json")).unwrap()).unwrap();
        let (ds, args) = (repo.join("configs/config_block_tiny.json"), repo.join("configs/configs_tiny.json"));
        let printed = |sets: &[String]| -> std::result::Result<(Vec<String>, Vec<String>), String> {
            let l = LoadedArgs::load(Some(&args), sets).map_err(|e| e.to_string())?;
            let ignored = l.ignored.clone();
            let c = RunConfig::build(DsConfig::load_with(&ds, &[]).unwrap(), l, 1).map_err(|e| e.to_string())?;
            let mut lines: Vec<String> = c.report.iter().map(|e| format!("{} = {}  ({})", e.key, e.value, e.source)).collect();
            lines.extend(c.notes.iter().map(|n| format!("note: {n}")));
            lines.extend(c.warnings.iter().map(|w| format!("warning: {w}")));
            Ok((lines, ignored))
        };
        let (base, _) = printed(&[]).unwrap();
        // a line's value without its source: a line that only changed its source proves nothing
        let value = |l: &str| l.rsplit_once("  (").map_or(l.to_string(), |(v, _)| v.to_string());
        let base_values: Vec<String> = base.iter().map(|l| value(l)).collect();
        // another value of the same kind (a table for keys whose seed value is null)
        let other = |k: &str, v: &serde_json::Value| -> String {
            use serde_json::Value::*;
            match (k, v) {
                ("intermediate_size" | "eval_batch_size" | "lr_decay_iters", _) => "96".into(),
                ("loss_scale", _) => "128".into(),
                ("load" | "valid_data" | "test_data" | "load_splits" | "save_splits" | "save_test_data" | "tokenizer_path", _) => "/nonexistent/x".into(),
                ("lr_decay_style", _) => "linear".into(),
                ("tokenizer_type", _) => "ChineseSPTokenizer".into(),
                ("split", _) => "0.9".into(),
                (_, Bool(b)) => (!b).to_string(),
                (_, Number(n)) if n.is_u64() => (n.as_u64().unwrap() + 2).to_string(),
                (_, Number(n)) => {
                    let f = n.as_f64().unwrap();
                    let o = f * 0.5 + 0.125;
                    (if o == f { f + 1.0 } else { o }).to_string()
                }
                (_, String(_)) => "other".into(),
                (_, Array(_)) => r#"["other.jsonl"]"#.into(),
                (_, Null) => "3".into(),
                (_, Object(_)) => "{}".into(),
            }
        };
        // the value is changed from the tiny configuration's (the run's) value
        let tiny: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&args).unwrap()).unwrap();
        let mut silent = Vec::new();
        for (k, v) in &seed {
            let v = tiny.get(k).unwrap_or(v);
            let set = format!("{k}={}", other(k, v));
            assert_ne!(other(k, v), v.to_string(), "{k}: the walk must change the value");
            match printed(std::slice::from_ref(&set)) {
                Err(e) => assert!(e.contains(k.as_str()), "--set {set}: an error that does not name the key: {e}"),
                Ok((_, ignored)) if ignored.contains(k) => {}
                Ok((lines, _)) => {
                    let changed: Vec<&String> = lines.iter().filter(|l| !base.contains(l)).chain(base.iter().filter(|l| !lines.contains(l))).collect();
                    let named = changed.iter().any(|l| l.contains(k.as_str()) || (l.ends_with("(--set)") && !base_values.contains(&value(l))));
                    if !named {
                        silent.push(format!("--set {set}: {changed:?}"));
                    }
                }
            }
        }
        assert!(silent.is_empty(), "read and silently unused:\n{}", silent.join("\n"));
    }
}
