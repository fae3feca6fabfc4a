//! PyTorch's file format (`torch.save` since 1.6), read and written without
//! Python: a zip archive `<name>/data.pkl` (a pickle whose tensors refer to
//! storages by persistent id), `<name>/data/<key>` (each storage's raw
//! bytes, uncompressed), `<name>/byteorder` and `<name>/version`.
//!
//! Reading executes nothing (`pickle`): a tensor is recognised as the call
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`
//! (or `_rebuild_tensor`, or wrapped in `_rebuild_parameter`) on a
//! persistent id `('storage', torch.<Type>Storage, key, location, numel)`,
//! and its bytes are read from `data/<key>` as that storage's dtype, with
//! its offset and strides (views of a shared storage included). Writing
//! produces what `torch.load` reads with its default `weights_only=True`:
//! dicts, `collections.OrderedDict`, `set`, plain values and tensors only.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::pickle::{self, Id, Pickle};
use crate::error::{Error, IoContext, Result};

/// An opened PyTorch file: its pickle parsed, its storages not yet read.
pub struct TorchFile {
    pub path: PathBuf,
    zip: zip::ZipArchive<std::fs::File>,
    /// The archive's folder inside the zip, with its slash (`archive/`).
    prefix: String,
    pub pickle: Pickle,
}

/// A tensor of the pickle: where its elements are.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRef {
    /// The storage's record, `data/<key>`.
    pub key: String,
    pub kind: Kind,
    /// The storage's class (`FloatStorage`), for messages.
    pub storage_type: String,
    /// Elements in the storage.
    pub storage_numel: i64,
    pub offset: i64,
    pub size: Vec<i64>,
    pub stride: Vec<i64>,
}

/// The element type of a storage class.
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// The storage class of an element type this program writes.
fn storage_type(kind: Kind) -> Option<&'static str> {
    Some(match kind {
        Kind::Float => "FloatStorage",
        Kind::Half => "HalfStorage",
        Kind::BFloat16 => "BFloat16Storage",
        Kind::Double => "DoubleStorage",
        _ => return None,
    })
}

impl TorchFile {
    /// Opens `path` and parses its pickle; refuses (naming the file) what is
    /// not a PyTorch zip file, or the legacy format, or a big-endian one.
    pub fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).at(path)?;
        let mut magic = [0u8; 4];
        let n = f.read(&mut magic).at(path)?;
        if n < 4 || &magic != b"PK\x03\x04" {
            let what = if n >= 2 && magic[0] == 0x80 && magic[1] <= 5 {
                "a PyTorch file in the legacy format of torch < 1.6 (a bare pickle), which this reader does not read; re-save it with a newer torch: \
                 python -c \"import torch; torch.save(torch.load('FILE', weights_only=False), 'FILE')\""
            } else {
                "not a PyTorch file (torch.save writes a zip archive; this does not start with one)"
            };
            return Err(Error::invalid(path, what));
        }
        let mut zip = zip::ZipArchive::new(f).map_err(|e| Error::invalid(path, format!("not a readable zip archive: {e}")))?;
        let pkl: Vec<String> = zip.file_names().filter(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1).map(String::from).collect();
        let Some(name) = pkl.iter().min_by_key(|n| n.len()).cloned() else {
            return Err(Error::invalid(path, "a zip archive without data.pkl: not a file torch.save wrote"));
        };
        let prefix = name[..name.len() - "data.pkl".len()].to_string();
        if let Some(order) = read_record(&mut zip, &format!("{prefix}byteorder"), path)? {
            if order.trim_ascii() != b"little" {
                return Err(Error::invalid(path, format!("byte order {:?}: only little-endian files are read", String::from_utf8_lossy(&order))));
            }
        }
        let data = read_record(&mut zip, &name, path)?.expect("listed");
        let pickle = pickle::parse(&data).map_err(|e| Error::invalid(path, format!("{name}: {e}")))?;
        Ok(TorchFile { path: path.to_path_buf(), zip, prefix, pickle })
    }

    /// The tensor value `id` (`what` names it in errors: the key).
    pub fn tensor_ref(&self, id: Id, what: &str) -> Result<TensorRef> {
        let p = &self.pickle;
        let bad = |why: String| Error::invalid(&self.path, format!("{what}: {why}"));
        let Some(((module, func), args)) = p.call(id) else {
            return Err(bad(format!("not a tensor but {}", p.describe(id))));
        };
        let args = p.seq(args).ok_or_else(|| bad(format!("{module}.{func} without an argument tuple")))?;
        match (module, func) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") if args.len() >= 4 => {}
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") if !args.is_empty() => return self.tensor_ref(args[0], what),
            ("torch._tensor", "_rebuild_from_type_v2") if args.len() >= 3 && p.global(args[0]) == Some(("torch._utils", "_rebuild_tensor_v2")) => {
                let inner = p.seq(args[2]).ok_or_else(|| bad("_rebuild_from_type_v2 without an argument tuple".into()))?;
                return self.rebuild_args(inner, what);
            }
            _ => return Err(bad(format!("a tensor this reader cannot rebuild ({module}.{func}; it reads dense tensors, torch._utils._rebuild_tensor_v2)"))),
        }
        self.rebuild_args(args, what)
    }

    /// `_rebuild_tensor_v2`'s arguments: storage, offset, size, stride, ...
    fn rebuild_args(&self, args: &[Id], what: &str) -> Result<TensorRef> {
        let p = &self.pickle;
        let bad = |why: String| Error::invalid(&self.path, format!("{what}: {why}"));
        if args.len() < 4 {
            return Err(bad("a tensor without storage, offset, size and stride".into()));
        }
        let pid = match p.node(args[0]) {
            pickle::Node::Persistent(pid) => *pid,
            _ => return Err(bad(format!("a tensor whose storage is {}, not a persistent id", p.describe(args[0])))),
        };
        let fields = p.seq(pid).filter(|f| f.len() >= 5 && p.str(f[0]) == Some("storage"));
        let Some(fields) = fields else {
            return Err(bad("a storage reference that is not ('storage', type, key, location, numel)".into()));
        };
        let (smod, sname) = p.global(fields[1]).ok_or_else(|| bad(format!("a storage type that is {}", p.describe(fields[1]))))?;
        let kind = match (smod, storage_kind(sname)) {
            ("torch", Some(k)) => k,
            _ => {
                return Err(bad(format!(
                    "storage type {smod}.{sname}, which this reader does not know (it reads float, half, bfloat16, double, integer and bool storages)"
                )))
            }
        };
        let key = p.str(fields[2]).ok_or_else(|| bad("a storage key that is not a string".into()))?.to_string();
        let storage_numel = p.int(fields[4]).ok_or_else(|| bad("a storage size that is not an integer".into()))?;
        let ints = |id: Id, name: &str| -> Result<Vec<i64>> {
            let seq = p.seq(id).ok_or_else(|| bad(format!("a {name} that is {}", p.describe(id))))?;
            seq.iter().map(|&i| p.int(i).ok_or_else(|| bad(format!("a {name} that is not integers")))).collect()
        };
        let offset = p.int(args[1]).ok_or_else(|| bad("a storage offset that is not an integer".into()))?;
        let (size, stride) = (ints(args[2], "size")?, ints(args[3], "stride")?);
        if size.len() != stride.len() || size.iter().chain(&stride).any(|&v| v < 0) || offset < 0 || storage_numel < 0 {
            return Err(bad(format!("size {size:?}, stride {stride:?}, offset {offset}: not a valid strided tensor")));
        }
        // the last element's index must lie in the storage
        if size.iter().all(|&s| s > 0) {
            // checked: a damaged file's numbers must not wrap past the test
            let last = size.iter().zip(&stride).try_fold(offset, |acc, (s, t)| (s - 1).checked_mul(*t).and_then(|x| acc.checked_add(x)));
            let Some(last) = last else {
                return Err(bad(format!("size {size:?}, stride {stride:?}, offset {offset}: beyond any storage (the file is damaged)")));
            };
            if last >= storage_numel {
                return Err(bad(format!(
                    "size {size:?}, stride {stride:?}, offset {offset} reach element {last} of a storage of {storage_numel}: the file is damaged"
                )));
            }
        }
        Ok(TensorRef { key, kind, storage_type: sname.to_string(), storage_numel, offset, size, stride })
    }

    /// Reads `refs` (name, tensor) as contiguous tensors of their own dtype,
    /// or converted to `kind` one by one as read (so a file's weights are
    /// never held in both); a storage several share is read once, and
    /// dropped after its last tensor.
    pub fn read_tensors(&mut self, refs: &[(String, TensorRef)], kind: Option<Kind>) -> Result<Vec<(String, Tensor)>> {
        let mut users: HashMap<&str, usize> = HashMap::new();
        for (_, r) in refs {
            *users.entry(r.key.as_str()).or_default() += 1;
        }
        let mut cache: HashMap<String, Tensor> = HashMap::new();
        let mut out = Vec::with_capacity(refs.len());
        for (name, r) in refs {
            let storage = match cache.get(&r.key) {
                Some(s) => s.shallow_clone(),
                None => {
                    let s = self.storage(r, name)?;
                    cache.insert(r.key.clone(), s.shallow_clone());
                    s
                }
            };
            let n = users.get_mut(r.key.as_str()).expect("counted");
            *n -= 1;
            if *n == 0 {
                cache.remove(&r.key);
            }
            let t = storage
                .f_as_strided(r.size.as_slice(), r.stride.as_slice(), r.offset)
                .map_err(|e| Error::invalid(&self.path, format!("{name}: size {:?}, stride {:?}, offset {}: {e}", r.size, r.stride, r.offset)))?;
            // its own memory: not a view keeping a larger shared storage alive
            let whole = r.offset == 0 && t.numel() as i64 == r.storage_numel && t.is_contiguous();
            let t = if whole { t } else { t.contiguous().copy() };
            out.push((
                name.clone(),
                match kind {
                    Some(k) => t.to_kind(k),
                    None => t,
                },
            ));
        }
        Ok(out)
    }

    /// The storage of `r` as a flat tensor of its dtype.
    fn storage(&mut self, r: &TensorRef, name: &str) -> Result<Tensor> {
        let record = format!("{}data/{}", self.prefix, r.key);
        let want = r.storage_numel as u64 * r.kind.elt_size_in_bytes() as u64;
        let path = self.path.clone();
        let mut f = self.zip.by_name(&record).map_err(|e| Error::invalid(&path, format!("{name}: its storage {record}: {e}")))?;
        if f.size() != want {
            return Err(Error::invalid(
                &path,
                format!("{name}: its storage {record} holds {} bytes, {} elements of {} need {want}", f.size(), r.storage_numel, r.storage_type),
            ));
        }
        let mut bytes = Vec::with_capacity(want as usize);
        f.read_to_end(&mut bytes).map_err(|e| Error::invalid(&path, format!("{name}: reading {record}: {e}")))?;
        Ok(Tensor::from_data_size(&bytes, &[r.storage_numel], r.kind))
    }
}

/// A record's bytes, `None` when the archive has none of that name.
fn read_record(zip: &mut zip::ZipArchive<std::fs::File>, name: &str, path: &Path) -> Result<Option<Vec<u8>>> {
    let mut f = match zip.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(Error::invalid(path, format!("{name}: {e}"))),
    };
    if f.size() > 1 << 32 {
        return Err(Error::invalid(path, format!("{name}: {} bytes, too large for a pickle", f.size())));
    }
    let mut v = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut v).map_err(|e| Error::invalid(path, format!("{name}: {e}")))?;
    Ok(Some(v))
}

/// A value of the top-level dict `write` saves.
pub enum Value<'a> {
    /// An `OrderedDict` of tensors (a state dict).
    Tensors(&'a [(String, Tensor)]),
    /// Plain values (None, bools, numbers, strings, lists, dicts).
    Json(serde_json::Value),
    /// An empty `set()`.
    EmptySet,
}

/// Writes `entries` as a dict in PyTorch's format to `path` (atomically
/// is the caller's business), readable by `torch.load` with
/// `weights_only=True`. Tensors are written contiguous, from host memory.
pub fn write(path: &Path, entries: &[(&str, Value)]) -> Result<()> {
    let mut w = pickle::Writer::new();
    let mut storages: Vec<Tensor> = Vec::new();
    w.empty_dict();
    w.mark();
    for (key, value) in entries {
        w.str(key);
        match value {
            Value::Json(v) => w.json(v),
            Value::EmptySet => {
                w.global("builtins", "set");
                w.empty_list();
                w.out.push(0x85); // TUPLE1
                w.reduce();
            }
            Value::Tensors(ts) => {
                w.ordered_dict();
                if !ts.is_empty() {
                    w.mark();
                    for (name, t) in ts.iter() {
                        let st = storage_type(t.kind()).ok_or_else(|| Error::invalid(path, format!("{name}: {:?} is not written", t.kind())))?;
                        let t = t.to_device(tch::Device::Cpu).contiguous();
                        w.str(name);
                        w.global("torch._utils", "_rebuild_tensor_v2");
                        w.mark();
                        w.mark();
                        w.str("storage");
                        w.global("torch", st);
                        w.str(&storages.len().to_string());
                        w.str("cpu");
                        w.int(t.numel() as i64);
                        w.tuple();
                        w.binpersid();
                        w.int(0);
                        let size = t.size();
                        let mut stride = vec![1i64; size.len()];
                        for i in (0..size.len().saturating_sub(1)).rev() {
                            stride[i] = stride[i + 1] * size[i + 1].max(1);
                        }
                        for dims in [&size, &stride] {
                            w.mark();
                            for &d in dims.iter() {
                                w.int(d);
                            }
                            w.tuple();
                        }
                        w.bool(false);
                        w.ordered_dict();
                        w.tuple();
                        w.reduce();
                        storages.push(t);
                    }
                    w.setitems();
                }
            }
        }
    }
    w.setitems();
    w.stop();
    let archive = path.file_stem().map_or("archive".into(), |s| s.to_string_lossy().into_owned());
    let file = std::fs::File::create(path).at(path)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::with_capacity(1 << 22, file));
    let zerr = |e: zip::result::ZipError| Error::invalid(path, format!("writing the zip archive: {e}"));
    let opts = |len: usize| zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(len as u64 >= (1 << 32) - 1);
    // the records as torch.save lays them out: data aligned to 64 bytes
    let record = |zip: &mut zip::ZipWriter<_>, name: String, bytes: &[u8]| -> Result<()> {
        zip.start_file_aligned(name, opts(bytes.len()), 64).map_err(zerr)?;
        zip.write_all(bytes).at(path)
    };
    record(&mut zip, format!("{archive}/data.pkl"), &w.out)?;
    record(&mut zip, format!("{archive}/byteorder"), b"little")?;
    for (i, t) in storages.iter().enumerate() {
        let len = t.numel() * t.kind().elt_size_in_bytes();
        // SAFETY: a contiguous host tensor's `len` bytes start at its data
        // pointer, and `t` lives for as long as the slice.
        let bytes: &[u8] = if len == 0 { &[] } else { unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) } };
        record(&mut zip, format!("{archive}/data/{i}"), bytes)?;
    }
    record(&mut zip, format!("{archive}/version"), b"3\n")?;
    let inner = zip.finish().map_err(zerr)?;
    let file = inner.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().at(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `write` writes, `TorchFile` reads back: the tensors bit for
    /// bit, in their dtypes, and the plain values.
    #[test]
    fn written_files_read_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("mp_rank_00_model_states.pt");
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).view([3, 4]) / 3.0;
        let tensors = vec![
            ("a.weight".to_string(), a.shallow_clone()),
            ("b.half".to_string(), a.get(1).to_kind(Kind::Half)),
            ("c.t".to_string(), a.transpose(0, 1)),
            ("d.scalar".to_string(), Tensor::from(2.5f32)),
        ];
        let args = serde_json::json!({"num_layers": 2, "lr": 1e-4, "train_data": ["x"], "big": 1i64 << 40, "none": null});
        write(&p, &[("module", Value::Tensors(&tensors)), ("iteration", Value::Json(7.into())), ("args", Value::Json(args.clone())), ("s", Value::EmptySet)])
            .unwrap();
        let mut f = TorchFile::open(&p).unwrap();
        let root = f.pickle.root;
        assert_eq!(f.pickle.int(f.pickle.get(root, "iteration").unwrap()), Some(7));
        assert_eq!(f.pickle.to_json(f.pickle.get(root, "args").unwrap()).unwrap(), args);
        let module = f.pickle.get(root, "module").unwrap();
        let refs: Vec<(String, TensorRef)> = f
            .pickle
            .dict(module)
            .unwrap()
            .to_vec()
            .into_iter()
            .map(|(k, v)| {
                let name = f.pickle.str(k).unwrap().to_string();
                let r = f.tensor_ref(v, &name).unwrap();
                (name, r)
            })
            .collect();
        let back = f.read_tensors(&refs, None).unwrap();
        assert_eq!(back.len(), tensors.len());
        for ((n, t), (m, u)) in tensors.iter().zip(&back) {
            assert_eq!(n, m);
            assert_eq!(t.kind(), u.kind(), "{n}");
            assert_eq!(t.size(), u.size(), "{n}");
            assert!(t.equal(u), "{n}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_torch_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.pt");
        std::fs::write(&p, b"hello").unwrap();
        let e = TorchFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("x.pt") && e.contains("not a PyTorch file"), "{e}");
        std::fs::write(&p, [0x80, 2, 0x8a, 10]).unwrap();
        let e = TorchFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("legacy format"), "{e}");
    }
}
