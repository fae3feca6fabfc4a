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
//! only after every part is. The files are written inline or by a
//! background thread from host copies (`save::begin`, `InFlight::finish`);
//! `saver` decides when a run saves and which checkpoints it keeps. Every file is verified against its checksum
//! before anything is loaded. A run resumes from any data-parallel size and
//! ZeRO stage (the moments are re-partitioned); `merge` turns any layout
//! into one whole-model checkpoint, and `inspect` says what one holds.

pub mod deepspeed;
mod inspect;
mod load;
mod merge;
pub mod pickle;
mod save;
pub mod saver;
pub mod torchfile;
mod write;

pub use inspect::inspect;
pub use load::{load, load_for_inference, require_whole};
pub use merge::{merge, split};
pub use save::{begin, save, write_latest, Finished, InFlight, Progress, Writing};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::store::sha256_file;
use crate::error::{Error, Result};
use crate::model::glm::GlmConfig;
use crate::model::params::ParamInfo;
use crate::optim::optimizer::Precision;
use crate::optim::scaler::ScalerState;
use crate::optim::zero::{Piece, Shards};

pub const FORMAT_VERSION: u32 = 1;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

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
    /// The mode group: training draws the blank-infilling mode of global
    /// sample i as that of group i / mode_group (`BlockSampler::mode_of`).
    /// Fixed at a run's start as its global batch (one mode per step) and
    /// kept by every resumed run, whatever its layout or batch. 0: not
    /// recorded (a checkpoint from before it was), see `State::mode_group`.
    #[serde(default)]
    pub mode_group: u64,
    pub optimizer_step: u64,
    /// Iterations whose update was skipped (fp16 overflow): the
    /// learning-rate schedule stands at `iteration - skipped_steps`.
    #[serde(default)]
    pub skipped_steps: u64,
    /// Applied updates before the learning-rate schedule's start: a run
    /// resumed with `no_load_lr_scheduler` restarted it there, and its
    /// checkpoints continue that schedule (0: the run's own start).
    #[serde(default)]
    pub schedule_start: u64,
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
    /// Where the weights came from when another program trained them
    /// (`checkpoint import`), in words. A run from such a checkpoint starts
    /// a fresh optimizer and draws blank-infilling modes per its own
    /// global batch (there is no data stream of this program's to go on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
    /// The global sample at which this program's data stream began: a run
    /// from an imported checkpoint starts at its iteration × global batch,
    /// and the samples, tokens and epochs it reports per corpus count from
    /// there (0: from the first sample).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub first_sample: u64,
    /// The store's tokenizer hash: what the token ids mean.
    pub tokenizer_sha256: String,
    /// Effective configuration, for the record: DeepSpeed JSON and configs.json.
    pub deepspeed_config: serde_json::Value,
    pub args: serde_json::Value,
    /// file name -> sha256
    pub files: BTreeMap<String, String>,
}

impl State {
    /// The mode group the run that saved this trained with: the recorded
    /// one, else (a checkpoint from before it was recorded) what such runs
    /// used: one mode per global micro-batch, its micro-batch × data-parallel
    /// size (the global batch unless it accumulated gradients), from the
    /// effective DeepSpeed config and configs.json in here. `sp` (the state
    /// file) names the error.
    pub fn mode_group(&self, sp: &Path) -> Result<u64> {
        if self.mode_group > 0 {
            return Ok(self.mode_group);
        }
        let dp = self.dp.max(1); // 0: saved before data parallelism was recorded (one rank then)
        let arg = |k: &str| self.args.get(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        let (Some(micro), Some(accum)) = (arg("batch_size"), arg("gradient_accumulation_steps")) else {
            return Err(Error::invalid(sp, "no mode_group, and args lacks batch_size or gradient_accumulation_steps to derive it from"));
        };
        // errors name the field ("deepspeed_config: train_batch_size ...") inside the file's
        let why = |e: Error| Error::invalid(sp, format!("no mode_group, and the saving run's micro-batch cannot be derived: {e}"));
        let ds = crate::config::ds::DsConfig::from_value(Path::new("deepspeed_config"), &self.deepspeed_config).map_err(why)?;
        let batch = ds.batch(dp, micro, accum).map_err(why)?;
        Ok((batch.micro * dp) as u64)
    }
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
    Error::invalid(p, crate::runtime::report::torch_message(&e.to_string()))
}

/// Where a converted form of checkpoint `dir` goes by default: beside it,
/// `<dir>-<suffix>` (`<save>/<iteration>-merged`, `-tp2`).
pub fn beside(dir: &Path, suffix: &str) -> PathBuf {
    let name = dir.file_name().map_or("checkpoint".into(), |n| n.to_string_lossy().into_owned());
    dir.with_file_name(format!("{name}-{suffix}"))
}

/// The sub-directory of tensor-parallel rank `tp_rank` in a checkpoint.
pub fn mp_rank_dir(tp_rank: usize) -> String {
    format!("mp_rank_{tp_rank:02}")
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

/// The checkpoint directory `load` designates: `load` itself when it holds a
/// `state.json` (or tensor-parallel parts `mp_rank_XX/`), else the iteration
/// named by `load/latest`.
pub fn resolve(load: &Path) -> Result<PathBuf> {
    if glm_common::launch::is_checkpoint_dir(load) {
        return Ok(load.to_path_buf());
    }
    let latest = load.join("latest");
    let text = std::fs::read_to_string(&latest).map_err(|e| Error::invalid(load, format!("not a checkpoint: no state.json, and latest: {e}")))?;
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
    let state: State = glm_common::text::read_json(&sp, "corrupt checkpoint state")?;
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
            format!(
                "the optimizer shards were saved for parameter layout {} but this model's is {want} (another model, tensor-parallel rank or build)",
                z.layout
            ),
        ));
    }
    Ok(())
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
            if let Some(r) =
                name.strip_prefix("mp_rank_").filter(|r| r.len() >= 2 && r.bytes().all(|b| b.is_ascii_digit())).and_then(|r| r.parse::<usize>().ok())
            {
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
        return Err(Error::invalid(
            dir.join(mp_rank_dir(*extra)),
            format!("not a part of this checkpoint ({layout}); move it away or merge the checkpoint it belongs to"),
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn state(v: serde_json::Value) -> State {
        let mut base = serde_json::json!({
            "format_version": FORMAT_VERSION, "iteration": 3, "optimizer_step": 3, "has_optimizer": true, "tokenizer_sha256": "x",
            "files": {},
            "model": {"vocab_size": 64, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 1, "intermediate_size": 32, "max_position_embeddings": 16,
                      "layernorm_epsilon": 1e-5, "hidden_dropout": 0.0, "attention_dropout": 0.0, "output_dropout": 0.0, "block_position_encoding": true},
            "deepspeed_config": {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4},
            "args": {"batch_size": 8, "gradient_accumulation_steps": 1}, "dp": 2,
        });
        for (k, x) in v.as_object().unwrap() {
            base[k] = x.clone();
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn the_mode_group_is_read_or_derived_for_older_checkpoints() {
        let sp = Path::new("ckpt/3/state.json");
        // recorded: kept, whatever the saving layout
        assert_eq!(state(serde_json::json!({"mode_group": 8})).mode_group(sp).unwrap(), 8);
        // an older checkpoint: its micro-batch (4, accumulation 2) × data-parallel 2
        assert_eq!(state(serde_json::json!({})).mode_group(sp).unwrap(), 8);
        // the micro-batch from configs.json's batch_size when the DeepSpeed file has none
        assert_eq!(state(serde_json::json!({"deepspeed_config": {}, "dp": 1})).mode_group(sp).unwrap(), 8);
        assert_eq!(state(serde_json::json!({"deepspeed_config": {}, "dp": 0})).mode_group(sp).unwrap(), 8, "dp 0: one rank");
        let e = state(serde_json::json!({"args": {}})).mode_group(sp).unwrap_err().to_string();
        assert!(e.contains("ckpt/3/state.json") && e.contains("mode_group") && e.contains("batch_size"), "{e}");
        let e = state(serde_json::json!({"deepspeed_config": {"train_batch_size": 7}})).mode_group(sp).unwrap_err().to_string();
        assert!(e.contains("ckpt/3/state.json") && e.contains("mode_group") && e.contains("train_batch_size 7"), "{e}");
    }
}
