//! libtorch start-up facts, printed by `glm-worker env`.

/// Versions and devices as libtorch sees them.
pub fn describe() -> Vec<(String, String)> {
    let mut out = vec![
        ("glm-worker".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch dir".into(), std::env::var("GLM_LIBTORCH_LIB").unwrap_or_else(|_| option_env!("GLM_BUILD_LIBTORCH_LIB").unwrap_or("?").into())),
        ("intra-op threads".into(), tch::get_num_threads().to_string()),
        ("cuda available".into(), tch::Cuda::is_available().to_string()),
        ("cuda devices".into(), tch::Cuda::device_count().to_string()),
    ];
    let t = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    out.push(("cpu tensor check".into(), format!("sum(1,2,3) = {}", t.sum(tch::Kind::Float).double_value(&[]))));
    out
}

/// Loads `libtorch_cuda.so` from the libtorch directory in use, so CUDA
/// kernels are registered: Rust links with `--as-needed`, which drops the
/// library from the binary since no symbol of it is referenced directly.
/// On a machine without CUDA libraries this fails quietly (CPU only).
pub fn load_cuda() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = std::env::var("GLM_LIBTORCH_LIB").ok().or_else(|| option_env!("GLM_BUILD_LIBTORCH_LIB").map(String::from));
        let Some(dir) = dir else { return };
        let path = std::path::Path::new(&dir).join("libtorch_cuda.so");
        if !path.is_file() {
            return;
        }
        let c = std::ffi::CString::new(path.to_string_lossy().as_bytes()).expect("path without NUL");
        // SAFETY: plain dlopen of a shared library; the handle is kept for the process lifetime.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if h.is_null() {
            // SAFETY: dlerror returns a thread-local C string or null.
            let msg = unsafe { libc::dlerror() };
            let msg = if msg.is_null() { "unknown".into() } else { unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy().into_owned() };
            log::info!("libtorch_cuda not loaded ({msg}); CPU only");
        }
    });
}
