//! The original's `configs.json` (model, data and training arguments), with
//! `--set key=value` overrides and the provenance of every value.
//!
//! Every key of the original's file is known here and falls in one class:
//! - used: read into [`Args`];
//! - unsupported: accepted only at its default, because ignoring another value
//!   would silently change the result (`transformer_xl`, `encoder_decoder`,
//!   `masked_lm`, `mem_length > 0`, ...); any other value is an error naming
//!   the key;
//! - irrelevant here (launcher, logging and DeepSpeed plumbing that this
//!   program handles elsewhere): listed once at start-up.
//!
//! A key the original does not have is an error with the closest known key.
//! This program's own keys (`overwrite`, `save_interval_minutes`,
//! `keep_last`) are read beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The arguments the trainer uses, with the original's defaults.
#[derive(Clone, Debug, Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Args {
    // model
    pub num_layers: usize,
    pub hidden_size: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: Option<usize>,
    pub max_position_embeddings: usize,
    pub make_vocab_size_divisible_by: usize,
    pub layernorm_epsilon: f64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub output_dropout: f64,
    pub attention_scale: f64,
    pub no_block_position: bool,
    pub model_parallel_size: usize,
    // precision: where the DeepSpeed config says nothing (see config::run)
    pub fp16: bool,
    pub loss_scale: Option<f64>,
    pub loss_scale_window: u64,
    pub hysteresis: u32,
    pub min_scale: f64,
    pub fp32_layernorm: bool,
    pub fp32_embedding: bool,
    // activation checkpointing
    pub checkpoint_activations: bool,
    pub checkpoint_num_layers: usize,
    // batch and optimisation
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub train_iters: u64,
    pub lr: f64,
    pub lr_decay_iters: Option<u64>,
    pub lr_decay_style: String,
    pub lr_decay_ratio: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub clip_grad: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
    pub optimizer: String,
    pub seed: u64,
    // logging, evaluation, checkpoints
    pub log_interval: u64,
    pub eval_interval: u64,
    pub eval_iters: u64,
    pub eval_batch_size: Option<usize>,
    pub experiment_name: String,
    /// TensorBoard events go to `<summary_dir>/runs/<experiment_name>` (the
    /// original's `get_log_dir`); "" writes none here.
    pub summary_dir: String,
    pub save: Option<PathBuf>,
    /// A fresh run (no `load`) may replace the run already saved in `save`
    /// (its checkpoints, metrics and curve); without it that is refused.
    pub overwrite: bool,
    /// Seconds a rank may wait inside one collective before it stops the
    /// job (this program's key; `--collective-timeout` wins over it).
    pub collective_timeout: f64,
    pub save_interval: u64,
    /// This program's: a checkpoint also when this many minutes (fractions
    /// allowed) have passed since the last one began, agreed by every rank;
    /// 0 = off.
    pub save_interval_minutes: f64,
    /// This program's: keep the newest N complete checkpoints in `save`,
    /// removing older ones once a newer one is installed (never the one
    /// `latest` names); 0 = keep every one.
    pub keep_last: usize,
    pub no_save_optim: bool,
    pub no_save_rng: bool,
    pub load: Option<PathBuf>,
    pub no_load_optim: bool,
    pub no_load_rng: bool,
    pub no_load_lr_scheduler: bool,
    /// Read to announce that it changes nothing here (checkpoints go to
    /// `save` itself).
    pub new_save_directory: bool,
    /// Read to announce that it changes nothing here (samples are random).
    pub shuffle: bool,
    // data
    pub train_data: Vec<String>,
    /// The original's valid_data: corpus files or folders whose documents
    /// validate (split's valid share becomes zero); null: the valid split.
    pub valid_data: Option<Vec<String>>,
    /// The original's test_data: corpus files or folders for `eval --split
    /// test` (split's test share becomes zero); null: the test split.
    pub test_data: Option<Vec<String>>,
    pub text_key: String,
    /// The text key of `valid_data` / `test_data` records; null: `text_key`
    /// (the original's evaluation sets read it so).
    pub eval_text_key: Option<String>,
    pub split: String,
    /// Read the split's index order from this `.npy` (the original's np.load).
    pub load_splits: Option<PathBuf>,
    /// Write the split's index order to this `.npy` (the original's np.save).
    pub save_splits: Option<PathBuf>,
    /// Write the test split's documents, decoded, one a line.
    pub save_test_data: Option<PathBuf>,
    pub seq_length: usize,
    pub tokenizer_path: Option<PathBuf>,
    pub tokenizer_type: String,
    /// WordPiece casing, as the original: a name with `-cased` keeps case,
    /// any other lower-cases (and strips accents).
    pub tokenizer_model_type: String,
    /// ChineseSPTokenizer: the original's corrected [sMASK]/[gMASK] ids.
    pub fix_command_token: bool,
    pub sample_one_document: bool,
    // blank infilling
    pub bert_prob: f64,
    pub gpt_infill_prob: f64,
    pub gpt_min_ratio: f64,
    pub gap_sentence_prob: f64,
    pub gap_sentence_ratio: f64,
    pub avg_block_length: f64,
    pub task_mask: bool,
    pub no_shuffle_block: bool,
    // generation
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: usize,
    pub out_seq_length: usize,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            num_layers: 24,
            hidden_size: 1024,
            num_attention_heads: 16,
            intermediate_size: None,
            max_position_embeddings: 512,
            make_vocab_size_divisible_by: 128,
            layernorm_epsilon: 1e-5,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
            output_dropout: 0.1,
            attention_scale: 1.0,
            no_block_position: false,
            model_parallel_size: 1,
            fp16: false,
            loss_scale: None,
            loss_scale_window: 1000,
            hysteresis: 2,
            min_scale: 1.0,
            fp32_layernorm: false,
            fp32_embedding: false,
            checkpoint_activations: false,
            checkpoint_num_layers: 1,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            train_iters: 1_000_000,
            lr: 1e-4,
            lr_decay_iters: None,
            lr_decay_style: "linear".into(),
            lr_decay_ratio: 0.1,
            warmup: 0.01,
            weight_decay: 0.01,
            clip_grad: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            optimizer: "adam".into(),
            seed: 1234,
            log_interval: 100,
            eval_interval: 1000,
            eval_iters: 100,
            eval_batch_size: None,
            experiment_name: "gpt-345M".into(),
            summary_dir: String::new(),
            save: None,
            overwrite: false,
            collective_timeout: crate::launch::DEFAULT_COLLECTIVE_TIMEOUT_S,
            save_interval: 5000,
            save_interval_minutes: 0.0,
            keep_last: 0,
            no_save_optim: false,
            no_save_rng: false,
            load: None,
            no_load_optim: false,
            no_load_rng: false,
            no_load_lr_scheduler: false,
            new_save_directory: false,
            shuffle: false,
            train_data: Vec::new(),
            valid_data: None,
            test_data: None,
            text_key: "sentence".into(),
            eval_text_key: None,
            split: "1000,1,1".into(),
            load_splits: None,
            save_splits: None,
            save_test_data: None,
            seq_length: 512,
            tokenizer_path: None,
            tokenizer_type: "BertWordPieceTokenizer".into(),
            tokenizer_model_type: "bert-base-uncased".into(),
            fix_command_token: false,
            sample_one_document: false,
            bert_prob: 0.5,
            gpt_infill_prob: 0.5,
            gpt_min_ratio: 0.5,
            gap_sentence_prob: 0.0,
            gap_sentence_ratio: 0.15,
            avg_block_length: 3.0,
            task_mask: false,
            no_shuffle_block: false,
            temperature: 1.0,
            top_p: 0.0,
            top_k: 0,
            out_seq_length: 256,
        }
    }
}

/// Keys whose non-default value this program cannot honour, with the only
/// accepted value.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("transformer_xl", "false"),
    ("encoder_decoder", "false"),
    ("masked_lm", "false"),
    ("mem_length", "0"),
    ("block_lm", "true"),
    ("pretrained_bert", "false"),
    ("sentinel_token", "false"),
    ("random_position", "false"),
    ("block_mask_prob", "0.0"),
    ("context_mask_ratio", "0.0"),
    ("short_seq_prob", "0.0"),
    ("single_span_prob", "0.0"),
    ("label_smoothing", "0.0"),
    ("reset_position_ids", "false"),
    ("reset_attention_mask", "false"),
    ("switch_linear", "false"),
    ("finetune", "false"),
    ("load_pretrained", "null"),
    ("multi_task_data", "null"),
    ("multi_task_ratio", "0.0"),
    ("task", "null"),
    ("continuous_prompt", "false"),
    ("freeze_transformer", "false"),
    ("prefix_prompt", "0"),
    ("num_prompt_tokens", "0"),
    ("loss_func", "\"cross_entropy\""),
    ("non_sentence_start", "0.0"),
    ("filter_english", "false"),
    ("deepscale", "false"),
    ("unidirectional", "false"),
    ("fast_decode", "false"),
    ("segment_length", "0"),
    ("block_lm_ratio", "0.0"),
    ("cpu_optimizer", "false"),
    ("cpu_torch_adam", "false"),
    // the original's plain (non-DeepSpeed) path: here the DeepSpeed file
    // (--config) always decides batch sizes, precision and the optimizer
    ("deepspeed", "true"),
    // a resume continues the data stream where it stopped (samples are a
    // function of the iteration); the original's false restarts it
    ("resume_dataloader", "true"),
    ("num_beams", "1"),
];

/// Keys of the original that do not matter to this program.
const IRRELEVANT: &[&str] = &[
    "vocab_size", "deep_init", "fp32_tokentypes", "fp32_allreduce", "deepspeed_activation_checkpointing", "epochs", "save_epoch", "no_deepspeed_load",
    "distributed_backend", "DDP_impl", "local_rank", "block_lm", "eval_epoch", "eval_seq_length", "eval_max_preds_per_seq", "overlapping_eval",
    "length_penalty", "no_repeat_ngram_size", "min_tgt_length", "select_topk", "blank_maskratio", "data_dir", "input_data_sizes_file", "delim",
    "no_lazy_loader", "half_lazy_loader", "loader_scatter", "loose_json", "presplit_sentences", "num_workers", "no_pre_tokenize", "cache_dir", "use_tfrecords",
    "max_preds_per_seq", "multi_seq_length", "multi_batch_size", "pool_token", "cloze_eval", "multi_token", "adapet", "pattern_id", "few_superglue",
    "eval_valid", "validation_metric", "src_seq_length", "tgt_seq_length", "wsc_negative", "no_validation", "prompt_func", "tune_prefix_layers", "prompt_init",
    "mask_pad_token", "deepspeed_config", "deepscale_config", "deepspeed_mpi", "cuda", "rank", "world_size", "dynamic_loss_scale", "master_ip", "master_port",
    "eod_token", "persist_state", "lazy", "transpose", "data_set_type", "samples_per_shard",
];

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Set,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "{}", p.file_name().unwrap_or_default().to_string_lossy()),
            Source::Set => write!(f, "--set"),
        }
    }
}

/// The parsed arguments plus what the user should be told about them.
#[derive(Debug)]
pub struct LoadedArgs {
    pub args: Args,
    /// key -> where its value came from (used keys only).
    pub sources: BTreeMap<String, Source>,
    /// Keys present in the file that this program ignores.
    pub ignored: Vec<String>,
}

fn used_keys() -> Vec<String> {
    match serde_json::to_value(Args::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => unreachable!("Args serialises to an object"),
    }
}

/// Whether `key` is a key of the original's configs.json (read, refused
/// unless at its one value, or listed as having no effect).
pub fn is_key(key: &str) -> bool {
    used_keys().iter().any(|u| u == key) || UNSUPPORTED.iter().any(|(u, _)| *u == key) || IRRELEVANT.contains(&key)
}

/// `" (did you mean \"key\"?)"` with the configs.json key (or one of
/// `more`) nearest to `key`, or nothing when none is near.
pub fn did_you_mean(key: &str, more: &[&str]) -> String {
    let used = used_keys();
    let all = used.iter().map(String::as_str).chain(UNSUPPORTED.iter().map(|(k, _)| *k)).chain(IRRELEVANT.iter().copied()).chain(more.iter().copied());
    closest(key, all).map(|c| format!(" (did you mean \"{c}\"?)")).unwrap_or_default()
}

/// Parses `value` of `--set key=value`: JSON when it parses (numbers, true,
/// null, lists), otherwise a plain string.
fn parse_set_value(v: &str) -> Value {
    serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()))
}

/// The candidate nearest to `key` (edit distance at most 3), for "did you mean".
pub(crate) fn closest<'a>(key: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    fn dist(a: &str, b: &str) -> usize {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for i in 1..=a.len() {
            let mut cur = vec![i; b.len() + 1];
            for j in 1..=b.len() {
                cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + usize::from(a[i - 1] != b[j - 1]));
            }
            prev = cur;
        }
        prev[b.len()]
    }
    candidates.map(|c| (dist(key, c), c)).filter(|(d, _)| *d <= 3).min().map(|(_, c)| c)
}

impl LoadedArgs {
    /// Reads `path` (when given) and applies `sets` ("key=value") on top.
    pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Self> {
        let used = used_keys();
        let known = is_key;
        let unknown = |k: &str| format!("unknown key \"{k}\"{}", did_you_mean(k, &[]));
        let mut map = Map::new();
        let mut sources = BTreeMap::new();
        if let Some(p) = path {
            let v: Value = crate::text::read_json(p, "malformed JSON")?;
            let Value::Object(m) = v else {
                return Err(Error::parse(p, 1, 1, "expected a JSON object of arguments"));
            };
            for (k, v) in m {
                if !known(&k) {
                    return Err(Error::invalid(p, unknown(&k)));
                }
                sources.insert(k.clone(), Source::File(p.to_path_buf()));
                map.insert(k, v);
            }
        }
        for s in sets {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::Config(format!("--set {s}: expected key=value")));
            };
            let k = k.trim();
            if !known(k) {
                return Err(Error::Config(format!("--set {s}: {}", unknown(k))));
            }
            map.insert(k.to_string(), parse_set_value(v));
            sources.insert(k.to_string(), Source::Set);
        }
        // unsupported keys must keep their one accepted value
        for (k, accepted) in UNSUPPORTED {
            if let Some(v) = map.get(*k) {
                let want: Value = serde_json::from_str(accepted).expect("table value is JSON");
                let same = match (v, &want) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    _ => v == &want,
                };
                if !same {
                    return Err(Error::Config(format!(
                        "{k} = {v} ({}): not supported by glm-pretrain-rs, which would silently train something else; use {accepted} (--set {k}={accepted})",
                        sources[*k]
                    )));
                }
            }
        }
        let mut ignored = Vec::new();
        let mut typed = Map::new();
        for (k, v) in map {
            if used.contains(&k) {
                typed.insert(k, v);
            } else {
                sources.remove(&k);
                if IRRELEVANT.contains(&k.as_str()) {
                    ignored.push(k);
                }
            }
        }
        // split is the original's string ("949,50,1"); one number (--set split=0.9) is one too
        if let Some(Value::Number(n)) = typed.get("split").cloned() {
            typed.insert("split".into(), Value::String(n.to_string()));
        }
        // the original writes the corpora as lists; accept a single string too
        for k in ["train_data", "valid_data", "test_data"] {
            if let Some(Value::String(s)) = typed.get(k).cloned() {
                typed.insert(k.into(), Value::Array(vec![Value::String(s)]));
            }
        }
        // a mixture's weights may be JSON numbers: [0.3, "wiki", 0.7, "news"]
        if let Some(Value::Array(items)) = typed.get("train_data").cloned() {
            let items = items.into_iter().map(|v| if let Value::Number(n) = v { Value::String(n.to_string()) } else { v }).collect();
            typed.insert("train_data".into(), Value::Array(items));
        }
        let args: Args = serde_json::from_value(Value::Object(typed.clone())).map_err(|e| {
            // serde names the type, not the key: find the key that fails alone
            let culprit = typed.iter().find(|(k, v)| {
                let one: Map<String, Value> = [((*k).clone(), (*v).clone())].into_iter().collect();
                serde_json::from_value::<Args>(Value::Object(one)).is_err()
            });
            Error::Config(match culprit {
                Some((k, v)) => format!("{k} = {v} ({}): {e}", sources.get(k).map(ToString::to_string).unwrap_or_default()),
                None => format!("arguments: {e}"),
            })
        })?;
        // a given corpus list must name a corpus (the original would build an empty dataset)
        for (k, v) in [("valid_data", &args.valid_data), ("test_data", &args.test_data)] {
            if v.as_ref().is_some_and(|v| v.is_empty() || v.iter().any(String::is_empty)) {
                return Err(Error::Config(format!(
                    "{k} = {} ({}): name corpus files or folders, or null for the {} split of train_data",
                    serde_json::to_string(v).unwrap_or_default(),
                    sources.get(k).map(ToString::to_string).unwrap_or_default(),
                    if k == "valid_data" { "valid" } else { "test" }
                )));
            }
        }
        for (k, p) in [("load_splits", &args.load_splits), ("save_splits", &args.save_splits), ("save_test_data", &args.save_test_data)] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(Error::Config(format!(
                    "{k} = \"\" ({}): an empty path; name a file, or null",
                    sources.get(k).map(ToString::to_string).unwrap_or_default()
                )));
            }
        }
        // an empty path would mean the working directory: only null disables
        for (k, p) in [("save", &args.save), ("load", &args.load)] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(Error::Config(format!(
                    "{k} = \"\" ({}): an empty path; name a directory, or null for {}",
                    sources.get(k).map(ToString::to_string).unwrap_or_default(),
                    if k == "save" { "no checkpoints" } else { "a fresh run" }
                )));
            }
        }
        if !(args.collective_timeout.is_finite() && args.collective_timeout > 0.0) {
            return Err(Error::Config(format!(
                "collective_timeout = {} ({}): seconds a collective may wait, a positive number",
                args.collective_timeout,
                sources.get("collective_timeout").map(ToString::to_string).unwrap_or_default()
            )));
        }
        Ok(LoadedArgs { args, sources, ignored })
    }

    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key).cloned().unwrap_or(Source::Default)
    }

    /// Where a setting made of several `keys` came from: a `--set` of any
    /// of them, else a file that gives one, else the default.
    pub fn source_of(&self, keys: &[&str]) -> Source {
        let all: Vec<Source> = keys.iter().map(|k| self.source(k)).collect();
        all.iter().find(|s| **s == Source::Set).or_else(|| all.iter().find(|s| **s != Source::Default)).cloned().unwrap_or(Source::Default)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_the_original_is_known() {
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seed/configs.json");
        let l = LoadedArgs::load(Some(&seed), &[]).unwrap();
        assert_eq!(l.args.hidden_size, 768);
        assert_eq!(l.args.train_data, vec!["wudao".to_string()]);
        assert!(l.ignored.contains(&"deepspeed_config".to_string()));
        assert_eq!(l.source("hidden_size"), Source::File(seed.clone()));
        let l = LoadedArgs::load(Some(&seed), &["train_iters=0".into(), "save=/tmp/run".into()]).unwrap();
        assert_eq!(l.args.train_iters, 0);
        assert_eq!(l.args.save, Some(PathBuf::from("/tmp/run")));
        assert_eq!(l.source("train_iters"), Source::Set);
    }

    #[test]
    fn corpora_and_split_files_are_read() {
        let l = LoadedArgs::load(None, &["valid_data=v.json".into(), "test_data=[\"a\", \"b\"]".into(), "split=0.9".into(), "save_splits=s".into()]).unwrap();
        assert_eq!(l.args.valid_data, Some(vec!["v.json".to_string()]));
        assert_eq!(l.args.test_data, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(l.args.split, "0.9");
        assert_eq!(l.args.save_splits, Some(PathBuf::from("s")));
        assert!(!l.ignored.iter().any(|k| ["valid_data", "test_data", "load_splits", "save_splits", "save_test_data"].contains(&k.as_str())));
        let e = LoadedArgs::load(None, &["test_data=[]".into()]).unwrap_err().to_string();
        assert!(e.contains("test_data = [] (--set): name corpus files or folders"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = LoadedArgs::load(None, &["hiden_size=3".into()]).unwrap_err().to_string();
        assert!(e.contains("\"hiden_size\"") && e.contains("did you mean \"hidden_size\""), "{e}");
        let e = LoadedArgs::load(None, &["transformer_xl=true".into()]).unwrap_err().to_string();
        assert!(e.contains("transformer_xl = true (--set): not supported"), "{e}");
        let e = LoadedArgs::load(None, &["mem_length=16".into()]).unwrap_err().to_string();
        assert!(e.contains("mem_length"), "{e}");
        assert!(LoadedArgs::load(None, &["mem_length=0".into()]).is_ok());
        let e = LoadedArgs::load(None, &["hidden_size=big".into()]).unwrap_err().to_string();
        assert!(e.contains("hidden_size = \"big\" (--set)"), "{e}");
        let e = LoadedArgs::load(None, &["lr".into()]).unwrap_err().to_string();
        assert!(e.contains("expected key=value"), "{e}");
    }
}
