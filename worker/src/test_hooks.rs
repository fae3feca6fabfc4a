//! Test hooks: environment variables that make faults happen on purpose, so
//! integration tests can drive real `glm-worker` processes into paths that
//! healthy runs never take. Every hook is read here and nowhere else; none is
//! meant for users, and none is set in a normal run.
//!
//! - `GLM_INJECT_INF_GRAD=<world rank or *>:<steps>[:split]`: that rank
//!   (every rank with `*`) writes an inf into the reduced gradient it holds
//!   (its shard under ZeRO) at those optimizer steps (the training
//!   iterations, counted from 1 over the whole run, a resume included;
//!   `<steps>` is a comma-separated list of steps and `a-b` ranges): at its
//!   first element, or with `split` at the first element of a
//!   tensor-parallel slice it holds. The fp16 overflow path (skip, scaler,
//!   schedule) and the agreement on it over the world are tested with it.
//! - `GLM_TEST_FAULT=<action>:<world rank or *>:<iteration>[:<attempt>]`: that
//!   rank (every rank with `*`), at the start of that training iteration, in the attempt with
//!   that `GLM_RESTART_COUNT` (0 by default: the first; `*` for every
//!   attempt), does `stop` (SIGSTOP itself: a frozen process), `kill`
//!   (SIGKILL itself), `exit` (exits with code 3), or `slow=<ms>` (sleeps
//!   that long at every iteration from there on: a straggler). When
//!   `GLM_TEST_FAULT_MARK` names a file, the rank creates it first, so a test
//!   can wait for the fault as an event. The fault-tolerance tests (hangs,
//!   restarts, elastic shrink, stragglers) drive glm-launch with it.
//! - `GLM_INJECT_SAVE_FAILURE=<world rank or *>:<iterations>`: that rank's
//!   checkpoint writer finds a directory where its first file of those
//!   iterations' checkpoints goes, so the real write fails with the
//!   operating system's error naming the path (root ignores read-only
//!   directories, so tests cannot make a write fail that way).
//! - `GLM_HOLD_SAVE=<file>`: every checkpoint writer waits, before it writes
//!   anything, until `<file>` exists: a test holds a save in flight and
//!   lets it go once it has seen what it wanted (a stop waiting for it).
//! - `GLM_SAVE_CLOCK_RANK=<world rank>`: `save_interval_minutes` is read on
//!   that rank's clock only (the others never find a save due by time), so a
//!   test sees one rank's decision carried to every rank.
//! - `GLM_EVAL_BATCHES=<file>`: held-out evaluation (`glm-worker eval`,
//!   validation) appends every batch it evaluates to `<file>`, one JSON line
//!   each (its mode, tokens, targets, positions, block positions, loss mask,
//!   sep), so a test computes the same loss on them with another
//!   implementation (PyTorch).
//! - `GLM_TEST_PREPARE_KILL=<K>`: building a token store, the process
//!   SIGKILLs itself once it has finished its K-th shard (a kill mid-prepare:
//!   other workers' shards in the making are lost, finished ones kept), so a
//!   test can check that a rerun continues to the same store.

/// Where `GLM_INJECT_INF_GRAD` puts an inf for this rank.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfGradient {
    /// The steps (iterations) that overflow, ascending.
    pub steps: Vec<u64>,
    /// In a tensor-parallel slice (`:split`) rather than at element 0.
    pub in_split_range: bool,
}

/// `GLM_INJECT_INF_GRAD` for world rank `rank`, when it names this rank.
pub fn inf_gradient(rank: usize) -> Option<InfGradient> {
    parse_inf_gradient(&std::env::var("GLM_INJECT_INF_GRAD").ok()?, rank)
}

fn parse_inf_gradient(v: &str, rank: usize) -> Option<InfGradient> {
    let (steps, at) = parse_rank_steps(v, rank)?;
    Some(InfGradient { steps, in_split_range: at == Some("split") })
}

/// `<world rank or *>:<steps>[:<more>]` for world rank `rank`: the steps
/// (ascending) and `<more>`, when it names this rank.
fn parse_rank_steps(v: &str, rank: usize) -> Option<(Vec<u64>, Option<&str>)> {
    let mut f = v.split(':').map(str::trim);
    let (who, steps, at) = (f.next()?, f.next()?, f.next());
    let mut list = Vec::new();
    for item in steps.split(',').map(str::trim) {
        match item.split_once('-') {
            Some((a, b)) => list.extend(a.trim().parse::<u64>().ok()?..=b.trim().parse::<u64>().ok()?),
            None => list.push(item.parse::<u64>().ok()?),
        }
    }
    list.sort_unstable();
    let mine = who == "*" || who.parse::<usize>().ok()? == rank;
    mine.then_some((list, at))
}

/// The iterations whose checkpoint `GLM_INJECT_SAVE_FAILURE` makes world
/// rank `rank`'s writer fail, when it names this rank.
pub fn save_failure(rank: usize) -> Option<Vec<u64>> {
    parse_rank_steps(&std::env::var("GLM_INJECT_SAVE_FAILURE").ok()?, rank).map(|(steps, _)| steps)
}

/// The file `GLM_HOLD_SAVE` makes checkpoint writers wait for.
pub fn hold_save() -> Option<std::path::PathBuf> {
    std::env::var_os("GLM_HOLD_SAVE").filter(|v| !v.is_empty()).map(Into::into)
}

/// Appends `samples`, evaluated in `mode` ("mixed", "span", ...), to the
/// file `GLM_EVAL_BATCHES` names, when it names one.
pub fn record_eval_batch(mode: &str, samples: &[crate::data::blocklm::Sample]) {
    let Some(path) = std::env::var_os("GLM_EVAL_BATCHES").filter(|v| !v.is_empty()) else { return };
    let rows = |f: &dyn Fn(&crate::data::blocklm::Sample) -> Vec<u64>| samples.iter().map(f).collect::<Vec<_>>();
    let line = serde_json::json!({
        "mode": mode,
        "tokens": rows(&|s| s.tokens.iter().map(|&t| t as u64).collect()),
        "targets": rows(&|s| s.targets.iter().map(|&t| t as u64).collect()),
        "position_ids": rows(&|s| s.position_ids.iter().map(|&t| t as u64).collect()),
        "block_position_ids": rows(&|s| s.block_position_ids.iter().map(|&t| t as u64).collect()),
        "loss_mask": rows(&|s| s.loss_mask.iter().map(|&t| t as u64).collect()),
        "sep": samples.iter().map(|s| s.sep).collect::<Vec<_>>(),
    });
    use std::io::Write;
    let written = std::fs::OpenOptions::new().create(true).append(true).open(&path).and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        eprintln!("GLM_EVAL_BATCHES={}: {e}", std::path::Path::new(&path).display());
    }
}

/// Whether world rank `rank` reads `save_interval_minutes` on its clock
/// (every rank, unless `GLM_SAVE_CLOCK_RANK` names another).
pub fn save_clock_counts(rank: usize) -> bool {
    std::env::var("GLM_SAVE_CLOCK_RANK").ok().and_then(|v| v.trim().parse::<usize>().ok()).is_none_or(|r| r == rank)
}

/// After how many finished shards `GLM_TEST_PREPARE_KILL` kills the process.
pub fn prepare_kill_after() -> Option<usize> {
    std::env::var("GLM_TEST_PREPARE_KILL").ok()?.trim().parse().ok().filter(|&k| k > 0)
}

/// What `GLM_TEST_FAULT` makes a rank do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    Stop,
    Kill,
    Exit,
    Slow { ms: u64 },
}

/// `GLM_TEST_FAULT` for this rank and attempt, when it names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub action: FaultAction,
    pub iteration: u64,
}

/// `GLM_TEST_FAULT` for world rank `rank`, in this attempt (`GLM_RESTART_COUNT`).
pub fn fault(rank: usize) -> Option<Fault> {
    let attempt = std::env::var(glm_common::launch::RESTART_COUNT_VAR).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    parse_fault(&std::env::var("GLM_TEST_FAULT").ok()?, rank, attempt)
}

fn parse_fault(v: &str, rank: usize, attempt: u64) -> Option<Fault> {
    let mut f = v.split(':').map(str::trim);
    let (what, who, it, when) = (f.next()?, f.next()?, f.next()?, f.next().unwrap_or("0"));
    let action = match what.split_once('=') {
        Some(("slow", ms)) => FaultAction::Slow { ms: ms.parse().ok()? },
        None if what == "stop" => FaultAction::Stop,
        None if what == "kill" => FaultAction::Kill,
        None if what == "exit" => FaultAction::Exit,
        _ => return None,
    };
    let mine = (who == "*" || who.parse::<usize>().ok()? == rank) && (when == "*" || when.parse::<u64>().ok()? == attempt);
    mine.then_some(Fault { action, iteration: it.parse().ok()? })
}

impl Fault {
    /// Does the fault at iteration `it` (from its iteration on, for `slow`).
    pub fn at(&self, it: u64) {
        if it < self.iteration || (it > self.iteration && !matches!(self.action, FaultAction::Slow { .. })) {
            return;
        }
        if it == self.iteration {
            if let Some(mark) = std::env::var_os("GLM_TEST_FAULT_MARK") {
                let _ = std::fs::write(mark, format!("{}\n", std::process::id()));
            }
        }
        // SAFETY: signalling this process.
        match self.action {
            FaultAction::Stop => unsafe {
                libc::raise(libc::SIGSTOP);
            },
            FaultAction::Kill => unsafe {
                libc::raise(libc::SIGKILL);
            },
            FaultAction::Exit => {
                eprintln!("glm-worker: error: GLM_TEST_FAULT: exit at iteration {it}");
                std::process::exit(3)
            }
            FaultAction::Slow { ms } => std::thread::sleep(std::time::Duration::from_millis(ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_hook_names_an_action_a_rank_an_iteration_and_an_attempt() {
        assert_eq!(parse_fault("stop:1:3", 1, 0), Some(Fault { action: FaultAction::Stop, iteration: 3 }));
        assert_eq!(parse_fault("stop:1:3", 0, 0), None);
        assert_eq!(parse_fault("stop:1:3", 1, 1), None, "the first attempt only, by default");
        assert_eq!(parse_fault("kill:2:5:1", 2, 1), Some(Fault { action: FaultAction::Kill, iteration: 5 }));
        assert_eq!(parse_fault("slow=250:0:1:*", 0, 4), Some(Fault { action: FaultAction::Slow { ms: 250 }, iteration: 1 }));
        assert_eq!(parse_fault("exit:0:2", 0, 0), Some(Fault { action: FaultAction::Exit, iteration: 2 }));
        assert_eq!(parse_fault("stop:*:4", 3, 0), Some(Fault { action: FaultAction::Stop, iteration: 4 }));
        for bad in ["nap:0:1", "slow=x:0:1", "stop:x:1", "stop:0", "stop:0:y"] {
            assert_eq!(parse_fault(bad, 0, 0), None, "{bad}");
        }
    }

    #[test]
    fn the_inf_gradient_hook_names_ranks_and_steps() {
        assert_eq!(parse_inf_gradient("1:3", 1), Some(InfGradient { steps: vec![3], in_split_range: false }));
        assert_eq!(parse_inf_gradient("1:3", 0), None);
        assert_eq!(parse_inf_gradient("*:2:split", 5), Some(InfGradient { steps: vec![2], in_split_range: true }));
        assert_eq!(parse_inf_gradient("*:9,2-4, 7", 0), Some(InfGradient { steps: vec![2, 3, 4, 7, 9], in_split_range: false }));
        assert_eq!(parse_inf_gradient("*:2-x", 0), None);
        assert_eq!(parse_inf_gradient("x:2", 0), None);
        assert_eq!(parse_inf_gradient("0", 0), None);
        assert_eq!(parse_rank_steps("*:4,6", 3), Some((vec![4, 6], None)));
        assert_eq!(parse_rank_steps("1:4", 0), None);
    }
}
