//! Building a token store at scale: the corpus is cut into units of input
//! bytes, each unit is read, parsed and tokenized by one of N worker
//! threads into a shard of its own, in a work directory beside the store
//! that survives an interruption (a rerun keeps the finished shards) and
//! that several processes may share (`--slice i/n`, then a join); when
//! every unit is done the directory is renamed into place as the store.
//!
//! - **Units.** The files, in corpus order, are cut every `shard_size`
//!   bytes of input (0: never, one shard). A record belongs to the unit in
//!   which it starts (`corpus::read_span`); a file that cannot be cut (a JSON
//!   array, the WuDao reader's JSON) is moved whole into the unit where it
//!   starts. So the store's documents, in order, are those of one pass over
//!   the corpus whatever the shard size, worker count or slicing.
//! - **Memory** does not grow with the corpus: a worker holds its 1 MiB
//!   read buffer, one record and its ids, and its write buffers (about 3 MB
//!   with the tokenizer's working memory for a document), plus the shared
//!   tokenizer. A JSON array is streamed record by record.
//! - **The work directory** `<parent>/.<name>.partial/` holds `plan.json`
//!   (the corpus fingerprint, tokenizer, reader settings, shard size and the
//!   units), `tokenizer.json`, the finished shards' files and a
//!   `<shard>.json` each, written last: a shard is done when its json
//!   exists. Shards are written under `tmp-<host>-<pid>/` and renamed in.
//!   Slices mark `slice-<i>-of-<n>.started` / `.done`.
//! - **Install.** `meta.json` (with the shards' manifest) is written, the
//!   directory renamed to the store's name (`store::replace_dir`), and the
//!   progress files removed from it. Tokens are never copied.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::corpus::{read_span, splittable, CorpusOptions, ReadStats, Reader};
use super::store::{self, BuildReport, CorpusFingerprint, ShardMeta, Span, StoreMeta, StoreWriter, TokenStore, FORMAT_VERSION, HEADER};
use super::tokenizer::{GlmTokenizer, SpecialIds, TokenizerType};
use crate::error::{Error, IoContext, Result};

/// How much input each shard is cut from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ShardSize {
    /// About 64 shards, each of 4 MiB to 1 GiB of input (whole MiB).
    #[default]
    Auto,
    /// At most this many input bytes per shard (a record that starts in a
    /// shard is read to its end); 0: the whole corpus is one shard.
    Bytes(u64),
}

impl ShardSize {
    /// `auto`, `0`, a number of bytes, or one with a binary suffix: `K`,
    /// `M`, `G`, `T` (optionally `KiB`, `MB`, ...: all powers of 1024), e.g.
    /// `256M`, `1G`, `1.5G`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(ShardSize::Auto);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => return Err(format!("unknown unit {unit:?}")),
        };
        let n: f64 = num.parse().map_err(|_| format!("{num:?} is not a number"))?;
        if !n.is_finite() || n < 0.0 || n * scale as f64 >= u64::MAX as f64 {
            return Err("out of range".into());
        }
        Ok(ShardSize::Bytes((n * scale as f64).round() as u64))
    }

    /// The input bytes per shard for a corpus of `total` bytes (0: one shard).
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            ShardSize::Bytes(b) => b,
            ShardSize::Auto => (total.div_ceil(64).div_ceil(1 << 20) << 20).clamp(4 << 20, 1 << 30),
        }
    }
}

impl std::fmt::Display for ShardSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardSize::Auto => f.write_str("auto"),
            ShardSize::Bytes(b) => f.write_str(&human_bytes(*b)),
        }
    }
}

/// `256 MiB`, `1.5 GiB`, `300 B`.
pub fn human_bytes(b: u64) -> String {
    let units = [(1u64 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (scale, name) in units {
        if b >= scale {
            let v = b as f64 / scale as f64;
            return if v.fract() == 0.0 { format!("{v:.0} {name}") } else { format!("{v:.2} {name}") };
        }
    }
    format!("{b} B")
}

/// One of `count` processes sharing a build: it tokenizes the units whose
/// number modulo `count` is `index` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub index: usize,
    pub count: usize,
}

impl Slice {
    /// `i/n` with `0 <= i < n`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let (i, n) = s.split_once('/').ok_or("expected i/n, e.g. 0/4")?;
        let parse = |v: &str| v.trim().parse::<usize>().map_err(|_| format!("{v:?} is not a number (expected i/n, e.g. 0/4)"));
        let (index, count) = (parse(i)?, parse(n)?);
        if count == 0 || index >= count {
            return Err(format!("expected i/n with 0 <= i < n (slices are numbered from 0: 0/{n} to {}/{n})", count.max(1) - 1));
        }
        Ok(Slice { index, count })
    }

    fn owns(&self, unit: usize) -> bool {
        unit % self.count == self.index
    }

    fn marker(&self, state: &str) -> String {
        format!("slice-{}-of-{}.{state}", self.index, self.count)
    }
}

impl std::fmt::Display for Slice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// How to build.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildOptions {
    /// Worker threads (0: one per core).
    pub workers: usize,
    pub shard_size: ShardSize,
    /// Only this slice's units, and no install.
    pub slice: Option<Slice>,
    /// Discard a partial build that slices work in, when its plan differs.
    pub force: bool,
}

impl BuildOptions {
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// What a build is: the same plan is the same store, so a partial build of
/// it can be continued.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Plan {
    format_version: u32,
    corpus: CorpusFingerprint,
    tokenizer_sha256: String,
    tokenizer_type: TokenizerType,
    vocab_size: usize,
    special: SpecialIds,
    reader: Reader,
    text_key: String,
    skip_malformed: bool,
    shard_size: u64,
    units: Vec<Vec<Span>>,
}

impl Plan {
    fn new(corpus: CorpusFingerprint, opts: &CorpusOptions, tok: &GlmTokenizer, shard_size: ShardSize) -> Self {
        let total: u64 = corpus.files.iter().map(|f| f.size).sum();
        let size = shard_size.bytes(total);
        let cut: Vec<(u64, bool)> = corpus.files.iter().map(|f| (f.size, splittable(&f.path, opts.reader))).collect();
        Plan {
            format_version: FORMAT_VERSION,
            tokenizer_sha256: tok.sha256.clone(),
            tokenizer_type: tok.tokenizer_type(),
            vocab_size: tok.vocab_size(),
            special: tok.special,
            reader: opts.reader,
            text_key: opts.text_key.clone(),
            skip_malformed: opts.skip_malformed,
            shard_size: size,
            units: units(&cut, size),
            corpus,
        }
    }

    /// Why `other` (a partial build's plan) is not this one, or `None`.
    fn differs(&self, other: &Plan) -> Option<String> {
        let key = |p: &Plan| p.corpus.files.iter().map(|f| (f.path.clone(), f.size, f.sha256.clone())).collect::<Vec<_>>();
        if key(self) != key(other) {
            return Some("another corpus (or the same files changed)".into());
        }
        if self.tokenizer_sha256 != other.tokenizer_sha256 || self.tokenizer_type != other.tokenizer_type {
            return Some("another tokenizer".into());
        }
        if (self.reader, &self.text_key, self.skip_malformed) != (other.reader, &other.text_key, other.skip_malformed) {
            return Some("other reader settings (reader, text_key, skip_malformed)".into());
        }
        if self.shard_size != other.shard_size || self.units != other.units || self.format_version != other.format_version {
            return Some(format!("another shard size ({} there, {} here)", human_bytes(other.shard_size), human_bytes(self.shard_size)));
        }
        None
    }

    fn unit_bytes(&self, u: usize) -> u64 {
        self.units[u].iter().map(|s| s.end - s.start).sum()
    }

    fn files(&self) -> Vec<PathBuf> {
        self.corpus.files.iter().map(|f| f.path.clone()).collect()
    }
}

/// The units of files of these sizes (and whether each can be cut) at
/// `size` input bytes each (0: one unit): spans of whole bytes, in order.
fn units(files: &[(u64, bool)], size: u64) -> Vec<Vec<Span>> {
    let size = if size == 0 { u64::MAX } else { size };
    let (mut out, mut cur, mut filled) = (Vec::new(), Vec::new(), 0u64);
    for (file, &(len, cut)) in files.iter().enumerate() {
        if !cut || len == 0 {
            cur.push(Span { file, start: 0, end: len });
            filled = filled.saturating_add(len);
        } else {
            let mut pos = 0;
            while pos < len {
                let take = (size - filled).min(len - pos);
                cur.push(Span { file, start: pos, end: pos + take });
                pos += take;
                filled += take;
                if filled >= size && pos < len {
                    out.push(std::mem::take(&mut cur));
                    filled = 0;
                }
            }
        }
        if filled >= size {
            out.push(std::mem::take(&mut cur));
            filled = 0;
        }
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

/// The name of unit `u`'s shard.
fn shard_name(u: usize) -> String {
    format!("shard-{u:05}")
}

/// What a finished shard's `<shard>.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ShardDone {
    #[serde(flatten)]
    shard: ShardMeta,
    bytes_per_token: u32,
    text_bytes: u64,
    empty: u64,
    skipped: u64,
    short: u64,
    unknown: u64,
    without_tokens: u64,
}

/// The work directory of the store at `out`.
pub fn partial_dir(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    out.with_file_name(format!(".{name}.partial"))
}

/// Unit `u`'s shard in `work`, when it is done: its record, and its files
/// there at the sizes the record gives.
fn done_shard(work: &Path, u: usize) -> Option<ShardDone> {
    let name = shard_name(u);
    let text = std::fs::read_to_string(work.join(format!("{name}.json"))).ok()?;
    let d: ShardDone = serde_json::from_str(&text).ok()?;
    let size = |f: String| std::fs::metadata(work.join(f)).map(|m| m.len()).ok();
    let tokens_ok = size(d.shard.tokens_file()) == Some(HEADER as u64 + d.shard.tokens * d.bytes_per_token as u64);
    let index_ok = size(d.shard.index_file()) == Some(HEADER as u64 + (d.shard.documents + 1) * 8);
    (d.shard.name == name && tokens_ok && index_ok).then_some(d)
}

/// How far a partial build is: the shards done, per unit.
fn progress(work: &Path, plan: &Plan) -> Vec<Option<ShardDone>> {
    (0..plan.units.len()).map(|u| done_shard(work, u)).collect()
}

/// The slices that have worked in `work`: (slice, finished).
fn slices_seen(work: &Path) -> Vec<(Slice, bool)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(work).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("slice-") else { continue };
        let Some((spec, state)) = rest.split_once('.') else { continue };
        let Some((i, n)) = spec.split_once("-of-") else { continue };
        if let (Ok(index), Ok(count)) = (i.parse(), n.parse()) {
            out.push((Slice { index, count }, state == "done"));
        }
    }
    out.sort_by_key(|(s, done)| (s.count, s.index, !done));
    out.dedup_by_key(|(s, _)| *s);
    out
}

/// What `build` did.
pub enum Built {
    /// The store is installed.
    Store(Box<StoreMeta>, BuildReport),
    /// A slice's units are done; `done` of `total` units are, over all slices.
    Slice { report: BuildReport, done: usize, total: usize },
}

/// Builds the store of `files` read with `corpus` and tokenized by `tok` at
/// `out` (replacing what is there: the caller decides whether it may), or
/// with a slice only that slice's shards. Continues a partial build of the
/// same plan; `progress` receives the input bytes done.
pub fn build(files: &[PathBuf], corpus: &CorpusOptions, tok: &GlmTokenizer, out: &Path, opts: &BuildOptions, progress: &dyn Fn(u64)) -> Result<Built> {
    let start = std::time::Instant::now();
    let fingerprint = CorpusFingerprint::compute(files)?;
    let plan = Plan::new(fingerprint, corpus, tok, opts.shard_size);
    let work = partial_dir(out);
    let discarded = prepare_work(&work, &plan, tok, opts)?;
    let result = (|| {
        let mut report = run(&work, &plan, corpus, tok, opts, progress)?;
        report.discarded = discarded;
        match opts.slice {
            Some(slice) => {
                std::fs::write(work.join(slice.marker("done")), "").at(&work)?;
                let done = progress_count(&work, &plan);
                report.seconds = start.elapsed().as_secs_f64();
                Ok(Built::Slice { report, done, total: plan.units.len() })
            }
            None => {
                let meta = install(&work, out, &plan, &mut report)?;
                report.seconds = start.elapsed().as_secs_f64();
                Ok(Built::Store(Box::new(meta), report))
            }
        }
    })();
    if let Err(e) = &result {
        // a corpus error: nothing to continue (the corpus must change, and
        // with it the plan); an I/O error (a full disk) keeps the finished
        // shards for a rerun, as do slices, which others may be working beside
        if opts.slice.is_none() && !matches!(e, Error::Io { .. }) {
            let _ = std::fs::remove_dir_all(&work);
        }
    }
    result
}

fn progress_count(work: &Path, plan: &Plan) -> usize {
    progress(work, plan).iter().filter(|d| d.is_some()).count()
}

/// Makes `work` hold `plan` (and the tokenizer): a partial build of it is
/// kept; one of another plan is removed (said in the returned note), or
/// refused when slices work in it (without `--force`) or this is a slice.
fn prepare_work(work: &Path, plan: &Plan, tok: &GlmTokenizer, opts: &BuildOptions) -> Result<Option<String>> {
    let mut note = None;
    if work.exists() {
        let theirs: Option<Plan> = std::fs::read_to_string(work.join("plan.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
        let why = match &theirs {
            Some(p) => plan.differs(p),
            None => Some("no readable plan".into()),
        };
        if let Some(why) = why {
            let slices = slices_seen(work);
            if opts.slice.is_some() || (!slices.is_empty() && !opts.force) {
                let who = if slices.is_empty() { String::new() } else { format!(" (slices {} work in it)", list_slices(&slices)) };
                return Err(Error::invalid(
                    work,
                    format!(
                        "a partial build of this store with {why}{who}: every slice must prepare the same corpus with the same tokenizer and settings; remove this directory (or run prepare without --slice and with --force) to start over"
                    ),
                ));
            }
            std::fs::remove_dir_all(work).at(work)?;
            note = Some(format!("discarded the partial build in {}: it was of {why}", work.display()));
        }
    }
    std::fs::create_dir_all(work).at(work)?;
    store::write_atomic(&work.join("plan.json"), serde_json::to_string_pretty(plan).expect("plan serializes").as_bytes())?;
    store::write_atomic(&work.join("tokenizer.json"), tok.to_json()?.as_bytes())?;
    if let Some(s) = opts.slice {
        std::fs::write(work.join(s.marker("started")), "").at(work)?;
    }
    Ok(note)
}

fn list_slices(slices: &[(Slice, bool)]) -> String {
    slices.iter().map(|(s, done)| format!("{s}{}", if *done { " (done)" } else { "" })).collect::<Vec<_>>().join(", ")
}

/// Tokenizes the units not yet done (of the slice, with one) on the
/// workers; the report counts this run's work.
fn run(work: &Path, plan: &Plan, corpus: &CorpusOptions, tok: &GlmTokenizer, opts: &BuildOptions, progress: &dyn Fn(u64)) -> Result<BuildReport> {
    let state = self::progress(work, plan);
    let todo: Vec<usize> = (0..plan.units.len()).filter(|&u| state[u].is_none() && opts.slice.is_none_or(|s| s.owns(u))).collect();
    let before: u64 = (0..plan.units.len()).filter(|&u| state[u].is_some()).map(|u| plan.unit_bytes(u)).sum();
    let workers = opts.worker_count().min(todo.len()).max(1);
    // fewer units than cores: each worker's encoding uses the thread pool too
    let pooled = todo.len() < opts.worker_count();
    let tmp = crate::runtime::host::temp_path(work, "tmp-");
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    let files = plan.files();
    let shared = Shared {
        plan,
        files: &files,
        corpus,
        tok,
        work,
        tmp: &tmp,
        pooled,
        todo: &todo,
        next: AtomicUsize::new(0),
        failed_at: AtomicUsize::new(usize::MAX),
        errors: Mutex::new(Vec::new()),
        bytes: AtomicU64::new(0),
        finished: AtomicUsize::new(0),
        kill_after: crate::test_hooks::prepare_kill_after(),
    };
    let built: Mutex<Vec<ShardDone>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        for _ in 0..workers {
            let tx = tx.clone();
            let (shared, built) = (&shared, &built);
            scope.spawn(move || {
                let _alive = tx;
                shared.work_loop(built);
            });
        }
        drop(tx);
        // progress from this thread (the callback need not be shared)
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(std::time::Duration::from_millis(100)) {
            progress(before + shared.bytes.load(Ordering::Relaxed));
        }
    });
    let _ = std::fs::remove_dir_all(&tmp);
    let mut errors = shared.errors.into_inner().unwrap_or_else(|e| e.into_inner());
    errors.sort_by_key(|(u, _)| *u);
    if let Some((_, e)) = errors.into_iter().next() {
        return Err(e);
    }
    progress(before + shared.bytes.load(Ordering::Relaxed));
    let built = built.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok(BuildReport {
        shards: plan.units.len(),
        shards_built: built.len(),
        input_bytes: todo.iter().map(|&u| plan.unit_bytes(u)).sum(),
        text_bytes: built.iter().map(|d| d.text_bytes).sum(),
        tokens: built.iter().map(|d| d.shard.tokens).sum(),
        workers: if todo.is_empty() { 0 } else { workers },
        shard_size: plan.shard_size,
        ..BuildReport::default()
    })
}

/// What the workers share.
struct Shared<'a> {
    plan: &'a Plan,
    files: &'a [PathBuf],
    corpus: &'a CorpusOptions,
    tok: &'a GlmTokenizer,
    work: &'a Path,
    tmp: &'a Path,
    pooled: bool,
    todo: &'a [usize],
    next: AtomicUsize,
    /// The lowest unit that failed: later units stop, earlier ones finish
    /// (one of them may fail first in corpus order, as one pass would).
    failed_at: AtomicUsize,
    errors: Mutex<Vec<(usize, Error)>>,
    /// Input bytes read by this run.
    bytes: AtomicU64,
    finished: AtomicUsize,
    kill_after: Option<usize>,
}

impl Shared<'_> {
    fn work_loop(&self, built: &Mutex<Vec<ShardDone>>) {
        loop {
            let k = self.next.fetch_add(1, Ordering::SeqCst);
            let Some(&u) = self.todo.get(k) else { return };
            if u > self.failed_at.load(Ordering::SeqCst) {
                return;
            }
            match self.unit(u) {
                Ok(Some(done)) => {
                    built.lock().unwrap_or_else(|e| e.into_inner()).push(done);
                    let n = self.finished.fetch_add(1, Ordering::SeqCst) + 1;
                    if self.kill_after == Some(n) {
                        // SAFETY: signalling this process (a test hook: a kill mid-prepare).
                        unsafe { libc::raise(libc::SIGKILL) };
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    self.failed_at.fetch_min(u, Ordering::SeqCst);
                    self.errors.lock().unwrap_or_else(|e| e.into_inner()).push((u, e));
                    return;
                }
            }
        }
    }

    /// Tokenizes unit `u` into its shard; `None` when it gave up because an
    /// earlier unit failed.
    fn unit(&self, u: usize) -> Result<Option<ShardDone>> {
        let name = shard_name(u);
        let meta = ShardMeta { name: name.clone(), documents: 0, tokens: 0, input: self.plan.units[u].clone() };
        let (tmp_tokens, tmp_index) = (self.tmp.join(meta.tokens_file()), self.tmp.join(meta.index_file()));
        let mut w = StoreWriter::create_at(&tmp_tokens, &tmp_index, self.tok.vocab_size())?;
        let (mut stats, mut unknown, mut without) = (ReadStats::default(), 0u64, 0u64);
        let unk = self.tok.text_unk();
        let mut push = |ids: &[u32], w: &mut StoreWriter| -> Result<()> {
            if ids.is_empty() {
                without += 1;
                return Ok(());
            }
            unknown += ids.iter().filter(|&&i| Some(i) == unk).count() as u64;
            w.push(ids)
        };
        let (mut ids, mut batch, mut batch_bytes) = (Vec::new(), Vec::new(), 0usize);
        let mut gave_up = false;
        for span in &meta.input {
            let mut counted = span.start;
            let mut count = |pos: u64| {
                let pos = pos.clamp(span.start, span.end.max(span.start));
                if pos > counted {
                    self.bytes.fetch_add(pos - counted, Ordering::Relaxed);
                    counted = pos;
                }
            };
            let go_on = read_span(&self.files[span.file], span.start, span.end, self.corpus, &mut stats, &mut |text, pos| {
                if self.failed_at.load(Ordering::Relaxed) < u {
                    gave_up = true;
                    return Ok(false);
                }
                if self.pooled {
                    batch_bytes += text.len();
                    batch.push(text);
                    if batch_bytes >= 1 << 20 || batch.len() >= 1024 {
                        for ids in self.tok.encode_batch(std::mem::take(&mut batch))? {
                            push(&ids, &mut w)?;
                        }
                        batch_bytes = 0;
                    }
                } else {
                    ids.clear();
                    self.tok.encode_into(&text, &mut ids)?;
                    push(&ids, &mut w)?;
                }
                count(pos);
                Ok(true)
            })?;
            if !go_on || gave_up {
                return Ok(None);
            }
            count(span.end);
        }
        for ids in self.tok.encode_batch(std::mem::take(&mut batch))? {
            push(&ids, &mut w)?;
        }
        let (documents, tokens, width) = w.finish()?;
        let done = ShardDone {
            shard: ShardMeta { documents, tokens, ..meta },
            bytes_per_token: width,
            text_bytes: stats.text_bytes,
            empty: stats.empty,
            skipped: stats.skipped,
            short: stats.short,
            unknown,
            without_tokens: without,
        };
        let (tokens_file, index_file) = (done.shard.tokens_file(), done.shard.index_file());
        for (from, name) in [(&tmp_tokens, &tokens_file), (&tmp_index, &index_file)] {
            let to = self.work.join(name);
            std::fs::rename(from, &to).at(&to)?;
        }
        let record = self.tmp.join(format!("{name}.json"));
        std::fs::write(&record, serde_json::to_string_pretty(&done).expect("shard record serializes")).at(&record)?;
        std::fs::rename(&record, self.work.join(format!("{name}.json"))).at(self.work)?;
        Ok(Some(done))
    }
}

/// Writes the store's `meta.json` from the finished shards of `work`,
/// checks the store, renames it to `out` and removes the progress files.
/// Fills `report`'s totals.
fn install(work: &Path, out: &Path, plan: &Plan, report: &mut BuildReport) -> Result<StoreMeta> {
    let state = progress(work, plan);
    let missing: Vec<usize> = (0..state.len()).filter(|&u| state[u].is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::invalid(work, missing_units(work, &missing, plan.units.len())));
    }
    let done: Vec<ShardDone> = state.into_iter().flatten().collect();
    let mut stats = ReadStats::default();
    let (mut unknown, mut without) = (0u64, 0u64);
    for d in &done {
        stats.documents += d.shard.documents + d.without_tokens;
        stats.empty += d.empty;
        stats.skipped += d.skipped;
        stats.short += d.short;
        stats.text_bytes += d.text_bytes;
        unknown += d.unknown;
        without += d.without_tokens;
    }
    let documents: u64 = done.iter().map(|d| d.shard.documents).sum();
    if documents == 0 {
        let files = plan.files();
        return Err(Error::invalid(super::corpus::corpus_name(&files), "the corpus holds no documents with text"));
    }
    let meta = StoreMeta {
        format_version: FORMAT_VERSION,
        created_by: format!("glm-worker {}", env!("CARGO_PKG_VERSION")),
        tokenizer_sha256: plan.tokenizer_sha256.clone(),
        tokenizer_type: plan.tokenizer_type,
        vocab_size: plan.vocab_size,
        special: plan.special,
        bytes_per_token: store::token_width(plan.vocab_size),
        documents,
        tokens: done.iter().map(|d| d.shard.tokens).sum(),
        text_bytes: stats.text_bytes,
        empty_documents: stats.empty,
        skipped_records: stats.skipped,
        unknown_tokens: Some(unknown),
        corpus: plan.corpus.clone(),
        reader: plan.reader,
        text_key: Some(plan.text_key.clone()),
        short_records: stats.short,
        shards: done.iter().map(|d| d.shard.clone()).collect(),
    };
    store::write_meta(work, &meta)?;
    // every shard mapped and checked before the store takes the name
    drop(TokenStore::open_with(work, meta.clone())?);
    // what interrupted processes (of any host) left: nobody writes here once every shard is done
    for e in std::fs::read_dir(work).at(work)?.flatten() {
        if e.file_name().to_string_lossy().starts_with("tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    store::replace_dir(work, out)?;
    for e in std::fs::read_dir(out).at(out)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let progress_file = name == "plan.json" || name.starts_with("slice-") || (name.starts_with("shard-") && name.ends_with(".json"));
        if progress_file {
            let _ = std::fs::remove_file(e.path());
        }
    }
    report.stats = stats;
    report.documents_without_tokens = without;
    report.shards = plan.units.len();
    Ok(meta)
}

/// "units 3, 5 of 8 are not done (slice 1/2: started, not finished)".
fn missing_units(work: &Path, missing: &[usize], total: usize) -> String {
    let list = |v: &[usize]| {
        let shown: Vec<String> = v.iter().take(10).map(|u| u.to_string()).collect();
        let more = if v.len() > 10 { format!(" and {} more", v.len() - 10) } else { String::new() };
        format!("{}{more}", shown.join(", "))
    };
    let slices = slices_seen(work);
    let mut owners = Vec::new();
    if let Some(n) = slices.iter().map(|(s, _)| s.count).max() {
        for i in 0..n {
            let s = Slice { index: i, count: n };
            if missing.iter().any(|&u| s.owns(u)) {
                let state = match slices.iter().find(|(x, _)| *x == s) {
                    Some((_, true)) => "done, yet units missing (removed?)",
                    Some((_, false)) => "started, not finished",
                    None => "not run",
                };
                owners.push(format!("slice {s}: {state}"));
            }
        }
    }
    let owners = if owners.is_empty() { String::new() } else { format!(" ({})", owners.join("; ")) };
    format!("{} of {total} shards not done: unit{} {}{owners}", missing.len(), if missing.len() == 1 { "" } else { "s" }, list(missing))
}

/// Installs the store at `out` from the partial build that slices made
/// (all its units done), renaming it into place without copying tokens.
/// `guard` says why `out` may not be replaced (a store of another corpus or
/// tokenizer), unless `force`. `files`, when given, must be the plan's.
pub fn join(out: &Path, files: Option<&[PathBuf]>, force: bool, guard: &dyn Fn(&str) -> String) -> Result<(StoreMeta, BuildReport)> {
    let start = std::time::Instant::now();
    let work = partial_dir(out);
    if !work.join("plan.json").is_file() {
        return Err(Error::invalid(&work, "no partial build of this store to join (prepare --slice i/n makes one)"));
    }
    let mut plan: Plan = glm_common::text::read_json(&work.join("plan.json"), "a partial build's plan.json")?;
    let ours = plan.files();
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    if let Some(files) = files {
        if files.iter().map(|p| canon(p)).ne(ours.iter().map(|p| canon(p))) {
            return Err(Error::invalid(
                &work,
                format!("the partial build is of another corpus ({}): give prepare its --data or none", super::corpus::corpus_name(&ours).display()),
            ));
        }
    }
    let now = CorpusFingerprint::compute_with(&ours, Some(&plan.corpus))?;
    if let Some((f, _)) = now.files.iter().zip(&plan.corpus.files).find(|(a, b)| a.sha256 != b.sha256 || a.size != b.size) {
        return Err(Error::invalid(&f.path, "changed since the slices read it; prepare the store again"));
    }
    plan.corpus = now;
    if !force {
        let answers = |sha: &str| sha == plan.tokenizer_sha256;
        if let Some(whose) = store::foreign_to(out, &ours, plan.tokenizer_type, &answers) {
            return Err(Error::invalid(out, guard(&whose)));
        }
    }
    let mut report = BuildReport { shard_size: plan.shard_size, ..BuildReport::default() };
    let meta = install(&work, out, &plan, &mut report)?;
    report.seconds = start.elapsed().as_secs_f64();
    Ok((meta, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_sizes_and_slices_parse_or_say_why() {
        assert_eq!(ShardSize::parse("auto"), Ok(ShardSize::Auto));
        assert_eq!(ShardSize::parse("0"), Ok(ShardSize::Bytes(0)));
        assert_eq!(ShardSize::parse("300"), Ok(ShardSize::Bytes(300)));
        assert_eq!(ShardSize::parse("256M"), Ok(ShardSize::Bytes(256 << 20)));
        assert_eq!(ShardSize::parse("1G"), Ok(ShardSize::Bytes(1 << 30)));
        assert_eq!(ShardSize::parse("1.5GiB"), Ok(ShardSize::Bytes(3 << 29)));
        assert_eq!(ShardSize::parse("64 kb"), Ok(ShardSize::Bytes(64 << 10)));
        for bad in ["", "M", "12X", "-1", "1e3", "1..2G"] {
            assert!(ShardSize::parse(bad).is_err(), "{bad}");
        }
        // auto: about 64 shards of 4 MiB to 1 GiB
        assert_eq!(ShardSize::Auto.bytes(2 << 20), 4 << 20);
        assert_eq!(ShardSize::Auto.bytes(2 << 30), 32 << 20);
        assert_eq!(ShardSize::Auto.bytes(1 << 40), 1 << 30);
        assert_eq!(Slice::parse("1/2"), Ok(Slice { index: 1, count: 2 }));
        for bad in ["2/2", "3/2", "0/0", "1", "a/2", "1/b"] {
            assert!(Slice::parse(bad).is_err(), "{bad}");
        }
        assert!(Slice::parse("3/2").unwrap_err().contains("0 <= i < n"));
    }

    #[test]
    fn units_cut_splittable_files_and_keep_whole_ones_whole() {
        let sp = |file, start, end| Span { file, start, end };
        // 10 + 25 (whole) + 12 bytes at 10 a unit
        let u = units(&[(10, true), (25, false), (12, true)], 10);
        assert_eq!(u, vec![vec![sp(0, 0, 10)], vec![sp(1, 0, 25)], vec![sp(2, 0, 10)], vec![sp(2, 10, 12)]]);
        // files shorter than a unit share it; an empty file is kept (it may be an error to report)
        let u = units(&[(3, true), (0, false), (4, true), (9, true)], 10);
        assert_eq!(u, vec![vec![sp(0, 0, 3), sp(1, 0, 0), sp(2, 0, 4), sp(3, 0, 3)], vec![sp(3, 3, 9)]]);
        // one unit for size 0, and for an empty corpus
        assert_eq!(units(&[(3, true), (5, false)], 0), vec![vec![sp(0, 0, 3), sp(1, 0, 5)]]);
        assert_eq!(units(&[], 7), vec![Vec::<Span>::new()]);
        // every byte in exactly one span, in order
        let files = [(17, true), (5, true), (40, false), (33, true)];
        for size in 1..50 {
            let u = units(&files, size);
            let flat: Vec<Span> = u.iter().flatten().copied().collect();
            for (f, &(len, _)) in files.iter().enumerate() {
                let mine: Vec<&Span> = flat.iter().filter(|s| s.file == f).collect();
                assert_eq!(mine.first().unwrap().start, 0);
                assert_eq!(mine.last().unwrap().end, len);
                assert!(mine.windows(2).all(|w| w[0].end == w[1].start));
            }
            // a unit ends once it holds `size` bytes; a whole file may overfill it
            assert!(u.iter().all(|unit| unit.iter().map(|s| s.end - s.start).sum::<u64>() < size + 40), "{size}");
        }
    }

    fn seed_vocab() -> GlmTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed/vocab.txt");
        assert!(p.is_file(), "{} missing: tests need the shared seed folder beside the checkout", p.display());
        GlmTokenizer::load(&p, &Default::default()).unwrap()
    }

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn built(files: &[PathBuf], corpus: &CorpusOptions, tok: &GlmTokenizer, out: &Path, shard_size: u64, workers: usize) -> Result<(StoreMeta, BuildReport)> {
        let opts = BuildOptions { workers, shard_size: ShardSize::Bytes(shard_size), ..Default::default() };
        let last = std::cell::Cell::new(0);
        match build(files, corpus, tok, out, &opts, &|b| last.set(b))? {
            Built::Store(meta, report) => {
                let meta = *meta;
                assert_eq!(last.get(), files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum::<u64>(), "progress ends at the corpus's size");
                Ok((meta, report))
            }
            Built::Slice { .. } => unreachable!(),
        }
    }

    /// Every format, both readers: a store cut into shards of a few bytes
    /// (through lines, documents, characters), tokenized by 1 or 3 workers,
    /// holds the documents of the unsharded store, token for token, and the
    /// same counts.
    #[test]
    fn sharded_stores_equal_the_unsharded_one() {
        let tok = seed_vocab();
        let d = tempfile::tempdir().unwrap();
        let plain = d.path().join("plain");
        std::fs::create_dir(&plain).unwrap();
        let long = "明月光".repeat(40);
        write(
            &plain,
            "a.json",
            &serde_json::json!([{"title": "静夜思", "content": "床前明月光，疑是地上霜。"}, {"content": "  "}, {"content": long}]).to_string(),
        );
        write(&plain, "b.jsonl", "\u{feff}{\"text\": \"Hello world, this is GLM.\"}\n\n{\"title\": \"春晓\", \"content\": \"春眠不觉晓，处处闻啼鸟。\"}\n{\"text\": \"[MASK] 一 [gMASK]\"}\n{\"text\": \"\"}\n");
        write(&plain, "c.txt", &format!("first doc\nline two 二\n\n\n\nsecond “doc”\r\n\u{3000}\r\n{long}\nmore\n\n\n{long}"));
        write(&plain, "d.txt", "");
        write(&plain, "e.txt", "x");
        let wudao = d.path().join("wudao");
        std::fs::create_dir(&wudao).unwrap();
        let rec = |t: &str, c: &str| serde_json::json!({"title": t, "content": c});
        write(&wudao, "w1.json", &serde_json::json!({"RECORDS": [rec(" 题 ", &long), rec("短", "太短")]}).to_string());
        write(&wudao, "w2.jsonl", &format!("{}\n{}\n", rec("", &format!("{long}长")), rec("t", "短")));
        write(&wudao, "w3", &serde_json::json!([rec("标题", &long)]).to_string());
        let cases = [
            (&plain, CorpusOptions::default()),
            (&plain, CorpusOptions { skip_malformed: true, ..Default::default() }),
            (&wudao, CorpusOptions { reader: Reader::WuDao, ..Default::default() }),
        ];
        for (n, (dir, corpus)) in cases.iter().enumerate() {
            let files = super::super::corpus::corpus_files(dir).unwrap();
            let (one, _) = built(&files, corpus, &tok, &d.path().join(format!("one-{n}")), 0, 1).unwrap();
            assert_eq!(one.shards.len(), 1);
            let whole = TokenStore::open(&d.path().join(format!("one-{n}"))).unwrap();
            for (size, workers) in [(23, 1), (23, 3), (97, 2), (300, 3), (1 << 20, 2)] {
                let out = d.path().join(format!("s-{n}-{size}-{workers}"));
                let (meta, report) = built(&files, corpus, &tok, &out, size, workers).unwrap();
                let st = TokenStore::open(&out).unwrap();
                assert_eq!(st.num_docs(), whole.num_docs(), "{n}: {size} bytes a shard, {workers} workers");
                for i in 0..st.num_docs() {
                    assert_eq!(st.doc(i), whole.doc(i), "{n}: document {i}, {size} bytes a shard, {workers} workers");
                }
                let counts = |m: &StoreMeta| (m.documents, m.tokens, m.text_bytes, m.empty_documents, m.skipped_records, m.short_records, m.unknown_tokens);
                assert_eq!(counts(&meta), counts(&one));
                assert_eq!(report.shards, meta.shards.len());
                assert!(size > 1000 || meta.shards.len() > 2, "{n}: {size}: {} shards", meta.shards.len());
                // only the store is left: no work directory, no progress files in it
                assert!(!partial_dir(&out).exists());
                let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
                names.retain(|n| !n.starts_with("shard-") || n.ends_with(".json"));
                names.sort();
                assert_eq!(names, ["meta.json", "tokenizer.json"]);
            }
        }
    }

    /// A corpus error is the one a single pass meets first, whichever worker
    /// reads it, and leaves nothing behind; so does a corpus without text.
    #[test]
    fn errors_are_the_first_in_corpus_order_and_leave_nothing() {
        let tok = seed_vocab();
        let d = tempfile::tempdir().unwrap();
        let corpus = d.path().join("c");
        std::fs::create_dir(&corpus).unwrap();
        let good: String = (0..40).map(|i| format!("{{\"text\": \"line {i} 行\"}}\n")).collect();
        write(&corpus, "a.jsonl", &format!("{good}{{\"text\": 7}}\n{good}{{oops\n{good}"));
        write(&corpus, "b.txt", "ab\u{fffd}\n");
        std::fs::write(corpus.join("c.txt"), b"fine\n\nbad \xff\n").unwrap();
        let files = super::super::corpus::corpus_files(&corpus).unwrap();
        let one = built(&files, &CorpusOptions::default(), &tok, &d.path().join("one"), 0, 1).err().unwrap().to_string();
        assert!(one.contains("a.jsonl:41:1: \"text\" must be a string, found a number"), "{one}");
        for (size, workers) in [(50, 3), (200, 2), (7, 1)] {
            let out = d.path().join("store");
            let e = built(&files, &CorpusOptions::default(), &tok, &out, size, workers).err().unwrap().to_string();
            assert_eq!(e, one, "{size} bytes a shard, {workers} workers");
            assert!(!out.exists() && !partial_dir(&out).exists());
        }
        let skip = CorpusOptions { skip_malformed: true, ..Default::default() };
        let e = built(&files, &skip, &tok, &d.path().join("store"), 50, 2).err().unwrap().to_string();
        assert!(e.contains("c.txt:3:5: not UTF-8 (byte 0xFF)"), "{e}");
        let empty = write(d.path(), "empty.jsonl", "{\"text\": \"\"}\n\n");
        let e = built(&[empty], &CorpusOptions::default(), &tok, &d.path().join("store"), 5, 2).err().unwrap().to_string();
        assert!(e.ends_with("empty.jsonl: the corpus holds no documents with text"), "{e}");
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["c", "empty.jsonl"], "only the corpus");
    }
}
