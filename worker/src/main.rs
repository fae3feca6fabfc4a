//! `glm-worker-core`: the real worker program. Users start it through the
//! `glm-worker` entry point, which finds libtorch first.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use glm_worker::data::blocklm::{BlockConfig, BlockSampler, Mode};
use glm_worker::data::corpus::{corpus_files, CorpusOptions};
use glm_worker::data::prepare::{ensure_store, obtain_tokenizer, PrepareOptions, StoreOutcome};
use glm_worker::data::store::{self, split_documents, TokenStore};
use glm_worker::data::tokenizer::{padded_vocab_size, GlmTokenizer};
use glm_worker::data::fortunes;

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
    train: TrainArgs,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// DeepSpeed JSON config (batch sizes, optimizer, clipping, precision, scheduler)
    #[arg(long)]
    config: Option<PathBuf>,
    /// The original's configs.json (model, data and training arguments)
    #[arg(long = "args", default_value = "configs/configs.json")]
    args_file: PathBuf,
    /// Override a key of configs.json (--set train_iters=200 --set save=/tmp/run)
    /// or, as a dotted path, of the DeepSpeed JSON (--set bf16.enabled=true)
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
}

#[derive(Subcommand)]
enum Cmd {
    /// Tokenize a corpus once into a memory-mapped token store
    Prepare(PrepareArgs),
    /// Build the default corpus (JSON array) from Debian's fortunes-zh
    MakeCorpus {
        /// Folder holding the fortune files chinese, tang300 and song100
        #[arg(long, default_value = fortunes::DEFAULT_SOURCE_DIR)]
        src: PathBuf,
        /// Output JSON file
        #[arg(long, default_value = "glm_pretrain/data/data.json")]
        out: PathBuf,
    },
    /// Print blank-infilling samples built from a token store, decoded
    Samples(SamplesArgs),
    /// Print libtorch and device facts
    Env {
        /// Also print the free disk space under this directory (its nearest existing ancestor)
        #[arg(long, value_name = "DIR")]
        disk: Option<PathBuf>,
    },
    /// Fill the blanks ([MASK], [sMASK], [gMASK]) of a text with a trained model
    Generate(GenerateArgs),
    /// Loss, perplexity and masked-token accuracy of a checkpoint on held-out data, per mode (alone or under mpirun)
    Eval(EvalArgs),
    /// Merge tensor-parallel checkpoint parts into one, or split one into parts
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Time the training step on a synthetic batch (the benchmark of scripts/bench.sh)
    BenchStep(BenchArgs),
    /// All-reduce bus bandwidth through the tensor collectives vs plain MPI_Allreduce (run under mpirun)
    BenchComm {
        /// Message sizes in MiB
        #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least(1))]
        mib: Vec<usize>,
        #[arg(long, default_value_t = 10, value_parser = at_least(1))]
        iters: usize,
    },
    /// Check every collective (values, element types, autograd regions) on CPU (MPI) or CUDA (NCCL) tensors, then time all-reduce; alone or under mpirun
    CommCheck {
        /// cpu, cuda, or auto (CUDA tensors go through NCCL)
        #[arg(long, default_value = "auto")]
        device: String,
        /// All-reduce sizes to time, in MiB
        #[arg(long, value_delimiter = ',', default_value = "1,16,64", value_parser = at_least(1))]
        mib: Vec<usize>,
        #[arg(long, default_value_t = 10, value_parser = at_least(1))]
        iters: usize,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A whole-model checkpoint: <save> (its latest) or <save>/<iteration> (tensor-parallel parts: merge them first)
    #[arg(long)]
    load: PathBuf,
    /// Evaluate this corpus (file or folder) instead of the run's train_data, split the same way
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
    /// Token store (default: the training store for the run's corpus, glm_pretrain/data/eval_store for --data)
    #[arg(long)]
    store: Option<PathBuf>,
    /// cpu, cuda, or auto
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Intra-op threads
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    threads: i32,
    /// Timed steps
    #[arg(long, default_value_t = 20, value_parser = at_least(1))]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    layers: usize,
    #[arg(long, default_value_t = 256, value_parser = at_least(1))]
    hidden: usize,
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    heads: usize,
    /// Sequence length (Part A is its first half, Part B its second)
    #[arg(long, default_value_t = 256, value_parser = at_least(2))]
    seq: usize,
    #[arg(long, default_value_t = 8, value_parser = at_least(1))]
    batch: usize,
    /// Vocabulary size (token ids are drawn from 10 up)
    #[arg(long, default_value_t = 16000, value_parser = at_least(16))]
    vocab: usize,
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    /// cpu, cuda, or auto
    #[arg(long, default_value = "cpu")]
    device: String,
    /// fp32, bf16 or fp16 (fp16: dynamic loss scaling)
    #[arg(long, default_value = "fp32")]
    precision: String,
    /// Recompute every layer in backward (activation checkpointing)
    #[arg(long)]
    checkpoint_activations: bool,
    /// ZeRO stage (0, 1, 2) over the data-parallel ranks (run under mpirun: one batch per rank)
    #[arg(long, default_value_t = 0)]
    zero_stage: u8,
    /// ZeRO's reduce_bucket_size (elements)
    #[arg(long, default_value_t = 500_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    reduce_bucket_size: i64,
    /// ZeRO's allgather_bucket_size (elements)
    #[arg(long, default_value_t = 500_000_000, value_parser = clap::value_parser!(i64).range(1..))]
    allgather_bucket_size: i64,
}

#[derive(Subcommand)]
enum CheckpointCmd {
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
    /// One whole-model checkpoint -> <out>/mp_rank_XX/ parts for --tp ranks (weights only)
    Split {
        #[arg(long)]
        load: PathBuf,
        #[arg(long)]
        tp: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
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

#[derive(clap::Args)]
struct PrepareArgs {
    /// Corpus file or folder (.json array, .jsonl, or text)
    #[arg(long)]
    data: PathBuf,
    /// BERT vocab.txt or tokenizer.json; omitted: train a WordPiece tokenizer on the corpus
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Output directory of the token store
    #[arg(long)]
    out: PathBuf,
    /// Key of the text in JSON Lines records
    #[arg(long, default_value = "text")]
    text_key: String,
    /// Count and skip malformed records instead of stopping at the first
    #[arg(long)]
    skip_malformed: bool,
    /// Vocabulary size when training a tokenizer
    #[arg(long, default_value_t = 16000)]
    vocab_size: usize,
    /// Where trained tokenizers are cached
    #[arg(long, default_value = "glm_pretrain/model")]
    tokenizer_cache: PathBuf,
    /// At most this many MB of text are used to train a tokenizer
    #[arg(long, default_value_t = 512)]
    tokenizer_train_mb: usize,
    /// Rebuild the store even when it is up to date
    #[arg(long)]
    force: bool,
    /// Train/valid/test weights to report the split with (as in configs.json)
    #[arg(long, default_value = "949,50,1")]
    split: String,
    /// Seed of the split shuffle
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// make_vocab_size_divisible_by, to report the model's padded vocabulary
    #[arg(long, default_value_t = 128)]
    make_vocab_size_divisible_by: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Span,
    Sentence,
    Generation,
}

#[derive(clap::Args)]
struct SamplesArgs {
    /// Token store directory (from `prepare`)
    #[arg(long)]
    store: PathBuf,
    #[arg(long, default_value_t = 3)]
    count: u64,
    #[arg(long, default_value_t = 128)]
    seq_length: usize,
    #[arg(long, value_enum, default_value = "span")]
    mode: ModeArg,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Use [sMASK]/[gMASK] for sentence/generation blanks
    #[arg(long)]
    task_mask: bool,
    /// Print statistics (masked fraction, span lengths, build rate) instead of samples
    #[arg(long)]
    summary: bool,
    /// Print each sample as one JSON line: token ids, targets, loss mask, positions
    #[arg(long)]
    json: bool,
    /// Build samples with a run's masking settings: its configs.json (seq_length, seed,
    /// bert_prob/gap_sentence_prob and ratios, avg_block_length, task_mask, ...), over
    /// --seq-length/--seed/--task-mask
    #[arg(long = "args")]
    args_file: Option<PathBuf>,
    /// With --args: override a key of it (as in training)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

fn main() -> ExitCode {
    // Behave like a Unix tool when the reader goes away (`| head`): exit
    // quietly instead of panicking on a failed print.
    // SAFETY: called first thing, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    glm_worker::runtime::install_panic_hook();
    let cli = Cli::parse();
    // a libtorch error anywhere (tch panics on them) ends as one line
    let result = glm_worker::runtime::catch(|| match cli.cmd {
        Some(Cmd::Prepare(a)) => prepare(a),
        Some(Cmd::MakeCorpus { src, out }) => make_corpus(&src, &out),
        Some(Cmd::Samples(a)) => samples(a),
        Some(Cmd::Env { disk }) => {
            glm_worker::runtime::load_cuda();
            for (k, v) in glm_worker::runtime::describe() {
                println!("{k:>18}: {v}");
            }
            if let Some(dir) = disk {
                match glm_worker::runtime::free_disk(&dir) {
                    Some((bytes, at)) => println!("{:>18}: {bytes} {}", "free disk", at.display()),
                    None => println!("{:>18}: ? {}", "free disk", dir.display()),
                }
            }
            Ok(())
        }
        Some(Cmd::Generate(a)) => generate(a),
        Some(Cmd::Eval(a)) => eval(a).map(|_| glm_worker::comm::mpi::finalize()),
        Some(Cmd::BenchStep(a)) => bench_step(a),
        Some(Cmd::Checkpoint(CheckpointCmd::Merge { load, out, with_optimizer })) => (|| {
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
            Ok(())
        })(),
        Some(Cmd::Checkpoint(CheckpointCmd::Inspect { dir, tensors })) => (|| {
            let (lines, complete) = glm_worker::checkpoint::inspect(&dir, tensors)?;
            for l in lines {
                println!("{l}");
            }
            anyhow::ensure!(complete, "{}: the checkpoint is incomplete or damaged (see above)", dir.display());
            Ok(())
        })(),
        Some(Cmd::Checkpoint(CheckpointCmd::Split { load, tp, out })) => (|| {
            let dir = glm_worker::checkpoint::resolve(&load)?;
            glm_worker::checkpoint::split(&dir, tp, &out)?;
            println!("checkpoint: split {} into {tp} tensor-parallel parts under {}", dir.display(), out.display());
            Ok(())
        })(),
        Some(Cmd::BenchComm { mib, iters }) => bench_comm(&mib, iters).map(|_| glm_worker::comm::mpi::finalize()),
        Some(Cmd::CommCheck { device, mib, iters }) => comm_check(&device, &mib, iters).map(|_| glm_worker::comm::mpi::finalize()),
        None => return train(cli.train),
    }
    .map(|()| ExitCode::SUCCESS));
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

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn make_corpus(src: &Path, out: &Path) -> Result<()> {
    let counts = fortunes::build_corpus(src, out)?;
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let detail: Vec<String> = counts.iter().map(|(f, n)| format!("{f} {n}")).collect();
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!("make-corpus: {} records ({}) -> {} ({:.2} MB)", total, detail.join(", "), out.display(), mb(size));
    Ok(())
}

fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    if !glm_worker::comm::mpi::live_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

fn prepare(a: PrepareArgs) -> Result<()> {
    glm_worker::train::trainer::install_signal_handlers(glm_worker::train::trainer::Phase::Preparation);
    // Check every argument before doing work, so a typo costs nothing.
    let weights = store::parse_split(&a.split)?;
    let files = corpus_files(&a.data)?;
    let opts = PrepareOptions {
        corpus: CorpusOptions { text_key: a.text_key.clone(), skip_malformed: a.skip_malformed },
        vocab_size: a.vocab_size,
        tokenizer_cache: a.tokenizer_cache.clone(),
        tokenizer_train_bytes: a.tokenizer_train_mb << 20,
        force: a.force,
        show_progress: glm_worker::comm::mpi::live_terminal(&std::io::stderr()),
        ..PrepareOptions::default()
    };
    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    println!("prepare: corpus {} ({} file{}, {:.2} MB)", a.data.display(), files.len(), if files.len() == 1 { "" } else { "s" }, mb(total_bytes));
    let (tok, origin) = obtain_tokenizer(&files, a.tokenizer.as_deref(), &a.out, &opts)?;
    println!(
        "prepare: tokenizer {origin}: {} ids, padded to {} (make_vocab_size_divisible_by={}), sha256 {}",
        tok.vocab_size(),
        padded_vocab_size(tok.vocab_size(), a.make_vocab_size_divisible_by, 1),
        a.make_vocab_size_divisible_by,
        &tok.sha256[..16]
    );
    let pb = progress_bar(total_bytes, "tokenizing");
    let (meta, outcome) = ensure_store(&files, &tok, &a.out, &opts, &|done| pb.set_position(done))?;
    pb.finish_and_clear();
    match outcome {
        StoreOutcome::Reused => println!("prepare: store {} is up to date (same corpus and tokenizer); reusing it", a.out.display()),
        StoreOutcome::Built { report, reason } => {
            if let Some(why) = reason {
                println!("prepare: rebuilt {}: {why}", a.out.display());
            }
            println!(
                "prepare: {} documents ({} empty, {} skipped, {} without tokens), {} tokens ({:.1} per document{})",
                meta.documents,
                report.stats.empty,
                report.stats.skipped,
                report.documents_without_tokens,
                meta.tokens,
                meta.tokens as f64 / meta.documents as f64,
                meta.unknown_share().map(|u| format!(", {:.2}% [UNK]", u * 100.0)).unwrap_or_default()
            );
            println!(
                "prepare: tokenized {:.2} MB of text in {:.2} s = {:.2} MB/s, {:.0} tokens/s",
                mb(meta.text_bytes),
                report.seconds,
                mb(meta.text_bytes) / report.seconds,
                meta.tokens as f64 / report.seconds
            );
        }
    }
    if let Some(w) = meta.unknown_warning() {
        println!("warning: {w}");
    }
    let splits = split_documents(meta.documents as usize, &weights, a.seed);
    let names = ["train", "valid", "test"];
    let parts: Vec<String> = splits.iter().zip(names).map(|(s, n)| format!("{n} {}", s.len())).collect();
    println!("prepare: split {} (seed {}): {} documents", a.split, a.seed, parts.join(", "));
    println!("prepare: store {} ({} ids of {} bytes, {} documents)", a.out.display(), meta.tokens, meta.bytes_per_token, meta.documents);
    Ok(())
}

fn samples(a: SamplesArgs) -> Result<()> {
    let st = Arc::new(TokenStore::open(&a.store)?);
    let tok = GlmTokenizer::load(&a.store.join("tokenizer.json"))?;
    anyhow::ensure!(
        tok.sha256 == st.meta.tokenizer_sha256,
        "{}: tokenizer.json does not match meta.json (rebuild the store)",
        a.store.display()
    );
    let cfg = match &a.args_file {
        Some(p) => {
            let loaded = glm_worker::config::args::LoadedArgs::load(Some(p), &a.sets)?;
            let c = glm_worker::config::run::block_config(&loaded.args);
            c.validate().map_err(|e| anyhow::anyhow!("{}: {e} (blank-infilling settings)", p.display()))?;
            c
        }
        None => {
            anyhow::ensure!(a.sets.is_empty(), "--set needs --args (the configs.json it overrides)");
            BlockConfig { seq_length: a.seq_length, seed: a.seed, task_mask: a.task_mask, ..BlockConfig::default() }
        }
    };
    let docs = (0..st.num_docs() as u32).collect();
    let sm = BlockSampler::new(st, docs, cfg, tok.sentence_end_table().to_vec())?;
    let mode = match a.mode {
        ModeArg::Span => Mode::Span,
        ModeArg::Sentence => Mode::Sentence,
        ModeArg::Generation => Mode::Generation,
    };
    if a.summary {
        return summarize(&sm, mode, a.count, &tok);
    }
    for i in 0..a.count {
        let s = sm.sample(i, mode);
        if a.json {
            let n = s.len;
            let v = serde_json::json!({
                "index": i, "mode": format!("{mode:?}").to_lowercase(), "suffix": s.suffix, "sep": s.sep, "len": n,
                "tokens": &s.tokens[..n], "targets": &s.targets[..n], "loss_mask": &s.loss_mask[..n],
                "position_ids": &s.position_ids[..n], "block_position_ids": &s.block_position_ids[..n],
            });
            println!("{v}");
            continue;
        }
        println!("sample {i} ({mode:?}{}): {} tokens, sep {}", if s.suffix { ", suffix" } else { "" }, s.len, s.sep);
        println!("  Part A: {}", tok.decode(&s.tokens[..s.sep], false));
        let mut j = s.sep;
        while j < s.len {
            let start = j;
            j += 1;
            while j < s.len && s.tokens[j] != tok.special.sop {
                j += 1;
            }
            println!("  Part B @{}: {}", s.position_ids[start], tok.decode(&s.targets[start..j], false));
        }
    }
    Ok(())
}

/// Builds `count` samples and reports what a user checks a masking setup by.
fn summarize(sm: &BlockSampler, mode: Mode, count: u64, tok: &GlmTokenizer) -> Result<()> {
    let t0 = std::time::Instant::now();
    let (mut used, mut loss, mut blocks, mut suffix) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..count {
        let s = sm.sample(i, mode);
        used += s.len;
        loss += s.loss_mask.iter().map(|&m| m as usize).sum::<usize>();
        blocks += s.tokens[s.sep..s.len].iter().filter(|&&t| t == tok.special.sop).count();
        suffix += usize::from(s.suffix);
    }
    let secs = t0.elapsed().as_secs_f64();
    let seq = sm.config().seq_length;
    let n = count.max(1) as f64;
    println!("samples: {count} {mode:?} samples of seq_length {seq} in {secs:.3} s = {:.0} samples/s ({:.2} M tokens/s)", n / secs, n * seq as f64 / secs / 1e6);
    println!("samples: {:.1}% of positions used (rest padding), {:.1} Part B blocks per sample, {:.1} loss tokens per sample", 100.0 * used as f64 / (n * seq as f64), blocks as f64 / n, loss as f64 / n);
    if mode == Mode::Span && blocks > 0 {
        // a span of k tokens gives k + 1 loss tokens (the span and <|endofpiece|>)
        let masked = loss - blocks;
        println!(
            "samples: mean span length {:.2} (distribution mean {:.2}), {:.1}% of Part A+B tokens masked",
            masked as f64 / blocks as f64,
            sm.config().mean_span_length(),
            100.0 * masked as f64 / (used - 2 * blocks) as f64
        );
    }
    if mode == Mode::Generation {
        println!("samples: {:.1}% prefix/suffix form, the rest one blank in the middle", 100.0 * suffix as f64 / n);
    }
    Ok(())
}

/// The device of a rank with this local rank: `cuda:<local rank>` on CUDA.
fn rank_device(choice: &str, local_rank: usize) -> Result<tch::Device> {
    match device(choice)? {
        tch::Device::Cuda(_) => {
            let n = tch::Cuda::device_count() as usize;
            // Slurm binding one GPU to each task (--gpus-per-task,
            // --gpu-bind) leaves it exactly one device, whatever its local rank
            let one = std::env::var("CUDA_VISIBLE_DEVICES").is_ok_and(|v| !v.is_empty() && !v.contains(','));
            let slurm_gpus = std::env::var_os("SLURM_STEP_GPUS").is_some() || std::env::var_os("SLURM_JOB_GPUS").is_some();
            if n == 1 && one && slurm_gpus {
                return Ok(tch::Device::Cuda(0));
            }
            anyhow::ensure!(local_rank < n, "local rank {local_rank} needs cuda:{local_rank}, but this node shows {n} CUDA device(s); start at most {n} ranks per node (CUDA_VISIBLE_DEVICES)");
            Ok(tch::Device::Cuda(local_rank))
        }
        d => Ok(d),
    }
}

fn device(choice: &str) -> Result<tch::Device> {
    glm_worker::runtime::load_cuda();
    match choice {
        "cpu" => Ok(tch::Device::Cpu),
        "cuda" => {
            anyhow::ensure!(tch::Cuda::is_available(), "--device cuda: CUDA is not available (no GPU, driver, or libtorch_cuda)");
            Ok(tch::Device::Cuda(0))
        }
        "auto" => Ok(tch::Device::cuda_if_available()),
        other => anyhow::bail!("--device {other}: expected cpu, cuda or auto"),
    }
}

/// Trains, then finalises MPI on success. After an error the process exits
/// without MPI_Finalize (other ranks may be inside a collective and would
/// never join it); under mpirun that aborts the whole job, as it should.
fn train(t: TrainArgs) -> Result<ExitCode> {
    let code = train_run(t)?;
    glm_worker::comm::mpi::finalize();
    Ok(code)
}

fn train_run(t: TrainArgs) -> Result<ExitCode> {
    use glm_worker::config::{args::LoadedArgs, ds::DsConfig, run::RunConfig};
    use glm_worker::comm::Communicator;
    use glm_worker::parallel::dims::ParallelDims;
    use glm_worker::train::trainer::{install_signal_handlers, Outcome, Phase, TrainOptions, Trainer};
    // a signal before the training loop stops at once, during it after an iteration
    install_signal_handlers(Phase::BeforeTraining);
    let Some(ds_path) = &t.config else {
        anyhow::bail!("--config <deepspeed.json> is required to train (see --help; e.g. --config configs/config_block_tiny.json --args configs/configs_tiny.json)");
    };
    // dotted keys address the DeepSpeed JSON, plain ones configs.json
    let (ds_sets, arg_sets): (Vec<String>, Vec<String>) = t.sets.iter().cloned().partition(|s| s.split_once('=').is_some_and(|(k, _)| k.contains('.')));
    let overrides: Vec<(String, serde_json::Value)> = ds_sets
        .iter()
        .map(|s| {
            let (k, v) = s.split_once('=').expect("partitioned on '='");
            (k.trim().to_string(), serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string())))
        })
        .collect();
    let ds = DsConfig::load_with(ds_path, &overrides)?;
    let args_path = t.args_file.exists().then_some(t.args_file.as_path());
    if args_path.is_none() && t.args_file != Path::new("configs/configs.json") {
        anyhow::bail!("{}: no such file (--args)", t.args_file.display());
    }
    let args = LoadedArgs::load(args_path, &arg_sets)?;
    // The MPI world: under mpirun/srun the launched ranks, alone a world of one.
    let world = glm_worker::comm::mpi::world()?;
    let dims = ParallelDims::new(world.size(), world.rank(), args.args.model_parallel_size)?;
    if dims.rank != 0 && std::env::var_os(glm_common::launch::ALL_RANKS_OUTPUT).is_none() {
        quiet_stdout(); // rank 0 reports; every rank's errors still reach stderr
    }
    let cfg = RunConfig::build(ds, args, dims.dp)?;
    println!("effective configuration (value  (source)):");
    for line in cfg.describe(t.show_ignored) {
        println!("{line}");
    }
    for w in &cfg.warnings {
        println!("warning: {w}");
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
        for d in &cfg.train_data {
            if !d.exists() {
                println!("note: train_data {} does not exist yet (training needs it; scripts/setup.sh builds the default corpus)", d.display());
            }
        }
        if let Some(p) = a.tokenizer_path.as_ref().filter(|p| !p.exists()) {
            println!("note: tokenizer_path {} does not exist (training needs it, or --set tokenizer_path=null to train one)", p.display());
        }
        println!("train_iters = 0: configuration is valid; nothing to train");
        return Ok(ExitCode::SUCCESS);
    }
    let par = glm_worker::parallel::Parallel::build(&world, dims, device)?;
    if dims.world > 1 {
        let backend = if device.is_cuda() { "NCCL for CUDA tensors, MPI for host values" } else { "MPI" };
        println!("parallel: world {} = tensor-parallel {} × data-parallel {} ({backend}); rank 0 reports", dims.world, dims.tp, dims.dp);
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

/// Sends this process's stdout to /dev/null (non-zero ranks).
fn quiet_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1; `null` stays open until the duplicate exists.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

fn eval(a: EvalArgs) -> Result<()> {
    use glm_worker::comm::Communicator;
    use glm_worker::eval::{default_store, evaluate, EvalOptions, Split};
    glm_worker::train::trainer::install_signal_handlers(glm_worker::train::trainer::Phase::Evaluation);
    let split = Split::parse(&a.split).ok_or_else(|| anyhow::anyhow!("--split {}: expected valid or test", a.split))?;
    anyhow::ensure!(a.iters != Some(0), "--iters 0: must be positive");
    anyhow::ensure!(a.batch_size != Some(0), "--batch-size 0: must be positive");
    let world = glm_worker::comm::mpi::world()?;
    let dims = glm_worker::parallel::dims::ParallelDims::new(world.size(), world.rank(), 1)?;
    if dims.rank != 0 && std::env::var_os(glm_common::launch::ALL_RANKS_OUTPUT).is_none() {
        quiet_stdout();
    }
    let device = if dims.world > 1 { rank_device(&a.device, glm_worker::comm::mpi::local_rank(&world))? } else { device(&a.device)? };
    let par = glm_worker::parallel::Parallel::build(&world, dims, device)?;
    let store = a.store.clone().unwrap_or_else(|| default_store(a.data.as_deref()));
    let opts = EvalOptions { load: a.load.clone(), data: a.data.clone(), split, iters: a.iters, batch: a.batch_size, store, device };
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
    println!("{:<12} {:>10} {:>12} {:>10} {:>10}", "mode", "loss", "perplexity", "accuracy", "tokens");
    for r in &e.results {
        println!("{:<12} {:>10.4} {:>12.2} {:>10.4} {:>10}", r.mode, r.loss, r.ppl, r.accuracy, r.tokens);
    }
    println!("(token-weighted averages over the masked tokens; \"mixed\" draws the modes as training does)");
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    use glm_worker::generate::{fill, Sampling};
    let device = device("auto")?;
    let (model, state, dir) = glm_worker::checkpoint::load_for_inference(&a.load, device)?;
    let tok = GlmTokenizer::load(&dir.join("tokenizer.json"))?;
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

/// One training step per iteration on a fixed synthetic batch (Part A = first
/// half, Part B = second half in the loss), as bench/glm_torch.py does,
/// through the trainer's own step (`train::step::train_step`).
fn bench_step(a: BenchArgs) -> Result<()> {
    use glm_worker::model::glm::{Batch, Glm, GlmConfig, ModelOptions};
    use glm_worker::optim::adamw::AdamWConfig;
    use glm_worker::optim::optimizer::{OptimConfig, Optimizer, Precision};
    use glm_worker::comm::Communicator;
    use glm_worker::optim::zero::ZeroConfig;
    use glm_worker::parallel::Parallel;
    use tch::Tensor;
    tch::set_num_threads(a.threads);
    // under mpirun: data parallelism over every rank, one batch per rank
    let world = glm_worker::comm::mpi::world()?;
    let dims = glm_worker::parallel::dims::ParallelDims::new(world.size(), world.rank(), 1)?;
    let device = if dims.world > 1 { rank_device(&a.device, glm_worker::comm::mpi::local_rank(&world))? } else { device(&a.device)? };
    let precision = Precision::parse(&a.precision).ok_or_else(|| anyhow::anyhow!("--precision {}: expected fp32, bf16 or fp16", a.precision))?;
    let cfg = GlmConfig {
        vocab_size: a.vocab,
        hidden_size: a.hidden,
        num_layers: a.layers,
        num_attention_heads: a.heads,
        intermediate_size: 4 * a.hidden,
        max_position_embeddings: a.seq,
        layernorm_epsilon: 1e-5,
        hidden_dropout: a.dropout,
        attention_dropout: a.dropout,
        output_dropout: a.dropout,
        block_position_encoding: true,
    };
    // device memory before the model: the baseline of the peak reported
    let baseline = match device {
        tch::Device::Cuda(_) => {
            let _ = Tensor::zeros([1], (tch::Kind::Float, device));
            glm_worker::runtime::cuda_memory_in_use()
        }
        _ => None,
    };
    let mo = ModelOptions {
        kind: precision.kind(),
        checkpoint_num_layers: usize::from(a.checkpoint_activations),
        pad_multiple: 64 * dims.dp as i64,
        ..ModelOptions::new(device, 1234)
    };
    let mut model = Glm::build(cfg.clone(), &mo)?;
    let par = Parallel::build(&world, dims, device)?;
    let adam = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.01 };
    let zero = ZeroConfig { stage: a.zero_stage, reduce_bucket_size: a.reduce_bucket_size, allgather_bucket_size: a.allgather_bucket_size, overlap_comm: true };
    let mut opt = Optimizer::new(&mut model.params, &OptimConfig { zero, ..OptimConfig::new(precision, adam, 1.0) }, &par)?;
    let (b, s) = (a.batch as i64, a.seq as i64);
    let half = s / 2;
    let mut rng = glm_worker::rng::Rng::new(7 + dims.rank as u64);
    let mut rand = |n: i64| -> Tensor {
        let v: Vec<i64> = (0..n).map(|_| 10 + rng.below(a.vocab as u64 - 10) as i64).collect();
        Tensor::from_slice(&v).view([b, s]).to(device)
    };
    let row = |f: &dyn Fn(i64) -> i64| Tensor::from_slice(&(0..s).map(f).collect::<Vec<_>>()).unsqueeze(0).repeat([b, 1]).to(device);
    let batch = Batch {
        tokens: rand(b * s),
        targets: rand(b * s),
        position_ids: row(&|i| i.min(half - 1)),
        block_position_ids: row(&|i| if i < half { 0 } else { i - half + 1 }),
        loss_mask: row(&|i| i64::from(i >= half)),
        sep: Tensor::from_slice(&vec![half; a.batch]).to(device),
    };
    let shallow = |b: &Batch| Batch {
        tokens: b.tokens.shallow_clone(),
        targets: b.targets.shallow_clone(),
        loss_mask: b.loss_mask.shallow_clone(),
        position_ids: b.position_ids.shallow_clone(),
        block_position_ids: b.block_position_ids.shallow_clone(),
        sep: b.sep.shallow_clone(),
    };
    let (mut times, mut skipped, mut sent0) = (Vec::new(), 0, 0);
    for i in 0..a.warmup + a.iters {
        if i == a.warmup {
            sent0 = par.bytes_sent();
        }
        let t0 = std::time::Instant::now();
        // the step reads its loss back (a device sync), so the time is the step's
        let plan = glm_worker::train::step::StepPlan { it_seed: 1234 + i as i64, accum: 1, lr: 1e-3 };
        let out = glm_worker::train::step::train_step(&mut model, &mut opt, &par, plan, &mut |_| Ok(shallow(&batch)))?;
        if i >= a.warmup && out.stats.skipped {
            skipped += 1;
        }
        if let tch::Device::Cuda(d) = device {
            tch::Cuda::synchronize(d as i64);
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let sent_per_step = (par.bytes_sent() - sent0) as f64 / a.iters.max(1) as f64;
    let sec = times.iter().sum::<f64>() / times.len() as f64;
    let tps = (a.batch * a.seq * dims.dp) as f64 / sec;
    // CUDA: device memory the run added (the caching allocator's high-water
    // mark); CPU: the process's peak resident memory
    let peak = if device.is_cuda() {
        match (baseline, glm_worker::runtime::cuda_memory_in_use()) {
            (Some(b0), Some(b1)) => format!("{:.0}", b1.saturating_sub(b0) as f64 / 1e6),
            _ => "?".into(), // cudaMemGetInfo not found
        }
    } else {
        // the largest over the ranks
        format!("{:.0}", par.world_max(glm_worker::runtime::peak_rss_bytes() as i64)? as f64 / 1e6)
    };
    let states = opt.memory(&model.params);
    let zero = if dims.world > 1 || a.zero_stage > 0 {
        format!(
            " ranks={} zero={} model_states_mb={:.1} sent_mb_per_step={:.2}",
            dims.world,
            a.zero_stage,
            states.total() as f64 / 1e6,
            sent_per_step / 1e6
        )
    } else {
        String::new()
    };
    if dims.rank == 0 {
        println!(
            "rust device={:?} threads={} precision={} ckpt={} tokens/s={tps:.0} tflops={:.4} ms/it={:.1} peak_mem_mb={peak}{zero}{}",
            device,
            a.threads,
            precision.name(),
            u8::from(a.checkpoint_activations),
            tps * cfg.flops_per_token(a.seq) / 1e12,
            sec * 1000.0,
            // fp16 steps skipped for overflow inside the timed window (no optimizer update)
            if skipped > 0 { format!(" skipped={skipped}") } else { String::new() }
        );
    }
    drop((opt, model, par, world));
    glm_worker::comm::mpi::finalize();
    Ok(())
}

/// `glm-worker comm-check`: the world's collectives (and the tensor-parallel
/// autograd regions over the world) checked on `device`, then all-reduce
/// bus bandwidth. On CUDA the world is an NCCL communicator, even of one.
fn comm_check(choice: &str, mib: &[usize], iters: usize) -> Result<()> {
    use glm_worker::comm::{check, Communicator, GroupComm};
    let world = glm_worker::comm::mpi::world()?;
    let device = rank_device(choice, glm_worker::comm::mpi::local_rank(&world))?;
    let (rank, p) = (world.rank(), world.size());
    let say = |line: &str| {
        if rank == 0 {
            println!("comm-check: {line}");
        }
    };
    let comm = GroupComm::world(&world, device)?;
    let backend = match &comm.nccl {
        Some(_) => {
            let v = glm_worker::comm::nccl::version()?;
            format!("NCCL {v}")
        }
        None => "MPI".into(),
    };
    say(&format!("{p} rank(s), {device:?} tensors through {backend}"));
    for line in check::collectives(&comm, device)? {
        say(&line);
    }
    // the regions run over a second communicator split from the first, as
    // training's tensor-parallel group is (ncclCommSplit on CUDA)
    let sub = comm.split(0, rank, "tp")?;
    say(&format!("tensor-parallel regions over a group split from it{}", if sub.nccl.is_some() { " (ncclCommSplit)" } else { "" }));
    let g = glm_worker::parallel::mappings::Group::new(std::sync::Arc::new(sub));
    for line in check::regions(&g, device)? {
        say(&line);
    }
    drop(g);
    let factor = if p > 1 { check::bus_factor(p) } else { 1.0 };
    for &m in mib {
        let sec = check::time_all_reduce(&comm, device, m, iters)?;
        let bytes = (m << 20) as f64;
        if p == 1 {
            say(&format!("all_reduce {m:>5} MiB: {:>8.3} ms (one rank: nothing moves; this is the call's overhead)", sec * 1e3));
        } else {
            say(&format!("all_reduce {m:>5} MiB: {:>8.3} ms, {:.2} GB/s bus", sec * 1e3, factor * bytes / sec / 1e9));
        }
    }
    if let (Some(n), tch::Device::Cuda(_)) = (&comm.nccl, device) {
        // an invalid root must come back as an error carrying NCCL's message
        let mut t = tch::Tensor::zeros([4], (tch::Kind::Float, device));
        match n.broadcast(&mut t, p + 3) {
            Err(e) if e.to_string().contains("invalid argument") => say(&format!("NCCL error reporting: ok ({e})")),
            Err(e) => anyhow::bail!("comm-check: NCCL error without NCCL's message: {e}"),
            Ok(()) => anyhow::bail!("comm-check: broadcast from root {} of {p} ranks succeeded", p + 3),
        }
    }
    drop(comm);
    say("all checks passed");
    Ok(())
}

/// Bus bandwidth (2(p-1)/p × bytes / time, NCCL's convention) of a sum
/// all-reduce of f32 tensors through `Communicator::all_reduce`, and of a
/// plain `MPI_Allreduce` of the same bytes.
fn bench_comm(mib: &[usize], iters: usize) -> Result<()> {
    use glm_worker::comm::{check, Communicator};
    let world = glm_worker::comm::mpi::world()?;
    let p = world.size();
    anyhow::ensure!(p > 1, "bench-comm needs several ranks: mpirun -np 2 glm-worker bench-comm");
    let factor = check::bus_factor(p);
    for &m in mib {
        let n = m * (1 << 20) / 4;
        let ours = check::time_all_reduce(&world, tch::Device::Cpu, m, iters)?;
        let send = vec![1.0f32; n];
        let mut recv = vec![0.0f32; n];
        world.raw_all_reduce_f32(&send, &mut recv);
        world.barrier()?;
        let t0 = std::time::Instant::now();
        for _ in 0..iters {
            world.raw_all_reduce_f32(&send, &mut recv);
        }
        let raw = t0.elapsed().as_secs_f64() / iters as f64;
        if world.rank() == 0 {
            let bytes = (n * 4) as f64;
            println!(
                "allreduce {m:>4} MiB on {p} ranks: tensors {:.2} GB/s bus, MPI_Allreduce {:.2} GB/s bus, ratio {:.3}",
                factor * bytes / ours / 1e9,
                factor * bytes / raw / 1e9,
                raw / ours
            );
        }
    }
    drop(world);
    Ok(())
}
