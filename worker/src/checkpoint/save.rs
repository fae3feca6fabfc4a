//! Writing checkpoints: every rank's part of `save`, atomically installed,
//! and the whole-model directories `merge` and `split` write.
//!
//! A save has two halves, both collective and on the training thread, at
//! the same point on every rank. `begin` gathers the fp32 weights onto
//! each part's data-parallel rank 0, creates the part's temporary
//! directory and hands what this rank writes to a writer: inline, or a
//! background thread holding host copies of the tensors, so training goes
//! on. `InFlight::finish` waits for this rank's writer, agrees over the
//! world that every writer succeeded, collects the optimizer shards'
//! checksums onto each part's writer, writes `state.json`, installs every
//! part and moves `latest`. Only file writing leaves the training thread;
//! every collective stays on it, in the same order on every rank.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::write::{sync_dir, write_safetensors, write_synced};
use super::{layout_fingerprint, mp_rank_dir, shard_file, ShardFile, State, ZeroManifest};
use crate::data::store::sha256_file;
use crate::error::{Error, IoContext, Result};
use crate::model::glm::Glm;
use crate::model::params::Params;
use crate::optim::optimizer::Optimizer;
use crate::parallel::Parallel;

/// Points `<save>/latest` at iteration `it` (atomically). Call once every
/// part of the checkpoint is complete.
pub fn write_latest(save: &Path, it: u64) -> Result<()> {
    let latest_tmp = save.join(format!(".latest.tmp-{}", std::process::id()));
    write_synced(&latest_tmp, format!("{it}\n").as_bytes())?;
    std::fs::rename(&latest_tmp, save.join("latest")).at(save)?;
    // `latest` names the new checkpoint on the disk before keep_last may
    // remove an older one
    sync_dir(save)
}

/// Where a checkpoint's files are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writing {
    /// On the calling thread, from the buffers themselves: the caller
    /// waits for the files.
    Inline,
    /// On a background thread, from host copies taken by `begin`: training
    /// goes on updating its buffers meanwhile.
    Background,
}

/// How a rank's writer is doing, as `InFlight::progress` sees it without
/// waiting. Ordered: the largest over the ranks is the world's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// Written (or nothing to write).
    Written = 0,
    Writing = 1,
    Failed = 2,
}

/// Writes checkpoint `state.iteration` under `save` and points `latest` at
/// it, on the calling thread: `begin` with `Writing::Inline`, then
/// `InFlight::finish`. Collective over the world; returns the part this
/// rank wrote or contributed to.
pub fn save(save: &Path, model: &Glm, opt: &Optimizer, par: &Parallel, with_state: bool, tokenizer_json: &str, state: State) -> Result<PathBuf> {
    Ok(begin(save, model, opt, par, with_state, tokenizer_json, state, Writing::Inline)?.finish(par)?.dir)
}

/// Starts checkpoint `state.iteration` under `save`. Data-parallel rank 0
/// of every tensor-parallel rank writes its part (`<it>/`, or
/// `<it>/mp_rank_XX/` with tensor parallelism): the fp32 weights, the
/// tokenizer, `state.json`, and at ZeRO stage 0 the moments; at stages 1
/// and 2 every data-parallel rank writes its shard of the moments into the
/// part (the part's directory must be on a filesystem all its
/// data-parallel ranks share).
///
/// Collective over the world, on the training thread: the fp32 weights are
/// gathered onto each part's data-parallel rank 0 and the part's temporary
/// directory is created (agreed by every rank). The files are then written
/// as `writing` says: inline before this returns, or by a background
/// thread from host copies of the tensors, so training may go on. Either
/// way nothing is installed until `InFlight::finish`.
#[allow(clippy::too_many_arguments)]
pub fn begin(
    save: &Path,
    model: &Glm,
    opt: &Optimizer,
    par: &Parallel,
    with_state: bool,
    tokenizer_json: &str,
    mut state: State,
    writing: Writing,
) -> Result<InFlight> {
    let t0 = Instant::now();
    let it = state.iteration;
    let it_dir = save.join(it.to_string());
    let dir = match &par.tp {
        None => it_dir,
        Some(g) => it_dir.join(mp_rank_dir(g.rank)),
    };
    let (shards, dp_rank) = opt.shards();
    let partitioned = opt.partitioned() && with_state;
    // the optimizer's own account of its state: this rank's shard of the moments
    let optim = opt.state();
    // the one collective of the data (every data-parallel rank takes part):
    // the fp32 weights onto data-parallel rank 0
    let weights = opt.full_weights(&model.params)?;
    let main = par.dims.dp_rank() == 0;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    // one temporary directory per part, shared by its data-parallel ranks
    let tmp = parent.join(format!(".tmp-{name}"));
    let mut flight = InFlight {
        iteration: it,
        save: save.to_path_buf(),
        dir,
        tmp: tmp.clone(),
        main,
        rank: par.dims.rank,
        shards: partitioned.then_some((dp_rank, shards.dp)),
        state: None,
        with_state,
        writing,
        job: None,
        held: Duration::ZERO,
        finished: false,
    };
    flight.agree(
        par,
        if main { std::fs::remove_dir_all(&tmp).or(Ok(())).and_then(|_| std::fs::create_dir_all(&tmp)).at(&tmp) } else { Ok(()) },
        "create its part's directory",
    )?;
    // what the writer may hold: with a background writer, nothing training
    // updates in place (copies of the live buffers, on the host)
    let keep = |t: Tensor| -> Tensor {
        match writing {
            Writing::Inline => t,
            Writing::Background => tch::no_grad(|| {
                if t.device() != Device::Cpu {
                    t.detach().to_device(Device::Cpu)
                } else if opt.is_live(&model.params, &t) {
                    t.detach().copy()
                } else {
                    t
                }
            }),
        }
    };
    let shard = partitioned.then(|| (shard_file(dp_rank), keep(optim.exp_avg.shallow_clone()), keep(optim.exp_avg_sq.shallow_clone())));
    let part = if main {
        state.optimizer_step = optim.step;
        state.skipped_steps = optim.skipped_steps;
        state.precision = opt.precision();
        state.loss_scaler = optim.loss_scaler.clone();
        state.zero = partitioned.then(|| ZeroManifest {
            stage: opt.zero_config().stage,
            shards,
            numel: model.params.numel(),
            layout: layout_fingerprint(&model.params.infos),
            files: (0..shards.dp).map(|r| ShardFile { file: shard_file(r), dp_rank: r, pieces: shards.pieces(r) }).collect(),
        });
        flight.state = Some(state);
        let weights = keep(weights.expect("data-parallel rank 0 holds the weights"));
        let model_files: Vec<(String, Tensor)> = model.params.infos.iter().map(|i| (i.name.clone(), Params::view_of(&weights, i).detach())).collect();
        let optim_files: Option<Vec<(String, Tensor)>> = (with_state && !partitioned).then(|| {
            let (exp_avg, exp_avg_sq) = (keep(optim.exp_avg.shallow_clone()), keep(optim.exp_avg_sq.shallow_clone()));
            let mut named = Vec::new();
            for info in &model.params.infos {
                named.push((format!("exp_avg.{}", info.name), Params::view_of(&exp_avg, info)));
                named.push((format!("exp_avg_sq.{}", info.name), Params::view_of(&exp_avg_sq, info)));
            }
            named
        });
        Some(PartFiles { model: model_files, optim: optim_files, tokenizer_json: tokenizer_json.to_string() })
    } else {
        None
    };
    let job = Job { tmp, iteration: it, rank: par.dims.rank, shard, part };
    flight.job = Some(match writing {
        Writing::Inline => JobState::Done(job.run()),
        Writing::Background => match std::thread::Builder::new().name(format!("checkpoint-{it}")).spawn(move || job.run()) {
            Ok(h) => JobState::Running(h),
            Err(e) => JobState::Done((Err(Error::Runtime(format!("could not start the checkpoint writer thread: {e}"))), Duration::ZERO)),
        },
    });
    flight.held = t0.elapsed();
    Ok(flight)
}

/// What one rank writes into its part's temporary directory.
struct Job {
    tmp: PathBuf,
    iteration: u64,
    rank: usize,
    /// This rank's optimizer shard (ZeRO stages 1 and 2): file name and moments.
    shard: Option<(String, Tensor, Tensor)>,
    /// The part's files (data-parallel rank 0 of the part).
    part: Option<PartFiles>,
}

struct PartFiles {
    model: Vec<(String, Tensor)>,
    optim: Option<Vec<(String, Tensor)>>,
    tokenizer_json: String,
}

/// The checksums of what a rank's writer wrote.
#[derive(Default)]
struct Written {
    /// The part's files (its data-parallel rank 0): name -> sha256.
    files: BTreeMap<String, String>,
    /// This rank's optimizer shard's sha256.
    shard: Option<String>,
}

impl Job {
    /// Writes and checksums this rank's files; also how long it took.
    fn run(self) -> (Result<Written>, Duration) {
        let t0 = Instant::now();
        let r = self.write();
        (r, t0.elapsed())
    }

    fn write(self) -> Result<Written> {
        if let Some(release) = crate::test_hooks::hold_save() {
            while !release.exists() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let mut written = Written::default();
        let first = match (&self.shard, &self.part) {
            (Some((name, ..)), _) => Some(self.tmp.join(name)),
            (None, Some(_)) => Some(self.tmp.join("model.safetensors")),
            (None, None) => None,
        };
        if let Some(first) = first.filter(|_| crate::test_hooks::save_failure(self.rank).is_some_and(|its| its.contains(&self.iteration))) {
            std::fs::create_dir_all(&first).at(&first)?;
        }
        if let Some((name, exp_avg, exp_avg_sq)) = self.shard {
            let path = self.tmp.join(name);
            let named = [("exp_avg".to_string(), exp_avg), ("exp_avg_sq".to_string(), exp_avg_sq)];
            written.shard = Some(write_safetensors(&path, &named)?);
        }
        if let Some(p) = self.part {
            written.files = write_part_files(&self.tmp, &p.model, p.optim.as_deref(), &p.tokenizer_json)?;
        }
        Ok(written)
    }
}

enum JobState {
    Running(std::thread::JoinHandle<(Result<Written>, Duration)>),
    Done((Result<Written>, Duration)),
}

/// A checkpoint `begin` started: its files written (inline) or being
/// written (in the background). `finish` installs it; dropped unfinished
/// (the run failed elsewhere), it waits for its writer and removes its
/// temporary directory.
pub struct InFlight {
    iteration: u64,
    save: PathBuf,
    dir: PathBuf,
    tmp: PathBuf,
    /// Data-parallel rank 0 of its part: writes the part's files and
    /// `state.json`, and installs the part.
    main: bool,
    /// World rank, for messages.
    rank: usize,
    /// This rank's index among its part's data-parallel ranks and their
    /// number, when each writes an optimizer shard whose checksum the
    /// part's `state.json` lists.
    shards: Option<(usize, usize)>,
    /// The part's `state.json` but for the checksums (on `main`).
    state: Option<State>,
    with_state: bool,
    writing: Writing,
    job: Option<JobState>,
    /// Time the calling thread spent in `begin` (and then `finish`).
    held: Duration,
    finished: bool,
}

/// A checkpoint installed by `InFlight::finish`.
#[derive(Clone, Debug)]
pub struct Finished {
    pub iteration: u64,
    /// The part this rank wrote or contributed to.
    pub dir: PathBuf,
    pub writing: Writing,
    /// Time the training thread spent on it (`begin` and `finish`, the wait
    /// for the writer included).
    pub held: Duration,
    /// Time this rank's writer took.
    pub wrote: Duration,
}

impl InFlight {
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// How this rank's writer is doing, without waiting for it.
    pub fn progress(&mut self) -> Progress {
        if let Some(JobState::Running(h)) = &self.job {
            if !h.is_finished() {
                return Progress::Writing;
            }
        }
        match &self.wait().0 {
            Ok(_) => Progress::Written,
            Err(_) => Progress::Failed,
        }
    }

    /// Waits for this rank's writer.
    fn wait(&mut self) -> &(Result<Written>, Duration) {
        if matches!(self.job, Some(JobState::Running(_))) {
            let Some(JobState::Running(h)) = self.job.take() else { unreachable!() };
            let done = h.join().unwrap_or_else(|p| {
                (Err(Error::Runtime(format!("the checkpoint writer failed: {}", crate::runtime::report::panic_summary(p.as_ref())))), Duration::ZERO)
            });
            self.job = Some(JobState::Done(done));
        }
        match &self.job {
            Some(JobState::Done(d)) => d,
            _ => unreachable!("a job is set by begin"),
        }
    }

    /// Waits for this rank's writer, then, agreed over the world phase by
    /// phase (so a failure on any rank stops every rank's save with an
    /// error, and the failing rank's names itself and the path): gathers
    /// the optimizer shards' checksums onto each part's data-parallel rank
    /// 0, writes `state.json`, renames every part into place, and points
    /// `latest` at the checkpoint. Collective over the world, on the
    /// training thread, at the same point on every rank. On failure nothing
    /// is installed and `latest` still names the previous checkpoint.
    pub fn finish(mut self, par: &Parallel) -> Result<Finished> {
        let t0 = Instant::now();
        let (written, wrote) = {
            let (r, d) = self.wait();
            (r.as_ref().map(|w| (w.files.clone(), w.shard.clone())).map_err(|e| Error::Runtime(e.to_string())), *d)
        };
        let (mut files, shard) = self.agree(par, written, "write its files")?;
        // every optimizer shard's checksum onto its part's writer
        if let Some((r, n)) = self.shards {
            let mut t = Tensor::zeros([n as i64, 32], (Kind::Int64, Device::Cpu));
            if let Some(bytes) = shard.as_deref().and_then(unhex) {
                t.get(r as i64).copy_(&Tensor::from_slice(&bytes.iter().map(|&b| i64::from(b)).collect::<Vec<_>>()));
            }
            par.dp_sum(&mut t)?;
            if self.main {
                for q in 0..n {
                    let row: Vec<i64> = Vec::<i64>::try_from(t.get(q as i64)).unwrap_or_default();
                    files.insert(shard_file(q), row.iter().map(|b| format!("{:02x}", *b as u8)).collect());
                }
            }
        }
        let state = self.state.take();
        let stated = match state {
            Some(st) if self.main => write_state(&self.tmp, st, files, self.with_state),
            _ => Ok(()),
        };
        self.agree(par, stated, "write its state.json")?;
        // every part is complete: install them, then point `latest` at them
        let installed = if self.main { install(&self.tmp, &self.dir) } else { Ok(()) };
        self.agree(par, installed, "install its part")?;
        let latest = if par.is_main() { write_latest(&self.save, self.iteration) } else { Ok(()) };
        self.finished = true;
        if par.world_max(i64::from(latest.is_err()))? != 0 {
            let it = self.iteration;
            return Err(latest.err().unwrap_or_else(|| {
                Error::Runtime(format!("checkpoint of iteration {it}: rank 0 could not update {} (see its error)", self.save.join("latest").display()))
            }));
        }
        Ok(Finished { iteration: self.iteration, dir: self.dir.clone(), writing: self.writing, held: self.held + t0.elapsed(), wrote })
    }

    /// This rank's result `r` of a phase, agreed over the world: every rank
    /// goes on only when every rank succeeded; otherwise the temporary
    /// directory goes, and each rank returns an error (the failing one its
    /// own, naming its rank, the others that another rank failed).
    fn agree<T>(&mut self, par: &Parallel, r: Result<T>, what: &str) -> Result<T> {
        let ok = r.is_ok();
        if par.world_max(i64::from(!ok))? == 0 {
            return r;
        }
        self.cleanup();
        let it = self.iteration;
        let previous = match std::fs::read_to_string(self.save.join("latest")) {
            Ok(l) => format!("; latest still names iteration {}", l.trim()),
            Err(_) => String::new(),
        };
        Err(match r {
            Err(e) => Error::Runtime(format!("checkpoint of iteration {it}: rank {} could not {what}: {e}; nothing was installed{previous}", self.rank)),
            Ok(_) => Error::Runtime(format!("checkpoint of iteration {it}: another rank failed to {what} (see its error); nothing was installed{previous}")),
        })
    }

    /// Waits for this rank's writer and removes the part's temporary directory.
    fn cleanup(&mut self) {
        self.finished = true;
        if self.job.is_some() {
            self.wait();
        }
        if self.main {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if !self.finished {
            self.cleanup();
        }
    }
}

/// The bytes of a lowercase hex string.
fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

/// Writes a part's files into `tmp`: weights, optimizer state when given,
/// tokenizer; their sha256 by name.
fn write_part_files(tmp: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str) -> Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    files.insert("model.safetensors".into(), write_safetensors(&tmp.join("model.safetensors"), model)?);
    if let Some(optim) = optim {
        files.insert("optim.safetensors".into(), write_safetensors(&tmp.join("optim.safetensors"), optim)?);
    }
    let tp = tmp.join("tokenizer.json");
    write_synced(&tp, tokenizer_json.as_bytes())?;
    files.insert("tokenizer.json".into(), sha256_file(&tp)?);
    Ok(files)
}

/// Writes `state.json` into `tmp`, listing `files` (name -> sha256).
fn write_state(tmp: &Path, mut state: State, files: BTreeMap<String, String>, with_state: bool) -> Result<()> {
    state.files = files;
    state.has_optimizer = with_state;
    let sp = tmp.join("state.json");
    write_synced(&sp, serde_json::to_string_pretty(&state).expect("state serialises").as_bytes())?;
    // every file of the part is on the disk, and the directory's entries
    sync_dir(tmp)
}

/// Writes a part's files into `tmp`: weights, optimizer state, tokenizer,
/// `state.json` with every file's sha256.
fn fill_dir(tmp: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str, state: State, with_state: bool) -> Result<()> {
    let files = write_part_files(tmp, model, optim, tokenizer_json)?;
    write_state(tmp, state, files, with_state)
}

/// Renames the complete part `tmp` to `dir`. An older `dir` (the same
/// iteration saved again) is moved aside first and deleted only after the
/// new one is in place, so a crash in between leaves one of them intact.
fn install(tmp: &Path, dir: &Path) -> Result<()> {
    let old = dir.with_file_name(format!(".old-{}", dir.file_name().unwrap_or_default().to_string_lossy()));
    let had_old = dir.exists();
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).at(dir)?;
    }
    std::fs::rename(tmp, dir).at(dir)?;
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(())
}

/// Writes one checkpoint directory — weights, optimizer state when given,
/// tokenizer, and `state.json` with every file's sha256 — into a temporary
/// sibling, then renames it to `dir`. An existing `dir` is refused (merge
/// and split never overwrite).
pub(super) fn write_dir(dir: &Path, model: &[(String, Tensor)], optim: Option<&[(String, Tensor)]>, tokenizer_json: &str, state: State) -> Result<()> {
    if dir.exists() {
        return Err(Error::invalid(dir, "exists; refusing to overwrite (choose a new --out)"));
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).at(parent)?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy().to_string();
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).at(&tmp)?;
    let result = fill_dir(&tmp, model, optim, tokenizer_json, state, optim.is_some()).and_then(|_| install(&tmp, dir));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
