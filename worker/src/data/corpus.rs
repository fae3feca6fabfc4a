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

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

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

/// The original's `punctuation_standardization`.
pub fn standardize_punctuation(s: &str) -> String {
    if !s.contains(['\u{201c}', '\u{201d}', '\u{2018}', '\u{2019}', '\u{2013}']) {
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

/// Reads every document of `files` in order, handing each to `sink` together
/// with the number of input bytes consumed so far in the current file (for
/// progress). Returns what was read.
pub fn read_corpus(files: &[PathBuf], opts: &CorpusOptions, mut sink: impl FnMut(String, u64) -> Result<()>) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    for f in files {
        let mut emit = |text: String, pos: u64| -> Result<()> {
            let text = match opts.reader {
                Reader::Default => standardize_punctuation(text.trim()),
                // the original's `len(text) > 100`: characters, the text as built
                Reader::WuDao if text.chars().count() > WUDAO_MIN_CHARS => text,
                Reader::WuDao => {
                    stats.short += 1;
                    return Ok(());
                }
            };
            if text.is_empty() {
                stats.empty += 1;
                return Ok(());
            }
            stats.documents += 1;
            stats.text_bytes += text.len() as u64;
            sink(text, pos)
        };
        let skipped = match (opts.reader, Format::of(f)) {
            (_, Format::JsonLines) => read_json_lines(f, opts, &mut emit)?,
            (Reader::WuDao, _) | (_, Format::JsonArray) => read_json_array(f, opts, &mut emit)?,
            (Reader::Default, Format::Text) => read_text(f, &mut emit)?,
        };
        stats.skipped += skipped;
    }
    Ok(stats)
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

use glm_common::text::line_col;

/// `path` opened for reading lines, past a UTF-8 byte-order mark; a file
/// that is not UTF-8 text (binary, compressed, UTF-16) is refused by name.
fn open_text(path: &Path) -> Result<BufReader<File>> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path).at(path)?);
    let head = reader.fill_buf().at(path)?;
    let skip = glm_common::text::sniff(path, head)?;
    reader.consume(skip);
    Ok(reader)
}

/// The error for a line that is not UTF-8: where, and which byte.
fn not_utf8(path: &Path, lineno: usize, line: &[u8], e: std::str::Utf8Error) -> Error {
    let col = String::from_utf8_lossy(&line[..e.valid_up_to()]).chars().count() + 1;
    Error::parse(path, lineno, col, format!("not UTF-8 (byte 0x{:02X}); corpora must be UTF-8 text (see docs/corpus.md)", line[e.valid_up_to()]))
}

fn read_json_array(path: &Path, opts: &CorpusOptions, emit: &mut dyn FnMut(String, u64) -> Result<()>) -> Result<u64> {
    let file = File::open(path).at(path)?;
    let len = file.metadata().at(path)?.len();
    if len == 0 {
        return Err(Error::parse(path, 1, 1, "empty file: expected a JSON array of objects (see docs/corpus.md)"));
    }
    // SAFETY: the map is read-only and dropped before returning; a corpus
    // file truncated underneath us is a user error we cannot guard against.
    let map = unsafe { memmap2::Mmap::map(&file) }.at(path)?;
    let skip = glm_common::text::sniff(path, &map)?;
    let buf: &[u8] = &map[skip..];
    let first = buf.iter().position(|b| !b.is_ascii_whitespace());
    let first = match first {
        None => return Err(Error::parse(path, 1, 1, "empty file: expected a JSON array of objects (see docs/corpus.md)")),
        Some(i) => i,
    };
    let wudao_records = opts.reader == Reader::WuDao && buf[first] == b'{';
    if buf[first] != b'[' && !wudao_records {
        let (l, c) = line_col(buf, first);
        let hint = if buf[first] == b'{' {
            " (a fragment of objects without the enclosing `[` `]`? wrap it in brackets, \
             or name it .jsonl with one object per line)"
        } else {
            ""
        };
        return Err(Error::parse(
            path,
            l,
            c,
            format!("expected `[` starting a JSON array of objects, found `{}`{hint}; see docs/corpus.md", buf[first] as char),
        ));
    }
    let malformed = |e: serde_json::Error| Error::parse(path, e.line(), e.column(), format!("malformed JSON: {} (see docs/corpus.md)", strip_pos(&e)));
    let items: Vec<&serde_json::value::RawValue> = if wudao_records {
        // WuDao's files: {"RECORDS": [{"title": ..., "content": ...}, ...]}
        #[derive(serde::Deserialize)]
        struct Records<'a> {
            #[serde(rename = "RECORDS", borrow)]
            records: Option<Vec<&'a serde_json::value::RawValue>>,
        }
        let r: Records = serde_json::from_slice(buf).map_err(malformed)?;
        r.records.ok_or_else(|| {
            let (l, c) = line_col(buf, first);
            Error::parse(path, l, c, "expected a JSON array of records or an object with a \"RECORDS\" array (the WuDao reader, wudao:)")
        })?
    } else {
        serde_json::from_slice(buf).map_err(malformed)?
    };
    let mut skipped = 0;
    for (i, raw) in items.iter().enumerate() {
        let offset = raw.get().as_ptr() as usize - buf.as_ptr() as usize;
        let v: Value = serde_json::from_str(raw.get()).expect("RawValue re-parses");
        match text_of(&v, opts) {
            Ok(t) => emit(t, offset as u64)?,
            Err(msg) if opts.skip_malformed => {
                let (l, c) = line_col(buf, offset);
                log::debug!("{}:{l}:{c}: skipped record {i}: {msg}", path.display());
                skipped += 1;
            }
            Err(msg) => {
                let (l, c) = line_col(buf, offset);
                return Err(Error::parse(path, l, c, format!("record {i}: {msg}")));
            }
        }
    }
    Ok(skipped)
}

/// serde_json appends " at line L column C"; we print the position up front.
fn strip_pos(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

fn read_json_lines(path: &Path, opts: &CorpusOptions, emit: &mut dyn FnMut(String, u64) -> Result<()>) -> Result<u64> {
    let mut reader = open_text(path)?;
    let mut line = Vec::new();
    let (mut lineno, mut pos, mut skipped) = (0usize, 0u64, 0u64);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).at(path)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        pos += n as u64;
        let text = match std::str::from_utf8(&line) {
            Ok(t) => t,
            Err(_) if opts.skip_malformed => {
                skipped += 1;
                continue;
            }
            Err(e) => return Err(not_utf8(path, lineno, &line, e)),
        };
        if text.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(text)
            .map_err(|e| (e.column(), format!("malformed JSON: {} (see docs/corpus.md)", strip_pos(&e))))
            .and_then(|v| text_of(&v, opts).map_err(|m| (1, m)));
        match parsed {
            Ok(t) => emit(t, pos)?,
            Err(_) if opts.skip_malformed => skipped += 1,
            Err((col, msg)) => return Err(Error::parse(path, lineno, col, msg)),
        }
    }
    Ok(skipped)
}

fn read_text(path: &Path, emit: &mut dyn FnMut(String, u64) -> Result<()>) -> Result<u64> {
    let mut reader = open_text(path)?;
    let mut line = Vec::new();
    let mut doc = String::new();
    let (mut lineno, mut pos) = (0usize, 0u64);
    loop {
        line.clear();
        let n = reader.by_ref().read_until(b'\n', &mut line).at(path)?;
        if n == 0 {
            break;
        }
        lineno += 1;
        pos += n as u64;
        let text = std::str::from_utf8(&line).map_err(|e| not_utf8(path, lineno, &line, e))?;
        if text.trim().is_empty() {
            if !doc.is_empty() {
                emit(std::mem::take(&mut doc), pos)?;
            }
        } else {
            doc.push_str(text);
        }
    }
    if !doc.is_empty() {
        emit(doc, pos)?;
    }
    Ok(0)
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
}
