//! `glm-worker checkpoint inspect`: what a checkpoint holds, and whether it
//! is complete, read from its files' headers and checksums.

use std::path::Path;

use super::{part_dirs, resolve, State};
use crate::data::store::sha256_file;
use crate::error::{Error, IoContext, Result};

/// One tensor of a safetensors header: name, dtype, shape, bytes.
type HeaderEntry = (String, String, Vec<u64>, u64);

/// The tensors of a safetensors file from its header alone, sorted by name.
fn safetensors_header(path: &Path) -> Result<Vec<HeaderEntry>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).at(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::invalid(path, format!("not a safetensors file (no header: {e})")))?;
    let n = u64::from_le_bytes(len);
    let size = f.metadata().at(path)?.len();
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(Error::invalid(path, format!("not a safetensors file (header of {n} bytes in a file of {size})")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).at(path)?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| Error::invalid(path, format!("safetensors header: {e}")))?;
    let mut out = Vec::new();
    for (name, t) in v.as_object().into_iter().flatten().filter(|(k, _)| *k != "__metadata__") {
        let dtype = t["dtype"].as_str().unwrap_or("?").to_string();
        let shape: Vec<u64> = t["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let off: Vec<u64> = t["data_offsets"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let bytes = if off.len() == 2 { off[1].saturating_sub(off[0]) } else { 0 };
        out.push((name.clone(), dtype, shape, bytes));
    }
    out.sort();
    Ok(out)
}

/// What a checkpoint holds, for `glm-worker checkpoint inspect`: its
/// layout, iteration, every file with its size and checksum verdict, every
/// tensor with dtype and shape (`tensors`), and whether it is complete
/// (every part and every file present and intact). Returns the report's
/// lines and the completeness verdict.
pub fn inspect(path: &Path, tensors: bool) -> Result<(Vec<String>, bool)> {
    let dir = resolve(path)?;
    let dirs = part_dirs(&dir)?;
    let mut lines = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut first: Option<State> = None;
    for (r, d) in dirs.iter().enumerate() {
        let sp = d.join("state.json");
        let state: State = glm_common::text::read_json(&sp, "corrupt checkpoint state")?;
        if r == 0 {
            let z = state.zero.as_ref();
            lines.push(format!("checkpoint {}", dir.display()));
            lines.push(format!(
                "  iteration {} (optimizer step {}, {} skipped), {} tokens of training seen at {} samples; blank-infilling modes per {}",
                state.iteration,
                state.optimizer_step,
                state.skipped_steps,
                state.consumed_samples * state.args.get("seq_length").and_then(|v| v.as_u64()).unwrap_or(0),
                state.consumed_samples,
                match state.mode_group(&sp) {
                    _ if state.imported_from.is_some() && state.mode_group == 0 => "the global batch of the run that trains from it (imported)".into(),
                    Ok(g) if state.mode_group > 0 => format!("{g} samples"),
                    Ok(g) => format!("{g} samples (not recorded: the saving run's micro-batch × data-parallel size)"),
                    Err(e) => format!("? ({e})"),
                }
            ));
            lines.push(format!(
                "  layout: tensor-parallel {} × data-parallel {}, ZeRO stage {}{}, precision {} (weights stored in fp32)",
                state.tp.max(dirs.len()),
                if state.dp == 0 { "?".to_string() } else { state.dp.to_string() },
                z.map_or(0, |z| z.stage),
                z.map_or(String::new(), |z| format!(" ({} shard(s) of {} elements, units of {})", z.shards.dp, z.shards.shard_len(), z.shards.unit)),
                state.precision.name()
            ));
            let m = &state.model;
            lines.push(format!(
                "  model: {} layers, hidden {}, {} heads, ffn {}, vocab {}; optimizer state: {}",
                m.num_layers,
                m.hidden_size,
                m.num_attention_heads,
                m.intermediate_size,
                m.vocab_size,
                if state.has_optimizer { "saved" } else { "not saved" }
            ));
            if let Some(from) = &state.imported_from {
                lines.push(format!("  imported from {from}"));
            }
            if state.zero.is_some() && state.dp != state.zero.as_ref().map_or(0, |z| z.shards.dp) {
                problems.push(format!(
                    "state.json says data-parallel {} but the manifest has {} shards",
                    state.dp,
                    state.zero.as_ref().map_or(0, |z| z.shards.dp)
                ));
            }
            if state.tp > dirs.len() {
                problems.push(format!("{} of {} tensor-parallel parts present", dirs.len(), state.tp));
            }
            first = Some(state.clone());
        } else if first.as_ref().is_some_and(|f| f.iteration != state.iteration || f.model != state.model) {
            problems.push(format!("{}: another iteration or model than part 0", sp.display()));
        }
        if dirs.len() > 1 || r > 0 {
            lines.push(format!("  part {}", d.file_name().unwrap_or_default().to_string_lossy()));
        }
        let mut listed: Vec<&String> = state.files.keys().collect();
        listed.sort();
        for name in listed {
            let p = d.join(name);
            let (size, verdict) = match std::fs::metadata(&p) {
                Err(_) => (0, "MISSING".to_string()),
                Ok(meta) => match sha256_file(&p) {
                    Ok(h) if h == state.files[name] => (meta.len(), format!("sha256 {} ok", &h[..16])),
                    Ok(h) => (meta.len(), format!("sha256 {} MISMATCH (truncated or modified)", &h[..16])),
                    Err(e) => (meta.len(), format!("unreadable: {e}")),
                },
            };
            if !verdict.ends_with("ok") {
                problems.push(format!("{}: {verdict}", p.display()));
            }
            let head = if name.ends_with(".safetensors") && verdict.ends_with("ok") { safetensors_header(&p).ok() } else { None };
            let count = head.as_ref().map_or(String::new(), |h| format!(", {} tensors", h.len()));
            let shard = state.zero.as_ref().and_then(|z| z.files.iter().find(|f| &f.file == name));
            let ranges = shard.map_or(String::new(), |f| {
                let shown: Vec<String> = f.pieces.iter().take(4).map(|p| format!("[{}, {})", p.flat, p.flat + p.len)).collect();
                format!(", flat ranges {}{}", shown.join(" "), if f.pieces.len() > 4 { format!(" … ({} runs)", f.pieces.len()) } else { String::new() })
            });
            lines.push(format!("    {name:<38} {:>12} bytes{count}{ranges}  {verdict}", size));
            if let (true, Some(h)) = (tensors, head) {
                for (t, dtype, shape, bytes) in h {
                    lines.push(format!("      {t:<60} {dtype:<5} {shape:?} {bytes} bytes"));
                }
            }
        }
        if let Some(z) = &state.zero {
            for f in &z.files {
                if !state.files.contains_key(&f.file) {
                    problems.push(format!("{}: shard of data-parallel rank {} not listed with a checksum", d.join(&f.file).display(), f.dp_rank));
                }
            }
        }
    }
    let complete = problems.is_empty();
    lines.push(if complete {
        "  complete: yes (every part and file present, every checksum verified)".to_string()
    } else {
        format!("  complete: NO — {}", problems.join("; "))
    });
    Ok((lines, complete))
}
