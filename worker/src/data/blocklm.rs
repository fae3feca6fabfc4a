//! GLM's autoregressive blank-infilling samples (THUDM/GLM `blocklm_utils.py`,
//! `ConstructBlockStrategy`, fed by the `BlockDataset` document packer).
//!
//! A *raw* sample is `[CLS] doc [eod] [CLS] doc [eod] ...`: documents drawn
//! with probability proportional to their length, a long one cut at a random
//! window, short ones packed until the sample is full. Then one of three modes,
//! drawn once per batch (as the original does), turns it into Part A + Part B:
//!
//! - **span** (`bert_prob`): span lengths from Poisson(`avg_block_length`)
//!   restricted to 1..`max_block_length`-1 until `bert_ratio` (15%) of the
//!   document tokens are covered; spans are placed inside documents without
//!   overlapping or touching, and shuffled for Part B.
//! - **sentence** (`gap_sentence_prob`): whole sentences, shuffled, until
//!   `gap_sentence_ratio` is covered; masked with `[sMASK]` under `task_mask`.
//! - **generation** (the rest): a length uniform in
//!   [`gpt_min_ratio`·len, len-2]; for packed samples (and with probability
//!   `gpt_infill_prob` otherwise) Part A is the prefix plus `[gMASK]` (`[MASK]`
//!   without `task_mask`) and Part B generates the suffix; else one blank of
//!   that length is cut from the middle of the document.
//!
//! Part A is the text with every span replaced by one mask token; position ids
//! count Part A's tokens 0, 1, 2, ... and the block position is 0. Part B is,
//! per span, `<|startofpiece|>` + span with targets span + `<|endofpiece|>`;
//! each of its tokens takes its mask's position as first coordinate and
//! 1..=len+1 as block position. `sep` = |Part A|, the attention boundary; the
//! loss covers Part B only. The finished sample fits `seq_length` and is padded
//! to it.
//!
//! Randomness: the mode comes from `(seed, batch index)`, everything else
//! from `(seed, global sample index)`. A sample's global index already encodes
//! its data-parallel rank (ranks read disjoint indices), so ranks differ, and
//! the same global batch gives the same samples under any DP layout.
//!
//! Deliberate differences from the original: sentence ends include the CJK
//! full-width forms (the original only knew ASCII ones, so Chinese text had no
//! sentences); `[CLS]` separators of packed documents are never part of a span;
//! a sample always fits `seq_length` (the original could exceed it by two
//! tokens per span); spans that do not fit a document are dropped rather than
//! dropping the whole sample.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::store::TokenStore;
use super::tokenizer::SpecialIds;
use crate::error::{Error, Result};
use crate::rng::Rng;

const STREAM_PACK: u64 = 0xB10C_0001;
const STREAM_MASK: u64 = 0xB10C_0002;
const STREAM_MODE: u64 = 0xB10C_0003;

/// The knobs of the original's `ConstructBlockStrategy`, named as in its
/// `configs.json` where it has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockConfig {
    pub seq_length: usize,
    pub bert_prob: f64,
    pub gap_sentence_prob: f64,
    pub gpt_infill_prob: f64,
    pub gpt_min_ratio: f64,
    /// Fraction of tokens covered by spans in span mode (the original's 0.15).
    pub bert_ratio: f64,
    pub gap_sentence_ratio: f64,
    pub avg_block_length: f64,
    /// Span lengths are drawn from 1..max_block_length (the original's 40).
    pub max_block_length: usize,
    /// Shuffle spans in Part B (`!no_shuffle_block`).
    pub shuffle_blocks: bool,
    /// 2D positions (`!no_block_position`); off: every Part B block position is 1.
    pub block_position_encoding: bool,
    /// Distinct `[sMASK]`/`[gMASK]` tokens for sentence/generation modes.
    pub task_mask: bool,
    /// Pack several documents per sample (`!sample_one_document`).
    pub sample_across_doc: bool,
    pub seed: u64,
}

impl Default for BlockConfig {
    /// The defaults of the original's `configs.json`.
    fn default() -> Self {
        BlockConfig {
            seq_length: 512,
            bert_prob: 1.0,
            gap_sentence_prob: 0.0,
            gpt_infill_prob: 0.5,
            gpt_min_ratio: 0.5,
            bert_ratio: 0.15,
            gap_sentence_ratio: 0.15,
            avg_block_length: 3.0,
            max_block_length: 40,
            shuffle_blocks: true,
            block_position_encoding: true,
            task_mask: false,
            sample_across_doc: true,
            seed: 1234,
        }
    }
}

impl BlockConfig {
    pub fn validate(&self) -> Result<()> {
        let prob = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Config(format!("{name} = {v}: must lie in [0, 1]")))
            }
        };
        prob("bert_prob", self.bert_prob)?;
        prob("gap_sentence_prob", self.gap_sentence_prob)?;
        prob("gpt_infill_prob", self.gpt_infill_prob)?;
        prob("gpt_min_ratio", self.gpt_min_ratio)?;
        prob("gap_sentence_ratio", self.gap_sentence_ratio)?;
        if !(self.bert_ratio > 0.0 && self.bert_ratio < 0.5) {
            return Err(Error::Config(format!("bert_ratio = {}: must lie in (0, 0.5)", self.bert_ratio)));
        }
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9 {
            return Err(Error::Config(format!(
                "bert_prob + gap_sentence_prob = {} exceeds 1 (the generation mode takes the rest)",
                self.bert_prob + self.gap_sentence_prob
            )));
        }
        if self.seq_length < 16 {
            return Err(Error::Config(format!("seq_length = {}: must be at least 16", self.seq_length)));
        }
        if self.avg_block_length.is_nan() || self.avg_block_length <= 0.0 || self.max_block_length < 2 {
            return Err(Error::Config("avg_block_length must be > 0 and max_block_length >= 2".into()));
        }
        Ok(())
    }

    /// Poisson(avg_block_length) weights of span lengths 1..max_block_length, cumulative.
    fn span_length_cdf(&self) -> Vec<f64> {
        let lambda = self.avg_block_length;
        let mut cdf = Vec::with_capacity(self.max_block_length - 1);
        let mut acc = 0.0;
        for k in 1..self.max_block_length {
            // pmf(k) = e^-λ λ^k / k!, in log space to stay finite for large k
            let ln_fact: f64 = (1..=k).map(|i| (i as f64).ln()).sum();
            acc += (-lambda + k as f64 * lambda.ln() - ln_fact).exp();
            cdf.push(acc);
        }
        cdf
    }

    /// The mode of global batch `batch`: from `(seed, batch)` alone.
    pub fn mode_for_batch(&self, batch: u64) -> Mode {
        let r = Rng::derive(self.seed, STREAM_MODE, batch).f64();
        if r < self.bert_prob {
            Mode::Span
        } else if r < self.bert_prob + self.gap_sentence_prob {
            Mode::Sentence
        } else {
            Mode::Generation
        }
    }

    /// The mode of global sample `index` in mode groups of `group` samples
    /// (see `BlockSampler::mode_of`).
    pub fn mode_of(&self, index: u64, group: u64) -> Mode {
        self.mode_for_batch(index / group.max(1))
    }

    /// Mean of the span-length distribution actually sampled from.
    pub fn mean_span_length(&self) -> f64 {
        let cdf = self.span_length_cdf();
        let mut prev = 0.0;
        let mut mean = 0.0;
        for (i, c) in cdf.iter().enumerate() {
            mean += (i + 1) as f64 * (c - prev);
            prev = *c;
        }
        mean / cdf.last().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mode {
    Span,
    Sentence,
    Generation,
}

/// One finished sample, padded to `seq_length`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub tokens: Vec<u32>,
    pub targets: Vec<u32>,
    pub loss_mask: Vec<u8>,
    pub position_ids: Vec<u32>,
    pub block_position_ids: Vec<u32>,
    /// Length of Part A: tokens before it see each other, Part B is causal.
    pub sep: usize,
    /// Unpadded length (Part A + Part B).
    pub len: usize,
    pub mode: Mode,
    /// Generation mode in its prefix/suffix form (no `<|endofpiece|>`).
    pub suffix: bool,
}

/// Builds samples from the documents `docs` of a token store.
pub struct BlockSampler {
    store: Arc<TokenStore>,
    docs: Vec<u32>,
    doc_cdf: Vec<f64>,
    span_cdf: Vec<f64>,
    cfg: BlockConfig,
    special: SpecialIds,
    sentence_end: Vec<bool>,
}

impl BlockSampler {
    /// `docs`: the split's document ids; `sentence_end[id]`: the token ends a sentence.
    pub fn new(store: Arc<TokenStore>, docs: Vec<u32>, cfg: BlockConfig, sentence_end: Vec<bool>) -> Result<Self> {
        cfg.validate()?;
        let mut acc = 0.0;
        let doc_cdf: Vec<f64> = docs
            .iter()
            .map(|&d| {
                acc += store.doc_len(d as usize) as f64;
                acc
            })
            .collect();
        if docs.is_empty() || acc == 0.0 {
            return Err(Error::invalid(&store.dir, "no documents in this split (corpus too small for the split weights?)"));
        }
        let special = store.meta.special;
        Ok(BlockSampler { span_cdf: cfg.span_length_cdf(), store, docs, doc_cdf, cfg, special, sentence_end })
    }

    pub fn config(&self) -> &BlockConfig {
        &self.cfg
    }

    /// The mode of global batch `batch`.
    pub fn mode_for_batch(&self, batch: u64) -> Mode {
        self.cfg.mode_for_batch(batch)
    }

    /// The samples `indices` (global sample indices) of global batch `batch`,
    /// all in that batch's mode (held-out batches: one mode per evaluation
    /// batch).
    pub fn batch(&self, batch: u64, indices: Range<u64>) -> Vec<Sample> {
        let mode = self.mode_for_batch(batch);
        indices.map(|i| self.sample(i, mode)).collect()
    }

    /// The mode of global sample `index` when modes are drawn per *mode
    /// group* of `group` consecutive sample indices: that of group
    /// `index / group`. Training fixes `group` at the first run (its global
    /// batch: one mode per step, as one per micro-batch in the original
    /// without accumulation) and keeps it on resume, so a sample's mode
    /// depends on its index alone, not on how a run factors the global
    /// batch into data-parallel size × accumulation × micro-batch.
    pub fn mode_of(&self, index: u64, group: u64) -> Mode {
        self.cfg.mode_of(index, group)
    }

    /// The training samples `indices` (global sample indices), each in the
    /// mode of its mode group (`mode_of`): a range that crosses a group
    /// boundary holds two modes (samples are independent, so a micro-batch
    /// may mix them).
    pub fn samples(&self, indices: Range<u64>, group: u64) -> Vec<Sample> {
        indices.map(|i| self.sample(i, self.mode_of(i, group))).collect()
    }

    pub fn sample(&self, index: u64, mode: Mode) -> Sample {
        self.build(index, mode).0
    }

    fn is_structural(&self, id: u32) -> bool {
        self.special.is_structural(id)
    }

    /// The raw packed text of sample `index`, at most `max_len` tokens.
    fn pack(&self, index: u64, max_len: usize) -> Vec<u32> {
        let mut rng = Rng::derive(self.cfg.seed, STREAM_PACK, index);
        let (cls, eod) = (self.special.cls, self.special.eod);
        let mut out = Vec::with_capacity(max_len);
        let room = max_len - 1;
        let d = self.docs[rng.weighted(&self.doc_cdf)] as usize;
        let n = self.store.doc_len(d) + 1; // with eod
        out.push(cls);
        if n > room {
            let start = rng.below((n - room + 1) as u64) as usize;
            let end = start + room;
            self.store.extend_doc(d, start, end.min(n - 1), &mut out);
            if end == n {
                out.push(eod);
            }
            return out;
        }
        self.store.extend_doc(d, 0, n - 1, &mut out);
        out.push(eod);
        while self.cfg.sample_across_doc && out.len() < max_len {
            let d = self.docs[rng.weighted(&self.doc_cdf)] as usize;
            let left = max_len - out.len() - 1; // after [CLS]
            out.push(cls);
            let n = self.store.doc_len(d);
            self.store.extend_doc(d, 0, n.min(left), &mut out);
            if n < left {
                out.push(eod);
            }
        }
        out
    }

    /// Maximal runs of document tokens (no `[CLS]`/eod/pad) as (start, len).
    fn segments(&self, raw: &[u32]) -> Vec<(usize, usize)> {
        let mut segs = Vec::new();
        let mut start = None;
        for (i, &t) in raw.iter().enumerate() {
            match (self.is_structural(t), start) {
                (false, None) => start = Some(i),
                (true, Some(s)) => {
                    segs.push((s, i - s));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            segs.push((s, raw.len() - s));
        }
        segs
    }

    /// Span lengths covering `bert_ratio` of `n` tokens (at least one span).
    fn draw_span_lengths(&self, n: usize, rng: &mut Rng) -> Vec<usize> {
        let target = ((self.cfg.bert_ratio * n as f64) as usize).max(1);
        let mut lengths = Vec::new();
        let mut covered = 0;
        while covered < target {
            let l = 1 + rng.weighted(&self.span_cdf);
            lengths.push(l);
            covered += l;
        }
        lengths
    }

    /// The original's `sample_span_in_document`: shorter documents take spans
    /// up to `bert_ratio` of their length, the longest takes all that fit.
    fn place_spans(&self, segs: &[(usize, usize)], mut lengths: Vec<usize>, rng: &mut Rng) -> Vec<(usize, usize)> {
        rng.shuffle(&mut lengths);
        let mut order: Vec<(usize, usize)> = segs.to_vec();
        order.sort_by_key(|&(_, len)| len); // stable: ties keep text order
        let mut spans = Vec::new();
        let mut next = 0;
        for (k, &(offset, len)) in order.iter().enumerate() {
            let (mut sum, mut count) = (0, 0);
            if k + 1 == order.len() {
                while next + count < lengths.len() && lengths[next + count] + sum + count <= len {
                    sum += lengths[next + count];
                    count += 1;
                }
            } else {
                let budget = (len as f64 * self.cfg.bert_ratio) as usize;
                while next + count < lengths.len() && lengths[next + count] + sum <= budget {
                    sum += lengths[next + count];
                    count += 1;
                }
            }
            if count > 0 {
                spans.extend(sample_spans(&lengths[next..next + count], len, offset, rng));
                next += count;
            }
        }
        spans
    }

    /// Sentences of the document runs: each ends at a sentence-ending token
    /// or at the end of its run.
    fn sentences(&self, segs: &[(usize, usize)], raw: &[u32]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        for &(s, len) in segs {
            let mut start = s;
            for (i, &t) in raw.iter().enumerate().skip(s).take(len) {
                if self.sentence_end.get(t as usize).copied().unwrap_or(false) {
                    out.push((start, i + 1));
                    start = i + 1;
                }
            }
            if start < s + len {
                out.push((start, s + len));
            }
        }
        out
    }

    /// Builds sample `index` in `mode`; also returns the raw text (for tests).
    fn build(&self, index: u64, mode: Mode) -> (Sample, Vec<u32>) {
        let s = self.cfg.seq_length;
        let sp = self.special;
        match mode {
            Mode::Span | Mode::Sentence => {
                let mask = if mode == Mode::Sentence && self.cfg.task_mask { sp.smask } else { sp.mask };
                // Part A + Part B = raw + 2·spans; shrink the raw text until it fits.
                let mut max_len = s;
                for attempt in 0u64.. {
                    let raw = self.pack(index, max_len);
                    let mut rng = Rng::derive(self.cfg.seed, STREAM_MASK ^ (attempt << 32), index);
                    let segs = self.segments(&raw);
                    let spans = if mode == Mode::Span {
                        let n: usize = segs.iter().map(|&(_, l)| l).sum();
                        let lengths = if n >= 2 { self.draw_span_lengths(n, &mut rng) } else { Vec::new() };
                        self.place_spans(&segs, lengths, &mut rng)
                    } else {
                        let n: usize = segs.iter().map(|&(_, l)| l).sum();
                        let mut sents = self.sentences(&segs, &raw);
                        rng.shuffle(&mut sents);
                        let target = ((self.cfg.gap_sentence_ratio * n as f64) as usize).max(1);
                        let mut chosen = Vec::new();
                        let mut covered = 0;
                        for sent in sents {
                            if covered >= target {
                                break;
                            }
                            covered += sent.1 - sent.0;
                            chosen.push(sent);
                        }
                        chosen
                    };
                    if raw.len() + 2 * spans.len() <= s {
                        let sample = self.make_block_data(&raw, spans, mask, mode, &mut rng);
                        return (sample, raw);
                    }
                    debug_assert!(s - 2 * spans.len() < max_len, "shrinking must progress");
                    max_len = s.saturating_sub(2 * spans.len()).max(4);
                    let _ = attempt;
                }
                unreachable!()
            }
            Mode::Generation => {
                let gmask = if self.cfg.task_mask { sp.gmask } else { sp.mask };
                let raw = self.pack(index, s - 2);
                let mut rng = Rng::derive(self.cfg.seed, STREAM_MASK, index);
                let len = raw.len();
                let hi = len.saturating_sub(2).max(1);
                let lo = ((self.cfg.gpt_min_ratio * len as f64) as usize).clamp(1, hi);
                let gen_len = rng.int_inclusive(lo, hi);
                let multiple_doc = raw.iter().position(|&t| t == sp.eod).is_some_and(|p| p + 1 != len);
                if multiple_doc || rng.f64() < self.cfg.gpt_infill_prob {
                    let sample = self.make_suffix_data(&raw, len - gen_len, gmask);
                    (sample, raw)
                } else {
                    let segs = self.segments(&raw);
                    let (off, seg_len) = segs.iter().copied().max_by_key(|&(_, l)| l).unwrap_or((1, 0));
                    let spans = if seg_len == 0 { Vec::new() } else { sample_spans(&[gen_len.min(seg_len)], seg_len, off, &mut rng) };
                    let sample = self.make_block_data(&raw, spans, gmask, mode, &mut rng);
                    (sample, raw)
                }
            }
        }
    }

    /// The original's `make_block_data`.
    fn make_block_data(&self, raw: &[u32], mut spans: Vec<(usize, usize)>, mask: u32, mode: Mode, rng: &mut Rng) -> Sample {
        let sp = self.special;
        // Part A positions: one per kept token, a span collapses onto its mask.
        let mut pos = vec![0u32; raw.len()];
        let mut inside = vec![false; raw.len()];
        for &(a, b) in &spans {
            for x in &mut inside[a + 1..b] {
                *x = true;
            }
        }
        let mut p: i64 = -1;
        for i in 0..raw.len() {
            if !inside[i] {
                p += 1;
            }
            pos[i] = p as u32;
        }
        spans.sort_unstable();
        let mut part_b_order = spans.clone();
        if self.cfg.shuffle_blocks {
            rng.shuffle(&mut part_b_order);
        }
        let cap = self.cfg.seq_length;
        let (mut tokens, mut targets) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
        let (mut position_ids, mut block_ids) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
        let mut last = 0;
        for &(a, b) in &spans {
            tokens.extend_from_slice(&raw[last..a]);
            position_ids.extend_from_slice(&pos[last..a]);
            tokens.push(mask);
            position_ids.push(pos[a]);
            last = b;
        }
        tokens.extend_from_slice(&raw[last..]);
        position_ids.extend_from_slice(&pos[last..]);
        let sep = tokens.len();
        targets.extend_from_slice(&tokens);
        block_ids.resize(sep, 0);
        for &(a, b) in &part_b_order {
            tokens.push(sp.sop);
            tokens.extend_from_slice(&raw[a..b]);
            targets.extend_from_slice(&raw[a..b]);
            targets.push(sp.eop);
            position_ids.extend(std::iter::repeat_n(pos[a], b - a + 1));
            if self.cfg.block_position_encoding {
                block_ids.extend(1..=(b - a + 1) as u32);
            } else {
                block_ids.extend(std::iter::repeat_n(1, b - a + 1));
            }
        }
        let mut loss_mask = vec![0u8; sep];
        loss_mask.resize(tokens.len(), 1);
        self.pad(Sample { tokens, targets, loss_mask, position_ids, block_position_ids: block_ids, sep, len: 0, mode, suffix: false })
    }

    /// Generation in prefix/suffix form: Part A = raw[..division] + gMASK,
    /// Part B = sop + suffix[..-1] predicting the suffix.
    fn make_suffix_data(&self, raw: &[u32], division: usize, gmask: u32) -> Sample {
        let sp = self.special;
        let (source, target) = raw.split_at(division);
        let mut tokens = source.to_vec();
        tokens.push(gmask);
        let sep = tokens.len();
        tokens.push(sp.sop);
        tokens.extend_from_slice(&target[..target.len() - 1]);
        let mut targets = source.to_vec();
        targets.push(gmask);
        targets.extend_from_slice(target);
        let mut loss_mask = vec![0u8; sep];
        loss_mask.extend(target.iter().map(|&t| u8::from(t != sp.cls && t != sp.pad)));
        let mut position_ids: Vec<u32> = (0..=division as u32).collect();
        position_ids.extend(std::iter::repeat_n(division as u32, target.len()));
        let mut block_ids = vec![0u32; sep];
        if self.cfg.block_position_encoding {
            block_ids.extend(1..=target.len() as u32);
        } else {
            block_ids.extend(std::iter::repeat_n(1, target.len()));
        }
        self.pad(Sample { tokens, targets, loss_mask, position_ids, block_position_ids: block_ids, sep, len: 0, mode: Mode::Generation, suffix: true })
    }

    fn pad(&self, mut s: Sample) -> Sample {
        let n = self.cfg.seq_length;
        assert!(s.tokens.len() <= n, "sample of {} tokens exceeds seq_length {n}", s.tokens.len());
        s.len = s.tokens.len();
        s.tokens.resize(n, self.special.pad);
        s.targets.resize(n, self.special.pad);
        s.loss_mask.resize(n, 0);
        s.position_ids.resize(n, 0);
        s.block_position_ids.resize(n, 0);
        s
    }
}

/// The original's `sample_spans`: places spans of `lengths` (in this order)
/// in `total` tokens starting at `offset`, uniformly among placements that
/// leave at least one token between neighbours.
fn sample_spans(lengths: &[usize], total: usize, mut offset: usize, rng: &mut Rng) -> Vec<(usize, usize)> {
    let sum: usize = lengths.iter().sum();
    let m = total + 1 - sum - lengths.len(); // free tokens beyond the gaps, +1
    let mut places: Vec<usize> = lengths.iter().map(|_| rng.below(m as u64 + 1) as usize).collect();
    places.sort_unstable();
    let mut spans = Vec::with_capacity(lengths.len());
    for (place, &len) in places.iter().zip(lengths) {
        spans.push((offset + place, offset + place + len));
        offset += len + 1;
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::store::write_synthetic_store;
    use std::collections::HashMap;

    const SPECIAL: SpecialIds = SpecialIds { pad: 0, unk: 1, cls: 2, sep: 3, mask: 4, sop: 5, eop: 6, gmask: 7, smask: 8, eod: 9 };
    const VOCAB: usize = 1000;
    /// ids below this (and >= 10) end a sentence: about one token in 20
    const SENT_END_BELOW: u32 = 60;

    /// A store of `n` documents with lengths from 1 to 600 (a few very long
    /// ones, many short), tokens uniform over the ordinary ids.
    fn store(dir: &std::path::Path, n: usize, seed: u64) -> Arc<TokenStore> {
        let mut rng = Rng::new(seed);
        let docs: Vec<Vec<u32>> = (0..n)
            .map(|i| {
                let len = if i % 10 == 0 { 300 + rng.below(300) } else { 1 + rng.below(120) } as usize;
                (0..len).map(|_| 10 + rng.below(VOCAB as u64 - 10) as u32).collect()
            })
            .collect();
        Arc::new(write_synthetic_store(dir, &docs, SPECIAL, VOCAB).unwrap())
    }

    fn sampler(store: &Arc<TokenStore>, cfg: BlockConfig) -> BlockSampler {
        let sentence_end = (0..VOCAB as u32).map(|t| (10..SENT_END_BELOW).contains(&t)).collect();
        let docs = (0..store.num_docs() as u32).collect();
        BlockSampler::new(store.clone(), docs, cfg, sentence_end).unwrap()
    }

    fn cfg(seq_length: usize) -> BlockConfig {
        BlockConfig { seq_length, task_mask: true, ..BlockConfig::default() }
    }

    /// Checks every structural invariant of `s` against its raw text and
    /// returns the spans as (start in raw, tokens) — in Part B order.
    fn check(sm: &BlockSampler, s: &Sample, raw: &[u32]) -> Vec<Vec<u32>> {
        let sp = SPECIAL;
        let n = sm.cfg.seq_length;
        assert_eq!(s.tokens.len(), n);
        assert!(s.len <= n);
        for v in [&s.tokens, &s.targets] {
            assert!(v[s.len..].iter().all(|&t| t == sp.pad));
        }
        assert!(s.loss_mask[s.len..].iter().all(|&m| m == 0));
        assert_eq!(s.tokens[0], sp.cls);
        let sep = s.sep;
        // Part A: positions 0..sep, block position 0, no loss, targets = tokens
        for i in 0..sep {
            assert_eq!(s.position_ids[i], i as u32, "part A position at {i}");
            assert_eq!(s.block_position_ids[i], 0);
            assert_eq!(s.loss_mask[i], 0);
            assert_eq!(s.targets[i], s.tokens[i]);
            assert_ne!(s.tokens[i], sp.sop);
        }
        let want_mask = match (s.mode, sm.cfg.task_mask) {
            (Mode::Span, _) | (_, false) => sp.mask,
            (Mode::Sentence, true) => sp.smask,
            (Mode::Generation, true) => sp.gmask,
        };
        if s.suffix {
            // prefix + [gMASK] | sop + suffix[..-1] -> suffix
            assert_eq!(s.tokens[sep - 1], want_mask);
            assert_eq!(s.tokens[sep], sp.sop);
            let suffix = &s.targets[sep..s.len];
            let mut rebuilt = s.tokens[..sep - 1].to_vec();
            rebuilt.extend_from_slice(suffix);
            assert_eq!(rebuilt, raw);
            assert_eq!(&s.tokens[sep + 1..s.len], &suffix[..suffix.len() - 1]);
            for (k, i) in (sep..s.len).enumerate() {
                assert_eq!(s.position_ids[i], (sep - 1) as u32);
                assert_eq!(s.block_position_ids[i], k as u32 + 1);
                let want = u8::from(s.targets[i] != sp.cls);
                assert_eq!(s.loss_mask[i], want);
            }
            return vec![suffix.to_vec()];
        }
        // Part B: blocks `sop span` -> `span eop`, position = its mask's Part A index
        let mut blocks: HashMap<u32, Vec<u32>> = HashMap::new();
        let mut order = Vec::new();
        let mut i = sep;
        while i < s.len {
            assert_eq!(s.tokens[i], sp.sop, "block starts with sop at {i}");
            let p = s.position_ids[i];
            let start = i;
            let mut span = Vec::new();
            loop {
                assert_eq!(s.position_ids[i], p);
                assert_eq!(s.block_position_ids[i], (i - start + 1) as u32);
                assert_eq!(s.loss_mask[i], 1);
                if i > start {
                    assert_eq!(s.tokens[i], span[span.len() - 1], "input is the previous target");
                }
                let t = s.targets[i];
                i += 1;
                if t == sp.eop {
                    break;
                }
                assert!(!sp.is_structural(t), "structural token {t} inside a span");
                span.push(t);
            }
            assert!(!span.is_empty());
            assert_eq!(s.tokens[p as usize], want_mask, "position {p} of a block is a mask in Part A");
            assert!(blocks.insert(p, span.clone()).is_none(), "two blocks for one mask");
            order.push(span);
        }
        // every mask in Part A has exactly one block; substituting rebuilds the raw text
        let mut rebuilt = Vec::new();
        for (j, &t) in s.tokens[..sep].iter().enumerate() {
            match blocks.get(&(j as u32)) {
                Some(span) => rebuilt.extend_from_slice(span),
                None => {
                    assert!(t != sp.mask && t != sp.smask && t != sp.gmask, "unfilled mask at {j}");
                    rebuilt.push(t);
                }
            }
        }
        assert_eq!(rebuilt, raw, "Part A with its blanks filled is the source text");
        order
    }

    #[test]
    fn invariants_hold_in_every_mode() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 400, 1);
        for seq in [64, 256] {
            for (mode, across) in [(Mode::Span, true), (Mode::Sentence, true), (Mode::Generation, true), (Mode::Generation, false), (Mode::Span, false)] {
                let sm = sampler(&st, BlockConfig { sample_across_doc: across, ..cfg(seq) });
                let mut suffix = 0;
                for i in 0..300 {
                    let (s, raw) = sm.build(i, mode);
                    assert_eq!(s.mode, mode);
                    check(&sm, &s, &raw);
                    suffix += usize::from(s.suffix);
                }
                if mode == Mode::Generation && !across {
                    assert!((100..200).contains(&suffix), "infill/suffix split {suffix}/300");
                }
            }
        }
    }

    #[test]
    fn without_task_mask_or_block_positions_or_shuffle() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 200, 2);
        let sm = sampler(&st, BlockConfig { task_mask: false, ..cfg(128) });
        for mode in [Mode::Sentence, Mode::Generation] {
            for i in 0..50 {
                let (s, raw) = sm.build(i, mode);
                check(&sm, &s, &raw);
            }
        }
        let sm = sampler(&st, BlockConfig { block_position_encoding: false, shuffle_blocks: false, ..cfg(128) });
        for i in 0..50 {
            let s = sm.sample(i, Mode::Span);
            for j in s.sep..s.len {
                assert_eq!(s.block_position_ids[j], 1);
            }
            // unshuffled: Part B blocks follow their masks' order
            let starts: Vec<u32> = (s.sep..s.len).filter(|&j| s.tokens[j] == SPECIAL.sop).map(|j| s.position_ids[j]).collect();
            assert!(starts.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn masked_fraction_and_span_lengths_follow_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 400, 3);
        let sm = sampler(&st, cfg(512));
        let (mut masked, mut maskable, mut spans) = (0usize, 0usize, 0usize);
        for i in 0..1500 {
            let (s, raw) = sm.build(i, Mode::Span);
            let blocks = check(&sm, &s, &raw);
            maskable += raw.iter().filter(|&&t| !SPECIAL.is_structural(t)).count();
            masked += blocks.iter().map(Vec::len).sum::<usize>();
            spans += blocks.len();
        }
        let frac = masked as f64 / maskable as f64;
        assert!((0.14..=0.16).contains(&frac), "masked fraction {frac}");
        let mean = masked as f64 / spans as f64;
        let want = sm.cfg.mean_span_length();
        assert!((want - 3.0 / (1.0 - (-3.0f64).exp())).abs() < 1e-3, "truncated Poisson mean {want}");
        assert!((mean - want).abs() < 0.15, "mean span length {mean}, distribution mean {want}");
    }

    #[test]
    fn sentence_mode_masks_whole_sentences() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 300, 4);
        let sm = sampler(&st, cfg(256));
        let (mut masked, mut maskable) = (0, 0);
        for i in 0..300 {
            let (s, raw) = sm.build(i, Mode::Sentence);
            for span in check(&sm, &s, &raw) {
                let ends = span.iter().filter(|&&t| t < SENT_END_BELOW).count();
                assert!(ends <= 1, "a sentence holds one sentence end at most");
                if ends == 1 {
                    assert!(*span.last().unwrap() < SENT_END_BELOW, "a sentence ends at its end token");
                }
                masked += span.len();
            }
            maskable += raw.iter().filter(|&&t| !SPECIAL.is_structural(t)).count();
        }
        let frac = masked as f64 / maskable as f64;
        assert!((0.15..0.30).contains(&frac), "sentence coverage {frac}");
    }

    #[test]
    fn modes_occur_with_their_probabilities() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 50, 5);
        let sm = sampler(&st, BlockConfig { bert_prob: 0.5, gap_sentence_prob: 0.3, ..cfg(64) });
        let mut counts: HashMap<Mode, usize> = HashMap::new();
        let n = 20_000;
        for b in 0..n {
            *counts.entry(sm.mode_for_batch(b)).or_default() += 1;
        }
        for (mode, p) in [(Mode::Span, 0.5), (Mode::Sentence, 0.3), (Mode::Generation, 0.2)] {
            let f = counts[&mode] as f64 / n as f64;
            assert!((f - p).abs() < 0.015, "{mode:?}: {f} vs {p}");
        }
        let batch = sm.batch(7, 70..80);
        assert!(batch.iter().all(|s| s.mode == sm.mode_for_batch(7)), "one mode per batch");
    }

    #[test]
    fn training_modes_follow_the_sample_index_alone() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 50, 5);
        let sm = sampler(&st, BlockConfig { bert_prob: 0.5, gap_sentence_prob: 0.3, ..cfg(64) });
        // a group of 8: samples 0..64 are groups 0..8, whatever the ranges asked
        let whole = sm.samples(0..64, 8);
        for (i, s) in whole.iter().enumerate() {
            assert_eq!(s.mode, sm.mode_for_batch(i as u64 / 8), "sample {i}");
            assert_eq!(s, &sm.sample(i as u64, s.mode));
        }
        // the same samples read in micro-batches of 4, 3 (crossing groups) or 16
        for micro in [4usize, 3, 16] {
            let pieces: Vec<Sample> = (0..64u64).step_by(micro).flat_map(|s| sm.samples(s..(s + micro as u64).min(64), 8)).collect();
            assert_eq!(pieces, whole, "read in pieces of {micro}");
        }
        // group = the batch's size: the held-out batches' rule
        assert_eq!(sm.samples(24..32, 8), sm.batch(3, 24..32));
        // a piece of 16 held two groups of different modes (else the test shows nothing)
        assert!(whole.chunks(16).any(|c| c[0].mode != c[8].mode), "no piece of 16 mixed two modes");
    }

    #[test]
    fn reproducible_per_seed_and_index() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path(), 100, 6);
        let a = sampler(&st, cfg(128));
        let b = sampler(&st, cfg(128));
        let other = sampler(&st, BlockConfig { seed: 99, ..cfg(128) });
        for i in 0..20 {
            assert_eq!(a.sample(i, Mode::Span), b.sample(i, Mode::Span));
            assert_ne!(a.sample(i, Mode::Span), a.sample(i + 1000, Mode::Span));
            assert_ne!(a.sample(i, Mode::Span), other.sample(i, Mode::Span));
        }
        // a data-parallel rank reading indices 4..8 of a batch gets exactly
        // what one process reading 0..8 gets there
        assert_eq!(a.batch(3, 4..8), a.batch(3, 0..8)[4..].to_vec());
    }

    #[test]
    fn bad_config_is_rejected_with_the_key() {
        for (c, key) in [
            (BlockConfig { bert_prob: 0.8, gap_sentence_prob: 0.5, ..cfg(64) }, "bert_prob + gap_sentence_prob"),
            (BlockConfig { gpt_min_ratio: 1.5, ..cfg(64) }, "gpt_min_ratio"),
            (BlockConfig { seq_length: 4, ..cfg(64) }, "seq_length"),
        ] {
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
