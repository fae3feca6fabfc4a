//! What a command prints, and where: sizes, progress bars, and the silence
//! of ranks other than 0.

/// Bytes in decimal megabytes.
pub fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// A byte-counting progress bar on a live terminal, else a hidden one.
pub fn progress_bar(total: u64, what: &str) -> indicatif::ProgressBar {
    if !glm_worker::comm::mpi::live_terminal(&std::io::stderr()) {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

/// Rank 0 reports: the stdout of the other ranks goes to /dev/null, unless
/// the launcher asked for every rank's output. Every rank's errors still
/// reach stderr.
pub fn reports_here(rank: usize) {
    if rank != 0 && std::env::var_os(glm_common::launch::ALL_RANKS_OUTPUT).is_none() {
        quiet_stdout();
    }
}

/// Sends this process's stdout to /dev/null.
fn quiet_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 onto fd 1; `null` stays open until the duplicate exists.
        unsafe {
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}
