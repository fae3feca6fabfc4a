//! This machine: its name, the temporaries of this process, memory, disk
//! and processor, as the operating system reports them.

use std::path::{Path, PathBuf};

/// This machine's host name (empty when unknown).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// The host name as it appears in temporaries' names (no `/` or `-`).
fn this_host() -> String {
    let h = hostname();
    if h.is_empty() {
        "localhost".into()
    } else {
        h.replace(['/', '-'], "_")
    }
}

/// A path in `dir` for this process's temporary: `<prefix><host>-<pid>`, so
/// a directory shared by several machines tells whose a temporary is. The
/// temporaries with the same prefix that this machine's interrupted runs
/// left are removed first (`remove_stale_temps`).
pub fn temp_path(dir: &Path, prefix: &str) -> PathBuf {
    remove_stale_temps(dir, prefix);
    dir.join(format!("{prefix}{}-{}", this_host(), std::process::id()))
}

/// Removes what interrupted runs of this machine left in `dir`: entries
/// named `<prefix><host>-<pid>` (see `temp_path`: the temporaries of a
/// store build, a tokenizer cache write) whose process no longer runs. A run
/// stopped by a signal exits without cleaning up, and a store's temporary can
/// hold gigabytes. Other machines' temporaries are left alone.
fn remove_stale_temps(dir: &Path, prefix: &str) {
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

/// The process's resident memory now (bytes): `/proc/self/statm`'s
/// resident pages × the page size (0 where it cannot be read).
pub fn current_rss_bytes() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm").ok().and_then(|t| t.split_whitespace().nth(1)?.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(0) as u64
}

/// The peak resident memory of this program image (bytes): `/proc/self/status`'s
/// `VmHWM`, which starts afresh at `exec` (getrusage's maximum also counts
/// the memory of the process that forked this one before it exec'd, e.g. a
/// large Python parent), else `peak_rss_bytes`.
pub fn peak_rss_of_this_program() -> u64 {
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("VmHWM:")?.trim().trim_end_matches("kB").trim().parse::<u64>().ok()));
    hwm.map_or_else(peak_rss_bytes, |kb| kb * 1024)
}

/// The process's peak resident memory so far (bytes).
pub fn peak_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    r.ru_maxrss as u64 * 1024
}

/// Free bytes (for an unprivileged user) on the file system that holds
/// `dir`, or would hold it: its nearest existing ancestor is asked.
pub fn free_disk(dir: &Path) -> Option<(u64, PathBuf)> {
    let abs = std::path::absolute(dir).ok()?;
    let at = abs.ancestors().find(|a| a.exists())?.to_path_buf();
    let c = std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statvfs the call fills.
    (unsafe { libc::statvfs(c.as_ptr(), &mut st) } == 0).then(|| (st.f_bavail as u64 * st.f_frsize as u64, at))
}

/// The instruction-set extensions that libtorch's CPU kernels (ATen, MKL,
/// oneDNN) choose between, as /proc/cpuinfo names them.
const KERNEL_ISA: &[&str] = &[
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm",
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

/// The processor's marketing name (`model name` of /proc/cpuinfo), else its
/// architecture.
pub fn cpu_model_name() -> String {
    cpuinfo("model name").filter(|n| !n.is_empty()).unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// The processor's instruction-set extensions among `KERNEL_ISA`.
pub fn kernel_isa() -> Vec<&'static str> {
    let flags = cpuinfo("flags").or_else(|| cpuinfo("Features")).unwrap_or_default();
    KERNEL_ISA.iter().copied().filter(|f| flags.split_whitespace().any(|g| g == *f)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_of_dead_processes_are_removed() {
        let d = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let host = this_host();
        let mine = format!("{host}-{}", std::process::id());
        for name in
            [format!(".store.tmp-{host}-{dead}"), format!(".store.tmp-{mine}"), format!(".other.tmp-{host}-{dead}"), format!(".store.tmp-elsewhere-{dead}")]
        {
            std::fs::create_dir(d.path().join(name)).unwrap();
        }
        std::fs::write(d.path().join(format!(".store.tmp-{host}-{dead}x")), "not a pid").unwrap();
        let tmp = temp_path(d.path(), ".store.tmp-");
        assert_eq!(tmp, d.path().join(format!(".store.tmp-{mine}")));
        let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        // this machine's dead process's temporary goes; a live one's, another
        // machine's and a malformed name stay
        let mut want = vec![
            format!(".other.tmp-{host}-{dead}"),
            format!(".store.tmp-{host}-{dead}x"),
            format!(".store.tmp-{mine}"),
            format!(".store.tmp-elsewhere-{dead}"),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
