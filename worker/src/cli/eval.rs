//! Using a trained model: `eval` (held-out loss, perplexity and accuracy,
//! per mode) and `generate` (filling blanks).

use std::path::PathBuf;

use anyhow::Result;

use glm_worker::data::tokenizer::GlmTokenizer;

use crate::output::reports_here;
use crate::rank::{device, rank_device};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A whole-model checkpoint: <save> (its latest) or <save>/<iteration> (tensor-parallel parts: merge them first)
    #[arg(long)]
    load: PathBuf,
    /// Evaluate this corpus (file or folder) instead of the run's train_data (or its
    /// valid_data/test_data), split with the run's split
    #[arg(long)]
    data: Option<PathBuf>,
    /// valid or test: which held-out documents of the run's `split`
    #[arg(long, default_value = "valid")]
    split: String,
    /// Batches per mode (default: the run's eval_iters)
    #[arg(long)]
    iters: Option<u64>,
    /// Samples per batch (default: the run's eval_batch_size, else its micro-batch)
    #[arg(long)]
    batch_size: Option<usize>,
    /// Token store (default: the training store for the run's corpus, glm_pretrain/data/eval_store for --data);
    /// a run's valid_data/test_data are read from <store>-valid / <store>-test
    #[arg(long)]
    store: Option<PathBuf>,
    /// Replace the token store when it was built for another corpus or tokenizer (without it eval refuses: the store may be a training run's)
    #[arg(long)]
    rebuild: bool,
    /// cpu, cuda, or auto
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory, or a save directory (its `latest` is used)
    #[arg(long)]
    load: PathBuf,
    /// Text with blanks; without one, the model continues the text
    #[arg(long)]
    text: String,
    /// Tokens generated per blank at most
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    /// Sample among the k most likely tokens (0 and --top-p 0: greedy)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of tokens with this much probability
    #[arg(long, default_value_t = 0.0)]
    top_p: f64,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    #[arg(long, default_value_t = 1234)]
    seed: i64,
}

pub fn eval(a: EvalArgs) -> Result<()> {
    use glm_worker::comm::Communicator;
    use glm_worker::eval::{default_store, evaluate, EvalOptions, Split};
    glm_worker::train::trainer::install_signal_handlers(glm_worker::train::trainer::Phase::Evaluation);
    let split = Split::parse(&a.split).ok_or_else(|| anyhow::anyhow!("--split {}: expected valid or test", a.split))?;
    anyhow::ensure!(a.iters != Some(0), "--iters 0: must be positive");
    anyhow::ensure!(a.batch_size != Some(0), "--batch-size 0: must be positive");
    let world = glm_worker::comm::mpi::world()?;
    let dims = glm_worker::parallel::dims::ParallelDims::new(world.size(), world.rank(), 1)?;
    reports_here(dims.rank);
    let device = if dims.world > 1 { rank_device(&a.device, glm_worker::comm::mpi::local_rank(&world))? } else { device(&a.device)? };
    let par = glm_worker::parallel::Parallel::build(&world, dims, device)?;
    let store = a.store.clone().unwrap_or_else(|| default_store(a.data.as_deref()));
    let opts = EvalOptions { load: a.load.clone(), data: a.data.clone(), split, iters: a.iters, batch: a.batch_size, store, rebuild: a.rebuild, device };
    let e = evaluate(&opts, &par)?;
    println!(
        "eval: {} (iteration {}), {} split: {} documents, {} batch(es) of {} per mode{}",
        e.checkpoint.display(),
        e.iteration,
        a.split,
        e.documents,
        e.batches,
        e.batch,
        if dims.world > 1 { format!(", shared over {} ranks", dims.world) } else { String::new() }
    );
    let table = |results: &[glm_worker::eval::ModeResult]| {
        println!("{:<12} {:>10} {:>12} {:>10} {:>10}", "mode", "loss", "perplexity", "accuracy", "tokens");
        for r in results {
            println!("{:<12} {:>10.4} {:>12.2} {:>10.4} {:>10}", r.mode, r.loss, r.ppl, r.accuracy, r.tokens);
        }
    };
    if !e.corpora.is_empty() {
        println!("the mixture (each figure the weighted mean of its corpora's):");
    }
    table(&e.results);
    for c in &e.corpora {
        println!("{} ({:.1}% of the mixture; {} documents):", c.name, c.weight * 100.0, c.documents);
        table(&c.results);
    }
    println!("(token-weighted averages over the masked tokens; \"mixed\" draws the modes as training does)");
    Ok(())
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    use glm_worker::generate::{fill, Sampling};
    let device = device("auto")?;
    let (model, state, dir) = glm_worker::checkpoint::load_for_inference(&a.load, device, "generate")?;
    let tok = GlmTokenizer::load_saved(&dir.join("tokenizer.json"))?;
    let task_mask = state.args.get("task_mask").and_then(|v| v.as_bool()).unwrap_or(false);
    let gen_mask = if task_mask { tok.special.gmask } else { tok.special.mask };
    let s = Sampling { max_tokens: a.max_tokens, top_k: a.top_k, top_p: a.top_p, temperature: a.temperature, seed: a.seed };
    let out = fill(&model, &tok, &a.text, gen_mask, &s)?;
    println!("checkpoint: {} (iteration {})", dir.display(), state.iteration);
    for (i, b) in out.blanks.iter().enumerate() {
        println!("blank {i}: {b}");
    }
    println!("{}", out.text);
    Ok(())
}
