//! Where this rank is, and the deadline of every collective.
//!
//! The training loop marks its iteration and phase ([`set_iteration`],
//! [`set_phase`]); every MPI and NCCL collective marks itself for as long as
//! it runs ([`collective`]). Two threads read the marks:
//!
//! - the **watchdog** ([`start`] with a timeout, on a world of more than one
//!   rank): a collective still running after the timeout stops the process
//!   with one line naming the operation, the group, this rank, the iteration
//!   and how long it waited, and exit code 124. A collective blocks in MPI
//!   (or in a CUDA synchronisation) and cannot be interrupted from the
//!   outside, so the watchdog ends the process (`_exit`: no destructor may
//!   wait on the hung collective); under mpirun/srun the rank's exit stops
//!   every other rank. Waits that are not bounded by the compute of one step
//!   (the other ranks waiting while rank 0 prepares the data) are marked
//!   [`unbounded`] and have no deadline.
//! - the **heartbeat** (when `glm-launch` asks, `GLM_HEARTBEAT=<seconds>`):
//!   one line on stdout every interval (`glm_common::launch::Heartbeat`),
//!   from which glm-launch tells the ranks that stopped making progress from
//!   the ranks that wait for them. A frozen process (SIGSTOP, a host that
//!   stopped answering) sends none.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use glm_common::launch::{Heartbeat, Waiting, EXIT_COLLECTIVE_TIMEOUT, HEARTBEAT_VAR, PHASES};

/// What the loop is doing. The names are the heartbeat's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    /// Rank 0 trains the tokenizer or builds the token store; the others wait
    /// (and rank 0 claims the save directory).
    PreparingData = 1,
    /// Building the model, loading a checkpoint.
    Building = 2,
    /// Reading this step's samples.
    Data = 3,
    Forward = 4,
    Backward = 5,
    /// Clipping, the optimizer step, the ZeRO gathers.
    Optimizer = 6,
    Evaluate = 7,
    Save = 8,
    /// Agreeing on the stop, logging.
    Log = 9,
    Done = 10,
    /// Building the communicators (MPI splits, NCCL's bootstrap).
    Connecting = 11,
}

impl Phase {
    /// Its name in heartbeats and messages (`glm_common::launch::PHASES`).
    pub fn name(self) -> &'static str {
        PHASES[self as usize]
    }
}

static ITERATION: AtomicU64 = AtomicU64::new(0);
/// Work done: micro-batches, evaluation batches, collectives.
static TICKS: AtomicU64 = AtomicU64::new(0);
static PHASE: AtomicU8 = AtomicU8::new(0);
/// Set while the waits have no deadline ([`unbounded`]).
static UNBOUNDED: AtomicBool = AtomicBool::new(false);

/// The collective this rank is inside.
struct Inside {
    op: String,
    group: String,
    rank: usize,
    size: usize,
    since: Instant,
}

/// At most one: the MPI back end serialises its calls, and NCCL calls of a
/// communicator hold its lock (a nested mark keeps the outer one).
static INSIDE: Mutex<Option<Inside>> = Mutex::new(None);

/// The iteration the loop works on (shown by the heartbeat and the watchdog).
pub fn set_iteration(it: u64) {
    ITERATION.store(it, Ordering::Relaxed);
}

pub fn set_phase(p: Phase) {
    PHASE.store(p as u8, Ordering::Relaxed);
    tick();
}

/// Counts a unit of work (a micro-batch, an evaluation batch): a long phase
/// that makes progress shows it in the heartbeat.
pub fn tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

pub fn iteration() -> u64 {
    ITERATION.load(Ordering::Relaxed)
}

/// The name of the phase the loop is in.
pub fn phase() -> &'static str {
    PHASES.get(PHASE.load(Ordering::Relaxed) as usize).copied().unwrap_or(PHASES[0])
}

/// Marks a collective for as long as it lives.
pub struct InCollective {
    outer: bool,
}

/// Marks collective `op` of group `group` (this rank `rank` of `size`)
/// until the returned guard drops.
pub fn collective(op: &str, group: &str, rank: usize, size: usize) -> InCollective {
    let mut g = INSIDE.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_some() {
        return InCollective { outer: false };
    }
    *g = Some(Inside { op: op.to_string(), group: group.to_string(), rank, size, since: Instant::now() });
    InCollective { outer: true }
}

impl Drop for InCollective {
    fn drop(&mut self) {
        if self.outer {
            if let Some(i) = INSIDE.lock().unwrap_or_else(|e| e.into_inner()).take() {
                WAITED_NS.fetch_add(i.since.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            tick();
        }
    }
}

/// Nanoseconds spent inside collectives so far.
static WAITED_NS: AtomicU64 = AtomicU64::new(0);

/// The time this process has spent inside collectives so far: a step's time
/// less this is the rank's own work (the straggler report compares it).
pub fn waited() -> Duration {
    Duration::from_nanos(WAITED_NS.load(Ordering::Relaxed))
}

/// Lifts the deadline while alive (waits that depend on work of unbounded
/// length on another rank, such as rank 0 building the token store).
pub struct Unbounded {
    was: bool,
}

pub fn unbounded() -> Unbounded {
    Unbounded { was: UNBOUNDED.swap(true, Ordering::SeqCst) }
}

impl Drop for Unbounded {
    fn drop(&mut self) {
        UNBOUNDED.store(self.was, Ordering::SeqCst);
    }
}

/// Set when glm-launch asked for heartbeats.
static BEATING: AtomicBool = AtomicBool::new(false);

/// Sends a heartbeat now (when glm-launch asked for them), beside the
/// regular ones: at the first iteration, so glm-launch knows training began
/// even when a fault follows at once.
pub fn beat_now() {
    if BEATING.load(Ordering::Relaxed) {
        use std::io::Write;
        let _ = writeln!(std::io::stdout().lock(), "{}", heartbeat().line());
    }
}

/// This rank's heartbeat now.
pub fn heartbeat() -> Heartbeat {
    let waiting = INSIDE.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|i| Waiting {
        op: i.op.clone(),
        group: i.group.clone(),
        secs: i.since.elapsed().as_secs_f64(),
    });
    Heartbeat { iteration: iteration(), phase: phase().to_string(), ticks: TICKS.load(Ordering::Relaxed), waiting }
}

/// The message of a collective past its deadline.
fn timeout_message(i: &Inside, waited: Duration, limit: Duration, it: u64, phase: &str) -> String {
    let at = if it == 0 { format!("before the first iteration ({phase})") } else { format!("at iteration {it} ({phase})") };
    format!(
        "glm-worker: error: collective timeout: {} on group {} (rank {} of {}) waited {:.0} s {at}, past --collective-timeout {:.0} s; \
         another rank of the group stopped making progress (hung, stopped or unreachable): stopping this rank, which stops the job",
        i.op,
        i.group,
        i.rank,
        i.size,
        waited.as_secs_f64(),
        limit.as_secs_f64()
    )
}

/// Starts the watchdog (when `timeout` is given) and the heartbeat (when
/// glm-launch asked for one). Once per process; later calls do nothing.
pub fn start(timeout: Option<Duration>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Some(limit) = timeout {
            let tick = (limit / 20).clamp(Duration::from_millis(50), Duration::from_secs(1));
            std::thread::Builder::new()
                .name("glm-watchdog".into())
                .spawn(move || loop {
                    std::thread::sleep(tick);
                    if UNBOUNDED.load(Ordering::SeqCst) {
                        continue;
                    }
                    let g = INSIDE.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(i) = g.as_ref() {
                        let waited = i.since.elapsed();
                        if waited > limit {
                            let msg = format!("{}\n", timeout_message(i, waited, limit, iteration(), phase()));
                            drop(g);
                            // SAFETY: a plain write to fd 2 (no lock another
                            // thread could hold on a full pipe), then _exit: no
                            // destructor may wait on the hung collective.
                            unsafe {
                                libc::write(2, msg.as_ptr().cast(), msg.len());
                                libc::_exit(EXIT_COLLECTIVE_TIMEOUT);
                            }
                        }
                    }
                })
                .expect("start the collective watchdog");
        }
        let every = std::env::var(HEARTBEAT_VAR).ok().and_then(|v| v.parse::<f64>().ok()).filter(|s| *s > 0.0);
        if let Some(secs) = every {
            let every = Duration::from_secs_f64(secs);
            BEATING.store(true, Ordering::Relaxed);
            std::thread::Builder::new()
                .name("glm-heartbeat".into())
                .spawn(move || loop {
                    beat_now();
                    std::thread::sleep(every);
                })
                .expect("start the heartbeat");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_message_names_the_operation_group_rank_and_iteration() {
        let i = Inside { op: "all_reduce".into(), group: "dp".into(), rank: 1, size: 4, since: Instant::now() };
        let m = timeout_message(&i, Duration::from_secs(31), Duration::from_secs(30), 1234, Phase::Backward.name());
        assert!(m.contains("all_reduce on group dp (rank 1 of 4) waited 31 s at iteration 1234 (backward), past --collective-timeout 30 s"), "{m}");
        let m = timeout_message(&i, Duration::from_secs(31), Duration::from_secs(30), 0, Phase::Building.name());
        assert!(m.contains("before the first iteration (building)"), "{m}");
    }

    #[test]
    fn phases_are_named_and_a_nested_mark_keeps_the_outer_one() {
        // one name per phase, each its own
        use Phase::*;
        let all = [Starting, PreparingData, Building, Data, Forward, Backward, Optimizer, Evaluate, Save, Log, Done, Connecting];
        let names: Vec<&str> = all.iter().map(|p| p.name()).collect();
        assert_eq!(names, PHASES);
        assert_eq!((Backward.name(), Connecting.name()), ("backward", "connecting"));
        let outer = collective("all_gather_into", "world", 0, 2);
        {
            let _inner = collective("all_reduce", "dp", 0, 2);
            assert_eq!(heartbeat().waiting.unwrap().op, "all_gather_into");
        }
        assert_eq!(heartbeat().waiting.unwrap().op, "all_gather_into");
        drop(outer);
        assert!(heartbeat().waiting.is_none());
    }
}
