//! Collectives staged through host memory: each tensor is copied to the
//! host, the host back end (MPI) runs the collective there, and the result
//! is copied back. Selected with `GLM_COMM_BACKEND=host-staged`, never by
//! default (`Backend`).
//!
//! What it is for: NCCL refuses two ranks on one GPU, so on a machine with
//! one GPU the multi-rank CUDA paths (tensor parallelism, data parallelism,
//! ZeRO's reduce-scatter and all-gather on CUDA buffers) could not run at
//! all. Staged, `mpirun -np 2` on one GPU runs all of them but NCCL itself.
//! It is slow (two device copies per collective, MPI over shared memory) and
//! meant for checking, not training.
//!
//! The copies are exact, and the host back end reduces as it always does
//! (16-bit floats through fp32): a staged run on CPU tensors, which makes
//! the same copies, trains bit for bit like the unstaged one. That is how CI
//! tests this path without a GPU. The caller's tensors are checked as NCCL
//! and MPI check them (a gather's output and a scatter's input contiguous),
//! so what passes staged passes natively; the element types are MPI's
//! (floats, and int64 for all-reduce and broadcast), which cover every
//! collective training makes.

use tch::{Device, Tensor};

use super::{Communicator, ReduceOp};
use crate::error::Result;

/// How a group's tensor collectives travel: the launcher-worker contract's
/// `GLM_COMM_BACKEND` (`Backend::from_env`).
pub use glm_common::launch::{CommBackend as Backend, COMM_BACKEND_VAR as BACKEND_VAR};

/// A host communicator's collectives applied to tensors anywhere, through
/// host copies.
pub struct HostStaged<'a> {
    host: &'a dyn Communicator,
}

impl<'a> HostStaged<'a> {
    pub fn over(host: &'a dyn Communicator) -> Self {
        HostStaged { host }
    }
}

/// A contiguous host copy of `t`, never `t`'s own storage (a CPU tensor is
/// copied too, so the CPU path is the CUDA path).
fn to_host(t: &Tensor) -> Tensor {
    let h = t.to_device(Device::Cpu).contiguous();
    if h.data_ptr() == t.data_ptr() {
        h.copy()
    } else {
        h
    }
}

/// A host buffer shaped like `t`.
fn host_like(t: &Tensor) -> Tensor {
    Tensor::empty(t.size().as_slice(), (t.kind(), Device::Cpu))
}

/// Writes the host result `h` back into `t` (on its device).
fn write_back(t: &mut Tensor, h: &Tensor) {
    tch::no_grad(|| t.copy_(&h.view(t.size().as_slice())));
}

impl Communicator for HostStaged<'_> {
    fn rank(&self) -> usize {
        self.host.rank()
    }
    fn size(&self) -> usize {
        self.host.size()
    }
    fn name(&self) -> &str {
        self.host.name()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        let mut h = to_host(t);
        self.host.all_reduce(&mut h, op)?;
        write_back(t, &h);
        Ok(())
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        let mut h = to_host(t);
        self.host.broadcast(&mut h, root)?;
        write_back(t, &h);
        Ok(())
    }
    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        // the caller's tensors, as NCCL and MPI would see them
        super::check_gather(self, input, out)?;
        let mut h = host_like(out);
        self.host.all_gather_into(&to_host(input), &mut h)?;
        write_back(out, &h);
        Ok(())
    }
    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        super::check_scatter(self, input, out)?;
        let mut h = host_like(out);
        self.host.reduce_scatter_into(&to_host(input), &mut h)?;
        write_back(out, &h);
        Ok(())
    }
    /// The host back end's barrier: the copies before it were synchronous,
    /// so every rank's earlier collectives are done.
    fn barrier(&self) -> Result<()> {
        self.host.barrier()
    }
}

#[cfg(test)]
mod tests {
    use super::super::local::{run_ranks, LocalComm};
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn staged_collectives_pass_comm_check_and_write_back_through_views() {
        let comms: Vec<Mutex<Option<LocalComm>>> = LocalComm::group(2, "dp").into_iter().map(|c| Mutex::new(Some(c))).collect();
        run_ranks(2, |r| {
            let c = comms[r].lock().unwrap().take().unwrap();
            let staged = HostStaged::over(&c);
            let lines = super::super::check::collectives(&staged, Device::Cpu).unwrap();
            assert!(lines.iter().all(|l| l.ends_with(": ok")), "{lines:?}");
            // an all-gather into a view of a larger buffer lands in the buffer
            let base = Tensor::zeros([2, 4], (tch::Kind::Float, Device::Cpu));
            let mut row = base.get(1);
            staged.all_gather_into(&Tensor::full([2], r as f64 + 1.0, (tch::Kind::Float, Device::Cpu)), &mut row).unwrap();
            assert_eq!(Vec::<f32>::try_from(base.flatten(0, -1)).unwrap(), vec![0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        });
    }
}
