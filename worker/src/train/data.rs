//! A run's data: the tokenizer, the token stores of `train_data` (one
//! corpus, or each corpus of a mixture) and `valid_data`, the split of their
//! documents, and the samplers training and validation read.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::run::{files_of, RunConfig};
use crate::data::blocklm::BlockSampler;
use crate::data::mixture::{component_seed, component_store, Source, TrainData};
use crate::data::prepare::{beside_store, corpus_name, ensure_store, obtain_tokenizer, PrepareOptions, StoreOutcome, TokenizerOption};
use crate::data::split::{split_documents, DocumentSplit};
use crate::data::store::{StoreMeta, TokenStore};
use crate::data::tokenizer::{GlmTokenizer, TokenizerSpec};
use crate::error::{Error, Result};
use crate::parallel::Parallel;

/// The seed offset of the validation split's sample stream.
pub const VALID_SEED: u64 = 0x00E7_A100;

/// A validation set: the valid split of one corpus (or `valid_data`).
pub struct ValidSet {
    pub name: String,
    pub sampler: BlockSampler,
    /// Its weight in the mixture's validation figure (1 alone).
    pub weight: f64,
}

/// What training reads.
pub struct RunData {
    pub tok: GlmTokenizer,
    pub train: Source,
    /// Empty: nothing validates.
    pub valid: Vec<ValidSet>,
    /// Tokens of each training corpus's train-split documents (one entry per
    /// `train.parts`), for epochs.
    pub train_tokens: Vec<u64>,
}

/// A corpus of the run as training prepares it.
struct Corpus {
    name: String,
    files: Vec<PathBuf>,
    store: PathBuf,
    popts: PrepareOptions,
    weight: f64,
}

/// Prepares (rank 0 first) and opens the run's data: the store at `store`
/// (a mixture's corpora beside it), prepared with `prepare`.
pub fn prepare(cfg: &RunConfig, store: &Path, prepare: &PrepareOptions, par: &Parallel) -> Result<RunData> {
    let a = &cfg.args.args;
    let mut base = prepare.clone();
    base.corpus.text_key = a.text_key.clone();
    base.tokenizer_option = TokenizerOption::ConfigKey;
    base.spec = Some(TokenizerSpec::from_args(a)?);
    let corpora: Vec<Corpus> = match &cfg.train_data {
        TrainData::Corpus(c) => {
            let mut popts = base.clone();
            popts.corpus.reader = c.reader;
            vec![Corpus { name: "train_data".into(), files: files_of("train_data", &c.roots)?, store: store.to_path_buf(), popts, weight: 1.0 }]
        }
        TrainData::Mixture(m) => m
            .iter()
            .enumerate()
            .map(|(k, c)| {
                let mut popts = base.clone();
                popts.corpus.reader = c.spec.reader;
                Ok(Corpus {
                    name: c.name.clone(),
                    files: files_of("train_data", &c.spec.roots)?,
                    store: component_store(store, k, &c.name),
                    popts,
                    weight: c.weight,
                })
            })
            .collect::<Result<_>>()?,
    };
    // valid_data validates from a store of its own; test_data is checked
    // here, evaluated by `glm-worker eval --split test`
    let valid_files = cfg.valid_data.as_ref().map(|v| files_of("valid_data", &v.roots)).transpose()?;
    if let Some(t) = &cfg.test_data {
        files_of("test_data", &t.roots)?;
    }
    let valid_store = beside_store(store, "valid");
    let mut valid_popts = base.clone();
    if let Some(v) = &cfg.valid_data {
        valid_popts.corpus.reader = v.reader;
        valid_popts.corpus.text_key = a.eval_text_key.clone().unwrap_or_else(|| a.text_key.clone());
        valid_popts.spec = prepare.spec;
        valid_popts.tokenizer_option = prepare.tokenizer_option;
    }
    // a trained tokenizer learns from every corpus's files, read by one reader
    let all_files: Vec<PathBuf> = corpora.iter().flat_map(|c| c.files.iter().cloned()).collect();
    if a.tokenizer_path.is_none() && corpora.windows(2).any(|w| w[0].popts.corpus.reader != w[1].popts.corpus.reader) {
        return Err(Error::Config(
            "train_data: a mixture of corpora read by different readers (wudao: and not) cannot train one tokenizer on them: give tokenizer_path (e.g. one prepared with glm-worker prepare on either corpus)".into(),
        ));
    }
    // Rank 0 trains the tokenizer and builds the stores; the others wait,
    // then find them up to date. (Two ranks training tokenizers at once
    // could end with different token ids: training is not deterministic.)
    // Several nodes need the stores on a shared filesystem.
    let (tok, built, valid_built) = par.main_first("preparing the data", || {
        let (tok, origin) = obtain_tokenizer(&all_files, a.tokenizer_path.as_deref(), &corpora[0].store, &corpora[0].popts)?;
        println!("data: tokenizer {origin}: {} ids", tok.vocab_size());
        let built = corpora.iter().map(|c| ensure_store(&c.files, &tok, &c.store, &c.popts, &|_| {})).collect::<Result<Vec<_>>>()?;
        let valid = match &valid_files {
            Some(vf) => Some(ensure_store(vf, &tok, &valid_store, &valid_popts, &|_| {})?),
            None => None,
        };
        Ok((tok, built, valid))
    })?;
    for (c, (meta, outcome)) in corpora.iter().zip(built) {
        let what = if corpora.len() == 1 { "store".to_string() } else { format!("store of {} ({:.1}%)", c.name, c.weight * 100.0) };
        report_store(&what, &c.store, &c.files, &meta, outcome);
        if let Some(w) = meta.unknown_warning(TokenizerOption::ConfigKey) {
            println!("warning: {}{w}", if corpora.len() == 1 { String::new() } else { format!("{}: ", c.name) });
        }
    }
    if let (Some((vmeta, voutcome)), Some(vf)) = (valid_built, &valid_files) {
        report_store("valid_data store", &valid_store, vf, &vmeta, voutcome);
    }
    let sentence_end = tok.sentence_end_table().to_vec();
    let mixture = corpora.len() > 1;
    let mut trains = Vec::new();
    let mut valid = Vec::new();
    let mut train_tokens = Vec::new();
    let mut test_docs = Vec::new();
    let mut any_split = false;
    for (k, c) in corpora.iter().enumerate() {
        // the store opened is the one this run's tokenizer built (another
        // process may have rebuilt it since it was checked)
        let store = Arc::new(TokenStore::open_for(&c.store, &tok, "this run's")?);
        let split = split_documents(store.num_docs(), &cfg.split, if mixture { None } else { a.load_splits.as_deref() })?;
        any_split |= split.order.is_some();
        if par.is_main() && !mixture {
            save_splits(a, &split)?;
        }
        let splits = &split.parts;
        let of = if mixture { format!(" of train_data's {}", c.name) } else { String::new() };
        if splits[0].is_empty() {
            return Err(Error::Config(format!(
                "split \"{}\" ({}): the train split{of} of {} documents is empty",
                a.split,
                cfg.args.source("split"),
                store.num_docs()
            )));
        }
        let mut block = cfg.block.clone();
        if mixture {
            block.seed = component_seed(block.seed, k);
        }
        let mut vb = block.clone();
        vb.seed ^= VALID_SEED;
        train_tokens.push(splits[0].iter().map(|&d| store.doc_len(d as usize) as u64).sum());
        trains.push((c.name.clone(), BlockSampler::new(store.clone(), splits[0].clone(), block, sentence_end.clone())?, c.weight));
        if valid_files.is_none() {
            match splits.get(1).filter(|v| !v.is_empty()) {
                Some(v) => valid.push(ValidSet {
                    name: c.name.clone(),
                    sampler: BlockSampler::new(store.clone(), v.clone(), vb, sentence_end.clone())?,
                    weight: c.weight,
                }),
                None if mixture && crate::data::split::should_split(&cfg.split) => {
                    println!("data: {}: its valid split is empty (too few documents), so it is not validated", c.name)
                }
                None => {}
            }
        }
        test_docs.extend(splits[2].iter().map(|&d| (store.clone(), d)));
        println!("data: split {}{of}: {}", a.split, split_line(cfg, splits));
    }
    if par.is_main() && any_split {
        save_test_data(a, &test_docs, &tok)?;
    }
    if valid_files.is_some() {
        // the original's eval datasets are not split: every document, in order
        let vstore = Arc::new(TokenStore::open_for(&valid_store, &tok, "this run's")?);
        let docs = (0..vstore.num_docs() as u32).collect();
        println!("data: valid_data: {} documents validate ({})", vstore.num_docs(), valid_store.display());
        let mut vb = cfg.block.clone();
        vb.seed ^= VALID_SEED;
        valid.push(ValidSet { name: "valid_data".into(), sampler: BlockSampler::new(vstore, docs, vb, sentence_end)?, weight: 1.0 });
    }
    let train = if mixture {
        Source::mixture(trains, cfg.block.clone())
    } else {
        let (name, s, _) = trains.pop().expect("one corpus");
        Source::single(&name, s)
    };
    Ok(RunData { tok, train, valid, train_tokens })
}

/// "train 18 documents, valid 1 documents (...), test ...".
fn split_line(cfg: &RunConfig, splits: &[Vec<u32>; 3]) -> String {
    splits
        .iter()
        .zip(["train", "valid", "test"])
        .map(|(s, n)| {
            let instead = match n {
                "valid" if cfg.valid_data.is_some() => " (valid_data validates)",
                "test" if cfg.test_data.is_some() => " (test_data is the test set: glm-worker eval --split test)",
                _ => "",
            };
            format!("{n} {} documents{instead}", s.len())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The line about a store that training built or reused.
fn report_store(what: &str, dir: &Path, files: &[PathBuf], meta: &StoreMeta, outcome: StoreOutcome) {
    let mut unk = meta.unknown_share().map(|u| format!(", {:.2}% [UNK]", u * 100.0)).unwrap_or_default();
    if meta.reader == crate::data::corpus::Reader::WuDao {
        unk.push_str(&format!("; WuDao reader: {} records of at most {} characters dropped", meta.short_records, crate::data::corpus::WUDAO_MIN_CHARS));
    }
    match outcome {
        StoreOutcome::Reused => println!("data: {what} {} ({} documents, {} tokens{unk})", dir.display(), meta.documents, meta.tokens),
        StoreOutcome::Built { report, reason } => println!(
            "data: built {what} {} from {}{} ({} documents, {} tokens{unk}, {:.1} s)",
            dir.display(),
            corpus_name(files).display(),
            reason.map(|r| format!(" ({r})")).unwrap_or_default(),
            meta.documents,
            meta.tokens,
            report.seconds
        ),
    }
}

/// What save_splits asks for (rank 0): the split's index order as `.npy`,
/// as the original writes it, and only when the documents are split and the
/// order was not loaded.
fn save_splits(a: &crate::config::args::Args, split: &DocumentSplit) -> Result<()> {
    let Some(order) = &split.order else { return Ok(()) };
    if let (Some(p), None) = (&a.save_splits, &a.load_splits) {
        let written = crate::data::split::save_npy(p, order)?;
        println!("data: save_splits: the split's index order ({} documents) written to {}", order.len(), written.display());
    }
    Ok(())
}

/// What save_test_data asks for (rank 0): the test split's documents decoded
/// one a line, as the original writes them (a mixture: every corpus's, in
/// train_data's order); called when the documents are split.
fn save_test_data(a: &crate::config::args::Args, docs: &[(Arc<TokenStore>, u32)], tok: &GlmTokenizer) -> Result<()> {
    let Some(p) = &a.save_test_data else { return Ok(()) };
    let mut text = String::new();
    for (store, d) in docs {
        text.push_str(&tok.decode(&store.doc(*d as usize), false));
        text.push('\n');
    }
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
    println!("data: save_test_data: {} test documents written to {}", docs.len(), p.display());
    Ok(())
}
