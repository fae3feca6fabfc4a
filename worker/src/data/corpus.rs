//! Corpus readers: raw files -> documents (plain strings).
//!
//! Three formats, chosen by file extension:
//! - `.json`: a JSON array of objects, the original project's `data.json`
//!   (`[{"title": ..., "content": ...}, ...]`); text = title + content, as the
//!   original's wudao reader builds it. Objects without `content` fall back to
//!   the configured `text_key`.
//! - `.jsonl` / `.ndjson`: JSON Lines, one object per line, text under
//!   `text_key` (default `text`; title + content is accepted too). Streamed.
//! - anything else: UTF-8 text, one document per blank-line-separated block.
//!   Streamed.
//!
//! Every text gets the original's punctuation standardisation (curly quotes
//! and en dashes to ASCII). The original's WuDao reader ([`Reader::WuDao`],
//! a `train_data` entry `wudao:<path>`) instead reads every file as JSON —
//! `{"RECORDS": [...]}` as WuDao ships, a JSON array, or JSON Lines for
//! `.jsonl`/`.ndjson` — builds `title.strip() + " " + content` (the title
//! and its space only when there is a title), keeps only texts longer than
//! 100 characters and changes nothing else (no trimming, no punctuation
//! standardisation). Malformed input is an error naming
//! `file:line:col`; with `skip_malformed` a malformed *record* is counted and
//! skipped instead (a JSON array's syntax errors cannot be skipped: after one
//! the rest of the array has no reliable structure).

use std::cell::Cell;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde_json::Value;

use crate::error::{Error, IoContext, Result};

/// How records become documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reader {
    /// This project's: by extension, title and content joined without a
    /// separator, trimmed, punctuation standardised, every non-empty record.
    #[default]
    Default,
    /// The original's `WuDaoCorpus.process_line`: JSON records,
    /// `title.strip() + " " + content`, only texts over 100 characters, as is.
    WuDao,
}

impl Reader {
    /// The prefix of a corpus entry that asks for this reader.
    pub fn prefix(self) -> &'static str {
        match self {
            Reader::Default => "",
            Reader::WuDao => "wudao:",
        }
    }
}

impl std::fmt::Display for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reader::Default => "this project's default reader",
            Reader::WuDao => "the original's WuDao reader (wudao:)",
        })
    }
}

/// The original's WuDao reader keeps texts longer than this (characters).
pub const WUDAO_MIN_CHARS: usize = 100;

/// A corpus entry: `wudao:<path>` is `path` read by the WuDao reader,
/// anything else a path read by the default reader.
pub fn parse_entry(entry: &str) -> (PathBuf, Reader) {
    match entry.strip_prefix(Reader::WuDao.prefix()) {
        Some(p) => (PathBuf::from(p), Reader::WuDao),
        None => (PathBuf::from(entry), Reader::Default),
    }
}

/// The path to name in messages about a corpus of `files`.
pub fn corpus_name(files: &[PathBuf]) -> PathBuf {
    match files {
        [one] => one.clone(),
        _ => files.first().and_then(|f| f.parent()).unwrap_or(Path::new(".")).to_path_buf(),
    }
}

/// A corpus as configs.json names it: its files or folders and their reader.
#[derive(Clone, Debug, PartialEq)]
pub struct CorpusSpec {
    pub roots: Vec<PathBuf>,
    pub reader: Reader,
}

impl CorpusSpec {
    /// The entries as they would be written (`wudao:` before each root the
    /// WuDao reader reads).
    pub fn entries(&self) -> Vec<String> {
        self.roots.iter().map(|r| format!("{}{}", self.reader.prefix(), r.display())).collect()
    }
}

#[derive(Clone, Debug)]
pub struct CorpusOptions {
    /// Key of the text in JSON Lines records (the original's `text_key`).
    pub text_key: String,
    /// Count and skip malformed records instead of failing.
    pub skip_malformed: bool,
    pub reader: Reader,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        CorpusOptions { text_key: "text".into(), skip_malformed: false, reader: Reader::Default }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    JsonArray,
    JsonLines,
    Text,
}

impl Format {
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
            Some("json") => Format::JsonArray,
            Some("jsonl") | Some("ndjson") => Format::JsonLines,
            _ => Format::Text,
        }
    }
}

/// What a read produced, for reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub documents: u64,
    /// Records that held no text after trimming (kept out of the corpus).
    pub empty: u64,
    /// Malformed records skipped (only with `skip_malformed`).
    pub skipped: u64,
    /// Records of at most 100 characters, dropped by the WuDao reader.
    pub short: u64,
    /// UTF-8 bytes of document text handed on.
    pub text_bytes: u64,
}

/// The corpus files under `path`: the file itself, or every regular file of a
/// folder (recursively, hidden files and `README*` excluded), sorted by path
/// so the document order — and so every split and sample — is reproducible.
pub fn corpus_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => std::io::Error::new(e.kind(), "no such corpus file or folder; see docs/corpus.md"),
            _ => e,
        })
        .at(path)?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name.starts_with("README") {
                continue;
            }
            let ft = entry.file_type().at(&p)?;
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() || (ft.is_symlink() && p.is_file()) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::invalid(path, "corpus folder holds no files (hidden files and README* are skipped); see docs/corpus.md"));
    }
    Ok(out)
}

/// The characters `standardize_punctuation` replaces.
const CURLY: [char; 5] = ['\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}', '\u{2013}'];

/// The original's `punctuation_standardization`.
pub fn standardize_punctuation(s: &str) -> String {
    if !s.contains(CURLY) {
        return s.to_string();
    }
    s.chars()
        .map(|c| match c {
            '\u{201c}' | '\u{201d}' => '"',
            '\u{2018}' | '\u{2019}' => '\'',
            '\u{2013}' => '-',
            c => c,
        })
        .collect()
}

/// Whether a file can be cut into spans that are read separately (see
/// `read_span`): JSON Lines and the default reader's text, by lines. A JSON
/// array (and every file the WuDao reader reads as JSON) is read whole.
pub fn splittable(path: &Path, reader: Reader) -> bool {
    matches!((reader, Format::of(path)), (_, Format::JsonLines) | (Reader::Default, Format::Text))
}

/// Reads every document of `files` in order, handing each to `sink` together
/// with the number of input bytes consumed so far in the current file (for
/// progress). Returns what was read.
pub fn read_corpus(files: &[PathBuf], opts: &CorpusOptions, mut sink: impl FnMut(String, u64) -> Result<()>) -> Result<ReadStats> {
    read_corpus_while(files, opts, |text, pos| sink(text, pos).map(|()| true))
}

/// As `read_corpus`, until `sink` returns `false` (then nothing more is read).
pub fn read_corpus_while(files: &[PathBuf], opts: &CorpusOptions, mut sink: impl FnMut(String, u64) -> Result<bool>) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for f in files {
        if !read_span(f, 0, u64::MAX, opts, &mut stats, &mut sink)? {
            break;
        }
    }
    Ok(stats)
}

/// Reads the documents of `path` whose records start in its bytes
/// `[start, end)` — a JSON Lines record where its line starts, a text
/// document where its first line starts; a record that starts there is read
/// to its end, past `end` if need be — and hands each to `sink` (with the
/// file offset reached), counting in `stats`. A file that is not
/// `splittable` is read whole by the span that starts at 0 (and by no
/// other). Cutting a file at any offsets and reading the spans in order
/// gives the documents of reading it whole, in the same order. Returns
/// `false` when `sink` asked to stop.
pub fn read_span(
    path: &Path,
    start: u64,
    end: u64,
    opts: &CorpusOptions,
    stats: &mut ReadStats,
    sink: &mut dyn FnMut(String, u64) -> Result<bool>,
) -> Result<bool> {
    let mut emit = |text: String, pos: u64| -> Result<bool> {
        let text = match opts.reader {
            Reader::Default => standardize_trimmed(text),
            // the original's `len(text) > 100`: characters, the text as built
            Reader::WuDao if text.chars().count() > WUDAO_MIN_CHARS => text,
            Reader::WuDao => {
                stats.short += 1;
                return Ok(true);
            }
        };
        if text.is_empty() {
            stats.empty += 1;
            return Ok(true);
        }
        stats.documents += 1;
        stats.text_bytes += text.len() as u64;
        sink(text, pos)
    };
    let (skipped, go_on) = match (opts.reader, Format::of(path)) {
        (_, Format::JsonLines) => read_json_lines(path, start, end, opts, &mut emit)?,
        (Reader::WuDao, _) | (_, Format::JsonArray) if start == 0 => read_json_array(path, opts, &mut emit)?,
        (Reader::WuDao, _) | (_, Format::JsonArray) => (0, true),
        (Reader::Default, Format::Text) => (0, read_text(path, start, end, &mut emit)?),
    };
    stats.skipped += skipped;
    Ok(go_on)
}

/// `standardize_punctuation` of the trimmed text, reusing its buffer when
/// nothing changes.
fn standardize_trimmed(text: String) -> String {
    let trimmed = text.trim();
    if trimmed.len() == text.len() && !text.contains(CURLY) {
        return text;
    }
    standardize_punctuation(trimmed)
}

/// Python's `str.strip()`: Unicode whitespace, plus the four ASCII
/// separators (U+001C-U+001F) that Python counts as whitespace.
fn python_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The original's `WuDaoCorpus.process_line`: `title.strip() + " "` when
/// the title is a non-empty string, then `content` when non-empty (the
/// length rule is applied by the caller). An empty record or null is no text.
fn wudao_text(v: &Value) -> std::result::Result<String, String> {
    let map = match v {
        Value::Null => return Ok(String::new()),
        Value::Object(map) => map,
        v => return Err(format!("expected an object with \"title\" and \"content\", found {}", kind(v))),
    };
    let field = |k: &str| -> std::result::Result<&str, String> {
        match map.get(k) {
            None | Some(Value::Null) => Ok(""),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(format!("\"{k}\" must be a string, found {}", kind(other))),
        }
    };
    let (title, content) = (field("title")?, field("content")?);
    let mut text = String::new();
    if !title.is_empty() {
        text.push_str(python_strip(title));
        text.push(' ');
    }
    text.push_str(content);
    Ok(text)
}

/// The text of one record for `opts`'s reader.
fn text_of(v: &Value, opts: &CorpusOptions) -> std::result::Result<String, String> {
    match opts.reader {
        Reader::Default => record_text(v, &opts.text_key),
        Reader::WuDao => wudao_text(v),
    }
}

/// Text of one JSON record, or a message saying why there is none.
fn record_text(v: &Value, text_key: &str) -> std::result::Result<String, String> {
    let Value::Object(map) = v else {
        return Err(format!("expected an object, found {}", kind(v)));
    };
    let field = |k: &str| -> std::result::Result<Option<&str>, String> {
        match map.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!("\"{k}\" must be a string, found {}", kind(other))),
        }
    };
    if let Some(content) = field("content")? {
        let title = field("title")?.unwrap_or("");
        return Ok(format!("{title}{content}"));
    }
    match field(text_key)? {
        Some(t) => Ok(t.to_string()),
        None => Err(format!(
            "record has neither \"content\" nor \"{text_key}\" (name the text's field with text_key in configs.json, or --text-key for prepare; see docs/corpus.md)"
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The lines of a file from the first one that starts at or after a given
/// offset (a line starts at offset 0 or after a `\n`), each with the file
/// offset where it starts.
struct Lines<'p> {
    path: &'p Path,
    reader: BufReader<File>,
    /// File offset of the next line.
    pos: u64,
    /// Where the first line starts, and how many lines were read since.
    first: u64,
    read: usize,
    /// Newlines before `first`, counted when an error needs a line number.
    before: Cell<Option<usize>>,
    /// The last line read, with its `\n`.
    line: Vec<u8>,
    /// A byte-order mark skipped at the start: part of line 1, which starts at 0.
    mark: u64,
}

impl<'p> Lines<'p> {
    /// At 0 the file is checked to be text and its byte-order mark skipped
    /// (`sniff`); elsewhere the rest of a line that started before `start` is
    /// skipped (it belongs to the span where it starts).
    fn open(path: &'p Path, start: u64) -> Result<Self> {
        let mut file = File::open(path).at(path)?;
        let mut mark = 0;
        let (reader, pos) = if start == 0 {
            let mut reader = BufReader::with_capacity(1 << 20, file);
            let head = reader.fill_buf().at(path)?;
            let skip = glm_common::text::sniff(path, head)?;
            reader.consume(skip);
            mark = skip as u64;
            (reader, 0)
        } else {
            file.seek(SeekFrom::Start(start - 1)).at(path)?;
            let mut reader = BufReader::with_capacity(1 << 20, file);
            // from the byte before `start`: only a `\n` there makes `start` a line start
            let n = reader.skip_until(b'\n').at(path)?;
            (reader, start - 1 + n as u64)
        };
        Ok(Lines { path, reader, pos, first: pos, read: 0, before: Cell::new(None), line: Vec::new(), mark })
    }

    /// Reads the next line into `line`: its start offset, `None` at the end.
    fn next(&mut self) -> Result<Option<u64>> {
        self.line.clear();
        let n = self.reader.read_until(b'\n', &mut self.line).at(self.path)?;
        if n == 0 {
            return Ok(None);
        }
        let at = self.pos;
        self.pos += n as u64 + std::mem::take(&mut self.mark);
        self.read += 1;
        Ok(Some(at))
    }

    /// The line number (1-based) of the last line read in the file: only
    /// for errors, since a span that starts inside the file counts the lines
    /// before it by reading them.
    fn lineno(&self) -> Result<usize> {
        let before = match self.before.get() {
            Some(n) => n,
            None => {
                let n = newlines_before(self.path, self.first)?;
                self.before.set(Some(n));
                n
            }
        };
        Ok(before + self.read)
    }
}

/// The number of `\n` in the first `upto` bytes of `path`.
fn newlines_before(path: &Path, upto: u64) -> Result<usize> {
    let mut f = File::open(path).at(path)?.take(upto);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).at(path)?;
        if k == 0 {
            return Ok(n);
        }
        n += memchr::memchr_iter(b'\n', &buf[..k]).count();
    }
}

/// 1-based (line, column in characters) of byte `offset` of `path`'s text
/// that starts at byte `skip` (past a byte-order mark), as
/// `glm_common::text::line_col` gives them, reading the file up to there.
fn line_col_at(path: &Path, skip: u64, offset: u64) -> Result<(usize, usize)> {
    let mut f = File::open(path).at(path)?;
    f.seek(SeekFrom::Start(skip)).at(path)?;
    let mut f = f.take(offset);
    let mut buf = vec![0u8; 1 << 20];
    let chars = |b: &[u8]| b.iter().filter(|&&x| x & 0xC0 != 0x80).count();
    let (mut line, mut col) = (1, 1);
    loop {
        let k = f.read(&mut buf).at(path)?;
        if k == 0 {
            return Ok((line, col));
        }
        let chunk = &buf[..k];
        match memchr::memrchr(b'\n', chunk) {
            Some(i) => {
                line += memchr::memchr_iter(b'\n', chunk).count();
                col = 1 + chars(&chunk[i + 1..]);
            }
            None => col += chars(chunk),
        }
    }
}

/// Whitespace to `str::trim` among ASCII bytes.
fn ascii_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ')
}

/// Whether the line that ends just before `at` (a line start, `at > 0`:
/// the byte before it is that line's `\n`) is blank, as the text reader
/// judges lines (a line that is not UTF-8 is not blank). Read backwards,
/// stopping at the first ASCII byte that is not whitespace.
fn previous_line_blank(path: &Path, at: u64) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).at(path)?;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut hi = at - 1;
    let starts_file = loop {
        if hi == 0 {
            break true;
        }
        let lo = hi.saturating_sub(64 << 10);
        let mut buf = vec![0u8; (hi - lo) as usize];
        f.read_exact_at(&mut buf, lo).at(path)?;
        let (part, done) = match memchr::memrchr(b'\n', &buf) {
            Some(i) => (buf[i + 1..].to_vec(), true),
            None => (buf, false),
        };
        if part.iter().any(|&b| b.is_ascii() && !ascii_space(b)) {
            return Ok(false);
        }
        chunks.push(part);
        if done {
            break false;
        }
        hi = lo;
    };
    let line: Vec<u8> = chunks.into_iter().rev().flatten().collect();
    let line = if starts_file { line.strip_prefix(glm_common::text::BOM).unwrap_or(&line) } else { &line };
    Ok(blank(line))
}

/// A blank line (UTF-8, nothing but whitespace).
fn blank(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|t| t.trim().is_empty())
}

/// The error for a line that is not UTF-8: where, and which byte.
fn not_utf8(path: &Path, lineno: usize, line: &[u8], e: std::str::Utf8Error) -> Error {
    let col = String::from_utf8_lossy(&line[..e.valid_up_to()]).chars().count() + 1;
    Error::parse(path, lineno, col, format!("not UTF-8 (byte 0x{:02X}); corpora must be UTF-8 text (see docs/corpus.md)", line[e.valid_up_to()]))
}

/// The first byte of `path` from `from` on that is not ASCII whitespace,
/// and its offset.
fn first_non_space(path: &Path, from: u64) -> Result<Option<(u64, u8)>> {
    let mut f = File::open(path).at(path)?;
    f.seek(SeekFrom::Start(from)).at(path)?;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    loop {
        let k = f.read(&mut buf).at(path)?;
        if k == 0 {
            return Ok(None);
        }
        if let Some(i) = buf[..k].iter().position(|b| !b.is_ascii_whitespace()) {
            return Ok(Some((at + i as u64, buf[i])));
        }
        at += k as u64;
    }
}

/// A reader that counts the bytes read through it (serde_json's reader
/// takes them one at a time, so the count is where it stands).
struct Counted<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.set(self.n.get() + k as u64);
        Ok(k)
    }
}

/// The records of a JSON array as serde_json streams them: each is parsed,
/// turned into text and handed on before the next is read, so memory holds
/// one record at a time however large the file.
struct Elements<'a> {
    path: &'a Path,
    opts: &'a CorpusOptions,
    emit: &'a mut dyn FnMut(String, u64) -> Result<bool>,
    /// Where the text starts (past a byte-order mark), and the bytes that
    /// serde_json has read since.
    skip: u64,
    read: Rc<Cell<u64>>,
    index: usize,
    skipped: u64,
    /// Why reading stopped early: our error, or `None` with `stopped` when
    /// the sink asked to stop.
    failure: Option<Error>,
    stopped: bool,
}

impl Elements<'_> {
    fn element(&mut self, raw: &serde_json::value::RawValue) -> Result<bool> {
        let text = raw.get();
        // serde_json has read the record, and one byte past a number (to see that it ended)
        let number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        let offset = self.read.get() - text.len() as u64 - u64::from(number);
        let i = self.index;
        self.index += 1;
        let v: Value = serde_json::from_str(text).expect("RawValue re-parses");
        match text_of(&v, self.opts) {
            Ok(t) => (self.emit)(t, self.skip + offset),
            Err(msg) if self.opts.skip_malformed => {
                if log::log_enabled!(log::Level::Debug) {
                    let (l, c) = line_col_at(self.path, self.skip, offset)?;
                    log::debug!("{}:{l}:{c}: skipped record {i}: {msg}", self.path.display());
                }
                self.skipped += 1;
                Ok(true)
            }
            Err(msg) => {
                let (l, c) = line_col_at(self.path, self.skip, offset)?;
                Err(Error::parse(self.path, l, c, format!("record {i}: {msg}")))
            }
        }
    }
}

/// Visits the array of records (`Ok(true)`), or `null` in place of
/// WuDao's `RECORDS` (`Ok(false)`).
struct Array<'s, 'a>(&'s mut Elements<'a>);

impl<'de> serde::de::Visitor<'de> for Array<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of records")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<bool, A::Error> {
        use serde::de::Error as _;
        while let Some(raw) = seq.next_element::<Box<serde_json::value::RawValue>>()? {
            match self.0.element(&raw) {
                Ok(true) => {}
                Ok(false) => {
                    self.0.stopped = true;
                    return Err(A::Error::custom("stopped"));
                }
                Err(e) => {
                    self.0.failure = Some(e);
                    return Err(A::Error::custom("failed"));
                }
            }
        }
        Ok(true)
    }

    fn visit_unit<E>(self) -> std::result::Result<bool, E> {
        Ok(false)
    }

    fn visit_none<E>(self) -> std::result::Result<bool, E> {
        Ok(false)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<bool, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Array<'_, '_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<bool, D::Error> {
        d.deserialize_option(self)
    }
}

/// WuDao's files: `{"RECORDS": [{"title": ..., "content": ...}, ...]}`;
/// whether there was a `RECORDS` array.
struct Records<'s, 'a>(&'s mut Elements<'a>);

impl<'de> serde::de::Visitor<'de> for Records<'_, '_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object with a \"RECORDS\" array")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<bool, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != "RECORDS" {
                map.next_value::<serde::de::IgnoredAny>()?;
            } else if found.is_some() {
                return Err(serde::de::Error::duplicate_field("RECORDS"));
            } else {
                found = Some(map.next_value_seed(Array(&mut *self.0))?);
            }
        }
        Ok(found == Some(true))
    }
}

fn read_json_array(path: &Path, opts: &CorpusOptions, emit: &mut dyn FnMut(String, u64) -> Result<bool>) -> Result<(u64, bool)> {
    let empty = || Error::parse(path, 1, 1, "empty file: expected a JSON array of objects (see docs/corpus.md)");
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).at(path)?);
    let head = reader.fill_buf().at(path)?;
    if head.is_empty() {
        return Err(empty());
    }
    let skip = glm_common::text::sniff(path, head)?;
    reader.consume(skip);
    let skip = skip as u64;
    let Some((first_at, first)) = first_non_space(path, skip)? else { return Err(empty()) };
    let wudao_records = opts.reader == Reader::WuDao && first == b'{';
    if first != b'[' && !wudao_records {
        let (l, c) = line_col_at(path, skip, first_at - skip)?;
        let hint = if first == b'{' {
            " (a fragment of objects without the enclosing `[` `]`? wrap it in brackets, \
             or name it .jsonl with one object per line)"
        } else {
            ""
        };
        return Err(Error::parse(path, l, c, format!("expected `[` starting a JSON array of objects, found `{}`{hint}; see docs/corpus.md", first as char)));
    }
    let read = Rc::new(Cell::new(0));
    let mut de = serde_json::Deserializer::from_reader(Counted { inner: reader, n: read.clone() });
    let mut elements = Elements { path, opts, emit, skip, read, index: 0, skipped: 0, failure: None, stopped: false };
    let parsed = if wudao_records {
        serde::Deserializer::deserialize_map(&mut de, Records(&mut elements))
    } else {
        serde::Deserializer::deserialize_seq(&mut de, Array(&mut elements))
    };
    if let Some(e) = elements.failure.take() {
        return Err(e);
    }
    if elements.stopped {
        return Ok((elements.skipped, false));
    }
    let malformed = |e: serde_json::Error| match e.io_error_kind() {
        Some(_) => Error::io(path, e.into()),
        None => Error::parse(path, e.line(), e.column(), format!("malformed JSON: {} (see docs/corpus.md)", strip_pos(&e))),
    };
    if !parsed.map_err(malformed)? {
        let (l, c) = line_col_at(path, skip, first_at - skip)?;
        return Err(Error::parse(path, l, c, "expected a JSON array of records or an object with a \"RECORDS\" array (the WuDao reader, wudao:)"));
    }
    de.end().map_err(malformed)?;
    Ok((elements.skipped, true))
}

/// serde_json appends " at line L column C"; we print the position up front.
fn strip_pos(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn read_json_lines(path: &Path, start: u64, end: u64, opts: &CorpusOptions, emit: &mut dyn FnMut(String, u64) -> Result<bool>) -> Result<(u64, bool)> {
    let mut lines = Lines::open(path, start)?;
    let mut skipped = 0;
    while let Some(at) = lines.next()? {
        if at >= end {
            break;
        }
        let text = match std::str::from_utf8(&lines.line) {
            Ok(t) => t,
            Err(_) if opts.skip_malformed => {
                skipped += 1;
                continue;
            }
            Err(e) => return Err(not_utf8(path, lines.lineno()?, &lines.line, e)),
        };
        if text.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(text)
            .map_err(|e| (e.column(), format!("malformed JSON: {} (see docs/corpus.md)", strip_pos(&e))))
            .and_then(|v| text_of(&v, opts).map_err(|m| (1, m)));
        match parsed {
            Ok(t) => {
                if !emit(t, lines.pos)? {
                    return Ok((skipped, false));
                }
            }
            Err(_) if opts.skip_malformed => skipped += 1,
            Err((col, msg)) => return Err(Error::parse(path, lines.lineno()?, col, msg)),
        }
    }
    Ok((skipped, true))
}

/// Text: a document is a maximal block of non-blank lines, and belongs to
/// the span where its first line starts. A span that starts inside one
/// (the line before its first line is not blank) leaves it to the span
/// where it began.
fn read_text(path: &Path, start: u64, end: u64, emit: &mut dyn FnMut(String, u64) -> Result<bool>) -> Result<bool> {
    let mut lines = Lines::open(path, start)?;
    if lines.pos >= end {
        return Ok(true);
    }
    let mut foreign = start > 0 && !previous_line_blank(path, lines.pos)?;
    let mut doc = String::new();
    while let Some(at) = lines.next()? {
        if at >= end && doc.is_empty() {
            break;
        }
        if foreign {
            foreign = !blank(&lines.line);
            continue;
        }
        let text = match std::str::from_utf8(&lines.line) {
            Ok(t) => t,
            Err(e) => return Err(not_utf8(path, lines.lineno()?, &lines.line, e)),
        };
        if text.trim().is_empty() {
            if !doc.is_empty() && !emit(std::mem::take(&mut doc), lines.pos)? {
                return Ok(false);
            }
        } else {
            doc.push_str(text);
        }
    }
    if !doc.is_empty() {
        return emit(doc, lines.pos);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(content).unwrap();
        p
    }

    fn docs(files: &[PathBuf], opts: &CorpusOptions) -> Result<(Vec<String>, ReadStats)> {
        let mut out = Vec::new();
        let stats = read_corpus(files, opts, |t, _| {
            out.push(t);
            Ok(())
        })?;
        Ok((out, stats))
    }

    #[test]
    fn json_array_title_plus_content_with_punctuation() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "a.json",
            "[{\"title\": \"题\", \"content\": \"“内容”\"},\n {\"content\": \"二\"}, {\"title\":\"t\",\"content\":\"  \"}]".as_bytes(),
        );
        let (docs, stats) = docs(&[p], &CorpusOptions::default()).unwrap();
        assert_eq!(docs, vec!["题\"内容\"".to_string(), "二".to_string(), "t".to_string()]);
        assert_eq!(stats.documents, 3);
    }

    #[test]
    fn json_array_errors_have_location() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "bad.json", b"[\n {\"content\": \"a\"},\n {\"content\": 3}\n]");
        let e = docs(std::slice::from_ref(&p), &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("bad.json:3:2:") && e.contains("must be a string"), "{e}");
        let (ok, stats) = docs(&[p], &CorpusOptions { skip_malformed: true, ..Default::default() }).unwrap();
        assert_eq!((ok.len(), stats.skipped), (1, 1));

        let p = write(d.path(), "syntax.json", b"[\n {\"content\": \"a\"\n]");
        let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("syntax.json:3:1: malformed JSON"), "{e}");

        let p = write(d.path(), "frag.json", b"  {\n \"content\": \"a\"\n}");
        let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("frag.json:1:3: expected `[`") && e.contains("enclosing"), "{e}");
    }

    #[test]
    fn json_lines_with_text_key_and_skips() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.jsonl", b"{\"sentence\": \"one\"}\n\n{\"sentence\": oops}\n{\"title\":\"x\",\"content\":\"y\"}\n");
        let opts = CorpusOptions { text_key: "sentence".into(), ..Default::default() };
        let e = docs(std::slice::from_ref(&p), &opts).unwrap_err().to_string();
        assert!(e.contains("a.jsonl:3:14: malformed JSON"), "{e}");
        let (ok, stats) = docs(&[p], &CorpusOptions { skip_malformed: true, ..opts }).unwrap();
        assert_eq!(ok, vec!["one", "xy"]);
        assert_eq!(stats.skipped, 1);
    }

    #[test]
    fn text_blocks_and_bad_utf8() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.txt", b"first line\nsecond\n\n\n  \nnext doc\n");
        let (ok, _) = docs(&[p], &CorpusOptions::default()).unwrap();
        assert_eq!(ok, vec!["first line\nsecond", "next doc"]);
        let p = write(d.path(), "b.txt", b"ok\nab\xffc\n");
        let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("b.txt:2:3: not UTF-8 (byte 0xFF)"), "{e}");
    }

    #[test]
    fn a_bom_is_skipped_and_binary_input_named_in_every_format() {
        let d = tempfile::tempdir().unwrap();
        let bom = |body: &str| [b"\xEF\xBB\xBF".as_slice(), body.as_bytes()].concat();
        for (name, body) in [("a.json", "[{\"content\": \"你好\"}]"), ("a.jsonl", "{\"text\": \"你好\"}\n"), ("a.txt", "你好\n")] {
            let p = write(d.path(), name, &bom(body));
            let (ok, _) = docs(&[p], &CorpusOptions::default()).unwrap();
            assert_eq!(ok, vec!["你好"], "{name}");
        }
        for name in ["b.json", "b.jsonl", "b.txt"] {
            let p = write(d.path(), name, b"\x1F\x8B\x08\x00\x00\x00");
            let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
            assert!(e.ends_with(&format!("{name}: a gzip-compressed file: decompress it first (gunzip); expected UTF-8 text")), "{e}");
            let p = write(d.path(), name, b"\x7FELF\x02\x01\x01\x00");
            let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
            assert!(e.contains("an executable (ELF), not text"), "{e}");
            let p = write(d.path(), name, b"[{\"te\x00\x00");
            let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
            assert!(e.contains("a binary file (a NUL byte at offset 5)"), "{e}");
        }
    }

    #[test]
    fn wudao_reader_is_the_originals_process_line() {
        let d = tempfile::tempdir().unwrap();
        let long = format!("“{}”  \n", "长".repeat(100));
        let records = serde_json::json!({"RECORDS": [
            {"title": " \u{1f}标题\t", "content": long},
            {"title": "短", "content": "太短了"},
            {"content": "x".repeat(101)},
            {"content": "y".repeat(100)},
            {"title": "t".repeat(99), "content": "z"},
            {"title": "", "content": "w".repeat(101)},
            {},
            null,
        ]});
        let p = write(d.path(), "wudao", records.to_string().as_bytes());
        let opts = CorpusOptions { reader: Reader::WuDao, ..Default::default() };
        let (kept, stats) = docs(std::slice::from_ref(&p), &opts).unwrap();
        // title.strip() + " " + content, untouched; over 100 characters only
        assert_eq!(kept, vec![format!("标题 {long}"), "x".repeat(101), format!("{} z", "t".repeat(99)), "w".repeat(101)]);
        assert_eq!((stats.documents, stats.short, stats.empty), (4, 4, 0));
        // the default reader on the same texts: joined, trimmed, standardised, all kept
        let arr = write(d.path(), "a.json", serde_json::json!([{"title": "标题", "content": long}, {"content": "太短了"}]).to_string().as_bytes());
        let (plain, _) = docs(std::slice::from_ref(&arr), &CorpusOptions::default()).unwrap();
        assert_eq!(plain, vec![format!("标题\"{}\"", "长".repeat(100)), "太短了".to_string()]);
        // a JSON array and JSON Lines work with the WuDao reader too
        let (w, _) = docs(&[arr], &opts).unwrap();
        assert_eq!(w, vec![format!("标题 {long}")]);
        let l = write(d.path(), "a.jsonl", format!("{}\n{{\"content\": \"短\"}}\n", serde_json::json!({"content": "q".repeat(150)})).as_bytes());
        let (w, stats) = docs(&[l], &opts).unwrap();
        assert_eq!((w, stats.short), (vec!["q".repeat(150)], 1));
        // located errors: a title that is not a string, an object without RECORDS
        let bad = write(d.path(), "bad.json", b"{\"RECORDS\": [\n {\"title\": 3}]}");
        let e = docs(&[bad], &opts).unwrap_err().to_string();
        assert!(e.contains("bad.json:2:2: record 0: \"title\" must be a string"), "{e}");
        let bad = write(d.path(), "norecords.json", b"{\"rows\": []}");
        let e = docs(&[bad], &opts).unwrap_err().to_string();
        assert!(e.contains("norecords.json:1:1: expected a JSON array of records or an object with a \"RECORDS\" array"), "{e}");
    }

    #[test]
    fn folder_is_sorted_and_skips_readme() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "b.txt", b"b");
        write(d.path(), "a.txt", b"a");
        write(d.path(), "README.md", b"not data");
        let files = corpus_files(d.path()).unwrap();
        let (ok, _) = docs(&files, &CorpusOptions::default()).unwrap();
        assert_eq!(ok, vec!["a", "b"]);
    }

    /// The documents of `path` read as spans cut every `k` bytes, in order,
    /// or the first error; and the stats summed.
    fn by_spans(path: &Path, k: u64, opts: &CorpusOptions) -> Result<(Vec<String>, ReadStats)> {
        let len = std::fs::metadata(path).unwrap().len();
        let (mut out, mut stats) = (Vec::new(), ReadStats::default());
        let mut start = 0;
        loop {
            let end = if start + k >= len { u64::MAX } else { start + k };
            read_span(path, start, end, opts, &mut stats, &mut |t, _| {
                out.push(t);
                Ok(true)
            })?;
            if end == u64::MAX {
                return Ok((out, stats));
            }
            start = end;
        }
    }

    /// Cut anywhere — inside a line, a character, a byte-order mark, a run
    /// of blank lines, a document — spans read in order give the documents
    /// (and counts, and first error) of one pass over the file.
    #[test]
    fn spans_cut_anywhere_read_as_one_pass() {
        let d = tempfile::tempdir().unwrap();
        let text = "\u{feff}first doc line\nsecond 行\n\n\n  \nnext doc\r\n\u{3000}\r\nthird “quoted”\nmore\n\n\n\nlast without newline";
        let jsonl = "\u{feff}{\"text\": \"one\"}\n\n{\"text\": oops}\n{\"title\":\"x\",\"content\":\"“y”\"}\n   \n{\"text\": \"\"}\n{\"text\": 3}\n{\"text\": \"长文本 long\"}";
        let cases: Vec<(PathBuf, CorpusOptions)> = vec![
            (write(d.path(), "a.txt", text.as_bytes()), CorpusOptions::default()),
            (write(d.path(), "b.txt", b"\n\nstarts blank\nx\n\ny\n"), CorpusOptions::default()),
            (write(d.path(), "c.txt", b"a\nb\nc\n"), CorpusOptions::default()),
            (write(d.path(), "a.jsonl", jsonl.as_bytes()), CorpusOptions { skip_malformed: true, ..Default::default() }),
            (
                write(d.path(), "w.jsonl", format!("{}\n{{\"content\": \"短\"}}\n", serde_json::json!({"title": "t", "content": "q".repeat(150)})).as_bytes()),
                CorpusOptions { reader: Reader::WuDao, ..Default::default() },
            ),
            (write(d.path(), "a.json", "[{\"content\": \"“a”\"}, {\"content\": \"b\"}]".as_bytes()), CorpusOptions::default()),
        ];
        for (path, opts) in &cases {
            let whole = docs(std::slice::from_ref(path), opts).unwrap();
            assert!(!whole.0.is_empty(), "{}", path.display());
            let len = std::fs::metadata(path).unwrap().len();
            for k in 1..=len + 1 {
                assert_eq!(by_spans(path, k, opts).unwrap(), whole, "{} cut every {k} bytes", path.display());
            }
        }
        // errors: the first in file order, located in the file, whoever reads it
        let bad_text = write(d.path(), "bad.txt", b"ok line\n\nab\xffc\nmore\n\nx\xfe\n");
        let bad_lines = write(d.path(), "bad.jsonl", b"{\"text\": \"a\"}\n{\"text\": \"b\"}\n\n{\"text\": 1}\n{oops\n");
        for (path, want) in [(&bad_text, "bad.txt:3:3: not UTF-8 (byte 0xFF)"), (&bad_lines, "bad.jsonl:4:1: \"text\" must be a string, found a number")] {
            let whole = docs(std::slice::from_ref(path), &CorpusOptions::default()).unwrap_err().to_string();
            assert!(whole.contains(want), "{whole}");
            let len = std::fs::metadata(path).unwrap().len();
            for k in 1..=len {
                let e = by_spans(path, k, &CorpusOptions::default()).unwrap_err().to_string();
                assert_eq!(e, whole, "cut every {k} bytes");
            }
        }
    }

    /// A JSON array is streamed record by record; records that are not
    /// objects are located where they start, numbers included.
    #[test]
    fn json_arrays_stream_with_located_records() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "n.json", "[\n  7 , {\"content\": \"a\"},\n \"长\",\t-1.5e3]".as_bytes());
        let e = docs(std::slice::from_ref(&p), &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("n.json:2:3: record 0: expected an object, found a number"), "{e}");
        let (ok, stats) = docs(std::slice::from_ref(&p), &CorpusOptions { skip_malformed: true, ..Default::default() }).unwrap();
        assert_eq!((ok, stats.skipped), (vec!["a".to_string()], 3));
        let p = write(d.path(), "s.json", "[{\"content\": \"a\"},\n \"长\"]".as_bytes());
        let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("s.json:2:2: record 1: expected an object, found a string"), "{e}");
        let p = write(d.path(), "t.json", b"[{\"content\": \"a\"}] x");
        let e = docs(&[p], &CorpusOptions::default()).unwrap_err().to_string();
        assert!(e.contains("t.json:1:20: malformed JSON: trailing characters"), "{e}");
        // WuDao: RECORDS anywhere among other keys; null or missing is no array; twice is an error
        let wudao = CorpusOptions { reader: Reader::WuDao, ..Default::default() };
        let long = "长".repeat(101);
        let p = write(d.path(), "w.json", format!("{{\"n\": [1, {{}}], \"RECORDS\": [{{\"content\": \"{long}\"}}], \"z\": null}}").as_bytes());
        assert_eq!(docs(&[p], &wudao).unwrap().0, vec![long.clone()]);
        for (name, body) in [("null.json", "{\"RECORDS\": null}"), ("none.json", "\n  {\"rows\": []}")] {
            let p = write(d.path(), name, body.as_bytes());
            let e = docs(&[p], &wudao).unwrap_err().to_string();
            let at = if name == "null.json" { "1:1" } else { "2:3" };
            assert!(e.contains(&format!("{name}:{at}: expected a JSON array of records or an object with a \"RECORDS\" array")), "{e}");
        }
        let p = write(d.path(), "twice.json", b"{\"RECORDS\": [], \"RECORDS\": []}");
        let e = docs(&[p], &wudao).unwrap_err().to_string();
        assert!(e.contains("twice.json:1:") && e.contains("duplicate field `RECORDS`"), "{e}");
        // reading stops when asked: a tokenizer's training text is read no further
        let p = write(d.path(), "many.json", serde_json::to_string(&vec![serde_json::json!({"content": "x"}); 100]).unwrap().as_bytes());
        let mut seen = 0;
        read_corpus_while(&[p], &CorpusOptions::default(), |_, _| {
            seen += 1;
            Ok(seen < 3)
        })
        .unwrap();
        assert_eq!(seen, 3);
    }
}
