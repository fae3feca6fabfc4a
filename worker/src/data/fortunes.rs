//! Builds the default corpus from Debian's `fortunes-zh` (GPL-3.0+): the
//! `chinese`, `tang300` and `song100` fortune files become one JSON array of
//! `{"title", "content"}` objects, the format of the original `data.json`.
//!
//! A fortune file is UTF-8 text with records separated by lines holding only
//! `%`, coloured with ANSI escape codes. The codes are stripped, the text is
//! kept. A record's title is its first line when that line was a coloured
//! heading (the Tang/Song poem titles) or is followed by a blank line (the
//! essays of `chinese`); the content is the rest, attribution lines included.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, IoContext, Result};

pub const DEFAULT_SOURCE_DIR: &str = "/usr/share/games/fortunes";
pub const FILES: [&str; 3] = ["chinese", "tang300", "song100"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub title: String,
    pub content: String,
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final-byte`, and bare ESC + one char).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Splits one fortune file's text into records.
pub fn parse_fortunes(text: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut block: Vec<&str> = Vec::new();
    for line in text.lines().chain(std::iter::once("%")) {
        if line.trim_end() == "%" {
            if let Some(r) = record(&block) {
                out.push(r);
            }
            block.clear();
        } else {
            block.push(line);
        }
    }
    out
}

fn record(raw: &[&str]) -> Option<Record> {
    let lines: Vec<(bool, String)> = raw.iter().map(|l| (l.contains('\u{1b}'), strip_ansi(l).trim().to_string())).collect();
    let start = lines.iter().position(|(_, l)| !l.is_empty())?;
    let lines = &lines[start..];
    let (coloured, first) = &lines[0];
    let blank_after = lines.get(1).is_some_and(|(_, l)| l.is_empty());
    let (title, body) = if lines.len() > 1 && (*coloured || blank_after) { (first.clone(), &lines[1..]) } else { (String::new(), lines) };
    let mut content = String::new();
    let mut paragraph = false;
    for (_, l) in body {
        if l.is_empty() {
            // a run of blank lines becomes one paragraph break
            paragraph = !content.is_empty();
            continue;
        }
        if !content.is_empty() {
            content.push_str(if paragraph { "\n\n" } else { "\n" });
        }
        paragraph = false;
        content.push_str(l);
    }
    let content = content.trim().to_string();
    if content.is_empty() && title.is_empty() {
        return None;
    }
    Some(Record { title, content })
}

/// Reads the three fortune files under `src` and writes `out` atomically
/// (temporary file, then rename). Returns how many records each file gave.
pub fn build_corpus(src: &Path, out: &Path) -> Result<Vec<(String, usize)>> {
    let mut records = Vec::new();
    let mut counts = Vec::new();
    for name in FILES {
        let p = src.join(name);
        let bytes = std::fs::read(&p)
            .map_err(|e| Error::invalid(&p, format!("{e}; hint: install Debian's fortunes-zh (`apt-get install fortunes-zh`) or run scripts/setup.sh")))?;
        let text = String::from_utf8(bytes).map_err(|e| Error::parse(&p, 0, 0, format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))?;
        let r = parse_fortunes(&text);
        counts.push((name.to_string(), r.len()));
        records.extend(r);
    }
    write_json_array_atomic(out, &records)?;
    Ok(counts)
}

/// Writes `[\n{...},\n{...}\n]` (one record a line) via a temporary file.
pub fn write_json_array_atomic<T: Serialize>(out: &Path, records: &[T]) -> Result<()> {
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).at(dir)?;
    let tmp: PathBuf = dir.join(format!(".{}.tmp-{}", out.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        w.write_all(b"[\n")?;
        for (i, r) in records.iter().enumerate() {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(if i + 1 < records.len() { b",\n" } else { b"\n" })?;
        }
        w.write_all(b"]\n")?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    if let Err(e) = write().and_then(|_| std::fs::rename(&tmp, out)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(out, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_colour_codes() {
        assert_eq!(strip_ansi("\u{1b}[32m《静夜思》\u{1b}[m"), "《静夜思》");
        assert_eq!(strip_ansi("\u{1b}[33m    -- Debian \u{1b}[32m《社会契约》\u{1b}[m第一条\u{1b}[m"), "    -- Debian 《社会契约》第一条");
    }

    #[test]
    fn poem_and_essay_records() {
        let text = "\u{1b}[32m《静夜思》\u{1b}[m\n\u{1b}[33m作者：李白\u{1b}[m\n床前明月光，疑是地上霜。\n%\n要有礼貌\n\n在 Debian 这种项目中，\n很难避免。\n\n\u{1b}[33m    -- Debian \u{1b}[32m《行为准则》\u{1b}[m第一条\u{1b}[m\n%\n只有一行\n%\n%\n";
        let r = parse_fortunes(text);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], Record { title: "《静夜思》".into(), content: "作者：李白\n床前明月光，疑是地上霜。".into() });
        assert_eq!(r[1].title, "要有礼貌");
        assert_eq!(r[1].content, "在 Debian 这种项目中，\n很难避免。\n\n-- Debian 《行为准则》第一条");
        assert_eq!(r[2], Record { title: String::new(), content: "只有一行".into() });
    }

    #[test]
    fn atomic_write_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("sub/data.json");
        write_json_array_atomic(&out, &[Record { title: "a".into(), content: "b".into() }]).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        assert_eq!(v[0]["content"], "b");
        assert_eq!(std::fs::read_dir(out.parent().unwrap()).unwrap().count(), 1);
    }
}
