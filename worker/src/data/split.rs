//! The original's train/valid/test split of a corpus's documents, exactly:
//! `get_split` (configure_data.py) turns configs.json's `split` into three
//! shares, `split_ds` (data_utils/datasets.py) shuffles the document indices
//! with numpy's legacy `RandomState(1234)` — a fixed seed, not `seed` — and
//! cuts consecutive runs with its rounding. `save_splits`/`load_splits`
//! write and read that index order as numpy's `.npy` (`np.save`/`np.load`).

use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// The seed of the original's split shuffle (`np.random.RandomState(1234)`
/// in `split_ds`), whatever configs.json's `seed` is.
pub const SPLIT_SEED: u32 = 1234;

/// The original's `get_split`: the weights of `split` ("949,50,1"; `/` also
/// separates; one number is the training share), `1 - sum` appended as a
/// further share when they sum to less than 1, padded to three (a fourth,
/// appended, share is dropped as the original drops it), the valid share
/// zeroed when `valid_data` is given and the test share when `test_data`
/// is, normalised. More than three weights, negative or non-finite ones, and
/// shares that leave nothing are refused naming `split`.
pub fn get_split(split: &str, valid_data: bool, test_data: bool) -> Result<[f64; 3]> {
    let parts: Vec<&str> = if split.contains(',') {
        split.split(',').collect()
    } else if split.contains('/') {
        split.split('/').collect()
    } else {
        vec![split]
    };
    let bad = |why: &str| Error::Config(format!("split \"{split}\": {why}"));
    let mut w = Vec::with_capacity(4);
    for p in &parts {
        let v: f64 = p.trim().parse().map_err(|_| bad("expected numbers like \"949,50,1\" (train, valid, test weights)"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(bad("weights must be non-negative numbers"));
        }
        w.push(v);
    }
    if w.len() > 3 {
        return Err(bad("at most three weights (train, valid, test)"));
    }
    // Python's sum(): left to right from 0
    let total = w.iter().fold(0.0, |a, b| a + b);
    if total < 1.0 {
        w.push(1.0 - total);
    }
    w.resize(w.len().max(3), 0.0);
    w.truncate(3);
    if valid_data {
        w[1] = 0.0;
    }
    if test_data {
        w[2] = 0.0;
    }
    let sum = w.iter().fold(0.0, |a, b| a + b);
    if sum <= 0.0 {
        let taken = match (valid_data, test_data) {
            (true, true) => " once valid_data and test_data take the valid and test shares",
            (true, false) => " once valid_data takes the valid share",
            (false, true) => " once test_data takes the test share",
            (false, false) => "",
        };
        return Err(bad(&format!("no share is left for any split{taken}")));
    }
    Ok([w[0] / sum, w[1] / sum, w[2] / sum])
}

/// The original's `should_split`: whether more than one share is positive
/// (else every document trains, in corpus order, unshuffled).
pub fn should_split(shares: &[f64; 3]) -> bool {
    let max = shares.iter().cloned().fold(f64::MIN, f64::max);
    max / shares.iter().fold(0.0, |a, b| a + b) != 1.0
}

/// numpy's legacy `np.random.RandomState(seed).shuffle(np.arange(n))`:
/// MT19937 seeded by `init_genrand(seed)`, Fisher–Yates from the last index
/// down, each `j` drawn by numpy's `random_interval(i)` (32-bit draws masked
/// to the smallest all-ones mask covering `i`, redrawn while above `i`).
pub fn numpy_permutation(n: usize, seed: u32) -> Result<Vec<u32>> {
    // numpy draws 64-bit values past 2^32 - 1; document ids here are u32
    let count = u32::try_from(n).map_err(|_| Error::Config(format!("{n} documents: the split handles at most {} (u32 document ids)", u32::MAX)))?;
    let mut mt = rand_mt::Mt::new(seed);
    let mut ids: Vec<u32> = (0..count).collect();
    for i in (1..count).rev() {
        let mut mask = i;
        for shift in [1, 2, 4, 8, 16] {
            mask |= mask >> shift;
        }
        let j = loop {
            let v = mt.next_u32() & mask;
            if v <= i {
                break v;
            }
        };
        ids.swap(i as usize, j as usize);
    }
    Ok(ids)
}

/// The original's `split_ds` cut of `order` by `shares`: the shares
/// normalised again, each positive share takes `int(int(p) + r)` indices
/// where `p = n * share` and `r` carries the fractional parts forward, at
/// least one (so a share that rounds to none takes the index that starts the
/// next share: the two splits share that document, as in the original),
/// runs clipped at the end of `order`; a zero share is empty.
pub fn cut(order: &[u32], shares: &[f64; 3]) -> [Vec<u32>; 3] {
    let n = order.len();
    let sum = shares.iter().fold(0.0, |a, b| a + b);
    let mut out: [Vec<u32>; 3] = Default::default();
    let (mut start, mut residual) = (0usize, 0.0f64);
    for (i, share) in shares.iter().enumerate() {
        let f = share / sum;
        if f != 0.0 {
            let proportion = n as f64 * f;
            residual += proportion % 1.0;
            let size = (proportion.trunc() + residual).trunc() as usize;
            let (a, b) = (start.min(n), (start + size.max(1)).min(n));
            out[i] = order[a..b].to_vec();
            start += size;
            residual %= 1.0;
        }
    }
    out
}

/// The documents of each split, and the index order they were cut from.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentSplit {
    /// Train, valid and test document ids.
    pub parts: [Vec<u32>; 3],
    /// The shuffled (or loaded) index order; `None` when `shares` do not
    /// split (every document trains, in corpus order).
    pub order: Option<Vec<u32>>,
}

/// Splits documents `0..n` as the original: no split when one share is
/// everything, else the order `load_splits` names (read only then) or the
/// fixed-seed shuffle, cut by `shares`.
pub fn split_documents(n: usize, shares: &[f64; 3], load_splits: Option<&Path>) -> Result<DocumentSplit> {
    if !should_split(shares) {
        let all = (0..u32::try_from(n).map_err(|_| Error::Config(format!("{n} documents: at most {} are supported", u32::MAX)))?).collect();
        return Ok(DocumentSplit { parts: [all, Vec::new(), Vec::new()], order: None });
    }
    let order = match load_splits {
        Some(p) => load_npy(p, n, "load_splits")?,
        None => numpy_permutation(n, SPLIT_SEED)?,
    };
    Ok(DocumentSplit { parts: cut(&order, shares), order: Some(order) })
}

/// The file `np.save(path, ...)` writes: `path`, with `.npy` appended
/// unless it ends so.
pub fn npy_path(path: &Path) -> PathBuf {
    if path.extension().is_some_and(|e| e == "npy") {
        path.to_path_buf()
    } else {
        let mut s = path.as_os_str().to_owned();
        s.push(".npy");
        PathBuf::from(s)
    }
}

/// Writes `ids` as numpy writes `np.arange(n)` shuffled (`np.save`): a
/// version 1.0 `.npy` of little-endian int64, its header padded to 64
/// bytes. Returns the file written (`npy_path(path)`), made through a
/// temporary beside it.
pub fn save_npy(path: &Path, ids: &[u32]) -> Result<PathBuf> {
    let out = npy_path(path);
    let mut header = format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({},), }}", ids.len());
    // magic (6) + version (2) + length (2) + header + '\n' to a multiple of 64
    let used = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - used % 64) % 64));
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + 8 * ids.len());
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for &i in ids {
        bytes.extend_from_slice(&(i as i64).to_le_bytes());
    }
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let name = out.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let tmp = crate::runtime::host::temp_path(out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")), &format!(".{name}.tmp-"));
    std::fs::write(&tmp, &bytes).at(&tmp)?;
    std::fs::rename(&tmp, &out).at(&out)?;
    Ok(out)
}

/// Reads a one-dimensional integer `.npy` (as `np.load`: the path as
/// given), checks it holds `n` indices below `n` (the original asserts the
/// length), and returns them; `key` names the configs.json key in errors.
pub fn load_npy(path: &Path, n: usize, key: &str) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).at(path)?;
    let bad = |why: String| Error::invalid(path, format!("{key}: {why}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a numpy .npy file (np.save writes one)".into()));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => return Err(bad(format!(".npy format version {v} is not read here (1, 2 or 3)"))),
    };
    let header = bytes.get(start..start + hlen).and_then(|h| std::str::from_utf8(h).ok()).ok_or_else(|| bad("truncated .npy header".into()))?;
    let field = |k: &str| -> Option<&str> {
        let at = header.find(&format!("'{k}':"))? + k.len() + 3;
        let rest = header[at..].trim_start();
        let end = if rest.starts_with('(') { rest.find(')')? + 1 } else { rest.find([',', '}'])? };
        Some(rest[..end].trim())
    };
    let descr = field("descr").map(|d| d.trim_matches(['\'', '"'])).unwrap_or("");
    let width = match descr {
        "<i8" | "<u8" => 8,
        "<i4" | "<u4" => 4,
        "|i1" | "|u1" => 1,
        "<i2" | "<u2" => 2,
        d => return Err(bad(format!("dtype {d:?}: expected little-endian integers (np.arange's int64)"))),
    };
    // (fortran_order does not matter to one dimension)
    let shape = field("shape").unwrap_or("");
    let len: Option<usize> =
        shape.strip_prefix('(').and_then(|s| s.strip_suffix(')')).and_then(|s| s.trim().strip_suffix(',')).and_then(|s| s.trim().parse().ok());
    let Some(len) = len else {
        return Err(bad(format!("shape {shape}: expected one dimension")));
    };
    if len != n {
        return Err(bad(format!("{len} indices, the corpus has {n} documents (split indices are saved for one corpus)")));
    }
    let data = &bytes[start + hlen..];
    if data.len() != len * width {
        return Err(bad(format!("{} bytes of data for {len} indices of {width} bytes (truncated?)", data.len())));
    }
    let signed = descr.as_bytes()[1] == b'i';
    let mut out = Vec::with_capacity(len);
    for c in data.chunks_exact(width) {
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(c);
        let negative = signed && c[width - 1] & 0x80 != 0;
        let v = u64::from_le_bytes(b);
        if negative || v >= n as u64 {
            return Err(bad(format!("index {} is not a document (the corpus has {n})", if negative { "negative".to_string() } else { v.to_string() })));
        }
        out.push(v as u32);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_split_as_the_original() {
        // sums of at least 1: normalised
        let s = get_split("949,50,1", false, false).unwrap();
        assert_eq!(s, [949.0 / 1000.0, 50.0 / 1000.0, 1.0 / 1000.0]);
        // under 1: the rest is a further share
        let s = get_split("0.9", false, false).unwrap();
        assert_eq!(s[0], 0.9 / (0.9 + (1.0 - 0.9)));
        assert!(s[1] > 0.099 && s[1] < 0.101 && s[2] == 0.0, "{s:?}");
        assert_eq!(get_split("8/1/1", false, false).unwrap(), [0.8, 0.1, 0.1]);
        // valid_data / test_data take their shares
        assert_eq!(get_split("949,50,1", true, false).unwrap(), [949.0 / 950.0, 0.0, 1.0 / 950.0]);
        assert_eq!(get_split("949,50,1", true, true).unwrap(), [1.0, 0.0, 0.0]);
        for (bad, want) in
            [("a,b", "expected numbers"), ("1,-1", "non-negative"), ("1,1,1,1", "at most three"), ("nan", "non-negative"), ("8/1,1", "expected numbers")]
        {
            let e = get_split(bad, false, false).unwrap_err().to_string();
            assert!(e.contains(&format!("split \"{bad}\"")) && e.contains(want), "{bad}: {e}");
        }
        let e = get_split("0,1,0", true, false).unwrap_err().to_string();
        assert!(e.contains("valid_data takes the valid share"), "{e}");
    }

    #[test]
    fn cut_carries_residuals_and_gives_every_share_an_index() {
        let order: Vec<u32> = (0..200).collect();
        let s = get_split("0.9", false, false).unwrap();
        let p = cut(&order, &s);
        // 1 - 0.9 is 0.0999...98: 19.999... rounds down, as in the original
        assert_eq!((p[0].len(), p[1].len(), p[2].len()), (180, 19, 0));
        // 20 documents, 949:50:1: the test share rounds to one document
        let order: Vec<u32> = (0..20).collect();
        let p = cut(&order, &get_split("949,50,1", false, false).unwrap());
        assert_eq!(p.iter().map(Vec::len).collect::<Vec<_>>(), vec![18, 1, 1]);
        // a share rounding to none takes the first index of the next one
        let order: Vec<u32> = (0..10).collect();
        let p = cut(&order, &get_split("98,1,1", false, false).unwrap());
        assert_eq!(p, [(0..9).collect::<Vec<u32>>(), vec![9], vec![9]]);
    }

    #[test]
    fn no_split_keeps_corpus_order() {
        let d = split_documents(5, &get_split("1", false, false).unwrap(), None).unwrap();
        assert_eq!(d, DocumentSplit { parts: [vec![0, 1, 2, 3, 4], vec![], vec![]], order: None });
        let d = split_documents(5, &get_split("1,1", false, false).unwrap(), None).unwrap();
        assert_eq!(d.order.as_deref(), Some(numpy_permutation(5, SPLIT_SEED).unwrap().as_slice()));
    }

    #[test]
    fn npy_round_trip_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let ids = numpy_permutation(300, SPLIT_SEED).unwrap();
        let written = save_npy(&d.path().join("sub/splits"), &ids).unwrap();
        assert_eq!(written, d.path().join("sub/splits.npy"));
        let bytes = std::fs::read(&written).unwrap();
        assert_eq!((10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize) % 64, 0);
        assert_eq!(load_npy(&written, 300, "load_splits").unwrap(), ids);
        let e = load_npy(&written, 299, "load_splits").unwrap_err().to_string();
        assert!(e.contains("load_splits: 300 indices, the corpus has 299 documents"), "{e}");
        std::fs::write(d.path().join("x.npy"), b"not numpy").unwrap();
        let e = load_npy(&d.path().join("x.npy"), 3, "load_splits").unwrap_err().to_string();
        assert!(e.contains("x.npy: load_splits: not a numpy .npy file"), "{e}");
    }
}
