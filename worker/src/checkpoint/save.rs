//! Writing checkpoints: every rank's part of `save`, atomically installed,
//! and the whole-model directories `merge` and `split` write.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use super::{layout_fingerprint, mp_rank_dir, shard_file, tch_err, ShardFile, State, ZeroManifest};
use crate::data::store::sha256_file;
use crate::error::{Error, IoContext, Result};
use crate::model::glm::Glm;
use crate::model::params::Params;
use crate::optim::optimizer::Optimizer;
use crate::parallel::Parallel;

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
    // the optimizer's own account of its state: this rank's shard of the moments
    let optim = opt.state();
    let (exp_avg, exp_avg_sq) = (&optim.exp_avg, &optim.exp_avg_sq);
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
        Err(r
            .err()
            .unwrap_or_else(|| Error::Runtime(format!("checkpoint of iteration {it}: another rank failed to {what} (see its error); nothing was installed"))))
    };
    phase(
        if main { std::fs::remove_dir_all(&tmp).or(Ok(())).and_then(|_| std::fs::create_dir_all(&tmp)).at(&tmp) } else { Ok(()) },
        "create its part's directory",
    )?;
    let wrote_shard = if partitioned {
        let path = tmp.join(shard_file(dp_rank));
        let named = [("exp_avg".to_string(), exp_avg.shallow_clone()), ("exp_avg_sq".to_string(), exp_avg_sq.shallow_clone())];
        Tensor::write_safetensors(&named, &path).map_err(|e| tch_err(&path, e))
    } else {
        Ok(())
    };
    phase(wrote_shard, "write its optimizer shard")?;
    let written = if main {
        state.optimizer_step = optim.step;
        state.skipped_steps = optim.skipped_steps;
        state.precision = opt.precision();
        state.loss_scaler = optim.loss_scaler.clone();
        state.zero = partitioned.then(|| ZeroManifest {
            stage: opt.zero_config().stage,
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
                named.push((format!("exp_avg.{}", info.name), Params::view_of(exp_avg, info)));
                named.push((format!("exp_avg_sq.{}", info.name), Params::view_of(exp_avg_sq, info)));
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
        return Err(latest.err().unwrap_or_else(|| {
            Error::Runtime(format!("checkpoint of iteration {it}: rank 0 could not update {} (see its error)", save.join("latest").display()))
        }));
    }
    Ok(dir)
}

/// Writes a part's files into `tmp` (the shard files already there):
/// weights, optimizer state, tokenizer, `state.json` with every file's sha256.
#[allow(clippy::too_many_arguments)]
fn fill_dir(
    tmp: &Path,
    model: &[(String, Tensor)],
    optim: Option<&[(String, Tensor)]>,
    shard_files: &[String],
    tokenizer_json: &str,
    mut state: State,
    with_state: bool,
) -> Result<()> {
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
pub(super) fn write_dir(dir: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str, state: State) -> Result<()> {
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
