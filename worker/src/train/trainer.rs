//! The single-process step loop: data -> forward -> backward (accumulated
//! over micro-batches) -> clip -> AdamW -> log / evaluate / checkpoint.
//!
//! Reproducibility: the torch generator (dropout) is re-seeded from
//! `(seed, iteration)` before every iteration and every sample is a function
//! of `(seed, global sample index)`, so a run resumed from a checkpoint of
//! iteration k continues exactly as the uninterrupted run (bit-for-bit on CPU).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tch::{Device, Tensor};

use super::build::{build, Recipe};
use super::metrics::{rss_mb, EvalEvent, Metrics, RankSpread, TrainEvent};
use super::save_dir::SaveDirLock;
use super::step::{train_step, StepOutput, StepPlan};
use crate::checkpoint::saver::{Saver, SaverConfig};
use crate::checkpoint::{self, Progress, State, Writing};
use crate::config::run::RunConfig;
use crate::data::blocklm::{BlockSampler, Sample};
use crate::data::prepare::{beside_store, corpus_name, ensure_store, obtain_tokenizer, PrepareOptions, StoreOutcome};
use crate::data::split::split_documents;
use crate::data::store::TokenStore;
use crate::data::tokenizer::{padded_vocab_size, GlmTokenizer};
use crate::error::{Error, Result};
use crate::model::glm::{Batch, Glm};
use crate::optim::optimizer::{MemoryBytes, Optimizer};
use crate::parallel::Parallel;
use crate::runtime::progress::{self, Phase as Stage};

/// Set by SIGINT/SIGTERM (to its number): finish the current iteration,
/// checkpoint, exit.
static SIGNAL: AtomicI32 = AtomicI32::new(0);
/// Whether the training loop runs. Before it (tokenizer training, store
/// building, model construction, evaluation tools) a signal ends the
/// process at once: nothing has trained, so there is nothing to save, and
/// the data preparation writes into temporary directories renamed only
/// when complete.
static TRAINING: AtomicBool = AtomicBool::new(false);

/// The seed offset of the validation split's sample stream.
pub const VALID_SEED: u64 = 0x00E7_A100;

/// What a signal outside the training loop stops, for its message.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(u8)]
pub enum Phase {
    /// A training run before its loop: preparing data, building the model.
    BeforeTraining = 0,
    /// `glm-worker eval`.
    Evaluation = 1,
    /// `glm-worker prepare`.
    Preparation = 2,
}

static PHASE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if !TRAINING.load(Ordering::SeqCst) {
        let int = sig == libc::SIGINT;
        let (eval, prepare) = (Phase::Evaluation as u8, Phase::Preparation as u8);
        let msg: &[u8] = match (PHASE.load(Ordering::SeqCst), int) {
            (p, true) if p == eval => b"glm-worker: interrupted (SIGINT): evaluation stopped\n",
            (p, false) if p == eval => b"glm-worker: terminated (SIGTERM): evaluation stopped\n",
            (p, true) if p == prepare => b"glm-worker: interrupted (SIGINT): prepare stopped; a store it had not finished was not installed (its finished shards are kept: the same prepare again continues)\n",
            (p, false) if p == prepare => b"glm-worker: terminated (SIGTERM): prepare stopped; a store it had not finished was not installed (its finished shards are kept: the same prepare again continues)\n",
            (_, true) => b"glm-worker: interrupted (SIGINT) before training: stopped; nothing was trained or saved\n",
            (_, false) => b"glm-worker: terminated (SIGTERM) before training: stopped; nothing was trained or saved\n",
        };
        // SAFETY: write(2) and _exit(2) are async-signal-safe. (The
        // temporaries of an unfinished shard or tokenizer are removed by the
        // next run: runtime::host::temp_path; finished shards of an
        // unfinished store are kept for it: data::build.)
        unsafe {
            libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
            libc::_exit(128 + sig);
        }
    }
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// SIGINT/SIGTERM: outside the training loop (`phase`) they stop the process
/// at once with a message; in it, every rank stops after the current
/// iteration with a checkpoint.
pub fn install_signal_handlers(phase: Phase) {
    PHASE.store(phase as u8, Ordering::SeqCst);
    // SAFETY: the handler only stores to atomics, or writes and exits.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
}

/// Loss and masked-token accuracy over held-out samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeldOut {
    /// Token-weighted mean cross entropy.
    pub loss: f64,
    pub accuracy: f64,
    pub tokens: u64,
}

/// `model` on batches 0..`iters` of `sampler` (`batch` samples each; in
/// `mode`, else one mode per batch, drawn as for training), the batches shared
/// out over the data-parallel ranks and the sums combined: the summed cross
/// entropy of every masked token over their count.
pub fn held_out(
    model: &Glm,
    sampler: &BlockSampler,
    mode: Option<crate::data::blocklm::Mode>,
    iters: u64,
    batch: usize,
    device: Device,
    par: &Parallel,
) -> Result<HeldOut> {
    let d = par.dims;
    let what = mode.map(|m| format!("{m:?}")).unwrap_or_else(|| "mixed".into());
    let _doing = crate::runtime::report::doing(format!("evaluating held-out data ({what} samples, batch {batch})"));
    // [nll, correct, count]
    let mut acc = [0.0f64; 3];
    tch::no_grad(|| -> Result<()> {
        for i in (0..iters).filter(|i| i % d.dp as u64 == d.dp_rank() as u64) {
            let range = i * batch as u64..(i + 1) * batch as u64;
            let samples = match mode {
                None => sampler.batch(i, range),
                Some(m) => range.map(|j| sampler.sample(j, m)).collect(),
            };
            let (sum, c, n) = model.loss_terms(&collate(&samples, device), false)?;
            progress::tick();
            acc[0] += sum.double_value(&[]);
            acc[1] += c as f64;
            acc[2] += n as f64;
        }
        Ok(())
    })?;
    let mut t = Tensor::from_slice(&acc);
    par.dp_sum(&mut t)?;
    let (nll, correct, count) = (t.double_value(&[0]), t.double_value(&[1]), t.double_value(&[2]).max(1.0));
    Ok(HeldOut { loss: nll / count, accuracy: correct / count, tokens: count as u64 })
}

/// Options that are not part of the two config files.
pub struct TrainOptions {
    pub store: PathBuf,
    pub prepare: PrepareOptions,
    pub device: Device,
}

/// How a run ended.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    Finished {
        iteration: u64,
    },
    /// Stopped by `signal`, which reached at least one rank of the world
    /// (every rank reports the same number).
    Interrupted {
        iteration: u64,
        signal: i32,
    },
}

/// Samples -> tensors on `device`.
pub fn collate(samples: &[Sample], device: Device) -> Batch {
    let b = samples.len() as i64;
    let s = samples[0].tokens.len() as i64;
    let stack = |f: &dyn Fn(&Sample) -> Vec<i64>| -> Tensor {
        let flat: Vec<i64> = samples.iter().flat_map(f).collect();
        Tensor::from_slice(&flat).view([b, s]).to(device)
    };
    Batch {
        tokens: stack(&|x| x.tokens.iter().map(|&t| t as i64).collect()),
        targets: stack(&|x| x.targets.iter().map(|&t| t as i64).collect()),
        loss_mask: stack(&|x| x.loss_mask.iter().map(|&t| t as i64).collect()),
        position_ids: stack(&|x| x.position_ids.iter().map(|&t| t as i64).collect()),
        block_position_ids: stack(&|x| x.block_position_ids.iter().map(|&t| t as i64).collect()),
        sep: Tensor::from_slice(&samples.iter().map(|x| x.sep as i64).collect::<Vec<_>>()).to(device),
    }
}

/// The line about a store that training built or reused.
fn report_store(what: &str, dir: &Path, files: &[PathBuf], meta: &crate::data::store::StoreMeta, outcome: StoreOutcome) {
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

/// What save_splits and save_test_data ask for (rank 0): the split's index
/// order as `.npy`, the test split's documents decoded one a line — as the
/// original writes them, and only when the documents are split (and, for
/// save_splits, not loaded).
fn save_split_files(a: &crate::config::args::Args, split: &crate::data::split::DocumentSplit, store: &TokenStore, tok: &GlmTokenizer) -> Result<()> {
    let Some(order) = &split.order else { return Ok(()) };
    if let (Some(p), None) = (&a.save_splits, &a.load_splits) {
        let written = crate::data::split::save_npy(p, order)?;
        println!("data: save_splits: the split's index order ({} documents) written to {}", order.len(), written.display());
    }
    if let Some(p) = &a.save_test_data {
        let mut text = String::new();
        for &d in &split.parts[2] {
            text.push_str(&tok.decode(&store.doc(d as usize), false));
            text.push('\n');
        }
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        std::fs::write(p, text).map_err(|e| Error::io(p, e))?;
        println!("data: save_test_data: {} test documents written to {}", split.parts[2].len(), p.display());
    }
    Ok(())
}

pub struct Trainer {
    pub cfg: RunConfig,
    pub model: Glm,
    pub opt: Optimizer,
    train: BlockSampler,
    valid: Option<BlockSampler>,
    tokenizer: GlmTokenizer,
    pub iteration: u64,
    /// Training draws the mode of global sample i as that of group
    /// i / mode_group (`BlockSampler::mode_of`): this run's global batch
    /// (one mode per step) when it starts from scratch, the checkpoint's
    /// when it resumes, so the sample stream does not depend on the layout.
    mode_group: u64,
    /// Applied updates the learning-rate schedule does not count: those
    /// before a resume with `no_load_lr_scheduler` (the original then
    /// starts a fresh schedule, warmup included).
    schedule_start: u64,
    device: Device,
    metrics: Metrics,
    /// Its checkpoints: the one in flight, the clock, `keep_last`. Before
    /// the lock and the groups: fields drop in order, and a writer still in
    /// flight must finish while the run holds its directory.
    saver: Option<Saver>,
    par: Parallel,
    /// This run's hold on its save directory (see `train::save_dir`).
    _save_dir: Option<SaveDirLock>,
}

fn say(pb: &Option<indicatif::ProgressBar>, line: &str) {
    match pb {
        Some(pb) => pb.println(line),
        None => println!("{line}"),
    }
}

impl Trainer {
    /// Prepares data (tokenizer, store), builds the model, and resumes from
    /// `load` when configured.
    pub fn new(cfg: RunConfig, opts: TrainOptions, par: Parallel) -> Result<Self> {
        let a = cfg.args.args.clone();
        // before anything is prepared or written: the save directory is this
        // run's (rank 0 claims it, then prepares the data, while the others wait)
        progress::set_phase(Stage::PreparingData);
        let save_dir = match &a.save {
            Some(s) => Some(super::save_dir::claim(s, a.load.as_deref(), a.overwrite, &par)?),
            None => None,
        };
        let files = crate::config::run::files_of("train_data", &cfg.train_data.roots)?;
        // valid_data validates from a store of its own; test_data is checked
        // here, evaluated by `glm-worker eval --split test`
        let valid_files = cfg.valid_data.as_ref().map(|v| crate::config::run::files_of("valid_data", &v.roots)).transpose()?;
        if let Some(t) = &cfg.test_data {
            crate::config::run::files_of("test_data", &t.roots)?;
        }
        let valid_store = beside_store(&opts.store, "valid");
        let mut popts = opts.prepare.clone();
        popts.corpus.text_key = a.text_key.clone();
        popts.corpus.reader = cfg.train_data.reader;
        let mut valid_popts = popts.clone();
        if let Some(v) = &cfg.valid_data {
            valid_popts.corpus.reader = v.reader;
            valid_popts.corpus.text_key = a.eval_text_key.clone().unwrap_or_else(|| a.text_key.clone());
        }
        popts.tokenizer_option = crate::data::prepare::TokenizerOption::ConfigKey;
        popts.spec = Some(crate::data::tokenizer::TokenizerSpec::from_args(&a)?);
        // Rank 0 trains the tokenizer and builds the store; the others wait,
        // then find both up to date. (Two ranks training tokenizers at once
        // could end with different token ids: training is not deterministic.)
        // Several nodes need the store on a shared filesystem.
        let (tok, meta, outcome, valid_built) = par.main_first("preparing the data", || {
            let (tok, origin) = obtain_tokenizer(&files, a.tokenizer_path.as_deref(), &opts.store, &popts)?;
            println!("data: tokenizer {origin}: {} ids", tok.vocab_size());
            let (meta, outcome) = ensure_store(&files, &tok, &opts.store, &popts, &|_| {})?;
            let valid = match &valid_files {
                Some(vf) => Some(ensure_store(vf, &tok, &valid_store, &valid_popts, &|_| {})?),
                None => None,
            };
            Ok((tok, meta, outcome, valid))
        })?;
        report_store("store", &opts.store, &files, &meta, outcome);
        if let Some(w) = meta.unknown_warning(crate::data::prepare::TokenizerOption::ConfigKey) {
            println!("warning: {w}");
        }
        if let (Some((vmeta, voutcome)), Some(vf)) = (valid_built, &valid_files) {
            report_store("valid_data store", &valid_store, vf, &vmeta, voutcome);
        }
        // the store opened is the one this run's tokenizer built (another
        // process may have rebuilt it since it was checked)
        let store = Arc::new(TokenStore::open_for(&opts.store, &tok, "this run's")?);
        let split = split_documents(store.num_docs(), &cfg.split, a.load_splits.as_deref())?;
        if par.is_main() {
            save_split_files(&a, &split, &store, &tok)?;
        }
        let splits = split.parts;
        if splits[0].is_empty() {
            return Err(Error::Config(format!(
                "split \"{}\" ({}): the train split of {} documents is empty",
                a.split,
                cfg.args.source("split"),
                store.num_docs()
            )));
        }
        let sentence_end = tok.sentence_end_table().to_vec();
        let train = BlockSampler::new(store.clone(), splits[0].clone(), cfg.block.clone(), sentence_end.clone())?;
        let mut vb = cfg.block.clone();
        vb.seed ^= VALID_SEED;
        let valid = if valid_files.is_some() {
            // the original's eval datasets are not split: every document, in order
            let vstore = Arc::new(TokenStore::open_for(&valid_store, &tok, "this run's")?);
            let docs = (0..vstore.num_docs() as u32).collect();
            println!("data: valid_data: {} documents validate ({})", vstore.num_docs(), valid_store.display());
            Some(BlockSampler::new(vstore, docs, vb, sentence_end)?)
        } else {
            match splits.get(1).filter(|v| !v.is_empty()) {
                Some(v) => Some(BlockSampler::new(store.clone(), v.clone(), vb, sentence_end)?),
                None => None,
            }
        };
        println!(
            "data: split {}: {}",
            a.split,
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
        );

        progress::set_phase(Stage::Building);
        let (mut model, mut opt) = build(&Recipe::from_run(&cfg, tok.vocab_size()), &par, opts.device)?;
        let (n, pos) = model.cfg.num_params();
        println!(
            "model: GLM {} layers, hidden {}, {} heads, ffn {}, vocab {} (padded), {:.2} M parameters (+{:.2} M position embeddings), {}, on {:?}",
            model.cfg.num_layers,
            model.cfg.hidden_size,
            model.cfg.num_attention_heads,
            model.cfg.intermediate_size,
            model.cfg.vocab_size,
            n as f64 / 1e6,
            pos as f64 / 1e6,
            cfg.precision.name(),
            opts.device
        );
        for line in memory_report(&model, &opt, &par) {
            println!("{line}");
        }
        if model.checkpoint_num_layers() > 0 {
            let (full, kept) = model.activation_bytes(cfg.batch.micro, a.seq_length);
            println!(
                "activation checkpointing: every {} layer(s) recomputed in backward; activations of a micro-batch about {:.1} MB instead of {:.1} MB (estimate), {:.1} MB saved",
                model.checkpoint_num_layers(), kept / 1e6, full / 1e6, (full - kept) / 1e6
            );
        }
        let mut iteration = 0;
        let mut schedule_start = 0;
        let mut mode_group = cfg.batch.global as u64;
        if let Some(load) = &a.load {
            let mut dir = checkpoint::resolve(load)?;
            // the checkpoint's tensor-parallel layout must be this run's
            let parts = if dir.join("state.json").is_file() { 1 } else { checkpoint::part_dirs(&dir)?.len() };
            let tp = par.tp.as_ref().map_or(1, |g| g.size);
            if parts != tp {
                // the converted checkpoint beside it: <save>/<iteration>-merged, -tp<N>
                let word = |p: &Path| glm_common::text::shell_word(&p.display().to_string());
                let (merged, split) = (checkpoint::beside(&dir, "merged"), checkpoint::beside(&dir, &format!("tp{tp}")));
                // a converted checkpoint keeps its padded vocabulary, which a run
                // pads to by its tensor-parallel size: the setting that matches it
                let padded =
                    checkpoint::open_state(&if parts == 1 { dir.clone() } else { dir.join(checkpoint::mp_rank_dir(0)) }).ok().map(|s| s.model.vocab_size);
                let pad = |tp: usize| padded.map_or(String::new(), |p| vocab_padding_set(tok.vocab_size(), p, a.make_vocab_size_divisible_by, tp));
                let fix = if parts == 1 {
                    format!(
                        "split it first (glm-worker checkpoint split --load {} --tp {tp} --out {}), then train with --set load={}{}; or train with --set model_parallel_size=1{}",
                        word(&dir),
                        word(&split),
                        word(&split),
                        pad(tp),
                        pad(1)
                    )
                } else if tp == 1 {
                    format!(
                        "merge it first (glm-worker checkpoint merge --load {} --out {}), then train with --set load={}{}; or train on {parts} ranks with --set model_parallel_size={parts}{}",
                        word(&dir),
                        word(&merged),
                        word(&merged),
                        pad(1),
                        pad(parts)
                    )
                } else {
                    format!(
                        "merge it (glm-worker checkpoint merge --load {} --out {}) and split the result (glm-worker checkpoint split --load {} --tp {tp} --out {}), then train with --set load={}{}; or train on a multiple of {parts} ranks with --set model_parallel_size={parts}{}",
                        word(&dir),
                        word(&merged),
                        word(&merged),
                        word(&split),
                        word(&split),
                        pad(tp),
                        pad(parts)
                    )
                };
                return Err(Error::invalid(&dir, format!("saved with tensor-parallel {parts}, and this run has tensor-parallel {tp}: {fix}")));
            }
            if let Some(g) = &par.tp {
                dir = dir.join(checkpoint::mp_rank_dir(g.rank));
            }
            let state = checkpoint::open_state(&dir)?;
            if !tok.answers_to(&state.tokenizer_sha256) {
                return Err(Error::invalid(
                    dir.join("state.json"),
                    "the checkpoint was trained with a different tokenizer than this run's (token ids would not match)",
                ));
            }
            // a vocabulary padded otherwise (another make_vocab_size_divisible_by,
            // or an earlier build's padding by divisible_by × tensor-parallel size)
            let tp = par.tp.as_ref().map_or(1, |g| g.size);
            let set = vocab_padding_set(tok.vocab_size(), state.model.vocab_size, a.make_vocab_size_divisible_by, tp);
            if state.model.vocab_size != model.cfg.vocab_size && !set.is_empty() {
                return Err(Error::invalid(
                    dir.join("state.json"),
                    format!(
                        "the checkpoint's vocabulary is padded to {} rows, this run's to {} (make_vocab_size_divisible_by {}): train with{set}",
                        state.model.vocab_size, model.cfg.vocab_size, a.make_vocab_size_divisible_by
                    ),
                ));
            }
            // reading a checkpoint takes as long as the disk needs: no collective deadline
            let scaler_note = {
                let _any_time = progress::unbounded();
                checkpoint::load(&dir, &state, &mut model, &mut opt, !a.no_load_optim)?
            };
            iteration = state.iteration;
            let z = |stage: u8, dp: usize| format!("data-parallel {}, ZeRO stage {stage}", if dp == 0 { "?".to_string() } else { dp.to_string() });
            let (saved, now) = (z(state.zero.as_ref().map_or(0, |z| z.stage), state.dp), z(opt.zero_config().stage, par.dims.dp));
            let reshard = if saved != now && state.has_optimizer && !a.no_load_optim {
                format!("; optimizer state re-partitioned from {saved} to {now}")
            } else {
                String::new()
            };
            println!("checkpoint: resumed from {} (iteration {iteration}){reshard}", dir.display());
            schedule_start = state.schedule_start;
            mode_group = state.mode_group(&dir.join("state.json"))?;
            if mode_group != cfg.batch.global as u64 {
                println!("data: blank-infilling modes drawn per {mode_group} samples, as in the checkpoint (train_batch_size is {})", cfg.batch.global);
            }
            if a.no_load_lr_scheduler {
                schedule_start = iteration - opt.skipped_steps();
                println!(
                    "checkpoint: no_load_lr_scheduler: the learning-rate schedule starts again (warmup included) at iteration {}, as the original's fresh scheduler",
                    iteration + 1
                );
            }
            if let Some(note) = scaler_note {
                println!("checkpoint: {note}");
            }
        } else {
            // identical weights on every data-parallel rank, whatever
            // happened at initialisation: rank 0's, in fp32
            let mut w = tch::no_grad(|| model.params.flat().to_kind(tch::Kind::Float));
            par.dp_broadcast(&mut w)?;
            opt.set_weights(&mut model.params, &w);
        }
        let metrics = Metrics::new(cfg.save_dir().filter(|_| par.is_main()), iteration)?;
        let saver = cfg.save_dir().map(|dir| {
            let cfg = SaverConfig {
                writing: if cfg.background_save { Writing::Background } else { Writing::Inline },
                keep_last: a.keep_last,
                every: (a.save_interval_minutes > 0.0)
                    .then(|| std::time::Duration::try_from_secs_f64(a.save_interval_minutes * 60.0).unwrap_or(std::time::Duration::MAX)),
                with_state: !a.no_save_optim,
            };
            Saver::new(dir, cfg, par.dims.rank)
        });
        Ok(Trainer {
            cfg,
            model,
            opt,
            train,
            valid,
            tokenizer: tok,
            iteration,
            mode_group,
            schedule_start,
            device: opts.device,
            metrics,
            par,
            _save_dir: save_dir,
            saver,
        })
    }

    /// One optimizer step of iteration `it` (see `train::step`). The
    /// learning-rate schedule is at the updates applied before it, as the
    /// original's scheduler steps after each update: the first update runs
    /// at the schedule's start, and after fp16 overflows (no update, no
    /// scheduler step) it lags the iteration by the skipped steps.
    pub fn step(&mut self, it: u64) -> Result<(StepOutput, f64)> {
        let a = &self.cfg.args.args;
        let it_seed = (a.seed as i64).wrapping_mul(1_000_003).wrapping_add(it as i64);
        let done = (it - 1).saturating_sub(self.opt.skipped_steps()).saturating_sub(self.schedule_start);
        let lr = self.cfg.schedule.lr(done);
        let (b, device, d, train, group) = (self.cfg.batch, self.device, self.par.dims, &self.train, self.mode_group);
        // this rank's share of micro-batch m: iteration it holds the global
        // batch's consecutive sample indices from (it - 1) × global, micro
        // step m the m-th run of micro × dp of them, of which data-parallel
        // rank r reads the r-th run of micro; each sample in the mode of its
        // index (mode_group), so any factoring reads the same samples in the
        // same modes
        let mut next = |m: usize| {
            let batch_index = (it - 1) * b.accum as u64 + m as u64;
            let start = (batch_index * d.dp as u64 + d.dp_rank() as u64) * b.micro as u64;
            Ok(collate(&train.samples(start..start + b.micro as u64, group), device))
        };
        let accum = b.accum;
        let _doing = crate::runtime::report::doing(format!(
            "training iteration {it} (micro-batch {} × {accum} accumulation steps, seq_length {})",
            b.micro, a.seq_length
        ));
        let out = train_step(&mut self.model, &mut self.opt, &self.par, StepPlan { it_seed, accum, lr, norm: self.cfg.ds.loss_normalization }, &mut next)?;
        Ok((out, lr))
    }

    /// Validation loss, perplexity and masked-token accuracy over
    /// `eval_iters` fixed batches of the valid split.
    pub fn evaluate(&self) -> Result<Option<EvalEvent>> {
        let Some(valid) = self.valid.as_ref() else { return Ok(None) };
        let h = held_out(&self.model, valid, None, self.cfg.args.args.eval_iters, self.cfg.eval_batch, self.device, &self.par)?;
        Ok(Some(EvalEvent { iteration: self.iteration, loss: h.loss, ppl: h.loss.exp(), accuracy: h.accuracy, tokens: h.tokens as i64 }))
    }

    /// Evaluates (when there is a valid split), prints the result and
    /// records it in the metrics.
    fn evaluate_and_report(&mut self, pb: &Option<indicatif::ProgressBar>) -> Result<()> {
        if let Some(e) = self.evaluate()? {
            say(pb, &format!("validation at iteration {} | loss {:.4} | ppl {:.2} | accuracy {:.4}", e.iteration, e.loss, e.ppl, e.accuracy));
            self.metrics.eval(&e)?;
        }
        Ok(())
    }

    /// Cross-entropy on the validation targets of a unigram model fitted
    /// (add-one smoothed) to the targets of the first `fit_batches` training
    /// batches: the loss a model that knows only token frequencies reaches,
    /// measured exactly as `evaluate` measures the model.
    pub fn unigram_baseline(&self, fit_batches: u64) -> Option<f64> {
        let valid = self.valid.as_ref()?;
        let v = self.model.cfg.vocab_size;
        let mut counts = vec![1.0f64; v];
        let mut total = v as f64;
        let b = self.cfg.batch.micro as u64;
        for i in 0..fit_batches {
            for s in self.train.batch(i, i * b..(i + 1) * b) {
                for (t, m) in s.targets.iter().zip(&s.loss_mask) {
                    if *m == 1 {
                        counts[*t as usize] += 1.0;
                        total += 1.0;
                    }
                }
            }
        }
        let (mut nll, mut n) = (0.0, 0u64);
        let eb = self.cfg.eval_batch as u64;
        for i in 0..self.cfg.args.args.eval_iters {
            for s in valid.batch(i, i * eb..(i + 1) * eb) {
                for (t, m) in s.targets.iter().zip(&s.loss_mask) {
                    if *m == 1 {
                        nll -= (counts[*t as usize] / total).ln();
                        n += 1;
                    }
                }
            }
        }
        Some(nll / n.max(1) as f64)
    }

    /// The checkpoint state of this iteration (the optimizer's part is
    /// filled in by `checkpoint::begin`).
    fn checkpoint_state(&self) -> State {
        State {
            format_version: checkpoint::FORMAT_VERSION,
            iteration: self.iteration,
            consumed_samples: self.iteration * self.cfg.batch.global as u64,
            mode_group: self.mode_group,
            // the optimizer's part (step, skipped steps, precision, loss
            // scaler, ZeRO manifest) is filled in by checkpoint::begin
            optimizer_step: 0,
            skipped_steps: 0,
            schedule_start: self.schedule_start,
            precision: Default::default(),
            loss_scaler: None,
            model: self.model.cfg.clone(),
            tp: self.par.dims.tp,
            dp: self.par.dims.dp,
            zero: None,
            has_optimizer: false,
            tokenizer_sha256: self.tokenizer.sha256.clone(),
            deepspeed_config: self.cfg.ds.raw.clone(),
            args: serde_json::to_value(&self.cfg.args.args).expect("args serialise"),
            files: Default::default(),
        }
    }

    /// After an iteration, with `save` set: installs the checkpoint in flight
    /// once every rank's writer is done (`writer`, agreed), or before the
    /// next begins (at most one in flight); begins one when `due`; and, on
    /// the `last` iteration or a stop, waits for it. Every rank calls it at
    /// the same iteration with the same arguments (the checkpoint's parts
    /// and shards come from every rank, and each half is collective).
    /// Whether anything was saved or begun.
    fn save_point(&mut self, due: bool, last: bool, writer: Progress, pb: &Option<indicatif::ProgressBar>) -> Result<bool> {
        let Some(saver) = self.saver.as_mut() else { return Ok(false) };
        let mut acted = false;
        if due || (saver.in_flight().is_some() && writer != Progress::Writing) {
            progress::set_phase(Stage::Save);
        }
        // the others wait while a rank writes, as long as the disk needs: no
        // collective deadline (a frozen rank still shows: glm-launch sees
        // its heartbeats stop)
        let _any_time = progress::unbounded();
        if saver.in_flight().is_some() && (due || writer != Progress::Writing) {
            let saved = saver.finish(&self.par, writer, &|l| say(pb, l))?;
            self.report_saved(saved, pb);
            acted = true;
        }
        if due {
            let (state, tokenizer) = (self.checkpoint_state(), self.tokenizer.to_json()?);
            let saver = self.saver.as_mut().expect("save configured");
            saver.begin(&self.model, &self.opt, &self.par, &tokenizer, state)?;
            if last || saver.config().writing == Writing::Inline {
                let saved = saver.finish(&self.par, Progress::Written, &|l| say(pb, l))?;
                self.report_saved(saved, pb);
            }
            acted = true;
        }
        Ok(acted)
    }

    /// One line per installed part (data-parallel rank 0 of each
    /// tensor-parallel rank reports), and what `keep_last` removed.
    fn report_saved(&self, saved: Option<checkpoint::saver::Saved>, pb: &Option<indicatif::ProgressBar>) {
        let Some(s) = saved else { return };
        let f = &s.finished;
        if self.par.dims.dp_rank() == 0 {
            let how = match f.writing {
                Writing::Background => {
                    format!("training held {:.0} ms; files written in the background in {:.2} s", f.held.as_secs_f64() * 1e3, f.wrote.as_secs_f64())
                }
                Writing::Inline => format!("training held {:.0} ms", f.held.as_secs_f64() * 1e3),
            };
            say(pb, &format!("checkpoint: saved {} ({how})", f.dir.display()));
        }
        for r in &s.removed {
            say(pb, &format!("checkpoint: keep_last {}: removed {}", self.cfg.args.args.keep_last, r.display()));
        }
        if let Some(w) = &s.remove_failed {
            say(pb, &format!("warning: {w}"));
        }
    }

    /// Runs iterations up to `train_iters`.
    pub fn run(&mut self) -> Result<Outcome> {
        let a = self.cfg.args.args.clone();
        let total = a.train_iters;
        if self.iteration >= total {
            println!("train: nothing to do (checkpoint iteration {} >= train_iters {total})", self.iteration);
            return Ok(Outcome::Finished { iteration: self.iteration });
        }
        // from here a signal stops every rank after an iteration, with a checkpoint
        TRAINING.store(true, Ordering::SeqCst);
        let seq = a.seq_length;
        let tokens_per_iter = (self.cfg.batch.global * seq) as f64;
        let flops_per_token = self.model.cfg.flops_per_token(seq);
        let pb = crate::comm::mpi::live_terminal(&std::io::stdout()).then(|| {
            let pb = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stdout());
            pb.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}").expect("template"));
            pb.set_position(self.iteration);
            pb
        });
        if a.eval_interval > 0 {
            progress::set_phase(Stage::Evaluate);
            if let Some(u) = self.unigram_baseline(200) {
                say(&pb, &format!("validation unigram baseline | loss {u:.4} | ppl {:.2} (token frequencies of 200 training batches)", u.exp()));
                self.metrics.baseline(u)?;
            }
        }
        if self.iteration == 0 && a.eval_interval > 0 {
            self.evaluate_and_report(&pb)?;
        }
        if let Some(s) = self.saver.as_mut() {
            s.restart_clock();
        }
        let (mut loss_acc, mut norm_acc, mut n_acc, mut skipped) = (0.0, 0.0, 0u64, 0u64);
        let mut t_log = Instant::now();
        // the time inside collectives at t_log: a rank's own work is the rest
        let mut waited_log = progress::waited();
        let fault = crate::test_hooks::fault(self.par.dims.rank);
        let first = self.iteration + 1;
        while self.iteration < total {
            let it = self.iteration + 1;
            progress::set_iteration(it);
            progress::set_phase(Stage::Data);
            if it == first {
                // glm-launch learns at once that training began
                progress::beat_now();
            }
            if let Some(f) = &fault {
                f.at(it);
            }
            // a runtime fault of the step (the fp16 scaler at its minimum, inf
            // gradients without a scaler, a failed collective) names the iteration
            let (out, lr) = self.step(it).map_err(|e| match e {
                Error::Runtime(m) => Error::Runtime(format!("iteration {it}: {m}")),
                e => e,
            })?;
            let loss = out.loss;
            if !loss.is_finite() {
                return Err(Error::Runtime(format!("loss became {loss} at iteration {it}; lower lr or check the data")));
            }
            self.iteration = it;
            loss_acc += loss;
            n_acc += 1;
            if out.stats.skipped {
                skipped += 1;
            } else {
                norm_acc += out.stats.grad_norm;
            }
            if let Some(line) = out.stats.scale_event.as_ref().and_then(|e| self.opt.scaler()?.event_line(e)) {
                say(&pb, &format!("iteration {it}: {line}"));
            }
            if let Some(pb) = &pb {
                pb.set_position(it);
                pb.set_message(format!("loss {loss:.4}"));
            }
            if it % a.log_interval == 0 || it == total {
                let secs = t_log.elapsed().as_secs_f64();
                let ms = secs * 1000.0 / n_acc as f64;
                // every rank's own work per step (its step time less its waits
                // in collectives, which a slow rank imposes on the others)
                let own = (secs - (progress::waited() - waited_log).as_secs_f64()).max(0.0) * 1000.0 / n_acc as f64;
                let ranks = if self.par.dims.world > 1 { RankSpread::of(&self.par.world_gather(own)?) } else { None };
                let tps = tokens_per_iter * n_acc as f64 / secs;
                let e = TrainEvent {
                    iteration: it,
                    lr,
                    loss: loss_acc / n_acc as f64,
                    grad_norm: if n_acc > skipped { norm_acc / (n_acc - skipped) as f64 } else { f64::NAN },
                    ms_per_iter: ms,
                    tokens_per_s: tps,
                    tflops: tps * flops_per_token / 1e12,
                    mem_mb: rss_mb(),
                    loss_scale: self.opt.scaler().map(|_| out.stats.loss_scale),
                    skipped,
                    ranks,
                };
                let mut scale = e.loss_scale.map(|s| format!(" | loss scale {s} | skipped {}", e.skipped)).unwrap_or_default();
                if let Some(r) = &e.ranks {
                    scale.push_str(&format!(" | rank work ms min/median/max {:.1}/{:.1}/{:.1}, slowest rank {}", r.min_ms, r.median_ms, r.max_ms, r.slowest));
                }
                say(
                    &pb,
                    &format!(
                        " iteration {it:>7}/{total} | lr {:.3E} | lm loss {:.5E} | grad norm {:.3} | {:.1} ms/it | {:.0} tokens/s | {:.3} TFLOP/s | mem {:.0} MB{scale}",
                        e.lr, e.loss, e.grad_norm, e.ms_per_iter, e.tokens_per_s, e.tflops, e.mem_mb
                    ),
                );
                self.metrics.train(&e)?;
                (loss_acc, norm_acc, n_acc, skipped) = (0.0, 0.0, 0, 0);
                (t_log, waited_log) = (Instant::now(), progress::waited());
            }
            progress::set_phase(Stage::Log);
            // every rank stops after the same iteration, saves by the clock
            // at the same iteration, and learns how the checkpoint in flight is doing
            let agreed = Saver::agree(self.saver.as_mut(), &self.par, SIGNAL.load(Ordering::SeqCst))?;
            let (signal, stopping) = (agreed.signal, agreed.signal != 0);
            if a.eval_interval > 0 && (it % a.eval_interval == 0 || it == total) {
                progress::set_phase(Stage::Evaluate);
                self.evaluate_and_report(&pb)?;
                (t_log, waited_log) = (Instant::now(), progress::waited());
            }
            let due = (a.save_interval > 0 && it % a.save_interval == 0) || it == total || stopping || agreed.clock;
            if self.save_point(due, it == total || stopping, agreed.writer, &pb)? {
                (t_log, waited_log) = (Instant::now(), progress::waited());
            }
            if stopping {
                if let Some(pb) = &pb {
                    pb.abandon();
                }
                return Ok(Outcome::Interrupted { iteration: it, signal });
            }
        }
        progress::set_phase(Stage::Done);
        if let Some(pb) = &pb {
            pb.finish_and_clear();
        }
        Ok(Outcome::Finished { iteration: self.iteration })
    }

    pub fn metrics_dir(&self) -> Option<&Path> {
        self.cfg.save_dir()
    }
}

/// `" --set make_vocab_size_divisible_by=N"` when a run on `tp` ranks
/// needs that setting to pad a tokenizer of `vocab` ids to a checkpoint's
/// `padded` vocabulary (`data::tokenizer::divisible_by_for`); else empty.
fn vocab_padding_set(vocab: usize, padded: usize, divisible_by: usize, tp: usize) -> String {
    crate::data::tokenizer::divisible_by_for(vocab, padded, divisible_by, tp).map(|d| format!(" --set make_vocab_size_divisible_by={d}")).unwrap_or_default()
}

/// Refuses, before anything is allocated, a run whose parameters, gradients
/// and optimizer state alone (the ZeRO paper's model states, estimated for
/// a vocabulary of `vocab` ids: 0 leaves the embedding out) exceed what a
/// CPU rank can ever have: this machine's RAM and swap, shared by its
/// `local_ranks` ranks. Activations come on top, so this never refuses a run
/// that could fit; past it the kernel would kill the run midway. For CPU runs
/// only: the CUDA allocator fails cleanly, with the size asked for.
pub fn check_memory(cfg: &RunConfig, dims: crate::parallel::dims::ParallelDims, local_ranks: usize, vocab: usize) -> Result<()> {
    let Some(machine) = crate::runtime::host::host_memory_bytes() else { return Ok(()) };
    let a = &cfg.args.args;
    let (n, pos) = cfg.model_config(padded_vocab_size(vocab, a.make_vocab_size_divisible_by, dims.tp)).num_params();
    let per_rank = ((n + pos) / dims.tp) as i64;
    let states = MemoryBytes::theory(per_rank, cfg.precision, dims.dp, cfg.zero.stage).total();
    // a checkpoint written in the background holds host copies of what it
    // writes: on a part's data-parallel rank 0 the fp32 weights, and the
    // moments it writes (whole at stage 0, its shard at stages 1 and 2)
    let snapshot = if a.save.is_some() && cfg.background_save {
        glm_common::plan::memory::snapshot_bytes(per_rank as u64, cfg.zero.stage, dims.dp as u64, !a.no_save_optim)
    } else {
        0
    };
    let share = machine / local_ranks.max(1) as u64;
    if states + snapshot > share {
        use crate::runtime::units::{human_bytes, human_count};
        let with_snapshot = if snapshot > 0 {
            format!(
                ", plus {} of host copies while a checkpoint is written in the background (--set checkpoint.writer.decoupled=false saves without them)",
                human_bytes(snapshot)
            )
        } else {
            String::new()
        };
        return Err(Error::Config(format!(
            "the model does not fit: its parameters, gradients and optimizer state need about {} per rank ({} parameters per rank, {}, ZeRO stage {} over data-parallel {}){with_snapshot}, \
             and this machine has {} of RAM and swap for {} rank(s): {} each{}",
            human_bytes(states),
            human_count(per_rank as u64),
            cfg.precision.name(),
            cfg.zero.stage,
            dims.dp,
            human_bytes(machine),
            local_ranks,
            human_bytes(share),
            crate::runtime::report::MODEL_TOO_LARGE_HINT
        )));
    }
    Ok(())
}

/// The start-of-run memory report: the model-state bytes this rank holds
/// (measured from the buffers), next to the ZeRO paper's figures for
/// stages 0, 1 and 2 at this model and layout, so a user sees what
/// sharding saves before a long run.
pub fn memory_report(model: &Glm, opt: &Optimizer, par: &Parallel) -> Vec<String> {
    let mb = |b: u64| b as f64 / 1e6;
    let m = opt.memory(&model.params);
    let numel = model.params.numel();
    let dp = par.dims.dp;
    let theory: Vec<String> = (0..3u8)
        .map(|s| {
            let t = MemoryBytes::theory(numel, opt.precision(), dp, s);
            format!("stage {s} {:.1} MB", mb(t.total()))
        })
        .collect();
    let mut out = vec![
        format!(
            "memory: this rank (ZeRO stage {}, data-parallel {dp}) holds parameters {:.1} MB, gradients {:.1} MB, optimizer state {:.1} MB = {:.1} MB",
            opt.zero_config().stage,
            mb(m.params),
            mb(m.grads),
            mb(m.optimizer),
            mb(m.total())
        ),
        format!(
            "memory: theory per rank for these {:.2} M parameters of this rank ({}, ZeRO paper: params + grads + {} B/param optimizer state): {}",
            numel as f64 / 1e6,
            opt.precision().name(),
            opt.precision().optimizer_bytes_per_param(),
            theory.join(", ")
        ),
    ];
    if opt.zero_config().stage == 2 {
        out.push(format!("memory: stage 2 reduces gradients in buckets of {} elements during backward (a bucket is freed once reduced)", opt.shards().0.unit));
    }
    out
}
