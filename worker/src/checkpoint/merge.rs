//! Changing a checkpoint's tensor-parallel layout: `merge` (any layout into
//! one whole model, optionally with the whole optimizer state) and `split`
//! (a whole model into tensor-parallel parts).

use std::collections::BTreeMap;
use std::path::Path;

use tch::Tensor;

use super::load::read_named_moments;
use super::save::write_dir;
use super::{mp_rank_dir, part_dirs, read_state, tch_err, State};
use crate::error::{Error, IoContext, Result};
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

/// One whole tensor from its tensor-parallel pieces (rank order).
pub(super) fn merge_pieces(partition: Partition, pieces: &[&Tensor]) -> Tensor {
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

/// A checkpoint of any tensor-parallel layout read as one whole model.
pub(super) struct Whole {
    /// Each part's directory and state (verified), in rank order.
    pub dirs: Vec<std::path::PathBuf>,
    pub states: Vec<State>,
    /// The whole fp32 weights by name, in part 0's (sorted) order.
    pub named: Vec<(String, Tensor)>,
    pub tokenizer_json: String,
}

/// Reads every part of checkpoint `dir` and merges their weights into the
/// whole model's.
pub(super) fn read_whole(dir: &Path) -> Result<Whole> {
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
        let partition = *table.get(name).ok_or_else(|| {
            Error::invalid(dirs[0].join("model.safetensors"), format!("unexpected tensor {name} (not a parameter of the model in state.json)"))
        })?;
        let pieces: Vec<&Tensor> = parts
            .iter()
            .zip(&dirs)
            .map(|((_, t, _), d)| t.get(name).ok_or_else(|| Error::invalid(d.join("model.safetensors"), format!("missing tensor {name}"))))
            .collect::<Result<_>>()?;
        named.push((name.clone(), merge_pieces(partition, &pieces)));
    }
    let tokenizer_json = tok.clone();
    let states = parts.into_iter().map(|(s, _, _)| s).collect();
    Ok(Whole { dirs, states, named, tokenizer_json })
}

/// Merges checkpoint `dir`, saved with any layout (tensor-parallel parts,
/// ZeRO shards), into one whole-model checkpoint at `out`: the fp32
/// weights, and with `with_optimizer` the whole AdamW state by parameter
/// name (stage 0's format, which any layout resumes from). Returns the
/// number of tensor-parallel parts and the merged state.
pub fn merge(dir: &Path, out: &Path, with_optimizer: bool) -> Result<(usize, State)> {
    let Whole { dirs, states, named, tokenizer_json: tok } = read_whole(dir)?;
    let n = dirs.len();
    let state0 = &states[0];
    let table = partitions(&state0.model);
    let optim = if with_optimizer {
        let mut moments = Vec::new();
        for (r, (s, d)) in states.iter().zip(&dirs).enumerate() {
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
    write_dir(out, &named, optim.as_deref(), &tok, state.clone())?;
    state.has_optimizer = with_optimizer;
    Ok((n, state))
}

/// The model of checkpoint `dir` splits over `n` tensor-parallel ranks.
pub(super) fn splittable(dir: &Path, m: &crate::model::glm::GlmConfig, n: usize) -> Result<()> {
    for (what, v) in [
        ("vocab_size", m.vocab_size),
        ("hidden_size", m.hidden_size),
        ("num_attention_heads", m.num_attention_heads),
        ("intermediate_size", m.intermediate_size),
    ] {
        if v % n != 0 {
            return Err(Error::invalid(dir, format!("{what} {v} is not divisible by {n} tensor-parallel ranks")));
        }
    }
    Ok(())
}

/// Splits a whole-model checkpoint `dir` into `n` tensor-parallel parts
/// `<out>/mp_rank_XX/` (weights only); returns the checkpoint's state.
pub fn split(dir: &Path, n: usize, out: &Path) -> Result<State> {
    let (state, tensors, tok) = read_model(dir)?;
    if n < 1 {
        return Err(Error::Config("--tp must be at least 1".into()));
    }
    let m = &state.model;
    splittable(dir, m, n)?;
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
    Ok(state)
}
