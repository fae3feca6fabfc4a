//! `checkpoint merge | split | inspect | import | export`: one checkpoint
//! layout into another, what a checkpoint holds, and the original's
//! DeepSpeed checkpoints in and out.

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
    /// A checkpoint of the original (THUDM's GLM under DeepSpeed, <save>/<iteration>/mp_rank_XX_model_states.pt) -> this program's, to train from (load=) or evaluate; weights only
    Import {
        /// The DeepSpeed checkpoint: its save directory (latest_checkpointed_iteration.txt names the iteration), an iteration directory, or one mp_rank_XX_model_states.pt
        #[arg(long)]
        from: PathBuf,
        /// The save directory written (<out>/<iteration>/ and <out>/latest); must not exist
        #[arg(long)]
        out: PathBuf,
        /// The tokenizer the checkpoint was trained with, of tokenizer_type (vocab.txt, a SentencePiece .model, GPT-2's vocab.json, a tokenizer.json); default configs.json's tokenizer_path, else a tokenizer.json beside the weights
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// configs.json: the configuration recorded with the checkpoint (what the checkpoint's own args do not say; a model key must agree with them)
        #[arg(long = "args")]
        args_file: Option<PathBuf>,
        /// Override a key of configs.json (--set num_attention_heads=16)
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// A DeepSpeed JSON recorded with the checkpoint (the batch eval uses by default)
        #[arg(long)]
        config: Option<PathBuf>,
        /// The checkpoint's iteration (default: the file's, where the original resumes; 0 for a release checkpoint)
        #[arg(long)]
        iteration: Option<u64>,
    },
    /// This program's checkpoint (any layout) -> the original's: --format deepspeed writes <out>/<iteration>/mp_rank_XX_model_states.pt (fp32 weights under 'module') and <out>/latest_checkpointed_iteration.txt
    Export {
        /// Checkpoint directory, or a save dir (its latest)
        #[arg(long)]
        load: PathBuf,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// The directory written; must not exist
        #[arg(long)]
        out: PathBuf,
        /// Tensor-parallel files to write, split as the original's change_mp.py splits
        #[arg(long, default_value_t = 1)]
        tp: usize,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// THUDM's GLM under DeepSpeed (PyTorch files)
    Deepspeed,
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
        CheckpointCmd::Import { from, out, tokenizer, args_file, sets, config, iteration } => {
            use glm_worker::checkpoint::deepspeed::{import, ImportOptions};
            let o = ImportOptions { from, out: out.clone(), tokenizer, args_file, sets, ds_config: config, iteration };
            let done = import(&o)?;
            let s = &done.state;
            println!("checkpoint: imported into {} (iteration {})", done.dir.display(), s.iteration);
            for n in &done.notes {
                println!("  {n}");
            }
            let word = glm_common::text::shell_word(&out.display().to_string());
            let tok = glm_common::text::shell_word(&done.dir.join("tokenizer.json").display().to_string());
            let pad = done.divisible_by.map(|d| format!(" --set make_vocab_size_divisible_by={d}")).unwrap_or_default();
            println!(
                "checkpoint: no optimizer state: a run from it starts AdamW afresh at iteration {}; to train: --set load={word} --set tokenizer_path={tok}{pad} \
                 (its tokenizer; add --set no_load_lr_scheduler=true to restart the learning-rate schedule there); to evaluate: glm-worker eval --load {word}",
                s.iteration + 1
            );
        }
        CheckpointCmd::Export { load, format: ExportFormat::Deepspeed, out, tp } => {
            let done = glm_worker::checkpoint::deepspeed::export(&load, &out, tp)?;
            println!(
                "checkpoint: exported {} (iteration {}) in DeepSpeed's layout: {} file(s) {} .. (fp32 weights under 'module'), {}",
                done.from.display(),
                done.iteration,
                done.files.len(),
                done.files[0].display(),
                out.join(glm_worker::checkpoint::deepspeed::TRACKER).display()
            );
            println!(
                "checkpoint: the original loads it with model.load_state_dict(torch.load(file)['module']), or resumes from it with --load {} --no-load-optim --no-load-rng (no optimizer or random state in it)",
                glm_common::text::shell_word(&out.display().to_string())
            );
        }
    }
    Ok(())
}
