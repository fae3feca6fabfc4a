//! libtorch as loaded: its directory and version, the CPU kernels it
//! dispatches to, and its CUDA library (loaded on demand).

extern "C" {
    /// csrc/train_ext.cpp
    fn glm_torch_version() -> *const std::ffi::c_char;
    fn glm_cpu_capability(buf: *mut std::ffi::c_char, len: i32);
}

/// The libtorch version in use: the torch package's `version.py` beside
/// the library directory in use ("2.11.0+cu130" from a wheel), or a libtorch
/// archive's `build-version`, else the version of the headers this build
/// was compiled against ("2.11.0").
pub fn version() -> String {
    let installed = libtorch_dir().and_then(|dir| {
        let dir = std::path::Path::new(&dir);
        let from_py = std::fs::read_to_string(dir.join("../version.py")).ok().and_then(|t| {
            let line = t.lines().find(|l| l.trim_start().starts_with("__version__"))?.to_string();
            Some(line.split_once('=')?.1.trim().trim_matches(['\'', '"']).to_string())
        });
        from_py.or_else(|| std::fs::read_to_string(dir.join("../build-version")).ok().map(|t| t.trim().to_string())).filter(|v| !v.is_empty())
    });
    installed.unwrap_or_else(compiled_version)
}

/// The version of the libtorch headers this build was compiled against.
fn compiled_version() -> String {
    // SAFETY: a static C string.
    unsafe { std::ffi::CStr::from_ptr(glm_torch_version()) }.to_string_lossy().into_owned()
}

/// The CPU kernel family ATen dispatches to: "DEFAULT", "AVX2", "AVX512",
/// ... (the processor's best, or what `ATEN_CPU_CAPABILITY` limits it to).
pub fn cpu_capability() -> String {
    let mut buf = [0 as std::ffi::c_char; 64];
    // SAFETY: the shim writes at most 64 bytes, NUL-terminated.
    unsafe { glm_cpu_capability(buf.as_mut_ptr(), buf.len() as i32) };
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// What decides the CPU's floating-point kernels: ATen's capability, then
/// the instruction-set extensions the kernel libraries choose by.
pub fn cpu_kernels() -> String {
    let have = super::host::kernel_isa();
    format!("ATen {}; {}", cpu_capability(), if have.is_empty() { "no vector extensions".to_string() } else { have.join(" ") })
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
