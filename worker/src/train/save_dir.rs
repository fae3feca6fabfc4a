//! The save directory's safety: a run owns it for its lifetime, and a finished
//! run in it is never replaced by accident.
//!
//! - **One run at a time.** Rank 0 holds an exclusive `flock` on
//!   `<save>/.lock` while the run lives (the kernel releases it when the
//!   process ends, however it ends). The file names the holder (pid, host,
//!   start time, command), so a second run is told who has the directory.
//! - **No silent restart.** A fresh run (no `load`) into a directory that
//!   already holds a run — a `latest`, a checkpoint or `metrics.jsonl` — is
//!   refused with what to do instead: resume it (`load=<save>`), pick another
//!   directory, or say `overwrite=true`, which removes that run's
//!   checkpoints, metrics and curve first (and only those). Resuming another
//!   run's checkpoint into a directory holding a third run is refused the
//!   same way.
//!
//! Rank 0 decides; every rank learns the verdict through one world-wide
//! agreement, so all stop together with rank 0's reason.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::parallel::Parallel;

/// Held for the run's lifetime: the lock on `<save>/.lock` (rank 0 only).
#[derive(Debug)]
pub struct SaveDirLock {
    _file: Option<std::fs::File>,
}

/// What `dir` holds of an earlier run: its `latest` iteration (if any) and
/// the entries that belong to it (checkpoint directories, `latest`,
/// `metrics.jsonl`, `loss.png`).
fn earlier_run(dir: &Path) -> Result<(Option<String>, Vec<PathBuf>)> {
    let mut entries = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, entries)),
        Err(e) => return Err(e).at(dir),
    };
    let mut checkpoints = false;
    for e in rd {
        let e = e.at(dir)?;
        let name = e.file_name().to_string_lossy().into_owned();
        let p = e.path();
        let is_checkpoint = name.bytes().all(|b| b.is_ascii_digit()) && glm_common::launch::is_checkpoint_dir(&p);
        if is_checkpoint {
            checkpoints = true;
        }
        if is_checkpoint || ((name == "latest" || name == "metrics.jsonl" || name == "loss.png") && p.is_file()) {
            entries.push(p);
        }
    }
    let latest = std::fs::read_to_string(dir.join("latest")).ok().map(|t| t.trim().to_string());
    let holds_run = checkpoints || latest.is_some() || dir.join("metrics.jsonl").is_file();
    if !holds_run {
        entries.clear();
    }
    entries.sort();
    Ok((latest, entries))
}

/// Whether `load` names `save` itself or a checkpoint inside it (a resume
/// of the run saved there).
fn resumes_from(save: &Path, load: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (s, l) = (canon(save), canon(load));
    l == s || l.parent() == Some(s.as_path())
}

/// Who holds the lock, from the lock file's text.
fn holder(text: &str) -> String {
    let t = text.trim();
    if t.is_empty() {
        "another process".into()
    } else {
        t.to_string()
    }
}

/// Takes the lock and checks the directory; rank 0's part of `claim`.
fn claim_here(save: &Path, load: Option<&Path>, overwrite: bool) -> Result<SaveDirLock> {
    std::fs::create_dir_all(save).at(save)?;
    let path = save.join(".lock");
    let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).at(&path)?;
    // SAFETY: a valid descriptor of the open lock file.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::invalid(
            save,
            format!("in use by another run ({}); two runs must not write one save directory: wait for it, stop it, or choose another `save`", holder(&text)),
        ));
    }
    let (latest, entries) = earlier_run(save)?;
    let resuming = load.is_some_and(|l| resumes_from(save, l));
    if !entries.is_empty() && !resuming {
        let what = match &latest {
            Some(it) => format!("the checkpoints of a run (latest: iteration {it})"),
            None => "an earlier run's checkpoints or metrics".to_string(),
        };
        if !overwrite {
            let why = match load {
                None => "this fresh run would replace its metrics and move `latest` back".to_string(),
                Some(l) => format!("this run resumes {} instead, and would mix the two runs' checkpoints and metrics", l.display()),
            };
            return Err(Error::invalid(
                save,
                format!(
                    "already holds {what}; {why}. Resume that run with --set load={}, choose another `save`, or start over with --set overwrite=true (removes that run's checkpoints, metrics and curve)",
                    glm_common::text::shell_word(&save.display().to_string())
                ),
            ));
        }
        println!("overwrite: removing the earlier run in {} ({} entries: {what})", save.display(), entries.len());
        for e in &entries {
            let r = if e.is_dir() { std::fs::remove_dir_all(e) } else { std::fs::remove_file(e) };
            r.at(e)?;
        }
    }
    sweep_temporaries(save)?;
    let host = crate::runtime::host::hostname();
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let cmd: Vec<String> = std::env::args().collect();
    f.set_len(0).at(&path)?;
    writeln!(f, "pid {} on {} since unix time {secs}: {}", std::process::id(), host, cmd.join(" ")).at(&path)?;
    Ok(SaveDirLock { _file: Some(f) })
}

/// Removes what an earlier run's unfinished saves left in `save` (it held
/// the lock, which is ours now, so none of it is in use): `.tmp-<it>`,
/// `.old-<it>` and `.deleting-<it>` directories, and a tensor-parallel
/// checkpoint's `<it>/.tmp-mp_rank_XX` parts (with `<it>` itself when
/// nothing else is in it). A process killed mid-save (SIGKILL, the
/// collective watchdog's exit) cleans up nothing itself.
fn sweep_temporaries(save: &Path) -> Result<()> {
    let is_temp = |n: &str| [".tmp-", ".old-", ".deleting-"].iter().any(|p| n.starts_with(p));
    for e in std::fs::read_dir(save).at(save)?.flatten() {
        let (name, p) = (e.file_name().to_string_lossy().into_owned(), e.path());
        if !p.is_dir() {
            continue;
        }
        if is_temp(&name) {
            std::fs::remove_dir_all(&p).at(&p)?;
        } else if name.bytes().all(|b| b.is_ascii_digit()) {
            let parts: Vec<PathBuf> = std::fs::read_dir(&p).at(&p)?.flatten().map(|x| x.path()).collect();
            let temps: Vec<&PathBuf> = parts.iter().filter(|x| x.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-mp_rank_"))).collect();
            for t in &temps {
                std::fs::remove_dir_all(t).at(t)?;
            }
            if !temps.is_empty() && temps.len() == parts.len() {
                std::fs::remove_dir(&p).at(&p)?;
            }
        }
    }
    Ok(())
}

/// Claims `save` for this run: rank 0 locks and checks it, and every rank
/// returns rank 0's verdict (an error on rank 0 is an error everywhere).
pub fn claim(save: &Path, load: Option<&Path>, overwrite: bool, par: &Parallel) -> Result<SaveDirLock> {
    par.main_first(&format!("claiming the save directory {}", save.display()), || {
        if par.is_main() {
            claim_here(save, load, overwrite)
        } else {
            Ok(SaveDirLock { _file: None })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_runs_unfinished_saves_are_swept() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        for dir in [".tmp-8", ".old-6", ".deleting-4", "10/.tmp-mp_rank_00", "12/mp_rank_00", "12/.tmp-mp_rank_01", "notes"] {
            std::fs::create_dir_all(s.join(dir)).unwrap();
        }
        std::fs::write(s.join("12/mp_rank_00/state.json"), "{}").unwrap();
        sweep_temporaries(s).unwrap();
        let mut left: Vec<String> = walk(s);
        left.sort();
        assert_eq!(left, ["12", "12/mp_rank_00", "12/mp_rank_00/state.json", "notes"]);
    }

    fn walk(d: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            out.push(p.file_name().unwrap().to_string_lossy().into_owned());
            if p.is_dir() {
                out.extend(walk(&p).into_iter().map(|c| format!("{}/{c}", p.file_name().unwrap().to_string_lossy())));
            }
        }
        out
    }

    #[test]
    fn what_counts_as_an_earlier_run() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path();
        assert_eq!(earlier_run(&s.join("missing")).unwrap(), (None, vec![]));
        std::fs::create_dir_all(s.join("notes")).unwrap();
        std::fs::write(s.join("README"), "mine").unwrap();
        std::fs::write(s.join("loss.png"), "").unwrap();
        assert_eq!(earlier_run(s).unwrap(), (None, vec![]), "a curve alone is no run");
        std::fs::create_dir_all(s.join("20/mp_rank_00")).unwrap();
        std::fs::write(s.join("20/mp_rank_00/state.json"), "{}").unwrap();
        std::fs::write(s.join("latest"), "20\n").unwrap();
        let (latest, entries) = earlier_run(s).unwrap();
        assert_eq!(latest.as_deref(), Some("20"));
        assert_eq!(entries, vec![s.join("20"), s.join("latest"), s.join("loss.png")]);
        assert!(resumes_from(s, s) && resumes_from(s, &s.join("20")) && !resumes_from(s, &s.join("../other")));
    }

    #[test]
    fn a_used_directory_is_refused_unless_resumed_or_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("run");
        drop(claim_here(&s, None, false).unwrap());
        std::fs::create_dir_all(s.join("4")).unwrap();
        std::fs::write(s.join("4/state.json"), "{}").unwrap();
        std::fs::write(s.join("latest"), "4\n").unwrap();
        std::fs::write(s.join("metrics.jsonl"), "{}\n").unwrap();
        let e = claim_here(&s, None, false).unwrap_err().to_string();
        assert!(e.contains("already holds the checkpoints of a run (latest: iteration 4)") && e.contains("--set load=") && e.contains("overwrite=true"), "{e}");
        assert!(s.join("metrics.jsonl").is_file() && s.join("4/state.json").is_file(), "nothing touched");
        let other = d.path().join("other");
        let e = claim_here(&s, Some(&other), false).unwrap_err().to_string();
        assert!(e.contains("would mix the two runs"), "{e}");
        drop(claim_here(&s, Some(&s.join("4")), false).expect("resuming its own run"));
        // one run at a time
        let held = claim_here(&s, Some(&s), false).unwrap();
        let e = claim_here(&s, Some(&s), false).unwrap_err().to_string();
        assert!(e.contains("in use by another run (pid ") && e.contains(&format!("pid {} on", std::process::id())), "{e}");
        drop(held);
        std::fs::write(s.join("keep.txt"), "mine").unwrap();
        drop(claim_here(&s, None, true).unwrap());
        assert!(!s.join("4").exists() && !s.join("latest").exists() && !s.join("metrics.jsonl").exists() && s.join("keep.txt").is_file());
    }
}
