//! Reading checkpoints back: weights and optimizer state into a run
//! (re-partitioned when the layout changed), and a model for inference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{beside, check_manifest, mp_rank_dir, read_state, resolve, tch_err, verify, ShardFile, State, ZeroManifest};
use crate::error::{Error, Result};
use crate::model::glm::Glm;
use crate::model::params::{ParamInfo, Params};
use crate::optim::optimizer::{Moments, Optimizer, OptimizerState};
use crate::optim::scaler::ScalerRules;

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
/// the same layout each rank reads only its own shard. Returns a line for
/// the log when the loss scaler's state is not taken exactly as saved
/// (another ZeRO stage's rules, another precision).
pub fn load(dir: &Path, state: &State, model: &mut Glm, opt: &mut Optimizer, with_state: bool) -> Result<Option<String>> {
    check_model(dir, state, model)?;
    verify(dir, state, &["model.safetensors"])?;
    let weights = read_weights(dir, model)?;
    opt.set_weights(&mut model.params, &weights);
    drop(weights);
    opt.set_position(state.iteration, state.skipped_steps);
    if !(with_state && state.has_optimizer) {
        // DeepSpeed's ZeRO optimizers restore the loss scaler even without
        // the optimizer state; its stage-0 optimizer restores it only with it
        let Some(scaler) = opt.scaler() else { return Ok(None) };
        if scaler.cfg.rules == ScalerRules::Fp16Optimizer || state.loss_scaler.is_none() {
            return Ok(Some(format!(
                "fp16 loss scaler starts afresh without the optimizer state ({}), as DeepSpeed's stage-0 optimizer does",
                scaler.describe()
            )));
        }
        let note = opt.resume_scaler(state.loss_scaler.clone());
        return Ok(Some(note.unwrap_or_else(|| "fp16 loss scaler restored without the optimizer state, as DeepSpeed's ZeRO optimizers do".into())));
    }
    let (shards, dp_rank) = opt.shards();
    let device = model.params.device();
    let (exp_avg, exp_avg_sq, moments) = match &state.zero {
        None => {
            // stage 0: whole moments by parameter name
            verify(dir, state, &["optim.safetensors"])?;
            let op = dir.join("optim.safetensors");
            let infos = model.params.infos.clone();
            let mut m = Tensor::zeros([model.params.padded_numel()], (tch::Kind::Float, device));
            let mut v = m.zeros_like();
            load_into(&op, &infos, &mut m, "exp_avg.")?;
            load_into(&op, &infos, &mut v, "exp_avg_sq.")?;
            (m, v, Moments::Whole)
        }
        Some(z) if opt.partitioned() && z.shards == shards && z.numel == model.params.numel() => {
            // the same partition: this rank's shard, as saved
            check_manifest(dir, z, &model.params.infos)?;
            let f = z
                .files
                .iter()
                .find(|f| f.dp_rank == dp_rank)
                .ok_or_else(|| Error::invalid(dir.join("state.json"), format!("the manifest lists no shard of data-parallel rank {dp_rank}")))?;
            verify(dir, state, &[f.file.as_str()])?;
            let (m, v) = read_shard(dir, f)?;
            (m.to_device(device), v.to_device(device), Moments::Shard)
        }
        Some(z) => {
            // another partition: the whole moments from every shard, then this rank's
            check_manifest(dir, z, &model.params.infos)?;
            let files: Vec<&str> = z.files.iter().map(|f| f.file.as_str()).collect();
            verify(dir, state, &files)?;
            let (m, v) = read_sharded_moments(dir, z, model.params.numel())?;
            let pad = |t: Tensor| Tensor::cat(&[t.to_device(device), Tensor::zeros([model.params.padded_numel() - z.numel], (tch::Kind::Float, device))], 0);
            (pad(m), pad(v), Moments::Whole)
        }
    };
    opt.load_state(OptimizerState {
        exp_avg,
        exp_avg_sq,
        moments,
        step: state.optimizer_step,
        skipped_steps: state.skipped_steps,
        loss_scaler: state.loss_scaler.clone(),
    })
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
pub(super) fn read_named_moments(dir: &Path, state: &State, infos: &[ParamInfo]) -> Result<BTreeMap<String, Tensor>> {
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

/// Refuses, for `command` (eval, generate: whole-model checkpoints only), a
/// checkpoint `dir` split over tensor-parallel ranks, with the merge command
/// to run and where to point `command` next.
pub fn require_whole(dir: &Path, command: &str) -> Result<()> {
    if dir.join("state.json").is_file() || !dir.join(mp_rank_dir(0)).is_dir() {
        return Ok(());
    }
    let word = |p: &Path| glm_common::text::shell_word(&p.display().to_string());
    let merged = beside(dir, "merged");
    Err(Error::invalid(
        dir,
        format!(
            "this checkpoint is split over tensor-parallel ranks (mp_rank_XX/); {command} needs a whole-model checkpoint: merge it first \
             (glm-worker checkpoint merge --load {} --out {}), then give {command} --load {}",
            word(dir),
            word(&merged),
            word(&merged)
        ),
    ))
}

/// Reads a checkpoint's model only, for `command` (eval, generate): config,
/// weights, tokenizer.
pub fn load_for_inference(path: &Path, device: tch::Device, command: &str) -> Result<(Glm, State, PathBuf)> {
    let dir = resolve(path)?;
    require_whole(&dir, command)?;
    let state = read_state(&dir)?;
    let mut model = Glm::new(state.model.clone(), device, 0)?;
    check_model(&dir, &state, &model)?;
    let weights = read_weights(&dir, &model)?;
    tch::no_grad(|| {
        model.params.flat_mut().copy_(&weights);
    });
    Ok((model, state, dir))
}
