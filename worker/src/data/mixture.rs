//! Weighted corpus mixtures: `train_data` as Megatron's `--data-path 0.3
//! wiki 0.7 news`, each corpus with a token store of its own, training drawing
//! from them by weight.
//!
//! **Which corpus a sample comes from** is Megatron's blending rule
//! (`build_blending_indices`): global sample `i` goes to the corpus furthest
//! behind its target share, `argmax_k (w_k · max(i, 1) − n_k)` with `n_k` the
//! samples corpus `k` has had before `i` (ties to the first), and is that
//! corpus's `n_k`-th sample. It depends on the global index alone — not on the
//! data-parallel size, the accumulation or the micro-batch — so every layout
//! and every resume reads the same sequence, and after `i` samples each corpus
//! is within one sample of `w_k · i`. The rule needs no seed; what each
//! corpus's sample holds comes from `seed` (derived per corpus, so two corpora
//! do not draw the same positions) and the corpus's own sample index, as for
//! one corpus.
//!
//! **Epochs.** Samples draw documents with probability proportional to their
//! length, with replacement (the original's `BlockDataset`), so a corpus never
//! "runs out": its epoch is the tokens drawn from it (`samples × seq_length`)
//! over the tokens of its training documents, and training says when a corpus
//! passes a whole number of epochs.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::blocklm::{BlockConfig, BlockSampler, Mode, Sample};
use super::corpus::{CorpusSpec, Reader};
use crate::error::{Error, Result};

/// One corpus of a mixture.
#[derive(Clone, Debug, PartialEq)]
pub struct Component {
    /// How logs, metrics and store names call it (the file or folder name
    /// without extension; made unique).
    pub name: String,
    pub spec: CorpusSpec,
    /// The normalised weight (the weights sum to 1).
    pub weight: f64,
    /// The weight as given.
    pub given: f64,
}

/// configs.json's `train_data`: one corpus (the original's list: its files
/// concatenated, so each weighs by its size) or a weighted mixture.
#[derive(Clone, Debug, PartialEq)]
pub enum TrainData {
    Corpus(CorpusSpec),
    Mixture(Vec<Component>),
}

impl TrainData {
    /// Every file or folder named.
    pub fn roots(&self) -> Vec<&Path> {
        match self {
            TrainData::Corpus(c) => c.roots.iter().map(PathBuf::as_path).collect(),
            TrainData::Mixture(m) => m.iter().flat_map(|c| c.spec.roots.iter().map(PathBuf::as_path)).collect(),
        }
    }

    /// As the effective configuration shows it.
    pub fn describe(&self) -> String {
        match self {
            TrainData::Corpus(c) => format!("{:?}", c.entries()),
            TrainData::Mixture(m) => {
                let parts: Vec<String> =
                    m.iter().map(|c| format!("{} {} (\"{}\", {:.1}%)", c.given, c.spec.entries().join(" "), c.name, c.weight * 100.0)).collect();
                format!("mixture of {}: {}", m.len(), parts.join(", "))
            }
        }
    }
}

/// A token of `train_data`: a weight or a corpus entry.
#[derive(Debug)]
enum Token<'a> {
    Weight(&'a str, f64),
    Corpus(&'a str),
}

/// `s` as a weight: a decimal number (digits, `.`, an exponent, a sign),
/// unless a file or folder has that name (the original's plain lists may
/// name folders `2023`, `2024`; `./2024` is a path in any case).
fn number(s: &str) -> Option<f64> {
    number_unless(s, |t| Path::new(t).exists())
}

/// `number`, with `is_path` saying whether a file or folder has that name.
fn number_unless(s: &str, is_path: impl Fn(&str) -> bool) -> Option<f64> {
    let t = s.trim();
    let numeric = t.chars().any(|c| c.is_ascii_digit()) && t.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if !numeric || is_path(t) {
        return None;
    }
    t.parse::<f64>().ok()
}

/// Reads `train_data`'s entries (`key` names the key in errors). Weights and
/// corpora alternate as in Megatron's `--data-path 0.3 wiki 0.7 news`: list
/// entries `[0.3, "wiki", 0.7, "news"]`, or strings that start with a weight
/// and are split at whitespace (`"0.3 wiki 0.7 news"`, `["0.3 wiki", "0.7
/// news"]`). Without any weight, the entries are one corpus as the original
/// reads them (`corpus`, which also resolves `"wudao"` and `wudao:`).
pub fn parse_train_data(key: &str, entries: &[String], corpus: impl Fn(&str, &[String]) -> Result<CorpusSpec>) -> Result<TrainData> {
    let mut tokens = Vec::new();
    for e in entries {
        let first = e.split_whitespace().next().unwrap_or("");
        if let Some(w) = number(e) {
            tokens.push(Token::Weight(e.trim(), w));
        } else if number(first).is_some() && e.trim() != first {
            for t in e.split_whitespace() {
                tokens.push(number(t).map_or(Token::Corpus(t), |w| Token::Weight(t, w)));
            }
        } else {
            tokens.push(Token::Corpus(e));
        }
    }
    if !tokens.iter().any(|t| matches!(t, Token::Weight(..))) {
        return Ok(TrainData::Corpus(corpus(key, entries)?));
    }
    let shape = "weights and corpora alternate, as Megatron's --data-path: [0.3, \"wiki\", 0.7, \"news\"] or \"0.3 wiki 0.7 news\"";
    let mut parts: Vec<(f64, &str, &str)> = Vec::new();
    let mut it = tokens.iter().peekable();
    let mut n = 0;
    while let Some(t) = it.next() {
        n += 1;
        let (text, w) = match t {
            Token::Weight(text, w) => (*text, *w),
            Token::Corpus(c) => {
                return Err(Error::Config(format!(
                    "{key}: \"{c}\" (entry {n}) stands where a weight should: give every corpus a weight (a positive number) before it; {shape}"
                )));
            }
        };
        if !w.is_finite() || w <= 0.0 {
            let why = if w == 0.0 { "a zero weight: leave the corpus out instead" } else { "weights must be positive numbers" };
            let of = match it.peek() {
                Some(Token::Corpus(c)) => format!(" of \"{c}\""),
                _ => String::new(),
            };
            return Err(Error::Config(format!("{key}: weight {text}{of} (entry {n}): {why}")));
        }
        match it.next() {
            Some(Token::Corpus(c)) => {
                n += 1;
                parts.push((w, text, c))
            }
            Some(Token::Weight(next, _)) => {
                return Err(Error::Config(format!("{key}: weight {text} (entry {n}) is followed by another number ({next}), not a corpus; {shape}")));
            }
            None => return Err(Error::Config(format!("{key}: weight {text} (entry {n}) names no corpus after it; {shape}"))),
        }
    }
    if parts.len() == 1 {
        // one corpus: its weight says nothing
        return Ok(TrainData::Corpus(corpus(key, &[parts[0].2.to_string()])?));
    }
    let total: f64 = parts.iter().map(|p| p.0).sum();
    let mut out: Vec<Component> = Vec::with_capacity(parts.len());
    for (w, _, entry) in &parts {
        let spec = corpus(key, &[entry.to_string()])?;
        if let Some(same) = out.iter().find(|c| c.spec == spec) {
            return Err(Error::Config(format!(
                "{key}: \"{entry}\" is listed twice (as \"{}\" too): give it once, with the sum of its weights",
                same.spec.entries().join(" ")
            )));
        }
        let root = &spec.roots[0];
        let stem =
            if *entry == "wudao" { "wudao".to_string() } else { root.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "corpus".into()) };
        let stem = if spec.reader == Reader::WuDao { format!("wudao-{stem}") } else { stem };
        let mut name = stem.clone();
        let mut k = 2;
        while out.iter().any(|c| c.name == name) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        out.push(Component { name, spec, weight: w / total, given: *w });
    }
    Ok(TrainData::Mixture(out))
}

/// The store of mixture component `k` named `name`, beside the run's store:
/// `<store>-mix<k>-<name>`.
pub fn component_store(store: &Path, k: usize, name: &str) -> PathBuf {
    let base = store.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "store".into());
    let safe: String = name.chars().map(|c| if c.is_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' }).collect();
    store.with_file_name(format!("{base}-mix{}-{safe}", k + 1))
}

/// The per-corpus seed of component `k` (a mixture's corpora draw their
/// documents and spans independently).
pub fn component_seed(seed: u64, k: usize) -> u64 {
    seed ^ 0x4D49_5845_0000_0000u64.wrapping_add((k as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The weighted mean of `values` `(weight, value)` (a mixture's figure from
/// its corpora's).
pub fn weighted_mean(values: impl IntoIterator<Item = (f64, f64)> + Clone) -> f64 {
    let total: f64 = values.clone().into_iter().map(|(w, _)| w).sum();
    values.into_iter().map(|(w, v)| w * v).sum::<f64>() / total
}

/// Megatron's blending rule over `weights` (normalised), with the counts
/// remembered every `STRIDE` samples so that a seek costs at most `STRIDE`
/// steps after the first pass.
pub struct Blend {
    weights: Vec<f64>,
    /// counts before sample `j · STRIDE`, for j = 0, 1, ...
    marks: Mutex<Vec<Vec<u64>>>,
}

const STRIDE: u64 = 1 << 14;

impl Blend {
    pub fn new(weights: &[f64]) -> Blend {
        let total: f64 = weights.iter().sum();
        Blend { weights: weights.iter().map(|w| w / total).collect(), marks: Mutex::new(vec![vec![0; weights.len()]]) }
    }

    /// The corpus of the sample whose predecessors left `counts`, sample `i`.
    fn pick(&self, i: u64, counts: &[u64]) -> usize {
        let x = (i as f64).max(1.0);
        let mut best = 0;
        let mut err = self.weights[0] * x - counts[0] as f64;
        for (k, (w, n)) in self.weights.iter().zip(counts).enumerate().skip(1) {
            let e = w * x - *n as f64;
            if e > err {
                best = k;
                err = e;
            }
        }
        best
    }

    /// How many of samples `0..i` each corpus has.
    pub fn counts_before(&self, i: u64) -> Vec<u64> {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let j = (i / STRIDE) as usize;
        while marks.len() <= j {
            let start = (marks.len() as u64 - 1) * STRIDE;
            let mut c = marks.last().unwrap().clone();
            for s in start..start + STRIDE {
                let k = self.pick(s, &c);
                c[k] += 1;
            }
            marks.push(c);
        }
        let mut c = marks[j].clone();
        drop(marks);
        for s in j as u64 * STRIDE..i {
            let k = self.pick(s, &c);
            c[k] += 1;
        }
        c
    }

    /// Corpus and corpus sample index of every global sample in `range`.
    pub fn locate(&self, range: Range<u64>) -> Vec<(usize, u64)> {
        let mut c = self.counts_before(range.start);
        range
            .map(|s| {
                let k = self.pick(s, &c);
                c[k] += 1;
                (k, c[k] - 1)
            })
            .collect()
    }
}

/// Where training samples come from: one corpus's sampler, or a mixture's
/// samplers blended by weight.
pub struct Source {
    /// (name, sampler): one for a single corpus.
    pub parts: Vec<(String, BlockSampler)>,
    /// `None`: one corpus, read exactly as its sampler reads it.
    blend: Option<Blend>,
    /// The run's sample construction: draws the mode of a batch (the run's
    /// seed, whatever the corpus).
    modes: BlockConfig,
}

impl Source {
    pub fn single(name: &str, sampler: BlockSampler) -> Source {
        Source { modes: sampler.config().clone(), parts: vec![(name.to_string(), sampler)], blend: None }
    }

    /// `parts` with their weights; `modes` (the run's sample construction)
    /// draws batch modes from the run's seed.
    pub fn mixture(parts: Vec<(String, BlockSampler, f64)>, modes: BlockConfig) -> Source {
        let weights: Vec<f64> = parts.iter().map(|p| p.2).collect();
        Source { parts: parts.into_iter().map(|(n, s, _)| (n, s)).collect(), blend: Some(Blend::new(&weights)), modes }
    }

    pub fn is_mixture(&self) -> bool {
        self.blend.is_some()
    }

    /// The training samples `indices`, each in the mode of its mode group
    /// (`BlockSampler::mode_of`, from the run's seed and the global index).
    pub fn samples(&self, indices: Range<u64>, group: u64) -> Vec<Sample> {
        match &self.blend {
            None => self.parts[0].1.samples(indices, group),
            Some(b) => {
                let at = b.locate(indices.clone());
                indices.zip(at).map(|(i, (k, j))| self.parts[k].1.sample(j, self.modes.mode_of(i, group))).collect()
            }
        }
    }

    /// The samples `indices` of batch `batch`, all in that batch's mode.
    pub fn batch(&self, batch: u64, indices: Range<u64>) -> Vec<Sample> {
        match &self.blend {
            None => self.parts[0].1.batch(batch, indices),
            Some(b) => {
                let mode: Mode = self.modes.mode_for_batch(batch);
                b.locate(indices).into_iter().map(|(k, j)| self.parts[k].1.sample(j, mode)).collect()
            }
        }
    }

    /// Samples each corpus has had among global samples `0..i`.
    pub fn consumed(&self, i: u64) -> Vec<u64> {
        match &self.blend {
            None => vec![i],
            Some(b) => b.counts_before(i),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(key: &str, e: &[String]) -> Result<CorpusSpec> {
        if e.iter().any(|x| x.is_empty()) {
            return Err(Error::Config(format!("{key}: empty")));
        }
        Ok(CorpusSpec { roots: e.iter().map(PathBuf::from).collect(), reader: Reader::Default })
    }

    fn parse(e: &[&str]) -> Result<TrainData> {
        parse_train_data("train_data", &e.iter().map(|s| s.to_string()).collect::<Vec<_>>(), spec)
    }

    #[test]
    fn megatron_syntax_in_every_spelling() {
        let want = parse(&["0.3", "a/wiki.jsonl", "0.7", "b/news"]).unwrap();
        let TrainData::Mixture(m) = &want else { panic!("{want:?}") };
        assert_eq!(m.iter().map(|c| (c.name.as_str(), c.given)).collect::<Vec<_>>(), vec![("wiki", 0.3), ("news", 0.7)]);
        assert!((m[0].weight - 0.3).abs() < 1e-12 && (m[1].weight - 0.7).abs() < 1e-12);
        assert_eq!(parse(&["0.3 a/wiki.jsonl 0.7 b/news"]).unwrap(), want);
        assert_eq!(parse(&["0.3 a/wiki.jsonl", "0.7 b/news"]).unwrap(), want);
        // weights need not sum to 1
        let TrainData::Mixture(m) = parse(&["3", "x", "1", "y"]).unwrap() else { panic!() };
        assert_eq!((m[0].weight, m[1].weight), (0.75, 0.25));
        // no weights: the original's list, one corpus; one weighted corpus is one corpus
        assert_eq!(parse(&["a", "b"]).unwrap(), TrainData::Corpus(spec("", &["a".into(), "b".into()]).unwrap()));
        assert_eq!(parse(&["2", "a"]).unwrap(), TrainData::Corpus(spec("", &["a".into()]).unwrap()));
        // a number that names a file or folder is a path (the original's plain
        // list of folders 2023, 2024); "nan" and "inf" are not numbers here
        assert_eq!((number_unless("2023", |_| true), number_unless("2023", |_| false)), (None, Some(2023.0)));
        assert_eq!((number_unless(" 0.3 ", |_| false), number_unless("1e-2", |_| false)), (Some(0.3), Some(0.01)));
        assert_eq!((number_unless("nan", |_| false), number_unless("inf", |_| false), number_unless("./2024", |_| false)), (None, None, None));
        // the same name from two folders stays two names
        let TrainData::Mixture(m) = parse(&["1", "x/c.txt", "1", "y/c.txt"]).unwrap() else { panic!() };
        assert_eq!((m[0].name.as_str(), m[1].name.as_str()), ("c", "c-2"));
    }

    #[test]
    fn bad_weights_are_one_line_errors_naming_the_entry() {
        for (e, want) in [
            (&["0", "wiki", "1", "news"][..], "weight 0 of \"wiki\" (entry 1): a zero weight"),
            (&["-0.3", "wiki", "1", "news"][..], "weight -0.3 of \"wiki\" (entry 1): weights must be positive"),
            (&["0.3", "wiki", "x", "news"][..], "\"x\" (entry 3) stands where a weight should"),
            (&["0.3", "wiki", "0.7"][..], "weight 0.7 (entry 3) names no corpus"),
            (&["0.3", "wiki", "news"][..], "\"news\" (entry 3) stands where a weight should"),
            (&["wiki", "0.3", "news"][..], "\"wiki\" (entry 1) stands where a weight should"),
            (&["0.3", "0.7", "news"][..], "weight 0.3 (entry 1) is followed by another number (0.7)"),
            (&["0.5", "wiki", "0.5", "wiki"][..], "\"wiki\" is listed twice"),
            (&["NaN", "wiki", "1", "news"][..], "\"NaN\" (entry 1) stands where a weight should"),
            (&["1e999", "wiki", "1", "news"][..], "weight 1e999 of \"wiki\" (entry 1): weights must be positive"),
        ] {
            let msg = parse(e).unwrap_err().to_string();
            assert!(msg.contains(want) && msg.contains("train_data: ") && !msg.contains('\n'), "{e:?}: {msg}");
        }
    }

    #[test]
    fn shares_follow_the_weights_within_one_sample_at_every_prefix() {
        let w = [0.2, 0.5, 0.3];
        let b = Blend::new(&w);
        let at = b.locate(0..10_000);
        let mut n = [0u64; 3];
        for (i, (k, j)) in at.iter().enumerate() {
            // each corpus's samples are numbered 0, 1, 2, ... in order
            assert_eq!(*j, n[*k]);
            n[*k] += 1;
            for (c, wc) in n.iter().zip(w) {
                assert!((*c as f64 - wc * (i + 1) as f64).abs() <= 1.0 + 1e-9, "{i}: {n:?}");
            }
        }
        for (c, wc) in n.iter().zip(w) {
            assert!((*c as f64 / 10_000.0 - wc).abs() < 0.01, "{n:?}");
        }
    }

    #[test]
    fn a_seek_anywhere_gives_the_sequence_from_the_start() {
        let b = Blend::new(&[1.0, 3.0]);
        let all = b.locate(0..3 * STRIDE + 77);
        // a fresh blend sought to the middle (as a resumed run), and one sought backwards
        for start in [5, STRIDE - 1, STRIDE, 2 * STRIDE + 13] {
            let fresh = Blend::new(&[1.0, 3.0]);
            assert_eq!(fresh.locate(start..start + 100), all[start as usize..start as usize + 100]);
        }
        assert_eq!(b.locate(10..20), all[10..20]);
        assert_eq!(b.counts_before(3 * STRIDE + 77), vec![all.iter().filter(|a| a.0 == 0).count() as u64, all.iter().filter(|a| a.0 == 1).count() as u64]);
    }
}
