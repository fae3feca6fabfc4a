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
//! past its last checkpoint) are removed from its files, as the original's
//! `purge_step` hides them; a fresh run (iteration 0) starts the record
//! afresh, as `metrics.jsonl` does.

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

/// The records of an event file, checked; `Err` names what is wrong.
fn read_records(bytes: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or("truncated record header")?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        if masked_crc(&head[..8]) != u32::from_le_bytes(head[8..12].try_into().unwrap()) {
            return Err(format!("bad length checksum at byte {at}"));
        }
        let data = bytes.get(at + 12..at + 12 + len).ok_or("truncated record")?;
        let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or("truncated record checksum")?;
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(format!("bad data checksum at byte {at}"));
        }
        out.push(data);
        at += 16 + len;
    }
    Ok(out)
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

fn is_event_file(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("events.out.tfevents."))
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl Writer {
    /// Opens `dir` for a run resuming after step `resume_from` (0: a fresh
    /// run): earlier files lose their events past it (a fresh run: the
    /// files go), and a new file starts.
    pub fn open(dir: &Path, style: Style, resume_from: i64) -> Result<Writer> {
        std::fs::create_dir_all(dir).at(dir)?;
        let mut old: Vec<PathBuf> = std::fs::read_dir(dir).at(dir)?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| is_event_file(p)).collect();
        old.sort();
        for p in &old {
            if resume_from == 0 {
                std::fs::remove_file(p).at(p)?;
                continue;
            }
            let bytes = std::fs::read(p).at(p)?;
            let records = read_records(&bytes)
                .map_err(|e| Error::invalid(p, format!("not a readable TensorBoard event file ({e}); move it out of {}", dir.display())))?;
            let mut kept = Vec::with_capacity(bytes.len());
            let mut dropped = false;
            for r in records {
                let e = Event::decode(r).map_err(|e| Error::invalid(p, format!("not a TensorBoard event ({e})")))?;
                if e.step > resume_from && e.file_version.is_none() {
                    dropped = true;
                } else {
                    kept.extend_from_slice(&record(r));
                }
            }
            if dropped {
                let tmp = p.with_extension("tmp-resume");
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

    #[test]
    fn records_round_trip_and_a_resume_drops_later_steps() {
        // TensorFlow's masked CRC of the empty string and of "a" (crc32c 0 and 0xc1d04330)
        assert_eq!(masked_crc(b""), 0xa282_ead8);
        assert_eq!(masked_crc(b"a"), 0xc1d0_4330u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let d = tempfile::tempdir().unwrap();
        let mut w = Writer::open(d.path(), Style::Glm, 0).unwrap();
        for s in 1..=5 {
            w.scalars(s, &[("train_loss".into(), 10.0 - s as f64)]).unwrap();
        }
        let first = w.path.clone();
        drop(w);
        let steps = |p: &Path| -> Vec<i64> {
            read_records(&std::fs::read(p).unwrap())
                .unwrap()
                .into_iter()
                .map(|r| Event::decode(r).unwrap())
                .filter(|e| e.summary.is_some())
                .map(|e| e.step)
                .collect()
        };
        assert_eq!(steps(&first), vec![1, 2, 3, 4, 5]);
        let w = Writer::open(d.path(), Style::Glm, 3).unwrap();
        assert_eq!(steps(&first), vec![1, 2, 3]);
        assert_ne!(w.path, first);
        drop(w);
        // a fresh run starts afresh
        let w = Writer::open(d.path(), Style::DeepSpeed, 0).unwrap();
        assert!(!first.exists() && w.tag("lr") == "Train/Samples/lr");
        let mut bad = record(b"x");
        bad[12] ^= 1;
        assert!(read_records(&bad).is_err());
    }
}
