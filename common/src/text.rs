//! Reading text files people hand us: configs, hostfiles, vocabularies and
//! corpora must be UTF-8. A UTF-8 byte-order mark (Windows editors write one)
//! is dropped, and input that is not UTF-8 text gets an error that says what
//! it is instead: UTF-16/UTF-32 text, a compressed archive, a binary file, or
//! the line and column of the first byte that is not UTF-8.

use std::path::Path;

use crate::error::{Error, IoContext, Result};

/// The UTF-8 byte-order mark.
pub const BOM: &[u8] = b"\xEF\xBB\xBF";

/// How many leading bytes of a file to look at for binary content.
const SNIFF_BYTES: usize = 8192;

/// Judges the start of `path` (`head`: any prefix of it; only the first
/// `SNIFF_BYTES` are looked at): the number of bytes to skip (a UTF-8
/// byte-order mark), or an error naming what the file is when it is not
/// UTF-8 text.
pub fn sniff(path: &Path, head: &[u8]) -> Result<usize> {
    let not_text = |what: &str| Error::invalid(path, format!("{what}; expected UTF-8 text"));
    // longest marks first: the UTF-32 LE mark begins with the UTF-16 LE one
    for (mark, name) in [
        (&b"\xFF\xFE\x00\x00"[..], "UTF-32 text (it starts with a UTF-32 byte-order mark): save it as UTF-8"),
        (b"\x00\x00\xFE\xFF", "UTF-32 text (it starts with a UTF-32 byte-order mark): save it as UTF-8"),
        (b"\xFF\xFE", "UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
        (b"\xFE\xFF", "UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
    ] {
        if head.starts_with(mark) {
            return Err(not_text(name));
        }
    }
    for (magic, name) in [
        (&b"\x1F\x8B"[..], "a gzip-compressed file: decompress it first (gunzip)"),
        (b"\x28\xB5\x2F\xFD", "a zstd-compressed file: decompress it first (unzstd)"),
        (b"\xFD7zXZ\x00", "an xz-compressed file: decompress it first (unxz)"),
        (b"BZh", "a bzip2-compressed file: decompress it first (bunzip2)"),
        (b"PK\x03\x04", "a zip archive: unpack it first (unzip)"),
        (b"\x7FELF", "an executable (ELF), not text"),
    ] {
        // bzip2: "BZh", the block size digit, then the block magic
        let bzip2 = magic != b"BZh" || (head.len() >= 10 && head[3].is_ascii_digit() && &head[4..10] == b"1AY&SY");
        if head.starts_with(magic) && bzip2 {
            return Err(not_text(name));
        }
    }
    if let Some(i) = head.iter().take(SNIFF_BYTES).position(|&b| b == 0) {
        return Err(not_text(&format!("a binary file (a NUL byte at offset {i})")));
    }
    Ok(if head.starts_with(BOM) { BOM.len() } else { 0 })
}

/// `bytes` (all of `path`) as UTF-8 text without a byte-order mark; anything
/// else is an error (see `sniff`), the first invalid byte located by line
/// and column.
pub fn utf8<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    let skip = sniff(path, bytes)?;
    let body = &bytes[skip..];
    std::str::from_utf8(body).map_err(|e| {
        let (line, col) = line_col(body, e.valid_up_to());
        let byte = body[e.valid_up_to()];
        Error::parse(path, line, col, format!("not UTF-8 (byte 0x{byte:02X}); the file must be UTF-8 text"))
    })
}

/// Reads `path` whole as UTF-8 text (see `utf8`).
pub fn read(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).at(path)?;
    utf8(path, &bytes).map(str::to_string)
}

/// 1-based (line, column in characters) of byte `offset` in `buf`.
pub fn line_col(buf: &[u8], offset: usize) -> (usize, usize) {
    let before = &buf[..offset.min(buf.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[start..]).chars().count() + 1;
    (line, col)
}

/// Reads the JSON file `path` into `T`. A syntax or shape error names the
/// file, line and column, after `what` (e.g. "malformed JSON").
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = read(path)?;
    serde_json::from_str(&text).map_err(|e| Error::parse(path, e.line(), e.column(), format!("{what}: {e}")))
}

/// `s` as one word of a shell command line, for the commands that messages
/// suggest: as it is when that is safe, else single-quoted.
pub fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:,=@".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(bytes: &[u8]) -> String {
        utf8(Path::new("f.json"), bytes).unwrap_err().to_string()
    }

    #[test]
    fn a_bom_is_dropped_and_other_input_is_named() {
        let p = Path::new("f.json");
        assert_eq!(utf8(p, b"\xEF\xBB\xBF{\"a\": 1}").unwrap(), "{\"a\": 1}");
        assert_eq!(utf8(p, "plain 文本".as_bytes()).unwrap(), "plain 文本");
        assert_eq!(utf8(p, b"").unwrap(), "");
        assert_eq!(err(b"\xFF\xFE{\x00"), "f.json: UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8; expected UTF-8 text");
        assert!(err(b"\xFF\xFE\x00\x00{\x00\x00\x00").starts_with("f.json: UTF-32 text"));
        assert_eq!(err(b"\x1F\x8B\x08\x00rest"), "f.json: a gzip-compressed file: decompress it first (gunzip); expected UTF-8 text");
        assert_eq!(err(b"{\"a\":\x00\x01}"), "f.json: a binary file (a NUL byte at offset 5); expected UTF-8 text");
        assert_eq!(
            err("第一行\n第二\u{7FF}行".as_bytes().iter().copied().chain([0xC3, 0x28]).collect::<Vec<u8>>().as_slice()),
            "f.json:2:5: not UTF-8 (byte 0xC3); the file must be UTF-8 text"
        );
        // text that happens to start with "BZh" is text; a bzip2 header is not
        assert_eq!(utf8(p, b"BZh is a word").unwrap(), "BZh is a word");
        assert!(err(b"BZh91AY&SY\x01\x02").contains("a bzip2-compressed file"));
    }
}
