//! Tokenizers: the Hugging Face `tokenizers` crate plus GLM's command tokens.
//!
//! Sources:
//! - a BERT WordPiece `vocab.txt` (the original's `BertWordPieceTokenizer`:
//!   BERT normalisation with lower-casing, CJK characters split one per
//!   token, `##` continuation pieces);
//! - a `tokenizer.json` of the `tokenizers` library;
//! - none: a WordPiece tokenizer trained on the corpus with the same BERT
//!   normalisation and pre-tokenisation.
//!
//! GLM's command tokens are then looked up, and any that are missing are
//! appended in a fixed order, so their ids are stable for a given base
//! vocabulary. For bert-base-chinese (21128 entries) that gives
//! `<|startofpiece|>` 21128, `<|endofpiece|>` 21129, `[gMASK]` 21130,
//! `[sMASK]` 21131 — the ids the original assigns — and `<|endoftext|>` 21132.
//! The original reused `[PAD]` as its end-of-document token, which makes
//! padding indistinguishable from a document boundary; we give the end of a
//! document its own token.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// (name used by the original's `get_command`, token text), in the order
/// missing tokens are appended.
pub const COMMAND_TOKENS: [(&str, &str); 10] = [
    ("pad", "[PAD]"),
    ("unk", "[UNK]"),
    ("ENC", "[CLS]"),
    ("sep", "[SEP]"),
    ("MASK", "[MASK]"),
    ("sop", "<|startofpiece|>"),
    ("eop", "<|endofpiece|>"),
    ("gMASK", "[gMASK]"),
    ("sMASK", "[sMASK]"),
    ("eod", "<|endoftext|>"),
];

/// Ids of GLM's command tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialIds {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
    pub sop: u32,
    pub eop: u32,
    pub gmask: u32,
    pub smask: u32,
    pub eod: u32,
}

impl SpecialIds {
    fn from_array(a: [u32; 10]) -> Self {
        let [pad, unk, cls, sep, mask, sop, eop, gmask, smask, eod] = a;
        SpecialIds { pad, unk, cls, sep, mask, sop, eop, gmask, smask, eod }
    }
    pub fn all(&self) -> [u32; 10] {
        [self.pad, self.unk, self.cls, self.sep, self.mask, self.sop, self.eop, self.gmask, self.smask, self.eod]
    }
    /// Structural tokens that never appear inside a document's own text.
    /// `[UNK]` is not one: it stands for real text.
    pub fn is_structural(&self, id: u32) -> bool {
        id != self.unk && self.all().contains(&id)
    }
}

/// Characters whose presence makes a token end a sentence: the original's
/// ASCII set plus the CJK full-width forms (the original only knew ASCII, so
/// its sentence mode never found a sentence in Chinese text).
const SENTENCE_END: &[char] = &['.', '?', '!', ';', ':', '\n', '。', '？', '！', '；', '：', '…'];

pub struct GlmTokenizer {
    inner: Tokenizer,
    pub special: SpecialIds,
    /// sha256 (hex) of the tokenizer's canonical JSON: identifies it in stores.
    pub sha256: String,
    sentence_end: Vec<bool>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::invalid(path, format!("cannot load tokenizer: {e}"))
}

/// The BERT pipeline around a WordPiece model; `lowercase` also strips
/// accents, as BERT's basic tokenizer does.
fn bert_pipeline(model: WordPiece, lowercase: bool) -> Tokenizer {
    let mut t = Tokenizer::new(model);
    t.with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)));
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    t.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    t
}

impl GlmTokenizer {
    /// Loads a `tokenizer.json`, or a `vocab.txt` (any name not ending in
    /// `.json`) as an uncased BERT WordPiece tokenizer.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_cased(path, true)
    }

    /// As `load`; a `vocab.txt` lower-cases when `lowercase` (a
    /// `tokenizer.json` carries its own normalizer).
    pub fn load_cased(path: &Path, lowercase: bool) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::invalid(path, format!("tokenizer file: {e} (expected a BERT vocab.txt or a tokenizer.json)")))?;
        if meta.len() == 0 {
            return Err(Error::invalid(path, "tokenizer file is empty"));
        }
        let is_json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let text = glm_common::text::read(path)?;
        let inner = if is_json {
            text.parse::<Tokenizer>().map_err(|e| tok_err(path, e))?
        } else {
            let vocab = read_vocab_txt(path, &text)?;
            let wp = WordPiece::builder()
                .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
                .unk_token("[UNK]".into())
                .build()
                .map_err(|e| tok_err(path, e))?;
            bert_pipeline(wp, lowercase)
        };
        Self::finish(inner)
    }

    /// Trains a BERT-style WordPiece tokenizer on `texts` (lower-casing
    /// when `lowercase`).
    pub fn train<I>(texts: I, vocab_size: usize, show_progress: bool, lowercase: bool) -> Result<Self>
    where
        I: Iterator<Item = String> + Send,
    {
        let specials: Vec<AddedToken> = COMMAND_TOKENS.iter().map(|(_, t)| AddedToken::from(*t, true)).collect();
        let trainer = WordPieceTrainer::builder().vocab_size(vocab_size).min_frequency(1).special_tokens(specials).show_progress(show_progress).build();
        let model = WordPiece::builder().unk_token("[UNK]".into()).build().map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut inner = bert_pipeline(model, lowercase);
        let mut trainer = TrainerWrapper::WordPieceTrainer(trainer);
        inner.train(&mut trainer, texts).map_err(|e| Error::Tokenizer(format!("training failed: {e}")))?;
        Self::finish(inner)
    }

    /// Adds missing command tokens and computes the derived tables.
    fn finish(mut inner: Tokenizer) -> Result<Self> {
        let mut ids = [0u32; 10];
        for (i, (_, text)) in COMMAND_TOKENS.iter().enumerate() {
            // Appends the token when missing; an existing entry keeps its id
            // and is from now on matched whole in raw text.
            inner.add_special_tokens(&[AddedToken::from(*text, true)]);
            ids[i] = inner.token_to_id(text).ok_or_else(|| Error::Tokenizer(format!("could not add command token {text}")))?;
        }
        let special = SpecialIds::from_array(ids);
        let json = inner.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let sha256 = hex(&Sha256::digest(json.as_bytes()));
        let n = inner.get_vocab_size(true);
        let sentence_end = (0..n as u32).map(|id| inner.id_to_token(id).is_some_and(|t| !special.is_structural(id) && t.contains(SENTENCE_END))).collect();
        Ok(GlmTokenizer { inner, special, sha256, sentence_end })
    }

    /// Number of token ids (base vocabulary plus added tokens).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `sentence_end[id]`: the token contains a sentence-ending character.
    pub fn sentence_end_table(&self) -> &[bool] {
        &self.sentence_end
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts on all cores (rayon, inside `tokenizers`).
    pub fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let encs = self.inner.encode_batch_fast(texts, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Turns ids back into text: `##` pieces are glued to their word, CJK
    /// characters and punctuation are joined without spaces, and a space is
    /// put only between two pieces of space-separated scripts.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut out = String::new();
        for &id in ids {
            if skip_special && self.special.all().contains(&id) && id != self.special.unk {
                continue;
            }
            let Some(tok) = self.inner.id_to_token(id) else { continue };
            if let Some(piece) = tok.strip_prefix("##") {
                out.push_str(piece);
                continue;
            }
            let prev = out.chars().last();
            let first = tok.chars().next();
            if let (Some(p), Some(f)) = (prev, first) {
                if word_char(p) && word_char(f) || (matches!(p, ',' | ';' | '!' | '?') && word_char(f)) {
                    out.push(' ');
                }
            }
            out.push_str(&tok);
        }
        out
    }

    /// The tokenizer as `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String> {
        self.inner.to_string(true).map_err(|e| Error::Tokenizer(e.to_string()))
    }
}

/// Reads a BERT `vocab.txt` as BERT's `load_vocab` does: one token per
/// `\n`-terminated line (a trailing `\r` dropped), id = line number. Tokens
/// are kept exactly: bert-base-chinese has entries such as U+2028 that a
/// whitespace trim would erase.
fn read_vocab_txt(path: &Path, text: &str) -> Result<std::collections::HashMap<String, u32>> {
    let mut vocab = std::collections::HashMap::new();
    let body = text.strip_suffix('\n').unwrap_or(text);
    for (i, line) in body.split('\n').enumerate() {
        let tok = line.strip_suffix('\r').unwrap_or(line);
        if tok.is_empty() {
            return Err(Error::parse(path, i + 1, 1, "empty line in vocab.txt (one token per line expected)"));
        }
        if let Some(prev) = vocab.insert(tok.to_string(), i as u32) {
            return Err(Error::parse(path, i + 1, 1, format!("token {tok:?} already on line {}", prev + 1)));
        }
    }
    if !vocab.contains_key("[UNK]") {
        return Err(Error::invalid(path, "vocab.txt has no [UNK] token (is it a BERT WordPiece vocabulary?)"));
    }
    Ok(vocab)
}

/// Letters and digits of scripts that separate words with spaces.
fn word_char(c: char) -> bool {
    c.is_alphanumeric() && !is_cjk(c)
}

pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F
        | 0x3040..=0x30FF | 0xAC00..=0xD7AF)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Vocabulary size of the model's embedding: `vocab` rounded up to a multiple
/// of `divisible_by × tensor_parallel` (Megatron's padding).
pub fn padded_vocab_size(vocab: usize, divisible_by: usize, tensor_parallel: usize) -> usize {
    let m = divisible_by.max(1) * tensor_parallel.max(1);
    vocab.div_ceil(m) * m
}

/// The `make_vocab_size_divisible_by` with which a run on `tp`
/// tensor-parallel ranks pads a tokenizer of `vocab` ids to a checkpoint's
/// `padded` vocabulary (saved on `saved_tp` ranks with `divisible_by`):
/// `None` when `divisible_by` already does, or when no setting can. The
/// multiple the checkpoint was padded to (`divisible_by` × `saved_tp`)
/// comes first, then the largest power of two that fits, then any.
pub fn divisible_by_for(vocab: usize, padded: usize, divisible_by: usize, saved_tp: usize, tp: usize) -> Option<usize> {
    let tp = tp.max(1);
    let fits = |d: usize| d > 0 && d <= padded / tp && padded_vocab_size(vocab, d, tp) == padded;
    if fits(divisible_by) {
        return None;
    }
    let multiple = divisible_by * saved_tp.max(1);
    if multiple % tp == 0 && fits(multiple / tp) {
        return Some(multiple / tp);
    }
    (0..usize::BITS).rev().map(|k| 1usize << k).find(|&d| fits(d)).or_else(|| (1..=padded / tp).find(|&d| fits(d)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WordPiece casing as the original's BertWordPieceTokenizer: cased
    /// keeps "Hello" and "É", uncased lower-cases and strips accents.
    #[test]
    fn a_vocab_txt_is_cased_or_uncased_as_asked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("vocab.txt");
        std::fs::write(&p, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nHello\nhello\nÉcole\necole\n").unwrap();
        let (cased, uncased) = (GlmTokenizer::load_cased(&p, false).unwrap(), GlmTokenizer::load_cased(&p, true).unwrap());
        assert_eq!(cased.encode("Hello École").unwrap(), [5, 7]);
        assert_eq!(uncased.encode("Hello École").unwrap(), [6, 8]);
        assert_eq!(GlmTokenizer::load(&p).unwrap().encode("Hello").unwrap(), [6], "load is uncased, as bert-base-uncased");
        assert_ne!(cased.sha256, uncased.sha256, "stores built with the two never mix");
    }

    #[test]
    fn the_padding_setting_that_loads_a_checkpoint() {
        // 16000 ids padded to 16000 on one rank (divisible by 128): two ranks need 64
        assert_eq!(divisible_by_for(16000, 16000, 128, 1, 2), Some(64));
        assert_eq!(padded_vocab_size(16000, 64, 2), 16000);
        // already right, or saved on 2 ranks and loaded on 1
        assert_eq!(divisible_by_for(16000, 16128, 128, 2, 2), None);
        assert_eq!(divisible_by_for(16000, 16128, 128, 2, 1), Some(256));
        // no setting pads 16000 ids to an odd 16001 on two ranks
        assert_eq!(divisible_by_for(16000, 16001, 128, 1, 2), None);
    }

    #[test]
    fn padding_rounds_up_to_multiple() {
        assert_eq!(padded_vocab_size(21133, 128, 1), 21248);
        assert_eq!(padded_vocab_size(21133, 128, 2), 21248);
        assert_eq!(padded_vocab_size(21248, 128, 1), 21248);
        assert_eq!(padded_vocab_size(100, 128, 4), 512);
    }

    #[test]
    fn trained_tokenizer_has_command_tokens_first_and_round_trips() {
        let texts = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "Hello world, hello GLM."];
        let tok = GlmTokenizer::train(texts.iter().map(|s| s.to_string()).cycle().take(30), 200, false, true).unwrap();
        let s = tok.special;
        assert_eq!(s.all(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        for t in &texts[..2] {
            let ids = tok.encode(t).unwrap();
            assert!(!ids.contains(&s.unk), "{t}: {ids:?}");
            assert_eq!(tok.decode(&ids, true), *t);
        }
        assert_eq!(tok.decode(&tok.encode("Hello world").unwrap(), true), "hello world");
        // command tokens typed in raw text stay whole
        let ids = tok.encode("明月[MASK]光").unwrap();
        assert!(ids.contains(&s.mask));
        let end = tok.encode("。").unwrap()[0];
        assert!(tok.sentence_end_table()[end as usize]);
    }
}
