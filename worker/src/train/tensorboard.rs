//! TensorBoard event files, as the original writes them through
//! tensorboardX (`summary_dir`) and DeepSpeed through its monitor (the
//! `tensorboard` block).
//!
//! An event file is a sequence of TFRecords — `u64` length, masked CRC-32C
//! of the length, the bytes, masked CRC-32C of the bytes — each holding a
//! `tensorflow.Event` protocol buffer: first `file_version`, then summaries
//! (scalars as `simple_value`, text as a string tensor for the text
//! plugin). The messages are declared here with `prost` (the few fields
//! used, with TensorFlow's field numbers) and the checksum is the `crc32c`
//! crate's.
//!
//! A resumed run continues the same directory without duplicate steps:
//! the events after the resume point that an earlier run wrote (it went on
//! past its last checkpoint), and the configuration text an earlier start
//! from the same point wrote, are removed from its files (the original's
//! tensorboardX `purge_step` hides them from TensorBoard instead). A fresh
//! run into a directory with events of an earlier run is refused, as a
//! fresh run into a used save directory is, unless `overwrite` (which
//! removes them). A record cut short by a crash ends its file.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, IoContext, Result};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    /// `DT_STRING` = 7.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<Dim>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Dim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

const DT_STRING: i32 = 7;

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

/// One TFRecord holding `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of an event file, checked; `Err` names what is wrong. A
/// record cut short at the end (a writer killed mid-write) ends the file, as
/// TensorFlow's reader takes it; the second value says there was one.
fn read_records(bytes: &[u8]) -> std::result::Result<(Vec<&[u8]>, bool), String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else { return Ok((out, true)) };
        let len = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        if masked_crc(&head[..8]) != u32::from_le_bytes(head[8..12].try_into().unwrap()) {
            return Err(format!("bad length checksum at byte {at}"));
        }
        let (Some(data), Some(crc)) = (bytes.get(at + 12..at + 12 + len), bytes.get(at + 12 + len..at + 16 + len)) else { return Ok((out, true)) };
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(format!("bad data checksum at byte {at}"));
        }
        out.push(data);
        at += 16 + len;
    }
    Ok((out, false))
}

/// Whose tag names and step axis a directory follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// The original's (`summary_dir`): `Train/...` against the iteration.
    Glm,
    /// DeepSpeed's monitor (the `tensorboard` block): `Train/Samples/...`
    /// against the samples trained on.
    DeepSpeed,
}

/// A TensorBoard log directory of rank 0.
pub struct Writer {
    pub dir: PathBuf,
    pub style: Style,
    file: std::fs::File,
    path: PathBuf,
}

/// The name a file being rewritten goes by (not an event file's).
const TMP_PREFIX: &str = ".resume-tmp.";

fn is_event_file(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents."))
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Writer {
    /// Opens `dir` for a run resuming after step `resume_from` (0: a fresh
    /// run): earlier files lose their events past it and the configuration
    /// text at it (a fresh run: files of an earlier run are refused, `how`
    /// saying what to do, or removed with `overwrite`), and a new file starts.
    pub fn open(dir: &Path, style: Style, resume_from: i64, overwrite: bool, how: &str) -> Result<Writer> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut old = Vec::new();
        for e in std::fs::read_dir(dir).at(dir)? {
            let p = e.at(dir)?.path();
            if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(TMP_PREFIX)) {
                // a rewrite that a crash interrupted: the original is intact
                std::fs::remove_file(&p).at(&p)?;
            } else if is_event_file(&p) {
                old.push(p);
            }
        }
        old.sort();
        if resume_from == 0 && !old.is_empty() {
            if !overwrite {
                return Err(Error::invalid(
                    dir,
                    format!("holds TensorBoard events of an earlier run ({} file(s)) and this run starts afresh: {how}", old.len()),
                ));
            }
            for p in &old {
                std::fs::remove_file(p).at(p)?;
            }
        }
        for p in old.iter().filter(|_| resume_from > 0) {
            let bytes = std::fs::read(p).at(p)?;
            let (records, cut) = read_records(&bytes)
                .map_err(|e| Error::invalid(p, format!("not a readable TensorBoard event file ({e}); move it out of {}", dir.display())))?;
            let mut kept = Vec::with_capacity(bytes.len());
            let mut dropped = cut;
            for r in records {
                let e = Event::decode(r).map_err(|e| Error::invalid(p, format!("not a TensorBoard event ({e})")))?;
                let text = e.summary.as_ref().is_some_and(|s| s.value.iter().any(|v| v.tensor.is_some()));
                if e.file_version.is_none() && (e.step > resume_from || (text && e.step >= resume_from)) {
                    dropped = true;
                } else {
                    kept.extend_from_slice(&record(r));
                }
            }
            if dropped {
                let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let tmp = dir.join(format!("{TMP_PREFIX}{name}"));
                std::fs::write(&tmp, &kept).at(&tmp)?;
                std::fs::rename(&tmp, p).at(p)?;
            }
        }
        let host = crate::runtime::host::hostname();
        // tensorboardX's name; the counter keeps two writers of one process apart
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("events.out.tfevents.{:010}.{host}.{}.{n}", now() as u64, std::process::id()));
        let file = std::fs::OpenOptions::new().create_new(true).append(true).open(&path).at(&path)?;
        let mut w = Writer { dir: dir.to_path_buf(), style, file, path };
        w.write(&Event { wall_time: now(), step: 0, file_version: Some("brain.Event:2".into()), summary: None })?;
        Ok(w)
    }

    fn write(&mut self, e: &Event) -> Result<()> {
        self.file.write_all(&record(&e.encode_to_vec())).at(&self.path)?;
        self.file.flush().at(&self.path)
    }

    /// The tag of `name` in this style.
    pub fn tag(&self, name: &str) -> String {
        match self.style {
            Style::Glm => format!("Train/{name}"),
            Style::DeepSpeed => format!("Train/Samples/{name}"),
        }
    }

    /// Scalars `(name, value)` at `step`, under this style's tags.
    pub fn scalars(&mut self, step: i64, values: &[(String, f64)]) -> Result<()> {
        let value = values.iter().map(|(k, v)| Value { tag: self.tag(k), simple_value: Some(*v as f32), ..Default::default() }).collect();
        self.write(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value }) })
    }

    /// `text` (markdown) under `tag` for the text plugin, at `step`.
    pub fn text(&mut self, step: i64, tag: &str, text: &str) -> Result<()> {
        let v = Value {
            tag: format!("{tag}/text_summary"),
            simple_value: None,
            tensor: Some(TensorProto {
                dtype: DT_STRING,
                tensor_shape: Some(TensorShape { dim: vec![Dim { size: 1 }] }),
                string_val: vec![text.as_bytes().to_vec()],
            }),
            metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "text".into(), content: Vec::new() }) }),
        };
        self.write(&Event { wall_time: now(), step, file_version: None, summary: Some(Summary { value: vec![v] }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(p: &Path) -> Vec<i64> {
        read_records(&std::fs::read(p).unwrap())
            .unwrap()
            .0
            .into_iter()
            .map(|r| Event::decode(r).unwrap())
            .filter(|e| e.summary.is_some())
            .map(|e| e.step)
            .collect()
    }

    #[test]
    fn records_round_trip_and_a_resume_drops_later_steps() {
        // TensorFlow's masked CRC of the empty string and of "a" (crc32c 0 and 0xc1d04330)
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(masked_crc(b"a"), 0xc1d0_4330u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::open(d.path(), Style::Glm, 0, false, "").unwrap();
        w.text(0, "config", "first start").unwrap();
        for s in 1..=5 {
            w.scalars(s, &[("train_loss".into(), 10.0 - s as f64)]).unwrap();
        }
        let first = w.path.clone();
        drop(w);
        assert_eq!(steps(&first), vec![0, 1, 2, 3, 4, 5]);
        // resumed from 3, twice: steps past 3 go, and the configuration an earlier start from 3 wrote
        let mut w = Writer::open(d.path(), Style::Glm, 3, false, "").unwrap();
        w.text(3, "config", "second start").unwrap();
        let second = w.path.clone();
        drop(w);
        assert_eq!(steps(&first), vec![0, 1, 2, 3]);
        let _w = Writer::open(d.path(), Style::Glm, 3, false, "").unwrap();
        assert_eq!((steps(&first), steps(&second)), (vec![0, 1, 2, 3], vec![]));
        // a fresh run is refused, then replaces them with overwrite
        let e = Writer::open(d.path(), Style::Glm, 0, false, "say overwrite=true").err().unwrap().to_string();
        assert!(e.contains("holds TensorBoard events of an earlier run (3 file(s))") && e.contains("say overwrite=true"), "{e}");
        let w = Writer::open(d.path(), Style::DeepSpeed, 0, true, "").unwrap();
        assert!(!first.exists() && w.tag("lr") == "Train/Samples/lr");
        let mut bad = record(b"x");
        bad[12] ^= 1;
        assert!(read_records(&bad).is_err());
    }

    #[test]
    fn a_record_cut_short_ends_the_file_and_a_resume_drops_it() {
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::open(d.path(), Style::Glm, 0, false, "").unwrap();
        for s in 1..=4 {
            w.scalars(s, &[("train_loss".into(), s as f64)]).unwrap();
        }
        let p = w.path.clone();
        drop(w);
        // killed mid-write: the last record loses its tail
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(steps(&p), vec![1, 2, 3]);
        let _w = Writer::open(d.path(), Style::Glm, 2, false, "").unwrap();
        assert_eq!(steps(&p), vec![1, 2]);
        // a leftover rewrite is not an event file and goes
        std::fs::write(d.path().join(format!("{TMP_PREFIX}x")), b"junk").unwrap();
        let _w = Writer::open(d.path(), Style::Glm, 2, false, "").unwrap();
        assert!(!d.path().join(format!("{TMP_PREFIX}x")).exists());
    }
}
