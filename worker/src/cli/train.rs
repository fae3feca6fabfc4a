//! Training: `glm-worker --config <deepspeed.json> [--args configs.json]
//! [--set key=value]...`, alone or as one rank of an MPI world.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;

use glm_worker::data::prepare::PrepareOptions;

use crate::output::reports_here;
use crate::rank::rank_device;

#[derive(clap::Args)]
pub struct TrainArgs {
    /// DeepSpeed JSON config (batch sizes, optimizer, clipping, precision, scheduler)
    #[arg(long)]
    config: Option<PathBuf>,
    /// The original's configs.json (model, data and training arguments)
    #[arg(long = "args", default_value = "configs/configs.json")]
    args_file: PathBuf,
    /// Override a key of configs.json (--set train_iters=200 --set save=/tmp/run)
    /// or of the DeepSpeed JSON: a dotted path (--set bf16.enabled=true), a
    /// top-level key configs.json does not have (--set train_micro_batch_size_per_gpu=4),
    /// or any key prefixed with ds. (--set ds.gradient_accumulation_steps=4)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Token store directory (built or refreshed from train_data as needed)
    #[arg(long, default_value = "glm_pretrain/data/store")]
    store: PathBuf,
    /// Where a tokenizer trained on the corpus is cached (when tokenizer_path is unset)
    #[arg(long, default_value = "glm_pretrain/model")]
    tokenizer_cache: PathBuf,
    /// Vocabulary size of a tokenizer trained on the corpus
    #[arg(long, default_value_t = 16000)]
    vocab_size: usize,
    /// cpu, cuda, or auto (cuda when available)
    #[arg(long, default_value = "auto")]
    device: String,
    /// List every configuration key that has no effect here (by default: their count)
    #[arg(long)]
    show_ignored: bool,
    /// Seconds a rank may wait inside one collective before it stops the job, naming the operation (default: configs.json's collective_timeout, 600)
    #[arg(long, value_name = "SECS", value_parser = glm_common::launch::positive_seconds)]
    collective_timeout: Option<f64>,
}

/// Trains, then finalises MPI on success. After an error the process exits
/// without MPI_Finalize (other ranks may be inside a collective and would
/// never join it); under mpirun that aborts the whole job, as it should.
pub fn train(t: TrainArgs) -> Result<ExitCode> {
    let code = train_run(t)?;
    glm_worker::comm::mpi::finalize();
    Ok(code)
}

fn train_run(t: TrainArgs) -> Result<ExitCode> {
    use glm_worker::comm::Communicator;
    use glm_worker::config::{args::LoadedArgs, ds::DsConfig, run::RunConfig};
    use glm_worker::parallel::dims::ParallelDims;
    use glm_worker::train::trainer::{install_signal_handlers, Outcome, Phase, TrainOptions, Trainer};
    // a signal before the training loop stops at once, during it after an iteration
    install_signal_handlers(Phase::BeforeTraining);
    let Some(ds_path) = &t.config else {
        anyhow::bail!(
            "--config <deepspeed.json> is required to train (see --help; e.g. --config configs/config_block_tiny.json --args configs/configs_tiny.json)"
        );
    };
    // dotted (or ds.-prefixed) keys and DeepSpeed's own top-level keys
    // address the DeepSpeed JSON, the others configs.json
    let (overrides, arg_sets) = glm_worker::config::ds::split_sets(&t.sets)?;
    let ds = DsConfig::load_with(ds_path, &overrides)?;
    let args_path = t.args_file.exists().then_some(t.args_file.as_path());
    if args_path.is_none() && t.args_file != Path::new("configs/configs.json") {
        anyhow::bail!("{}: no such file (--args)", t.args_file.display());
    }
    let args = LoadedArgs::load(args_path, &arg_sets)?;
    // The MPI world: under mpirun/srun the launched ranks, alone a world of one.
    let world = glm_worker::comm::mpi::world()?;
    let dims = ParallelDims::new(world.size(), world.rank(), args.args.model_parallel_size)?;
    reports_here(dims.rank);
    // every collective's deadline (a world of one waits for nobody), and the
    // heartbeat glm-launch asks for
    let timeout = t.collective_timeout.unwrap_or(args.args.collective_timeout);
    let timeout_source = match (t.collective_timeout, args.source("collective_timeout")) {
        (Some(_), _) => "--collective-timeout".to_string(),
        (None, s) => s.to_string(),
    };
    glm_worker::runtime::progress::start((dims.world > 1).then(|| std::time::Duration::from_secs_f64(timeout)));
    let cfg = RunConfig::build(ds, args, dims.dp)?;
    println!("effective configuration (value  (source)):");
    for line in cfg.describe(t.show_ignored) {
        println!("{line}");
    }
    for n in &cfg.notes {
        println!("note: {n}");
    }
    for w in &cfg.warnings {
        println!("warning: {w}");
    }
    if dims.world == 1 && timeout_source != "default" {
        println!("note: collective timeout {timeout} s ({timeout_source}) has no effect in a world of one (no collective waits for another rank)");
    }
    // everything a training start checks, before "configuration is valid"
    let local_rank = glm_worker::comm::mpi::local_rank(&world);
    let device = rank_device(&t.device, local_rank)?;
    {
        let a = &cfg.args.args;
        dims.check_model(a.hidden_size, a.num_attention_heads, a.intermediate_size.unwrap_or(4 * a.hidden_size))?;
    }
    if device == tch::Device::Cpu {
        // a given tokenizer's size is not known yet: its embedding is left out (the check errs towards running)
        let vocab = if cfg.args.args.tokenizer_path.is_some() { 0 } else { t.vocab_size };
        glm_worker::train::trainer::check_memory(&cfg, dims, world.local().size(), vocab)?;
    }
    let a = &cfg.args.args;
    if a.train_iters == 0 {
        for d in cfg.train_data.roots() {
            if !d.exists() {
                println!("note: train_data {} does not exist yet (training needs it; {})", d.display(), glm_worker::config::run::missing_corpus_hint(d));
            }
        }
        if let Some(p) = a.tokenizer_path.as_ref().filter(|p| !p.exists()) {
            println!("note: tokenizer_path {} does not exist (training needs it, or --set tokenizer_path=null to train one)", p.display());
        }
        println!("train_iters = 0: configuration is valid; nothing to train");
        return Ok(ExitCode::SUCCESS);
    }
    glm_worker::runtime::progress::set_phase(glm_worker::runtime::progress::Phase::Connecting);
    let par = glm_worker::parallel::Parallel::build(&world, dims, device)?;
    if dims.world > 1 {
        use glm_worker::comm::staged::Backend;
        let backend = match (Backend::from_env()?, device.is_cuda()) {
            (Backend::HostStaged, _) => "every collective through host memory over MPI: GLM_COMM_BACKEND=host-staged",
            (Backend::Native, true) => "NCCL for CUDA tensors, MPI for host values",
            (Backend::Native, false) => "MPI",
        };
        println!(
            "parallel: world {} = tensor-parallel {} × data-parallel {} ({backend}); rank 0 reports; a collective waits at most {timeout} s ({timeout_source})",
            dims.world, dims.tp, dims.dp
        );
    }
    let opts = TrainOptions {
        store: t.store.clone(),
        prepare: PrepareOptions {
            vocab_size: t.vocab_size,
            tokenizer_cache: t.tokenizer_cache.clone(),
            show_progress: glm_worker::comm::mpi::live_terminal(&std::io::stderr()),
            ..PrepareOptions::default()
        },
        device,
    };
    let mut trainer = Trainer::new(cfg, opts, par)?;
    let t0 = std::time::Instant::now();
    let outcome = trainer.run()?;
    let secs = t0.elapsed().as_secs_f64();
    match outcome {
        Outcome::Finished { iteration } => {
            println!("train: finished at iteration {iteration} in {secs:.1} s");
            if let Some(d) = trainer.metrics_dir() {
                println!("train: metrics in {}, curve in {}", d.join("metrics.jsonl").display(), d.join("loss.png").display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Interrupted { iteration, signal: sig } => {
            println!("train: stopped by signal {sig} after iteration {iteration}{}", if trainer.metrics_dir().is_some() { " (checkpoint saved)" } else { "" });
            Ok(ExitCode::from((128 + sig).clamp(0, 255) as u8))
        }
    }
}
