//! The first failures a cluster user meets, with the mpirun back end: each
//! is said once, in one readable line, on the row (or rank) it belongs to.
//! Needs root (a small tmpfs in a private mount namespace) and OpenMPI.

use std::process::Command;

mod common;
use common::{output_within, repo, text};

fn launch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-launch"));
    c.current_dir(repo()).env("OMP_NUM_THREADS", "1");
    c
}

fn root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "this test mounts a tmpfs or runs mpirun as root: run it as root (CI does)");
}

/// glm-launch to its end (a hang fails the test).
fn done(c: &mut Command) -> std::process::Output {
    output_within(c, 300).expect("glm-launch did not end within 300 s")
}

/// The preflight row of `host` in glm-launch's output.
fn row<'a>(out: &'a str, host: &str) -> &'a str {
    out.lines().find(|l| l.trim_start().starts_with(&format!("{host} "))).unwrap_or_else(|| panic!("no row for {host} in\n{out}"))
}

/// A save directory on a nearly full small disk (a 12 MiB tmpfs, in a
/// mount namespace of its own, so nothing outlives the test) is refused
/// in units that fit: "12.6 MB free ..., a checkpoint needs about 36.2 MB"
/// (it said "0.0 GB free, a checkpoint needs about 0.0 GB").
#[test]
fn a_small_disk_is_measured_in_units_that_fit() {
    root();
    let worker = repo().join("target/release/glm-worker");
    assert!(worker.is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let d = tempfile::tempdir().unwrap();
    let small = d.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let save = small.join("ckpt");
    // 2 layers × hidden 64, 64 positions: 1.13 M parameters, 16 bytes each, twice
    let o = done(
        Command::new("unshare")
            .current_dir(repo())
            .env("OMP_NUM_THREADS", "1")
            .args(["-m", "sh", "-c", "mount -t tmpfs -o size=12m tmpfs \"$0\" && exec \"$@\"", &small.display().to_string()])
            .arg(env!("CARGO_BIN_EXE_glm-launch"))
            .args(["--num_gpus", "1", "--worker", &worker.display().to_string(), "--args", "configs/configs_tiny.json"])
            .args(["--set", "num_layers=2", "--set", "hidden_size=64", "--set", "num_attention_heads=2", "--set", "max_position_embeddings=64"])
            .args(["--set", &format!("save={}", save.display())]),
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let r = row(&out, "localhost");
    assert!(r.contains(&format!("FAIL: 12.6 MB free under {}, a checkpoint needs about 36.2 MB", save.display())), "{r}");
    assert!(r.contains(" 12.6 MB "), "the free disk column too: {r}");
    assert!(err.contains("preflight failed (see the table above); nothing was started"), "{err}");
}

/// A worker's own error of several lines (clap's, for an unknown flag)
/// reaches the console, the rank's log and the report whole: OpenMPI tags
/// each chunk a rank writes, and clap writes its first line in pieces, which
/// came out as `error:[1,0]<stderr>: unexpected argument '[1,0]<stderr>:--bogus-flag...`.
#[test]
fn a_workers_error_of_several_lines_is_read_whole() {
    root();
    let worker = repo().join("target/release/glm-worker");
    assert!(worker.is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let o = done(
        launch()
            .args(["--num_gpus", "2", "--worker", &worker.display().to_string(), "--run_dir", &run.display().to_string()])
            .args(["--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--bogus-flag", "3", "--set", "save=null"]),
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "clap's exit code: {out}{err}");
    assert!(!out.contains("<stderr>:") && !err.contains("<stderr>:") && !out.contains("<stdout>:"), "no OpenMPI tag inside a line:\n{out}\n{err}");
    let report: Vec<&str> = err.lines().filter(|l| l.starts_with("glm-launch: rank ")).collect();
    assert_eq!(report.len(), 1, "{err}");
    let r = report[0];
    assert!(
        (r.starts_with("glm-launch: rank 0 on localhost") || r.starts_with("glm-launch: rank 1 on localhost"))
            && r.ends_with(": error: unexpected argument '--bogus-flag' found; every other worker was stopped"),
        "one line naming the rank and host once, with the worker's message: {r}"
    );
    // the rank mpirun names (the other one may be stopped before it writes)
    let rank: usize = r["glm-launch: rank ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(err.lines().any(|l| l == format!("[localhost:{rank}] error: unexpected argument '--bogus-flag' found")), "{err}");
    let log = std::fs::read_to_string(run.join(format!("logs/rank_{rank:04}.log"))).unwrap();
    assert!(log.starts_with("error: unexpected argument '--bogus-flag' found\n") && log.contains("\nUsage: glm-worker "), "rank {rank}'s log: {log}");
    for other in 0..2 {
        let log = std::fs::read_to_string(run.join(format!("logs/rank_{other:04}.log"))).unwrap_or_default();
        assert!(!log.contains("<stderr>:"), "rank {other}'s log: {log}");
    }
}
