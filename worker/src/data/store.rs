//! The token store: a corpus tokenized once, memory-mapped by every run.
//!
//! A store is a directory (format version 2):
//! - `meta.json`: `format_version`, counts, the tokenizer's sha256 and
//!   special ids, the corpus fingerprint (per file: size, mtime, sha256),
//!   and `shards`, the manifest: per shard its name, documents, tokens and
//!   the input it was read from (byte ranges of the corpus files).
//! - per shard `<name>.tokens.bin`: 32-byte header (`GLMTOKS\0`, format
//!   version u32, bytes per token u32 — 2 when the vocabulary fits in u16,
//!   else 4 — token count u64, reserved u64) followed by the shard's token
//!   ids, little-endian; and `<name>.index.bin`: 32-byte header
//!   (`GLMIDX\0\0`, version, 8, entry count, reserved) followed by
//!   `documents + 1` u64 offsets into the shard's tokens.
//! - `tokenizer.json`: the tokenizer that produced the ids.
//!
//! The documents of the store are the shards' documents in shard order;
//! `TokenStore` numbers them globally. Format version 1 (one `tokens.bin`
//! and `index.bin`, no `shards`) is still read, as one shard.
//!
//! Stores are built by `data::build` in a work directory beside the store
//! and renamed into place, so a crash never leaves a half-written store
//! under the final name. When the corpus (by content) or the tokenizer (by
//! hash) changes, the store is out of date and is rebuilt rather than reused.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::corpus::{CorpusOptions, ReadStats, Reader};
use super::tokenizer::{hex, GlmTokenizer, SpecialIds, TokenizerType};
use crate::error::{Error, IoContext, Result};

const TOKENS_MAGIC: &[u8; 8] = b"GLMTOKS\0";
const INDEX_MAGIC: &[u8; 8] = b"GLMIDX\0\0";
/// The format this build writes: sharded (`meta.json`'s `shards`).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build reads: 1, one `tokens.bin` + `index.bin`.
pub const OLDEST_FORMAT: u32 = 1;
pub(crate) const HEADER: usize = 32;

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

    pub(crate) fn from_files(files: Vec<FileFingerprint>) -> Self {
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
    /// The shards, in document order (format 1: none, its one `tokens.bin`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardMeta>,
}

/// One shard of a store: its files `<name>.tokens.bin` and
/// `<name>.index.bin`, what they hold, and the input they were read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardMeta {
    pub name: String,
    pub documents: u64,
    pub tokens: u64,
    /// The records that start in these byte ranges of the corpus files (a
    /// JSON array file: the whole file).
    pub input: Vec<Span>,
}

/// Bytes `[start, end)` of corpus file `file` (an index into the store's
/// `corpus.files`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub file: usize,
    pub start: u64,
    pub end: u64,
}

impl ShardMeta {
    pub fn tokens_file(&self) -> String {
        format!("{}.tokens.bin", self.name)
    }

    pub fn index_file(&self) -> String {
        format!("{}.index.bin", self.name)
    }
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

/// What a build did, for reports and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct BuildReport {
    pub seconds: f64,
    /// What the corpus gave, over every shard (those of earlier runs too).
    pub stats: ReadStats,
    pub documents_without_tokens: u64,
    /// Shards in the store, and those this run tokenized (the others were
    /// done by an interrupted run or other slices and kept).
    pub shards: usize,
    pub shards_built: usize,
    /// The input bytes, text bytes and tokens of the shards this run built.
    pub input_bytes: u64,
    pub text_bytes: u64,
    pub tokens: u64,
    /// Workers that tokenized (at most one per shard to build).
    pub workers: usize,
    /// The shard size the corpus was cut by (input bytes; 0: one shard).
    pub shard_size: u64,
    /// Said when a partial build of another plan was thrown away.
    pub discarded: Option<String>,
}

fn write_header(w: &mut impl Write, magic: &[u8; 8], width: u32, count: u64) -> std::io::Result<()> {
    w.write_all(magic)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(&width.to_le_bytes())?;
    w.write_all(&count.to_le_bytes())?;
    w.write_all(&0u64.to_le_bytes())
}

/// The bytes per token of a store for `vocab_size` ids.
pub fn token_width(vocab_size: usize) -> u32 {
    if vocab_size <= u16::MAX as usize + 1 {
        2
    } else {
        4
    }
}

/// Streams documents' token ids into one shard's files.
pub struct StoreWriter {
    tokens: BufWriter<File>,
    index: BufWriter<File>,
    tokens_path: PathBuf,
    index_path: PathBuf,
    width: u32,
    total: u64,
    docs: u64,
    bytes: Vec<u8>,
}

impl StoreWriter {
    /// A writer of shard `name` in `dir`.
    pub fn create(dir: &Path, name: &str, vocab_size: usize) -> Result<Self> {
        Self::create_at(&dir.join(format!("{name}.tokens.bin")), &dir.join(format!("{name}.index.bin")), vocab_size)
    }

    /// A writer of the two files of a shard, wherever they are made.
    pub fn create_at(tokens_path: &Path, index_path: &Path, vocab_size: usize) -> Result<Self> {
        let width = token_width(vocab_size);
        let mut tokens = BufWriter::with_capacity(1 << 20, File::create(tokens_path).at(tokens_path)?);
        let mut index = BufWriter::with_capacity(256 << 10, File::create(index_path).at(index_path)?);
        write_header(&mut tokens, TOKENS_MAGIC, width, 0).at(tokens_path)?;
        write_header(&mut index, INDEX_MAGIC, 8, 0).at(index_path)?;
        index.write_all(&0u64.to_le_bytes()).at(index_path)?;
        Ok(StoreWriter { tokens, index, tokens_path: tokens_path.into(), index_path: index_path.into(), width, total: 0, docs: 0, bytes: Vec::new() })
    }

    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        self.bytes.clear();
        if self.width == 2 {
            self.bytes.extend(ids.iter().flat_map(|&id| (id as u16).to_le_bytes()));
        } else {
            self.bytes.extend(ids.iter().flat_map(|&id| id.to_le_bytes()));
        }
        self.tokens.write_all(&self.bytes).at(&self.tokens_path)?;
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

/// Writes `meta.json` of `dir` (through a temporary: a crash leaves the old
/// one or the new one).
pub(crate) fn write_meta(dir: &Path, meta: &StoreMeta) -> Result<()> {
    write_atomic(&dir.join("meta.json"), serde_json::to_string_pretty(meta).expect("meta serializes").as_bytes())
}

/// Writes `path` whole through a temporary beside it and a rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = crate::runtime::host::temp_path(dir, &format!(".{name}.tmp-"));
    std::fs::write(&tmp, bytes).at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// A store of ready-made token ids (no tokenizer, no corpus files): for tests
/// and tools that produce ids themselves.
pub fn write_synthetic_store(dir: &Path, docs: &[Vec<u32>], special: SpecialIds, vocab_size: usize) -> Result<TokenStore> {
    std::fs::create_dir_all(dir).at(dir)?;
    let name = "shard-00000";
    let mut w = StoreWriter::create(dir, name, vocab_size)?;
    for d in docs {
        w.push(d)?;
    }
    let (documents, tokens, width) = w.finish()?;
    let shards = vec![ShardMeta { name: name.into(), documents, tokens, input: Vec::new() }];
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
        shards,
    };
    write_meta(dir, &meta)?;
    TokenStore::open(dir)
}

/// Moves `tmp` to `out`, replacing a previous store in two renames.
pub(crate) fn replace_dir(tmp: &Path, out: &Path) -> Result<()> {
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
    if !(OLDEST_FORMAT..=FORMAT_VERSION).contains(&meta.format_version) {
        return Err(Error::invalid(
            &p,
            format!(
                "store format version {} (this build reads versions {OLDEST_FORMAT} to {FORMAT_VERSION}); rebuild it: {}",
                meta.format_version,
                rebuild_command(dir, &meta)
            ),
        ));
    }
    if meta.format_version >= 2 && meta.shards.is_empty() {
        return Err(Error::invalid(&p, format!("a format {} store without shards; rebuild it: {}", meta.format_version, rebuild_command(dir, &meta))));
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
    foreign_to(dir, files, tok.tokenizer_type(), &|sha| tok.answers_to(sha))
}

/// `foreign` for a tokenizer known by its type and whether a recorded
/// sha256 names it.
pub(crate) fn foreign_to(dir: &Path, files: &[PathBuf], kind: TokenizerType, answers_to: &dyn Fn(&str) -> bool) -> Option<String> {
    let meta = read_meta(dir).ok()?;
    if meta.tokenizer_type != kind || !answers_to(&meta.tokenizer_sha256) {
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

/// A read-only, memory-mapped token store: its shards' documents numbered
/// in shard order.
pub struct TokenStore {
    pub meta: StoreMeta,
    pub dir: PathBuf,
    shards: Vec<Shard>,
    /// The global id of each shard's first document.
    first_doc: Vec<u64>,
}

/// One shard's two files, mapped.
struct Shard {
    tokens: memmap2::Mmap,
    index: memmap2::Mmap,
}

impl Shard {
    fn offsets(&self) -> &[u64] {
        let body = &self.index[HEADER..];
        // SAFETY: the map is page-aligned, HEADER is a multiple of 8 and the
        // length was checked to be a whole number of u64s.
        unsafe { std::slice::from_raw_parts(body.as_ptr() as *const u64, body.len() / 8) }
    }
}

fn check_header(path: &Path, buf: &[u8], magic: &[u8; 8], version: u32, widths: &[u32]) -> Result<(u32, u64)> {
    if buf.len() < HEADER || &buf[..8] != magic {
        return Err(Error::invalid(path, "not a token store file (bad magic)"));
    }
    let found = u32::from_le_bytes(buf[8..12].try_into().unwrap());
    let width = u32::from_le_bytes(buf[12..16].try_into().unwrap());
    let count = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    if found != version {
        return Err(Error::invalid(path, format!("format version {found}, meta.json says {version}")));
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

    /// Opens and validates the store at `dir` (every shard's headers and
    /// sizes, its index monotone and covering its tokens, the counts those
    /// of meta.json); a damaged one is an error with the command that
    /// rebuilds it.
    pub fn open(dir: &Path) -> Result<Self> {
        let meta = read_meta(dir)?;
        let hint = rebuild_command(dir, &meta);
        Self::open_with(dir, meta).map_err(|e| match e {
            Error::Invalid { path, msg } => Error::Invalid { path, msg: format!("{msg}; rebuild it: {hint}") },
            Error::Io { path, error } => Error::Invalid { path, msg: format!("{error}; rebuild it: {hint}") },
            e => e,
        })
    }

    pub(crate) fn open_with(dir: &Path, meta: StoreMeta) -> Result<Self> {
        // format 1: one shard of the whole store, named as the files were then
        let files: Vec<(String, String, u64, u64)> = if meta.format_version == 1 {
            vec![("tokens.bin".into(), "index.bin".into(), meta.documents, meta.tokens)]
        } else {
            meta.shards.iter().map(|s| (s.tokens_file(), s.index_file(), s.documents, s.tokens)).collect()
        };
        let (mut shards, mut first_doc) = (Vec::with_capacity(files.len()), Vec::with_capacity(files.len()));
        let (mut docs, mut total) = (0u64, 0u64);
        for (tokens_file, index_file, want_docs, want_tokens) in files {
            let (tp, ip) = (dir.join(&tokens_file), dir.join(&index_file));
            let shard = Shard { tokens: map(&tp)?, index: map(&ip)? };
            let (width, count) = check_header(&tp, &shard.tokens, TOKENS_MAGIC, meta.format_version, &[2, 4])?;
            let (_, entries) = check_header(&ip, &shard.index, INDEX_MAGIC, meta.format_version, &[8])?;
            let documents = entries.checked_sub(1).ok_or_else(|| Error::invalid(&ip, "empty document index (corrupt)"))?;
            if width != meta.bytes_per_token || (documents, count) != (want_docs, want_tokens) {
                return Err(Error::invalid(dir, format!("{tokens_file}/{index_file} disagree with meta.json")));
            }
            let offs = shard.offsets();
            if offs[0] != 0 || *offs.last().unwrap() != count || offs.windows(2).any(|w| w[0] > w[1]) {
                return Err(Error::invalid(&ip, "document index is not a monotone cover of the tokens (corrupt)"));
            }
            first_doc.push(docs);
            shards.push(shard);
            docs += documents;
            total += count;
        }
        if docs != meta.documents || total != meta.tokens {
            return Err(Error::invalid(
                dir,
                format!("the shards hold {docs} documents and {total} tokens, meta.json says {} and {}", meta.documents, meta.tokens),
            ));
        }
        Ok(TokenStore { meta, dir: dir.to_path_buf(), shards, first_doc })
    }

    /// The shard holding document `i`, and `i`'s number in it.
    fn locate(&self, i: usize) -> (&Shard, usize) {
        // the last shard starting at or before i (shards without documents start where the next does)
        let s = self.first_doc.partition_point(|&f| f <= i as u64) - 1;
        (&self.shards[s], i - self.first_doc[s] as usize)
    }

    pub fn num_docs(&self) -> usize {
        self.meta.documents as usize
    }

    pub fn doc_len(&self, i: usize) -> usize {
        let (shard, j) = self.locate(i);
        let o = shard.offsets();
        (o[j + 1] - o[j]) as usize
    }

    /// Appends tokens `[from, to)` of document `i` to `out`.
    pub fn extend_doc(&self, i: usize, from: usize, to: usize, out: &mut Vec<u32>) {
        let (shard, j) = self.locate(i);
        let o = shard.offsets();
        let base = o[j] as usize;
        assert!(from <= to && to <= (o[j + 1] - o[j]) as usize);
        let (a, b) = (base + from, base + to);
        let body = &shard.tokens[HEADER..];
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

    /// The number of shards (format 1: one).
    pub fn num_shards(&self) -> usize {
        self.shards.len()
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

    const SPECIAL: SpecialIds = SpecialIds { pad: 0, unk: 1, cls: 2, sep: 3, mask: 4, sop: 5, eop: 6, gmask: 7, smask: 8, eod: 9 };

    /// A store as format 1 wrote it: `tokens.bin` and `index.bin` with
    /// version 1 headers, `meta.json` with `format_version` 1 and no shards.
    fn write_v1_store(dir: &Path, docs: &[Vec<u32>]) {
        std::fs::create_dir_all(dir).unwrap();
        let header = |magic: &[u8; 8], width: u32, count: u64| {
            [&magic[..], &1u32.to_le_bytes(), &width.to_le_bytes(), &count.to_le_bytes(), &0u64.to_le_bytes()].concat()
        };
        let total: u64 = docs.iter().map(|d| d.len() as u64).sum();
        let mut tokens = header(TOKENS_MAGIC, 2, total);
        let mut index = header(INDEX_MAGIC, 8, docs.len() as u64 + 1);
        index.extend(0u64.to_le_bytes());
        let mut at = 0u64;
        for d in docs {
            tokens.extend(d.iter().flat_map(|&t| (t as u16).to_le_bytes()));
            at += d.len() as u64;
            index.extend(at.to_le_bytes());
        }
        std::fs::write(dir.join("tokens.bin"), tokens).unwrap();
        std::fs::write(dir.join("index.bin"), index).unwrap();
        let meta = serde_json::json!({
            "format_version": 1, "created_by": "glm-worker 0.1.0", "tokenizer_sha256": "abc", "tokenizer_type": "BertWordPieceTokenizer",
            "vocab_size": 100, "special": SPECIAL, "bytes_per_token": 2, "documents": docs.len(), "tokens": total, "text_bytes": 10,
            "empty_documents": 0, "skipped_records": 0, "unknown_tokens": 0,
            "corpus": {"files": [{"path": "c.txt", "size": 10, "mtime_ns": 1, "sha256": "x"}], "digest": "y"}, "reader": "default", "text_key": "text",
        });
        std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    }

    #[test]
    fn a_format_1_store_opens_and_a_future_one_is_refused_with_the_rebuild_command() {
        let d = tempfile::tempdir().unwrap();
        let docs = vec![vec![10, 11, 12], vec![], vec![13], vec![14, 15]];
        write_v1_store(d.path(), &docs);
        let st = TokenStore::open(d.path()).unwrap();
        assert_eq!((st.num_docs(), st.num_shards(), st.meta.format_version), (4, 1, 1));
        for (i, doc) in docs.iter().enumerate() {
            assert_eq!(&st.doc(i), doc);
        }
        let mut part = Vec::new();
        st.extend_doc(3, 1, 2, &mut part);
        assert_eq!(part, vec![15]);
        // a damaged format 1 store is named as damaged, with the way to rebuild it
        std::fs::write(d.path().join("index.bin"), b"GLMIDX\0\0").unwrap();
        let e = TokenStore::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("index.bin: not a token store file") && e.contains("rebuild it: glm-worker prepare --data c.txt --out"), "{e}");
        // a format this build does not know: refused, saying how to prepare it again
        let meta = std::fs::read_to_string(d.path().join("meta.json")).unwrap().replace("\"format_version\": 1", "\"format_version\": 3");
        std::fs::write(d.path().join("meta.json"), meta).unwrap();
        let e = TokenStore::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("store format version 3 (this build reads versions 1 to 2); rebuild it: glm-worker prepare --data c.txt") && e.contains(" --force"),
            "{e}"
        );
    }

    #[test]
    fn shards_are_one_store_in_order_empty_ones_included() {
        let d = tempfile::tempdir().unwrap();
        let shards: Vec<Vec<Vec<u32>>> = vec![vec![vec![1, 2], vec![3]], vec![], vec![vec![], vec![4, 5, 6]], vec![], vec![vec![7]]];
        let mut metas = Vec::new();
        for (s, docs) in shards.iter().enumerate() {
            let name = format!("shard-{s:05}");
            let mut w = StoreWriter::create(d.path(), &name, 100).unwrap();
            for doc in docs {
                w.push(doc).unwrap();
            }
            let (documents, tokens, _) = w.finish().unwrap();
            metas.push(ShardMeta { name, documents, tokens, input: Vec::new() });
        }
        let all: Vec<Vec<u32>> = shards.iter().flatten().cloned().collect();
        let mut meta = write_synthetic_store(&d.path().join("one"), &all, SPECIAL, 100).unwrap().meta;
        meta.shards = metas;
        write_meta(d.path(), &meta).unwrap();
        let st = TokenStore::open(d.path()).unwrap();
        assert_eq!((st.num_docs(), st.num_shards()), (5, 5));
        for (i, doc) in all.iter().enumerate() {
            assert_eq!(&st.doc(i), doc, "document {i}");
            assert_eq!(st.doc_len(i), doc.len());
        }
        // a shard that disagrees with the manifest is named
        meta.shards[2].tokens += 1;
        write_meta(d.path(), &meta).unwrap();
        let e = TokenStore::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("shard-00002.tokens.bin/shard-00002.index.bin disagree with meta.json"), "{e}");
    }
}
