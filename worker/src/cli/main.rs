//! `glm-worker-core`: the real worker program. Users start it through the
//! `glm-worker` entry point, which finds libtorch first. This file parses
//! the command line and dispatches; each subcommand group lives in its own
//! file beside it.

mod bench;
mod checkpoint;
mod comm;
mod data;
mod env;
mod eval;
mod output;
mod profile;
mod rank;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use glm_worker::comm::mpi;
use glm_worker::runtime::report;

#[derive(Parser)]
#[command(
    name = "glm-worker",
    bin_name = "glm-worker",
    version,
    about = "GLM pretraining worker",
    long_about = "GLM pretraining worker.\n\nWithout a subcommand it trains: glm-worker --config <deepspeed.json> [--args configs.json] [--set key=value]...",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    train: train::TrainArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenize a corpus once into a memory-mapped token store
    Prepare(data::PrepareArgs),
    /// Build the default corpus (JSON array) from Debian's fortunes-zh
    MakeCorpus(data::MakeCorpusArgs),
    /// Print blank-infilling samples built from a token store, decoded
    Samples(data::SamplesArgs),
    /// Print libtorch and device facts
    Env(env::EnvArgs),
    /// Fill the blanks ([MASK], [sMASK], [gMASK]) of a text with a trained model
    Generate(eval::GenerateArgs),
    /// Loss, perplexity and masked-token accuracy of a checkpoint on held-out data, per mode (alone or under mpirun)
    Eval(eval::EvalArgs),
    /// Inspect a checkpoint, merge tensor-parallel parts and ZeRO shards into one, split one into parts, import or export the original's DeepSpeed checkpoints
    #[command(subcommand)]
    Checkpoint(checkpoint::CheckpointCmd),
    /// Time the training step on a synthetic batch (the benchmark of scripts/bench.sh)
    BenchStep(bench::BenchArgs),
    /// All-reduce bus bandwidth through the tensor collectives vs plain MPI_Allreduce (run under mpirun)
    BenchComm(comm::BenchCommArgs),
    /// Check every collective (values, element types, autograd regions) on CPU (MPI) or CUDA (NCCL) tensors, then time all-reduce; alone or under mpirun
    CommCheck(comm::CommCheckArgs),
}

fn main() -> ExitCode {
    // Behave like a Unix tool when the reader goes away (`| head`): exit
    // quietly instead of panicking on a failed print.
    // SAFETY: called first thing, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    report::install_panic_hook();
    let cli = Cli::parse();
    // A libtorch error anywhere (tch panics on them) ends as one line. The
    // commands that join an MPI world finalise it on success; after an error
    // the process exits without MPI_Finalize (other ranks may be inside a
    // collective and would never join it), which under mpirun aborts the job.
    let result = report::catch(|| {
        let done = |r: anyhow::Result<()>| r.map(|()| ExitCode::SUCCESS);
        let in_world = |r: anyhow::Result<()>| r.map(|()| mpi::finalize()).map(|()| ExitCode::SUCCESS);
        match cli.cmd {
            Some(Cmd::Prepare(a)) => done(data::prepare(a)),
            Some(Cmd::MakeCorpus(a)) => done(data::make_corpus(a)),
            Some(Cmd::Samples(a)) => done(data::samples(a)),
            Some(Cmd::Env(a)) => done(env::env(a)),
            Some(Cmd::Generate(a)) => done(eval::generate(a)),
            Some(Cmd::Eval(a)) => in_world(eval::eval(a)),
            Some(Cmd::Checkpoint(c)) => done(checkpoint::run(c)),
            Some(Cmd::BenchStep(a)) => done(bench::bench_step(a)),
            Some(Cmd::BenchComm(a)) => in_world(comm::bench_comm(a)),
            Some(Cmd::CommCheck(a)) => in_world(comm::comm_check(a)),
            None => train::train(cli.train),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("glm-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A clap parser of counts of at least `min`.
fn at_least(min: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(min..)
}
