//! Obtaining a tokenizer and an up-to-date token store for a corpus: shared
//! by `glm-worker prepare` and by training, which prepares on demand.

use std::path::{Path, PathBuf};

use super::build::{self, BuildOptions, Built, ShardSize, Slice};
pub use super::corpus::corpus_name;
use super::corpus::{read_corpus_while, CorpusOptions};
pub use super::store::TokenizerOption;
use super::store::{self, BuildReport, CorpusFingerprint, StoreMeta};
use super::tokenizer::{GlmTokenizer, TokenizerSpec};
use crate::error::{Error, IoContext, Result};

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub corpus: CorpusOptions,
    /// Vocabulary size when a tokenizer is trained.
    pub vocab_size: usize,
    /// Where trained tokenizers are cached.
    pub tokenizer_cache: PathBuf,
    /// At most this many bytes of text train a tokenizer.
    pub tokenizer_train_bytes: usize,
    pub force: bool,
    pub show_progress: bool,
    /// The tokenizer asked for (type, casing, command-token layout); a
    /// trained one is cached under a name of its own per spec. `None`: a
    /// given `tokenizer.json` is taken as it was saved (its own type and
    /// layout), and a trained one is the default's.
    pub spec: Option<TokenizerSpec>,
    /// How the caller's user names the tokenizer option, for hints:
    /// `prepare`'s `--tokenizer` or training's `tokenizer_path`.
    pub tokenizer_option: TokenizerOption,
    /// A command that must not replace a store built for another corpus or
    /// tokenizer (`None`: training, which owns its store and rebuilds it).
    pub guard: Option<StoreGuard>,
    /// Worker threads that tokenize (0: one per core).
    pub workers: usize,
    /// Input bytes per shard of the store.
    pub shard_size: ShardSize,
}

/// How a command that does not own a store names its way out of replacing
/// one: its command, the option that gives it a store of its own, and the
/// flag that replaces the store anyway.
#[derive(Clone, Copy, Debug)]
pub struct StoreGuard {
    pub command: &'static str,
    pub store_option: &'static str,
    pub rebuild_flag: &'static str,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            corpus: CorpusOptions::default(),
            vocab_size: 16000,
            tokenizer_cache: PathBuf::from("glm_pretrain/model"),
            tokenizer_train_bytes: 512 << 20,
            force: false,
            show_progress: false,
            spec: Some(TokenizerSpec::default()),
            tokenizer_option: TokenizerOption::Flag,
            guard: None,
            workers: 0,
            shard_size: ShardSize::Auto,
        }
    }
}

/// Where the tokenizer came from, for the report.
pub enum TokenizerOrigin {
    Given(PathBuf),
    Cached(PathBuf),
    Trained { path: PathBuf, model: &'static str, text_bytes: usize, seconds: f64 },
}

impl std::fmt::Display for TokenizerOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerOrigin::Given(p) => write!(f, "{}", p.display()),
            TokenizerOrigin::Cached(p) => write!(f, "{} (cached, trained on this corpus)", p.display()),
            TokenizerOrigin::Trained { path, model, text_bytes, seconds } => {
                write!(f, "{} (trained {model} on {:.2} MB in {seconds:.1} s)", path.display(), *text_bytes as f64 / 1e6)
            }
        }
    }
}

/// The given tokenizer, or the one cached for this corpus, or a new one
/// trained on it. The cache is named by the corpus content; files that the
/// store at `store` (if any) recorded with the same size and mtime are not
/// read again to compute it.
pub fn obtain_tokenizer(files: &[PathBuf], given: Option<&Path>, store: &Path, opts: &PrepareOptions) -> Result<(GlmTokenizer, TokenizerOrigin)> {
    let spec = opts.spec.unwrap_or_default();
    if let Some(p) = given {
        if !p.exists() {
            return Err(Error::invalid(p, format!("tokenizer: no such file or folder; hint: {}", opts.tokenizer_option.hint(spec.kind))));
        }
        let tok = match &opts.spec {
            Some(s) => GlmTokenizer::load(p, s)?,
            None => GlmTokenizer::load_saved(p)?,
        };
        return Ok((tok, TokenizerOrigin::Given(p.to_path_buf())));
    }
    if opts.vocab_size < 64 {
        // the same flag in `prepare` and in training
        return Err(Error::Config(format!("--vocab-size {}: must be at least 64 to train a tokenizer", opts.vocab_size)));
    }
    let known = store::read_meta(store).ok().map(|m| m.corpus);
    let fp = CorpusFingerprint::compute_with(files, known.as_ref())?;
    // trained on other texts, another tokenizer: the WuDao reader's has a name of its own
    let reader = if opts.corpus.reader == super::corpus::Reader::WuDao { "-wudao" } else { "" };
    let cache = opts.tokenizer_cache.join(format!("tokenizer-{}-v{}{}{reader}.json", &fp.digest[..12], opts.vocab_size, spec.cache_suffix()));
    if cache.is_file() {
        return Ok((GlmTokenizer::load(&cache, &spec)?, TokenizerOrigin::Cached(cache)));
    }
    let mut texts = Vec::new();
    let mut bytes = 0usize;
    read_corpus_while(files, &opts.corpus, |t, _| {
        bytes += t.len();
        texts.push(t);
        Ok(bytes < opts.tokenizer_train_bytes)
    })?;
    if texts.is_empty() {
        return Err(Error::invalid(corpus_name(files), "the corpus holds no documents with text"));
    }
    let t0 = std::time::Instant::now();
    let tok = GlmTokenizer::train(texts.into_iter(), opts.vocab_size, opts.show_progress, &spec)?;
    std::fs::create_dir_all(&opts.tokenizer_cache).at(&opts.tokenizer_cache)?;
    let cache_name = cache.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let tmp = crate::runtime::host::temp_path(&opts.tokenizer_cache, &format!("{cache_name}.tmp-"));
    std::fs::write(&tmp, tok.to_json()?).at(&tmp)?;
    std::fs::rename(&tmp, &cache).at(&cache)?;
    Ok((tok, TokenizerOrigin::Trained { path: cache, model: spec.kind.trained_model(), text_bytes: bytes, seconds: t0.elapsed().as_secs_f64() }))
}

/// The store of a run's valid_data or test_data (`which`) beside its
/// training store: `<store>-valid`, `<store>-test`.
pub fn beside_store(store: &Path, which: &str) -> PathBuf {
    let name = store.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    store.with_file_name(format!("{name}-{which}"))
}

pub enum StoreOutcome {
    Reused,
    /// Built; `reason` says why an existing store was replaced.
    Built {
        report: BuildReport,
        reason: Option<String>,
    },
}

impl PrepareOptions {
    fn build_options(&self, slice: Option<Slice>) -> BuildOptions {
        BuildOptions { workers: self.workers, shard_size: self.shard_size, slice, force: self.force }
    }

    /// The refusal to replace a store that is `whose` (another corpus's or
    /// tokenizer's), for a command with a guard.
    fn refusal(&self, whose: &str) -> Option<String> {
        let g = self.guard?;
        Some(format!(
            "this token store does not match what {} needs: {whose}; {} does not replace a store it did not build (it may be a training run's): give it a store of its own ({} <new dir>), or {} to replace this one",
            g.command, g.command, g.store_option, g.rebuild_flag
        ))
    }
}

/// Reuses the store at `out` when it matches corpus and tokenizer, else
/// builds it (continuing a partial build of the same corpus, tokenizer and
/// settings that was interrupted, or that slices made).
pub fn ensure_store(files: &[PathBuf], tok: &GlmTokenizer, out: &Path, opts: &PrepareOptions, progress: &dyn Fn(u64)) -> Result<(StoreMeta, StoreOutcome)> {
    let why = store::staleness(out, files, tok, &opts.corpus)?;
    if why.is_none() && !opts.force {
        return Ok((store::read_meta(out)?, StoreOutcome::Reused));
    }
    if let Some(refusal) = why.as_ref().filter(|_| !opts.force).and(store::foreign(out, files, tok)).and_then(|whose| opts.refusal(&whose)) {
        return Err(Error::invalid(out, refusal));
    }
    let reason = if opts.force { Some("--force".to_string()) } else { why.filter(|_| out.exists()) };
    match build::build(files, &opts.corpus, tok, out, &opts.build_options(None), progress)? {
        Built::Store(meta, report) => Ok((*meta, StoreOutcome::Built { report, reason })),
        Built::Slice { .. } => unreachable!("a build without a slice installs the store"),
    }
}

/// What `prepare_slice` did.
pub enum SliceOutcome {
    /// The store is there and up to date: nothing to do.
    UpToDate,
    /// The slice's shards are done; `done` of `total` over all slices.
    Done { report: BuildReport, done: usize, total: usize },
}

/// Tokenizes the shards of `slice` into the partial build of the store at
/// `out`, which `join_store` installs once every slice is done.
pub fn prepare_slice(files: &[PathBuf], tok: &GlmTokenizer, out: &Path, slice: Slice, opts: &PrepareOptions, progress: &dyn Fn(u64)) -> Result<SliceOutcome> {
    let why = store::staleness(out, files, tok, &opts.corpus)?;
    if why.is_none() && !opts.force {
        return Ok(SliceOutcome::UpToDate);
    }
    if let Some(refusal) = (!opts.force).then(|| store::foreign(out, files, tok)).flatten().and_then(|whose| opts.refusal(&whose)) {
        return Err(Error::invalid(out, refusal));
    }
    match build::build(files, &opts.corpus, tok, out, &opts.build_options(Some(slice)), progress)? {
        Built::Slice { report, done, total } => Ok(SliceOutcome::Done { report, done, total }),
        Built::Store(..) => unreachable!("a slice does not install the store"),
    }
}

/// Installs the store at `out` from its partial build once every slice is
/// done, without copying tokens; `files` (when given) must be its corpus.
pub fn join_store(out: &Path, files: Option<&[PathBuf]>, opts: &PrepareOptions) -> Result<(StoreMeta, BuildReport)> {
    build::join(out, files, opts.force, &|whose| opts.refusal(whose).unwrap_or_else(|| whose.to_string()))
}
