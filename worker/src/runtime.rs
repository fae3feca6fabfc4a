//! libtorch start-up facts, printed by `glm-worker env`.

/// Versions and devices as libtorch sees them.
pub fn describe() -> Vec<(String, String)> {
    let mut out = vec![
        ("glm-worker".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch dir".into(), libtorch_dir().unwrap_or_else(|| "?".into())),
        ("intra-op threads".into(), tch::get_num_threads().to_string()),
        ("cuda available".into(), tch::Cuda::is_available().to_string()),
        ("cuda devices".into(), tch::Cuda::device_count().to_string()),
    ];
    out.push((
        "nccl".into(),
        match crate::comm::nccl::describe() {
            Ok((path, v)) => format!("{v} ({path})"),
            Err(e) => format!("not available: {e}"),
        },
    ));
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    out.push(("cpu tensor check".into(), format!("sum(1,2,3) = {}", t.sum(tch::Kind::Float).double_value(&[]))));
    out
}

/// Free bytes (for an unprivileged user) on the file system that holds
/// `dir`, or would hold it: its nearest existing ancestor is asked.
pub fn free_disk(dir: &std::path::Path) -> Option<(u64, std::path::PathBuf)> {
    let abs = std::path::absolute(dir).ok()?;
    let at = abs.ancestors().find(|a| a.exists())?.to_path_buf();
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs the call fills.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| (st.f_bavail as u64 * st.f_frsize as u64, at))
}

/// The libtorch directory in use: the one the `glm-worker` entry point found
/// (`GLM_LIBTORCH_LIB`), else the one this binary was built against.
pub fn libtorch_dir() -> Option<String> {
    std::env::var("GLM_LIBTORCH_LIB").ok().or_else(|| option_env!("GLM_BUILD_LIBTORCH_LIB").map(String::from))
}

/// Loads `libtorch_cuda.so` from the libtorch directory in use, so CUDA
/// kernels are registered: Rust links with `--as-needed`, which drops the
/// library from the binary since no symbol of it is referenced directly.
/// On a machine without CUDA libraries this fails quietly (CPU only).
pub fn load_cuda() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Some(dir) = libtorch_dir() else { return };
        let path = std::path::Path::new(&dir).join("libtorch_cuda.so");
        if !path.is_file() {
            return;
        }
        // RTLD_GLOBAL: its CUDA runtime (cudaSetDevice) becomes visible to lookups
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: plain dlopen of a shared library, kept for the process lifetime.
        match unsafe { libloading::os::unix::Library::open(Some(&path), flags) } {
            Ok(lib) => std::mem::forget(lib),
            Err(e) => log::info!("libtorch_cuda not loaded ({e}); CPU only"),
        }
    });
}

type CudaSetDevice = unsafe extern "C" fn(std::ffi::c_int) -> std::ffi::c_int;

/// `cudaSetDevice` from the CUDA runtime libtorch loaded (tch does not expose
/// it; NCCL binds a communicator to the calling thread's current device).
fn cuda_set_device_fn() -> Option<CudaSetDevice> {
    static F: std::sync::OnceLock<Option<CudaSetDevice>> = std::sync::OnceLock::new();
    *F.get_or_init(|| {
        load_cuda();
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
pub fn cuda_set_device(index: usize) -> crate::Result<()> {
    let f = cuda_set_device_fn().ok_or_else(|| crate::Error::Config("CUDA runtime (libcudart) not loaded: is this a CUDA build of torch 2.11?".into()))?;
    // SAFETY: plain CUDA runtime call.
    let rc = unsafe { f(index as std::ffi::c_int) };
    if rc != 0 {
        return Err(crate::Error::Config(format!("cudaSetDevice({index}) failed with CUDA error {rc}")));
    }
    Ok(())
}

type CudaMemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> std::ffi::c_int;

/// Bytes of device memory in use on the current CUDA device (all of it, as
/// `cudaMemGetInfo` sees it: libtorch's caching allocator keeps what it
/// reserved, so after a run this includes its high-water mark).
pub fn cuda_memory_in_use() -> Option<u64> {
    load_cuda();
    let this = libloading::os::unix::Library::this();
    // SAFETY: the symbol has this C signature in every CUDA runtime.
    let f = unsafe { this.get::<CudaMemGetInfo>(b"cudaMemGetInfo\0") }.ok()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: plain CUDA runtime call writing two integers.
    let rc = unsafe { f(&mut free, &mut total) };
    (rc == 0).then(|| (total - free) as u64)
}

/// The process's peak resident memory so far (bytes).
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    r.ru_maxrss as u64 * 1024
}
