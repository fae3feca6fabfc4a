//! `glm-worker eval`: a checkpoint's loss, perplexity and masked-token
//! accuracy on held-out data, without training — per blank-infilling mode
//! (span, sentence, generation) and mixed as training mixes them.
//!
//! Everything the run decided comes from the checkpoint (`state.json`: its
//! configs.json, DeepSpeed config and model; `tokenizer.json`): the split of
//! the corpus (`split`, `load_splits`), or the run's `valid_data` /
//! `test_data` whole (from the stores `<store>-valid` / `<store>-test`), the
//! sample construction, the evaluation batch (`eval_batch_size`, else the
//! micro-batch) and `eval_iters`. So the mixed line on the `valid` split
//! reproduces the validation loss the run logged at that iteration. `--data`
//! evaluates another corpus, split with the same `split`. Under mpirun the
//! batches are shared out over the ranks, as in training.
//!
//! Averages are token-weighted: the summed cross entropy of every masked
//! token over their count (the original GLM averages per-batch means, which
//! weighs tokens of small batches more).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::Device;

use crate::checkpoint;
use crate::config::args::Args;
use crate::config::ds::DsConfig;
use crate::config::run::{block_config, corpus_spec, files_of, train_data_of};
use crate::data::blocklm::{BlockSampler, Mode};
use crate::data::corpus::{parse_entry, CorpusOptions, CorpusSpec};
use crate::data::mixture::{component_seed, component_store, weighted_mean, TrainData};
use crate::data::prepare::{beside_store, ensure_store, PrepareOptions, StoreGuard};
use crate::data::split::{get_split, split_documents};
use crate::data::store::TokenStore;
use crate::data::tokenizer::GlmTokenizer;
use crate::error::{Error, Result};
use crate::parallel::Parallel;
use crate::train::trainer::{held_out, VALID_SEED};

/// Which held-out documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Valid,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "valid" | "validation" => Some(Split::Valid),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
}

pub struct EvalOptions {
    pub load: PathBuf,
    /// Another corpus than the run's `train_data`.
    pub data: Option<PathBuf>,
    pub split: Split,
    pub iters: Option<u64>,
    pub batch: Option<usize>,
    /// The token store (built when missing, reused when it matches).
    pub store: PathBuf,
    /// Replace a store built for another corpus or tokenizer (else refused).
    pub rebuild: bool,
    pub device: Device,
}

/// One line of the result.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeResult {
    pub mode: &'static str,
    pub loss: f64,
    pub ppl: f64,
    pub accuracy: f64,
    pub tokens: u64,
}

/// What was evaluated, for the report.
pub struct Evaluated {
    pub checkpoint: PathBuf,
    pub iteration: u64,
    pub documents: usize,
    pub batches: u64,
    pub batch: usize,
    /// Per mode; a mixture's: the weighted mean of its corpora's.
    pub results: Vec<ModeResult>,
    /// A mixture's corpora, each evaluated on its own split (empty: one corpus).
    pub corpora: Vec<EvaluatedCorpus>,
}

/// One corpus of a mixture, evaluated.
pub struct EvaluatedCorpus {
    pub name: String,
    /// Its weight in the mixture (normalised).
    pub weight: f64,
    pub documents: usize,
    pub results: Vec<ModeResult>,
}

/// Evaluates `opts.load` (a whole-model checkpoint) over the world `par`.
pub fn evaluate(opts: &EvalOptions, par: &Parallel) -> Result<Evaluated> {
    let (model, state, dir) = checkpoint::load_for_inference(&opts.load, opts.device, "eval")?;
    let args: Args = serde_json::from_value(state.args.clone()).map_err(|e| Error::invalid(dir.join("state.json"), format!("args: {e}")))?;
    let tok = GlmTokenizer::load_saved(&dir.join("tokenizer.json"))?;
    if !tok.answers_to(&state.tokenizer_sha256) {
        return Err(Error::invalid(dir.join("tokenizer.json"), "is not the tokenizer the checkpoint was trained with (its hash differs from state.json's)"));
    }
    let (name, index, own) = match opts.split {
        Split::Valid => ("valid", 1, args.valid_data.as_deref()),
        Split::Test => ("test", 2, args.test_data.as_deref()),
    };
    // the run's valid_data / test_data: all their documents, from a store of their own
    let key = if index == 1 { "valid_data" } else { "test_data" };
    let own = own.filter(|_| opts.data.is_none()).map(|v| corpus_spec(key, v)).transpose()?;
    // what to evaluate: the run's valid_data / test_data, --data, or the
    // run's train_data (each corpus of a mixture, with its own store and seed)
    let base_seed = block_config(&args).seed;
    let targets: Vec<Target> = match (&own, &opts.data) {
        (Some(c), _) => vec![Target { name: key.into(), weight: 1.0, key, corpus: c.clone(), store: beside_store(&opts.store, name), seed: base_seed }],
        (None, Some(d)) => {
            let (root, reader) = parse_entry(&d.to_string_lossy());
            vec![Target {
                name: "--data".into(),
                weight: 1.0,
                key: "--data",
                corpus: CorpusSpec { roots: vec![root], reader },
                store: opts.store.clone(),
                seed: base_seed,
            }]
        }
        (None, None) => match train_data_of(&args)? {
            TrainData::Corpus(c) => {
                vec![Target { name: "train_data".into(), weight: 1.0, key: "train_data", corpus: c, store: opts.store.clone(), seed: base_seed }]
            }
            TrainData::Mixture(m) => m
                .into_iter()
                .enumerate()
                .map(|(k, c)| Target {
                    store: component_store(&opts.store, k, &c.name),
                    name: c.name,
                    weight: c.weight,
                    key: "train_data",
                    corpus: c.spec,
                    seed: component_seed(base_seed, k),
                })
                .collect(),
        },
    };
    let ds = DsConfig::from_value(&dir.join("state.json"), &state.deepspeed_config)?;
    let batch = opts.batch.or(args.eval_batch_size).or(ds.micro_batch).unwrap_or(args.batch_size);
    let iters = opts.iters.unwrap_or(args.eval_iters).max(1);
    if batch == 0 {
        return Err(Error::Config("--batch-size 0: must be positive".into()));
    }
    let mut parts = Vec::new();
    for t in &targets {
        let Some(sampler) = target_sampler(t, opts, par, &args, &tok, own.is_some(), index, name, targets.len() > 1)? else {
            println!("eval: {}: its {name} split is empty (too few documents), so it is not evaluated", t.name);
            continue;
        };
        let mut results = Vec::new();
        for (label, mode) in [("mixed", None), ("span", Some(Mode::Span)), ("sentence", Some(Mode::Sentence)), ("generation", Some(Mode::Generation))] {
            let h = held_out(&model, &sampler.0, mode, iters, batch, opts.device, par)?;
            results.push(ModeResult { mode: label, loss: h.loss, ppl: h.loss.exp(), accuracy: h.accuracy, tokens: h.tokens });
        }
        parts.push(EvaluatedCorpus { name: t.name.clone(), weight: t.weight, documents: sampler.1, results });
    }
    if parts.is_empty() {
        return Err(Error::Config(format!(
            "the {name} split of every corpus of train_data is empty (split \"{}\"): evaluate another split, or a corpus with --data",
            args.split
        )));
    }
    // a mixture's figure: the weighted mean of its corpora's, per mode
    let total: f64 = parts.iter().map(|p| p.weight).sum();
    for p in &mut parts {
        p.weight /= total;
    }
    let results = if parts.len() == 1 {
        parts[0].results.clone()
    } else {
        (0..parts[0].results.len())
            .map(|i| {
                let mean = |f: &dyn Fn(&ModeResult) -> f64| weighted_mean(parts.iter().map(|p| (p.weight, f(&p.results[i]))));
                let loss = mean(&|r| r.loss);
                ModeResult {
                    mode: parts[0].results[i].mode,
                    loss,
                    ppl: loss.exp(),
                    accuracy: mean(&|r| r.accuracy),
                    tokens: parts.iter().map(|p| p.results[i].tokens).sum(),
                }
            })
            .collect()
    };
    let documents = parts.iter().map(|p| p.documents).sum();
    if parts.len() == 1 {
        parts.clear();
    }
    Ok(Evaluated { checkpoint: dir, iteration: state.iteration, documents, batches: iters, batch, results, corpora: parts })
}

/// A corpus to evaluate, with its store and the sample seed training gave it.
struct Target {
    name: String,
    weight: f64,
    /// How messages name where it came from (train_data, valid_data, --data).
    key: &'static str,
    corpus: CorpusSpec,
    store: PathBuf,
    seed: u64,
}

/// The held-out sampler of `t` (and its document count): its store built or
/// reused, its documents split as the run split them. An empty split is an
/// error, or `None` for a corpus of a mixture (`in_mixture`: training did
/// not validate it either).
#[allow(clippy::too_many_arguments)]
fn target_sampler(
    t: &Target,
    opts: &EvalOptions,
    par: &Parallel,
    args: &Args,
    tok: &GlmTokenizer,
    own: bool,
    index: usize,
    name: &str,
    in_mixture: bool,
) -> Result<Option<(BlockSampler, usize)>> {
    let (key, corpus, store_dir) = (t.key, &t.corpus, &t.store);
    let (roots, files) = (&corpus.roots, files_of(key, &corpus.roots)?);
    let popts = PrepareOptions {
        // the run's own evaluation corpora read eval_text_key, as the original's
        corpus: CorpusOptions {
            text_key: if own { args.eval_text_key.clone().unwrap_or_else(|| args.text_key.clone()) } else { args.text_key.clone() },
            reader: corpus.reader,
            ..CorpusOptions::default()
        },
        // eval builds a missing store and refreshes its own, but replaces one
        // built for another corpus or tokenizer only when told to
        guard: (!opts.rebuild).then_some(StoreGuard { command: "eval", store_option: "--store", rebuild_flag: "--rebuild" }),
        ..PrepareOptions::default()
    };
    // rank 0 builds or refreshes the store; the others find it ready
    let (meta, _) = par.main_first("preparing the data", || ensure_store(&files, tok, store_dir, &popts, &|_| {}))?;
    let store = Arc::new(TokenStore::open_for(store_dir, tok, "the checkpoint's")?);
    let docs = if own {
        (0..store.num_docs() as u32).collect()
    } else {
        let shares = get_split(&args.split, args.valid_data.is_some(), args.test_data.is_some())?;
        // the run's own order (load_splits) applies to the run's own corpus
        let load_splits = args.load_splits.as_deref().filter(|_| opts.data.is_none());
        let docs = split_documents(store.num_docs(), &shares, load_splits)?.parts[index].clone();
        if docs.is_empty() && in_mixture {
            return Ok(None);
        }
        if docs.is_empty() {
            let why = match (index, &args.valid_data, &args.test_data) {
                (1, Some(_), _) => "; the run's valid_data took the valid share: evaluate it without --data".to_string(),
                (2, _, Some(_)) => "; the run's test_data took the test share: evaluate it without --data".to_string(),
                _ => String::new(),
            };
            return Err(Error::Config(format!(
                "the {name} split of {} is empty (split \"{}\" of {} documents){why}",
                roots[0].display(),
                args.split,
                meta.documents
            )));
        }
        docs
    };
    let mut block = block_config(args);
    block.seed = t.seed
        ^ match opts.split {
            Split::Valid => VALID_SEED,
            Split::Test => VALID_SEED.rotate_left(17),
        };
    let n = docs.len();
    Ok(Some((BlockSampler::new(store.clone(), docs, block, tok.sentence_end_table().to_vec())?, n)))
}

/// The default store: the training store for the run's own corpus, a
/// separate one for another corpus (so evaluating it never rebuilds the
/// training store).
pub fn default_store(data: Option<&Path>) -> PathBuf {
    match data {
        None => PathBuf::from("glm_pretrain/data/store"),
        Some(_) => PathBuf::from("glm_pretrain/data/eval_store"),
    }
}
