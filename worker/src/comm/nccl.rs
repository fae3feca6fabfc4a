//! The NCCL back end, for CUDA tensors.
//!
//! `libnccl.so.2` is loaded at run time (the binary builds and runs without
//! CUDA): first the copy libtorch_cuda already pulled in (the torch wheel's
//! `nvidia/nccl/lib`), else one named by `GLM_NCCL_LIB`, else the loader's
//! search path. A group's communicator is bootstrapped by broadcasting an
//! `ncclUniqueId` from its rank 0 over MPI; sub-groups (tensor- and
//! data-parallel) are derived with `ncclCommSplit` (NCCL >= 2.18), or, on an
//! older NCCL, with an id of their own broadcast over the sub-group's MPI
//! communicator.
//!
//! Streams: tch never changes libtorch's current stream, so libtorch computes
//! on each device's default (legacy, stream 0) stream. Collectives are
//! enqueued on that same stream, which orders them after the kernels that
//! produced their input and before those that read the result, with no host
//! synchronisation; reading a value back to the host waits, as for any kernel.
//!
//! Every NCCL error becomes an `Error` carrying NCCL's own message (its error
//! string, plus `ncclGetLastError`'s detail where the library has it).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};

use super::{Communicator, ReduceOp};
use crate::error::{Error, Result};

/// NCCL's `ncclUniqueId`: 128 opaque bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    pub internal: [c_char; 128],
}

type CommPtr = *mut c_void;
type Stream = *mut c_void;
type Res = c_int;

/// The entry points glm-worker uses, resolved once.
struct Api {
    _lib: libloading::Library,
    path: String,
    get_version: unsafe extern "C" fn(*mut c_int) -> Res,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> Res,
    comm_init_rank: unsafe extern "C" fn(*mut CommPtr, c_int, UniqueId, c_int) -> Res,
    comm_split: Option<unsafe extern "C" fn(CommPtr, c_int, c_int, *mut CommPtr, *mut c_void) -> Res>,
    comm_destroy: unsafe extern "C" fn(CommPtr) -> Res,
    comm_abort: unsafe extern "C" fn(CommPtr) -> Res,
    error_string: unsafe extern "C" fn(Res) -> *const c_char,
    last_error: Option<unsafe extern "C" fn(CommPtr) -> *const c_char>,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, CommPtr, Stream) -> Res,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, CommPtr, Stream) -> Res,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, CommPtr, Stream) -> Res,
    reduce_scatter: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, CommPtr, Stream) -> Res,
}

// SAFETY: plain function pointers into a library that stays loaded.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn candidates() -> Vec<String> {
    let mut c = Vec::new();
    if let Ok(p) = std::env::var("GLM_NCCL_LIB") {
        c.push(p);
    }
    c.push("libnccl.so.2".into());
    if let Some(dir) = crate::runtime::torch::libtorch_dir() {
        // the torch wheel's layout: site-packages/torch/lib -> site-packages/nvidia/nccl/lib
        c.push(format!("{dir}/../../nvidia/nccl/lib/libnccl.so.2"));
    }
    c
}

fn load() -> std::result::Result<Api, String> {
    crate::runtime::torch::load_cuda();
    let mut tried = Vec::new();
    for path in candidates() {
        // SAFETY: loading NCCL runs its (benign) initialisers only.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => return resolve(lib, path),
            Err(e) => tried.push(format!("{path} ({e})")),
        }
    }
    Err(format!("libnccl.so.2 not found; tried: {}. HINT: install torch 2.11 with CUDA (its nvidia-nccl wheel), or set GLM_NCCL_LIB", tried.join("; ")))
}

fn resolve(lib: libloading::Library, path: String) -> std::result::Result<Api, String> {
    macro_rules! sym {
        ($name:literal) => {
            // SAFETY: the type matches the declaration in nccl.h.
            *unsafe { lib.get($name) }.map_err(|e| format!("{path}: {e}"))?
        };
    }
    macro_rules! opt_sym {
        ($name:literal) => {
            // SAFETY: as above; absent in older NCCL versions.
            unsafe { lib.get($name) }.ok().map(|s| *s)
        };
    }
    let api = Api {
        get_version: sym!(b"ncclGetVersion\0"),
        get_unique_id: sym!(b"ncclGetUniqueId\0"),
        comm_init_rank: sym!(b"ncclCommInitRank\0"),
        comm_split: opt_sym!(b"ncclCommSplit\0"),
        comm_destroy: sym!(b"ncclCommDestroy\0"),
        comm_abort: sym!(b"ncclCommAbort\0"),
        error_string: sym!(b"ncclGetErrorString\0"),
        last_error: opt_sym!(b"ncclGetLastError\0"),
        all_reduce: sym!(b"ncclAllReduce\0"),
        broadcast: sym!(b"ncclBroadcast\0"),
        all_gather: sym!(b"ncclAllGather\0"),
        reduce_scatter: sym!(b"ncclReduceScatter\0"),
        path: path.clone(),
        _lib: lib,
    };
    Ok(api)
}

fn api() -> Result<&'static Api> {
    API.get_or_init(load).as_ref().map_err(|e| Error::comm("loading NCCL", e.clone()))
}

/// Where NCCL was loaded from and its version ("2.28.9"), or why it could not be.
pub fn describe() -> std::result::Result<(String, String), String> {
    let api = api().map_err(|e| e.to_string())?;
    Ok((api.path.clone(), version().map_err(|e| e.to_string())?))
}

/// NCCL's version as "major.minor.patch".
pub fn version() -> Result<String> {
    let api = api()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    check(api, unsafe { (api.get_version)(&mut v) }, "ncclGetVersion", std::ptr::null_mut())?;
    // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9, major*1000 + minor*100 + patch before
    let (major, minor, patch) = if v >= 20900 { (v / 10000, (v % 10000) / 100, v % 100) } else { (v / 1000, (v % 1000) / 100, v % 100) };
    Ok(format!("{major}.{minor}.{patch}"))
}

/// NCCL's message for a result code.
pub fn error_string(code: i32) -> Result<String> {
    Ok(message(api()?, code))
}

fn message(api: &Api, code: Res) -> String {
    // SAFETY: returns a static C string.
    let p = unsafe { (api.error_string)(code) };
    if p.is_null() {
        format!("NCCL error {code}")
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn check(api: &Api, code: Res, what: &str, comm: CommPtr) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let msg = message(api, code);
    // SAFETY: a per-communicator C string owned by NCCL.
    let detail = api
        .last_error
        .map(|f| unsafe { f(comm) })
        .filter(|p| !p.is_null())
        .map(|p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty());
    Err(Error::comm(
        what,
        match detail {
            Some(d) => format!("{msg} (NCCL code {code}): {d}"),
            None => format!("{msg} (NCCL code {code})"),
        },
    ))
}

/// A fresh `ncclUniqueId` (rank 0 of a group makes it, the others receive it).
pub fn unique_id() -> Result<UniqueId> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: writes 128 bytes.
    check(api, unsafe { (api.get_unique_id)(&mut id) }, "ncclGetUniqueId", std::ptr::null_mut())?;
    Ok(id)
}

/// An NCCL communicator bound to one CUDA device.
pub struct NcclComm {
    comm: CommPtr,
    rank: usize,
    size: usize,
    device: usize,
    /// Set after an NCCL error: the communicator is aborted, not destroyed,
    /// when dropped (destroying may wait for peers that will never come).
    failed: AtomicBool,
    /// Calls on this communicator are serialised.
    lock: Mutex<()>,
    name: String,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls
// are not concurrent; every call holds `lock`.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Creates the communicator of a group whose members are the ranks of
    /// `mpi` (collective over it), on CUDA device `device`: rank 0 makes the
    /// unique id, MPI broadcasts it, every rank joins.
    pub fn init(mpi: &dyn Communicator, device: usize) -> Result<NcclComm> {
        let api = api()?;
        crate::runtime::cuda::set_device(device)?;
        let mut id = if mpi.rank() == 0 { unique_id()? } else { UniqueId { internal: [0; 128] } };
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let mut t = Tensor::from_slice(&bytes);
        mpi.broadcast(&mut t, 0)?;
        let mut got = vec![0u8; 128];
        t.copy_data(&mut got, 128);
        for (d, s) in id.internal.iter_mut().zip(got) {
            *d = s as c_char;
        }
        let mut comm: CommPtr = std::ptr::null_mut();
        // blocks until every rank of the group has joined: under the watchdog
        let _w = crate::runtime::progress::collective("ncclCommInitRank", mpi.name(), mpi.rank(), mpi.size());
        // SAFETY: out-pointer and a by-value id, as declared in nccl.h.
        check(api, unsafe { (api.comm_init_rank)(&mut comm, mpi.size() as c_int, id, mpi.rank() as c_int) }, "ncclCommInitRank", std::ptr::null_mut())?;
        Ok(NcclComm { comm, rank: mpi.rank(), size: mpi.size(), device, failed: AtomicBool::new(false), lock: Mutex::new(()), name: mpi.name().to_string() })
    }

    /// Splits this communicator (collective over it): ranks passing the same
    /// `color` form one group, ordered by `key`. `mpi_sub` is the same
    /// group's MPI communicator, used to bootstrap it on an NCCL without
    /// `ncclCommSplit`.
    pub fn split(&self, color: usize, key: usize, mpi_sub: &dyn Communicator) -> Result<NcclComm> {
        let api = api()?;
        crate::runtime::cuda::set_device(self.device)?;
        match api.comm_split {
            Some(split) => {
                let mut comm: CommPtr = std::ptr::null_mut();
                // SAFETY: as declared in nccl.h; a null config inherits the parent's.
                let rc = unsafe { split(self.comm, color as c_int, key as c_int, &mut comm, std::ptr::null_mut()) };
                self.track(check(api, rc, "ncclCommSplit", self.comm))?;
                Ok(NcclComm {
                    comm,
                    rank: mpi_sub.rank(),
                    size: mpi_sub.size(),
                    device: self.device,
                    failed: AtomicBool::new(false),
                    lock: Mutex::new(()),
                    name: mpi_sub.name().to_string(),
                })
            }
            None => NcclComm::init(mpi_sub, self.device),
        }
    }

    fn track(&self, r: Result<()>) -> Result<()> {
        if r.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        r
    }

    fn check_tensor(&self, t: &Tensor, what: &str) -> Result<()> {
        match t.device() {
            Device::Cuda(d) if d == self.device => Ok(()),
            other => Err(super::fail(what, self, format!("tensor on {other:?}, but this NCCL communicator is on cuda:{}", self.device))),
        }
    }

    /// Runs an in-place collective `f(api, buffer, count, type, stream)` on
    /// `t`: directly when it is contiguous, else on a contiguous copy that is
    /// written back.
    fn in_place(&self, t: &mut Tensor, what: &str, f: impl FnOnce(&Api, *mut c_void, usize, c_int, Stream) -> Res) -> Result<()> {
        self.check_tensor(t, what)?;
        let dt = dtype_of(self, t, what)?;
        let work = if t.is_contiguous() { t.shallow_clone() } else { t.contiguous() };
        let (n, p) = (work.numel(), work.data_ptr());
        // f's SAFETY: a contiguous buffer of n elements of type dt on this communicator's device.
        self.call(what, |api, s| f(api, p, n, dt, s))?;
        if !t.is_contiguous() {
            tch::no_grad(|| t.copy_(&work));
        }
        Ok(())
    }

    /// Runs one collective on the default stream of this communicator's device.
    fn call(&self, what: &str, f: impl FnOnce(&Api, Stream) -> Res) -> Result<()> {
        let api = api()?;
        let _serial = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // NCCL calls return once enqueued; the wait that can hang is the
        // host's synchronisation later, which glm-launch's progress deadline
        // covers (see runtime::progress)
        let _w = crate::runtime::progress::collective(what, &self.name, self.rank, self.size);
        crate::runtime::cuda::set_device(self.device)?;
        let rc = f(api, std::ptr::null_mut());
        // the failure of a call on this communicator names its group and rank
        self.track(check(api, rc, what, self.comm).map_err(|e| match e {
            Error::Comm { op, at: None, msg } => Error::Comm { op, at: Some(super::at(self)), msg },
            e => e,
        }))
    }
}

/// NCCL's data type code for a tensor kind.
fn data_type(k: Kind) -> Option<c_int> {
    Some(match k {
        Kind::Int8 => 0,
        Kind::Uint8 | Kind::Bool => 1,
        Kind::Int => 2,
        Kind::Int64 => 4,
        Kind::Half => 6,
        Kind::Float => 7,
        Kind::Double => 8,
        Kind::BFloat16 => 9,
        _ => return None,
    })
}

fn dtype_of(c: &NcclComm, t: &Tensor, what: &str) -> Result<c_int> {
    data_type(t.kind()).ok_or_else(|| super::fail(what, c, format!("unsupported element type {:?}", t.kind())))
}

impl Communicator for NcclComm {
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
        let opc = match op {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 2,
        };
        // 16-bit types reduce natively in NCCL
        self.in_place(t, "ncclAllReduce", |api, p, n, dt, s| unsafe { (api.all_reduce)(p, p, n, dt, opc, self.comm, s) })
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.in_place(t, "ncclBroadcast", |api, p, n, dt, s| unsafe { (api.broadcast)(p, p, n, dt, root as c_int, self.comm, s) })
    }

    fn all_gather_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check_tensor(out, "ncclAllGather")?;
        self.check_tensor(input, "ncclAllGather")?;
        super::check_gather(self, input, out)?;
        let dt = dtype_of(self, out, "ncclAllGather")?;
        // in place when `input` is this rank's slot of `out` (NCCL allows it)
        let work = if super::is_own_slot(input, out, self.rank) { input.shallow_clone() } else { input.contiguous() };
        let (n, src, dst) = (work.numel(), work.data_ptr(), out.data_ptr());
        // SAFETY: out holds size × n elements; both on this comm's device.
        self.call("ncclAllGather", |api, s| unsafe { (api.all_gather)(src, dst, n, dt, self.comm, s) })?;
        // `work` may be a temporary: the caching allocator reuses its memory
        // only for later work on the same stream, after the gather.
        drop(work);
        Ok(())
    }

    fn reduce_scatter_into(&self, input: &Tensor, out: &mut Tensor) -> Result<()> {
        self.check_tensor(input, "ncclReduceScatter")?;
        self.check_tensor(out, "ncclReduceScatter")?;
        super::check_scatter(self, input, out)?;
        let dt = dtype_of(self, input, "ncclReduceScatter")?;
        let direct = out.is_contiguous();
        let recv = if direct { out.shallow_clone() } else { Tensor::empty([out.numel() as i64], (out.kind(), out.device())) };
        let (count, src, dst) = (recv.numel(), input.data_ptr(), recv.data_ptr());
        // SAFETY: input holds size × count elements, recv count; same device.
        self.call("ncclReduceScatter", |api, s| unsafe { (api.reduce_scatter)(src, dst, count, dt, 0, self.comm, s) })?;
        if !direct {
            tch::no_grad(|| out.copy_(&recv.view_as(out)));
        }
        Ok(())
    }

    /// An all-reduce of one element, then a wait for the device: when it
    /// returns, every rank's earlier collectives on this group are done.
    fn barrier(&self) -> Result<()> {
        let mut t = Tensor::zeros([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce(&mut t, ReduceOp::Sum)?;
        tch::Cuda::synchronize(self.device as i64);
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the communicator was created by NCCL and is released once.
        unsafe {
            if self.failed.load(Ordering::SeqCst) || std::thread::panicking() {
                (api.comm_abort)(self.comm);
            } else {
                (api.comm_destroy)(self.comm);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The torch 2.11 wheel installs NCCL beside libtorch; on a machine
    /// without it these checks say so and pass vacuously only there.
    fn have_nccl() -> bool {
        match api() {
            Ok(_) => true,
            Err(e) => {
                let torch_lib = option_env!("GLM_BUILD_LIBTORCH_LIB").unwrap_or("");
                let wheel = std::path::Path::new(torch_lib).join("../../nvidia/nccl/lib/libnccl.so.2");
                assert!(!wheel.exists(), "NCCL is installed at {} but did not load: {e}", wheel.display());
                eprintln!("no NCCL on this machine: {e}");
                false
            }
        }
    }

    #[test]
    fn loads_and_reports_version_and_messages() {
        if !have_nccl() {
            return;
        }
        let v = version().unwrap();
        let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
        assert_eq!(parts.len(), 3, "{v}");
        assert!(parts[0] == 2 && parts[1] >= 18, "NCCL {v}: ncclCommSplit needs 2.18+");
        assert!(api().unwrap().comm_split.is_some());
        assert_eq!(error_string(0).unwrap(), "no error");
        assert!(error_string(4).unwrap().contains("invalid argument"), "{}", error_string(4).unwrap());
        let e = check(api().unwrap(), 5, "ncclAllReduce", std::ptr::null_mut()).unwrap_err().to_string();
        assert!(e.contains("ncclAllReduce") && e.contains("code 5") && e.contains("usage"), "{e}");
    }

    #[test]
    fn unique_ids_differ() {
        if !have_nccl() {
            return;
        }
        // needs no GPU: the id names rank 0's bootstrap socket
        let (a, b) = (unique_id().unwrap(), unique_id().unwrap());
        assert!(a.internal.iter().any(|&c| c != 0));
        assert_ne!(a.internal.to_vec(), b.internal.to_vec());
    }

    #[test]
    fn data_types_match_nccl_h() {
        assert_eq!(data_type(Kind::Float), Some(7));
        assert_eq!(data_type(Kind::BFloat16), Some(9));
        assert_eq!(data_type(Kind::Half), Some(6));
        assert_eq!(data_type(Kind::Int64), Some(4));
        assert_eq!(data_type(Kind::ComplexFloat), None);
    }
}
