//! Slurm for real: a single-node munge + slurmctld + slurmd
//! (`tests/fixtures/slurm_cluster.sh`) runs `scripts/pretrain.sbatch`
//! (srun --mpi=pmix), `scripts/pretrain_multinode.sbatch` (glm-launch
//! --launcher slurm inside sbatch) and glm-launch --launcher slurm inside
//! salloc, and a scancel of a running job leaves a checkpoint that resumes.
//! Needs root and Debian's slurm-wlm and munge (`scripts/setup.sh --test`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod common;
use common::{repo, text, tiny_job};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/slurm_cluster.sh")
}

/// The cluster; stopped when dropped.
struct Cluster {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl Cluster {
    fn up(dir: &Path) -> Cluster {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "the Slurm test starts slurmctld/slurmd: run it as root (CI does)");
        assert!(Path::new("/usr/sbin/slurmctld").is_file(), "slurmctld missing: scripts/setup.sh --test installs slurm-wlm and munge");
        let c = Cluster { dir: dir.to_path_buf(), _lock: common::exclusive("glm-launch-slurm-test") };
        let o = Command::new(fixture()).args(["up", &dir.display().to_string()]).output().unwrap();
        assert!(o.status.success(), "slurm: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        c
    }

    /// A Slurm client command run from the checkout.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir(repo()).env("SLURM_CONF", self.dir.join("slurm.conf")).env("OMP_NUM_THREADS", "1");
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SLURM_") && k != "SLURM_CONF") {
            c.env_remove(k);
        }
        c
    }
}

impl Cluster {
    /// Runs a Slurm command (sbatch --wait, salloc) to its end within
    /// `secs`; else fails with the queue's state.
    fn run(&self, cmd: &mut Command, secs: u64) -> Output {
        match common::output_within(cmd, secs) {
            Some(o) => o,
            None => {
                let q = self.cmd("squeue").args(["-o", "%i %j %T %r"]).output().map(|o| text(&o).0).unwrap_or_default();
                panic!("{cmd:?} did not end within {secs} s; the queue:\n{q}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.cmd("scancel").args(["--user", "root"]).output();
        let _ = Command::new(fixture()).args(["down", &self.dir.display().to_string()]).output();
    }
}

fn ok(o: &Output, what: &str) -> String {
    let (out, err) = text(o);
    assert!(o.status.success(), "{what}: {out}\n{err}");
    out + &err
}

#[test]
fn slurm_batch_scripts_salloc_and_preemption() {
    let d = tempfile::tempdir().unwrap();
    let cluster = Cluster::up(&d.path().join("slurm"));
    let (_, job) =
        tiny_job(d.path(), r#"{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}}"#);
    let save = d.path().join("save");
    let launch = env!("CARGO_BIN_EXE_glm-launch");

    // outside an allocation: a clear error, nothing run
    let o = cluster.cmd(launch).args(["--launcher", "slurm"]).args(&job).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--launcher slurm runs inside a Slurm allocation, and there is none here"), "{}", text(&o).1);

    // 1. sbatch scripts/pretrain.sbatch: srun --mpi=pmix, 2 tasks, one world
    let out1 = d.path().join("batch1.out");
    let o = cluster.run(
        cluster.cmd("sbatch").args(["--wait", "--time=10", "-o", &out1.display().to_string(), "scripts/pretrain.sbatch"]).args(&job).args([
            "--set",
            "train_iters=3",
            "--set",
            &format!("save={}", save.display()),
        ]),
        180,
    );
    let log = std::fs::read_to_string(&out1).unwrap_or_default();
    assert!(o.status.success(), "sbatch: {:?}\n{log}", text(&o));
    assert!(
        log.contains("2 task(s)") && log.contains("parallel: world 2 = tensor-parallel 1 × data-parallel 2") && log.contains("iteration       3/3"),
        "{log}"
    );
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "3");

    // 2. glm-launch --launcher slurm inside sbatch (the multi-node example, on this one node, without GPUs)
    let out2 = d.path().join("batch2.out");
    let args_file = job.iter().position(|a| a == "--args").map(|i| job[i + 1].clone()).unwrap();
    let config = job.iter().position(|a| a == "--config").map(|i| job[i + 1].clone()).unwrap();
    // the script names --config/--args itself (GLM_CONFIG, GLM_ARGS)
    let mut rest_args = Vec::new();
    let mut words = job.iter();
    while let Some(w) = words.next() {
        if w == "--config" || w == "--args" {
            words.next();
        } else {
            rest_args.push(w.clone());
        }
    }
    let o = cluster.run(
        cluster
            .cmd("sbatch")
            .env("GLM_CONFIG", &config)
            .env("GLM_ARGS", &args_file)
            .args([
                "--wait",
                "--time=10",
                "--nodes=1",
                "--ntasks-per-node=2",
                "--gpus-per-node=0",
                "--cpus-per-task=1",
                "-o",
                &out2.display().to_string(),
                "scripts/pretrain_multinode.sbatch",
            ])
            .args(&rest_args)
            .args([
                "--run_dir",
                &d.path().join("run2").display().to_string(),
                "--set",
                "train_iters=5",
                "--set",
                &format!("load={}", save.display()),
                "--set",
                &format!("save={}", save.display()),
            ]),
        180,
    );
    let log = std::fs::read_to_string(&out2).unwrap_or_default();
    assert!(o.status.success(), "sbatch: {:?}\n{log}", text(&o));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    assert!(log.contains("glm-launch: srun --mpi=pmix") && log.contains("preflight") && log.contains(&format!("[{host}:0]  iteration       5/5")), "{log}");
    assert!(log.contains("glm-launch: every worker finished") && d.path().join("run2/logs/rank_0001.log").is_file(), "{log}");

    // 3. glm-launch --launcher slurm inside salloc
    let o = cluster.run(
        cluster
            .cmd("salloc")
            .args(["-n", "2", "--time=10", launch, "--launcher", "slurm", "--run_dir", &d.path().join("run3").display().to_string()])
            .args(&job)
            .args(["--set", "train_iters=6", "--set", &format!("load={}", save.display()), "--set", &format!("save={}", save.display())]),
        180,
    );
    let all = ok(&o, "salloc glm-launch");
    assert!(all.contains(&format!("[{host}:0]  iteration       6/6")) && all.contains("every worker finished"), "{all}");

    // 4. scancel of a running batch job (what a preemption does): every
    // worker gets SIGTERM and saves a checkpoint after its current iteration
    let out4 = d.path().join("batch4.out");
    let o = cluster
        .cmd("sbatch")
        .args(["--parsable", "--time=10", "-o", &out4.display().to_string(), "scripts/pretrain.sbatch"])
        .args(&job)
        .args(["--set", "train_iters=100000", "--set", &format!("load={}", save.display()), "--set", &format!("save={}", save.display())])
        .output()
        .unwrap();
    let id = ok(&o, "sbatch").trim().split(';').next().unwrap().to_string();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&out4).unwrap_or_default().contains("iteration      10/") {
        if t0.elapsed() > Duration::from_secs(120) {
            let q = cluster.cmd("squeue").args(["-o", "%i %j %T %r"]).output().map(|o| text(&o).0).unwrap_or_default();
            panic!("the job never reached iteration 10: {}\nqueue:\n{q}", std::fs::read_to_string(&out4).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ok(&cluster.cmd("scancel").arg(&id).output().unwrap(), "scancel");
    let t0 = Instant::now();
    while !cluster.cmd("squeue").args(["-h", "-j", &id]).output().unwrap().stdout.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(60), "job {id} did not end after scancel");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(&out4).unwrap();
    assert!(log.contains("stopped by signal 15 after iteration") && log.contains("checkpoint saved"), "{log}");
    let it: u64 = std::fs::read_to_string(save.join("latest")).unwrap().trim().parse().unwrap();
    assert!(it >= 10, "{it}");
    // ... and it resumes
    let out5 = d.path().join("batch5.out");
    let o = cluster.run(
        cluster.cmd("sbatch").args(["--wait", "--time=10", "-o", &out5.display().to_string(), "scripts/pretrain.sbatch"]).args(&job).args([
            "--set",
            &format!("train_iters={}", it + 1),
            "--set",
            &format!("load={}", save.display()),
        ]),
        180,
    );
    let log = std::fs::read_to_string(&out5).unwrap_or_default();
    assert!(o.status.success(), "sbatch: {:?}\n{log}", text(&o));
    assert!(log.contains(&format!("iteration {:>7}/{}", it + 1, it + 1)), "resumed at {it}: {log}");
}
