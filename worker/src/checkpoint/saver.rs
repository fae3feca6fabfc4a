//! When a training run saves and what it keeps: at most one checkpoint in
//! flight, written in the background or inline (`checkpoint.writer.decoupled`),
//! saves by the clock (`save_interval_minutes`) agreed over the world, and
//! the newest `keep_last` complete checkpoints kept.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::save::{begin, Finished, InFlight, Progress, Writing};
use super::State;
use crate::error::Result;
use crate::model::glm::Glm;
use crate::optim::optimizer::Optimizer;
use crate::parallel::Parallel;

/// How a run saves, besides `save_interval`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SaverConfig {
    pub writing: Writing,
    /// Keep the newest N complete checkpoints (0: all).
    pub keep_last: usize,
    /// Save when this much time has passed since the last save began
    /// (`save_interval_minutes`).
    pub every: Option<Duration>,
    /// Checkpoints hold the optimizer state (not `no_save_optim`).
    pub with_state: bool,
}

/// A run's checkpoints under `save`: the one being written, the clock of
/// `save_interval_minutes`, and `keep_last`.
pub struct Saver {
    save: PathBuf,
    cfg: SaverConfig,
    in_flight: Option<InFlight>,
    /// When the last save began (or training did).
    clock: Instant,
    /// Whether this rank reads the clock (every rank, unless a test hook
    /// says one).
    clock_counts: bool,
}

/// What every rank learns after an iteration, in one all-reduce.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreed {
    /// The stop signal that reached any rank (0: none).
    pub signal: i32,
    /// `save_interval_minutes` have passed on some rank's clock.
    pub clock: bool,
    /// How the checkpoint in flight is doing over the world: `Written` when
    /// every rank's writer is done, `Failed` when one failed. Known only
    /// when neither of the above holds (they save, and saving waits for
    /// it); `Writing` otherwise.
    pub writer: Progress,
}

/// A saved checkpoint, for the log.
#[derive(Clone, Debug)]
pub struct Saved {
    pub finished: Finished,
    /// Checkpoints `keep_last` removed (rank 0).
    pub removed: Vec<PathBuf>,
    /// Why one could not be removed (rank 0; the run goes on).
    pub remove_failed: Option<String>,
}

impl Saver {
    pub fn new(save: &Path, cfg: SaverConfig, rank: usize) -> Self {
        Saver { save: save.to_path_buf(), cfg, in_flight: None, clock: Instant::now(), clock_counts: crate::test_hooks::save_clock_counts(rank) }
    }

    pub fn config(&self) -> SaverConfig {
        self.cfg
    }

    /// Starts the clock of `save_interval_minutes` (training begins).
    pub fn restart_clock(&mut self) {
        self.clock = Instant::now();
    }

    /// The iteration of the checkpoint in flight.
    pub fn in_flight(&self) -> Option<u64> {
        self.in_flight.as_ref().map(InFlight::iteration)
    }

    /// After an iteration, every rank learns at once whether any rank was
    /// signalled to stop, whether a save is due by the clock on any rank,
    /// and how the checkpoint in flight is doing: one max all-reduce over
    /// the world of `signal << 3 | clock << 2 | writer`. Where a rank is
    /// signalled or due by the clock, the writer's state is lost in the
    /// max; it is not needed then (a save follows, which waits for it).
    pub fn agree(saver: Option<&mut Saver>, par: &Parallel, signal: i32) -> Result<Agreed> {
        let (clock, writer) = match saver {
            Some(s) => {
                let due = s.cfg.every.is_some_and(|e| s.clock_counts && s.clock.elapsed() >= e);
                let writer = s.in_flight.as_mut().map_or(Progress::Written, InFlight::progress);
                (due, writer)
            }
            None => (false, Progress::Written),
        };
        let v = par.world_max((i64::from(signal.max(0)) << 3) | (i64::from(clock) << 2) | writer as i64)?;
        let (signal, clock) = ((v >> 3) as i32, (v >> 2) & 1 == 1);
        let writer = match v & 3 {
            _ if signal != 0 || clock => Progress::Writing,
            0 => Progress::Written,
            1 => Progress::Writing,
            _ => Progress::Failed,
        };
        Ok(Agreed { signal, clock, writer })
    }

    /// Installs the checkpoint in flight, waiting for its writers (`say`
    /// is told when it must wait), then removes what `keep_last` no longer
    /// keeps. Collective; every rank calls it at the same iteration.
    pub fn finish(&mut self, par: &Parallel, writer: Progress, say: &dyn Fn(&str)) -> Result<Option<Saved>> {
        let Some(mut flight) = self.in_flight.take() else { return Ok(None) };
        // this rank's writer is still at it: the training thread waits
        if writer == Progress::Writing && flight.progress() == Progress::Writing {
            say(&format!("checkpoint: waiting for the checkpoint of iteration {} to be written (at most one save in flight)", flight.iteration()));
        }
        let finished = flight.finish(par)?;
        let (removed, remove_failed) = match (self.cfg.keep_last, par.is_main()) {
            (n, true) if n > 0 => prune(&self.save, finished.iteration, n),
            _ => (Vec::new(), None),
        };
        Ok(Some(Saved { finished, removed, remove_failed }))
    }

    /// Begins checkpoint `state.iteration` (the one in flight must be
    /// finished first) and restarts the clock. Collective.
    pub fn begin(&mut self, model: &Glm, opt: &Optimizer, par: &Parallel, tokenizer_json: &str, state: State) -> Result<()> {
        assert!(self.in_flight.is_none(), "at most one checkpoint in flight");
        self.clock = Instant::now();
        self.in_flight = Some(begin(&self.save, model, opt, par, self.cfg.with_state, tokenizer_json, state, self.cfg.writing)?);
        Ok(())
    }
}

/// Removes the checkpoints of `save` beyond the newest `keep` complete
/// ones at or below iteration `latest` (which is always kept). Checkpoints
/// above `latest` — another line of the run, from before it resumed from
/// an earlier one — are left alone until the run passes them. Each is
/// renamed to `.deleting-<it>` before it is removed, so a crash midway
/// leaves no half-deleted checkpoint under its name (the next prune
/// removes the rest). Returns what was removed, and why one could not be.
pub fn prune(save: &Path, latest: u64, keep: usize) -> (Vec<PathBuf>, Option<String>) {
    let Ok(rd) = std::fs::read_dir(save) else { return (Vec::new(), None) };
    let mut its: Vec<u64> = Vec::new();
    let mut leftovers: Vec<PathBuf> = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(".deleting-") {
            leftovers.push(e.path());
        } else if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) && e.path().is_dir() {
            if let Ok(it) = name.parse::<u64>() {
                its.push(it);
            }
        }
    }
    its.sort_unstable_by(|a, b| b.cmp(a));
    // the newest complete ones at or below latest, latest first
    let complete = |it: u64| super::part_dirs(&save.join(it.to_string())).is_ok();
    let mut kept = 0;
    let mut doomed = Vec::new();
    for it in its.into_iter().filter(|&it| it <= latest) {
        if it == latest || (kept < keep && complete(it)) {
            kept += 1;
        } else {
            doomed.push(it);
        }
    }
    let (mut removed, mut failed) = (Vec::new(), None);
    for it in doomed {
        let dir = save.join(it.to_string());
        let gone = save.join(format!(".deleting-{it}"));
        match std::fs::rename(&dir, &gone).and_then(|()| std::fs::remove_dir_all(&gone)) {
            Ok(()) => removed.push(dir),
            Err(e) => {
                failed.get_or_insert(format!("keep_last {keep}: could not remove {}: {e}", dir.display()));
            }
        }
    }
    for l in leftovers {
        let _ = std::fs::remove_dir_all(l);
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(save: &Path, it: u64) {
        let d = save.join(it.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state.json"), "{}").unwrap();
    }

    fn names(save: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(save).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn prune_keeps_the_newest_complete_ones_and_latest() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        for it in [2, 4, 6, 8] {
            checkpoint(s, it);
        }
        // an incomplete one (no state.json) does not count towards keep
        std::fs::create_dir_all(s.join("7")).unwrap();
        std::fs::create_dir_all(s.join("8-merged")).unwrap();
        std::fs::create_dir_all(s.join(".deleting-1")).unwrap();
        let (removed, failed) = prune(s, 8, 2);
        assert!(failed.is_none());
        assert_eq!(removed.len(), 3, "{removed:?}");
        assert_eq!(names(s), ["6", "8", "8-merged"]);
        // keep 1 keeps latest alone; one above latest (another line of
        // the run, before a resume from an earlier one) is left alone
        checkpoint(s, 10);
        let (removed, _) = prune(s, 8, 1);
        assert_eq!(removed, vec![s.join("6")]);
        assert_eq!(names(s), ["10", "8", "8-merged"]);
    }
}
