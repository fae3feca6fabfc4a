//! The data commands: `prepare` (a corpus into a token store),
//! `make-corpus` (the default corpus from fortunes-zh) and `samples`
//! (blank-infilling samples from a store, decoded or as JSON).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::ValueEnum;

use glm_worker::data::blocklm::{BlockConfig, BlockSampler, Mode};
use glm_worker::data::build::{human_bytes, partial_dir, ShardSize, Slice};
use glm_worker::data::corpus::{corpus_files, parse_entry, CorpusOptions, Reader};
use glm_worker::data::fortunes;
use glm_worker::data::prepare::{ensure_store, join_store, obtain_tokenizer, prepare_slice, PrepareOptions, SliceOutcome, StoreOutcome};
use glm_worker::data::split::{get_split, split_documents, SPLIT_SEED};
use glm_worker::data::store::{self, BuildReport, TokenStore};
use glm_worker::data::tokenizer::{padded_vocab_size, GlmTokenizer, TokenizerSpec, TokenizerType};

use crate::output::{mb, progress_bar};

#[derive(clap::Args)]
pub struct MakeCorpusArgs {
    /// Folder holding the fortune files chinese, tang300 and song100
    #[arg(long, default_value = fortunes::DEFAULT_SOURCE_DIR)]
    src: PathBuf,
    /// Output JSON file
    #[arg(long, default_value = "glm_pretrain/data/data.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Corpus file or folder (.json array, .jsonl, or text); wudao:<file or folder> reads it
    /// with the original's WuDao reader (JSON records, title + " " + content, over 100 characters)
    #[arg(long, required_unless_present = "join")]
    data: Option<PathBuf>,
    /// The tokenizer's files (BertWordPieceTokenizer: vocab.txt; GPT2BPETokenizer: vocab.json +
    /// merges.txt or their folder; ChineseSPTokenizer: a .model) or a tokenizer.json;
    /// omitted: train one on the corpus
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// configs.json's tokenizer_type: BertWordPieceTokenizer, GPT2BPETokenizer or
    /// ChineseSPTokenizer [default: a saved tokenizer.json's own, else BertWordPieceTokenizer]
    #[arg(long)]
    tokenizer_type: Option<String>,
    /// configs.json's tokenizer_model_type: the cased and Chinese BERT names keep WordPiece's
    /// case, roberta* gives GPT2BPETokenizer RoBERTa's command ids
    #[arg(long, default_value = "bert-base-uncased")]
    tokenizer_model_type: String,
    /// Keep case: the same as --tokenizer-model-type bert-base-cased
    #[arg(long)]
    cased: bool,
    /// configs.json's fix_command_token (ChineseSPTokenizer's [sMASK]/[gMASK] ids)
    #[arg(long)]
    fix_command_token: bool,
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
    /// Rebuild the store even when it is up to date, and replace one built for another corpus or tokenizer (which prepare otherwise refuses to)
    #[arg(long)]
    force: bool,
    /// Train/valid/test weights to report the split with (as configs.json's split; the
    /// documents are shuffled with the original's fixed seed 1234, as training does)
    #[arg(long, default_value = "949,50,1")]
    split: String,
    /// make_vocab_size_divisible_by, to report the model's padded vocabulary
    #[arg(long, default_value_t = 128)]
    make_vocab_size_divisible_by: usize,
    /// Threads that read and tokenize, each a shard at a time [default: one per core]
    #[arg(long)]
    workers: Option<usize>,
    /// Input bytes per shard of the store: auto (about 64 shards, 4 MiB to 1 GiB each),
    /// a size such as 256M or 1G, or 0 (one shard)
    #[arg(long, default_value = "auto")]
    shard_size: String,
    /// Tokenize only slice I of N (0 <= I < N: the shards I, I+N, I+2N, ...) into the partial
    /// build beside --out, for several processes or nodes sharing the file system; then --join
    #[arg(long, value_name = "I/N")]
    slice: Option<String>,
    /// Install the store from the partial build its slices made, once every slice is done
    /// (no tokens are copied); --data, when given, must be the slices' corpus
    #[arg(long)]
    join: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    Span,
    Sentence,
    Generation,
}

#[derive(clap::Args)]
pub struct SamplesArgs {
    /// Token store directory (from `prepare`)
    #[arg(long)]
    store: PathBuf,
    /// Samples to print (0: none, only check the store and settings); with --summary, to measure (at least 1)
    #[arg(long, default_value_t = 3)]
    count: u64,
    /// Sample length [default: 128] (not with --args: use --set seq_length=N)
    #[arg(long)]
    seq_length: Option<usize>,
    #[arg(long, value_enum, default_value = "span")]
    mode: ModeArg,
    /// Sampling seed [default: 1234] (not with --args: use --set seed=N)
    #[arg(long)]
    seed: Option<u64>,
    /// Use [sMASK]/[gMASK] for sentence/generation blanks (not with --args: use --set task_mask=true)
    #[arg(long)]
    task_mask: bool,
    /// Print statistics (masked fraction, span lengths, build rate) instead of samples
    #[arg(long)]
    summary: bool,
    /// Print each sample as one JSON line: token ids, targets, loss mask, positions;
    /// with --summary, the statistics as one JSON object
    #[arg(long)]
    json: bool,
    /// Build samples with a run's masking settings: its configs.json (seq_length, seed,
    /// bert_prob/gap_sentence_prob and ratios, avg_block_length, task_mask, ...);
    /// --seq-length/--seed/--task-mask are refused with it (use --set)
    #[arg(long = "args")]
    args_file: Option<PathBuf>,
    /// With --args: override a key of it (as in training)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

pub fn make_corpus(a: MakeCorpusArgs) -> Result<()> {
    let (src, out) = (&a.src, &a.out);
    let counts = fortunes::build_corpus(src, out)?;
    let total: usize = counts.iter().map(|(_, n)| n).sum();
    let detail: Vec<String> = counts.iter().map(|(f, n)| format!("{f} {n}")).collect();
    let size = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    println!("make-corpus: {} records ({}) -> {} ({:.2} MB)", total, detail.join(", "), out.display(), mb(size));
    Ok(())
}

pub fn prepare(a: PrepareArgs) -> Result<()> {
    glm_worker::train::trainer::install_signal_handlers(glm_worker::train::trainer::Phase::Preparation);
    // Check every argument before doing work, so a typo costs nothing.
    let shares = get_split(&a.split, false, false)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match a.workers {
        Some(0) => anyhow::bail!("--workers 0: must be at least 1 (omit it for one per core, {cores} here)"),
        Some(n) => n,
        None => 0,
    };
    let shard_size = ShardSize::parse(&a.shard_size)
        .map_err(|e| anyhow::anyhow!("--shard-size {}: {e}; expected auto, 0 (one shard), a number of bytes or a size such as 256M or 1G", a.shard_size))?;
    let slice = a.slice.as_deref().map(|s| Slice::parse(s).map_err(|e| anyhow::anyhow!("--slice {s}: {e}"))).transpose()?;
    let reader = a.data.as_ref().map_or(Reader::Default, |d| parse_entry(&d.to_string_lossy()).1);
    let opts = PrepareOptions {
        corpus: CorpusOptions { text_key: a.text_key.clone(), skip_malformed: a.skip_malformed, reader },
        vocab_size: a.vocab_size,
        tokenizer_cache: a.tokenizer_cache.clone(),
        tokenizer_train_bytes: a.tokenizer_train_mb << 20,
        force: a.force,
        show_progress: glm_worker::comm::mpi::live_terminal(&std::io::stderr()),
        spec: prepare_spec(&a)?,
        guard: Some(glm_worker::data::prepare::StoreGuard { command: "prepare", store_option: "--out", rebuild_flag: "--force" }),
        workers,
        shard_size,
        ..PrepareOptions::default()
    };
    if a.join {
        anyhow::ensure!(slice.is_none(), "--join with --slice: the slices tokenize (--slice i/n, one run each), then one --join installs the store");
        let ignored: Vec<&str> =
            [(a.tokenizer.is_some(), "--tokenizer"), (a.workers.is_some(), "--workers"), (!a.shard_size.eq_ignore_ascii_case("auto"), "--shard-size")]
                .into_iter()
                .filter_map(|(given, flag)| given.then_some(flag))
                .collect();
        anyhow::ensure!(ignored.is_empty(), "{} with --join: the store is what the slices tokenized; give these to the slices", ignored.join(", "));
        return join(&a, &opts, &shares);
    }
    let (data, reader) = parse_entry(&a.data.as_ref().expect("clap requires --data without --join").to_string_lossy());
    let files = corpus_files(&data)?;
    let total_bytes: u64 = files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    println!("prepare: corpus {} ({} file{}, {:.2} MB, {reader})", data.display(), files.len(), if files.len() == 1 { "" } else { "s" }, mb(total_bytes));
    let (tok, origin) = obtain_tokenizer(&files, a.tokenizer.as_deref(), &a.out, &opts)?;
    println!(
        "prepare: tokenizer {origin}: {} ids, padded to {} (make_vocab_size_divisible_by={}), sha256 {}",
        tok.vocab_size(),
        padded_vocab_size(tok.vocab_size(), a.make_vocab_size_divisible_by, 1),
        a.make_vocab_size_divisible_by,
        &tok.sha256[..16]
    );
    let pb = progress_bar(total_bytes, "tokenizing");
    if let Some(slice) = slice {
        let outcome = prepare_slice(&files, &tok, &a.out, slice, &opts, &|done| pb.set_position(done))?;
        pb.finish_and_clear();
        match outcome {
            SliceOutcome::UpToDate => println!("prepare: store {} is up to date (same corpus and tokenizer); slice {slice} has nothing to do", a.out.display()),
            SliceOutcome::Done { report, done, total } => {
                if let Some(note) = &report.discarded {
                    println!("prepare: {note}");
                }
                println!("prepare: slice {slice}: {}", rate(&report));
                let next = if done == total {
                    format!(
                        "every shard is done: install the store with glm-worker prepare --out {} --join",
                        glm_common::text::shell_word(&a.out.display().to_string())
                    )
                } else {
                    "the other slices' are to do, then prepare --join installs the store".into()
                };
                println!("prepare: {done} of {total} shards done in {}; {next}", partial_dir(&a.out).display());
            }
        }
        return Ok(());
    }
    let (meta, outcome) = ensure_store(&files, &tok, &a.out, &opts, &|done| pb.set_position(done))?;
    pb.finish_and_clear();
    match outcome {
        StoreOutcome::Reused => println!("prepare: store {} is up to date (same corpus and tokenizer); reusing it", a.out.display()),
        StoreOutcome::Built { report, reason } => {
            if let Some(why) = reason {
                println!("prepare: rebuilt {}: {why}", a.out.display());
            }
            report_build(&report, &meta, reader);
        }
    }
    report_store(&a, &meta, &shares)
}

/// `prepare --join`: installs the store the slices made.
fn join(a: &PrepareArgs, opts: &PrepareOptions, shares: &[f64; 3]) -> Result<()> {
    let files = match &a.data {
        Some(d) => Some(corpus_files(&parse_entry(&d.to_string_lossy()).0)?),
        None => None,
    };
    let work = partial_dir(&a.out);
    anyhow::ensure!(
        work.join("plan.json").is_file(),
        "--join: no partial build of {} to join ({} does not exist or holds no plan): run prepare --slice i/n first",
        a.out.display(),
        work.display()
    );
    let (meta, report) = join_store(&a.out, files.as_deref(), opts).map_err(|e| anyhow::anyhow!("--join: {e}"))?;
    println!("prepare: joined the {} shards of {} into {} (renamed, no tokens copied)", report.shards, work.display(), a.out.display());
    report_build(&report, &meta, meta.reader);
    report_store(a, &meta, shares)
}

/// "tokenized 12.00 MB of text in 1.20 s = ..., 3 of 8 shards, 2 workers, ...".
fn rate(r: &BuildReport) -> String {
    let secs = r.seconds.max(1e-9);
    format!(
        "tokenized {:.2} MB of text in {:.2} s = {:.2} MB/s, {:.0} tokens/s ({} of {} shards of {} input, {} worker{}, peak resident memory {:.0} MB)",
        mb(r.text_bytes),
        r.seconds,
        mb(r.text_bytes) / secs,
        r.tokens as f64 / secs,
        r.shards_built,
        r.shards,
        if r.shard_size == 0 { "all the".to_string() } else { human_bytes(r.shard_size) },
        r.workers,
        if r.workers == 1 { "" } else { "s" },
        mb(glm_worker::runtime::host::peak_rss_of_this_program())
    )
}

/// The lines of a built store: documents, tokens, and this run's rate.
fn report_build(report: &BuildReport, meta: &store::StoreMeta, reader: Reader) {
    if let Some(note) = &report.discarded {
        println!("prepare: {note}");
    }
    if report.shards_built < report.shards {
        println!("prepare: {} of {} shards were done before (an interrupted run or slices) and are kept", report.shards - report.shards_built, report.shards);
    }
    let short = if reader == Reader::WuDao {
        format!(", {} of at most {} characters dropped by the WuDao reader", report.stats.short, glm_worker::data::corpus::WUDAO_MIN_CHARS)
    } else {
        String::new()
    };
    println!(
        "prepare: {} documents ({} empty, {} skipped{short}, {} without tokens), {} tokens ({:.1} per document{})",
        meta.documents,
        report.stats.empty,
        report.stats.skipped,
        report.documents_without_tokens,
        meta.tokens,
        meta.tokens as f64 / meta.documents as f64,
        meta.unknown_share().map(|u| format!(", {:.2}% [UNK]", u * 100.0)).unwrap_or_default()
    );
    if report.shards_built > 0 {
        println!("prepare: {}", rate(report));
    }
}

/// The closing lines: the [UNK] warning, the split, the store.
fn report_store(a: &PrepareArgs, meta: &store::StoreMeta, shares: &[f64; 3]) -> Result<()> {
    if let Some(w) = meta.unknown_warning(glm_worker::data::prepare::TokenizerOption::Flag) {
        println!("warning: {w}");
    }
    let splits = split_documents(meta.documents as usize, shares, None)?.parts;
    let names = ["train", "valid", "test"];
    let parts: Vec<String> = splits.iter().zip(names).map(|(s, n)| format!("{n} {}", s.len())).collect();
    println!("prepare: split {} (the original's shuffle, seed {SPLIT_SEED}): {} documents", a.split, parts.join(", "));
    let shards = if meta.shards.len() > 1 { format!(" in {} shards", meta.shards.len()) } else { String::new() };
    println!("prepare: store {} ({} ids of {} bytes, {} documents{shards})", a.out.display(), meta.tokens, meta.bytes_per_token, meta.documents);
    Ok(())
}

/// The tokenizer `prepare`'s flags ask for; `None` (without
/// --tokenizer-type, for a tokenizer.json): the file's own.
fn prepare_spec(a: &PrepareArgs) -> Result<Option<TokenizerSpec>> {
    let model_type = if a.cased { "bert-base-cased" } else { a.tokenizer_model_type.as_str() };
    let kind = match &a.tokenizer_type {
        Some(name) => TokenizerType::parse(name).ok_or_else(|| anyhow::anyhow!("--tokenizer-type {name}: expected one of {}", TokenizerType::names()))?,
        None => match a.tokenizer.as_deref().filter(|p| p.extension().is_some_and(|e| e == "json") && p.is_file()) {
            Some(_) => return Ok(None),
            None => TokenizerType::WordPiece,
        },
    };
    Ok(Some(TokenizerSpec::new(kind, model_type, a.fix_command_token)))
}

pub fn samples(a: SamplesArgs) -> Result<()> {
    // a rate over no samples means nothing (listing none still checks the settings)
    anyhow::ensure!(!(a.summary && a.count == 0), "--count 0 with --summary: the summary measures samples; give --count 1 or more");
    let st = Arc::new(TokenStore::open(&a.store)?);
    let tok = GlmTokenizer::load_saved(&a.store.join("tokenizer.json"))?;
    anyhow::ensure!(
        tok.answers_to(&st.meta.tokenizer_sha256),
        "{}: tokenizer.json does not match meta.json (rebuild the store with this tokenizer: {})",
        a.store.display(),
        store::rebuild_command(&a.store, &st.meta)
    );
    let cfg = match &a.args_file {
        Some(p) => {
            let loaded = glm_worker::config::args::LoadedArgs::load(Some(p), &a.sets)?;
            refuse_overridden_flags(&a, p, &loaded)?;
            let c = glm_worker::config::run::block_config(&loaded.args);
            c.validate().map_err(|e| anyhow::anyhow!("{}: {e} (blank-infilling settings)", p.display()))?;
            c
        }
        None => {
            // the configs.json that training reads by default, where it is
            let default = std::path::Path::new("configs/configs.json");
            let example = if default.is_file() { format!(", e.g. --args {}", default.display()) } else { String::new() };
            anyhow::ensure!(a.sets.is_empty(), "--set needs --args (the configs.json it overrides{example})");
            BlockConfig { seq_length: a.seq_length.unwrap_or(128), seed: a.seed.unwrap_or(1234), task_mask: a.task_mask, ..BlockConfig::default() }
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
        return summarize(&sm, mode, a.count, &tok, a.json);
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

/// With `--args`, the run's settings decide seq_length, seed and task_mask:
/// `--seq-length`, `--seed` and `--task-mask` would be silently overridden,
/// so they are refused, naming the `--set` that does what was meant.
fn refuse_overridden_flags(a: &SamplesArgs, file: &std::path::Path, loaded: &glm_worker::config::args::LoadedArgs) -> Result<()> {
    use glm_worker::config::args::Source;
    let run = &loaded.args;
    let mut given: Vec<(&str, &str, String, String)> = Vec::new(); // flag, key, the run's value, wanted value
    if let Some(n) = a.seq_length {
        given.push(("--seq-length", "seq_length", run.seq_length.to_string(), n.to_string()));
    }
    if let Some(n) = a.seed {
        given.push(("--seed", "seed", run.seed.to_string(), n.to_string()));
    }
    if a.task_mask {
        given.push(("--task-mask", "task_mask", run.task_mask.to_string(), "true".into()));
    }
    if given.is_empty() {
        return Ok(());
    }
    let and = |v: Vec<String>| match v.len() {
        1 => v[0].clone(),
        n => format!("{} and {}", v[..n - 1].join(", "), v[n - 1]),
    };
    let decided: Vec<String> = given
        .iter()
        .map(|(_, key, value, _)| {
            let from = match loaded.sources.get(*key) {
                Some(Source::File(_)) => format!("{}'s", file.display()),
                Some(Source::Set) => "--set's".into(),
                _ => "the default".into(),
            };
            format!("{from} {key} ({value})")
        })
        .collect();
    let flags = and(given.iter().map(|g| g.0.to_string()).collect());
    let sets: Vec<String> = given.iter().map(|(_, key, _, want)| format!("--set {key}={want}")).collect();
    let (conflict, decides) = if given.len() == 1 { ("conflicts", "decides") } else { ("conflict", "decide") };
    anyhow::bail!("{flags} {conflict} with --args: {} {decides}; use {} instead", and(decided), sets.join(" "))
}

/// Builds `count` samples (at least one) and reports what a user checks a
/// masking setup by: as text, or with `json` as one JSON object of the same
/// figures.
fn summarize(sm: &BlockSampler, mode: Mode, count: u64, tok: &GlmTokenizer, json: bool) -> Result<()> {
    let t0 = std::time::Instant::now();
    let (mut used, mut loss, mut blocks, mut suffix) = (0usize, 0usize, 0usize, 0usize);
    for i in 0..count {
        let s = sm.sample(i, mode);
        used += s.len;
        loss += s.loss_mask.iter().map(|&m| m as usize).sum::<usize>();
        blocks += s.tokens[s.sep..s.len].iter().filter(|&&t| t == tok.special.sop).count();
        suffix += usize::from(s.suffix);
    }
    let secs = t0.elapsed().as_secs_f64().max(1e-9);
    let seq = sm.config().seq_length;
    let n = count as f64;
    let rate = n / secs;
    let tokens_rate = n * seq as f64 / secs;
    let used_pct = 100.0 * used as f64 / (n * seq as f64);
    let (blocks_per, loss_per) = (blocks as f64 / n, loss as f64 / n);
    // a span of k tokens gives k + 1 loss tokens (the span and <|endofpiece|>)
    let spans = (mode == Mode::Span && blocks > 0).then(|| {
        let masked = loss - blocks;
        (masked as f64 / blocks as f64, sm.config().mean_span_length(), 100.0 * masked as f64 / (used - 2 * blocks) as f64)
    });
    let suffix_pct = (mode == Mode::Generation).then(|| 100.0 * suffix as f64 / n);
    let mode_name = format!("{mode:?}").to_lowercase();
    if json {
        let v = serde_json::json!({
            "count": count, "mode": mode_name, "seq_length": seq, "seconds": secs,
            "samples_per_s": rate, "tokens_per_s": tokens_rate,
            "positions_used_percent": used_pct, "blocks_per_sample": blocks_per, "loss_tokens_per_sample": loss_per,
            "mean_span_length": spans.map(|s| s.0), "distribution_mean_span_length": spans.map(|s| s.1),
            "masked_percent": spans.map(|s| s.2), "suffix_form_percent": suffix_pct,
        });
        println!("{v}");
        return Ok(());
    }
    println!("samples: {count} {mode:?} samples of seq_length {seq} in {secs:.3} s = {rate:.0} samples/s ({:.2} M tokens/s)", tokens_rate / 1e6);
    println!("samples: {used_pct:.1}% of positions used (rest padding), {blocks_per:.1} Part B blocks per sample, {loss_per:.1} loss tokens per sample");
    if let Some((mean, dist, masked)) = spans {
        println!("samples: mean span length {mean:.2} (distribution mean {dist:.2}), {masked:.1}% of Part A+B tokens masked");
    }
    if let Some(p) = suffix_pct {
        println!("samples: {p:.1}% prefix/suffix form, the rest one blank in the middle");
    }
    Ok(())
}
