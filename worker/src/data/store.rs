//! The token store: a corpus tokenized once, memory-mapped by every run.
//!
//! A store is a directory:
//! - `tokens.bin`: 32-byte header (`GLMTOKS\0`, format version u32, bytes per
//!   token u32 — 2 when the vocabulary fits in u16, else 4 — token count u64,
//!   reserved u64) followed by all documents' token ids, little-endian.
//! - `index.bin`: 32-byte header (`GLMIDX\0\0`, version, 8, entry count,
//!   reserved) followed by `documents + 1` u64 offsets into the token array.
//! - `meta.json`: counts, the tokenizer's sha256 and special ids, and the
//!   corpus fingerprint (per file: size, mtime, sha256).
//! - `tokenizer.json`: the tokenizer that produced the ids.
//!
//! A store is built in a temporary sibling directory and renamed into place,
//! so a crash never leaves a half-written store under the final name. When
//! the corpus (by content) or the tokenizer (by hash) changes, the store is
//! out of date and is rebuilt rather than reused.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::{read_corpus, CorpusOptions, ReadStats, Reader};
use super::tokenizer::{hex, GlmTokenizer, SpecialIds, TokenizerType};
use crate::error::{Error, IoContext, Result};

const TOKENS_MAGIC: &[u8; 8] = b"GLMTOKS\0";
const INDEX_MAGIC: &[u8; 8] = b"GLMIDX\0\0";
pub const FORMAT_VERSION: u32 = 1;
const HEADER: usize = 32;

#[cfg(not(target_endian = "little"))]
compile_error!("the token store format is little-endian; big-endian hosts are not supported");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileFingerprint {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
    pub sha256: String,
}

/// Identity of a corpus: its files, in order, by content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusFingerprint {
    pub files: Vec<FileFingerprint>,
    /// sha256 over the files' names (relative to the corpus root) and digests.
    pub digest: String,
}

fn mtime_ns(meta: &std::fs::Metadata) -> u128 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos())
}

/// sha256 (hex) of a file's content, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Content hashes computed by this process, by (path, size, mtime): a
/// training start names the cached tokenizer and may rebuild the store from
/// the same corpus, and should read it for hashing once.
static HASHED: std::sync::Mutex<Vec<FileFingerprint>> = std::sync::Mutex::new(Vec::new());

impl CorpusFingerprint {
    pub fn compute(files: &[PathBuf]) -> Result<Self> {
        Self::compute_with(files, None)
    }

    /// As `compute`, but a file whose path, size and mtime equal an entry of
    /// `known` (e.g. the fingerprint an existing store recorded) keeps that
    /// entry's hash instead of being read again — the rule `matches` uses.
    pub fn compute_with(files: &[PathBuf], known: Option<&CorpusFingerprint>) -> Result<Self> {
        let mut out = Vec::with_capacity(files.len());
        for p in files {
            let meta = std::fs::metadata(p).at(p)?;
            let (size, mtime) = (meta.len(), mtime_ns(&meta));
            let same = |f: &&FileFingerprint| f.path == *p && f.size == size && f.mtime_ns == mtime;
            let memo = HASHED.lock().unwrap_or_else(|e| e.into_inner()).iter().find(same).map(|f| f.sha256.clone());
            let sha256 = match known.and_then(|k| k.files.iter().find(same)).map(|f| f.sha256.clone()).or(memo) {
                Some(h) => h,
                None => {
                    let h = sha256_file(p)?;
                    let f = FileFingerprint { path: p.clone(), size, mtime_ns: mtime, sha256: h.clone() };
                    HASHED.lock().unwrap_or_else(|e| e.into_inner()).push(f);
                    h
                }
            };
            out.push(FileFingerprint { path: p.clone(), size, mtime_ns: mtime, sha256 });
        }
        Ok(Self::from_files(out))
    }

    fn from_files(files: Vec<FileFingerprint>) -> Self {
        let mut h = Sha256::new();
        for f in &files {
            let name = f.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            h.update(name.as_bytes());
            h.update([0]);
            h.update(f.sha256.as_bytes());
        }
        CorpusFingerprint { digest: hex(&h.finalize()), files }
    }

    /// Whether `files` still have this content. Size and mtime unchanged is
    /// taken as unchanged (like make); otherwise the content is re-hashed, so
    /// a touched-but-identical file still matches.
    pub fn matches(&self, files: &[PathBuf]) -> Result<bool> {
        if files.len() != self.files.len() {
            return Ok(false);
        }
        for (p, f) in files.iter().zip(&self.files) {
            let meta = std::fs::metadata(p).at(p)?;
            if meta.len() != f.size {
                return Ok(false);
            }
            if mtime_ns(&meta) != f.mtime_ns && sha256_file(p)? != f.sha256 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoreMeta {
    pub format_version: u32,
    pub created_by: String,
    pub tokenizer_sha256: String,
    /// The tokenizer's type (stores from before types: WordPiece).
    #[serde(default = "wordpiece")]
    pub tokenizer_type: TokenizerType,
    pub vocab_size: usize,
    pub special: SpecialIds,
    pub bytes_per_token: u32,
    pub documents: u64,
    pub tokens: u64,
    pub text_bytes: u64,
    pub empty_documents: u64,
    pub skipped_records: u64,
    /// Tokens that are the tokenizer's `[UNK]` (stores built before this
    /// was counted: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unknown_tokens: Option<u64>,
    pub corpus: CorpusFingerprint,
    /// How records became documents (stores from before readers: default).
    #[serde(default)]
    pub reader: Reader,
    /// The key whose text JSON records gave (stores from before: unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_key: Option<String>,
    /// Records the WuDao reader dropped as 100 characters or shorter.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub short_records: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn wordpiece() -> TokenizerType {
    TokenizerType::WordPiece
}

/// Above this share of `[UNK]` tokens the tokenizer hardly covers the corpus.
pub const UNKNOWN_WARN_SHARE: f64 = 0.01;

/// How the caller's user names the tokenizer option, for hints.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum TokenizerOption {
    /// `glm-worker prepare --tokenizer`
    #[default]
    Flag,
    /// configs.json's `tokenizer_path` (training)
    ConfigKey,
}

impl TokenizerOption {
    pub(crate) fn hint(self, kind: TokenizerType) -> String {
        let files = kind.files();
        match self {
            TokenizerOption::Flag => format!("pass {files} with --tokenizer, or omit --tokenizer to train one on the corpus"),
            TokenizerOption::ConfigKey => format!("point tokenizer_path at {files} that exists, or --set tokenizer_path=null to train one on the corpus"),
        }
    }
}

impl StoreMeta {
    /// "0.3% [UNK]" when counted.
    pub fn unknown_share(&self) -> Option<f64> {
        self.unknown_tokens.map(|u| u as f64 / self.tokens.max(1) as f64)
    }

    /// A warning when the share of `[UNK]` tokens is above `UNKNOWN_WARN_SHARE`,
    /// with the option (`how`) that names the tokenizer.
    pub fn unknown_warning(&self, how: TokenizerOption) -> Option<String> {
        let share = self.unknown_share().filter(|s| *s > UNKNOWN_WARN_SHARE)?;
        let (given, trained) = match how {
            TokenizerOption::Flag => ("--tokenizer", "omit --tokenizer"),
            TokenizerOption::ConfigKey => ("tokenizer_path", "--set tokenizer_path=null"),
        };
        Some(format!(
            "{:.1}% of the corpus's tokens are [UNK]: the tokenizer does not cover this text (another language or script? with a vocab.txt, check {given}; or let a tokenizer be trained on the corpus: {trained})",
            share * 100.0
        ))
    }
}

/// Where a build spent its time, for reports and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    pub seconds: f64,
    pub stats: ReadStats,
    pub documents_without_tokens: u64,
}

fn write_header(w: &mut impl Write, magic: &[u8; 8], width: u32, count: u64) -> std::io::Result<()> {
    w.write_all(magic)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(&width.to_le_bytes())?;
    w.write_all(&count.to_le_bytes())?;
    w.write_all(&0u64.to_le_bytes())
}

/// Tokenizes `files` with `tok` into a store at `out` (replacing any store
/// there). `progress` receives input bytes as they are consumed.
pub fn build_store(files: &[PathBuf], opts: &CorpusOptions, tok: &GlmTokenizer, out: &Path, progress: &dyn Fn(u64)) -> Result<(StoreMeta, BuildReport)> {
    let start = std::time::Instant::now();
    let fingerprint = CorpusFingerprint::compute(files)?;
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "store".into());
    let tmp = crate::runtime::host::temp_path(parent, &format!(".{name}.tmp-"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).at(&tmp)?;
    let result = (|| {
        let (meta, report) = write_store(files, opts, tok, &tmp, fingerprint, progress)?;
        replace_dir(&tmp, out)?;
        Ok((meta, BuildReport { seconds: start.elapsed().as_secs_f64(), ..report }))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Streams documents' token ids into `tokens.bin` + `index.bin` of `dir`.
pub struct StoreWriter {
    tokens: BufWriter<File>,
    index: BufWriter<File>,
    tokens_path: PathBuf,
    index_path: PathBuf,
    width: u32,
    total: u64,
    docs: u64,
}

impl StoreWriter {
    pub fn create(dir: &Path, vocab_size: usize) -> Result<Self> {
        let width: u32 = if vocab_size <= u16::MAX as usize + 1 { 2 } else { 4 };
        let tokens_path = dir.join("tokens.bin");
        let index_path = dir.join("index.bin");
        let mut tokens = BufWriter::with_capacity(1 << 22, File::create(&tokens_path).at(&tokens_path)?);
        let mut index = BufWriter::with_capacity(1 << 20, File::create(&index_path).at(&index_path)?);
        write_header(&mut tokens, TOKENS_MAGIC, width, 0).at(&tokens_path)?;
        write_header(&mut index, INDEX_MAGIC, 8, 0).at(&index_path)?;
        index.write_all(&0u64.to_le_bytes()).at(&index_path)?;
        Ok(StoreWriter { tokens, index, tokens_path, index_path, width, total: 0, docs: 0 })
    }

    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.width == 2 {
            for id in ids {
                self.tokens.write_all(&(*id as u16).to_le_bytes()).at(&self.tokens_path)?;
            }
        } else {
            for id in ids {
                self.tokens.write_all(&id.to_le_bytes()).at(&self.tokens_path)?;
            }
        }
        self.total += ids.len() as u64;
        self.docs += 1;
        self.index.write_all(&self.total.to_le_bytes()).at(&self.index_path)
    }

    pub fn docs(&self) -> u64 {
        self.docs
    }

    /// Writes the final headers and syncs; returns (documents, tokens, width).
    pub fn finish(self) -> Result<(u64, u64, u32)> {
        let mut tokens = self.tokens.into_inner().map_err(|e| Error::io(&self.tokens_path, e.into_error()))?;
        tokens.seek(SeekFrom::Start(0)).at(&self.tokens_path)?;
        write_header(&mut tokens, TOKENS_MAGIC, self.width, self.total).at(&self.tokens_path)?;
        tokens.sync_all().at(&self.tokens_path)?;
        let mut index = self.index.into_inner().map_err(|e| Error::io(&self.index_path, e.into_error()))?;
        index.seek(SeekFrom::Start(0)).at(&self.index_path)?;
        write_header(&mut index, INDEX_MAGIC, 8, self.docs + 1).at(&self.index_path)?;
        index.sync_all().at(&self.index_path)?;
        Ok((self.docs, self.total, self.width))
    }
}

fn write_meta(dir: &Path, meta: &StoreMeta) -> Result<()> {
    let mj = dir.join("meta.json");
    std::fs::write(&mj, serde_json::to_string_pretty(meta).expect("meta serializes")).at(&mj)
}

fn write_store(
    files: &[PathBuf],
    opts: &CorpusOptions,
    tok: &GlmTokenizer,
    dir: &Path,
    corpus: CorpusFingerprint,
    progress: &dyn Fn(u64),
) -> Result<(StoreMeta, BuildReport)> {
    let mut w = StoreWriter::create(dir, tok.vocab_size())?;
    let mut no_tokens: u64 = 0;
    let mut unknown: u64 = 0;
    let unk = tok.text_unk();
    let mut done_before: u64 = 0; // bytes of finished files
    let mut batch: Vec<String> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut flush = |batch: &mut Vec<String>, w: &mut StoreWriter| -> Result<()> {
        for ids in tok.encode_batch(std::mem::take(batch))? {
            if ids.is_empty() {
                no_tokens += 1;
            } else {
                unknown += ids.iter().filter(|&&i| Some(i) == unk).count() as u64;
                w.push(&ids)?;
            }
        }
        Ok(())
    };
    let mut stats = ReadStats::default();
    for f in files {
        let size = std::fs::metadata(f).at(f)?.len();
        let s = read_corpus(std::slice::from_ref(f), opts, |text, pos| {
            batch_bytes += text.len();
            batch.push(text);
            if batch_bytes >= 4 << 20 || batch.len() >= 8192 {
                flush(&mut batch, &mut w)?;
                batch_bytes = 0;
                progress(done_before + pos);
            }
            Ok(())
        })?;
        flush(&mut batch, &mut w)?;
        batch_bytes = 0;
        done_before += size;
        progress(done_before);
        stats.documents += s.documents;
        stats.empty += s.empty;
        stats.skipped += s.skipped;
        stats.short += s.short;
        stats.text_bytes += s.text_bytes;
    }
    if w.docs() == 0 {
        let what = if files.len() == 1 { files[0].clone() } else { files[0].parent().unwrap_or(Path::new(".")).to_path_buf() };
        return Err(Error::invalid(what, "the corpus holds no documents with text"));
    }
    let (docs, total, width) = w.finish()?;
    let meta = StoreMeta {
        format_version: FORMAT_VERSION,
        created_by: format!("glm-worker {}", env!("CARGO_PKG_VERSION")),
        tokenizer_sha256: tok.sha256.clone(),
        tokenizer_type: tok.tokenizer_type(),
        vocab_size: tok.vocab_size(),
        special: tok.special,
        bytes_per_token: width,
        documents: docs,
        tokens: total,
        text_bytes: stats.text_bytes,
        empty_documents: stats.empty,
        skipped_records: stats.skipped,
        unknown_tokens: Some(unknown),
        corpus,
        reader: opts.reader,
        text_key: Some(opts.text_key.clone()),
        short_records: stats.short,
    };
    let tj = dir.join("tokenizer.json");
    std::fs::write(&tj, tok.to_json()?).at(&tj)?;
    write_meta(dir, &meta)?;
    Ok((meta, BuildReport { seconds: 0.0, stats, documents_without_tokens: no_tokens }))
}

/// A store of ready-made token ids (no tokenizer, no corpus files): for tests
/// and tools that produce ids themselves.
pub fn write_synthetic_store(dir: &Path, docs: &[Vec<u32>], special: SpecialIds, vocab_size: usize) -> Result<TokenStore> {
    std::fs::create_dir_all(dir).at(dir)?;
    let mut w = StoreWriter::create(dir, vocab_size)?;
    for d in docs {
        w.push(d)?;
    }
    let (documents, tokens, width) = w.finish()?;
    let meta = StoreMeta {
        format_version: FORMAT_VERSION,
        created_by: "synthetic".into(),
        tokenizer_sha256: String::new(),
        tokenizer_type: TokenizerType::WordPiece,
        vocab_size,
        special,
        bytes_per_token: width,
        documents,
        tokens,
        text_bytes: 0,
        empty_documents: 0,
        skipped_records: 0,
        unknown_tokens: None,
        corpus: CorpusFingerprint::from_files(Vec::new()),
        reader: Reader::Default,
        text_key: None,
        short_records: 0,
    };
    write_meta(dir, &meta)?;
    TokenStore::open(dir)
}

/// Moves `tmp` to `out`, replacing a previous store in two renames.
fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        if !out.join("meta.json").is_file() && std::fs::read_dir(out).at(out)?.next().is_some() {
            return Err(Error::invalid(out, "exists and is not a token store; refusing to replace it"));
        }
        let old = out.with_file_name(format!(".{}.old-{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
        std::fs::rename(out, &old).at(out)?;
        std::fs::rename(tmp, out).at(out)?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, out).at(out)?;
    }
    Ok(())
}

/// Reads `meta.json` of a store, if there is one.
pub fn read_meta(dir: &Path) -> Result<StoreMeta> {
    let p = dir.join("meta.json");
    let meta: StoreMeta = glm_common::text::read_json(&p, "not a token store's meta.json")?;
    if meta.format_version != FORMAT_VERSION {
        return Err(Error::invalid(
            &p,
            format!("store format version {} (this build reads {FORMAT_VERSION}); rebuild it: {}", meta.format_version, rebuild_command(dir, &meta)),
        ));
    }
    Ok(meta)
}

/// The command that rebuilds the store at `dir` from the corpus its
/// `meta` records (a file, or the folder holding its files), with the
/// tokenizer it holds, so that its token ids stay those of the runs and
/// checkpoints made with it.
pub fn rebuild_command(dir: &Path, meta: &StoreMeta) -> String {
    let word = |p: &Path| glm_common::text::shell_word(&p.display().to_string());
    let files: Vec<&Path> = meta.corpus.files.iter().map(|f| f.path.as_path()).collect();
    let data = match files.as_slice() {
        [one] => one.to_path_buf(),
        many => {
            // the deepest folder above every file
            let mut common: Vec<_> = many.first().and_then(|f| f.parent()).map(|p| p.components().collect()).unwrap_or_default();
            for f in many {
                let parts: Vec<_> = f.parent().map(|p| p.components().collect()).unwrap_or_default();
                let same = common.iter().zip(&parts).take_while(|(a, b)| a == b).count();
                common.truncate(same);
            }
            let folder: PathBuf = common.into_iter().collect();
            if folder.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                folder
            }
        }
    };
    let tokenizer = dir.join("tokenizer.json");
    let tokenizer = if tokenizer.is_file() { format!(" --tokenizer {}", word(&tokenizer)) } else { String::new() };
    let data = format!("{}{}", meta.reader.prefix(), data.display());
    format!("glm-worker prepare --data {}{tokenizer} --out {} --force", glm_common::text::shell_word(&data), word(dir))
}

/// Why an existing store cannot be reused, or `None` when it can.
pub fn staleness(dir: &Path, files: &[PathBuf], tok: &GlmTokenizer, corpus: &CorpusOptions) -> Result<Option<String>> {
    let reader = corpus.reader;
    if !dir.join("meta.json").is_file() {
        return Ok(Some("no store yet".into()));
    }
    let meta = match read_meta(dir) {
        Ok(m) => m,
        Err(e) => return Ok(Some(format!("unreadable store ({e})"))),
    };
    if meta.tokenizer_type != tok.tokenizer_type() {
        return Ok(Some(format!("the store was built with a {} tokenizer, this one is a {}", meta.tokenizer_type, tok.tokenizer_type())));
    }
    if !tok.answers_to(&meta.tokenizer_sha256) {
        return Ok(Some("the tokenizer changed".into()));
    }
    if !meta.corpus.matches(files)? {
        return Ok(Some("the corpus changed".into()));
    }
    if meta.reader != reader {
        return Ok(Some(format!("the store was read by {}, this corpus is read by {}", meta.reader, reader)));
    }
    if let Some(k) = meta.text_key.as_ref().filter(|k| **k != corpus.text_key) {
        return Ok(Some(format!("the store read the text of records' {k:?}, this run reads {:?} (text_key)", corpus.text_key)));
    }
    if let Err(e) = TokenStore::open(dir) {
        return Ok(Some(format!("damaged store ({e})")));
    }
    Ok(None)
}

/// Why the store at `dir` belongs to another corpus or tokenizer than
/// `files` read by `tok` (`None`: it is theirs, stale or not, or there is
/// nothing readable there to lose). A command that did not build it must
/// not replace it: it may be a training run's, hours to build again.
pub fn foreign(dir: &Path, files: &[PathBuf], tok: &GlmTokenizer) -> Option<String> {
    let meta = read_meta(dir).ok()?;
    if meta.tokenizer_type != tok.tokenizer_type() || !tok.answers_to(&meta.tokenizer_sha256) {
        let sha = meta.tokenizer_sha256.get(..12).unwrap_or(&meta.tokenizer_sha256);
        return Some(format!("it was built with another tokenizer (a {} tokenizer, sha256 {sha}...)", meta.tokenizer_type));
    }
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let theirs: Vec<PathBuf> = meta.corpus.files.iter().map(|f| canon(&f.path)).collect();
    let ours: Vec<PathBuf> = files.iter().map(|p| canon(p)).collect();
    if theirs != ours {
        let names: Vec<String> = meta.corpus.files.iter().take(3).map(|f| f.path.display().to_string()).collect();
        let more = if meta.corpus.files.len() > 3 { format!(" and {} more", meta.corpus.files.len() - 3) } else { String::new() };
        return Some(format!("it was built from another corpus ({}{more})", names.join(", ")));
    }
    None
}

/// A read-only, memory-mapped token store.
pub struct TokenStore {
    pub meta: StoreMeta,
    pub dir: PathBuf,
    tokens: memmap2::Mmap,
    index: memmap2::Mmap,
}

fn check_header(path: &Path, buf: &[u8], magic: &[u8; 8], widths: &[u32]) -> Result<(u32, u64)> {
    if buf.len() < HEADER || &buf[..8] != magic {
        return Err(Error::invalid(path, "not a token store file (bad magic)"));
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    let width = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    let count = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    if version != FORMAT_VERSION {
        return Err(Error::invalid(path, format!("format version {version}, this build reads {FORMAT_VERSION}")));
    }
    if !widths.contains(&width) {
        return Err(Error::invalid(path, format!("unsupported element width {width}")));
    }
    let want = HEADER as u64 + count * width as u64;
    if buf.len() as u64 != want {
        return Err(Error::invalid(path, format!("size {} bytes, header promises {want} (truncated or corrupt)", buf.len())));
    }
    Ok((width, count))
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let f = File::open(path).at(path)?;
    // SAFETY: read-only map of a file this process does not write; stores
    // are never modified in place (rebuilds rename a new directory in).
    unsafe { memmap2::Mmap::map(&f) }.at(path)
}

impl TokenStore {
    /// Opens and validates a store (headers, sizes, index monotonic and
    /// consistent with the token count and meta.json).
    /// Opens the store at `dir` and checks that `tok` (the tokenizer of
    /// `whose`: "this run's", "the checkpoint's") built it.
    pub fn open_for(dir: &Path, tok: &GlmTokenizer, whose: &str) -> Result<Self> {
        let st = Self::open(dir)?;
        if !tok.answers_to(&st.meta.tokenizer_sha256) {
            return Err(Error::invalid(
                dir.join("meta.json"),
                format!("the token store was built with another tokenizer than {whose} (its token ids would not match); remove it (training and eval rebuild it from the corpus) or use another --store"),
            ));
        }
        Ok(st)
    }

    /// Opens and validates the store at `dir`; a damaged one is an error
    /// with the command that rebuilds it.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta = read_meta(dir)?;
        let hint = rebuild_command(dir, &meta);
        Self::open_with(dir, meta).map_err(|e| match e {
            Error::Invalid { path, msg } => Error::Invalid { path, msg: format!("{msg}; rebuild it: {hint}") },
            Error::Io { path, error } => Error::Invalid { path, msg: format!("{error}; rebuild it: {hint}") },
            e => e,
        })
    }

    fn open_with(dir: &Path, meta: StoreMeta) -> Result<Self> {
        let tp = dir.join("tokens.bin");
        let ip = dir.join("index.bin");
        let tokens = map(&tp)?;
        let index = map(&ip)?;
        let (width, count) = check_header(&tp, &tokens, TOKENS_MAGIC, &[2, 4])?;
        let (_, entries) = check_header(&ip, &index, INDEX_MAGIC, &[8])?;
        if width != meta.bytes_per_token || count != meta.tokens || entries != meta.documents + 1 {
            return Err(Error::invalid(dir, "tokens.bin/index.bin disagree with meta.json"));
        }
        let store = TokenStore { meta, dir: dir.to_path_buf(), tokens, index };
        let offs = store.offsets();
        if offs[0] != 0 || *offs.last().unwrap() != count || offs.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::invalid(&ip, "document index is not a monotone cover of the tokens (corrupt)"));
        }
        Ok(store)
    }

    fn offsets(&self) -> &[u64] {
        let body = &self.index[HEADER..];
        // SAFETY: the map is page-aligned, HEADER is a multiple of 8 and the
        // length was checked to be a whole number of u64s.
        unsafe { std::slice::from_raw_parts(body.as_ptr() as *const u64, body.len() / 8) }
    }

    pub fn num_docs(&self) -> usize {
        self.meta.documents as usize
    }

    pub fn doc_len(&self, i: usize) -> usize {
        let o = self.offsets();
        (o[i + 1] - o[i]) as usize
    }

    /// Appends tokens `[from, to)` of document `i` to `out`.
    pub fn extend_doc(&self, i: usize, from: usize, to: usize, out: &mut Vec<u32>) {
        let base = self.offsets()[i] as usize;
        let (a, b) = (base + from, base + to);
        assert!(from <= to && to <= self.doc_len(i));
        let body = &self.tokens[HEADER..];
        if self.meta.bytes_per_token == 2 {
            // SAFETY: alignment (page + 32) and length checked in `open`.
            let t = unsafe { std::slice::from_raw_parts(body.as_ptr() as *const u16, body.len() / 2) };
            out.extend(t[a..b].iter().map(|&x| x as u32));
        } else {
            let t = unsafe { std::slice::from_raw_parts(body.as_ptr() as *const u32, body.len() / 4) };
            out.extend_from_slice(&t[a..b]);
        }
    }

    pub fn doc(&self, i: usize) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.doc_len(i));
        self.extend_doc(i, 0, self.doc_len(i), &mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_reuse_a_known_hash_only_for_the_same_size_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.txt");
        std::fs::write(&p, "some text").unwrap();
        let files = vec![p.clone()];
        let real = CorpusFingerprint::compute(&files).unwrap();
        assert_eq!(real.files[0].sha256, sha256_file(&p).unwrap());
        // a recorded hash for the same path, size and mtime is taken as is (the file is not read)
        let mut known = real.clone();
        known.files[0].sha256 = "recorded".into();
        assert_eq!(CorpusFingerprint::compute_with(&files, Some(&known)).unwrap().files[0].sha256, "recorded");
        // another mtime: the content is hashed
        known.files[0].mtime_ns += 1;
        assert_eq!(CorpusFingerprint::compute_with(&files, Some(&known)).unwrap().files[0].sha256, real.files[0].sha256);
        // changed content (other size): a new hash, not the memo of the old one
        std::fs::write(&p, "other, longer text").unwrap();
        let changed = CorpusFingerprint::compute(&files).unwrap();
        assert_eq!(changed.files[0].sha256, sha256_file(&p).unwrap());
        assert_ne!(changed.digest, real.digest);
    }
}
