//! Which ranks make progress, from their heartbeats
//! (`glm_common::launch::Heartbeat`, one line every few seconds on each
//! rank's stdout).
//!
//! A rank makes progress when its iteration, phase, count of work done
//! (micro-batches, evaluation batches, collectives) or collective changes. A
//! rank that waits inside a collective is waiting for the others; the ranks
//! that hold the job up are the others: those that stopped changing while
//! outside a collective, or that stopped sending heartbeats altogether (a
//! frozen process, a host that stopped answering).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use glm_common::launch::{Heartbeat, UNBOUNDED_PHASES};

#[derive(Clone, Debug)]
struct Rank {
    last: Heartbeat,
    /// When its last heartbeat arrived.
    beat_at: Instant,
    /// When its progress last changed.
    changed_at: Instant,
}

impl Rank {
    /// In a phase of unbounded length (no deadline, no blame).
    fn unbounded(&self) -> bool {
        UNBOUNDED_PHASES.contains(&self.last.phase.as_str())
    }
}

/// Every rank's last heartbeat.
#[derive(Clone, Debug, Default)]
pub struct Ranks {
    ranks: BTreeMap<usize, Rank>,
}

/// A rank that holds the job up.
#[derive(Clone, Debug, PartialEq)]
pub struct Stalled {
    pub rank: usize,
    /// Since its progress last changed.
    pub for_secs: f64,
    pub last: Heartbeat,
    /// No heartbeat for this long (when more than two intervals).
    pub silent_secs: Option<f64>,
}

impl Stalled {
    /// "rank 3 on node2: no progress for 612 s (last: iteration 1234, backward)"
    pub fn describe(&self, host: &str) -> String {
        let at = if self.last.iteration == 0 {
            format!("before the first iteration, {}", self.last.phase)
        } else {
            format!("iteration {}, {}", self.last.iteration, self.last.phase)
        };
        let silent = self.silent_secs.map(|s| format!("; no heartbeat for {s:.0} s: frozen, or its host stopped answering")).unwrap_or_default();
        format!("rank {} on {host}: no progress for {:.0} s (last: {at}){silent}", self.rank, self.for_secs)
    }
}

/// Each of `stalled` described (its host from `hosts`, by rank), joined
/// with "; "; empty when none.
pub fn describe_all(stalled: &[Stalled], hosts: &[String]) -> String {
    stalled.iter().map(|x| x.describe(hosts.get(x.rank).map_or("?", |h| h.as_str()))).collect::<Vec<_>>().join("; ")
}

impl Ranks {
    /// Takes in rank `rank`'s heartbeat, arrived at `now`.
    pub fn beat(&mut self, rank: usize, hb: Heartbeat, now: Instant) {
        match self.ranks.get_mut(&rank) {
            Some(r) => {
                let same_place = r.last.iteration == hb.iteration && r.last.phase == hb.phase && r.last.ticks == hb.ticks;
                let same_wait = match (&r.last.waiting, &hb.waiting) {
                    (None, None) => true,
                    // the same collective, still running (a new one restarts its clock)
                    (Some(a), Some(b)) => a.op == b.op && a.group == b.group && b.secs >= a.secs,
                    _ => false,
                };
                if !(same_place && same_wait) {
                    r.changed_at = now;
                }
                r.last = hb;
                r.beat_at = now;
            }
            None => {
                self.ranks.insert(rank, Rank { last: hb, beat_at: now, changed_at: now });
            }
        }
    }

    /// The furthest iteration any rank reached.
    pub fn max_iteration(&self) -> u64 {
        self.ranks.values().map(|r| r.last.iteration).max().unwrap_or(0)
    }

    /// Ranks waiting in a collective at `now` (those still sending
    /// heartbeats every `interval`): (rank, its heartbeat).
    pub fn waiting(&self, now: Instant, interval: Duration) -> Vec<(usize, Heartbeat)> {
        self.ranks
            .iter()
            .filter(|(_, r)| r.last.waiting.is_some() && now.saturating_duration_since(r.beat_at) <= interval * 2 && !r.unbounded())
            .map(|(k, r)| (*k, r.last.clone()))
            .collect()
    }

    /// The ranks that hold the job up at `now`, longest first: those
    /// without progress for at least `min` that are not waiting in a
    /// collective (or whose heartbeats stopped, whatever they last said:
    /// none for three `interval`s and at least 2 s, so a busy machine's late
    /// heartbeat blames nobody).
    pub fn stalled(&self, now: Instant, min: Duration, interval: Duration) -> Vec<Stalled> {
        let mut out: Vec<Stalled> = self
            .ranks
            .iter()
            .filter_map(|(&rank, r)| {
                let stale = now.saturating_duration_since(r.changed_at);
                let silent = now.saturating_duration_since(r.beat_at);
                let silent = (silent > (interval * 3).max(Duration::from_secs(2))).then_some(silent.as_secs_f64());
                (stale >= min && (r.last.waiting.is_none() || silent.is_some()) && (!r.unbounded() || silent.is_some())).then(|| Stalled {
                    rank,
                    for_secs: stale.as_secs_f64(),
                    last: r.last.clone(),
                    silent_secs: silent,
                })
            })
            .collect();
        out.sort_by(|a, b| b.for_secs.total_cmp(&a.for_secs).then(a.rank.cmp(&b.rank)));
        out
    }

    /// Whether the job has stopped: some rank sent no heartbeat for longer
    /// than `limit`, or no rank changed for longer than `limit` while none is
    /// in a phase of unbounded length. `expected` ranks must all have beaten
    /// once before the second rule applies.
    pub fn hung(&self, now: Instant, limit: Duration, expected: usize) -> bool {
        if self.ranks.values().any(|r| now.saturating_duration_since(r.beat_at) > limit) {
            return true;
        }
        self.ranks.len() >= expected
            && !self.ranks.is_empty()
            && self.ranks.values().all(|r| now.saturating_duration_since(r.changed_at) > limit && !r.unbounded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glm_common::launch::Waiting;

    fn hb(it: u64, phase: &str, wait: Option<f64>) -> Heartbeat {
        Heartbeat { iteration: it, phase: phase.into(), ticks: 0, waiting: wait.map(|secs| Waiting { op: "all_reduce".into(), group: "dp".into(), secs }) }
    }

    #[test]
    fn the_stopped_rank_is_named_and_the_waiting_ones_are_not() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let mut r = Ranks::default();
        for rank in 0..4 {
            r.beat(rank, hb(2, "log", None), s(0.0));
        }
        // rank 1 stops at iteration 3; the others wait for it
        r.beat(1, hb(3, "data", None), s(1.0));
        for t in 1..=9 {
            for rank in [0, 2, 3] {
                r.beat(rank, hb(3, "forward", Some(t as f64 - 1.0)), s(t as f64));
            }
        }
        let st = r.stalled(s(9.5), Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(st.len(), 1, "{st:?}");
        assert_eq!(st[0].rank, 1);
        assert_eq!(
            st[0].describe("node2"),
            "rank 1 on node2: no progress for 8 s (last: iteration 3, data); no heartbeat for 8 s: frozen, or its host stopped answering"
        );
        let hosts: Vec<String> = ["node1", "node2"].map(String::from).to_vec();
        assert_eq!(describe_all(&st, &hosts), st[0].describe("node2"));
        assert_eq!(describe_all(&st, &hosts[..1]), st[0].describe("?"), "a rank beyond the placement");
        assert_eq!(describe_all(&[], &hosts), "");
        assert_eq!(r.waiting(s(9.5), Duration::from_secs(1)).len(), 3);
        assert_eq!(r.max_iteration(), 3);
        assert!(r.hung(s(9.5), Duration::from_secs(5), 4), "rank 1 silent for 8.5 s");
        assert!(!r.hung(s(5.0), Duration::from_secs(5), 4));
    }

    #[test]
    fn progress_and_new_collectives_count_and_unbounded_phases_do_not_hang() {
        let t0 = Instant::now();
        let s = |x: f64| t0 + Duration::from_secs_f64(x);
        let mut r = Ranks::default();
        r.beat(0, hb(1, "backward", Some(0.5)), s(0.0));
        r.beat(0, hb(1, "backward", Some(0.9)), s(4.0));
        assert!(r.hung(s(6.0), Duration::from_secs(5), 1), "the same collective for 6 s");
        let mut r = Ranks::default();
        r.beat(0, hb(1, "backward", Some(0.5)), s(0.0));
        r.beat(0, hb(1, "backward", Some(0.1)), s(4.0));
        assert!(!r.hung(s(6.0), Duration::from_secs(5), 1), "a new collective at 4 s is progress");
        let mut r = Ranks::default();
        for t in 0..20 {
            r.beat(0, hb(0, "preparing-data", None), s(t as f64));
            r.beat(1, hb(0, "preparing-data", Some(t as f64)), s(t as f64));
        }
        assert!(!r.hung(s(19.5), Duration::from_secs(5), 2), "rank 0 prepares the data for as long as it takes");
        assert!(r.waiting(s(19.5), Duration::from_secs(1)).is_empty() && r.stalled(s(19.5), Duration::from_secs(1), Duration::from_secs(1)).is_empty());
        let mut r = Ranks::default();
        for t in 0..20 {
            r.beat(0, hb(7, "forward", None), s(t as f64));
        }
        assert!(r.hung(s(19.5), Duration::from_secs(5), 1), "alive but stuck in one phase");
        let mut r = Ranks::default();
        for t in 0..20 {
            r.beat(0, Heartbeat { ticks: t, ..hb(7, "evaluate", None) }, s(t as f64));
        }
        assert!(!r.hung(s(19.5), Duration::from_secs(5), 1), "a long evaluation that counts its batches");
        assert!(!r.hung(s(19.5), Duration::from_secs(5), 2), "until every rank has reported");
    }
}
