//! Checkpoints: `<save>/<iteration>/` with
//! - `model.safetensors`: the weights under the original's state-dict names;
//! - `model.safetensors` holds fp32 weights whatever the training precision
//!   (the optimizer's master weights under bf16/fp16);
//! - `optim.safetensors`: AdamW's `exp_avg.<name>` / `exp_avg_sq.<name>`
//!   (absent with `no_save_optim`);
//! - `tokenizer.json`: the tokenizer, so generation needs nothing else;
//! - `state.json`: format version, iteration, optimizer step, skipped
//!   steps, precision and the fp16 loss scaler's state, model config, the
//!   effective configs, and the sha256 of every other file.
//!
//! `<save>/latest` names the newest complete checkpoint. Both are written
//! atomically (temporary directory/file, then rename), and every file is
//! verified against its checksum before anything is loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::data::store::sha256_file;
use crate::error::{Error, IoContext, Result};
use crate::model::glm::{Glm, GlmConfig};
use crate::model::params::{ParamInfo, Params};
use crate::optim::optimizer::{Optimizer, Precision};
use crate::optim::scaler::ScalerState;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub format_version: u32,
    pub iteration: u64,
    /// Data position: samples consumed so far (iteration × train_batch_size).
    /// Samples are a function of (seed, global index), so this and the
    /// iteration restore the data stream; dropout is re-seeded from
    /// (seed, iteration), so there is no generator state to save.
    #[serde(default)]
    pub consumed_samples: u64,
    pub optimizer_step: u64,
    /// Iterations whose update was skipped (fp16 overflow): the
    /// learning-rate schedule stands at `iteration - skipped_steps`.
    #[serde(default)]
    pub skipped_steps: u64,
    /// The precision the run trained in (the weights here are fp32 anyway).
    #[serde(default)]
    pub precision: Precision,
    /// The fp16 loss scaler's state (fp16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<ScalerState>,
    pub model: GlmConfig,
    pub has_optimizer: bool,
    /// The store's tokenizer hash: what the token ids mean.
    pub tokenizer_sha256: String,
    /// Effective configuration, for the record: DeepSpeed JSON and configs.json.
    pub deepspeed_config: serde_json::Value,
    pub args: serde_json::Value,
    /// file name -> sha256
    pub files: BTreeMap<String, String>,
}

fn tch_err(p: &Path, e: tch::TchError) -> Error {
    Error::invalid(p, e.to_string())
}

/// Writes checkpoint `iteration` under `save` and points `latest` at it:
/// the fp32 weights, and the optimizer state when `with_state`.
pub fn save(save: &Path, model: &Glm, opt: &Optimizer, with_state: bool, tokenizer_json: &str, state: State) -> Result<PathBuf> {
    let it = state.iteration;
    let dir = save_part(save, None, model, opt, with_state, tokenizer_json, state)?;
    write_latest(save, it)?;
    Ok(dir)
}

/// The sub-directory of tensor-parallel rank `tp_rank` in a checkpoint.
pub fn mp_rank_dir(tp_rank: usize) -> String {
    format!("mp_rank_{tp_rank:02}")
}

/// Points `<save>/latest` at iteration `it` (atomically). Call once every
/// part of the checkpoint is complete.
pub fn write_latest(save: &Path, it: u64) -> Result<()> {
    let latest_tmp = save.join(format!(".latest.tmp-{}", std::process::id()));
    std::fs::write(&latest_tmp, format!("{it}\n")).at(&latest_tmp)?;
    std::fs::rename(&latest_tmp, save.join("latest")).at(save)
}

/// Writes `<save>/<iteration>/` (or, with `part`, `<save>/<iteration>/<part>/`,
/// one tensor-parallel rank's slices) without touching `latest`.
pub fn save_part(save: &Path, part: Option<&str>, model: &Glm, opt: &Optimizer, with_state: bool, tokenizer_json: &str, mut state: State) -> Result<PathBuf> {
    let it_dir = save.join(state.iteration.to_string());
    let dir = match part {
        None => it_dir,
        Some(p) => it_dir.join(p),
    };
    let weights = opt.fp32_weights(&model.params);
    let named: Vec<(String, Tensor)> = model.params.infos.iter().map(|i| (i.name.clone(), Params::view_of(weights, i).detach())).collect();
    let optim: Option<Vec<(String, Tensor)>> = with_state.then(|| {
        state.optimizer_step = opt.adam.step;
        let mut named = Vec::new();
        for info in &model.params.infos {
            named.push((format!("exp_avg.{}", info.name), Params::view_of(&opt.adam.exp_avg, info)));
            named.push((format!("exp_avg_sq.{}", info.name), Params::view_of(&opt.adam.exp_avg_sq, info)));
        }
        named
    });
    write_dir(&dir, &named, optim.as_deref(), tokenizer_json, state, true)?;
    Ok(dir)
}

/// Writes one checkpoint directory — weights, optimizer state when given,
/// tokenizer, and `state.json` with every file's sha256 — into a temporary
/// sibling, then renames it to `dir`. An existing `dir` is replaced when
/// `replace`, else refused.
fn write_dir(dir: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str, mut state: State, replace: bool) -> Result<()> {
    if dir.exists() && !replace {
        return Err(Error::invalid(dir, "exists; refusing to overwrite (choose a new --out)"));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).at(&tmp)?;
    let result = (|| -> Result<()> {
        state.files = BTreeMap::new();
        let mp = tmp.join("model.safetensors");
        Tensor::write_safetensors(model, &mp).map_err(|e| tch_err(&mp, e))?;
        state.files.insert("model.safetensors".into(), sha256_file(&mp)?);
        if let Some(optim) = optim {
            let op = tmp.join("optim.safetensors");
            Tensor::write_safetensors(optim, &op).map_err(|e| tch_err(&op, e))?;
            state.files.insert("optim.safetensors".into(), sha256_file(&op)?);
        }
        state.has_optimizer = optim.is_some();
        let tp = tmp.join("tokenizer.json");
        std::fs::write(&tp, tokenizer_json).at(&tp)?;
        state.files.insert("tokenizer.json".into(), sha256_file(&tp)?);
        let sp = tmp.join("state.json");
        std::fs::write(&sp, serde_json::to_string_pretty(&state).expect("state serialises")).at(&sp)?;
        if dir.exists() {
            std::fs::remove_dir_all(dir).at(dir)?;
        }
        std::fs::rename(&tmp, dir).at(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The checkpoint directory `load` designates: `load` itself when it holds a
/// `state.json` (or tensor-parallel parts `mp_rank_XX/`), else the iteration
/// named by `load/latest`.
pub fn resolve(load: &Path) -> Result<PathBuf> {
    if load.join("state.json").is_file() || load.join(mp_rank_dir(0)).join("state.json").is_file() {
        return Ok(load.to_path_buf());
    }
    let latest = load.join("latest");
    let text = std::fs::read_to_string(&latest).map_err(|e| {
        Error::invalid(load, format!("not a checkpoint: no state.json, and latest: {e}"))
    })?;
    let it = text.trim();
    if it.is_empty() || !it.chars().all(|c| c.is_ascii_digit()) {
        return Err(Error::parse(&latest, 1, 1, format!("expected an iteration number, found {it:?}")));
    }
    Ok(load.join(it))
}

/// Reads and verifies `state.json` and every file's checksum.
pub fn read_state(dir: &Path) -> Result<State> {
    let sp = dir.join("state.json");
    let state: State = crate::error::read_json(&sp, "corrupt checkpoint state")?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::invalid(&sp, format!("checkpoint format {} (this build reads {FORMAT_VERSION})", state.format_version)));
    }
    for (name, want) in &state.files {
        let p = dir.join(name);
        let got = sha256_file(&p)?;
        if &got != want {
            return Err(Error::invalid(&p, "checksum mismatch: the file is truncated or was modified after saving; refusing to load it"));
        }
    }
    Ok(state)
}

/// Copies the tensors `<prefix><name>` of `file` into views of `flat` laid
/// out as `infos` say (cast to `flat`'s dtype); every one must be there,
/// with its shape, and nothing else with that prefix.
fn load_into(file: &Path, infos: &[ParamInfo], flat: &mut Tensor, prefix: &str) -> Result<()> {
    let tensors = Tensor::read_safetensors(file).map_err(|e| tch_err(file, e))?;
    // "exp_avg." and "exp_avg_sq." never prefix each other
    let mut by_name: BTreeMap<String, Tensor> = tensors.into_iter().filter(|(k, _)| k.starts_with(prefix)).collect();
    tch::no_grad(|| -> Result<()> {
        for info in infos {
            let key = format!("{prefix}{}", info.name);
            let t = by_name.remove(&key).ok_or_else(|| Error::invalid(file, format!("missing tensor {key}")))?;
            if t.size() != info.shape {
                return Err(Error::invalid(file, format!("{key}: shape {:?}, the model has {:?}", t.size(), info.shape)));
            }
            flat.narrow(0, info.offset, info.numel).copy_(&t.reshape([-1]).to_kind(flat.kind()));
        }
        Ok(())
    })?;
    if let Some(extra) = by_name.keys().next() {
        return Err(Error::invalid(file, format!("unexpected tensor {extra} (a different model?)")));
    }
    Ok(())
}

fn check_model(dir: &Path, state: &State, model: &Glm) -> Result<()> {
    if state.model != model.cfg {
        return Err(Error::invalid(
            dir.join("state.json"),
            format!("checkpoint model {:?} differs from the configured model {:?}", state.model, model.cfg),
        ));
    }
    Ok(())
}

/// The checkpoint's fp32 weights, laid out like `model`'s parameters.
fn read_weights(dir: &Path, model: &Glm) -> Result<Tensor> {
    let mut flat = Tensor::zeros([model.params.padded_numel()], (tch::Kind::Float, model.params.device()));
    load_into(&dir.join("model.safetensors"), &model.params.infos, &mut flat, "")?;
    Ok(flat)
}

/// Loads the weights of a verified checkpoint directory into the optimizer
/// (master weights) and the model, the skipped-step count (the learning-rate
/// schedule's position, always), and with `with_state` (when saved) the
/// optimizer state: moments, step count and the fp16 loss scaler.
pub fn load(dir: &Path, state: &State, model: &mut Glm, opt: &mut Optimizer, with_state: bool) -> Result<()> {
    check_model(dir, state, model)?;
    let weights = read_weights(dir, model)?;
    opt.set_weights(&mut model.params, &weights);
    opt.skipped_steps = state.skipped_steps;
    if with_state && state.has_optimizer {
        let op = dir.join("optim.safetensors");
        let infos = model.params.infos.clone();
        load_into(&op, &infos, &mut opt.adam.exp_avg, "exp_avg.")?;
        load_into(&op, &infos, &mut opt.adam.exp_avg_sq, "exp_avg_sq.")?;
        opt.adam.step = state.optimizer_step;
        if let (Some(scaler), Some(saved)) = (opt.scaler.as_mut(), state.loss_scaler.as_ref()) {
            scaler.state = saved.clone();
        }
    }
    Ok(())
}

/// Reads a checkpoint's model only (for generation): config, weights, tokenizer.
pub fn load_for_inference(path: &Path, device: tch::Device) -> Result<(Glm, State, PathBuf)> {
    let dir = resolve(path)?;
    if !dir.join("state.json").is_file() && dir.join(mp_rank_dir(0)).is_dir() {
        return Err(Error::invalid(
            &dir,
            "this checkpoint is split over tensor-parallel ranks (mp_rank_XX/); generation needs a whole-model checkpoint: glm-worker checkpoint merge --load <it> --out <dir>",
        ));
    }
    let state = read_state(&dir)?;
    let mut model = Glm::new(state.model.clone(), device, 0)?;
    check_model(&dir, &state, &model)?;
    let weights = read_weights(&dir, &model)?;
    tch::no_grad(|| {
        model.params.flat_mut().copy_(&weights);
    });
    Ok((model, state, dir))
}

use crate::model::glm::partitions;
use crate::model::params::Partition;

fn read_model(dir: &Path) -> Result<(State, BTreeMap<String, Tensor>, String)> {
    let state = read_state(dir)?;
    let mp = dir.join("model.safetensors");
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&mp).map_err(|e| tch_err(&mp, e))?.into_iter().collect();
    let tj = dir.join("tokenizer.json");
    let tok = std::fs::read_to_string(&tj).at(&tj)?;
    Ok((state, tensors, tok))
}

/// Merges the tensor-parallel parts `<dir>/mp_rank_XX/` of one checkpoint
/// into a whole-model checkpoint at `out` (weights only). Returns the number
/// of parts.
pub fn merge(dir: &Path, out: &Path) -> Result<usize> {
    let mut parts = Vec::new();
    while dir.join(mp_rank_dir(parts.len())).join("state.json").is_file() {
        parts.push(read_model(&dir.join(mp_rank_dir(parts.len())))?);
    }
    if parts.is_empty() {
        return Err(Error::invalid(dir, "no tensor-parallel parts (mp_rank_00/state.json) to merge"));
    }
    let n = parts.len();
    let (state0, first, tok) = &parts[0];
    if parts.iter().any(|(s, _, _)| s.iteration != state0.iteration || s.model != state0.model) {
        return Err(Error::invalid(dir, "parts disagree on iteration or model configuration"));
    }
    let table = partitions(&state0.model);
    let mut named = Vec::new();
    for name in first.keys() {
        let partition = *table.get(name).ok_or_else(|| Error::invalid(dir.join(mp_rank_dir(0)).join("model.safetensors"), format!("unexpected tensor {name} (not a parameter of the model in state.json)")))?;
        let pieces: Vec<&Tensor> = parts
            .iter()
            .map(|(_, t, _)| t.get(name).ok_or_else(|| Error::invalid(dir, format!("a part lacks {name}"))))
            .collect::<Result<_>>()?;
        let whole = match partition {
            Partition::Whole => pieces[0].shallow_clone(),
            Partition::Rows => Tensor::cat(&pieces, 0),
            Partition::Cols => Tensor::cat(&pieces, 1),
            Partition::QkvRows => {
                // each part is [q_r; k_r; v_r]: regroup as [q_0..q_n; k_0..; v_0..]
                let chunks: Vec<Vec<Tensor>> = pieces.iter().map(|p| p.chunk(3, 0)).collect();
                let blocks: Vec<Tensor> = (0..3).map(|j| Tensor::cat(&chunks.iter().map(|c| c[j].shallow_clone()).collect::<Vec<_>>(), 0)).collect();
                Tensor::cat(&blocks, 0)
            }
        };
        named.push((name.clone(), whole));
    }
    write_dir(out, &named, None, tok, state0.clone(), false)?;
    Ok(n)
}

/// Splits a whole-model checkpoint `dir` into `n` tensor-parallel parts
/// `<out>/mp_rank_XX/` (weights only).
pub fn split(dir: &Path, n: usize, out: &Path) -> Result<()> {
    let (state, tensors, tok) = read_model(dir)?;
    if n < 1 {
        return Err(Error::Config("--tp must be at least 1".into()));
    }
    let m = &state.model;
    for (what, v) in [("vocab_size", m.vocab_size), ("hidden_size", m.hidden_size), ("num_attention_heads", m.num_attention_heads), ("intermediate_size", m.intermediate_size)] {
        if v % n != 0 {
            return Err(Error::invalid(dir, format!("{what} {v} is not divisible by {n} tensor-parallel ranks")));
        }
    }
    if out.exists() {
        return Err(Error::invalid(out, "exists; refusing to overwrite (choose a new --out)"));
    }
    let table = partitions(m);
    let mp = dir.join("model.safetensors");
    let unknown = tensors.keys().find(|k| !table.contains_key(*k));
    if let Some(k) = unknown {
        return Err(Error::invalid(&mp, format!("unexpected tensor {k} (not a parameter of the model in state.json)")));
    }
    std::fs::create_dir_all(out).at(out)?;
    for r in 0..n {
        let mut named = Vec::new();
        for (name, t) in &tensors {
            // the slicing the model's constructor applies to its master weights
            named.push((name.clone(), table[name].part(r, n).take(t).contiguous()));
        }
        write_dir(&out.join(mp_rank_dir(r)), &named, None, &tok, state.clone(), false)?;
    }
    Ok(())
}
