//! A safetensors file written and checksummed in one pass: the bytes of
//! `Tensor::write_safetensors` (the `safetensors` crate's layout: an 8-byte
//! little-endian header length, the JSON header with the tensors sorted by
//! descending dtype alignment then name, padded with spaces to 8 bytes,
//! then the data in that order), streamed from the tensors' own memory
//! where they are contiguous host tensors, and hashed as written, instead
//! of copied into a buffer per tensor and read back to be checksummed.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, IoContext, Result};

/// safetensors' name of `kind` and its place in the crate's dtype order
/// (increasing alignment).
fn dtype(kind: Kind) -> Option<(u8, &'static str)> {
    Some(match kind {
        Kind::Bool => (0, "BOOL"),
        Kind::Uint8 => (1, "U8"),
        Kind::Int8 => (2, "I8"),
        Kind::Int16 => (3, "I16"),
        Kind::Half => (5, "F16"),
        Kind::BFloat16 => (6, "BF16"),
        Kind::Int => (7, "I32"),
        Kind::Float => (9, "F32"),
        Kind::Double => (10, "F64"),
        Kind::Int64 => (11, "I64"),
        _ => return None,
    })
}

/// Writes `tensors` to `path` as safetensors; returns the file's sha256
/// (lowercase hex).
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<String> {
    let mut order: Vec<(u8, &'static str, &str, &Tensor)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (rank, dt) = dtype(t.kind()).ok_or_else(|| Error::invalid(path, format!("{name}: {:?} cannot be saved as safetensors", t.kind())))?;
        order.push((rank, dt, name, t));
    }
    order.sort_by(|a, b| b.0.cmp(&a.0).then(a.2.cmp(b.2)));
    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (_, dt, name, t)) in order.iter().enumerate() {
        let len = t.numel() * t.kind().elt_size_in_bytes();
        let shape: Vec<String> = t.size().iter().map(i64::to_string).collect();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{dt}\",\"shape\":[{}],\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(name).expect("a name serialises"),
            shape.join(","),
            offset + len
        ));
        offset += len;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = std::fs::File::create(path).at(path)?;
    let mut out = Hashing { inner: std::io::BufWriter::with_capacity(1 << 22, file), sha: Sha256::new() };
    out.write_all(&(header.len() as u64).to_le_bytes()).at(path)?;
    out.write_all(header.as_bytes()).at(path)?;
    for (_, _, name, t) in order {
        let len = t.numel() * t.kind().elt_size_in_bytes();
        if len == 0 {
            continue;
        }
        if t.device() == Device::Cpu && t.is_contiguous() {
            // SAFETY: a contiguous host tensor's `len` bytes start at its
            // data pointer (storage offset included), and `t` is borrowed
            // for as long as the slice lives.
            let bytes = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) };
            out.write_all(bytes).at(path)?;
        } else {
            let mut bytes = vec![0u8; len];
            t.f_copy_data_u8(&mut bytes, t.numel()).map_err(|e| Error::invalid(path, format!("{name}: {e}")))?;
            out.write_all(&bytes).at(path)?;
        }
    }
    let Hashing { inner, sha } = out;
    // on the disk before anything names it (an error only the close or the
    // sync reports is an error here, not a checksum of bytes never stored)
    let file = inner.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().at(path)?;
    Ok(crate::data::tokenizer::hex(&sha.finalize()))
}

/// Writes `bytes` to `path` and waits until they are on the disk.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).at(path)?;
    f.write_all(bytes).at(path)?;
    f.sync_all().at(path)
}

/// Waits until `dir`'s entries (files created or renamed in it) are on the
/// disk.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    sha: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same bytes as tch's writer (the `safetensors` crate), and the
    /// checksum of the file as written.
    #[test]
    fn writes_the_bytes_of_tchs_writer_and_their_sha256() {
        let d = tempfile::tempdir().unwrap();
        let base = Tensor::arange(60, (Kind::Float, Device::Cpu)) / 7.0;
        let tensors: Vec<(String, Tensor)> = vec![
            ("w.b".into(), base.narrow(0, 10, 12).view([3, 4])),
            ("a\"quoted\\name".into(), base.narrow(0, 0, 5)),
            ("ids".into(), Tensor::arange(9, (Kind::Int64, Device::Cpu))),
            ("half".into(), base.narrow(0, 1, 6).to_kind(Kind::BFloat16)),
            // not contiguous: copied
            ("t".into(), base.narrow(0, 0, 12).view([3, 4]).transpose(0, 1)),
            ("scalar".into(), Tensor::from(2.5f32)),
            ("empty".into(), Tensor::zeros([0, 3], (Kind::Float, Device::Cpu))),
        ];
        let ours = d.path().join("ours.safetensors");
        let sha = write_safetensors(&ours, &tensors).unwrap();
        let theirs = d.path().join("theirs.safetensors");
        let contiguous: Vec<(String, Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t.contiguous())).collect();
        Tensor::write_safetensors(&contiguous, &theirs).unwrap();
        assert!(std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(), "the bytes differ from tch's writer");
        assert_eq!(sha, crate::data::store::sha256_file(&ours).unwrap());
        let back = Tensor::read_safetensors(&ours).unwrap();
        assert_eq!(back.len(), tensors.len());
    }
}
