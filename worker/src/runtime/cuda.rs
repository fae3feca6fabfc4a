//! The CUDA runtime that libtorch loaded, for the calls tch does not bind.

use crate::error::{Error, Result};

type CudaSetDevice = unsafe extern "C" fn(std::ffi::c_int) -> std::ffi::c_int;

/// `cudaSetDevice` from the CUDA runtime libtorch loaded (tch does not expose
/// it; NCCL binds a communicator to the calling thread's current device).
fn cuda_set_device_fn() -> Option<CudaSetDevice> {
    static F: std::sync::OnceLock<Option<CudaSetDevice>> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        super::torch::load_cuda();
        // libtorch_cuda is loaded RTLD_GLOBAL, so its libcudart is in the global scope
        let this = libloading::os::unix::Library::this();
        // SAFETY: the symbol has this C signature in every CUDA runtime.
        if let Ok(f) = unsafe { this.get::<CudaSetDevice>(b"cudaSetDevice\0") } {
            return Some(*f);
        }
        for name in ["libcudart.so.13", "libcudart.so.12", "libcudart.so"] {
            // SAFETY: as above; the library stays loaded (leaked on purpose).
            if let Ok(lib) = unsafe { libloading::Library::new(name) } {
                if let Ok(f) = unsafe { lib.get::<CudaSetDevice>(b"cudaSetDevice\0") } {
                    let f = *f;
                    std::mem::forget(lib);
                    return Some(f);
                }
            }
        }
        None
    })
}

/// Makes CUDA device `index` current for the calling thread.
pub fn set_device(index: usize) -> Result<()> {
    let f = cuda_set_device_fn().ok_or_else(|| Error::Device {
        op: format!("cudaSetDevice({index})"),
        msg: "the CUDA runtime (libcudart) is not loaded: is this a CUDA build of torch 2.11?".into(),
    })?;
    // SAFETY: plain CUDA runtime call.
    let rc = unsafe { f(index as std::ffi::c_int) };
    if rc != 0 {
        return Err(Error::Device { op: format!("cudaSetDevice({index})"), msg: format!("CUDA error {rc}") });
    }
    Ok(())
}

type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> std::ffi::c_int;

/// `cudaMemGetInfo` on the current CUDA device: (free, total) bytes.
fn mem_get_info() -> Option<(u64, u64)> {
    super::torch::load_cuda();
    let this = libloading::os::unix::Library::this();
    // SAFETY: the symbol has this C signature in every CUDA runtime.
    let f = unsafe { this.get::<CudaMemGetInfo>(b"cudaMemGetInfo\0") }.ok()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain CUDA runtime call writing two integers.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0).then_some((free as u64, total as u64))
}

/// Bytes of device memory in use on the current CUDA device (all of it, as
/// `cudaMemGetInfo` sees it: libtorch's caching allocator keeps what it
/// reserved, so after a run this includes its high-water mark).
pub fn memory_in_use() -> Option<u64> {
    mem_get_info().map(|(free, total)| total - free)
}

/// The current CUDA device's memory (bytes), as `cudaMemGetInfo` reports it.
pub fn memory_total() -> Option<u64> {
    mem_get_info().map(|(_, total)| total)
}

extern "C" {
    /// csrc/train_ext.cpp
    fn glm_cuda_allocated_bytes(index: i32) -> i64;
}

/// Bytes libtorch's CUDA caching allocator has handed out on device `index`
/// and not yet taken back (`torch.cuda.memory_allocated`): the tensors
/// alive, not the memory the allocator keeps cached. `None` without CUDA.
pub fn allocated_bytes(index: usize) -> Option<u64> {
    // SAFETY: the shim catches every C++ exception and returns -1.
    let n = unsafe { glm_cuda_allocated_bytes(index as i32) };
    u64::try_from(n).ok()
}

type CuDeviceGet = unsafe extern "C" fn(*mut std::ffi::c_int, std::ffi::c_int) -> std::ffi::c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut std::ffi::c_char, std::ffi::c_int, std::ffi::c_int) -> std::ffi::c_int;

/// The name of CUDA device `index` ("NVIDIA H100 80GB HBM3"), from the
/// driver (`cuDeviceGetName`); `None` where the driver library cannot be
/// asked. Call it after libtorch has used the device (the driver is then
/// initialised).
pub fn device_name(index: usize) -> Option<String> {
    // SAFETY: the driver library stays loaded (libtorch's runtime loaded it
    // already; the handle is leaked on purpose) and both symbols have these
    // C signatures in every CUDA driver.
    unsafe {
        let lib = libloading::Library::new("libcuda.so.1").ok()?;
        let get = *lib.get::<CuDeviceGet>(b"cuDeviceGet\0").ok()?;
        let name = *lib.get::<CuDeviceGetName>(b"cuDeviceGetName\0").ok()?;
        std::mem::forget(lib);
        let mut dev: std::ffi::c_int = 0;
        if get(&mut dev, index as std::ffi::c_int) != 0 {
            return None;
        }
        let mut buf = [0 as std::ffi::c_char; 256];
        if name(buf.as_mut_ptr(), buf.len() as std::ffi::c_int - 1, dev) != 0 {
            return None;
        }
        let s = std::ffi::CStr::from_ptr(buf.as_ptr()).to_string_lossy().trim().to_string();
        (!s.is_empty()).then_some(s)
    }
}
