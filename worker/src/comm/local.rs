//! Ranks that are threads of one process: a communicator over shared
//! memory, so parity tests of tensor parallelism and ZeRO run a whole world
//! in one test process in milliseconds. Every collective is two rendezvous:
//! each rank deposits its input, all compute the result from every deposit
//! (in rank order, so every rank gets the same bits), meet again, and only
//! then write their outputs. A rank that panics or times out breaks the
//! group: the others get an error instead of waiting forever.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tch::{Kind, Tensor};

use super::{fail, Communicator, ReduceOp};
use crate::error::Result;

/// How long a rank waits for the others at a rendezvous.
const TIMEOUT: Duration = Duration::from_secs(120);

struct Gate {
    /// (arrived, generation, broken)
    state: Mutex<(usize, u64, bool)>,
    cv: Condvar,
}

struct Shared {
    size: usize,
    name: String,
    slots: Mutex<Vec<Option<Tensor>>>,
    gate: Gate,
}

/// One rank's handle on a group of threads.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalComm {
    /// A group of `size` ranks called `name`: hand handle `r` to thread `r`.
    pub fn group(size: usize, name: &str) -> Vec<LocalComm> {
        let shared = Arc::new(Shared {
            size,
            name: name.into(),
            slots: Mutex::new((0..size).map(|_| None).collect()),
            gate: Gate { state: Mutex::new((0, 0, false)), cv: Condvar::new() },
        });
        (0..size).map(|rank| LocalComm { rank, shared: shared.clone() }).collect()
    }

    /// Waits until every rank of the group arrives.
    fn meet(&self, op: &str) -> Result<()> {
        let g = &self.shared.gate;
        let mut s = g.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.2 {
            return Err(fail(op, self, "the group is broken (another rank failed)"));
        }
        let generation = s.1;
        s.0 += 1;
        if s.0 == self.shared.size {
            s.0 = 0;
            s.1 += 1;
            g.cv.notify_all();
            return Ok(());
        }
        loop {
            let (next, timeout) = g.cv.wait_timeout(s, TIMEOUT).unwrap_or_else(|e| e.into_inner());
            s = next;
            if s.1 != generation {
                return Ok(());
            }
            if s.2 {
                return Err(fail(op, self, "the group is broken (another rank failed)"));
            }
            if timeout.timed_out() {
                s.2 = true;
                g.cv.notify_all();
                return Err(fail(op, self, format!("the other ranks did not arrive within {} s", TIMEOUT.as_secs())));
            }
        }
    }

    /// Deposits `t`, waits for every deposit, and returns `f(deposits)`,
    /// computed before anyone moves on (the deposits may be views of
    /// buffers their ranks write afterwards).
    fn exchange(&self, op: &str, t: &Tensor, f: impl FnOnce(&[Tensor]) -> Tensor) -> Result<Tensor> {
        self.shared.slots.lock().unwrap_or_else(|e| e.into_inner())[self.rank] = Some(t.detach());
        self.meet(op)?;
        let result = {
            let slots = self.shared.slots.lock().unwrap_or_else(|e| e.into_inner());
            let all: Vec<Tensor> = slots.iter().map(|s| s.as_ref().expect("every rank deposited").shallow_clone()).collect();
            drop(slots);
            tch::no_grad(|| f(&all))
        };
        self.meet(op)?;
        Ok(result)
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let g = &self.shared.gate;
            g.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
            g.cv.notify_all();
        }
    }
}

/// The element type sums are taken in: fp32 for 16-bit types (as the MPI
/// back end does), else the type itself.
fn wide(k: Kind) -> Kind {
    match k {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        k => k,
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn name(&self) -> &str {
        &self.shared.name
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let k = t.kind();
        let r = self.exchange("all_reduce", t, |all| {
            let mut acc = all[0].to_kind(wide(k));
            for x in &all[1..] {
                acc = match op {
                    ReduceOp::Sum => acc + x.to_kind(wide(k)),
                    ReduceOp::Max => acc.maximum(&x.to_kind(wide(k))),
                };
            }
            acc.to_kind(k)
        })?;
        tch::no_grad(|| t.copy_(&r));
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(fail("broadcast", self, format!("root {root} outside the group")));
        }
        let r = self.exchange("broadcast", t, |all| all[root].copy())?;
        tch::no_grad(|| t.copy_(&r));
        Ok(())
    }

    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        super::check_gather(self, input, out)?;
        let r = self.exchange("all_gather_into", input, |all| Tensor::cat(&all.iter().map(|x| x.reshape([-1])).collect::<Vec<_>>(), 0))?;
        tch::no_grad(|| out.copy_(&r.view_as(out)));
        Ok(())
    }

    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        super::check_scatter(self, input, out)?;
        let (n, rank, k) = (out.numel() as i64, self.rank as i64, input.kind());
        let r = self.exchange("reduce_scatter_into", input, |all| {
            let mut acc = all[0].reshape([-1]).narrow(0, rank * n, n).to_kind(wide(k));
            for x in &all[1..] {
                acc += x.reshape([-1]).narrow(0, rank * n, n).to_kind(wide(k));
            }
            acc.to_kind(k)
        })?;
        tch::no_grad(|| out.copy_(&r.view_as(out)));
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        self.meet("barrier")
    }
}

/// Runs `f(rank)` on `n` threads and returns their results in rank order;
/// a panic on any thread is re-raised here (after the others stop).
pub fn run_ranks<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_over_three_threads() {
        let comms: Vec<Mutex<Option<LocalComm>>> = LocalComm::group(3, "test").into_iter().map(|c| Mutex::new(Some(c))).collect();
        let out = run_ranks(3, |r| {
            let c = comms[r].lock().unwrap().take().unwrap();
            let lines = super::super::check::collectives(&c, tch::Device::Cpu).unwrap();
            // in place all-gather: this rank's block already in its slot
            let mut out = Tensor::zeros([6], (Kind::Float, tch::Device::Cpu));
            let _ = out.narrow(0, 2 * r as i64, 2).fill_(r as f64 + 1.0);
            let own = out.narrow(0, 2 * r as i64, 2);
            c.all_gather_into(&own, &mut out).unwrap();
            assert_eq!(Vec::<f32>::try_from(&out).unwrap(), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
            lines.len()
        });
        assert!(out.iter().all(|&n| n > 5));
    }

    #[test]
    fn a_failed_rank_breaks_the_group_instead_of_hanging() {
        let comms: Vec<Mutex<Option<LocalComm>>> = LocalComm::group(2, "dp").into_iter().map(|c| Mutex::new(Some(c))).collect();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_ranks(2, |r| {
                let c = comms[r].lock().unwrap().take().unwrap();
                if r == 1 {
                    panic!("rank 1 fails");
                }
                let e = c.barrier().unwrap_err().to_string();
                assert!(e.contains("barrier on the dp group (rank 0 of 2)") && e.contains("broken"), "{e}");
            })
        }));
        assert!(r.is_err(), "the panic reaches the caller");
    }
}
