//! Parallel layout: the rank grid and the communicators a rank trains with.

pub mod dims;
pub mod layers;
pub mod mappings;

use tch::Tensor;

use crate::comm::{Communicator, ReduceOp};
use crate::error::Result;
use dims::ParallelDims;

/// What a rank needs to know and use about the others.
pub struct Parallel {
    pub dims: ParallelDims,
    /// The data-parallel group; `None` when it is this rank alone.
    pub dp: Option<Box<dyn Communicator>>,
    /// All ranks; `None` in a world of one.
    pub world: Option<Box<dyn Communicator>>,
    /// The tensor-parallel group (registered for the autograd regions);
    /// `None` without tensor parallelism.
    pub tp: Option<mappings::Group>,
}

impl Parallel {
    /// One process: no collectives.
    pub fn single() -> Self {
        Parallel { dims: ParallelDims::new(1, 0, 1).expect("1 x 1 grid"), dp: None, world: None, tp: None }
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

    /// Sums the flat gradient over the data-parallel group in buckets of
    /// `bucket` elements (DeepSpeed's `reduce_bucket_size`), bounding the
    /// scratch memory a reduction needs.
    pub fn dp_sum_buckets(&self, flat: &mut Tensor, bucket: i64) -> Result<()> {
        let Some(c) = &self.dp else { return Ok(()) };
        let n = flat.size()[0];
        let mut off = 0;
        while off < n {
            let len = bucket.min(n - off);
            let mut part = flat.narrow(0, off, len);
            c.all_reduce(&mut part, ReduceOp::Sum)?;
            off += len;
        }
        Ok(())
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

    /// Copies `t` of data-parallel rank 0 to every rank of the group.
    pub fn dp_broadcast(&self, t: &mut Tensor) -> Result<()> {
        match &self.dp {
            Some(c) => c.broadcast(t, 0),
            None => Ok(()),
        }
    }
}
