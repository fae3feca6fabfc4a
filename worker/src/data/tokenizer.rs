//! Tokenizers: the original's three `tokenizer_type`s on the Hugging Face
//! `tokenizers` crate, with GLM's command tokens at the original's ids.
//!
//! - `BertWordPieceTokenizer`: a BERT `vocab.txt` (BERT normalisation,
//!   lower-cased unless `tokenizer_model_type` names a `-cased` model, CJK
//!   characters one per token, `##` continuation pieces), or a WordPiece
//!   trained on the corpus;
//! - `GPT2BPETokenizer`: GPT-2's byte-level BPE (`vocab.json` +
//!   `merges.txt`), or one trained on the corpus; RoBERTa's ids when
//!   `tokenizer_model_type` starts with `roberta`, as in the original;
//! - `ChineseSPTokenizer`: a SentencePiece `.model` (`data::sentencepiece`),
//!   or a unigram model trained on the corpus.
//!
//! Any of them may also be a `tokenizer.json` of the `tokenizers` library.
//! The text model holds only text pieces; the command tokens (`[MASK]`,
//! `<|startofpiece|>`, ...) are a table of (name, text, id) laid out as the
//! original's tokenizer class lays them out (`docs/data.md` has the tables),
//! matched whole in raw text as the original does, and saved beside the
//! model in `tokenizer.json` under the key `glm`, so that a store or
//! checkpoint knows its own ids (the `tokenizers` library refuses keys it
//! does not know: drop `glm` to load the file there).
//!
//! One difference, kept from before: the original's WordPiece reuses
//! `[PAD]` as its end-of-document token, which makes padding
//! indistinguishable from a document boundary; here the end of a document
//! is its own `<|endoftext|>`, after `[sMASK]` (bert-base-chinese: 21132).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainer};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};

/// The original's tokenizer classes, by their `tokenizer_type` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenizerType {
    #[serde(rename = "BertWordPieceTokenizer")]
    WordPiece,
    #[serde(rename = "GPT2BPETokenizer")]
    Gpt2Bpe,
    #[serde(rename = "ChineseSPTokenizer")]
    ChineseSp,
}

impl TokenizerType {
    pub const ALL: [TokenizerType; 3] = [TokenizerType::WordPiece, TokenizerType::Gpt2Bpe, TokenizerType::ChineseSp];

    pub fn name(self) -> &'static str {
        match self {
            TokenizerType::WordPiece => "BertWordPieceTokenizer",
            TokenizerType::Gpt2Bpe => "GPT2BPETokenizer",
            TokenizerType::ChineseSp => "ChineseSPTokenizer",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// The three names, for "expected one of".
    pub fn names() -> String {
        Self::ALL.map(|t| t.name()).join(", ")
    }

    /// The files `tokenizer_path` names for this type.
    pub fn files(self) -> &'static str {
        match self {
            TokenizerType::WordPiece => "a BERT vocab.txt (or the folder holding it) or a tokenizer.json",
            TokenizerType::Gpt2Bpe => "GPT-2's vocab.json + merges.txt (either file, or the folder holding both) or a tokenizer.json",
            TokenizerType::ChineseSp => "a SentencePiece .model (or the folder holding one) or a tokenizer.json",
        }
    }

    /// The model trained on the corpus when no tokenizer is given.
    pub fn trained_model(self) -> &'static str {
        match self {
            TokenizerType::WordPiece => "WordPiece",
            TokenizerType::Gpt2Bpe => "byte-level BPE",
            TokenizerType::ChineseSp => "unigram",
        }
    }
}

impl std::fmt::Display for TokenizerType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where the command tokens go: one layout per tokenizer class of the
/// original (and per its switches).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// BertWordPieceTokenizer: [PAD] [UNK] [CLS] [SEP] [MASK] from the
    /// vocabulary, then sop, eop, gMASK, sMASK (and our eod) appended.
    Bert,
    /// GPT2BPETokenizer with GPT-2's vocabulary: pad = eos = <|endoftext|>,
    /// then sop, eop, [CLS], [MASK], [SEP], [UNK], gMASK, sMASK appended.
    Gpt2,
    /// GPT2BPETokenizer with RoBERTa's (tokenizer_model_type roberta*):
    /// <s>, </s>, <mask>, <unk> stand for [CLS], pad/eos/[SEP], [MASK], [UNK].
    Roberta,
    /// ChineseSPTokenizer: six commands after the pieces, then sop, eop,
    /// gMASK, sMASK; as the original without fix_command_token, [gMASK]
    /// shares <|endofpiece|>'s id.
    Sp,
    /// ChineseSPTokenizer with fix_command_token: [sMASK], [gMASK] after eop.
    SpFixed,
}

/// Which tokenizer a run asks for: configs.json's `tokenizer_type`,
/// `tokenizer_model_type` and `fix_command_token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenizerSpec {
    pub kind: TokenizerType,
    /// WordPiece lower-cases and strips accents (a vocab.txt, or training).
    pub lowercase: bool,
    /// GPT2BPETokenizer: RoBERTa's command ids.
    pub roberta: bool,
    /// ChineseSPTokenizer: the original's `fix_command_token`.
    pub fix_command_token: bool,
}

impl Default for TokenizerSpec {
    fn default() -> Self {
        TokenizerSpec { kind: TokenizerType::WordPiece, lowercase: true, roberta: false, fix_command_token: false }
    }
}

impl TokenizerSpec {
    /// As the original reads them: WordPiece keeps case for the cased and
    /// Chinese BERT models (bert-base-cased, bert-large-cased,
    /// bert-base-multilingual-cased, bert-base-chinese) and lower-cases for
    /// any other name (the original falls back to bert-large-uncased for a
    /// name it does not know); a name starting with `roberta` selects
    /// RoBERTa's ids for GPT2BPETokenizer.
    pub fn new(kind: TokenizerType, model_type: &str, fix_command_token: bool) -> Self {
        const KNOWN: [&str; 7] = [
            "bert-base-uncased", "bert-large-uncased", "bert-base-cased", "bert-large-cased", "bert-base-multilingual-uncased", "bert-base-multilingual-cased",
            "bert-base-chinese",
        ];
        let bert = if KNOWN.contains(&model_type) { model_type } else { "bert-large-uncased" };
        let lowercase = !(bert.contains("-cased") || bert.contains("chinese"));
        TokenizerSpec { kind, lowercase, roberta: model_type.starts_with("roberta"), fix_command_token }
    }

    /// The spec of configs.json's keys (`tokenizer_type` checked by the
    /// run's configuration).
    pub fn from_args(a: &glm_common::args::Args) -> Result<Self> {
        let kind = TokenizerType::parse(&a.tokenizer_type)
            .ok_or_else(|| Error::Config(format!("tokenizer_type = \"{}\": expected one of {}", a.tokenizer_type, TokenizerType::names())))?;
        Ok(Self::new(kind, &a.tokenizer_model_type, a.fix_command_token))
    }

    /// How the run's report names it, with the `tokenizer_model_type`
    /// it was made from.
    pub fn describe(&self, model_type: &str) -> String {
        let k = self.kind;
        match self.layout() {
            Layout::Bert => format!("{k}, tokenizer_model_type {model_type} ({}){}", if self.lowercase { "lower-cased" } else { "cased" }, self.fix_note()),
            Layout::Gpt2 => format!("{k}, tokenizer_model_type {model_type} (GPT-2's command ids){}", self.fix_note()),
            Layout::Roberta => format!("{k}, tokenizer_model_type {model_type} (RoBERTa's command ids){}", self.fix_note()),
            Layout::Sp => format!("{k}, fix_command_token false ([gMASK] shares <|endofpiece|>'s id, as the original's)"),
            Layout::SpFixed => format!("{k}, fix_command_token true"),
        }
    }

    fn fix_note(&self) -> &'static str {
        if self.fix_command_token {
            "; fix_command_token: no effect on this type"
        } else {
            ""
        }
    }

    pub fn layout(&self) -> Layout {
        match (self.kind, self.roberta, self.fix_command_token) {
            (TokenizerType::WordPiece, ..) => Layout::Bert,
            (TokenizerType::Gpt2Bpe, false, _) => Layout::Gpt2,
            (TokenizerType::Gpt2Bpe, true, _) => Layout::Roberta,
            (TokenizerType::ChineseSp, _, false) => Layout::Sp,
            (TokenizerType::ChineseSp, _, true) => Layout::SpFixed,
        }
    }

    /// The suffix of a trained tokenizer's cache file: each spec its own.
    pub fn cache_suffix(&self) -> &'static str {
        match (self.layout(), self.lowercase) {
            (Layout::Bert, true) => "",
            (Layout::Bert, false) => "-cased",
            (Layout::Gpt2, _) => "-gpt2bpe",
            (Layout::Roberta, _) => "-gpt2bpe-roberta",
            (Layout::Sp, _) => "-chinesesp",
            (Layout::SpFixed, _) => "-chinesesp-fixed",
        }
    }
}

/// One command token: the original's name (`get_command`), its text
/// (matched whole in raw text) and id. `lstrip`: whitespace before it is
/// dropped (the original's [MASK]/[gMASK]/[sMASK] for GPT-2 and SentencePiece).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandToken {
    pub name: String,
    pub token: String,
    pub id: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lstrip: bool,
}

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
    pub fn all(&self) -> [u32; 10] {
        [self.pad, self.unk, self.cls, self.sep, self.mask, self.sop, self.eop, self.gmask, self.smask, self.eod]
    }
    /// Structural tokens that never appear inside a document's own text.
    /// `[UNK]` is not one: it stands for real text.
    pub fn is_structural(&self, id: u32) -> bool {
        id != self.unk && self.all().contains(&id)
    }

    fn from_commands(cmds: &[CommandToken]) -> Result<Self> {
        let id = |name: &str| cmds.iter().find(|c| c.name == name).map(|c| c.id).ok_or_else(|| Error::Tokenizer(format!("no command token {name}")));
        Ok(SpecialIds {
            pad: id("pad")?,
            unk: id("unk")?,
            cls: id("ENC")?,
            sep: id("sep")?,
            mask: id("MASK")?,
            sop: id("sop")?,
            eop: id("eop")?,
            gmask: id("gMASK")?,
            smask: id("sMASK")?,
            eod: id("eos")?,
        })
    }
}

/// Texts of the command tokens.
const PAD: &str = "[PAD]";
const UNK: &str = "[UNK]";
const CLS: &str = "[CLS]";
const SEP: &str = "[SEP]";
const MASK: &str = "[MASK]";
const SOP: &str = "<|startofpiece|>";
const EOP: &str = "<|endofpiece|>";
const GMASK: &str = "[gMASK]";
const SMASK: &str = "[sMASK]";
const EOT: &str = "<|endoftext|>";

/// RoBERTa's own specials, which its command tokens stand for.
const ROBERTA_SPECIALS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];

/// Characters whose presence makes a token end a sentence: the original's
/// ASCII set plus the CJK full-width forms (the original only knew ASCII, so
/// its sentence mode never found a sentence in Chinese text).
const SENTENCE_END: &[char] = &['.', '?', '!', ';', ':', '\n', '。', '？', '！', '；', '：', '…'];

/// What `tokenizer.json` keeps under `glm`: the command-token table and
/// what made it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GlmBlock {
    tokenizer_type: TokenizerType,
    layout: Layout,
    command_tokens: Vec<CommandToken>,
    /// The id the text model gives text it cannot cover (none for
    /// byte-level BPE, which covers every byte).
    text_unk: Option<u32>,
}

pub struct GlmTokenizer {
    inner: Tokenizer,
    block: GlmBlock,
    pub special: SpecialIds,
    /// sha256 (hex) of the tokenizer's canonical JSON (model and command
    /// tokens): identifies it in stores and checkpoints.
    pub sha256: String,
    /// A WordPiece tokenizer's hash as builds before the command-token
    /// table computed it, which stores and checkpoints of those builds
    /// recorded (the same ids).
    legacy_sha256: Option<String>,
    vocab_size: usize,
    /// Ids below this are the text model's.
    text_ids: usize,
    /// Command-token texts matched in raw text, longest first.
    matched: Vec<(String, u32, bool)>,
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

/// GPT-2's pipeline around a BPE model: byte-level pieces, no prefix space.
fn byte_level_pipeline(model: BPE) -> Tokenizer {
    let mut t = Tokenizer::new(model);
    t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    t.with_decoder(Some(ByteLevel::new(false, true, true)));
    t
}

/// The files of `path` for `kind`: (main file, second file for GPT-2's pair).
fn resolve_files(path: &Path, kind: TokenizerType) -> Result<(PathBuf, Option<PathBuf>)> {
    let expected = || format!("expected {} for tokenizer_type {kind}", kind.files());
    if !path.exists() {
        return Err(Error::invalid(path, format!("no such file or folder ({})", expected())));
    }
    let in_dir = |name: &str| path.join(name);
    let json = |p: &Path| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    match kind {
        TokenizerType::Gpt2Bpe => {
            let (vocab, merges) = if path.is_dir() {
                (in_dir("vocab.json"), in_dir("merges.txt"))
            } else if json(path) && is_tokenizer_json(path) {
                return Ok((path.to_path_buf(), None));
            } else if json(path) {
                (path.to_path_buf(), path.with_file_name("merges.txt"))
            } else if path.extension().is_some_and(|e| e == "txt") && path.file_name() != Some("vocab.txt".as_ref()) {
                (path.with_file_name("vocab.json"), path.to_path_buf())
            } else {
                return Err(Error::invalid(path, expected()));
            };
            for f in [&vocab, &merges] {
                if !f.is_file() {
                    return Err(Error::invalid(f, format!("missing: GPT-2's byte-level BPE needs vocab.json and merges.txt side by side ({})", expected())));
                }
            }
            Ok((vocab, Some(merges)))
        }
        TokenizerType::WordPiece if path.is_dir() => {
            let v = in_dir("vocab.txt");
            if v.is_file() {
                Ok((v, None))
            } else {
                Err(Error::invalid(path, format!("no vocab.txt in this folder ({})", expected())))
            }
        }
        TokenizerType::ChineseSp if path.is_dir() => {
            let mut models: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::invalid(path, e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "model"))
                .collect();
            match models.len() {
                1 => Ok((models.remove(0), None)),
                0 => Err(Error::invalid(path, format!("no .model file in this folder ({})", expected()))),
                _ => Err(Error::invalid(path, format!("{} .model files in this folder: name one ({})", models.len(), expected()))),
            }
        }
        _ => Ok((path.to_path_buf(), None)),
    }
}

/// Whether a `.json` file is a `tokenizers` tokenizer (it has a model)
/// rather than a vocabulary.
fn is_tokenizer_json(path: &Path) -> bool {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()).is_some_and(|v| v.get("model").is_some())
}

impl GlmTokenizer {
    /// Loads the tokenizer `spec` asks for from `path` (see
    /// `TokenizerType::files`). A `tokenizer.json` saved by this program
    /// must have been made for the same type and layout.
    pub fn load(path: &Path, spec: &TokenizerSpec) -> Result<Self> {
        let (file, merges) = resolve_files(path, spec.kind)?;
        let meta = std::fs::metadata(&file).map_err(|e| Error::invalid(&file, format!("tokenizer file: {e} (expected {})", spec.kind.files())))?;
        if meta.len() == 0 {
            return Err(Error::invalid(&file, "tokenizer file is empty"));
        }
        if merges.is_none() && file.extension().is_some_and(|e| e.eq_ignore_ascii_case("json")) {
            let t = Self::from_json_file(&file, Some(spec))?;
            if t.block.layout != spec.layout() {
                return Err(Error::invalid(
                    &file,
                    format!(
                        "this tokenizer.json holds a {} tokenizer with the {:?} command-token layout, but the run asks for {} with the {:?} layout (tokenizer_type, tokenizer_model_type, fix_command_token)",
                        t.block.tokenizer_type,
                        t.block.layout,
                        spec.kind,
                        spec.layout()
                    ),
                ));
            }
            return Ok(t);
        }
        let (inner, text_unk) = match (spec.kind, merges) {
            (TokenizerType::Gpt2Bpe, Some(merges)) => {
                let (v, m) = (file.to_string_lossy(), merges.to_string_lossy());
                let bpe = BPE::from_file(&v, &m).build().map_err(|e| tok_err(&file, format!("{e} (with {})", merges.display())))?;
                let inner = byte_level_pipeline(bpe);
                let unk = inner.token_to_id("<unk>");
                (inner, unk)
            }
            (TokenizerType::ChineseSp, _) => {
                let (inner, unk) = super::sentencepiece::load(&file)?;
                (inner, Some(unk))
            }
            (_, _) => {
                let text = glm_common::text::read(&file)?;
                let vocab = read_vocab_txt(&file, &text)?;
                let wp = WordPiece::builder()
                    .vocab(vocab.into_iter().collect::<ahash::AHashMap<String, u32>>())
                    .unk_token(UNK.into())
                    .build()
                    .map_err(|e| tok_err(&file, e))?;
                let inner = bert_pipeline(wp, spec.lowercase);
                let unk = inner.token_to_id(UNK);
                (inner, unk)
            }
        };
        Self::with_layout(inner, spec, text_unk).map_err(|e| match e {
            Error::Tokenizer(m) => Error::invalid(&file, m),
            e => e,
        })
    }

    /// Loads a `tokenizer.json` as a store or checkpoint saved it (its
    /// command tokens under `glm`; one without is BERT WordPiece's layout).
    pub fn load_saved(path: &Path) -> Result<Self> {
        Self::from_json_file(path, None)
    }

    fn from_json_file(path: &Path, spec: Option<&TokenizerSpec>) -> Result<Self> {
        let text = glm_common::text::read(path)?;
        let mut value: serde_json::Value = serde_json::from_str(&text).map_err(|e| tok_err(path, e))?;
        // the `tokenizers` library does not skip keys it does not know
        let block = match value.as_object_mut().and_then(|m| m.remove("glm")) {
            Some(b) => Some(serde_json::from_value::<GlmBlock>(b).map_err(|e| tok_err(path, format!("its \"glm\" command-token table: {e}")))?),
            None => None,
        };
        let inner = value.to_string().parse::<Tokenizer>().map_err(|e| tok_err(path, e))?;
        match block {
            Some(block) => Self::finish(inner, block).map_err(|e| tok_err(path, e)),
            None => {
                let spec = spec.copied().unwrap_or_default();
                let unk = match spec.kind {
                    TokenizerType::WordPiece => inner.token_to_id(UNK),
                    _ => inner.token_to_id("<unk>"),
                };
                Self::with_layout(inner, &spec, unk).map_err(|e| tok_err(path, e))
            }
        }
    }

    /// Trains the text model `spec` asks for on `texts` (see
    /// `TokenizerType::trained_model`).
    pub fn train<I>(texts: I, vocab_size: usize, show_progress: bool, spec: &TokenizerSpec) -> Result<Self>
    where
        I: Iterator<Item = String> + Send,
    {
        let fail = |e: tokenizers::Error| Error::Tokenizer(format!("training failed: {e}"));
        let (mut inner, mut trainer, unk) = match spec.layout() {
            Layout::Bert => {
                // the original's names first: ids 0..=9
                let specials = [PAD, UNK, CLS, SEP, MASK, SOP, EOP, GMASK, SMASK, EOT].map(|t| AddedToken::from(t, true)).to_vec();
                let trainer = WordPieceTrainer::builder().vocab_size(vocab_size).min_frequency(1).special_tokens(specials).show_progress(show_progress).build();
                let model = WordPiece::builder().unk_token(UNK.into()).build().map_err(fail)?;
                (bert_pipeline(model, spec.lowercase), TrainerWrapper::WordPieceTrainer(trainer), Some(UNK))
            }
            layout @ (Layout::Gpt2 | Layout::Roberta) => {
                let specials: Vec<&str> = if layout == Layout::Roberta { ROBERTA_SPECIALS.to_vec() } else { vec![EOT] };
                let trainer = BpeTrainer::builder()
                    .vocab_size(vocab_size)
                    .min_frequency(1)
                    .special_tokens(specials.iter().map(|t| AddedToken::from(*t, true)).collect())
                    .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                    .show_progress(show_progress)
                    .build();
                let unk = if layout == Layout::Roberta { Some("<unk>") } else { None };
                (byte_level_pipeline(BPE::default()), TrainerWrapper::BpeTrainer(trainer), unk)
            }
            Layout::Sp | Layout::SpFixed => {
                let trainer = UnigramTrainer::builder()
                    .vocab_size(vocab_size as u32)
                    .special_tokens(vec![AddedToken::from("<unk>", true)])
                    .unk_token(Some("<unk>".into()))
                    .show_progress(show_progress)
                    .build()
                    .map_err(|e| Error::Tokenizer(format!("training failed: {e}")))?;
                (super::sentencepiece::default_pipeline(Unigram::default()), TrainerWrapper::UnigramTrainer(trainer), Some("<unk>"))
            }
        };
        inner.train(&mut trainer, texts).map_err(|e| match e.to_string() {
            m if m.contains("not large enough to contain all chars") => Error::Tokenizer(format!(
                "training failed: a unigram model keeps a piece for every character of the corpus, and it has more than the vocabulary size {vocab_size} (--vocab-size; Chinese text needs thousands)"
            )),
            _ => fail(e),
        })?;
        let unk = unk.and_then(|u| inner.token_to_id(u));
        Self::with_layout(inner, spec, unk)
    }

    /// Lays out the command tokens after (or onto) the text model's ids.
    fn with_layout(inner: Tokenizer, spec: &TokenizerSpec, text_unk: Option<u32>) -> Result<Self> {
        let base = text_ids(&inner) as u32;
        let cmd = |name: &str, token: &str, id: u32| CommandToken { name: name.into(), token: token.into(), id, lstrip: false };
        let lcmd = |name: &str, token: &str, id: u32| CommandToken { lstrip: true, ..cmd(name, token, id) };
        let find = |t: &str, what: &str| inner.token_to_id(t).ok_or_else(|| Error::Tokenizer(format!("the vocabulary has no {t} token ({what})")));
        let layout = spec.layout();
        let commands = match layout {
            Layout::Bert => {
                // found in the vocabulary, or appended in this order
                let mut next = base;
                let mut at = |t: &str| {
                    inner.token_to_id(t).unwrap_or_else(|| {
                        next += 1;
                        next - 1
                    })
                };
                let (pad, unk, cls, sep, mask) = (at(PAD), at(UNK), at(CLS), at(SEP), at(MASK));
                let (sop, eop, gmask, smask, eot) = (at(SOP), at(EOP), at(GMASK), at(SMASK), at(EOT));
                vec![
                    cmd("pad", PAD, pad),
                    cmd("ENC", CLS, cls),
                    cmd("MASK", MASK, mask),
                    cmd("unk", UNK, unk),
                    cmd("sep", SEP, sep),
                    cmd("eos", EOT, eot),
                    cmd("sop", SOP, sop),
                    cmd("eop", EOP, eop),
                    cmd("gMASK", GMASK, gmask),
                    cmd("sMASK", SMASK, smask),
                ]
            }
            Layout::Gpt2 => {
                let eot = find(EOT, "GPT-2's end of text; a RoBERTa vocabulary needs tokenizer_model_type=roberta")?;
                let v = base;
                vec![
                    cmd("pad", EOT, eot),
                    cmd("eos", EOT, eot),
                    cmd("sop", SOP, v),
                    cmd("eop", EOP, v + 1),
                    cmd("ENC", CLS, v + 2),
                    lcmd("MASK", MASK, v + 3),
                    cmd("sep", SEP, v + 4),
                    cmd("unk", UNK, v + 5),
                    lcmd("gMASK", GMASK, v + 6),
                    lcmd("sMASK", SMASK, v + 7),
                ]
            }
            Layout::Roberta => {
                let what = "RoBERTa's, as tokenizer_model_type roberta* asks";
                let (s, end, mask, unk) = (find("<s>", what)?, find("</s>", what)?, find("<mask>", what)?, find("<unk>", what)?);
                let v = base;
                vec![
                    cmd("pad", EOT, end),
                    cmd("eos", EOT, end),
                    cmd("sep", SEP, end),
                    cmd("ENC", CLS, s),
                    lcmd("MASK", MASK, mask),
                    cmd("unk", UNK, unk),
                    cmd("sop", SOP, v),
                    cmd("eop", EOP, v + 1),
                    lcmd("gMASK", GMASK, v + 2),
                    lcmd("sMASK", SMASK, v + 3),
                ]
            }
            Layout::Sp | Layout::SpFixed => {
                let n = base;
                let mut c = vec![
                    cmd("pad", EOT, n),
                    cmd("eos", EOT, n),
                    cmd("sep", SEP, n + 1),
                    cmd("ENC", CLS, n + 2),
                    lcmd("MASK", MASK, n + 3),
                    cmd("unk", UNK, n + 4),
                    cmd("sop", SOP, n + 6),
                    cmd("eop", EOP, n + 7),
                ];
                if layout == Layout::SpFixed {
                    c.extend([lcmd("sMASK", SMASK, n + 8), lcmd("gMASK", GMASK, n + 9)]);
                } else {
                    c.extend([lcmd("gMASK", GMASK, n + 7), lcmd("sMASK", SMASK, n + 8)]);
                }
                c
            }
        };
        Self::finish(inner, GlmBlock { tokenizer_type: spec.kind, layout, command_tokens: commands, text_unk })
    }

    /// Computes the derived tables.
    fn finish(mut inner: Tokenizer, block: GlmBlock) -> Result<Self> {
        // a given tokenizer.json's truncation or padding would cut or pad documents
        inner.with_truncation(None).map_err(|e| Error::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        let special = SpecialIds::from_commands(&block.command_tokens)?;
        let text_ids = text_ids(&inner);
        let vocab_size = block.command_tokens.iter().map(|c| c.id as usize + 1).max().unwrap_or(0).max(text_ids);
        // each text once, with its id (the original's map keeps the last)
        let mut matched: Vec<(String, u32, bool)> = Vec::new();
        for c in &block.command_tokens {
            matched.retain(|(t, ..)| *t != c.token);
            matched.push((c.token.clone(), c.id, c.lstrip));
        }
        matched.sort_by_key(|(t, ..)| std::cmp::Reverse(t.len()));
        // before the table, the command tokens were added to the text model
        let legacy_sha256 = if block.layout == Layout::Bert {
            let mut legacy = inner.clone();
            for t in [PAD, UNK, CLS, SEP, MASK, SOP, EOP, GMASK, SMASK, EOT] {
                legacy.add_special_tokens(&[AddedToken::from(t, true)]);
            }
            let ids: Vec<Option<u32>> = [PAD, UNK, CLS, SEP, MASK, SOP, EOP, GMASK, SMASK, EOT].iter().map(|t| legacy.token_to_id(t)).collect();
            let same = ids == special.all().map(Some);
            if same {
                Some(hex(&Sha256::digest(legacy.to_string(false).map_err(|e| Error::Tokenizer(e.to_string()))?.as_bytes())))
            } else {
                None
            }
        } else {
            None
        };
        let mut t = GlmTokenizer { inner, block, special, sha256: String::new(), legacy_sha256, vocab_size, text_ids, matched, sentence_end: Vec::new() };
        t.sha256 = hex(&Sha256::digest(t.json(false)?.as_bytes()));
        t.sentence_end = (0..vocab_size as u32).map(|id| !special.is_structural(id) && t.piece_text(id).is_some_and(|p| p.contains(SENTENCE_END))).collect();
        Ok(t)
    }

    /// Whether `sha256` (a store's or checkpoint's record) names this
    /// tokenizer: its hash, or for WordPiece the hash earlier builds gave it.
    pub fn answers_to(&self, sha256: &str) -> bool {
        self.sha256 == sha256 || self.legacy_sha256.as_deref() == Some(sha256)
    }

    /// The tokenizer's type, as configs.json's `tokenizer_type` names it.
    pub fn tokenizer_type(&self) -> TokenizerType {
        self.block.tokenizer_type
    }

    /// The command tokens, in the original's order.
    pub fn command_tokens(&self) -> &[CommandToken] {
        &self.block.command_tokens
    }

    /// The id text the model cannot cover becomes (`None`: it covers all).
    pub fn text_unk(&self) -> Option<u32> {
        self.block.text_unk
    }

    /// Number of token ids (text pieces plus command tokens).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `sentence_end[id]`: the token contains a sentence-ending character.
    pub fn sentence_end_table(&self) -> &[bool] {
        &self.sentence_end
    }

    /// The text a token stands for (a WordPiece or SentencePiece piece as
    /// written; a byte-level piece decoded), for tables.
    fn piece_text(&self, id: u32) -> Option<String> {
        match self.block.tokenizer_type {
            TokenizerType::Gpt2Bpe if self.command(id).is_none() => self.inner.decode(&[id], false).ok(),
            _ => self.id_to_token(id),
        }
    }

    /// `text` cut at the command tokens it holds, as the original cuts it:
    /// text pieces (whitespace before an `lstrip` command dropped) and ids.
    fn split<'a>(&self, text: &'a str, out: &mut Vec<Piece<'a>>) {
        if self.block.tokenizer_type != TokenizerType::WordPiece && text.trim().is_empty() {
            return; // the original encodes blank text as nothing
        }
        let mut start = 0;
        let mut i = 0;
        let bytes = text.as_bytes();
        while i < bytes.len() {
            if matches!(bytes[i], b'[' | b'<') {
                if let Some((t, id, lstrip)) = self.matched.iter().find(|(t, ..)| text[i..].starts_with(t.as_str())) {
                    let before = if *lstrip { text[start..i].trim_end() } else { &text[start..i] };
                    if !before.is_empty() {
                        self.push_text(before, out);
                    }
                    out.push(Piece::Id(*id));
                    i += t.len();
                    start = i;
                    continue;
                }
            }
            i += 1;
        }
        if start < text.len() {
            self.push_text(&text[start..], out);
        }
    }

    /// A run of text between command tokens. WordPiece's long runs are cut
    /// after whitespace into runs of about `WORDPIECE_RUN` bytes: its
    /// normaliser works character by character and its pre-tokenizer splits
    /// at whitespace, so the ids are the same, and the library's working
    /// memory (some 150 bytes per byte of text) stays that of one run
    /// however long a document is.
    fn push_text<'a>(&self, text: &'a str, out: &mut Vec<Piece<'a>>) {
        let mut rest = text;
        if self.block.tokenizer_type == TokenizerType::WordPiece {
            while rest.len() > 2 * WORDPIECE_RUN {
                let b = rest.as_bytes();
                // the first whitespace byte at or after WORDPIECE_RUN (ASCII: never inside a character)
                let Some(i) = b[WORDPIECE_RUN..].iter().position(|c| matches!(c, b' ' | b'\n' | b'\t' | b'\r')) else { break };
                let cut = WORDPIECE_RUN + i + 1;
                out.push(Piece::Text(&rest[..cut]));
                rest = &rest[cut..];
            }
        }
        out.push(Piece::Text(rest));
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_batch(vec![text.to_string()])?.pop().unwrap_or_default())
    }

    /// Appends the ids of `text` to `out`, on this thread alone (no thread
    /// pool): for callers that run one encoder per core themselves, as
    /// `prepare`'s workers do. The same ids as `encode_batch`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        let mut pieces = Vec::new();
        self.split(text, &mut pieces);
        for p in pieces {
            match p {
                Piece::Id(id) => out.push(id),
                Piece::Text(t) => self.text_ids(t, out)?,
            }
        }
        Ok(())
    }

    /// The text model's ids of `text`, appended to `out`: the steps of the
    /// library's `encode_fast` (added tokens, normaliser, pre-tokenizer,
    /// model) without building an `Encoding` (tokens, offsets, masks: half
    /// of the allocations), which a store does not keep. A post-processor
    /// adds nothing without special tokens; a model file that asks for
    /// truncation or padding goes the library's whole way.
    fn text_ids(&self, text: &str, out: &mut Vec<u32>) -> Result<()> {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizer};
        let err = |e: tokenizers::Error| Error::Tokenizer(e.to_string());
        if self.inner.get_truncation().is_some() || self.inner.get_padding().is_some() {
            out.extend_from_slice(self.inner.encode_fast(text, false).map_err(err)?.get_ids());
            return Ok(());
        }
        let mut pre = self.inner.get_added_vocabulary().extract_and_normalize(self.inner.get_normalizer(), text);
        if let Some(p) = self.inner.get_pre_tokenizer() {
            p.pre_tokenize(&mut pre).map_err(err)?;
        }
        let model = self.inner.get_model();
        pre.tokenize(|n| tokenizers::Model::tokenize(model, n.get())).map_err(err)?;
        for (_, _, tokens) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
            out.extend(tokens.iter().flatten().map(|t| t.id));
        }
        Ok(())
    }

    /// Encodes many texts on all cores (rayon, inside `tokenizers`).
    pub fn encode_batch(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>> {
        let mut pieces = Vec::new();
        let mut ends = Vec::with_capacity(texts.len());
        for t in &texts {
            self.split(t, &mut pieces);
            ends.push(pieces.len());
        }
        let runs: Vec<&str> = pieces.iter().filter_map(|p| if let Piece::Text(t) = p { Some(*t) } else { None }).collect();
        let encs = self.inner.encode_batch_fast(runs, false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut encs = encs.into_iter();
        let mut out = Vec::with_capacity(texts.len());
        let mut from = 0;
        for end in ends {
            let mut ids = Vec::new();
            for p in &pieces[from..end] {
                match p {
                    Piece::Id(id) => ids.push(*id),
                    Piece::Text(_) => ids.extend_from_slice(encs.next().expect("one encoding per text piece").get_ids()),
                }
            }
            out.push(ids);
            from = end;
        }
        Ok(out)
    }

    /// The command token of `id`: the last of those sharing it, as the
    /// original's id map keeps (SentencePiece's unfixed `[gMASK]`, not
    /// `<|endofpiece|>`; RoBERTa's `[SEP]` for `</s>`).
    fn command(&self, id: u32) -> Option<&CommandToken> {
        self.block.command_tokens.iter().rev().find(|c| c.id == id)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match self.command(id) {
            Some(c) => Some(c.token.clone()),
            None => self.inner.id_to_token(id),
        }
    }

    fn is_command(&self, id: u32) -> bool {
        self.block.command_tokens.iter().any(|c| c.id == id)
    }

    /// Turns ids back into text; `skip_special` leaves out command tokens
    /// other than [UNK]. WordPiece: `##` pieces are glued to their word,
    /// CJK characters and punctuation are joined without spaces, and a space
    /// is put only between two pieces of space-separated scripts. The other
    /// types: the text model's decoder, command tokens as their text (as
    /// the original's `DecodeIds`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let skip = |id: u32| skip_special && self.is_command(id) && id != self.special.unk;
        if self.block.tokenizer_type != TokenizerType::WordPiece {
            let mut out = String::new();
            let mut run: Vec<u32> = Vec::new();
            let flush = |run: &mut Vec<u32>, out: &mut String| {
                if !run.is_empty() {
                    out.push_str(&self.inner.decode(run, false).unwrap_or_default());
                    run.clear();
                }
            };
            for &id in ids {
                if skip(id) {
                    continue;
                }
                if self.is_command(id) {
                    flush(&mut run, &mut out);
                    out.push_str(&self.id_to_token(id).unwrap_or_default());
                } else if (id as usize) < self.text_ids {
                    run.push(id);
                }
            }
            flush(&mut run, &mut out);
            return out;
        }
        let mut out = String::new();
        for &id in ids {
            if skip(id) {
                continue;
            }
            let Some(tok) = self.id_to_token(id) else { continue };
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

    /// The tokenizer as `tokenizer.json` text (the `tokenizers` library's
    /// format, plus the command tokens under `glm`).
    pub fn to_json(&self) -> Result<String> {
        self.json(true)
    }

    fn json(&self, pretty: bool) -> Result<String> {
        let err = |e: &dyn std::fmt::Display| Error::Tokenizer(e.to_string());
        let mut v: serde_json::Value = serde_json::from_str(&self.inner.to_string(false).map_err(|e| err(&e))?).map_err(|e| err(&e))?;
        if let Some(m) = v.as_object_mut() {
            m.insert("glm".into(), serde_json::to_value(&self.block).map_err(|e| err(&e))?);
        }
        if pretty { serde_json::to_string_pretty(&v) } else { serde_json::to_string(&v) }.map_err(|e| err(&e))
    }
}

/// The text model's ids: one past the highest (a vocabulary may skip ids).
fn text_ids(inner: &Tokenizer) -> usize {
    inner.get_vocab(true).values().max().map_or(0, |&m| m as usize + 1)
}

/// WordPiece encodes runs of text of about this many bytes (see `push_text`).
const WORDPIECE_RUN: usize = 128 << 10;

/// A piece of raw text between command tokens, or a command token's id.
enum Piece<'a> {
    Text(&'a str),
    Id(u32),
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

/// Vocabulary size of the model's embedding: `vocab` rounded up to a
/// multiple of `divisible_by`, as the original pads
/// (`make_vocab_size_divisible_by`), and of `tensor_parallel` too, which
/// the rows must split into: the least common multiple of the two (the
/// same as the original's whenever `tensor_parallel` divides
/// `divisible_by`, e.g. 128 on 1-128 ranks; the original fails otherwise).
pub fn padded_vocab_size(vocab: usize, divisible_by: usize, tensor_parallel: usize) -> usize {
    let (a, b) = (divisible_by.max(1), tensor_parallel.max(1));
    let gcd = |mut x: usize, mut y: usize| {
        while y != 0 {
            (x, y) = (y, x % y);
        }
        x
    };
    let m = a / gcd(a, b) * b;
    vocab.div_ceil(m) * m
}

/// The `make_vocab_size_divisible_by` with which a run on `tp`
/// tensor-parallel ranks pads a tokenizer of `vocab` ids to a checkpoint's
/// `padded` vocabulary: `None` when `divisible_by` already does, or when
/// no setting can. The largest power of two that fits comes first, then any.
pub fn divisible_by_for(vocab: usize, padded: usize, divisible_by: usize, tp: usize) -> Option<usize> {
    let fits = |d: usize| d > 0 && padded_vocab_size(vocab, d, tp) == padded;
    if fits(divisible_by) {
        return None;
    }
    (0..usize::BITS).rev().map(|k| 1usize << k).find(|&d| d <= padded && fits(d)).or_else(|| (1..=padded).find(|&d| fits(d)))
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
        let wp = |model_type: &str| GlmTokenizer::load(&p, &TokenizerSpec::new(TokenizerType::WordPiece, model_type, false)).unwrap();
        let (cased, uncased) = (wp("bert-base-cased"), wp("bert-large-uncased"));
        assert_eq!(cased.encode("Hello École").unwrap(), [5, 7]);
        assert_eq!(uncased.encode("Hello École").unwrap(), [6, 8]);
        assert_eq!(GlmTokenizer::load(&p, &TokenizerSpec::default()).unwrap().encode("Hello").unwrap(), [6], "uncased by default, as bert-base-uncased");
        assert_ne!(cased.sha256, uncased.sha256, "stores built with the two never mix");
    }

    #[test]
    fn the_padding_setting_that_loads_a_checkpoint() {
        // 16000 ids padded by 128 load on any power-of-two ranks unchanged
        assert_eq!(divisible_by_for(16000, 16000, 128, 2), None);
        assert_eq!(divisible_by_for(16000, 16000, 128, 8), None);
        // 16001 ids padded by 64 (16064): a run padding by 128 needs 64
        assert_eq!(divisible_by_for(16001, 16064, 128, 2), Some(64));
        assert_eq!(padded_vocab_size(16001, 64, 2), 16064);
        // no setting pads 16000 ids to an odd 16001 on two ranks
        assert_eq!(divisible_by_for(16000, 16001, 128, 2), None);
    }

    /// As the original pads (a multiple of make_vocab_size_divisible_by),
    /// and a multiple of the tensor-parallel size as well.
    #[test]
    fn padding_rounds_up_to_multiple() {
        assert_eq!(padded_vocab_size(21133, 128, 1), 21248);
        assert_eq!(padded_vocab_size(21133, 128, 2), 21248);
        assert_eq!(padded_vocab_size(21133, 128, 8), 21248);
        assert_eq!(padded_vocab_size(21248, 128, 1), 21248);
        assert_eq!(padded_vocab_size(100, 128, 4), 128);
        // 3 ranks: a multiple of 384 (the original would fail: 21248 rows do not split in 3)
        assert_eq!(padded_vocab_size(21133, 128, 3), 21504);
    }

    #[test]
    fn trained_tokenizer_has_command_tokens_first_and_round_trips() {
        let texts = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "Hello world, hello GLM."];
        let tok = GlmTokenizer::train(texts.iter().map(|s| s.to_string()).cycle().take(30), 200, false, &TokenizerSpec::default()).unwrap();
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

    /// WordPiece cuts a long run of text after whitespace: the ids are the
    /// library's for the whole run.
    #[test]
    fn long_wordpiece_runs_are_cut_without_changing_ids() {
        let vocab = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/seed/vocab.txt");
        for model_type in ["bert-base-uncased", "bert-base-chinese"] {
            let tok = GlmTokenizer::load(&vocab, &TokenizerSpec::new(TokenizerType::WordPiece, model_type, false)).unwrap();
            let unit = "床前明月光，疑是地上霜。\tHello Wörld, ÉCOLE naïve café!\r\nΣΑΣ ΟΔΟΣ 123.45\u{3000}長い文章です。 x\u{301}y  \n\n";
            let text = unit.repeat(2 * WORDPIECE_RUN / unit.len() + 50);
            let mut pieces = Vec::new();
            tok.split(&text, &mut pieces);
            assert!(pieces.len() >= 2, "cut into runs");
            let whole = tok.inner.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
            let mut ours = Vec::new();
            tok.encode_into(&text, &mut ours).unwrap();
            assert_eq!(ours, whole, "{model_type}");
            assert_eq!(tok.encode_batch(vec![text.clone()]).unwrap()[0], whole, "{model_type}");
        }
    }
}
