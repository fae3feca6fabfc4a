//! Collectives on tensors behind one trait; `mpi.rs` is the back end for CPU
//! tensors. Every MPI call is made here and nowhere else.

pub mod mpi;

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
