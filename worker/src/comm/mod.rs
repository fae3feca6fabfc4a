//! Collectives on tensors behind one trait, with two back ends: `mpi.rs` for
//! CPU tensors and `nccl.rs` for CUDA tensors; `GroupComm` holds both for a
//! group and picks by the tensor's device. Every MPI and NCCL call is made
//! here and nowhere else.

pub mod check;
pub mod mpi;
pub mod nccl;

use tch::Tensor;

use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// A group of ranks that run collectives together.
pub trait Communicator {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Reduces `t` across the group; every rank gets the result in `t`.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Copies `t` of rank `root` into `t` on every rank.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// Concatenates every rank's `t` along dimension 0, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor>;
    /// Sums `t` across the group and returns this rank's 1/size of it
    /// (dimension 0 split in rank order; it must divide evenly).
    fn reduce_scatter(&self, t: &Tensor) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;
}

/// The shape of an all-gather of `t` over `n` ranks: dimension 0 (a
/// scalar counts as one element) times `n`. Both back ends use it.
pub(crate) fn gathered_shape(t: &Tensor, n: usize) -> Vec<i64> {
    let mut shape = t.size();
    if shape.is_empty() {
        shape = vec![1];
    }
    shape[0] *= n as i64;
    shape
}

/// The shape of each rank's part of a reduce-scatter of `t` over `n` ranks;
/// an error (naming `backend`) unless dimension 0 splits evenly.
pub(crate) fn scattered_shape(t: &Tensor, n: usize, backend: &str) -> Result<Vec<i64>> {
    let mut shape = t.size();
    if shape.is_empty() || shape[0] % n as i64 != 0 {
        return Err(crate::error::Error::Config(format!("{backend} reduce_scatter: dimension 0 of {shape:?} is not divisible by the group size {n}")));
    }
    shape[0] /= n as i64;
    Ok(shape)
}

/// One group's communicators: CPU tensors go through MPI, CUDA tensors
/// through NCCL (when the group has an NCCL communicator, i.e. training on
/// CUDA). Small host-side values (loss sums, flags) stay on MPI.
pub struct GroupComm {
    pub mpi: mpi::MpiComm,
    pub nccl: Option<nccl::NcclComm>,
}

impl GroupComm {
    /// All ranks of `world`; on CUDA device `device` also an NCCL
    /// communicator, bootstrapped over MPI. Collective over `world`.
    pub fn world(world: &mpi::MpiComm, device: tch::Device) -> Result<Self> {
        let mpi = world.split(0, world.rank())?;
        let nccl = match device {
            tch::Device::Cuda(d) => Some(nccl::NcclComm::init(&mpi, d)?),
            _ => None,
        };
        Ok(GroupComm { mpi, nccl })
    }

    /// The sub-group of the ranks passing the same `color`, ordered by `key`,
    /// with both back ends split alike. Collective over this group.
    pub fn split(&self, color: usize, key: usize) -> Result<Self> {
        let mpi = self.mpi.split(color, key)?;
        let nccl = match &self.nccl {
            Some(n) => Some(n.split(color, key, &mpi)?),
            None => None,
        };
        Ok(GroupComm { mpi, nccl })
    }

    fn pick(&self, t: &Tensor) -> &dyn Communicator {
        match (&self.nccl, t.device()) {
            (Some(n), tch::Device::Cuda(_)) => n,
            _ => &self.mpi,
        }
    }
}

impl Communicator for GroupComm {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.pick(t).all_reduce(t, op)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.pick(t).broadcast(t, root)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        self.pick(t).all_gather(t)
    }
    fn reduce_scatter(&self, t: &Tensor) -> Result<Tensor> {
        self.pick(t).reduce_scatter(t)
    }
    /// A host-side barrier (MPI): every rank has arrived.
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
}
