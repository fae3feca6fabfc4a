//! Collectives on tensors behind one trait, with three back ends: `mpi.rs`
//! for CPU tensors, `nccl.rs` for CUDA tensors (`GroupComm` holds both for a
//! group and picks by the tensor's device), and `local.rs`, ranks that are
//! threads of one process (the fast parity tests). `staged.rs` runs any
//! tensor's collectives through a host copy over MPI instead, when
//! `GLM_COMM_BACKEND=host-staged` asks (several ranks on one GPU). Every MPI
//! and NCCL call is made here and nowhere else.
//!
//! A communicator is a value: the parallel state holds one per group
//! (`Arc<dyn Communicator>`), the tensor-parallel autograd regions and the
//! ZeRO gradient hooks keep clones of it. Every error names the operation,
//! the group and the rank.

pub mod check;
pub mod local;
pub mod mpi;
pub mod nccl;
pub mod staged;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;

use crate::error::{CommAt, Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// A group of ranks that run collectives together. Implementations are
/// `Send + Sync` and serialise their own calls (MPI_THREAD_SERIALIZED):
/// backward may run a collective from an autograd thread.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// The group's name in errors and reports ("world", "dp", "tp").
    fn name(&self) -> &str;
    /// Reduces `t` across the group; every rank gets the result in `t`.
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()>;
    /// Copies `t` of rank `root` into `t` on every rank.
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()>;
    /// `out` (contiguous, `size × n` elements) := every rank's `input` (`n`
    /// elements) in rank order. `input` may be `out`'s own slot (in place:
    /// nothing is copied for this rank).
    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()>;
    /// `out` (`n` elements) := the sum over ranks of `input`'s rank-th run of
    /// `n` elements (`input` holds `size × n`, contiguous).
    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()>;
    fn barrier(&self) -> Result<()>;
    /// Bytes this rank has sent through the group so far, when metered
    /// (see [`Metered`]).
    fn bytes_sent(&self) -> Option<u64> {
        None
    }

    /// Concatenates every rank's `t` along dimension 0, in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous();
        let mut out = Tensor::empty(gathered_shape(&t, self.size()).as_slice(), (t.kind(), t.device()));
        self.all_gather_into(&t, &mut out)?;
        Ok(out)
    }

    /// Sums `t` across the group and returns this rank's 1/size of it
    /// (dimension 0 split in rank order; it must divide evenly).
    fn reduce_scatter(&self, t: &Tensor) -> Result<Tensor> {
        let shape = scattered_shape(t, self.size()).map_err(|m| fail("reduce_scatter", self, m))?;
        let mut out = Tensor::empty(shape.as_slice(), (t.kind(), t.device()));
        self.reduce_scatter_into(&t.contiguous(), &mut out)?;
        Ok(out)
    }
}

/// Where `c` is: its group's name and this rank's place in it.
pub fn at(c: &(impl Communicator + ?Sized)) -> CommAt {
    CommAt { group: c.name().to_string(), rank: c.rank(), size: c.size() }
}

/// The error of collective `op` on group `c`: names the operation, the
/// group and the rank, then what went wrong.
pub fn fail(op: &str, c: &(impl Communicator + ?Sized), msg: impl std::fmt::Display) -> Error {
    Error::Comm { op: op.to_string(), at: Some(at(c)), msg: msg.to_string() }
}

/// The shape of an all-gather of `t` over `n` ranks: dimension 0 (a
/// scalar counts as one element) times `n`.
pub(crate) fn gathered_shape(t: &Tensor, n: usize) -> Vec<i64> {
    let mut shape = t.size();
    if shape.is_empty() {
        shape = vec![1];
    }
    shape[0] *= n as i64;
    shape
}

/// The shape of each rank's part of a reduce-scatter of `t` over `n` ranks;
/// an error unless dimension 0 splits evenly.
pub(crate) fn scattered_shape(t: &Tensor, n: usize) -> std::result::Result<Vec<i64>, String> {
    let mut shape = t.size();
    if shape.is_empty() || shape[0] % n as i64 != 0 {
        return Err(format!("dimension 0 of {shape:?} is not divisible by the group size {n}"));
    }
    shape[0] /= n as i64;
    Ok(shape)
}

/// Checks the sizes of an all-gather (`out` = size × `input`, contiguous).
pub(crate) fn check_gather(c: &(impl Communicator + ?Sized), input: &Tensor, out: &Tensor) -> Result<()> {
    if out.numel() != input.numel() * c.size() || !out.is_contiguous() || input.kind() != out.kind() {
        return Err(fail(
            "all_gather_into",
            c,
            format!(
                "output of {} {:?} elements (contiguous: {}) for {} ranks × {} {:?} input elements",
                out.numel(),
                out.kind(),
                out.is_contiguous(),
                c.size(),
                input.numel(),
                input.kind()
            ),
        ));
    }
    Ok(())
}

/// Checks the sizes of a reduce-scatter (`input` = size × `out`, contiguous).
pub(crate) fn check_scatter(c: &(impl Communicator + ?Sized), input: &Tensor, out: &Tensor) -> Result<()> {
    if input.numel() != out.numel() * c.size() || !input.is_contiguous() || input.kind() != out.kind() {
        return Err(fail(
            "reduce_scatter_into",
            c,
            format!(
                "input of {} {:?} elements (contiguous: {}) for {} ranks × {} {:?} output elements",
                input.numel(),
                input.kind(),
                input.is_contiguous(),
                c.size(),
                out.numel(),
                out.kind()
            ),
        ));
    }
    Ok(())
}

/// Whether `input` is rank `rank`'s slot of `out` (an in-place all-gather).
pub(crate) fn is_own_slot(input: &Tensor, out: &Tensor, rank: usize) -> bool {
    let elt = out.kind().elt_size_in_bytes();
    input.is_contiguous() && input.data_ptr() as usize == out.data_ptr() as usize + rank * input.numel() * elt
}

/// A communicator that counts the bytes this rank sends, as ring algorithms
/// move them (NCCL's bus-bandwidth convention): all-reduce 2(p-1)/p of the
/// buffer, reduce-scatter (p-1)/p of its input, all-gather (p-1)/p of its
/// output, broadcast the buffer. Host-side values (losses, flags) count too.
pub struct Metered<C: Communicator> {
    inner: C,
    sent: AtomicU64,
}

impl<C: Communicator> Metered<C> {
    pub fn new(inner: C) -> Self {
        Metered { inner, sent: AtomicU64::new(0) }
    }

    pub fn inner(&self) -> &C {
        &self.inner
    }

    fn add(&self, t: &Tensor, num: f64) {
        let p = self.inner.size() as f64;
        let bytes = (t.numel() * t.kind().elt_size_in_bytes()) as f64 * num * (p - 1.0) / p;
        self.sent.fetch_add(bytes.round() as u64, Ordering::Relaxed);
    }
}

impl<C: Communicator> Communicator for Metered<C> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.add(t, 2.0);
        self.inner.all_reduce(t, op)
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.add(t, self.inner.size() as f64 / (self.inner.size() as f64 - 1.0).max(1.0));
        self.inner.broadcast(t, root)
    }
    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.add(out, 1.0);
        self.inner.all_gather_into(input, out)
    }
    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.add(input, 1.0);
        self.inner.reduce_scatter_into(input, out)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn bytes_sent(&self) -> Option<u64> {
        Some(self.sent.load(Ordering::Relaxed))
    }
}

/// One group's communicators: CPU tensors go through MPI, CUDA tensors
/// through NCCL (when the group has an NCCL communicator, i.e. training on
/// CUDA). Small host-side values (loss sums, flags) stay on MPI. With the
/// host-staged back end there is no NCCL communicator, and every tensor's
/// collectives go through a host copy over MPI.
pub struct GroupComm {
    pub mpi: mpi::MpiComm,
    pub nccl: Option<nccl::NcclComm>,
    backend: staged::Backend,
}

impl GroupComm {
    /// All ranks of `world`; on CUDA device `device` also an NCCL
    /// communicator, bootstrapped over MPI, unless `backend` stages
    /// collectives through the host. Collective over `world`.
    pub fn world(world: &mpi::MpiComm, device: tch::Device, backend: staged::Backend) -> Result<Self> {
        let mpi = world.split(0, world.rank(), "world")?;
        let nccl = match (device, backend) {
            (tch::Device::Cuda(d), staged::Backend::Native) => Some(nccl::NcclComm::init(&mpi, d)?),
            _ => None,
        };
        Ok(GroupComm { mpi, nccl, backend })
    }

    /// The sub-group `name` of the ranks passing the same `color`, ordered
    /// by `key`, with both back ends split alike. Collective over this group.
    pub fn split(&self, color: usize, key: usize, name: &str) -> Result<Self> {
        let mpi = self.mpi.split(color, key, name)?;
        let nccl = match &self.nccl {
            Some(n) => Some(n.split(color, key, &mpi)?),
            None => None,
        };
        Ok(GroupComm { mpi, nccl, backend: self.backend })
    }

    /// The back end this group's collectives go through.
    pub fn backend(&self) -> staged::Backend {
        self.backend
    }

    /// Runs `f` with the communicator that takes tensors on `device`.
    fn route<R>(&self, device: tch::Device, f: impl FnOnce(&dyn Communicator) -> R) -> R {
        match (&self.nccl, device, self.backend) {
            (_, _, staged::Backend::HostStaged) => f(&staged::HostStaged::over(&self.mpi)),
            (Some(n), tch::Device::Cuda(_), _) => f(n),
            _ => f(&self.mpi),
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
    fn name(&self) -> &str {
        self.mpi.name()
    }
    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.route(t.device(), |c| c.all_reduce(t, op))
    }
    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.route(t.device(), |c| c.broadcast(t, root))
    }
    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.route(out.device(), |c| c.all_gather_into(input, out))
    }
    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.route(input.device(), |c| c.reduce_scatter_into(input, out))
    }
    /// A host-side barrier (MPI): every rank has arrived.
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
}

/// A shared communicator: what the parallel state, the tensor-parallel
/// regions and the optimizer hold.
pub type Comm = Arc<dyn Communicator>;
