//! The original's checkpoints (THUDM's GLM under DeepSpeed), in and out:
//! `checkpoint import` and `checkpoint export --format deepspeed`.
//!
//! The layout: `<save>/<tag>/mp_rank_XX_model_states.pt`, one file per
//! tensor-parallel rank in PyTorch's format (`torchfile`), and
//! `<save>/latest_checkpointed_iteration.txt` naming the tag (an iteration,
//! or `release`). Each file is a dict with that rank's slice of the model's
//! state dict under `module` (the original's names, which are this
//! program's), and DeepSpeed's and GLM's bookkeeping beside it:
//! `iteration`, `mp_world_size`, optimizer, scheduler and random states,
//! and in some files the run's arguments (an argparse `Namespace` under
//! `args`).
//!
//! Import reads `module` of every part without executing anything, merges
//! the parts as the original's `change_mp.py` does (`change_mp_partition`:
//! the fused query/key/value rows each part holds a third of per block,
//! column-parallel weights and biases and the vocabulary by rows,
//! row-parallel weights by columns, the rest whole from part 0), widens
//! fp16/bf16 weights to fp32 (the masters a run trains), and writes this
//! program's checkpoint (no optimizer state). The model's shape comes from
//! the weights; its attention heads, tokenizer settings and the rest of
//! the configuration from the file's `args` where the user's configs.json /
//! `--set` give none; a value the user gives for a model key must agree
//! with the checkpoint's. The tokenizer is the user's (`--tokenizer`),
//! checked against the embedding's rows the way the original padded them.
//!
//! Export writes the reverse: fp32 weights under `module` (optionally split
//! over N tensor-parallel files as `change_mp.py` splits), the iteration
//! and DeepSpeed's counters, the configuration as a plain dict under
//! `args`, and this program's `state.json` under `glm_pretrain_rs`, so an
//! import of an export gives back the same checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use tch::{Kind, Tensor};

use super::merge::{merge_pieces, read_whole, splittable};
use super::save::{write_dir, write_latest};
use super::torchfile::{self, TensorRef, TorchFile};
use super::write::sync_dir;
use super::{resolve, State, FORMAT_VERSION};
use crate::config::args::{Args, LoadedArgs, Source};
use crate::data::tokenizer::{divisible_by_for, GlmTokenizer, TokenizerSpec};
use crate::error::{Error, IoContext, Result};
use crate::model::glm::{param_layout, partitions};
use crate::model::params::Partition;
use crate::optim::optimizer::Precision;

/// The file of tensor-parallel rank `r` in a DeepSpeed checkpoint.
pub fn part_file(r: usize) -> String {
    format!("mp_rank_{r:02}_model_states.pt")
}

/// The original's tracker file: the tag of the newest checkpoint.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";

/// The key under which an export keeps this program's `state.json`.
const OURS: &str = "glm_pretrain_rs";

/// Keys of the model's shape and of what token ids mean: a value the user
/// gives must agree with the checkpoint's (`tokenizer_model_type` and
/// `fix_command_token` in what they change: casing and command ids).
const MODEL_KEYS: &[&str] = &[
    "num_layers", "hidden_size", "num_attention_heads", "intermediate_size", "max_position_embeddings", "layernorm_epsilon", "no_block_position",
    "tokenizer_type",
];

/// Keys of the original's arguments that are not taken: paths on the
/// machine that trained it, and its tensor-parallel layout (an import is
/// one whole model).
const NOT_TAKEN: &[&str] =
    &["train_data", "valid_data", "test_data", "load_splits", "save_splits", "save_test_data", "save", "load", "tokenizer_path", "model_parallel_size"];

/// How `change_mp.py` splits and merges the tensor `name` of `ndim`
/// dimensions over tensor-parallel ranks (by name, as it does).
pub fn change_mp_partition(name: &str, ndim: usize) -> Partition {
    let has = |s: &str| name.contains(s);
    match ndim {
        2 if !has("position") => {
            if has("query") {
                Partition::QkvRows
            } else if has("word") || has("h_to_4h") || has("relative") || has("r_w_bias") || has("r_r_bias") {
                Partition::Rows
            } else {
                Partition::Cols
            }
        }
        1 if has("query_key_value") => Partition::QkvRows,
        1 if has("dense_h_to_4h") || has("attention.relative") => Partition::Rows,
        _ => Partition::Whole,
    }
}

/// What `checkpoint import` reads and writes.
pub struct ImportOptions {
    /// A DeepSpeed save directory (its tracker names the tag), a tag's
    /// directory, or one `mp_rank_XX_model_states.pt`.
    pub from: PathBuf,
    /// The save directory written: `<out>/<iteration>/` and `<out>/latest`.
    pub out: PathBuf,
    pub tokenizer: Option<PathBuf>,
    /// configs.json and `--set`s, as training takes them.
    pub args_file: Option<PathBuf>,
    pub sets: Vec<String>,
    /// A DeepSpeed JSON recorded as the checkpoint's (eval's batch size).
    pub ds_config: Option<PathBuf>,
    /// The iteration the checkpoint gets (default: the file's).
    pub iteration: Option<u64>,
}

/// What an import wrote.
pub struct Imported {
    /// The checkpoint directory, `<out>/<iteration>`.
    pub dir: PathBuf,
    pub state: State,
    /// Lines for the log: what was read, converted, taken from where.
    pub notes: Vec<String>,
    /// The `make_vocab_size_divisible_by` a run on one tensor-parallel rank
    /// needs to pad the tokenizer to the checkpoint's rows, when its own
    /// does not.
    pub divisible_by: Option<usize>,
}

/// The files of a DeepSpeed checkpoint.
struct Located {
    /// The tag's directory.
    dir: PathBuf,
    tag: String,
    /// `mp_rank_XX_model_states.pt` in rank order.
    files: Vec<PathBuf>,
}

/// The checkpoint `from` designates (see `ImportOptions::from`).
fn locate(from: &Path) -> Result<Located> {
    if from.is_file() {
        let dir = from.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let tag = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
        return Ok(Located { dir, tag, files: vec![from.to_path_buf()] });
    }
    if !from.is_dir() {
        return Err(Error::invalid(from, "no such file or directory (a DeepSpeed checkpoint: <save>/<iteration>/mp_rank_00_model_states.pt)"));
    }
    let mut dir = from.to_path_buf();
    for tracker in [TRACKER, "latest"] {
        let t = from.join(tracker);
        let Ok(text) = std::fs::read_to_string(&t) else { continue };
        let tag = text.trim();
        if tag.is_empty() || tag.contains('/') || !from.join(tag).is_dir() {
            return Err(Error::invalid(&t, format!("names {tag:?}, which is not a directory beside it")));
        }
        dir = from.join(tag);
        break;
    }
    if dir.join("state.json").is_file() || dir.join("mp_rank_00").join("state.json").is_file() {
        return Err(Error::invalid(&dir, "a checkpoint of this program (state.json), not a DeepSpeed one: train, evaluate or export it as it is"));
    }
    let mut found: BTreeMap<usize, PathBuf> = BTreeMap::new();
    for e in std::fs::read_dir(&dir).at(&dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rank =
            name.strip_prefix("mp_rank_").and_then(|r| r.strip_suffix("_model_states.pt")).filter(|r| r.len() >= 2 && r.bytes().all(|b| b.is_ascii_digit()));
        if let Some(r) = rank.and_then(|r| r.parse::<usize>().ok()) {
            found.insert(r, e.path());
        }
    }
    if found.is_empty() {
        return Err(Error::invalid(
            &dir,
            format!("no {} here: a DeepSpeed GLM checkpoint is <save>/<iteration>/{} with {TRACKER} beside the iteration", part_file(0), part_file(0)),
        ));
    }
    let n = found.keys().max().expect("non-empty") + 1;
    if let Some(missing) = (0..n).find(|r| !found.contains_key(r)) {
        return Err(Error::invalid(dir.join(part_file(missing)), format!("is missing: tensor-parallel parts up to {} are here", part_file(n - 1))));
    }
    let tag = dir.canonicalize().ok().and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned())).unwrap_or_default();
    Ok(Located { dir, tag, files: found.into_values().collect() })
}

/// One `mp_rank_XX_model_states.pt`: its weights' references and the
/// bookkeeping import uses.
struct Part {
    file: TorchFile,
    module: Vec<(String, TensorRef)>,
    iteration: Option<u64>,
    mp_world_size: Option<i64>,
    global_samples: Option<u64>,
    /// The run's arguments and whether they were the original's
    /// `Namespace` (else a plain dict, as exports write).
    args: Option<(Map<String, Value>, bool)>,
    /// This program's `state.json`, in a file it exported.
    ours: Option<Value>,
    /// Whether the names carried a `module.` prefix (dropped).
    prefixed: bool,
}

fn open_part(path: &Path) -> Result<Part> {
    let file = TorchFile::open(path)?;
    let p = &file.pickle;
    let root = p.root;
    let Some(items) = p.dict(root) else {
        return Err(Error::invalid(path, format!("holds {}, not a dict (a DeepSpeed checkpoint is a dict with the weights under 'module')", p.describe(root))));
    };
    let keys: Vec<&str> = items.iter().filter_map(|(k, _)| p.str(*k)).collect();
    let Some(module) = p.get(root, "module") else {
        return Err(Error::invalid(path, format!("no key 'module' (the weights, in DeepSpeed's layout); the file's keys: {}", keys.join(", "))));
    };
    let Some(entries) = p.dict(module) else {
        return Err(Error::invalid(path, format!("'module' is {}, not a dict of tensors", p.describe(module))));
    };
    let mut names = Vec::new();
    for (k, v) in entries {
        let name = p.str(*k).ok_or_else(|| Error::invalid(path, format!("'module' has a key that is {}, not a name", p.describe(*k))))?;
        names.push((name.to_string(), *v));
    }
    // a model saved inside a wrapper (FP16_Module, DDP): names under module.
    let prefixed = !names.is_empty() && names.iter().all(|(n, _)| n.starts_with("module."));
    let mut refs = Vec::new();
    for (name, v) in names {
        let name = if prefixed { name["module.".len()..].to_string() } else { name };
        let r = file.tensor_ref(v, &format!("module[{name:?}]"))?;
        refs.push((name, r));
    }
    let uint = |k: &str| p.get(root, k).and_then(|v| p.int(v)).and_then(|v| u64::try_from(v).ok());
    let iteration = uint("iteration").or_else(|| uint("global_steps"));
    let mp_world_size = p.get(root, "mp_world_size").and_then(|v| p.int(v));
    let global_samples = uint("global_samples");
    let attrs = |d: &[(usize, usize)]| -> Map<String, Value> { d.iter().filter_map(|(k, v)| Some((p.str(*k)?.to_string(), p.to_json(*v)?))).collect() };
    let args = p.get(root, "args").and_then(|a| match p.call(a) {
        Some((("argparse", "Namespace"), _)) => p.state(a).and_then(|s| p.dict(s)).map(|d| (attrs(d), true)),
        _ => p.dict(a).map(|d| (attrs(d), false)),
    });
    let ours = p.get(root, OURS).and_then(|v| p.to_json(v));
    Ok(Part { module: refs, iteration, mp_world_size, global_samples, args, ours, prefixed, file })
}

/// The whole model's shape of each tensor from the parts' shapes, as
/// `change_mp.py` joins them, with the partition.
fn merged_shapes(parts: &[Part]) -> Result<Vec<(String, Partition, Vec<i64>)>> {
    let first = &parts[0];
    for part in &parts[1..] {
        if let Some((extra, _)) = part.module.iter().find(|(n, _)| !first.module.iter().any(|(m, _)| m == n)) {
            return Err(Error::invalid(&part.file.path, format!("unexpected key {extra}: {} has no such tensor", first.file.path.display())));
        }
    }
    let mut out = Vec::new();
    for (name, r) in &first.module {
        if r.size.len() >= 3 {
            return Err(Error::invalid(&first.file.path, format!("module[{name:?}] has {} dimensions: not a GLM weight", r.size.len())));
        }
        let partition = change_mp_partition(name, r.size.len());
        let mut shape = r.size.clone();
        for part in &parts[1..] {
            let Some((_, q)) = part.module.iter().find(|(n, _)| n == name) else {
                return Err(Error::invalid(&part.file.path, format!("missing key {name} (which {} has)", first.file.path.display())));
            };
            let axis = match partition {
                Partition::Whole => None,
                Partition::Rows | Partition::QkvRows => Some(0),
                Partition::Cols => Some(1),
            };
            let agree = q.size.len() == r.size.len() && (0..r.size.len()).all(|d| Some(d) == axis || q.size[d] == r.size[d]);
            if !agree || (partition == Partition::QkvRows && q.size[0] % 3 != 0) {
                return Err(Error::invalid(
                    &part.file.path,
                    format!(
                        "{name}: shape {:?}, and {:?} in {}: not parts of one tensor split as change_mp.py splits",
                        q.size,
                        r.size,
                        first.file.path.display()
                    ),
                ));
            }
            if let Some(a) = axis {
                shape[a] += q.size[a];
            }
        }
        out.push((name.clone(), partition, shape));
    }
    Ok(out)
}

/// The model's shape as the weights give it: (key, value, evidence).
struct Facts {
    vocab: usize,
    values: Vec<(&'static str, Value, String)>,
}

fn facts(shapes: &BTreeMap<&str, &Vec<i64>>, file: &Path) -> Result<Facts> {
    let get = |name: &str, ndim: usize| -> Result<&Vec<i64>> {
        let s = shapes.get(name).ok_or_else(|| Error::invalid(file, format!("missing key {name} (not a GLM checkpoint, or another model's)")))?;
        if s.len() != ndim {
            return Err(Error::invalid(file, format!("{name} has shape {s:?}, not {ndim} dimensions")));
        }
        Ok(s)
    };
    let word = get("word_embeddings.weight", 2)?;
    let pos = get("transformer.position_embeddings.weight", 2)?;
    let ffn = get("transformer.layers.0.mlp.dense_h_to_4h.weight", 2)?;
    let layers = shapes
        .keys()
        .filter_map(|k| k.strip_prefix("transformer.layers.").and_then(|r| r.split('.').next()).and_then(|i| i.parse::<usize>().ok()))
        .max()
        .map_or(0, |m| m + 1);
    let block = shapes.contains_key("transformer.block_position_embeddings.weight");
    let values = vec![
        ("hidden_size", Value::from(word[1]), format!("word_embeddings.weight is {word:?}")),
        ("num_layers", Value::from(layers), format!("transformer.layers.0 .. {}", layers.saturating_sub(1))),
        ("max_position_embeddings", Value::from(pos[0] - 1), format!("transformer.position_embeddings.weight is {pos:?}")),
        ("intermediate_size", Value::from(ffn[0]), format!("transformer.layers.0.mlp.dense_h_to_4h.weight is {ffn:?}")),
        ("no_block_position", Value::Bool(!block), format!("transformer.block_position_embeddings.weight is {}", if block { "there" } else { "absent" })),
    ];
    Ok(Facts { vocab: word[0] as usize, values })
}

/// The value of `key` in `a` as JSON.
fn field(a: &Args, key: &str) -> Value {
    serde_json::to_value(a).expect("args serialise").get(key).cloned().unwrap_or(Value::Null)
}

/// The configuration of the imported checkpoint: the user's configs.json
/// and `--set`s over the checkpoint's own arguments over the defaults,
/// with the model's shape from its weights. A model key the user gives
/// that the checkpoint contradicts is an error naming both.
fn configure(o: &ImportOptions, ckpt: Option<&(Map<String, Value>, bool)>, facts: &Facts, file: &Path, notes: &mut Vec<String>) -> Result<Args> {
    let user = LoadedArgs::load(o.args_file.as_deref(), &o.sets)?;
    let used = match serde_json::to_value(Args::default()) {
        Ok(Value::Object(m)) => m,
        _ => unreachable!("args serialise to an object"),
    };
    let mut sets: Vec<String> = Vec::new();
    let mut taken: Vec<String> = Vec::new();
    let mut unusable: Vec<String> = Vec::new();
    if let Some((attrs, namespace)) = ckpt {
        for (k, v) in attrs {
            if !used.contains_key(k) || (*namespace && NOT_TAKEN.contains(&k.as_str())) {
                continue;
            }
            let set = format!("{k}={}", serde_json::to_string(v).expect("JSON serialises"));
            // the checkpoint's value as this program reads it
            let theirs = match LoadedArgs::load(None, std::slice::from_ref(&set)) {
                Ok(l) => field(&l.args, k),
                Err(_) => {
                    unusable.push(format!("{k} = {v}"));
                    continue;
                }
            };
            let source = user.source(k);
            if source == Source::Default {
                sets.push(set);
                taken.push(k.clone());
            } else if MODEL_KEYS.contains(&k.as_str()) && field(&user.args, k) != theirs {
                return Err(Error::invalid(
                    file,
                    format!(
                        "{k} = {} ({source}), but the checkpoint's args have {k} = {theirs}: the configuration describes another model; drop {k} from it or give the checkpoint's value",
                        field(&user.args, k)
                    ),
                ));
            }
        }
    }
    let layered = |extra: &[String]| -> Result<LoadedArgs> {
        let all: Vec<String> = sets.iter().chain(extra).chain(&o.sets).cloned().collect();
        LoadedArgs::load(o.args_file.as_deref(), &all)
    };
    let mid = layered(&[])?;
    let who = |k: &str| match user.source(k) {
        Source::Default if taken.iter().any(|t| t == k) => Some("the checkpoint's args".to_string()),
        Source::Default => None,
        s => Some(s.to_string()),
    };
    let mut derived = Vec::new();
    let hidden = facts.values.iter().find(|(k, ..)| *k == "hidden_size").and_then(|(_, v, _)| v.as_u64()).unwrap_or(0) as usize;
    for (k, v, evidence) in &facts.values {
        let have = field(&mid.args, k);
        let agrees = match *k {
            // null: 4 × hidden_size
            "intermediate_size" => mid.args.intermediate_size.unwrap_or(4 * hidden) as u64 == v.as_u64().unwrap_or(0),
            _ => have == *v,
        };
        if agrees {
            continue;
        }
        match who(k) {
            Some(from) => {
                return Err(Error::invalid(
                    file,
                    format!("{k} = {have} ({from}), but the checkpoint's weights have {k} = {v} ({evidence}): not the model this configuration describes"),
                ))
            }
            None => derived.push(format!("{k}={v}")),
        }
    }
    if who("num_attention_heads").is_none() {
        return Err(Error::invalid(
            file,
            format!(
                "the number of attention heads is neither in the checkpoint's args nor in the configuration, and the weights do not tell (hidden_size {hidden}): give it (--set num_attention_heads=N, or --args with the model's configs.json)"
            ),
        ));
    }
    let fin = layered(&derived)?;
    let a = fin.args;
    // the user's tokenizer_model_type / fix_command_token read text as the checkpoint's do
    if let Some((attrs, _)) = ckpt {
        let spec = TokenizerSpec::from_args(&a)?;
        let model_type = attrs.get("tokenizer_model_type").and_then(Value::as_str).unwrap_or(&a.tokenizer_model_type);
        let fix = attrs.get("fix_command_token").and_then(Value::as_bool).unwrap_or(a.fix_command_token);
        let theirs = TokenizerSpec::new(spec.kind, model_type, fix);
        if (theirs.layout(), theirs.lowercase) != (spec.layout(), spec.lowercase) {
            return Err(Error::invalid(
                file,
                format!(
                    "the configuration's tokenizer ({}) is not the checkpoint's ({}): tokenizer_model_type / fix_command_token differ where it matters",
                    spec.describe(&a.tokenizer_model_type),
                    theirs.describe(model_type)
                ),
            ));
        }
    }
    let m = crate::config::run::model_of(&a, facts.vocab);
    m.validate()?;
    notes.push(format!(
        "model: {} layers, hidden {}, {} heads, ffn {}, {} positions{}, vocabulary {} rows (shape from the weights; heads from {})",
        m.num_layers,
        m.hidden_size,
        m.num_attention_heads,
        m.intermediate_size,
        m.max_position_embeddings,
        if m.block_position_encoding { " and block positions" } else { "" },
        m.vocab_size,
        who("num_attention_heads").unwrap_or_default()
    ));
    let others: Vec<&str> = taken.iter().map(String::as_str).filter(|k| !["num_layers", "hidden_size", "num_attention_heads"].contains(k)).collect();
    if ckpt.is_some_and(|(_, namespace)| !namespace) {
        notes.push(format!(
            "configuration: the checkpoint's own (configs.json as recorded with it), {} key(s) of it where the configuration gives none",
            taken.len()
        ));
    } else if !others.is_empty() {
        let shown: Vec<&str> = others.iter().take(12).copied().collect();
        notes.push(format!(
            "configuration: {} key(s) from the checkpoint's args where the configuration gives none ({}{})",
            others.len(),
            shown.join(", "),
            if others.len() > shown.len() { ", ..." } else { "" }
        ));
    }
    if who("layernorm_epsilon").is_none() {
        notes.push(format!(
            "configuration: layernorm_epsilon {} (the original's default; neither the checkpoint nor the configuration gives it)",
            a.layernorm_epsilon
        ));
    }
    if !unusable.is_empty() {
        notes.push(format!("configuration: left at this program's defaults, the checkpoint's {}", unusable.join(", ")));
    }
    Ok(a)
}

/// Reads a DeepSpeed GLM checkpoint and writes it as this program's (see
/// the module's documentation). Nothing is left at `out` on error.
pub fn import(o: &ImportOptions) -> Result<Imported> {
    refuse_used(&o.out)?;
    let loc = locate(&o.from)?;
    let mut parts: Vec<Part> = loc.files.iter().map(|f| open_part(f)).collect::<Result<_>>()?;
    let n = parts.len();
    let file0 = parts[0].file.path.clone();
    let mut notes = Vec::new();
    for part in &parts {
        if let Some(w) = part.mp_world_size.filter(|&w| w != n as i64) {
            return Err(Error::invalid(
                &part.file.path,
                format!("says mp_world_size {w}, but {n} part(s) are in {}: the checkpoint is incomplete", loc.dir.display()),
            ));
        }
        if part.iteration != parts[0].iteration {
            return Err(Error::invalid(&part.file.path, format!("iteration {:?}, and {:?} in {}", part.iteration, parts[0].iteration, file0.display())));
        }
    }
    let merged = merged_shapes(&parts)?;
    let shapes: BTreeMap<&str, &Vec<i64>> = merged.iter().map(|(n, _, s)| (n.as_str(), s)).collect();
    let facts = facts(&shapes, &file0)?;
    let ours: Option<State> = match parts[0].ours.clone() {
        Some(v) => Some(serde_json::from_value(v).map_err(|e| Error::invalid(&file0, format!("{OURS}: not a state.json this build reads: {e}")))?),
        None => None,
    };
    let args = configure(o, parts[0].args.as_ref(), &facts, &file0, &mut notes)?;
    let cfg = crate::config::run::model_of(&args, facts.vocab);
    // every parameter of that model, of its shape, and nothing else
    let layout = param_layout(&cfg, None);
    let missing: Vec<&str> = layout.iter().map(|i| i.name.as_str()).filter(|k| !shapes.contains_key(k)).collect();
    let unexpected: Vec<&str> = shapes.keys().copied().filter(|k| !layout.iter().any(|i| i.name == *k)).collect();
    let list = |v: &[&str]| {
        format!(
            "{}{}",
            v.iter().take(6).copied().collect::<Vec<_>>().join(", "),
            if v.len() > 6 { format!(", ... ({} in all)", v.len()) } else { String::new() }
        )
    };
    if !missing.is_empty() {
        return Err(Error::invalid(&file0, format!("missing key(s) {} (the model of this configuration has them)", list(&missing))));
    }
    if !unexpected.is_empty() {
        return Err(Error::invalid(&file0, format!("unexpected key(s) {} (not parameters of a GLM this program trains)", list(&unexpected))));
    }
    for info in &layout {
        let have = shapes[info.name.as_str()];
        if *have != info.shape {
            return Err(Error::invalid(
                &file0,
                format!("{}: shape {have:?} (merged over {n} part(s)), the model of this configuration has {:?}", info.name, info.shape),
            ));
        }
    }
    for part in &parts {
        if let Some((name, r)) = part.module.iter().find(|(_, r)| !matches!(r.kind, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double)) {
            return Err(Error::invalid(&part.file.path, format!("{name}: a {} tensor, not floating-point weights", r.storage_type)));
        }
    }
    // the tokenizer, against the embedding's rows
    let tok_path = o
        .tokenizer
        .clone()
        .or_else(|| args.tokenizer_path.clone())
        .or_else(|| [loc.dir.join("tokenizer.json"), o.from.join("tokenizer.json")].into_iter().find(|p| p.is_file()))
        .ok_or_else(|| {
            Error::Config(format!(
                "checkpoint import needs the tokenizer the checkpoint was trained with: --tokenizer <file> ({} for tokenizer_type {}); its embedding has {} rows",
                crate::data::tokenizer::TokenizerType::parse(&args.tokenizer_type).map_or("vocab.txt, .model or vocab.json", |t| t.files()),
                args.tokenizer_type,
                facts.vocab
            ))
        })?;
    let tok = GlmTokenizer::load(&tok_path, &TokenizerSpec::from_args(&args)?)?;
    let (v, rows) = (tok.vocab_size(), facts.vocab);
    let theirs_divisible = parts[0].args.as_ref().and_then(|(a, _)| a.get("make_vocab_size_divisible_by")).and_then(Value::as_u64).map(|d| d as usize);
    let multiple = theirs_divisible.unwrap_or(args.make_vocab_size_divisible_by).max(1) * n;
    if v > rows {
        return Err(Error::invalid(
            &tok_path,
            format!(
                "{v} token ids, but the checkpoint's embedding has {rows} rows: not the tokenizer it was trained with (tokenizer_type {})",
                args.tokenizer_type
            ),
        ));
    }
    if rows - v >= multiple {
        return Err(Error::invalid(
            &tok_path,
            format!(
                "{v} token ids, but the checkpoint's embedding has {rows} rows, more than padding to a multiple of {multiple} adds (make_vocab_size_divisible_by × {n} tensor-parallel part(s)): not the tokenizer it was trained with (tokenizer_type {})",
                args.tokenizer_type
            ),
        ));
    }
    if let Some(s) = ours.as_ref().filter(|s| !tok.answers_to(&s.tokenizer_sha256)) {
        return Err(Error::invalid(
            &tok_path,
            format!("not the tokenizer the checkpoint was trained with (its hash differs from the one it records, {})", s.tokenizer_sha256),
        ));
    }
    let divisible_by = divisible_by_for(v, rows, args.make_vocab_size_divisible_by, 1);
    let mut args = args;
    if let Some(d) = divisible_by {
        args.make_vocab_size_divisible_by = d;
    }
    let ds_raw = match (&o.ds_config, &ours) {
        (Some(p), _) => glm_common::ds::DsConfig::load_with(p, &[])?.raw,
        (None, Some(s)) => s.deepspeed_config.clone(),
        (None, None) => Value::Object(Map::new()),
    };
    let iteration = match (o.iteration, parts[0].iteration) {
        (Some(i), _) => i,
        // the original starts a release checkpoint at 0
        _ if loc.tag == "release" => 0,
        (None, Some(i)) => i,
        (None, None) => loc.tag.parse().unwrap_or(0),
    };
    // the weights: read, merged, in fp32
    let mut kinds: Vec<&'static str> = Vec::new();
    let mut pieces: Vec<BTreeMap<String, Tensor>> = Vec::new();
    for part in &mut parts {
        let refs = std::mem::take(&mut part.module);
        for (_, r) in &refs {
            let k = match r.kind {
                Kind::Half => "fp16",
                Kind::BFloat16 => "bf16",
                Kind::Double => "fp64",
                _ => "fp32",
            };
            if !kinds.contains(&k) {
                kinds.push(k);
            }
        }
        pieces.push(part.file.read_tensors(&refs, Some(Kind::Float))?.into_iter().collect());
    }
    // each tensor's pieces go as it is merged (a model is held once, and one tensor twice)
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, partition, _) in &merged {
        let ps: Vec<Tensor> = pieces.iter_mut().map(|m| m.remove(name).expect("every part has every name (merged_shapes)")).collect();
        let whole = if ps.len() == 1 { ps.into_iter().next().expect("one") } else { merge_pieces(*partition, &ps.iter().collect::<Vec<_>>()) };
        named.push((name.clone(), whole.contiguous()));
    }
    drop(pieces);
    let widened = kinds.iter().any(|k| *k != "fp32");
    let source = format!(
        "{} (DeepSpeed, tag {}{}, {})",
        loc.dir.display(),
        if loc.tag.is_empty() { "?" } else { &loc.tag },
        if n > 1 { format!(", {n} tensor-parallel parts merged as change_mp.py merges them") } else { String::new() },
        if widened { format!("{} weights widened to fp32", kinds.join("+")) } else { "fp32 weights".into() }
    );
    notes.insert(0, format!("read {source}"));
    if parts[0].prefixed {
        notes.push("weights: the names' module. prefix (a wrapper's) dropped".into());
    }
    if widened {
        notes.push(format!(
            "weights: the file holds {} weights; they become the fp32 master weights (the fp32 masters of the original's optimizer state are not read)",
            kinds.join("+")
        ));
    }
    let precision = match &ours {
        Some(s) => s.precision,
        None if kinds.contains(&"fp16") => Precision::Fp16,
        None if kinds.contains(&"bf16") => Precision::Bf16,
        None => Precision::Fp32,
    };
    let state = State {
        format_version: FORMAT_VERSION,
        iteration,
        consumed_samples: ours.as_ref().map_or(parts[0].global_samples.unwrap_or(0), |s| s.consumed_samples),
        mode_group: ours.as_ref().map_or(0, |s| s.mode_group),
        optimizer_step: 0,
        skipped_steps: ours.as_ref().map_or(0, |s| s.skipped_steps),
        schedule_start: ours.as_ref().map_or(0, |s| s.schedule_start),
        precision,
        loss_scaler: None,
        model: cfg,
        tp: 1,
        dp: 1,
        zero: None,
        has_optimizer: false,
        imported_from: Some(source),
        first_sample: 0,
        tokenizer_sha256: tok.sha256.clone(),
        deepspeed_config: ds_raw,
        args: serde_json::to_value(&args).expect("args serialise"),
        files: Default::default(),
    };
    let tokenizer_json = tok.to_json()?;
    let dir = o.out.join(iteration.to_string());
    atomically(&o.out, |tmp| {
        write_dir(&tmp.join(iteration.to_string()), &named, None, &tokenizer_json, state.clone())?;
        write_latest(tmp, iteration)
    })?;
    Ok(Imported { dir, state, notes, divisible_by })
}

/// `out` must not exist, or be an empty directory.
fn refuse_used(out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out).map_or(true, |mut d| d.next().is_some()) {
        return Err(Error::invalid(out, "exists; refusing to overwrite (choose a new --out)"));
    }
    Ok(())
}

/// Builds `out` in a temporary sibling with `fill`, then renames it into
/// place; on error the temporary directory goes and `out` is untouched.
fn atomically(out: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    refuse_used(out)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    std::fs::create_dir_all(&parent).at(&parent)?;
    let name = out.file_name().unwrap_or_default().to_string_lossy().to_string();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).at(&tmp)?;
    let result = fill(&tmp).and_then(|_| {
        if out.is_dir() {
            std::fs::remove_dir(out).at(out)?; // empty (refuse_used)
        }
        std::fs::rename(&tmp, out).at(out)?;
        sync_dir(&parent)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// What an export wrote.
pub struct Exported {
    /// The checkpoint exported.
    pub from: PathBuf,
    pub iteration: u64,
    /// The files, `<out>/<iteration>/mp_rank_XX_model_states.pt`.
    pub files: Vec<PathBuf>,
}

/// Writes checkpoint `load` (any tensor-parallel layout) in DeepSpeed's
/// layout under `out`, its weights split over `tp` files as
/// `change_mp.py` splits them. Nothing is left at `out` on error.
pub fn export(load: &Path, out: &Path, tp: usize) -> Result<Exported> {
    refuse_used(out)?;
    if tp < 1 {
        return Err(Error::Config("--tp must be at least 1".into()));
    }
    let dir = resolve(load)?;
    let whole = read_whole(&dir)?;
    let state = whole.states[0].clone();
    splittable(&dir, &state.model, tp)?;
    let table = partitions(&state.model);
    let by_name: BTreeMap<&str, &Tensor> = whole.named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    // this program's state, for an import of the export
    let mut ours = state.clone();
    ours.files = Default::default();
    ours.zero = None;
    ours.tp = 1;
    ours.has_optimizer = false;
    let ours = serde_json::to_value(&ours).expect("state serialises");
    let it = state.iteration;
    let names: Vec<String> = param_layout(&state.model, None).into_iter().map(|i| i.name).collect();
    let files: Vec<PathBuf> = (0..tp).map(|r| out.join(it.to_string()).join(part_file(r))).collect();
    atomically(out, |tmp| {
        let it_dir = tmp.join(it.to_string());
        std::fs::create_dir(&it_dir).at(&it_dir)?;
        for r in 0..tp {
            let mut module = Vec::with_capacity(names.len());
            for name in &names {
                let t = by_name.get(name.as_str()).ok_or_else(|| Error::invalid(&dir, format!("missing tensor {name}")))?;
                // the slicing change_mp.py applies
                let partition = change_mp_partition(name, t.dim());
                debug_assert_eq!(partition, table[name]);
                module.push((name.clone(), partition.part(r, tp).take(t).contiguous()));
            }
            let int = |v: u64| torchfile::Value::Json(Value::from(v));
            torchfile::write(
                &it_dir.join(part_file(r)),
                &[
                    ("module", torchfile::Value::Tensors(&module)),
                    ("iteration", int(it)),
                    ("global_steps", int(it)),
                    ("global_samples", int(state.consumed_samples)),
                    ("skipped_steps", int(state.skipped_steps)),
                    ("mp_world_size", int(tp as u64)),
                    ("dp_world_size", int(1)),
                    ("csr_tensor_module_names", torchfile::Value::EmptySet),
                    ("args", torchfile::Value::Json(state.args.clone())),
                    (OURS, torchfile::Value::Json(ours.clone())),
                ],
            )?;
        }
        super::write::write_synced(&it_dir.join("tokenizer.json"), whole.tokenizer_json.as_bytes())?;
        super::write::write_synced(&tmp.join(TRACKER), it.to_string().as_bytes())?;
        sync_dir(&it_dir)
    })?;
    Ok(Exported { from: dir, iteration: it, files })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// change_mp.py's rule by name is the split the model declares for
    /// every parameter (so merging and splitting reuse the model's).
    #[test]
    fn change_mp_splits_every_parameter_as_the_model_declares() {
        for block in [true, false] {
            let cfg = crate::model::glm::GlmConfig {
                vocab_size: 256,
                hidden_size: 64,
                num_layers: 3,
                num_attention_heads: 4,
                intermediate_size: 256,
                max_position_embeddings: 32,
                layernorm_epsilon: 1e-5,
                hidden_dropout: 0.0,
                attention_dropout: 0.0,
                output_dropout: 0.0,
                block_position_encoding: block,
            };
            for info in param_layout(&cfg, None) {
                assert_eq!(change_mp_partition(&info.name, info.shape.len()), info.partition, "{}", info.name);
            }
        }
    }
}
