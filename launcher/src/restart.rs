//! Automatic restart (`--max-restarts N`, torchrun's name) and elastic
//! shrink (`--min-nodes M`): after a failed job, whether to start it again,
//! from which checkpoint, and the record of each restart in the run
//! directory's `restarts.jsonl`.
//!
//! The rules:
//! - a stop signal to glm-launch is never restarted;
//! - a first attempt that fails before any rank reached its first iteration
//!   is not restarted (a configuration, data or environment error, which a
//!   restart would only repeat);
//! - a failure with the same cause, on the same rank, as the failure before
//!   it, with no newer checkpoint saved in between, is not restarted again (a
//!   fault that the checkpoint reproduces: e.g. a rank that always crashes
//!   on one batch); a restart that got further and saved goes on;
//! - otherwise, up to N restarts, each from the latest complete checkpoint in
//!   the save directory (`load=<save>`, its optimizer state and schedule
//!   included), or from scratch when there is none yet (`overwrite=true`,
//!   where glm-launch sees the directory holds no checkpoint: the failed
//!   attempt's metrics go; nothing is removed where it cannot see).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, Result};

use glm_common::launch::is_checkpoint_dir;

use crate::supervise::Failure;

/// The latest complete checkpoint under `save`: its iteration and when it
/// was installed (the `latest` file names it, and the checkpoint's
/// directory holds its `state.json`, or one per tensor-parallel part).
pub fn latest_checkpoint(save: &Path) -> Option<(u64, SystemTime)> {
    let latest = save.join("latest");
    let it: u64 = std::fs::read_to_string(&latest).ok()?.trim().parse().ok()?;
    let complete = is_checkpoint_dir(&save.join(it.to_string()));
    let when = std::fs::metadata(&latest).and_then(|m| m.modified()).ok()?;
    complete.then_some((it, when))
}

/// A failure and the latest checkpoint when it happened.
#[derive(Clone, Debug)]
pub struct Seen {
    pub failure: Failure,
    pub checkpoint: Option<u64>,
}

/// Why failure `now` (`checkpoint`: the latest checkpoint now) is not
/// restarted, or `None` when it is; `previous`: the failure before it.
pub fn refuse(now: &Seen, previous: Option<&Seen>, attempt: usize, max_restarts: usize, signalled: bool) -> Option<String> {
    let failure = &now.failure;
    if signalled {
        return Some("stopped by a signal to glm-launch: not restarted".into());
    }
    if max_restarts == 0 {
        return Some(String::new());
    }
    if attempt == 0 && failure.iteration == 0 {
        return Some(
            "the job failed before its first iteration (a configuration, data or environment error that a restart would repeat): not restarted".into(),
        );
    }
    if let Some(p) = previous {
        if p.failure.cause == failure.cause && p.failure.rank == failure.rank && p.checkpoint == now.checkpoint {
            return Some(format!(
                "the same failure as the attempt before ({}, rank {}) before any newer checkpoint ({}): a fault the checkpoint reproduces, not restarted again",
                failure.cause,
                failure.rank.map_or("?".into(), |r| r.to_string()),
                now.checkpoint.map_or("none yet".to_string(), |c| format!("the latest is still {c}"))
            ));
        }
    }
    if attempt >= max_restarts {
        return Some(format!("{max_restarts} restart(s) used (--max-restarts {max_restarts}): not restarted again"));
    }
    None
}

/// One line of `restarts.jsonl`.
#[derive(serde::Serialize, Debug)]
pub struct Record {
    /// Seconds since the Unix epoch, when the failure was seen.
    pub time: f64,
    /// The restart this starts (1 for the first).
    pub restart: usize,
    pub cause: String,
    pub rank: Option<usize>,
    pub host: Option<String>,
    /// The furthest iteration the ranks' heartbeats had reported (they come
    /// every heartbeat interval, and at the first iteration).
    pub iteration: u64,
    /// The checkpoint iteration the restart resumes from (`null`: from scratch).
    pub resumed_from: Option<u64>,
    /// Training time lost: from the later of the checkpoint's installation
    /// and the failed attempt's start, to the failure.
    pub lost_s: f64,
    /// Hosts left out after failing the preflight (elastic shrink).
    pub dropped_hosts: Vec<String>,
    /// Workers of the restarted job.
    pub world: usize,
    /// `--set`s added to the workers' arguments for this restart.
    pub sets: Vec<String>,
}

impl Record {
    /// A further shrink within restart `restart` (its preflight failed again).
    pub fn shrink(restart: usize) -> Record {
        Record {
            time: unix(SystemTime::now()),
            restart,
            cause: "preflight failed again".into(),
            rank: None,
            host: None,
            iteration: 0,
            resumed_from: None,
            lost_s: 0.0,
            dropped_hosts: Vec::new(),
            world: 0,
            sets: Vec::new(),
        }
    }

    pub fn append(&self, run_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("{}: cannot create the run directory", run_dir.display()))?;
        let p = run_dir.join("restarts.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_context(|| format!("{}: cannot open", p.display()))?;
        writeln!(f, "{}", serde_json::to_string(self)?).with_context(|| format!("{}: cannot write", p.display()))?;
        Ok(p)
    }
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// Whether glm-launch sees `save` and it holds no checkpoint at all (no
/// `latest`, no checkpoint directory with a `state.json`, as the worker
/// counts them; an unfinished tensor-parallel save's `<it>/.tmp-mp_rank_XX`
/// is none): a failed attempt's metrics at most.
fn holds_no_checkpoint(save: &Path) -> bool {
    let Ok(rd) = std::fs::read_dir(save) else { return false };
    !save.join("latest").exists() && !rd.flatten().any(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) && is_checkpoint_dir(&e.path()))
}

/// The `--set`s that make a restart resume from `save`'s latest checkpoint
/// (`latest`: what [`latest_checkpoint`] found there when the failure was seen)
/// (with its optimizer state and learning-rate schedule, whatever the first
/// attempt's `no_load_optim` / `no_load_lr_scheduler` said of the checkpoint
/// it started from), or start again from scratch: with `overwrite=true`
/// (the failed attempt left its metrics, which a fresh run would refuse to
/// replace) only where glm-launch sees the directory and it holds no
/// checkpoint; where it cannot see it, nothing is added, and the worker
/// refuses a directory that holds a run rather than anything being removed.
pub fn resume_sets(save: &Path, latest: Option<u64>) -> (Vec<String>, Option<u64>) {
    match latest {
        Some(it) => (vec![format!("load={}", save.display()), "no_load_optim=false".into(), "no_load_lr_scheduler=false".into()], Some(it)),
        None if holds_no_checkpoint(save) => (vec!["overwrite=true".to_string()], None),
        None => (Vec::new(), None),
    }
}

/// The keys `resume_sets` may add (a later restart replaces them).
pub const RESUME_KEYS: &[&str] = &["load=", "overwrite=", "no_load_optim=", "no_load_lr_scheduler="];

#[cfg(test)]
mod tests {
    use super::*;

    fn f(cause: &str, rank: usize, iteration: u64) -> Failure {
        Failure { cause: cause.into(), rank: Some(rank), host: None, iteration }
    }

    #[test]
    fn the_restart_rules() {
        let seen = |cause: &str, rank: usize, iteration: u64, checkpoint: Option<u64>| Seen { failure: f(cause, rank, iteration), checkpoint };
        let kill = seen("killed by signal 9 (Killed)", 1, 5, Some(4));
        assert_eq!(refuse(&kill, None, 0, 2, false), None);
        assert!(refuse(&kill, None, 0, 2, true).unwrap().contains("signal"));
        assert_eq!(refuse(&kill, None, 0, 0, false), Some(String::new()), "no restarts asked for");
        let early = seen("exit code 1", 0, 0, None);
        assert!(refuse(&early, None, 0, 2, false).unwrap().contains("before its first iteration"));
        assert_eq!(refuse(&early, Some(&kill), 1, 2, false), None, "a restart that fails early is retried once more");
        assert!(refuse(&kill, Some(&kill), 1, 5, false).unwrap().contains("the same failure"));
        assert_eq!(refuse(&seen("killed by signal 9 (Killed)", 1, 7, Some(6)), Some(&kill), 1, 5, false), None, "it got further and saved");
        assert_eq!(refuse(&seen("killed by signal 9 (Killed)", 2, 5, Some(4)), Some(&kill), 1, 5, false), None, "another rank");
        assert!(refuse(&seen("collective timeout", 1, 9, Some(8)), Some(&kill), 2, 2, false).unwrap().contains("2 restart(s) used"));
    }

    fn latest(save: &Path) -> Option<u64> {
        latest_checkpoint(save).map(|(it, _)| it)
    }

    #[test]
    fn the_latest_complete_checkpoint_is_found() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(latest_checkpoint(d.path()), None);
        assert_eq!(resume_sets(d.path(), latest(d.path())), (vec!["overwrite=true".to_string()], None));
        assert_eq!(resume_sets(&d.path().join("unseen"), None), (vec![], None), "a directory glm-launch cannot see: nothing removed");
        std::fs::create_dir_all(d.path().join("2/.tmp-mp_rank_00")).unwrap();
        assert_eq!(resume_sets(d.path(), latest(d.path())).0, ["overwrite=true"], "an unfinished tensor-parallel save is no checkpoint");
        std::fs::write(d.path().join("latest"), "4\n").unwrap();
        assert_eq!(latest_checkpoint(d.path()), None, "latest names a checkpoint that is not there");
        assert_eq!(resume_sets(d.path(), latest(d.path())), (vec![], None), "not complete, not empty: nothing removed");
        std::fs::create_dir_all(d.path().join("4/mp_rank_00")).unwrap();
        std::fs::write(d.path().join("4/mp_rank_00/state.json"), "{}").unwrap();
        assert_eq!(latest_checkpoint(d.path()).map(|(i, _)| i), Some(4));
        let sets = resume_sets(d.path(), latest(d.path())).0;
        assert_eq!(sets, [format!("load={}", d.path().display()), "no_load_optim=false".into(), "no_load_lr_scheduler=false".into()]);
        assert!(sets.iter().all(|s| RESUME_KEYS.iter().any(|k| s.starts_with(k))));
    }
}
