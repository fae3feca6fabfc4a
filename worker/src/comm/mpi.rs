//! The MPI back end (rsmpi over OpenMPI/MPICH), for CPU tensors.
//!
//! The world is initialised once with at least `MPI_THREAD_SERIALIZED`
//! (autograd may run a collective from another thread). Started without a
//! launcher, MPI gives a singleton world of one. fp32/f64/int64 reduce
//! natively; bf16/fp16 are reduced through fp32. Reductions are in place
//! (`MPI_IN_PLACE`, through the small C shim in `csrc/mpi_shim.c`, since
//! rsmpi does not expose it): no receive buffer, no copy back.

use std::sync::OnceLock;

use mpi::collective::SystemOperation;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::traits::*;
use tch::{Kind, Tensor};

use super::{Communicator, ReduceOp};
use mpi::raw::AsRaw;
use std::os::raw::c_int;

extern "C" {
    /// csrc/mpi_shim.c
    fn glm_allreduce_inplace(buf: *mut std::ffi::c_void, count: c_int, kind: c_int, op: c_int, comm: mpi::ffi::MPI_Comm) -> c_int;
}
use crate::error::{Error, Result};

static UNIVERSE: OnceLock<std::sync::Mutex<Option<mpi::environment::Universe>>> = OnceLock::new();

fn err(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("MPI {what}: {msg}"))
}

/// The world communicator (initialising MPI on first use).
pub fn world() -> Result<MpiComm> {
    let cell = UNIVERSE.get_or_init(|| {
        let u = mpi::initialize_with_threading(mpi::Threading::Serialized).map(|(u, _)| u);
        std::sync::Mutex::new(u)
    });
    let guard = cell.lock().expect("MPI universe lock");
    let u = guard.as_ref().ok_or_else(|| err("init", "MPI was already initialised elsewhere, or failed to start; HINT: start under mpirun/srun, or alone"))?;
    Ok(MpiComm { comm: u.world().duplicate() })
}

/// Finalises MPI (drops the universe) if it was initialised; call once, at
/// exit, after every communicator is gone.
pub fn finalize() {
    if let Some(cell) = UNIVERSE.get() {
        if let Ok(mut g) = cell.lock() {
            g.take();
        }
    }
}

pub struct MpiComm {
    comm: SimpleCommunicator,
}

impl MpiComm {
    /// Splits this communicator: ranks passing the same `color` form one
    /// sub-communicator, ordered by `key`. Collective: every rank calls it.
    pub fn split(&self, color: usize, key: usize) -> Result<MpiComm> {
        let c = self
            .comm
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .ok_or_else(|| err("split", "empty group"))?;
        Ok(MpiComm { comm: c })
    }

    /// Ranks sharing this node (the local rank of a process).
    pub fn local(&self) -> MpiComm {
        MpiComm { comm: self.comm.split_shared(self.comm.rank()) }
    }
}

fn check_cpu(t: &Tensor, what: &str) -> Result<()> {
    if t.device() != tch::Device::Cpu {
        return Err(err(what, format!("tensor on {:?}: the MPI back end takes CPU tensors (CUDA tensors go through NCCL)", t.device())));
    }
    Ok(())
}

/// Runs `f` on the tensor's contents as a slice of `T` (contiguous CPU).
fn with_slice<T, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> R {
    let numel = t.numel();
    // SAFETY: callers pass contiguous CPU tensors of element type T; the
    // slice does not outlive the borrow of `t`.
    let s = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, numel) };
    f(s)
}

fn with_slice_mut<T, R>(t: &mut Tensor, f: impl FnOnce(&mut [T]) -> R) -> R {
    let numel = t.numel();
    // SAFETY: as above; `t` is borrowed mutably for the slice's life.
    let s = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, numel) };
    f(s)
}


impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.comm.rank() as usize
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_cpu(t, "all_reduce")?;
        if self.size() == 1 {
            return Ok(());
        }
        let kind = t.kind();
        let code = match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => 0,
            Kind::Double => 1,
            Kind::Int64 => 2,
            k => return Err(err("all_reduce", format!("unsupported element type {k:?}"))),
        };
        // reduce in place when t is a contiguous fp32/f64/i64 tensor, else in a fp32/contiguous copy
        let direct = t.is_contiguous() && matches!(kind, Kind::Float | Kind::Double | Kind::Int64);
        let work = if direct { t.shallow_clone() } else { t.to_kind(if code == 0 { Kind::Float } else { kind }).contiguous() };
        let elt = work.kind().elt_size_in_bytes();
        let (n, base) = (work.numel(), work.data_ptr() as *mut u8);
        let opc = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
        };
        const CHUNK: usize = 1 << 30; // MPI counts are C ints
        let mut off = 0;
        while off < n {
            let len = CHUNK.min(n - off);
            // SAFETY: a contiguous CPU buffer of n elements of the coded type.
            let rc = unsafe { glm_allreduce_inplace(base.add(off * elt).cast(), len as c_int, code, opc, self.comm.as_raw()) };
            if rc != 0 {
                return Err(err("all_reduce", format!("MPI_Allreduce returned error code {rc}")));
            }
            off += len;
        }
        if !direct {
            tch::no_grad(|| t.copy_(&work.to_kind(kind)));
        }
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        check_cpu(t, "broadcast")?;
        if self.size() == 1 {
            return Ok(());
        }
        let work = t.contiguous();
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        let root = self.comm.process_at_rank(root as i32);
        // SAFETY: a byte view of a contiguous CPU tensor.
        let buf = unsafe { std::slice::from_raw_parts_mut(work.data_ptr() as *mut u8, bytes) };
        root.broadcast_into(buf);
        tch::no_grad(|| t.copy_(&work));
        Ok(())
    }

    fn all_gather(&self, t: &Tensor) -> Result<Tensor> {
        check_cpu(t, "all_gather")?;
        let work = t.contiguous();
        let n = self.size();
        let out = Tensor::empty(super::gathered_shape(&work, n).as_slice(), (work.kind(), work.device()));
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        // SAFETY: byte views of contiguous CPU tensors; out holds n × bytes.
        let send = unsafe { std::slice::from_raw_parts(work.data_ptr() as *const u8, bytes) };
        let recv = unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, bytes * n) };
        self.comm.all_gather_into(send, recv);
        Ok(out)
    }

    fn reduce_scatter(&self, t: &Tensor) -> Result<Tensor> {
        check_cpu(t, "reduce_scatter")?;
        let part_shape = super::scattered_shape(t, self.size(), "MPI")?;
        let kind = t.kind();
        // f64 natively, fp32/bf16/fp16 through fp32 (as all_reduce)
        let wide = match kind {
            Kind::Double => Kind::Double,
            Kind::Float | Kind::BFloat16 | Kind::Half => Kind::Float,
            k => return Err(err("reduce_scatter", format!("unsupported element type {k:?}"))),
        };
        let work = t.to_kind(wide).contiguous();
        let mut out = Tensor::empty(part_shape.as_slice(), (wide, t.device()));
        let sum = SystemOperation::sum();
        if wide == Kind::Double {
            with_slice::<f64, _>(&work, |s| with_slice_mut::<f64, _>(&mut out, |r| self.comm.reduce_scatter_block_into(s, r, sum)));
        } else {
            with_slice::<f32, _>(&work, |s| with_slice_mut::<f32, _>(&mut out, |r| self.comm.reduce_scatter_block_into(s, r, sum)));
        }
        Ok(out.to_kind(kind))
    }

    fn barrier(&self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }
}

impl MpiComm {
    /// A plain `MPI_Allreduce` (sum) of f32 buffers, bypassing the tensor
    /// layer: the baseline the benchmark compares `all_reduce` against.
    pub fn raw_all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        self.comm.all_reduce_into(send, recv, SystemOperation::sum());
    }
}

/// Whether an MPI launcher (mpirun/mpiexec, srun, a PMI/PMIx agent)
/// started this process. OpenMPI hands its ranks a pty for stdout even when
/// mpirun's own output goes to a file, so `is_terminal` cannot be trusted
/// there: progress bars are drawn only outside a launcher.
pub fn under_launcher() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_ID", "MPI_LOCALNRANKS"].iter().any(|v| std::env::var_os(v).is_some())
}

/// Whether to draw live progress on `stream`: a terminal, and no launcher
/// in between (see [`under_launcher`]).
pub fn live_terminal(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && !under_launcher()
}

/// The process's local rank: from the launcher's environment when it says,
/// else the rank among the processes sharing this node.
pub fn local_rank(world: &MpiComm) -> usize {
    for var in ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "LOCAL_RANK"] {
        if let Some(r) = std::env::var(var).ok().and_then(|v| v.parse().ok()) {
            return r;
        }
    }
    world.local().rank()
}
