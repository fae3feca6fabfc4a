//! Checkpoints: `<save>/<iteration>/`, or with tensor parallelism one
//! part per tensor-parallel rank, `<save>/<iteration>/mp_rank_XX/`, each
//! holding
//! - `model.safetensors`: the fp32 weights under the original's state-dict
//!   names, whatever the training precision (the optimizer's master
//!   weights under bf16/fp16, gathered from their shards under ZeRO);
//! - the optimizer state (absent with `no_save_optim`): at ZeRO stage 0
//!   `optim.safetensors` with AdamW's `exp_avg.<name>` / `exp_avg_sq.<name>`;
//!   at stages 1 and 2 one file per data-parallel rank,
//!   `zero_dp_rank_YY_optim.safetensors`, holding that rank's shard of the
//!   moments (`exp_avg`, `exp_avg_sq`, flat), with the flat ranges of every
//!   shard in the manifest (`zero` in `state.json`);
//! - `tokenizer.json`: the tokenizer, so generation needs nothing else;
//! - `state.json`: format version, iteration, layout (tensor × data
//!   parallel, ZeRO stage), optimizer step, skipped steps, precision and
//!   the fp16 loss scaler's state, model config, the effective configs, and
//!   the sha256 of every other file.
//!
//! `<save>/latest` names the newest complete checkpoint. A part is written
//! into a temporary directory and renamed when complete; `latest` moves
//! only after every part is. Every file is verified against its checksum
//! before anything is loaded. A run resumes from any data-parallel size and
//! ZeRO stage (the moments are re-partitioned); `merge` turns any layout
//! into one whole-model checkpoint, and `inspect` says what one holds.

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
use crate::optim::zero::{Piece, Shards};
use crate::parallel::Parallel;

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
    /// Tensor- and data-parallel sizes of the run that saved it (0: not
    /// recorded, a checkpoint from before they were).
    #[serde(default)]
    pub tp: usize,
    #[serde(default)]
    pub dp: usize,
    /// ZeRO's partition of the optimizer state (stages 1 and 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero: Option<ZeroManifest>,
    pub has_optimizer: bool,
    /// The store's tokenizer hash: what the token ids mean.
    pub tokenizer_sha256: String,
    /// Effective configuration, for the record: DeepSpeed JSON and configs.json.
    pub deepspeed_config: serde_json::Value,
    pub args: serde_json::Value,
    /// file name -> sha256
    pub files: BTreeMap<String, String>,
}

/// Where every data-parallel rank's shard of the optimizer state lives.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZeroManifest {
    pub stage: u8,
    /// The partition: padded flat size, unit size, data-parallel ranks.
    pub shards: Shards,
    /// Parameter elements (the flat buffers hold them first, then padding).
    pub numel: i64,
    /// `layout_fingerprint` of the part's parameters: the flat ranges refer
    /// to this layout.
    pub layout: String,
    pub files: Vec<ShardFile>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardFile {
    pub file: String,
    pub dp_rank: usize,
    /// The shard's runs: `flat` in the flat buffers, `shard` in the file's tensors.
    pub pieces: Vec<Piece>,
}

/// The optimizer shard file of data-parallel rank `r`.
pub fn shard_file(r: usize) -> String {
    format!("zero_dp_rank_{r:02}_optim.safetensors")
}

fn tch_err(p: &Path, e: tch::TchError) -> Error {
    Error::invalid(p, crate::runtime::torch_message(&e.to_string()))
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

/// Writes checkpoint `state.iteration` under `save` and points `latest` at
/// it. Data-parallel rank 0 of every tensor-parallel rank writes its part
/// (`<it>/`, or `<it>/mp_rank_XX/` with tensor parallelism): the fp32
/// weights, the tokenizer, `state.json`, and at ZeRO stage 0 the
/// moments; at stages 1 and 2 every data-parallel rank writes its shard of
/// the moments into the part (the part's directory must be on a filesystem
/// all its data-parallel ranks share). Every phase ends with an agreement
/// over the whole world, so a failure on any rank (a full disk) stops every
/// rank's save with an error, parts are renamed into place only once every
/// part is complete, and `latest` moves last. Collective over the world;
/// returns the part this rank wrote or contributed to.
pub fn save(save: &Path, model: &Glm, opt: &Optimizer, par: &Parallel, with_state: bool, tokenizer_json: &str, mut state: State) -> Result<PathBuf> {
    let it = state.iteration;
    let it_dir = save.join(it.to_string());
    let dir = match &par.tp {
        None => it_dir,
        Some(g) => it_dir.join(mp_rank_dir(g.rank)),
    };
    let (shards, dp_rank) = opt.shards();
    let partitioned = opt.partitioned() && with_state;
    // the one collective of the data (every data-parallel rank takes part):
    // the fp32 weights onto data-parallel rank 0
    let weights = opt.full_weights(&model.params)?;
    let main = par.dims.dp_rank() == 0;
    // whether every rank of the world succeeded, agreed by all: a failure on
    // one rank (a full disk) stops every rank's save instead of leaving the
    // others waiting
    let all_ok = |ok: bool| -> Result<bool> { Ok(par.world_max(i64::from(!ok))? == 0) };
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    // one temporary directory per part, shared by its data-parallel ranks
    let tmp = parent.join(format!(".tmp-{name}"));
    let cleanup = || {
        if main {
            let _ = std::fs::remove_dir_all(&tmp);
        }
    };
    // each phase: this rank's work, then every rank learns whether all succeeded
    let phase = |r: Result<()>, what: &str| -> Result<()> {
        if all_ok(r.is_ok())? {
            return Ok(());
        }
        cleanup();
        Err(r.err().unwrap_or_else(|| Error::Runtime(format!("checkpoint of iteration {it}: another rank failed to {what} (see its error); nothing was installed"))))
    };
    phase(if main { std::fs::remove_dir_all(&tmp).or(Ok(())).and_then(|_| std::fs::create_dir_all(&tmp)).at(&tmp) } else { Ok(()) }, "create its part's directory")?;
    let wrote_shard = if partitioned {
        let path = tmp.join(shard_file(dp_rank));
        let named = [("exp_avg".to_string(), opt.adam.exp_avg.shallow_clone()), ("exp_avg_sq".to_string(), opt.adam.exp_avg_sq.shallow_clone())];
        Tensor::write_safetensors(&named, &path).map_err(|e| tch_err(&path, e))
    } else {
        Ok(())
    };
    phase(wrote_shard, "write its optimizer shard")?;
    let written = if main {
        state.optimizer_step = opt.adam.step;
        state.zero = partitioned.then(|| ZeroManifest {
            stage: opt.zero.stage,
            shards,
            numel: model.params.numel(),
            layout: layout_fingerprint(&model.params.infos),
            files: (0..shards.dp).map(|r| ShardFile { file: shard_file(r), dp_rank: r, pieces: shards.pieces(r) }).collect(),
        });
        let weights = weights.expect("data-parallel rank 0 holds the weights");
        let named: Vec<(String, Tensor)> = model.params.infos.iter().map(|i| (i.name.clone(), Params::view_of(&weights, i).detach())).collect();
        let optim: Option<Vec<(String, Tensor)>> = (with_state && !partitioned).then(|| {
            let mut named = Vec::new();
            for info in &model.params.infos {
                named.push((format!("exp_avg.{}", info.name), Params::view_of(&opt.adam.exp_avg, info)));
                named.push((format!("exp_avg_sq.{}", info.name), Params::view_of(&opt.adam.exp_avg_sq, info)));
            }
            named
        });
        let shard_files: Vec<String> = state.zero.iter().flat_map(|z| z.files.iter().map(|f| f.file.clone())).collect();
        fill_dir(&tmp, &named, optim.as_deref(), &shard_files, tokenizer_json, state, with_state)
    } else {
        Ok(())
    };
    phase(written, "write its part")?;
    // every part is complete: install them, then point `latest` at them
    phase(if main { install(&tmp, &dir) } else { Ok(()) }, "install its part")?;
    let latest = if par.is_main() { write_latest(save, it) } else { Ok(()) };
    if !all_ok(latest.is_ok())? {
        return Err(latest.err().unwrap_or_else(|| Error::Runtime(format!("checkpoint of iteration {it}: rank 0 could not update {} (see its error)", save.join("latest").display()))));
    }
    Ok(dir)
}

/// A fingerprint of a part's parameter layout (names, offsets, sizes): the
/// flat ranges of ZeRO shards mean something only for this layout.
pub fn layout_fingerprint(infos: &[ParamInfo]) -> String {
    use sha2::{Digest, Sha256};
    let mut by_offset: Vec<&ParamInfo> = infos.iter().collect();
    by_offset.sort_by_key(|i| i.offset);
    let mut h = Sha256::new();
    for i in by_offset {
        h.update(format!("{} {} {}\n", i.name, i.offset, i.numel));
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Writes a part's files into `tmp` (the shard files already there):
/// weights, optimizer state, tokenizer, `state.json` with every file's sha256.
#[allow(clippy::too_many_arguments)]
fn fill_dir(tmp: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, shard_files: &[String], tokenizer_json: &str, mut state: State, with_state: bool) -> Result<()> {
    state.files = BTreeMap::new();
    let mp = tmp.join("model.safetensors");
    Tensor::write_safetensors(model, &mp).map_err(|e| tch_err(&mp, e))?;
    state.files.insert("model.safetensors".into(), sha256_file(&mp)?);
    if let Some(optim) = optim {
        let op = tmp.join("optim.safetensors");
        Tensor::write_safetensors(optim, &op).map_err(|e| tch_err(&op, e))?;
        state.files.insert("optim.safetensors".into(), sha256_file(&op)?);
    }
    for f in shard_files {
        state.files.insert(f.clone(), sha256_file(&tmp.join(f))?);
    }
    state.has_optimizer = with_state;
    let tp = tmp.join("tokenizer.json");
    std::fs::write(&tp, tokenizer_json).at(&tp)?;
    state.files.insert("tokenizer.json".into(), sha256_file(&tp)?);
    let sp = tmp.join("state.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&state).expect("state serialises")).at(&sp)
}

/// Renames the complete part `tmp` to `dir`. An older `dir` (the same
/// iteration saved again) is moved aside first and deleted only after the
/// new one is in place, so a crash in between leaves one of them intact.
fn install(tmp: &Path, dir: &Path) -> Result<()> {
    let old = dir.with_file_name(format!(".old-{}", dir.file_name().unwrap_or_default().to_string_lossy()));
    let had_old = dir.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).at(dir)?;
    }
    std::fs::rename(tmp, dir).at(dir)?;
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Writes one checkpoint directory — weights, optimizer state when given,
/// tokenizer, and `state.json` with every file's sha256 — into a temporary
/// sibling, then renames it to `dir`. An existing `dir` is refused (merge
/// and split never overwrite).
fn write_dir(dir: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str, state: State) -> Result<()> {
    if dir.exists() {
        return Err(Error::invalid(dir, "exists; refusing to overwrite (choose a new --out)"));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).at(&tmp)?;
    let result = fill_dir(&tmp, model, optim, &[], tokenizer_json, state, optim.is_some()).and_then(|_| install(&tmp, dir));
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

/// Reads `state.json` of a checkpoint part (format version checked, files
/// not yet verified: `load` verifies those it reads).
pub fn open_state(dir: &Path) -> Result<State> {
    let sp = dir.join("state.json");
    let state: State = crate::error::read_json(&sp, "corrupt checkpoint state")?;
    if state.format_version != FORMAT_VERSION {
        return Err(Error::invalid(&sp, format!("checkpoint format {} (this build reads {FORMAT_VERSION})", state.format_version)));
    }
    if let Some(z) = &state.zero {
        z.shards.validate().map_err(|e| Error::invalid(&sp, format!("zero manifest: {e}")))?;
    }
    Ok(state)
}

/// Checks the files `names` of a part against their recorded sha256.
fn verify(dir: &Path, state: &State, names: &[&str]) -> Result<()> {
    for name in names {
        let p = dir.join(name);
        let want = state.files.get(*name).ok_or_else(|| Error::invalid(dir.join("state.json"), format!("{name} is not listed with a checksum")))?;
        if &sha256_file(&p)? != want {
            return Err(Error::invalid(&p, "checksum mismatch: the file is truncated or was modified after saving; refusing to load it"));
        }
    }
    Ok(())
}

/// Reads `state.json` and verifies every file's checksum.
pub fn read_state(dir: &Path) -> Result<State> {
    let state = open_state(dir)?;
    let names: Vec<&str> = state.files.keys().map(String::as_str).collect();
    verify(dir, &state, &names)?;
    Ok(state)
}

/// The manifest's shards must describe this part's parameter layout.
fn check_manifest(dir: &Path, z: &ZeroManifest, infos: &[ParamInfo]) -> Result<()> {
    let want = layout_fingerprint(infos);
    if z.layout != want {
        return Err(Error::invalid(
            dir.join("state.json"),
            format!("the optimizer shards were saved for parameter layout {} but this model's is {want} (another model, tensor-parallel rank or build)", z.layout),
        ));
    }
    Ok(())
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

/// The checkpoint's model must have this run's shape; the fields that only
/// train (dropouts) may change. A difference names the field.
fn check_model(dir: &Path, state: &State, model: &Glm) -> Result<()> {
    let (a, b) = (&state.model, &model.cfg);
    let shape: [(&str, String, String); 8] = [
        ("vocabulary (padded)", a.vocab_size.to_string(), b.vocab_size.to_string()),
        ("hidden_size", a.hidden_size.to_string(), b.hidden_size.to_string()),
        ("num_layers", a.num_layers.to_string(), b.num_layers.to_string()),
        ("num_attention_heads", a.num_attention_heads.to_string(), b.num_attention_heads.to_string()),
        ("intermediate_size", a.intermediate_size.to_string(), b.intermediate_size.to_string()),
        ("max_position_embeddings", a.max_position_embeddings.to_string(), b.max_position_embeddings.to_string()),
        ("layernorm_epsilon", a.layernorm_epsilon.to_string(), b.layernorm_epsilon.to_string()),
        ("no_block_position", (!a.block_position_encoding).to_string(), (!b.block_position_encoding).to_string()),
    ];
    let differ: Vec<String> = shape.iter().filter(|(_, x, y)| x != y).map(|(k, x, y)| format!("{k} {x} in the checkpoint, {y} in this run")).collect();
    if !differ.is_empty() {
        return Err(Error::invalid(dir.join("state.json"), format!("the checkpoint's model differs from this run's: {}", differ.join("; "))));
    }
    Ok(())
}

/// The checkpoint's fp32 weights, laid out like `model`'s parameters.
fn read_weights(dir: &Path, model: &Glm) -> Result<Tensor> {
    let mut flat = Tensor::zeros([model.params.padded_numel()], (tch::Kind::Float, model.params.device()));
    load_into(&dir.join("model.safetensors"), &model.params.infos, &mut flat, "")?;
    Ok(flat)
}

/// Loads the weights of a verified checkpoint part into the optimizer
/// (master weights) and the model, the skipped-step count (the
/// learning-rate schedule's position, always), and with `with_state` (when
/// saved) the optimizer state: moments, step count and the fp16 loss
/// scaler. The moments are re-partitioned when the saved layout
/// (data-parallel size, ZeRO stage, bucket) differs from this run's; with
/// the same layout each rank reads only its own shard.
pub fn load(dir: &Path, state: &State, model: &mut Glm, opt: &mut Optimizer, with_state: bool) -> Result<()> {
    check_model(dir, state, model)?;
    verify(dir, state, &["model.safetensors"])?;
    let weights = read_weights(dir, model)?;
    opt.set_weights(&mut model.params, &weights);
    drop(weights);
    opt.skipped_steps = state.skipped_steps;
    if !(with_state && state.has_optimizer) {
        return Ok(());
    }
    let (shards, dp_rank) = opt.shards();
    match &state.zero {
        None => {
            // stage 0: whole moments by parameter name
            verify(dir, state, &["optim.safetensors"])?;
            let op = dir.join("optim.safetensors");
            let infos = model.params.infos.clone();
            let mut m = tch::Tensor::zeros([model.params.padded_numel()], (tch::Kind::Float, model.params.device()));
            let mut v = m.zeros_like();
            load_into(&op, &infos, &mut m, "exp_avg.")?;
            load_into(&op, &infos, &mut v, "exp_avg_sq.")?;
            opt.set_full_moments(&m, &v);
        }
        Some(z) if opt.partitioned() && z.shards == shards && z.numel == model.params.numel() => {
            // the same partition: this rank's shard, as saved
            check_manifest(dir, z, &model.params.infos)?;
            let f = z.files.iter().find(|f| f.dp_rank == dp_rank).ok_or_else(|| Error::invalid(dir.join("state.json"), format!("the manifest lists no shard of data-parallel rank {dp_rank}")))?;
            verify(dir, state, &[f.file.as_str()])?;
            let (m, v) = read_shard(dir, f)?;
            tch::no_grad(|| {
                opt.adam.exp_avg.copy_(&m);
                opt.adam.exp_avg_sq.copy_(&v);
            });
        }
        Some(z) => {
            // another partition: the whole moments from every shard, then this rank's
            check_manifest(dir, z, &model.params.infos)?;
            let files: Vec<&str> = z.files.iter().map(|f| f.file.as_str()).collect();
            verify(dir, state, &files)?;
            let (m, v) = read_sharded_moments(dir, z, model.params.numel())?;
            let pad = |t: Tensor| Tensor::cat(&[t.to_device(model.params.device()), Tensor::zeros([model.params.padded_numel() - z.numel], (tch::Kind::Float, model.params.device()))], 0);
            opt.set_full_moments(&pad(m), &pad(v));
        }
    }
    opt.adam.step = state.optimizer_step;
    if let (Some(scaler), Some(saved)) = (opt.scaler.as_mut(), state.loss_scaler.as_ref()) {
        scaler.state = saved.clone();
    }
    Ok(())
}

/// One data-parallel rank's shard of the moments, checked against the
/// manifest's size for it.
fn read_shard(dir: &Path, f: &ShardFile) -> Result<(Tensor, Tensor)> {
    let path = dir.join(&f.file);
    let tensors: BTreeMap<String, Tensor> = Tensor::read_safetensors(&path).map_err(|e| tch_err(&path, e))?.into_iter().collect();
    let want: i64 = f.pieces.iter().map(|p| p.len).sum();
    let get = |k: &str| -> Result<Tensor> {
        let t = tensors.get(k).ok_or_else(|| Error::invalid(&path, format!("missing tensor {k}")))?;
        if t.size() != [want] {
            return Err(Error::invalid(&path, format!("{k}: shape {:?}, the manifest says [{want}] for data-parallel rank {}", t.size(), f.dp_rank)));
        }
        Ok(t.to_kind(tch::Kind::Float))
    };
    Ok((get("exp_avg")?, get("exp_avg_sq")?))
}

/// The whole moments (`numel` parameter elements, no padding) of a
/// checkpoint part saved with ZeRO, assembled from every rank's shard.
fn read_sharded_moments(dir: &Path, z: &ZeroManifest, numel: i64) -> Result<(Tensor, Tensor)> {
    let sp = dir.join("state.json");
    if z.numel != numel || z.shards.padded < numel {
        return Err(Error::invalid(&sp, format!("the optimizer shards cover {} parameters, the model has {numel}", z.numel)));
    }
    let ranks: Vec<usize> = z.files.iter().map(|f| f.dp_rank).collect();
    if ranks != (0..z.shards.dp).collect::<Vec<_>>() {
        return Err(Error::invalid(&sp, format!("the manifest lists shards of data-parallel ranks {ranks:?}, expected 0..{}", z.shards.dp)));
    }
    let m = Tensor::zeros([z.shards.padded], (tch::Kind::Float, tch::Device::Cpu));
    let v = m.zeros_like();
    for f in &z.files {
        if f.pieces != z.shards.pieces(f.dp_rank) {
            return Err(Error::invalid(&sp, format!("{}: its ranges do not match the partition in the manifest", f.file)));
        }
        let (sm, sv) = read_shard(dir, f)?;
        tch::no_grad(|| {
            for p in &f.pieces {
                m.narrow(0, p.flat, p.len).copy_(&sm.narrow(0, p.shard, p.len));
                v.narrow(0, p.flat, p.len).copy_(&sv.narrow(0, p.shard, p.len));
            }
        });
    }
    Ok((m.narrow(0, 0, numel), v.narrow(0, 0, numel)))
}

/// A part's moments by parameter name (`exp_avg.<name>`, `exp_avg_sq.<name>`),
/// whatever the ZeRO stage it was saved at; `infos` are the part's
/// parameters (`glm::param_layout`).
fn read_named_moments(dir: &Path, state: &State, infos: &[ParamInfo]) -> Result<BTreeMap<String, Tensor>> {
    match &state.zero {
        None => {
            let op = dir.join("optim.safetensors");
            Ok(Tensor::read_safetensors(&op).map_err(|e| tch_err(&op, e))?.into_iter().collect())
        }
        Some(z) => {
            check_manifest(dir, z, infos)?;
            let numel: i64 = infos.iter().map(|i| i.numel).sum();
            let (m, v) = read_sharded_moments(dir, z, numel)?;
            let mut out = BTreeMap::new();
            for i in infos {
                out.insert(format!("exp_avg.{}", i.name), Params::view_of(&m, i).copy());
                out.insert(format!("exp_avg_sq.{}", i.name), Params::view_of(&v, i).copy());
            }
            Ok(out)
        }
    }
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

/// The parts of checkpoint `dir`: itself without tensor parallelism, else
/// `mp_rank_00/`, `mp_rank_01/`, ... in order.
pub fn part_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    if dir.join("state.json").is_file() {
        return Ok(vec![dir.to_path_buf()]);
    }
    // every mp_rank_NN entry, judged against the layout the parts recorded
    let mut found: BTreeMap<usize, PathBuf> = BTreeMap::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(r) = name.strip_prefix("mp_rank_").filter(|r| r.len() >= 2 && r.bytes().all(|b| b.is_ascii_digit())).and_then(|r| r.parse::<usize>().ok()) {
                found.insert(r, e.path());
            }
        }
    }
    let Some(recorded) = found.values().find_map(|p| open_state(p).ok()) else {
        return Err(Error::invalid(dir, "not a checkpoint: no state.json and no tensor-parallel part with a readable state.json (mp_rank_00/state.json)"));
    };
    let tp = if recorded.tp > 0 { recorded.tp } else { found.keys().max().map_or(1, |m| m + 1) };
    let layout = format!("saved with tensor-parallel {tp}: {} .. {}", mp_rank_dir(0), mp_rank_dir(tp - 1));
    if let Some(extra) = found.keys().find(|&&r| r >= tp) {
        return Err(Error::invalid(dir.join(mp_rank_dir(*extra)), format!("not a part of this checkpoint ({layout}); move it away or merge the checkpoint it belongs to")));
    }
    let mut parts = Vec::new();
    for r in 0..tp {
        let p = dir.join(mp_rank_dir(r));
        if !p.join("state.json").is_file() {
            let what = if p.exists() { "has no state.json" } else { "is missing" };
            return Err(Error::invalid(&p, format!("tensor-parallel part {r} {what} ({layout}): the checkpoint is incomplete")));
        }
        parts.push(p);
    }
    Ok(parts)
}

/// One whole tensor from its tensor-parallel pieces (rank order).
fn merge_pieces(partition: Partition, pieces: &[&Tensor]) -> Tensor {
    match partition {
        Partition::Whole => pieces[0].shallow_clone(),
        Partition::Rows => Tensor::cat(pieces, 0),
        Partition::Cols => Tensor::cat(pieces, 1),
        Partition::QkvRows => {
            // each part is [q_r; k_r; v_r]: regroup as [q_0..q_n; k_0..; v_0..]
            let chunks: Vec<Vec<Tensor>> = pieces.iter().map(|p| p.chunk(3, 0)).collect();
            let blocks: Vec<Tensor> = (0..3).map(|j| Tensor::cat(&chunks.iter().map(|c| c[j].shallow_clone()).collect::<Vec<_>>(), 0)).collect();
            Tensor::cat(&blocks, 0)
        }
    }
}

/// Merges checkpoint `dir`, saved with any layout (tensor-parallel parts,
/// ZeRO shards), into one whole-model checkpoint at `out`: the fp32
/// weights, and with `with_optimizer` the whole AdamW state by parameter
/// name (stage 0's format, which any layout resumes from). Returns the
/// number of tensor-parallel parts and the merged state.
pub fn merge(dir: &Path, out: &Path, with_optimizer: bool) -> Result<(usize, State)> {
    let dirs = part_dirs(dir)?;
    let parts: Vec<(State, BTreeMap<String, Tensor>, String)> = dirs.iter().map(|d| read_model(d)).collect::<Result<_>>()?;
    let n = parts.len();
    let (state0, first, tok) = &parts[0];
    if parts.iter().any(|(s, _, _)| s.iteration != state0.iteration || s.model != state0.model || s.tp != state0.tp) {
        return Err(Error::invalid(dir, "parts disagree on iteration, model configuration or tensor-parallel size"));
    }
    if state0.tp != 0 && state0.tp != n {
        return Err(Error::invalid(dir, format!("{n} of {} tensor-parallel parts present (mp_rank_00 ..): the checkpoint is incomplete", state0.tp)));
    }
    let table = partitions(&state0.model);
    let mut named = Vec::new();
    for name in first.keys() {
        let partition = *table.get(name).ok_or_else(|| Error::invalid(dirs[0].join("model.safetensors"), format!("unexpected tensor {name} (not a parameter of the model in state.json)")))?;
        let pieces: Vec<&Tensor> = parts
            .iter()
            .zip(&dirs)
            .map(|((_, t, _), d)| t.get(name).ok_or_else(|| Error::invalid(d.join("model.safetensors"), format!("missing tensor {name}"))))
            .collect::<Result<_>>()?;
        named.push((name.clone(), merge_pieces(partition, &pieces)));
    }
    let optim = if with_optimizer {
        let mut moments = Vec::new();
        for (r, ((s, _, _), d)) in parts.iter().zip(&dirs).enumerate() {
            if !s.has_optimizer {
                return Err(Error::invalid(d.join("state.json"), "saved without optimizer state (no_save_optim): nothing to merge with --with-optimizer"));
            }
            let infos = crate::model::glm::param_layout(&s.model, (n > 1).then_some((r, n)));
            moments.push(read_named_moments(d, s, &infos)?);
        }
        let mut out_named = Vec::new();
        for (name, &partition) in &table {
            for prefix in ["exp_avg.", "exp_avg_sq."] {
                let key = format!("{prefix}{name}");
                let pieces: Vec<&Tensor> = moments
                    .iter()
                    .zip(&dirs)
                    .map(|(m, d)| m.get(&key).ok_or_else(|| Error::invalid(d, format!("missing optimizer tensor {key}"))))
                    .collect::<Result<_>>()?;
                out_named.push((key, merge_pieces(partition, &pieces)));
            }
        }
        Some(out_named)
    } else {
        None
    };
    let mut state = state0.clone();
    state.tp = 1;
    state.zero = None;
    write_dir(out, &named, optim.as_deref(), tok, state.clone())?;
    state.has_optimizer = with_optimizer;
    Ok((n, state))
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
        let mut part = state.clone();
        part.tp = n;
        part.zero = None;
        write_dir(&out.join(mp_rank_dir(r)), &named, None, &tok, part)?;
    }
    Ok(())
}

/// One tensor of a safetensors header: name, dtype, shape, bytes.
type HeaderEntry = (String, String, Vec<u64>, u64);

/// The tensors of a safetensors file from its header alone, sorted by name.
fn safetensors_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).at(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::invalid(path, format!("not a safetensors file (no header: {e})")))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().at(path)?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(Error::invalid(path, format!("not a safetensors file (header of {n} bytes in a file of {size})")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).at(path)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::invalid(path, format!("safetensors header: {e}")))?;
    let mut out = Vec::new();
    for (name, t) in v.as_object().into_iter().flatten().filter(|(k, _)| *k != "__metadata__") {
        let dtype = t["dtype"].as_str().unwrap_or("?").to_string();
        let shape: Vec<u64> = t["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let off: Vec<u64> = t["data_offsets"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let bytes = if off.len() == 2 { off[1].saturating_sub(off[0]) } else { 0 };
        out.push((name.clone(), dtype, shape, bytes));
    }
    out.sort();
    Ok(out)
}

/// What a checkpoint holds, for `glm-worker checkpoint inspect`: its
/// layout, iteration, every file with its size and checksum verdict, every
/// tensor with dtype and shape (`tensors`), and whether it is complete
/// (every part and every file present and intact). Returns the report's
/// lines and the completeness verdict.
pub fn inspect(path: &Path, tensors: bool) -> Result<(Vec<String>, bool)> {
    let dir = resolve(path)?;
    let dirs = part_dirs(&dir)?;
    let mut lines = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut first: Option<State> = None;
    for (r, d) in dirs.iter().enumerate() {
        let sp = d.join("state.json");
        let state: State = crate::error::read_json(&sp, "corrupt checkpoint state")?;
        if r == 0 {
            let z = state.zero.as_ref();
            lines.push(format!("checkpoint {}", dir.display()));
            lines.push(format!(
                "  iteration {} (optimizer step {}, {} skipped), {} tokens of training seen at {} samples",
                state.iteration,
                state.optimizer_step,
                state.skipped_steps,
                state.consumed_samples * state.args.get("seq_length").and_then(|v| v.as_u64()).unwrap_or(0),
                state.consumed_samples
            ));
            lines.push(format!(
                "  layout: tensor-parallel {} × data-parallel {}, ZeRO stage {}{}, precision {} (weights stored in fp32)",
                state.tp.max(dirs.len()),
                if state.dp == 0 { "?".to_string() } else { state.dp.to_string() },
                z.map_or(0, |z| z.stage),
                z.map_or(String::new(), |z| format!(" ({} shard(s) of {} elements, units of {})", z.shards.dp, z.shards.shard_len(), z.shards.unit)),
                state.precision.name()
            ));
            let m = &state.model;
            lines.push(format!(
                "  model: {} layers, hidden {}, {} heads, ffn {}, vocab {}; optimizer state: {}",
                m.num_layers,
                m.hidden_size,
                m.num_attention_heads,
                m.intermediate_size,
                m.vocab_size,
                if state.has_optimizer { "saved" } else { "not saved" }
            ));
            if state.zero.is_some() && state.dp != state.zero.as_ref().map_or(0, |z| z.shards.dp) {
                problems.push(format!("state.json says data-parallel {} but the manifest has {} shards", state.dp, state.zero.as_ref().map_or(0, |z| z.shards.dp)));
            }
            if state.tp > dirs.len() {
                problems.push(format!("{} of {} tensor-parallel parts present", dirs.len(), state.tp));
            }
            first = Some(state.clone());
        } else if first.as_ref().is_some_and(|f| f.iteration != state.iteration || f.model != state.model) {
            problems.push(format!("{}: another iteration or model than part 0", sp.display()));
        }
        if dirs.len() > 1 || r > 0 {
            lines.push(format!("  part {}", d.file_name().unwrap_or_default().to_string_lossy()));
        }
        let mut listed: Vec<&String> = state.files.keys().collect();
        listed.sort();
        for name in listed {
            let p = d.join(name);
            let (size, verdict) = match std::fs::metadata(&p) {
                Err(_) => (0, "MISSING".to_string()),
                Ok(meta) => match sha256_file(&p) {
                    Ok(h) if h == state.files[name] => (meta.len(), format!("sha256 {} ok", &h[..16])),
                    Ok(h) => (meta.len(), format!("sha256 {} MISMATCH (truncated or modified)", &h[..16])),
                    Err(e) => (meta.len(), format!("unreadable: {e}")),
                },
            };
            if !verdict.ends_with("ok") {
                problems.push(format!("{}: {verdict}", p.display()));
            }
            let head = if name.ends_with(".safetensors") && verdict.ends_with("ok") { safetensors_header(&p).ok() } else { None };
            let count = head.as_ref().map_or(String::new(), |h| format!(", {} tensors", h.len()));
            let shard = state.zero.as_ref().and_then(|z| z.files.iter().find(|f| &f.file == name));
            let ranges = shard.map_or(String::new(), |f| {
                let shown: Vec<String> = f.pieces.iter().take(4).map(|p| format!("[{}, {})", p.flat, p.flat + p.len)).collect();
                format!(", flat ranges {}{}", shown.join(" "), if f.pieces.len() > 4 { format!(" … ({} runs)", f.pieces.len()) } else { String::new() })
            });
            lines.push(format!("    {name:<38} {:>12} bytes{count}{ranges}  {verdict}", size));
            if let (true, Some(h)) = (tensors, head) {
                for (t, dtype, shape, bytes) in h {
                    lines.push(format!("      {t:<60} {dtype:<5} {shape:?} {bytes} bytes"));
                }
            }
        }
        if let Some(z) = &state.zero {
            for f in &z.files {
                if !state.files.contains_key(&f.file) {
                    problems.push(format!("{}: shard of data-parallel rank {} not listed with a checksum", d.join(&f.file).display(), f.dp_rank));
                }
            }
        }
    }
    let complete = problems.is_empty();
    lines.push(if complete { "  complete: yes (every part and file present, every checksum verified)".to_string() } else { format!("  complete: NO — {}", problems.join("; ")) });
    Ok((lines, complete))
}
