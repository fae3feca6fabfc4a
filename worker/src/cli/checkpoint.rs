//! `checkpoint merge | split | inspect`: one checkpoint layout into another,
//! and what a checkpoint holds.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Any layout (tensor-parallel parts, ZeRO shards) -> one whole-model checkpoint
    Merge {
        /// Checkpoint directory, or a save dir (its latest)
        #[arg(long)]
        load: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also merge the optimizer state (AdamW moments by parameter name)
        #[arg(long)]
        with_optimizer: bool,
    },
    /// Print what a checkpoint holds: layout, iteration, files, tensors, checksums, completeness
    Inspect {
        /// Checkpoint directory, or a save dir (its latest)
        dir: PathBuf,
        /// Also list every tensor (name, dtype, shape, bytes)
        #[arg(long)]
        tensors: bool,
    },
    /// One whole-model checkpoint -> <out>/mp_rank_XX/ parts for --tp ranks (weights only); prints the --set a run on them needs
    Split {
        #[arg(long)]
        load: PathBuf,
        #[arg(long)]
        tp: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(cmd: CheckpointCmd) -> Result<()> {
    match cmd {
        CheckpointCmd::Merge { load, out, with_optimizer } => {
            let dir = glm_worker::checkpoint::resolve(&load)?;
            let (n, state) = glm_worker::checkpoint::merge(&dir, &out, with_optimizer)?;
            let zero = state.dp.max(1);
            println!(
                "checkpoint: merged {} (iteration {}, {n} tensor-parallel part(s), data-parallel {zero}) into {}: fp32 weights{}",
                dir.display(),
                state.iteration,
                out.display(),
                if with_optimizer { " and the whole optimizer state" } else { " only" }
            );
        }
        CheckpointCmd::Inspect { dir, tensors } => {
            let (lines, complete) = glm_worker::checkpoint::inspect(&dir, tensors)?;
            for l in lines {
                println!("{l}");
            }
            anyhow::ensure!(complete, "{}: the checkpoint is incomplete or damaged (see above)", dir.display());
        }
        CheckpointCmd::Split { load, tp, out } => {
            let dir = glm_worker::checkpoint::resolve(&load)?;
            let state = glm_worker::checkpoint::split(&dir, tp, &out)?;
            println!("checkpoint: split {} into {tp} tensor-parallel parts under {}", dir.display(), out.display());
            // what a run on these parts sets: the layout, and the vocabulary
            // padding a run on tp ranks would otherwise choose differently
            let tok = glm_worker::data::tokenizer::GlmTokenizer::load_saved(&dir.join("tokenizer.json"))?;
            let divisible_by = state.args.get("make_vocab_size_divisible_by").and_then(|v| v.as_u64()).unwrap_or(128) as usize;
            let pad = glm_worker::data::tokenizer::divisible_by_for(tok.vocab_size(), state.model.vocab_size, divisible_by, tp)
                .map(|d| format!(" --set make_vocab_size_divisible_by={d}"))
                .unwrap_or_default();
            println!(
                "checkpoint: to train on them: --set model_parallel_size={tp} --set load={}{pad} (on a multiple of {tp} ranks)",
                glm_common::text::shell_word(&out.display().to_string())
            );
        }
    }
    Ok(())
}
