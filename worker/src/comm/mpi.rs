//! The MPI back end (rsmpi over OpenMPI/MPICH), for CPU tensors.
//!
//! The world is initialised once with at least `MPI_THREAD_SERIALIZED`
//! (autograd may run a collective from another thread). Started without a
//! launcher, MPI gives a singleton world of one. fp32/f64/int64 reduce
//! natively; bf16/fp16 are reduced through fp32. Reductions are in place
//! (`MPI_IN_PLACE`, through the small C shim in `csrc/mpi_shim.c`, since
//! rsmpi does not expose it): no receive buffer, no copy back.

use std::sync::{Mutex, MutexGuard, OnceLock};

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
    fn glm_allgather_inplace(buf: *mut std::ffi::c_void, bytes: c_int, comm: mpi::ffi::MPI_Comm) -> c_int;
    fn glm_reduce_scatter_block(send: *const std::ffi::c_void, recv: *mut std::ffi::c_void, count: c_int, kind: c_int, comm: mpi::ffi::MPI_Comm) -> c_int;
}
use crate::error::{Error, Result};

static UNIVERSE: OnceLock<std::sync::Mutex<Option<mpi::environment::Universe>>> = OnceLock::new();

/// Every MPI call of the process holds this lock: MPI_THREAD_SERIALIZED
/// allows calls from any thread, one at a time.
static MPI_LOCK: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(what: &str, msg: impl std::fmt::Display) -> Error {
    Error::comm(format!("MPI {what}"), msg.to_string())
}

/// The world communicator (initialising MPI on first use).
pub fn world() -> Result<MpiComm> {
    let cell = UNIVERSE.get_or_init(|| {
        let u = mpi::initialize_with_threading(mpi::Threading::Serialized).map(|(u, _)| u);
        std::sync::Mutex::new(u)
    });
    let guard = cell.lock().expect("MPI universe lock");
    let u = guard.as_ref().ok_or_else(|| err("init", "MPI was already initialised elsewhere, or failed to start; HINT: start under mpirun/srun, or alone"))?;
    let _s = serial();
    Ok(MpiComm::new(u.world().duplicate(), "world"))
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
    /// Freed in `drop` unless MPI is already finalised (a communicator kept
    /// alive by a late autograd node must not abort the process).
    comm: std::mem::ManuallyDrop<SimpleCommunicator>,
    name: String,
    /// Asked once, at construction (under the lock).
    rank: usize,
    size: usize,
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        let _s = serial();
        if !mpi::environment::is_finalized() {
            // SAFETY: dropped exactly once, here.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.comm) };
        }
    }
}

// SAFETY: an MPI communicator handle may be used from any thread under
// MPI_THREAD_SERIALIZED; every call below holds MPI_LOCK.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    fn new(comm: SimpleCommunicator, name: &str) -> Self {
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        MpiComm { comm: std::mem::ManuallyDrop::new(comm), name: name.into(), rank, size }
    }

    /// Splits this communicator into groups called `name`: ranks passing
    /// the same `color` form one sub-communicator, ordered by `key`.
    /// Collective: every rank calls it.
    pub fn split(&self, color: usize, key: usize, name: &str) -> Result<MpiComm> {
        let _s = serial();
        let _w = self.mark("split");
        let c = self.comm.split_by_color_with_key(Color::with_value(color as i32), key as i32).ok_or_else(|| err("split", "empty group"))?;
        Ok(MpiComm::new(c, name))
    }

    /// Ranks sharing this node (the local rank of a process).
    pub fn local(&self) -> MpiComm {
        let _s = serial();
        MpiComm::new(self.comm.split_shared(self.comm.rank()), "node")
    }

    /// Marks collective `op` of this group for the watchdog while it runs
    /// (`runtime::progress`).
    fn mark(&self, op: &'static str) -> crate::runtime::progress::InCollective {
        crate::runtime::progress::collective(op, &self.name, self.rank, self.size)
    }

    fn check_rc(&self, op: &str, call: &str, rc: c_int) -> Result<()> {
        if rc != 0 {
            return Err(super::fail(op, self, format!("{call} returned error code {rc}")));
        }
        Ok(())
    }
}

fn check_cpu(c: &MpiComm, t: &Tensor, what: &str) -> Result<()> {
    if t.device() != tch::Device::Cpu {
        return Err(super::fail(what, c, format!("tensor on {:?}: the MPI back end takes CPU tensors (CUDA tensors go through NCCL)", t.device())));
    }
    Ok(())
}

/// MPI counts are C ints: collectives move at most this many elements per call.
const CHUNK: usize = 1 << 30;

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_cpu(self, t, "all_reduce")?;
        if self.size() == 1 {
            return Ok(());
        }
        let kind = t.kind();
        let code = match kind {
            Kind::Float | Kind::BFloat16 | Kind::Half => 0,
            Kind::Double => 1,
            Kind::Int64 => 2,
            k => return Err(super::fail("all_reduce", self, format!("unsupported element type {k:?}"))),
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
        let mut off = 0;
        while off < n {
            let len = CHUNK.min(n - off);
            let _s = serial();
            let _w = self.mark("all_reduce");
            // SAFETY: a contiguous CPU buffer of n elements of the coded type.
            let rc = unsafe { glm_allreduce_inplace(base.add(off * elt).cast(), len as c_int, code, opc, self.comm.as_raw()) };
            self.check_rc("all_reduce", "MPI_Allreduce", rc)?;
            off += len;
        }
        if !direct {
            tch::no_grad(|| t.copy_(&work.to_kind(kind)));
        }
        Ok(())
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        check_cpu(self, t, "broadcast")?;
        if root >= self.size() {
            return Err(super::fail("broadcast", self, format!("root {root} outside the group")));
        }
        if self.size() == 1 {
            return Ok(());
        }
        let work = t.contiguous();
        let bytes = work.numel() * work.kind().elt_size_in_bytes();
        // SAFETY: a byte view of a contiguous CPU tensor.
        let buf = unsafe { std::slice::from_raw_parts_mut(work.data_ptr() as *mut u8, bytes) };
        {
            let _s = serial();
            let _w = self.mark("broadcast");
            self.comm.process_at_rank(root as i32).broadcast_into(buf);
        }
        tch::no_grad(|| t.copy_(&work));
        Ok(())
    }

    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        check_cpu(self, out, "all_gather_into")?;
        super::check_gather(self, input, out)?;
        let elt = out.kind().elt_size_in_bytes();
        let bytes = input.numel() * elt;
        if !super::is_own_slot(input, out, self.rank()) {
            // put this rank's block in its slot, then gather in place
            tch::no_grad(|| out.view([self.size() as i64, -1]).get(self.rank() as i64).copy_(&input.reshape([-1])));
        }
        if self.size() == 1 {
            return Ok(());
        }
        if bytes > i32::MAX as usize {
            return Err(super::fail("all_gather_into", self, format!("{bytes} bytes per rank: more than one MPI call moves; gather in smaller buckets")));
        }
        let _s = serial();
        let _w = self.mark("all_gather_into");
        // SAFETY: `out` is a contiguous CPU buffer of size × bytes bytes.
        let rc = unsafe { glm_allgather_inplace(out.data_ptr(), bytes as c_int, self.comm.as_raw()) };
        self.check_rc("all_gather_into", "MPI_Allgather", rc)
    }

    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        check_cpu(self, input, "reduce_scatter_into")?;
        super::check_scatter(self, input, out)?;
        let kind = input.kind();
        if self.size() == 1 {
            tch::no_grad(|| out.copy_(&input.view_as(out)));
            return Ok(());
        }
        // f64 natively, fp32/bf16/fp16 through fp32 (as all_reduce)
        let (wide, code) = match kind {
            Kind::Double => (Kind::Double, 1),
            Kind::Float | Kind::BFloat16 | Kind::Half => (Kind::Float, 0),
            k => return Err(super::fail("reduce_scatter_into", self, format!("unsupported element type {k:?}"))),
        };
        let send = if kind == wide { input.shallow_clone() } else { input.to_kind(wide) };
        let direct = kind == wide && out.is_contiguous();
        let recv = if direct { out.shallow_clone() } else { Tensor::empty([out.numel() as i64], (wide, tch::Device::Cpu)) };
        let count = recv.numel();
        if count > CHUNK {
            return Err(super::fail(
                "reduce_scatter_into",
                self,
                format!("{count} elements per rank: more than one MPI call moves; reduce in smaller buckets"),
            ));
        }
        {
            let _s = serial();
            let _w = self.mark("reduce_scatter_into");
            // SAFETY: contiguous CPU buffers of size × count and count elements of the coded type.
            let rc = unsafe { glm_reduce_scatter_block(send.data_ptr(), recv.data_ptr(), count as c_int, code, self.comm.as_raw()) };
            self.check_rc("reduce_scatter_into", "MPI_Reduce_scatter_block", rc)?;
        }
        if !direct {
            tch::no_grad(|| out.copy_(&recv.view_as(out).to_kind(kind)));
        }
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let _s = serial();
        let _w = self.mark("barrier");
        self.comm.barrier();
        Ok(())
    }
}

impl MpiComm {
    /// A plain `MPI_Allreduce` (sum) of f32 buffers, bypassing the tensor
    /// layer: the baseline the benchmark compares `all_reduce` against.
    pub fn raw_all_reduce_f32(&self, send: &[f32], recv: &mut [f32]) {
        let _s = serial();
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
