//! Helpers shared by the integration tests that start MPI jobs.
#![allow(dead_code)]

use std::process::Command;

/// `mpirun -np <np>` as the tests run it: oversubscribed on 2 cores, no
/// binding, allowed as root, one intra-op thread per rank.
pub fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMP_NUM_THREADS", "1");
    c
}

/// Runs the `#[ignore]`d test `child` of this test binary on two MPI ranks
/// and asserts that it passed on both.
pub fn run_child_on_two_ranks(child: &str) {
    let exe = std::env::current_exe().unwrap();
    let o = mpirun(2)
        .arg(&exe)
        .args(["--ignored", "--exact", child, "--test-threads", "1", "--color", "never"])
        .output()
        .expect("mpirun (openmpi-bin; scripts/setup.sh installs it)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(out.matches("test result: ok. 1 passed").count(), 2, "both ranks ran {child}: {out}");
}
