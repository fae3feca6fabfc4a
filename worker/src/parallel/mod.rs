//! Parallel layout: the rank grid and the communicators a rank trains with.

pub use glm_common::dims;
pub mod check;
pub mod layers;
pub mod mappings;

use std::sync::Arc;

use tch::Tensor;

use crate::comm::local::LocalComm;
use crate::comm::mpi::MpiComm;
use crate::comm::{Comm, GroupComm, Metered, ReduceOp};
use crate::error::{Error, Result};
use dims::ParallelDims;

/// What a rank needs to know and use about the others: the rank grid and
/// one communicator per group, owned here (the tensor-parallel regions and
/// the optimizer hold clones).
pub struct Parallel {
    pub dims: ParallelDims,
    /// The data-parallel group; `None` when it is this rank alone.
    pub dp: Option<Comm>,
    /// All ranks; `None` in a world of one.
    pub world: Option<Comm>,
    /// The tensor-parallel group; `None` without tensor parallelism.
    pub tp: Option<mappings::Group>,
}

impl Parallel {
    /// One process: no collectives.
    pub fn single() -> Self {
        Parallel { dims: ParallelDims::new(1, 0, 1).expect("1 x 1 grid"), dp: None, world: None, tp: None }
    }

    /// The groups of `dims` over the MPI world: the data-parallel group (the
    /// ranks with this rank's tensor-parallel index), the tensor-parallel
    /// group (consecutive ranks) and the world. On CUDA each also gets an
    /// NCCL communicator: the world's is bootstrapped over MPI, the groups'
    /// are split from it (unless `GLM_COMM_BACKEND=host-staged` stages every
    /// collective through host memory over MPI: `comm::staged`). Every
    /// group counts the bytes it sends ([`Metered`]). Collective: every rank calls it with the same layout.
    pub fn build(world: &MpiComm, dims: ParallelDims, device: tch::Device) -> Result<Self> {
        if dims.world == 1 {
            return Ok(Parallel::single());
        }
        let world_group = GroupComm::world(world, device, crate::comm::staged::Backend::from_env()?)?;
        let dp = world_group.split(dims.tp_rank(), dims.dp_rank(), "dp")?;
        let tp = world_group.split(dims.dp_rank(), dims.tp_rank(), "tp")?;
        let metered = |c: GroupComm| Arc::new(Metered::new(c)) as Comm;
        Ok(Parallel {
            dims,
            dp: (dims.dp > 1).then(|| metered(dp)),
            tp: (dims.tp > 1).then(|| mappings::Group::new(metered(tp))),
            world: Some(metered(world_group)),
        })
    }

    /// A world of `world` ranks that are threads of this process (tensor
    /// parallel `tp`), one `Parallel` per rank in rank order: hand element
    /// `r` to thread `r`. Same groups and same order as [`Parallel::build`].
    pub fn local(world: usize, tp: usize) -> Result<Vec<Self>> {
        let dims: Vec<ParallelDims> = (0..world).map(|r| ParallelDims::new(world, r, tp)).collect::<Result<_>>()?;
        let dp = world / tp;
        let mut worlds: Vec<Option<LocalComm>> = LocalComm::group(world, "world").into_iter().map(Some).collect();
        let mut tps: Vec<Vec<Option<LocalComm>>> = (0..dp).map(|_| LocalComm::group(tp, "tp").into_iter().map(Some).collect()).collect();
        let mut dps: Vec<Vec<Option<LocalComm>>> = (0..tp).map(|_| LocalComm::group(dp, "dp").into_iter().map(Some).collect()).collect();
        let metered = |c: LocalComm| Arc::new(Metered::new(c)) as Comm;
        Ok(dims
            .into_iter()
            .map(|d| {
                if d.world == 1 {
                    return Parallel::single();
                }
                let (t, p) = (d.tp_rank(), d.dp_rank());
                let tp_comm = tps[p][t].take().expect("one handle per rank");
                let dp_comm = dps[t][p].take().expect("one handle per rank");
                Parallel {
                    dims: d,
                    dp: (d.dp > 1).then(|| metered(dp_comm)),
                    tp: (d.tp > 1).then(|| mappings::Group::new(metered(tp_comm))),
                    world: Some(metered(worlds[d.rank].take().expect("one handle per rank"))),
                }
            })
            .collect())
    }

    /// Bytes this rank has sent through its groups so far.
    pub fn bytes_sent(&self) -> u64 {
        let groups = [self.dp.as_ref(), self.world.as_ref(), self.tp.as_ref().map(|g| g.comm())];
        groups.into_iter().flatten().filter_map(|c| c.bytes_sent()).sum()
    }

    pub fn is_main(&self) -> bool {
        self.dims.rank == 0
    }

    /// Waits until every rank of the world arrives.
    pub fn barrier(&self) -> Result<()> {
        match &self.world {
            Some(c) => c.barrier(),
            None => Ok(()),
        }
    }

    /// Sums `t` over the data-parallel group (no-op alone).
    pub fn dp_sum(&self, t: &mut Tensor) -> Result<()> {
        match &self.dp {
            Some(c) => c.all_reduce(t, ReduceOp::Sum),
            None => Ok(()),
        }
    }

    /// Runs `f` on world rank 0 first and then, once it succeeded, on the
    /// others: rank 0 prepares what they then find ready (tokenizer, token
    /// store) or decides alone (the save directory). A failure on rank 0 is
    /// agreed over the world, so every rank stops (with rank 0's reason on
    /// rank 0) instead of waiting for it.
    /// The others' wait has no collective deadline: rank 0's work may take
    /// any time.
    pub fn main_first<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let _any_time = crate::runtime::progress::unbounded();
        if self.is_main() {
            let r = f();
            self.world_max(i64::from(r.is_err()))?;
            r
        } else if self.world_max(0)? != 0 {
            Err(Error::Runtime(format!("rank 0 failed {what} (see its error)")))
        } else {
            f()
        }
    }

    /// The largest of every world rank's `v` (e.g. the number of a stop
    /// signal that reached one rank: all must stop after the same iteration,
    /// tensor-parallel peers included, and report the same signal).
    pub fn world_max(&self, v: i64) -> Result<i64> {
        let mut t = Tensor::from_slice(&[v]);
        if let Some(c) = &self.world {
            c.all_reduce(&mut t, ReduceOp::Max)?;
        }
        Ok(t.int64_value(&[0]))
    }

    /// Every world rank's `v`, in rank order (one small all-gather).
    pub fn world_gather(&self, v: f64) -> Result<Vec<f64>> {
        let t = Tensor::from_slice(&[v]);
        let all = match &self.world {
            Some(c) => c.all_gather(&t)?,
            None => t,
        };
        Ok((0..all.numel() as i64).map(|i| all.double_value(&[i])).collect())
    }

    /// Copies `t` of data-parallel rank 0 to every rank of the group.
    pub fn dp_broadcast(&self, t: &mut Tensor) -> Result<()> {
        match &self.dp {
            Some(c) => c.broadcast(t, 0),
            None => Ok(()),
        }
    }
}
