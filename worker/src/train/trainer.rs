//! The single-process step loop: data -> forward -> backward (accumulated
//! over micro-batches) -> clip -> AdamW -> log / evaluate / checkpoint.
//!
//! Reproducibility: the torch generator (dropout) is re-seeded from
//! `(seed, iteration)` before every iteration and every sample is a function
//! of `(seed, global sample index)`, so a run resumed from a checkpoint of
//! iteration k continues exactly as the uninterrupted run (bit-for-bit on CPU).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Instant;

use tch::{Device, Tensor};

use super::build::{build, Recipe};
use super::data::ValidSet;
use super::metrics::{rss_mb, CorpusEval, CorpusUse, EvalEvent, Metrics, ModeEval, RankSpread, TrainEvent};
use super::save_dir::SaveDirLock;
use super::step::{train_step, StepOutput, StepPlan};
use super::tensorboard;
use crate::checkpoint::saver::{Saver, SaverConfig};
use crate::checkpoint::{self, Progress, State, Writing};
use crate::config::run::RunConfig;
use crate::data::blocklm::{BlockSampler, Mode, Sample};
use crate::data::mixture::{weighted_mean, Source};
use crate::data::prepare::PrepareOptions;
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

pub use super::data::VALID_SEED;

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
#[derive(Clone, Debug, PartialEq)]
pub struct HeldOut {
    /// Token-weighted mean cross entropy.
    pub loss: f64,
    pub accuracy: f64,
    pub tokens: u64,
    /// Drawn as training draws modes: the batches of each mode that came up
    /// (span, sentence, generation).
    pub modes: Vec<ModeHeldOut>,
}

/// The held-out batches of one blank-infilling mode.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeHeldOut {
    pub mode: Mode,
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
    const MODES: [Mode; 3] = [Mode::Span, Mode::Sentence, Mode::Generation];
    // [nll, correct, count] in all, then per mode
    let mut acc = [0.0f64; 12];
    tch::no_grad(|| -> Result<()> {
        for i in (0..iters).filter(|i| i % d.dp as u64 == d.dp_rank() as u64) {
            let range = i * batch as u64..(i + 1) * batch as u64;
            let m = mode.unwrap_or_else(|| sampler.mode_for_batch(i));
            let samples = match mode {
                None => sampler.batch(i, range),
                Some(m) => range.map(|j| sampler.sample(j, m)).collect(),
            };
            crate::test_hooks::record_eval_batch(&what.to_lowercase(), &samples);
            let (sum, c, n) = model.loss_terms(&collate(&samples, device), false)?;
            progress::tick();
            let sum = sum.double_value(&[]);
            let k = 3 + 3 * MODES.iter().position(|x| *x == m).expect("a mode");
            for base in [0, k] {
                acc[base] += sum;
                acc[base + 1] += c as f64;
                acc[base + 2] += n as f64;
            }
        }
        Ok(())
    })?;
    let mut t = Tensor::from_slice(&acc);
    par.dp_sum(&mut t)?;
    let v: Vec<f64> = (0..12).map(|i| t.double_value(&[i])).collect();
    let (nll, correct, count) = (v[0], v[1], v[2].max(1.0));
    let modes = (0..3)
        .filter(|k| v[5 + 3 * k] > 0.0)
        .map(|k| ModeHeldOut { mode: MODES[k], loss: v[3 + 3 * k] / v[5 + 3 * k], accuracy: v[4 + 3 * k] / v[5 + 3 * k], tokens: v[5 + 3 * k] as u64 })
        .collect();
    Ok(HeldOut { loss: nll / count, accuracy: correct / count, tokens: count as u64, modes })
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

pub struct Trainer {
    pub cfg: RunConfig,
    pub model: Glm,
    pub opt: Optimizer,
    train: Source,
    /// The valid split of each corpus (or valid_data); empty: none.
    valid: Vec<ValidSet>,
    /// Tokens of each training corpus's train split, for epochs.
    train_tokens: Vec<u64>,
    /// The global sample this program's data stream began at (see
    /// `State::first_sample`).
    first_sample: u64,
    /// One rank's peak FLOP/s, for MFU (`train::mfu`).
    peak: Option<super::mfu::Peak>,
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
        let super::data::RunData { tok, train, valid, train_tokens } = super::data::prepare(&cfg, &opts.store, &opts.prepare, &par)?;

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
        // where this program's data stream began, and the samples trained on
        // when this run starts (the step axis of DeepSpeed's TensorBoard)
        let (mut first_sample, mut consumed_at_start) = (0u64, 0u64);
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
            match (&state.imported_from, state.has_optimizer && !a.no_load_optim) {
                (Some(from), _) => println!(
                    "checkpoint: imported weights ({from}) without optimizer state: AdamW starts afresh (zero moments, bias correction from its first step), as the original with no_load_optim"
                ),
                (None, false) => println!(
                    "checkpoint: {}: AdamW starts afresh (zero moments, bias correction from its first step)",
                    if a.no_load_optim { "no_load_optim" } else { "saved without optimizer state" }
                ),
                (None, true) => {}
            }
            schedule_start = state.schedule_start;
            first_sample = if state.imported_from.is_some() { iteration * cfg.batch.global as u64 } else { state.first_sample };
            consumed_at_start = if state.consumed_samples > 0 { state.consumed_samples } else { iteration * cfg.batch.global as u64 };
            // an imported checkpoint has no data stream of this program's to
            // go on: the run draws modes per its own global batch
            mode_group =
                if state.imported_from.is_some() && state.mode_group == 0 { cfg.batch.global as u64 } else { state.mode_group(&dir.join("state.json"))? };
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
        let mut metrics = Metrics::new(cfg.save_dir().filter(|_| par.is_main()), iteration)?;
        if par.is_main() {
            let global = cfg.batch.global as u64;
            let mut writers = Vec::new();
            let glm_dir = (!a.summary_dir.is_empty()).then(|| Path::new(&a.summary_dir).join("runs").join(&a.experiment_name));
            if let (Some(g), Some(tb)) = (&glm_dir, &cfg.ds.tensorboard) {
                let same = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                if same(g) == same(&tb.log_dir()) {
                    return Err(Error::Config(format!(
                        "summary_dir and the DeepSpeed file's tensorboard block both name {}: the original's events (against iterations) and DeepSpeed's (against samples) need directories of their own",
                        g.display()
                    )));
                }
            }
            let how = |key: &str| format!("set experiment_name (or {key}) to another name, resume the run (load=), or overwrite=true to replace them");
            if let Some(dir) = &glm_dir {
                // the original's get_log_dir: <summary_dir>/runs/<experiment_name>
                writers.push(tensorboard::Writer::open(dir, tensorboard::Style::Glm, iteration as i64, a.overwrite, &how("summary_dir"))?);
            }
            if let Some(tb) = &cfg.ds.tensorboard {
                writers.push(tensorboard::Writer::open(
                    &tb.log_dir(),
                    tensorboard::Style::DeepSpeed,
                    consumed_at_start as i64,
                    a.overwrite,
                    &how("tensorboard.job_name"),
                )?);
            }
            metrics.with_tensorboard(writers, global, iteration, consumed_at_start);
            for w in metrics.tensorboard_dirs() {
                println!("tensorboard: events in {} (tensorboard --logdir {})", w.display(), w.display());
            }
            let mut text = String::from("| key | value | from |\n|---|---|---|\n");
            for e in &cfg.report {
                text.push_str(&format!("| {} | {} | {} |\n", e.key, e.value.replace('|', "\\|"), e.source));
            }
            metrics.config_text(iteration, &text)?;
        }
        let peak = super::mfu::peak(opts.device, cfg.precision);
        if let Some(p) = &peak {
            println!("mfu: model FLOPs (6·N + 12·L·h·s per token, recomputation not counted) per second over {} per rank", p.source);
        }
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
            train_tokens,
            first_sample,
            peak,
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
    /// `eval_iters` fixed batches of the valid split; a mixture's over
    /// `eval_iters` batches of each corpus's valid split, and the mix as
    /// the weighted mean of the corpora's (what the blend scores in
    /// expectation).
    pub fn evaluate(&self) -> Result<Option<EvalEvent>> {
        if self.valid.is_empty() {
            return Ok(None);
        }
        let mut corpora = Vec::new();
        for v in &self.valid {
            let h = held_out(&self.model, &v.sampler, None, self.cfg.args.args.eval_iters, self.cfg.eval_batch, self.device, &self.par)?;
            corpora.push((v, h));
        }
        let total: f64 = corpora.iter().map(|(v, _)| v.weight).sum();
        // per mode: the weighted mean over the corpora whose batches had it
        let modes: Vec<ModeEval> = [Mode::Span, Mode::Sentence, Mode::Generation]
            .iter()
            .filter_map(|m| {
                let of: Vec<(f64, &ModeHeldOut)> = corpora.iter().filter_map(|(v, h)| h.modes.iter().find(|x| x.mode == *m).map(|x| (v.weight, x))).collect();
                (!of.is_empty()).then(|| {
                    let loss = weighted_mean(of.iter().map(|(w, x)| (*w, x.loss)));
                    let accuracy = weighted_mean(of.iter().map(|(w, x)| (*w, x.accuracy)));
                    ModeEval { mode: format!("{m:?}").to_lowercase(), loss, ppl: loss.exp(), accuracy, tokens: of.iter().map(|x| x.1.tokens as i64).sum() }
                })
            })
            .collect();
        if let [(_, h)] = corpora.as_slice() {
            let (loss, accuracy, tokens) = (h.loss, h.accuracy, h.tokens as i64);
            return Ok(Some(EvalEvent { iteration: self.iteration, loss, ppl: loss.exp(), accuracy, tokens, corpora: Vec::new(), modes }));
        }
        let (loss, accuracy) =
            (weighted_mean(corpora.iter().map(|(v, h)| (v.weight, h.loss))), weighted_mean(corpora.iter().map(|(v, h)| (v.weight, h.accuracy))));
        let each = corpora
            .iter()
            .map(|(v, h)| CorpusEval {
                name: v.name.clone(),
                weight: v.weight / total,
                loss: h.loss,
                ppl: h.loss.exp(),
                accuracy: h.accuracy,
                tokens: h.tokens as i64,
            })
            .collect();
        let tokens = corpora.iter().map(|(_, h)| h.tokens as i64).sum();
        Ok(Some(EvalEvent { iteration: self.iteration, loss, ppl: loss.exp(), accuracy, tokens, corpora: each, modes }))
    }

    /// Evaluates (when there is a valid split), prints the result and
    /// records it in the metrics.
    fn evaluate_and_report(&mut self, pb: &Option<indicatif::ProgressBar>) -> Result<()> {
        if let Some(e) = self.evaluate()? {
            let mix = if e.corpora.is_empty() { "" } else { " | mix (weighted mean)" };
            say(pb, &format!("validation at iteration {}{mix} | loss {:.4} | ppl {:.2} | accuracy {:.4}", e.iteration, e.loss, e.ppl, e.accuracy));
            for c in &e.corpora {
                say(
                    pb,
                    &format!(
                        "validation at iteration {} | {} ({:.1}%) | loss {:.4} | ppl {:.2} | accuracy {:.4}",
                        e.iteration,
                        c.name,
                        c.weight * 100.0,
                        c.loss,
                        c.ppl,
                        c.accuracy
                    ),
                );
            }
            self.metrics.eval(&e)?;
        }
        Ok(())
    }

    /// Cross-entropy on the validation targets of a unigram model fitted
    /// (add-one smoothed) to the targets of the first `fit_batches` training
    /// batches: the loss a model that knows only token frequencies reaches,
    /// measured exactly as `evaluate` measures the model (a mixture: the
    /// weighted mean over its corpora's valid splits).
    pub fn unigram_baseline(&self, fit_batches: u64) -> Option<f64> {
        if self.valid.is_empty() {
            return None;
        }
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
        let eb = self.cfg.eval_batch as u64;
        let (mut sum, mut weights) = (0.0, 0.0);
        for set in &self.valid {
            let (mut nll, mut n) = (0.0, 0u64);
            for i in 0..self.cfg.args.args.eval_iters {
                for s in set.sampler.batch(i, i * eb..(i + 1) * eb) {
                    for (t, m) in s.targets.iter().zip(&s.loss_mask) {
                        if *m == 1 {
                            nll -= (counts[*t as usize] / total).ln();
                            n += 1;
                        }
                    }
                }
            }
            sum += set.weight * nll / n.max(1) as f64;
            weights += set.weight;
        }
        Some(sum / weights)
    }

    /// Samples, tokens and epochs each training corpus has had after
    /// `iteration` (tokens: samples × seq_length; epochs: over the tokens of
    /// its training documents).
    pub fn corpus_use(&self, iteration: u64) -> Vec<CorpusUse> {
        let (now, first) = (self.train.consumed(iteration * self.cfg.batch.global as u64), self.train.consumed(self.first_sample));
        let samples: Vec<u64> = now.iter().zip(&first).map(|(n, f)| n.saturating_sub(*f)).collect();
        let seq = self.cfg.args.args.seq_length as u64;
        self.train
            .parts
            .iter()
            .zip(samples)
            .zip(&self.train_tokens)
            .map(|(((name, _), n), t)| CorpusUse { name: name.clone(), samples: n, tokens: n * seq, epochs: (n * seq) as f64 / (*t).max(1) as f64 })
            .collect()
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
            imported_from: None,
            first_sample: self.first_sample,
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
        let mut used = self.corpus_use(self.iteration);
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
            // documents are drawn with replacement: a corpus "runs out" when
            // the tokens drawn from it pass another multiple of its size
            let now = self.corpus_use(it);
            for ((c, before), tokens) in now.iter().zip(&used).zip(&self.train_tokens) {
                if c.epochs.floor() > before.epochs.floor() {
                    say(
                        &pb,
                        &format!(
                            "data: {} begins epoch {} at iteration {it} ({:.3} M tokens drawn from it; its training documents hold {:.3} M)",
                            c.name,
                            c.epochs.floor() as u64 + 1,
                            c.tokens as f64 / 1e6,
                            *tokens as f64 / 1e6
                        ),
                    );
                }
            }
            used = now;
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
                    mfu: self.peak.as_ref().map(|p| tps * flops_per_token / (p.flops * self.par.dims.world as f64)),
                    mem_mb: rss_mb(),
                    loss_scale: self.opt.scaler().map(|_| out.stats.loss_scale),
                    skipped,
                    ranks,
                    corpora: used.clone(),
                };
                let mut scale = e.mfu.map(|m| format!(" | MFU {:.1}%", m * 100.0)).unwrap_or_default();
                scale.push_str(&e.loss_scale.map(|s| format!(" | loss scale {s} | skipped {}", e.skipped)).unwrap_or_default());
                if self.train.is_mixture() {
                    let each: Vec<String> = used.iter().map(|c| format!("{} {:.3} ({:.2} M tokens)", c.name, c.epochs, c.tokens as f64 / 1e6)).collect();
                    scale.push_str(&format!(" | epochs {}", each.join(", ")));
                }
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
