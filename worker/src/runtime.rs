//! libtorch start-up facts, printed by `glm-worker env`.

/// Versions and devices as libtorch sees them.
pub fn describe() -> Vec<(String, String)> {
    let mut out = vec![
        ("glm-worker".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("libtorch dir".into(), libtorch_dir().unwrap_or_else(|| "?".into())),
        ("libtorch".into(), torch_version()),
        ("intra-op threads".into(), tch::get_num_threads().to_string()),
        ("cpu".into(), cpu_identity()),
        ("cpu kernels".into(), cpu_kernels()),
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

extern "C" {
    /// csrc/train_ext.cpp
    fn glm_torch_version() -> *const std::ffi::c_char;
    fn glm_cpu_capability(buf: *mut std::ffi::c_char, len: i32);
}

/// The libtorch version this build runs on ("2.11.0").
pub fn torch_version() -> String {
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

/// The instruction-set extensions that libtorch's CPU kernels (ATen, MKL,
/// oneDNN) choose between, as /proc/cpuinfo names them.
const KERNEL_ISA: &[&str] = &[
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512ifma", "avx512vbmi",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
];

/// `key: value` of the first processor in /proc/cpuinfo.
fn cpuinfo(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = text.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The processor: vendor, family, model and stepping (x86), or implementer
/// and part (Arm), then its marketing name. Processors with the same name
/// can differ in micro-architecture, hence the numbers.
pub fn cpu_identity() -> String {
    let get = |k: &str| cpuinfo(k).unwrap_or_else(|| "?".into());
    let name = cpuinfo("model name").unwrap_or_default();
    if cpuinfo("vendor_id").is_some() {
        format!("{} family {} model {} stepping {}: {name}", get("vendor_id"), get("cpu family"), get("model"), get("stepping"))
    } else {
        format!("implementer {} part {} variant {}: {name}", get("CPU implementer"), get("CPU part"), get("CPU variant"))
    }
}

/// What decides the CPU's floating-point kernels: ATen's capability, then
/// the instruction-set extensions the kernel libraries choose by.
pub fn cpu_kernels() -> String {
    let flags = cpuinfo("flags").or_else(|| cpuinfo("Features")).unwrap_or_default();
    let have: Vec<&str> = KERNEL_ISA.iter().copied().filter(|f| flags.split_whitespace().any(|g| g == *f)).collect();
    format!("ATen {}; {}", cpu_capability(), if have.is_empty() { "no vector extensions".to_string() } else { have.join(" ") })
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

/// This machine's host name (empty when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// The host name as it appears in temporaries' names (no `/` or `-`).
fn this_host() -> String {
    let h = hostname();
    if h.is_empty() { "localhost".into() } else { h.replace(['/', '-'], "_") }
}

/// A path in `dir` for this process's temporary: `<prefix><host>-<pid>`, so
/// a directory shared by several machines tells whose a temporary is. The
/// temporaries with the same prefix that this machine's interrupted runs
/// left are removed first (`remove_stale_temps`).
pub fn temp_path(dir: &std::path::Path, prefix: &str) -> std::path::PathBuf {
    remove_stale_temps(dir, prefix);
    dir.join(format!("{prefix}{}-{}", this_host(), std::process::id()))
}

/// Removes what interrupted runs of this machine left in `dir`: entries
/// named `<prefix><host>-<pid>` (see `temp_path`: the temporaries of a
/// store build, a tokenizer cache write) whose process no longer runs. A run
/// stopped by a signal exits without cleaning up, and a store's temporary can
/// hold gigabytes. Other machines' temporaries are left alone.
fn remove_stale_temps(dir: &std::path::Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mine = format!("{prefix}{}-", this_host());
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(&mine).and_then(|p| p.parse::<libc::pid_t>().ok()) else { continue };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let gone = pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let p = e.path();
            let removed = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            if removed.is_ok() {
                log::info!("removed {}, left by an interrupted run (pid {pid})", p.display());
            }
        }
    }
}

/// This machine's RAM plus swap (bytes), from `/proc/meminfo`.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    Some((kb("MemTotal:")? + kb("SwapTotal:").unwrap_or(0)) * 1024)
}

/// The process's peak resident memory so far (bytes).
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    r.ru_maxrss as u64 * 1024
}

// ---------------------------------------------------------------------------
// libtorch errors as one-line messages
//
// tch turns every libtorch exception into a panic (`unwrap` of a `TchError`)
// unless the `f_` variant is called. Rather than let a user's oversized model
// or bad shape print a C++ stack trace, the process records what it is doing
// (`doing`), a panic hook captures the panic with that context, and the
// entry point (`catch`) reports it as one line.

thread_local! {
    static DOING: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    /// How many `catch` calls this thread is inside: only there is a
    /// libtorch panic reported by `catch` instead of the default hook.
    static CATCH_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Names, while alive, what this thread is doing: errors libtorch raises
/// meanwhile say it (the innermost guard wins). Not `Send`: it belongs to the
/// thread whose stack it pushed.
pub struct Doing(std::marker::PhantomData<*const ()>);

/// Starts naming `what` ("building the model (...)") for libtorch errors.
pub fn doing(what: impl Into<String>) -> Doing {
    DOING.with(|d| d.borrow_mut().push(what.into()));
    Doing(std::marker::PhantomData)
}

impl Drop for Doing {
    fn drop(&mut self) {
        let _ = DOING.try_with(|d| d.borrow_mut().pop());
    }
}

/// What this thread is doing now (the innermost `doing`).
fn doing_now() -> Option<String> {
    DOING.try_with(|d| d.borrow().last().cloned()).ok().flatten()
}

/// A panic as the hook saw it, before unwinding dropped the `Doing` guards.
struct Caught {
    message: String,
    location: String,
    doing: Option<String>,
}

thread_local! {
    /// The last panic of this thread (`catch` runs on the panicking thread).
    static LAST_PANIC: std::cell::RefCell<Option<Caught>> = const { std::cell::RefCell::new(None) };
}

/// Wraps the panic hook (once per process): every panic is recorded, with
/// what the thread was doing, for `catch` to report. A libtorch error inside
/// `catch` prints nothing more unless `RUST_BACKTRACE` is set (not `0`); any
/// other panic, and any panic outside `catch`, also gets the default report.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        let verbose = std::env::var("RUST_BACKTRACE").is_ok_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_text(info.payload());
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            let doing = doing_now();
            let quiet = torch_payload(&message).is_some() && CATCH_DEPTH.try_with(|c| c.get() > 0).unwrap_or(false);
            let _ = LAST_PANIC.try_with(|p| *p.borrow_mut() = Some(Caught { message, location, doing }));
            if verbose || !quiet {
                default(info);
            }
        }));
    });
}

/// The text a panic carries (`panic!` formats a `String`, a literal a `&str`).
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// A panic's text in one line: libtorch's message condensed (`torch_message`)
/// when it is a libtorch error.
pub fn panic_summary(payload: &(dyn std::any::Any + Send)) -> String {
    let text = panic_text(payload);
    match torch_payload(&text) {
        Some(raw) => format!("libtorch: {}", torch_message(&raw)),
        None => one_line(&text),
    }
}

/// Runs `f`; a panic inside it becomes an error of one line: for a libtorch
/// error, what was being done and libtorch's message (an allocation failure
/// says how much memory was asked for); for anything else, an internal error
/// with its source location.
pub fn catch<T>(f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    CATCH_DEPTH.with(|c| c.set(c.get() + 1));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCH_DEPTH.with(|c| c.set(c.get() - 1));
    match result {
        Ok(r) => r,
        Err(payload) => {
            let caught = LAST_PANIC.with(|p| p.borrow_mut().take());
            let caught = caught.unwrap_or_else(|| Caught { message: panic_text(&*payload), location: String::new(), doing: None });
            Err(anyhow::anyhow!(report(&caught)))
        }
    }
}

fn report(c: &Caught) -> String {
    match torch_payload(&c.message) {
        Some(raw) => in_context(c.doing.as_deref(), &raw),
        None => {
            let doing = c.doing.as_ref().map(|d| format!(" while {d}")).unwrap_or_default();
            let at = if c.location.is_empty() { String::new() } else { format!("{}; ", c.location) };
            format!("internal error{doing}: {} ({at}a bug: please report it, with the output of RUST_BACKTRACE=1)", one_line(&c.message))
        }
    }
}

/// libtorch's error `raw` as one line after what this thread is doing, with
/// a hint when it ran out of memory (for errors libtorch returns rather than
/// panics on, e.g. from `backward`).
pub fn torch_error(raw: &str) -> String {
    in_context(doing_now().as_deref(), raw)
}

fn in_context(doing: Option<&str>, raw: &str) -> String {
    let msg = torch_message(raw);
    let hint = if msg.starts_with("out of ") { oom_hint(doing) } else { "" };
    match doing {
        Some(d) => format!("{d}: libtorch: {msg}{hint}"),
        None => format!("libtorch: {msg}{hint}"),
    }
}

/// The hint for a model too large for the memory it was given. On one
/// machine, more ranks share the same memory: only a smaller model or more
/// machines help.
pub const MODEL_TOO_LARGE_HINT: &str = "\nHINT: a smaller model (hidden_size, num_layers), or the model split over ranks on more machines or GPUs \
     (model_parallel_size; ZeRO stage 1 or 2 shards the optimizer state over data-parallel ranks)";

fn oom_hint(doing: Option<&str>) -> &'static str {
    let d = doing.unwrap_or_default();
    if d.starts_with("building the model") || d.starts_with("allocating the optimizer") {
        MODEL_TOO_LARGE_HINT
    } else if d.starts_with("training") {
        "\nHINT: a smaller train_micro_batch_size_per_gpu (keep the global batch with gradient_accumulation_steps), \
         checkpoint_activations=true, or a shorter seq_length"
    } else if d.starts_with("evaluating") {
        "\nHINT: a smaller evaluation batch (eval_batch_size, or eval's --batch-size)"
    } else if d.starts_with("generating") {
        "\nHINT: a shorter text or fewer --max-tokens"
    } else {
        ""
    }
}

/// The string inside `Torch("...")` of an unwrapped `TchError`'s `Debug`
/// form, unescaped; `None` when the panic is not a libtorch error.
fn torch_payload(message: &str) -> Option<String> {
    let Some(start) = message.find("Torch(\"").map(|i| i + "Torch(\"".len()) else {
        // a `TchError` formatted with Display
        return message.find("Internal torch error: ").map(|i| message[i..].to_string());
    };
    let mut out = String::new();
    let mut chars = message[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                '0' => out.push('\0'),
                'u' => {
                    // \u{XXXX}
                    let hex: String = chars.by_ref().skip(1).take_while(|&c| c != '}').collect();
                    out.extend(u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    Some(out)
}

/// libtorch's error text as one line: no C++ frames or "Exception raised
/// from" trailer, no `[enforce fail at file:line] condition.` prefix, and an
/// allocation failure rewritten to say how much memory was asked for.
pub fn torch_message(raw: &str) -> String {
    let mut s = raw.strip_prefix("Internal torch error: ").unwrap_or(raw);
    for cut in ["\nframe #", "\nException raised from", "Exception raised from"] {
        if let Some(i) = s.find(cut) {
            s = &s[..i];
        }
    }
    let mut s = s.trim().to_string();
    if s.starts_with("[enforce fail at") {
        if let Some(close) = s.find("] ") {
            let rest = &s[close + 2..];
            // the failed condition ("err == 0. ") before the message
            let rest = rest.split_once(". ").map(|(_, m)| m).unwrap_or(rest);
            s = rest.to_string();
        }
    }
    if let Some(bytes) = s.split("you tried to allocate ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse::<u64>().ok()) {
        let why = s.split("Error code ").nth(1).and_then(|r| r.split_once('(')).map(|(_, w)| w.trim_end_matches(')').to_string());
        return format!("out of CPU memory: asked for {} ({})", human_bytes(bytes), why.unwrap_or_else(|| "allocation failed".into()));
    }
    if let Some(rest) = s.strip_prefix("CUDA out of memory. ") {
        // "Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free. ..."
        let sentences: Vec<&str> = rest.split(". ").take(2).collect();
        let asked = sentences.first().map(|t| t.trim_start_matches("Tried to allocate ")).unwrap_or("?");
        let gpu = sentences.get(1).map(|g| format!("; {}", g.trim_end_matches('.'))).unwrap_or_default();
        return format!("out of CUDA memory: asked for {asked}{gpu}");
    }
    one_line(&s)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `n` bytes in decimal units, three significant figures ("41.2 TB").
pub fn human_bytes(n: u64) -> String {
    human(n as f64, &["B", "kB", "MB", "GB", "TB", "PB"], " ")
}

/// A count in decimal units, three significant figures ("10.3 G").
pub fn human_count(n: u64) -> String {
    human(n as f64, &["", "k", "M", "G", "T", "P"], " ")
}

fn human(mut v: f64, units: &[&str], sep: &str) -> String {
    let mut u = 0;
    while v >= 999.5 && u + 1 < units.len() {
        v /= 1000.0;
        u += 1;
    }
    let digits = if u == 0 || v >= 99.95 { 0 } else if v >= 9.995 { 1 } else { 2 };
    format!("{v:.digits$}{sep}{}", units[u]).trim_end().to_string()
}

/// A device as the CLI names it (cpu, cuda:0).
pub fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cpu => "cpu".into(),
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A floating-point element type as configs name it (fp32, bf16, fp16).
pub fn kind_name(k: tch::Kind) -> String {
    match k {
        tch::Kind::Float => "fp32".into(),
        tch::Kind::BFloat16 => "bf16".into(),
        tch::Kind::Half => "fp16".into(),
        tch::Kind::Double => "fp64".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_OOM: &str = "called `Result::unwrap()` on an `Err` value: Torch(\"[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 41236697186304 bytes. Error code 12 (Cannot allocate memory)\\nframe #0: c10::ThrowEnforceNotMet(char const*, int, char const*, std::__cxx11::basic_string<char> const&, void const*) + 0x6a (0x7fb in /x/libc10.so)\\nframe #1: c10::alloc_cpu(unsigned long) + 0x365\\n\")";

    #[test]
    fn an_allocation_failure_says_the_size_on_one_line() {
        let raw = torch_payload(CPU_OOM).unwrap();
        assert!(raw.contains("\nframe #0"), "unescaped: {raw}");
        assert_eq!(torch_message(&raw), "out of CPU memory: asked for 41.2 TB (Cannot allocate memory)");
        let cuda = "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free. Including non-PyTorch memory, this process has 60.70 GiB memory in use.\nException raised from malloc at /pytorch/c10/cuda/CUDACachingAllocator.cpp:1\nframe #0: x";
        assert_eq!(torch_message(cuda), "out of CUDA memory: asked for 20.00 GiB; GPU 0 has a total capacity of 79.15 GiB of which 18.44 GiB is free");
        let shape = "shape '[2, 3]' is invalid for input of size 5\nException raised from infer_size_impl at /pytorch/aten/src/ATen/InferSize.h:1 (most recent call first):\nframe #0: x";
        assert_eq!(torch_message(shape), "shape '[2, 3]' is invalid for input of size 5");
        assert_eq!(torch_payload("called `Option::unwrap()` on a `None` value"), None);
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(999_700), "1.00 MB");
        assert_eq!(human_bytes(1_500_000_000), "1.50 GB");
        assert_eq!(human_bytes(123_456_789), "123 MB");
        assert_eq!(human_count(10_309_174_300_000), "10.3 T");
        assert_eq!(human_count(42), "42");
    }

    #[test]
    fn temporaries_of_dead_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let host = this_host();
        let mine = format!("{host}-{}", std::process::id());
        for name in [format!(".store.tmp-{host}-{dead}"), format!(".store.tmp-{mine}"), format!(".other.tmp-{host}-{dead}"), format!(".store.tmp-elsewhere-{dead}")] {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        std::fs::write(d.path().join(format!(".store.tmp-{host}-{dead}x")), "not a pid").unwrap();
        let tmp = temp_path(d.path(), ".store.tmp-");
        assert_eq!(tmp, d.path().join(format!(".store.tmp-{mine}")));
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        // this machine's dead process's temporary goes; a live one's, another
        // machine's and a malformed name stay
        let mut want = vec![format!(".other.tmp-{host}-{dead}"), format!(".store.tmp-{host}-{dead}x"), format!(".store.tmp-{mine}"), format!(".store.tmp-elsewhere-{dead}")];
        want.sort();
        assert_eq!(left, want);
    }

    #[test]
    fn a_panic_under_catch_is_one_line_naming_what_was_done() {
        install_panic_hook();
        let e = catch(|| -> anyhow::Result<()> {
            let _d = doing("building the model (test)");
            let r: Result<(), tch::TchError> = Err(tch::TchError::Torch(torch_payload(CPU_OOM).unwrap()));
            r.unwrap();
            Ok(())
        })
        .unwrap_err()
        .to_string();
        let first = e.lines().next().unwrap();
        assert_eq!(first, "building the model (test): libtorch: out of CPU memory: asked for 41.2 TB (Cannot allocate memory)");
        assert!(e.lines().nth(1).unwrap().starts_with("HINT: a smaller model"), "{e}");
        assert_eq!(torch_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB of which 1 GiB is free."), "libtorch: out of CUDA memory: asked for 2.00 GiB; GPU 0 has a total capacity of 8 GiB of which 1 GiB is free");
        {
            let _d = doing("evaluating held-out data (test)");
            let e = torch_error("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 8 GiB of which 1 GiB is free.");
            assert!(e.starts_with("evaluating held-out data (test): libtorch: out of CUDA memory") && e.contains("\nHINT: a smaller evaluation batch"), "{e}");
        }
        DOING.with(|d| assert!(d.borrow().is_empty(), "the guard is gone after unwinding"));
        let e = catch(|| -> anyhow::Result<()> { panic!("index out of range") }).unwrap_err().to_string();
        assert!(e.starts_with("internal error: index out of range (worker/src/runtime.rs:") && !e.contains('\n'), "{e}");
    }
}
