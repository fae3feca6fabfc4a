//! `glm-worker-core`: the real worker program. Users start it through the
//! `glm-worker` entry point, which finds libtorch first.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use glm_worker::data::blocklm::{BlockConfig, BlockSampler, Mode};
use glm_worker::data::corpus::{corpus_files, read_corpus, CorpusOptions};
use glm_worker::data::store::{self, build_store, split_documents, CorpusFingerprint, TokenStore};
use glm_worker::data::tokenizer::{padded_vocab_size, GlmTokenizer};
use glm_worker::data::fortunes;

#[derive(Parser)]
#[command(name = "glm-worker", version, about = "GLM pretraining worker: data preparation (and, in later releases, training)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    Env,
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
}

fn main() -> ExitCode {
    // Behave like a Unix tool when the reader goes away (`| head`): exit
    // quietly instead of panicking on a failed print.
    // SAFETY: called first thing, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Prepare(a) => prepare(a),
        Cmd::MakeCorpus { src, out } => make_corpus(&src, &out),
        Cmd::Samples(a) => samples(a),
        Cmd::Env => {
            for (k, v) in glm_worker::runtime::describe() {
                println!("{k:>18}: {v}");
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("glm-worker: error: {e:#}");
            ExitCode::FAILURE
        }
    }
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
    if !std::io::stderr().is_terminal() {
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

/// Loads the given tokenizer, or the cached one trained on this corpus, or trains one.
fn tokenizer_for(a: &PrepareArgs, files: &[PathBuf], opts: &CorpusOptions) -> Result<(GlmTokenizer, String)> {
    if let Some(p) = &a.tokenizer {
        let t = GlmTokenizer::load(p)?;
        return Ok((t, format!("{}", p.display())));
    }
    let fp = CorpusFingerprint::compute(files)?;
    let cache = a.tokenizer_cache.join(format!("tokenizer-{}-v{}.json", &fp.digest[..12], a.vocab_size));
    if cache.is_file() {
        let t = GlmTokenizer::load(&cache).with_context(|| format!("cached tokenizer {} (delete it to retrain)", cache.display()))?;
        return Ok((t, format!("{} (cached, trained on this corpus)", cache.display())));
    }
    let cap = a.tokenizer_train_mb << 20;
    let mut texts = Vec::new();
    let mut bytes = 0usize;
    read_corpus(files, opts, |t, _| {
        if bytes < cap {
            bytes += t.len();
            texts.push(t);
        }
        Ok(())
    })?;
    if texts.is_empty() {
        anyhow::bail!("{}: the corpus holds no documents with text", a.data.display());
    }
    let t0 = std::time::Instant::now();
    let t = GlmTokenizer::train(texts.into_iter(), a.vocab_size, std::io::stderr().is_terminal())?;
    std::fs::create_dir_all(&a.tokenizer_cache).with_context(|| a.tokenizer_cache.display().to_string())?;
    let tmp = cache.with_extension(format!("json.tmp-{}", std::process::id()));
    std::fs::write(&tmp, t.to_json()?).with_context(|| tmp.display().to_string())?;
    std::fs::rename(&tmp, &cache).with_context(|| cache.display().to_string())?;
    Ok((t, format!("{} (trained WordPiece on {:.2} MB in {:.1} s)", cache.display(), mb(bytes as u64), t0.elapsed().as_secs_f64())))
}

fn prepare(a: PrepareArgs) -> Result<()> {
    // Check every argument before doing work, so a typo costs nothing.
    let weights = store::parse_split(&a.split)?;
    anyhow::ensure!(a.vocab_size >= 64, "--vocab-size {}: must be at least 64", a.vocab_size);
    let files = corpus_files(&a.data)?;
    let opts = CorpusOptions { text_key: a.text_key.clone(), skip_malformed: a.skip_malformed };
    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    println!("prepare: corpus {} ({} file{}, {:.2} MB)", a.data.display(), files.len(), if files.len() == 1 { "" } else { "s" }, mb(total_bytes));
    let (tok, tok_desc) = tokenizer_for(&a, &files, &opts)?;
    println!(
        "prepare: tokenizer {tok_desc}: {} ids, padded to {} (make_vocab_size_divisible_by={}), sha256 {}",
        tok.vocab_size(),
        padded_vocab_size(tok.vocab_size(), a.make_vocab_size_divisible_by, 1),
        a.make_vocab_size_divisible_by,
        &tok.sha256[..16]
    );
    let meta = match (a.force, store::staleness(&a.out, &files, &tok.sha256)?) {
        (false, None) => {
            let meta = store::read_meta(&a.out)?;
            println!("prepare: store {} is up to date (same corpus and tokenizer); reusing it", a.out.display());
            meta
        }
        (force, why) => {
            if let Some(why) = why.filter(|_| a.out.exists()) {
                println!("prepare: rebuilding {}: {why}", a.out.display());
            } else if force {
                println!("prepare: rebuilding {} (--force)", a.out.display());
            }
            let pb = progress_bar(total_bytes, "tokenizing");
            let (meta, report) = build_store(&files, &opts, &tok, &a.out, &|done| pb.set_position(done))?;
            pb.finish_and_clear();
            println!(
                "prepare: {} documents ({} empty, {} skipped, {} without tokens), {} tokens ({:.1} per document)",
                meta.documents,
                report.stats.empty,
                report.stats.skipped,
                report.documents_without_tokens,
                meta.tokens,
                meta.tokens as f64 / meta.documents as f64
            );
            println!(
                "prepare: tokenized {:.2} MB of text in {:.2} s = {:.2} MB/s, {:.0} tokens/s",
                mb(meta.text_bytes),
                report.seconds,
                mb(meta.text_bytes) / report.seconds,
                meta.tokens as f64 / report.seconds
            );
            meta
        }
    };
    let splits = split_documents(meta.documents as usize, &weights, a.seed);
    let names = ["train", "valid", "test"];
    let parts: Vec<String> = splits.iter().zip(names).map(|(s, n)| format!("{n} {}", s.len())).collect();
    println!("prepare: split {} (seed {}): {} documents", a.split, a.seed, parts.join(", "));
    println!(
        "prepare: store {} ({} ids of {} bytes, {} documents)",
        a.out.display(),
        meta.tokens,
        meta.bytes_per_token,
        meta.documents
    );
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
    let cfg = BlockConfig { seq_length: a.seq_length, seed: a.seed, task_mask: a.task_mask, ..BlockConfig::default() };
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
