//! The first failures a cluster user meets, with the mpirun back end: each
//! is said once, in one readable line, on the row (or rank) it belongs to.
//! Needs root (a small tmpfs in a private mount namespace) and OpenMPI.

use std::path::{Path, PathBuf};
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

/// A stand-in worker that answers the preflight like glm-worker (and
/// marks `started` if a worker is ever started).
fn fake_worker(dir: &Path) -> (PathBuf, PathBuf) {
    let w = dir.join("worker.sh");
    let started = dir.join("started");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: {}'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; exit 0; fi\ntouch {}\n",
            env!("CARGO_PKG_VERSION"),
            started.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (w, started)
}

/// One host name that does not resolve fails its own row only: mpirun's
/// whole preflight job used to fail with it, marking the reachable host NO
/// as well. Names that do not resolve are found before mpirun runs.
#[test]
fn a_host_that_does_not_resolve_fails_its_own_row_only() {
    root();
    let d = tempfile::tempdir().unwrap();
    let (w, started) = fake_worker(d.path());
    let hosts = d.path().join("hosts");
    std::fs::write(&hosts, "localhost slots=1\nno-such-host.invalid slots=1\n").unwrap();
    let o = done(launch().args(["--hostfile", &hosts.display().to_string(), "--worker", &w.display().to_string()]));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let good = row(&out, "localhost");
    assert!(good.contains(" yes ") && good.ends_with(" ok"), "the reachable host is checked and passes: {good}");
    let bad = row(&out, "no-such-host.invalid");
    assert!(
        bad.contains(" NO ")
            && bad.contains("FAIL: cannot resolve host name no-such-host.invalid: ")
            && bad.ends_with("(check the hostfile, DNS or /etc/hosts)"),
        "{bad}"
    );
    assert!(!out.contains("the preflight job failed"), "no mpirun boilerplate when the rows say it all: {out}");
    assert!(err.contains("preflight failed (see the table above); nothing was started") && !started.exists(), "{err}");
}

/// A host without glm-worker on its PATH is not "unreachable": its row
/// says glm-worker is not there, the PATH searched, and the two fixes.
#[test]
fn a_host_without_glm_worker_says_so_with_the_path_it_searched() {
    root();
    let d = tempfile::tempdir().unwrap();
    // glm-launch alone (no glm-worker beside it), and a PATH without one
    let alone = d.path().join("glm-launch");
    std::fs::copy(env!("CARGO_BIN_EXE_glm-launch"), &alone).unwrap();
    let mpirun = common::which("mpirun").expect("OpenMPI's mpirun on PATH");
    let path = format!("{}:/bin", mpirun.parent().unwrap().display());
    let o = done(Command::new(&alone).current_dir(repo()).env("PATH", &path).args(["--num_gpus", "1", "--config", "configs/config_block_tiny.json"]));
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    let r = row(&out, "localhost");
    assert!(
        r.contains(" yes ")
            && r.ends_with(&format!(
                "FAIL: glm-worker not found on localhost: no glm-worker on its PATH ({path}); install glm-worker there, or pass --worker with its path on localhost"
            )),
        "{r}"
    );
    assert!(!r.contains("unreachable"), "{r}");
}

/// (state, parent) of a process; `None` once it is gone (a zombie is gone:
/// it runs nothing, and no init reaps it in some containers).
fn alive(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    (rest[0] != "Z").then(|| rest[1].parse().unwrap())
}

/// Ctrl-C (or SIGTERM) to glm-launch's own pid while the preflight runs
/// stops the preflight's mpirun and everything it started, and glm-launch
/// exits 128 + the signal; it used to exit and leave mpirun running.
#[test]
fn a_signal_during_the_preflight_stops_its_mpirun() {
    root();
    for (sig, name) in [(libc::SIGINT, "Ctrl-C"), (libc::SIGTERM, "SIGTERM")] {
        let d = tempfile::tempdir().unwrap();
        let pid_file = d.path().join("probe.pid");
        let started = d.path().join("started");
        let w = d.path().join("worker.sh");
        // the preflight's glm-worker env takes as long as the test wants
        std::fs::write(
            &w,
            format!(
                "#!/bin/sh\nif [ \"$1\" = env ]; then echo $$ > {}.tmp; mv {0}.tmp {0}; exec sleep 600; fi\ntouch {}\n",
                pid_file.display(),
                started.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let child = launch()
            .args(["--num_gpus", "1", "--worker", &w.display().to_string()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while !pid_file.is_file() {
            assert!(t0.elapsed().as_secs() < 60, "the preflight never started");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // the probe (exec'd into sleep), its shell, and mpirun above it
        let probe: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let mut chain = vec![probe];
        while let Some(parent) = alive(*chain.last().unwrap()) {
            if parent == child.id() as i32 || parent <= 1 {
                break;
            }
            chain.push(parent);
        }
        assert!(chain.len() >= 2, "the probe runs below mpirun: {chain:?}");
        let signalled = std::time::Instant::now();
        // SAFETY: signalling the child we started.
        unsafe { libc::kill(child.id() as i32, sig) };
        let o = child.wait_with_output().unwrap();
        let (out, err) = text(&o);
        assert!(signalled.elapsed().as_secs() < 20, "{name}: glm-launch took {:?} to stop", signalled.elapsed());
        assert_eq!(o.status.code(), Some(128 + sig), "{name}: {out}{err}");
        assert!(err.contains(&format!("glm-launch: {name} during the preflight: stopped mpirun (pid ")), "{name}: {err}");
        assert!(err.contains("and everything it started; nothing was started"), "{name}: {err}");
        // nothing is left: the processes are gone (their parents reaped or
        // will reap them; poll with a deadline only for the reaping)
        let t1 = std::time::Instant::now();
        while let Some(p) = chain.iter().find(|&&p| alive(p).is_some()) {
            assert!(t1.elapsed().as_secs() < 10, "{name}: process {p} of the preflight outlived glm-launch ({chain:?})");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!started.exists(), "{name}: no worker started");
    }
}

/// The mpirun back end on real hosts (`tests/fixtures/netns_hosts.sh`,
/// mpirun's ssh pointed at their config through `plm_rsh_agent`): this
/// machine, node1 (reachable), node2 (its SSH server stopped) and a name
/// that does not resolve. Each failure is on its own row, said once, and
/// the reachable hosts are checked and pass: node2 is named from ssh's
/// message after mpirun's job failed, and the others are asked again
/// without it.
#[test]
fn with_mpirun_each_unreachable_host_fails_its_own_row() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("hosts.d");
    let _hosts = common::Hosts::up(&h, 2);
    // node2's SSH server stops: its connections are refused
    // (sshd writes its pid file once it has daemonised: wait for it)
    let t0 = std::time::Instant::now();
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(h.join("host2/sshd.pid")).ok().and_then(|p| p.trim().parse().ok()) {
            break p;
        }
        assert!(t0.elapsed().as_secs() < 30, "node2's sshd wrote no pid file");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: the fixture's own server.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = std::time::Instant::now();
    while std::net::TcpStream::connect("10.213.77.12:2222").is_ok() {
        assert!(t0.elapsed().as_secs() < 30, "node2's sshd still answers");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (w, started) = fake_worker(d.path());
    let hosts = d.path().join("hosts");
    std::fs::write(&hosts, "localhost slots=1\nnode1 slots=1\nnode2 slots=1\nno-such-host.invalid slots=1\n").unwrap();
    let o = done(
        launch()
            .env("OMPI_MCA_plm_rsh_agent", format!("ssh -F {}", h.join("ssh_config").display()))
            .env("OMPI_MCA_btl_tcp_if_include", "10.213.77.0/24")
            .env("OMPI_MCA_oob_tcp_if_include", "10.213.77.0/24")
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .args(["--hostfile", &hosts.display().to_string(), "--worker", &w.display().to_string()]),
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    for good in ["localhost", "node1"] {
        let r = row(&out, good);
        assert!(r.contains(" yes ") && r.ends_with(" ok"), "{good} is checked and passes: {out}");
    }
    let r = row(&out, "node2");
    assert!(r.contains(" NO ") && r.ends_with("FAIL: mpirun's ssh: connect to host 10.213.77.12 port 2222: Connection refused"), "{r}");
    let r = row(&out, "no-such-host.invalid");
    assert!(r.contains(" NO ") && r.contains("FAIL: cannot resolve host name no-such-host.invalid: "), "{r}");
    assert!(!out.contains("the preflight job failed"), "the rows say it all: {out}");
    assert!(!started.exists(), "nothing started");
}
