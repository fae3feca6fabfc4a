//! What glm-launch reads of the job it starts: the worker's own config files
//! (`--config`, `--args`, `--set`), read as glm-worker reads them, for the
//! preflight's disk check, the collective deadline, where checkpoints go
//! (automatic restart resumes from them) and the batch sizes (an elastic
//! restart keeps the global batch).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use glm_common::args::Args;
use glm_common::ds::{Batch, DsConfig};

/// The worker's training configuration; `None` for a worker subcommand.
pub struct Job {
    pub args: Args,
    /// The DeepSpeed file, when `--config` names one.
    pub ds: Option<DsConfig>,
}

/// The value of worker flag `flag` (`--flag v` or `--flag=v`), the last one given.
pub fn flag_value(worker_args: &[String], flag: &str) -> Option<String> {
    let mut out = None;
    let mut it = worker_args.iter();
    while let Some(a) = it.next() {
        if let Some(v) = a.strip_prefix(&format!("{flag}=")) {
            out = Some(v.to_string());
        } else if a == flag {
            out = it.next().cloned();
        }
    }
    out
}

impl Job {
    /// Reads the worker's configuration from its arguments.
    pub fn read(worker_args: &[String]) -> Result<Option<Job>> {
        if worker_args.first().is_some_and(|a| !a.starts_with('-')) {
            return Ok(None);
        }
        let (mut file, mut named, mut sets) = (PathBuf::from("configs/configs.json"), false, Vec::new());
        let mut it = worker_args.iter();
        while let Some(a) = it.next() {
            let value = |flag: &str, it: &mut std::slice::Iter<String>| match a.strip_prefix(&format!("{flag}=")) {
                Some(v) => Some(v.to_string()),
                None => (a == flag).then(|| it.next().cloned()).flatten(),
            };
            if let Some(v) = value("--args", &mut it) {
                (file, named) = (PathBuf::from(v), true);
            } else if let Some(v) = value("--set", &mut it) {
                sets.push(v);
            }
        }
        // the configs.json ones, as glm-worker splits them
        let (ds_sets, sets) = glm_common::ds::split_sets(&sets)?;
        let path = file.is_file().then_some(file.as_path());
        if path.is_none() && named {
            bail!("{}: no such file (--args)", file.display());
        }
        let args = glm_common::args::LoadedArgs::load(path, &sets)?.args;
        let ds = match flag_value(worker_args, "--config") {
            Some(c) if Path::new(&c).is_file() => Some(DsConfig::load_with(Path::new(&c), &ds_sets)?),
            _ => None,
        };
        Ok(Some(Job { args, ds }))
    }

    /// Whether the job trains (`train_iters = 0` only validates the configuration).
    pub fn trains(&self) -> bool {
        self.args.train_iters > 0
    }

    /// The save directory, when the job trains and saves.
    pub fn save(&self) -> Option<&Path> {
        self.args.save.as_deref().filter(|_| self.trains())
    }

    /// The free space a checkpoint needs in the save directory: fp32
    /// weights and two Adam moments (12 bytes a parameter, with some room)
    /// twice over, since the previous checkpoint stays until the new one is
    /// installed.
    pub fn disk(&self) -> Option<crate::preflight::Disk> {
        let dir = self.save()?.to_path_buf();
        let a = &self.args;
        let (h, l) = (a.hidden_size as u64, a.num_layers as u64);
        let params = 12 * l * h * h + (16_000 + 2 * a.max_position_embeddings as u64) * h;
        Some(crate::preflight::Disk { dir, need: 2 * 16 * params })
    }

    /// The batch sizes on `world` ranks (DeepSpeed's rule, as the worker
    /// applies it).
    pub fn batch(&self, world: usize) -> Result<Batch> {
        let dp = world / self.args.model_parallel_size.max(1);
        let ds = match &self.ds {
            Some(d) => d.clone(),
            None => DsConfig::from_value(Path::new("(no --config)"), &serde_json::json!({}))?,
        };
        Ok(ds.batch(dp, self.args.batch_size, self.args.gradient_accumulation_steps)?)
    }
}

/// The DeepSpeed keys `keep_batch` sets (a later shrink replaces them).
pub const BATCH_KEYS: [&str; 3] = ["ds.train_batch_size", "ds.train_micro_batch_size_per_gpu", "ds.gradient_accumulation_steps"];

/// The worker `--set`s that keep global batch `b` (taken on another world
/// size) on `world` ranks with tensor-parallel size `tp`: the same
/// micro-batch and more (or fewer) accumulation steps. An error lists the
/// world sizes that can keep it.
pub fn keep_batch(b: Batch, world: usize, tp: usize) -> Result<Vec<String>> {
    let dp = world / tp.max(1);
    if dp == 0 || world % tp.max(1) != 0 {
        bail!("{world} worker(s) cannot hold tensor-parallel size {tp}");
    }
    let per_step = b.micro * dp;
    if b.global % per_step != 0 {
        let fits: Vec<String> = (1..=b.global / b.micro).filter(|d| (b.global / b.micro) % d == 0).map(|d| (d * tp).to_string()).collect();
        bail!(
            "the global batch {} (micro-batch {} × accumulation {} × data-parallel {}) cannot be kept on {world} worker(s) (data-parallel {dp}): \
             train_batch_size must be a multiple of micro-batch × data-parallel; world sizes that keep it: {}",
            b.global,
            b.micro,
            b.accum,
            b.global / (b.micro * b.accum),
            fits.join(", ")
        );
    }
    Ok(BATCH_KEYS.iter().zip([b.global, b.micro, b.global / per_step]).map(|(k, v)| format!("{k}={v}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shrunk_world_keeps_the_global_batch_or_says_which_sizes_can() {
        let b = Batch { global: 16, micro: 4, accum: 1 };
        assert_eq!(keep_batch(b, 2, 1).unwrap(), ["ds.train_batch_size=16", "ds.train_micro_batch_size_per_gpu=4", "ds.gradient_accumulation_steps=2"]);
        assert_eq!(keep_batch(b, 4, 2).unwrap()[2], "ds.gradient_accumulation_steps=2");
        let e = keep_batch(b, 3, 1).unwrap_err().to_string();
        assert!(e.contains("cannot be kept on 3 worker(s)") && e.ends_with("world sizes that keep it: 1, 2, 4"), "{e}");
        assert!(keep_batch(b, 3, 2).unwrap_err().to_string().contains("cannot hold tensor-parallel size 2"));
    }

    #[test]
    fn flags_are_read_as_clap_reads_them() {
        let a: Vec<String> = "--config a.json --set x=1 --config=b.json".split(' ').map(String::from).collect();
        assert_eq!(flag_value(&a, "--config").as_deref(), Some("b.json"));
        assert_eq!(flag_value(&a, "--args"), None);
    }
}
