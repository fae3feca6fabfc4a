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

/// Bytes of device memory in use on the current CUDA device (all of it, as
/// `cudaMemGetInfo` sees it: libtorch's caching allocator keeps what it
/// reserved, so after a run this includes its high-water mark).
pub fn memory_in_use() -> Option<u64> {
    mem_get_info().map(|(free, total)| total - free)
}

/// Bytes of device memory the current CUDA device has in all.
pub fn memory_total() -> Option<u64> {
    mem_get_info().map(|(_, total)| total)
}

/// `cudaMemGetInfo`: (free, total) bytes of the current device.
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
