//! A SentencePiece `.model` (the original's `ChineseSPTokenizer` loads
//! one) as a `tokenizers` pipeline.
//!
//! The file is a protobuf `ModelProto`; the messages below are the fields of
//! SentencePiece's published `sentencepiece_model.proto` that tokenizing
//! needs (same tags; the rest is skipped by the decoder). The pieces become a
//! `tokenizers` Unigram or BPE model, and the normaliser spec becomes the
//! same normalisation SentencePiece applies: its precompiled character map
//! (NFKC and whitespace rules), extra whitespace removed, `▁` for spaces
//! with a dummy prefix. Ids equal SentencePiece's own on the reference
//! texts of `tests/tokenizers.rs` (Chinese, English, emoji, odd spaces).

use std::path::Path;

use prost::Message;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::{Precompiled, Sequence as NormalizerSequence, Strip, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer};

use crate::error::{Error, Result};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<Piece>,
    #[prost(message, optional, tag = "2")]
    trainer_spec: Option<TrainerSpec>,
    #[prost(message, optional, tag = "3")]
    normalizer_spec: Option<NormalizerSpec>,
}

#[derive(Clone, PartialEq, Message)]
struct Piece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    /// NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6
    #[prost(int32, optional, tag = "3")]
    r#type: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct TrainerSpec {
    /// UNIGRAM 1 (the default), BPE 2, WORD 3, CHAR 4
    #[prost(int32, optional, tag = "3")]
    model_type: Option<i32>,
    #[prost(bool, optional, tag = "35")]
    byte_fallback: Option<bool>,
    #[prost(int32, optional, tag = "40")]
    unk_id: Option<i32>,
}

#[derive(Clone, PartialEq, Message)]
struct NormalizerSpec {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
    #[prost(bytes = "vec", optional, tag = "2")]
    precompiled_charsmap: Option<Vec<u8>>,
    #[prost(bool, optional, tag = "3")]
    add_dummy_prefix: Option<bool>,
    #[prost(bool, optional, tag = "4")]
    remove_extra_whitespaces: Option<bool>,
    #[prost(bool, optional, tag = "5")]
    escape_whitespaces: Option<bool>,
}

const NORMAL: i32 = 1;
const USER_DEFINED: i32 = 4;
const BYTE: i32 = 6;

/// SentencePiece's word-boundary mark.
const SPACE: char = '\u{2581}';

/// The tokenizer a SentencePiece `.model` file describes, and the id of
/// its unknown piece.
pub fn load(path: &Path) -> Result<(Tokenizer, u32)> {
    let bytes = std::fs::read(path).map_err(|e| Error::invalid(path, format!("SentencePiece model: {e}")))?;
    let bad = |what: String| Error::invalid(path, format!("{what} (expected a SentencePiece .model, as ChineseSPTokenizer loads)"));
    let m = ModelProto::decode(bytes.as_slice()).map_err(|e| bad(format!("not a SentencePiece model: {e}")))?;
    if m.pieces.is_empty() {
        return Err(bad("no pieces".into()));
    }
    let spec = m.trainer_spec.clone().unwrap_or_default();
    let byte_fallback = spec.byte_fallback.unwrap_or(false);
    let unk_id = spec.unk_id.unwrap_or(0);
    let unk = usize::try_from(unk_id).ok().filter(|&u| u < m.pieces.len()).ok_or_else(|| bad(format!("unk_id {unk_id} is not a piece")))?;
    let text = |p: &Piece| p.piece.clone().unwrap_or_default();
    let mut tok = match spec.model_type.unwrap_or(1) {
        1 => {
            // Control, unknown and unused pieces (<s>, </s>, <unk>) are never
            // matched in text by SentencePiece: a score no path takes.
            let vocab = m
                .pieces
                .iter()
                .map(|p| {
                    let kind = p.r#type.unwrap_or(NORMAL);
                    let matched = matches!(kind, NORMAL | USER_DEFINED | BYTE);
                    (text(p), if matched { p.score.unwrap_or(0.0) as f64 } else { -1e9 })
                })
                .collect();
            Tokenizer::new(Unigram::from(vocab, Some(unk), byte_fallback).map_err(|e| bad(e.to_string()))?)
        }
        2 => {
            // BPE merges as SentencePiece applies them: a piece is made from
            // two pieces, the earlier (lower id) merged pieces first.
            let vocab: ahash::AHashMap<String, u32> = m.pieces.iter().enumerate().map(|(i, p)| (text(p), i as u32)).collect();
            let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
            for (id, p) in m.pieces.iter().enumerate() {
                let s = text(p);
                for (k, _) in s.char_indices().skip(1) {
                    let (l, r) = s.split_at(k);
                    if let (Some(&li), Some(&ri)) = (vocab.get(l), vocab.get(r)) {
                        merges.push((id as u32, li, ri, l.to_string(), r.to_string()));
                    }
                }
            }
            merges.sort_by_key(|m| (m.0, m.1, m.2));
            let merges = merges.into_iter().map(|(_, _, _, l, r)| (l, r)).collect();
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .unk_token(text(&m.pieces[unk]))
                .fuse_unk(true)
                .byte_fallback(byte_fallback)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            Tokenizer::new(bpe)
        }
        t => {
            let name = match t {
                3 => "WORD",
                4 => "CHAR",
                _ => "unknown",
            };
            return Err(bad(format!("model_type {name} ({t}) is not supported: UNIGRAM and BPE models are")));
        }
    };
    let ns = m.normalizer_spec.unwrap_or_default();
    if !ns.escape_whitespaces.unwrap_or(true) {
        return Err(bad("escape_whitespaces=false is not supported".into()));
    }
    let charsmap = match ns.precompiled_charsmap.as_deref().filter(|m| !m.is_empty()) {
        Some(map) => Some(Precompiled::from(map).map_err(|e| bad(format!("normalizer {}: {e}", ns.name.clone().unwrap_or_default())))?.into()),
        None => None,
    };
    pipeline(&mut tok, charsmap, ns.add_dummy_prefix.unwrap_or(true), ns.remove_extra_whitespaces.unwrap_or(true));
    Ok((tok, unk as u32))
}

/// SentencePiece's defaults around `model` (NFKC for its nmt_nfkc map): the
/// pipeline of a unigram model trained here for ChineseSPTokenizer.
pub fn default_pipeline(model: Unigram) -> Tokenizer {
    let mut tok = Tokenizer::new(model);
    pipeline(&mut tok, Some(NFKC.into()), true, true);
    tok
}

/// Normalisation (`charsmap`, then SentencePiece's whitespace rules) and
/// `▁` word boundaries with a dummy prefix, both ways.
fn pipeline(tok: &mut Tokenizer, charsmap: Option<NormalizerWrapper>, add_dummy_prefix: bool, remove_extra_whitespaces: bool) {
    let mut norms: Vec<NormalizerWrapper> = charsmap.into_iter().collect();
    if remove_extra_whitespaces {
        // trailing spaces go; a run of spaces becomes one boundary mark (a
        // leading one stands for the dummy prefix)
        norms.push(Strip::new(false, true).into());
        norms.push(Replace::new(ReplacePattern::Regex(" {2,}".into()), SPACE.to_string()).expect("a valid pattern").into());
    }
    tok.with_normalizer(Some(NormalizerSequence::new(norms)));
    let prepend = if add_dummy_prefix { PrependScheme::Always } else { PrependScheme::Never };
    tok.with_pre_tokenizer(Some(Metaspace::new(SPACE, prepend, true)));
    let decoders: Vec<DecoderWrapper> = vec![ByteFallback::new().into(), Metaspace::new(SPACE, prepend, true).into()];
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
}
