//! glm-launch end to end on this machine: what a dry run prints, clear
//! errors for bad input, a failing worker stopping the job with its rank
//! named, and a real 2-rank training run of glm-worker through mpirun.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{repo, text, tiny_job};

fn launch() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-launch"));
    c.current_dir(repo()).env("OMP_NUM_THREADS", "1");
    c
}

fn hostfile(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("hosts");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn dry_run_prints_the_command_per_host() {
    let d = tempfile::tempdir().unwrap();
    let h = hostfile(d.path(), "# two hosts\nnode-a slots=4\nnode-b slots=2 max_slots=4\n");
    let w = std::fs::canonicalize(d.path()).unwrap().join("w");
    std::fs::write(&w, "").unwrap();
    let o = launch()
        .args([
            "--hostfile",
            &h.display().to_string(),
            "--include",
            "node-a:1,3@node-b",
            "--dry-run",
            "--worker",
            &w.display().to_string(),
            "--config",
            "ds.json",
            "--set",
            "train_iters=5",
        ])
        .env("NCCL_DEBUG", "WARN")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("4 worker(s) on 2 host(s): node-a slots 1,3; node-b slots 0,1"), "{out}");
    let w = w.display();
    assert!(out.contains(" -x CUDA_VISIBLE_DEVICES=1,3 ") && out.contains(" -x CUDA_VISIBLE_DEVICES=0,1 "), "{out}");
    assert!(out.contains(&format!("CUDA_VISIBLE_DEVICES=1,3 {w} --config ds.json --set train_iters=5 : -H node-b:2 -np 2 ")), "{out}");
    assert!(out.contains("-H node-a:2 -np 2 -x ") && out.matches("-x NCCL_DEBUG").count() == 2, "exports in every app context: {out}");
    assert!(out.contains("-x NCCL_DEBUG") && !out.contains("WARN"), "exported by name, value not shown: {out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let h = hostfile(d.path(), "node-a slots=2\nnode-a slots=2\n");
    let o = launch().args(["--hostfile", &h.display().to_string(), "--dry-run"]).output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains(&format!("{}:2:1: host node-a is listed twice (first on line 1)", h.display())), "{err}");
    let h = hostfile(d.path(), "node-a slots=2\n");
    let o = launch().args(["--hostfile", &h.display().to_string(), "--launcher", "local", "--dry-run"]).output().unwrap();
    assert!(text(&o).1.contains("--launcher local runs on this machine only, but the selection includes host node-a"), "{}", text(&o).1);
    let o = launch().args(["--hostfile", &d.path().join("missing").display().to_string()]).output().unwrap();
    assert!(!o.status.success() && text(&o).1.contains("missing"), "{}", text(&o).1);
    let o = launch().args(["--exclude", "localhost", "--dry-run"]).output().unwrap();
    assert!(text(&o).1.contains("leaves no slots"), "{}", text(&o).1);
}

#[test]
fn a_failing_worker_stops_the_job_and_is_named() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("worker.sh");
    // it answers the preflight like glm-worker, then fails on rank 1
    std::fs::write(
        &w,
        format!("#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: {}'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; exit 0; fi\nif [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then echo 'glm-worker: error: boom' >&2; exit 3; fi\nsleep 60\n", env!("CARGO_PKG_VERSION")),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let t0 = std::time::Instant::now();
    let o =
        launch().args(["--num_gpus", "2", "--worker", &w.display().to_string(), "--run_dir", &d.path().join("run").display().to_string()]).output().unwrap();
    let (out, err) = text(&o);
    assert!(t0.elapsed().as_secs() < 40, "the other worker was stopped, not waited for");
    assert_eq!(o.status.code(), Some(3), "{out}{err}");
    assert!(err.contains("[localhost:1] glm-worker: error: boom"), "{err}");
    // mpirun names the failed process in most runs ("exit code 3"); when it
    // does not, the rank's own error line names it
    assert!(
        err.contains("glm-launch: rank 1 on localhost") && err.contains("glm-worker: error: boom") && err.contains("every other worker was stopped"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(d.path().join("run/logs/rank_0001.log")).unwrap().trim(), "glm-worker: error: boom");
}

/// The failed rank comes from mpirun's own message (`Process name:
/// [[9516,1],0]` / `Exit code: 3`; `process rank 2 ... on node X exited on
/// signal 9`): the failing worker writes nothing, so only that message can
/// name it. Its host is the placement's, with the node mpirun names when
/// that differs.
#[test]
fn the_rank_mpirun_names_as_failed_is_reported_with_its_host() {
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for (rank, how, code, want) in [
        (0, "exit 3", 3, "glm-launch: rank 0 on localhost exit code 3; every other worker was stopped".to_string()),
        (3, "exit 3", 3, "glm-launch: rank 3 on localhost exit code 3; every other worker was stopped".to_string()),
        (2, "kill -9 $$", 137, format!("glm-launch: rank 2 on localhost (node {node}) killed by signal 9 (Killed); every other worker was stopped")),
    ] {
        let d = tempfile::tempdir().unwrap();
        let w = d.path().join("worker.sh");
        // mpirun names the failed process only once every process of the
        // job has started: the failing one waits for all four
        std::fs::write(
            &w,
            format!(
                "#!/bin/sh\ntouch {dir}/up.$OMPI_COMM_WORLD_RANK\nif [ \"$OMPI_COMM_WORLD_RANK\" = {rank} ]; then\n  while [ $(ls {dir} | grep -c '^up\\.') -lt 4 ]; do sleep 0.1; done\n  sleep 1; {how}\nfi\nsleep 60\n",
                dir = d.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let t0 = std::time::Instant::now();
        let o = launch()
            .args(["--num_gpus", "4", "--no_preflight", "--worker", &w.display().to_string(), "--run_dir", &d.path().join("run").display().to_string()])
            .output()
            .unwrap();
        let (out, err) = text(&o);
        assert!(t0.elapsed().as_secs() < 50, "the other workers were stopped, not waited for");
        assert_eq!(o.status.code(), Some(code), "rank {rank}: {out}{err}");
        assert!(err.contains(&want), "rank {rank}: want {want:?} in\n{err}");
    }
}

/// A worker writing bytes that are not UTF-8 must not break the reading of
/// its output (that once killed the job through a closed pipe).
#[test]
fn output_that_is_not_utf8_is_passed_on() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("worker.sh");
    std::fs::write(&w, format!("#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: {}'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; exit 0; fi\nprintf 'caf\\377 au lait\\n'; echo done\n", env!("CARGO_PKG_VERSION"))).unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o =
        launch().args(["--num_gpus", "2", "--worker", &w.display().to_string(), "--run_dir", &d.path().join("run").display().to_string()]).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("[localhost:0] caf\u{fffd} au lait") && out.contains("[localhost:0] done") && out.contains("every worker finished"), "{out}");
}

#[test]
fn a_failing_preflight_starts_nothing() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("old-worker.sh");
    let marker = d.path().join("started");
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: 0.0.1'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; exit 0; fi\ntouch {}\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let o = launch().args(["--num_gpus", "2", "--worker", &w.display().to_string()]).output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(out.contains("localhost") && out.contains(&format!("FAIL: glm-worker 0.0.1, the launcher is {}", env!("CARGO_PKG_VERSION"))), "{out}");
    assert!(err.contains("preflight failed (see the table above); nothing was started"), "{err}");
    assert!(!marker.exists(), "no worker started");
}

#[test]
fn two_workers_train_through_glm_launch() {
    let d = tempfile::tempdir().unwrap();
    let (worker, job) = tiny_job(
        d.path(),
        r#"{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 2, "reduce_bucket_size": 20000}}"#,
    );
    let h = hostfile(d.path(), "localhost slots=2\n");
    let save = d.path().join("save");
    let mut args: Vec<String> = vec![
        "--hostfile".into(),
        h.display().to_string(),
        "--worker".into(),
        worker.display().to_string(),
        "--run_dir".into(),
        d.path().join("run").display().to_string(),
    ];
    args.extend(job);
    args.extend(["--set".to_string(), "train_iters=3".into(), "--set".into(), format!("save={}", save.display())]);
    let o = launch().args(&args).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("[localhost:0] parallel: world 2 = tensor-parallel 1 × data-parallel 2"), "{out}");
    assert!(out.contains("glm-launch: every worker finished"), "{out}");
    assert!(out.contains("glm-launch: preflight") && out.contains("none (CPU) / 2") && out.contains(" ok"), "{out}");
    assert!(!out.contains("stopped by signal"), "{out}");
    assert!(save.join("3/zero_dp_rank_01_optim.safetensors").is_file());
    assert!(d.path().join("run/logs/rank_0000.log").is_file());
}

/// `--launcher local`, four workers on this machine as tensor-parallel 2 ×
/// data-parallel 2 (oversubscribing its cores).
#[test]
fn four_workers_train_through_the_local_back_end() {
    let d = tempfile::tempdir().unwrap();
    let (worker, job) = tiny_job(
        d.path(),
        r#"{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 2}}"#,
    );
    let save = d.path().join("save");
    let mut args: Vec<String> = vec![
        "--launcher".into(),
        "local".into(),
        "--num_gpus".into(),
        "4".into(),
        "--worker".into(),
        worker.display().to_string(),
        "--run_dir".into(),
        d.path().join("run").display().to_string(),
    ];
    args.extend(job);
    args.extend(["--set", "model_parallel_size=2", "--set", "train_iters=3", "--set"].map(String::from));
    args.push(format!("save={}", save.display()));
    let o = launch().args(&args).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("4 worker(s) on 1 host(s)") && out.contains("parallel: world 4 = tensor-parallel 2 × data-parallel 2"), "{out}");
    assert!(out.contains("[localhost:0]  iteration       3/3") && out.contains("every worker finished"), "{out}");
    for r in 0..4 {
        let log = std::fs::read_to_string(d.path().join(format!("run/logs/rank_{r:04}.log"))).unwrap();
        assert!(log.contains("iteration       3/3"), "every rank's log is whole (rank {r}): {log}");
    }
    assert!(save.join("3/mp_rank_01/model.safetensors").is_file(), "a tensor-parallel checkpoint");
}

/// SIGTERM to glm-launch (a SLURM preemption, Ctrl-C) stops every worker
/// after the same iteration with a complete checkpoint, which resumes.
#[test]
fn sigterm_to_the_launcher_leaves_a_checkpoint_that_resumes() {
    let d = tempfile::tempdir().unwrap();
    let (worker, job) = tiny_job(
        d.path(),
        r#"{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 1}}"#,
    );
    let save = d.path().join("save");
    let args = |iters: &str, load: bool| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--num_gpus".into(),
            "2".into(),
            "--worker".into(),
            worker.display().to_string(),
            "--run_dir".into(),
            d.path().join("run").display().to_string(),
        ];
        a.extend(job.iter().cloned());
        a.extend([
            "--set".to_string(),
            "save_interval=0".into(),
            "--set".into(),
            format!("train_iters={iters}"),
            "--set".into(),
            format!("save={}", save.display()),
        ]);
        if load {
            a.extend(["--set".to_string(), format!("load={}", save.display())]);
        }
        a
    };
    let mut child = launch().args(args("100000", false)).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !save.join("metrics.jsonl").is_file() {
        assert!(t0.elapsed().as_secs() < 240, "no training progress");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: signalling the child we started
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed().as_secs() > 300 {
            let _ = child.kill();
            panic!("the job did not stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("SIGTERM to 2 local worker(s)"), "{err}");
    assert!(out.contains(&format!("train: stopped by signal {} after iteration", libc::SIGTERM)), "{out}\n{err}");
    assert_ne!(status.code(), Some(0), "a stopped run is not a success");
    let it: u64 = std::fs::read_to_string(save.join("latest")).unwrap().trim().parse().unwrap();
    let inspect = Command::new(&worker).args(["checkpoint", "inspect", &save.display().to_string()]).output().unwrap();
    assert!(inspect.status.success() && text(&inspect).0.contains("complete: yes"), "{}", text(&inspect).0);
    // and it resumes
    let o = launch().args(args(&(it + 1).to_string(), true)).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success() && out.contains(&format!("(iteration {it})")), "{out}\n{err}");
}

/// The preflight's plan check: a job whose plan does not fit the memory
/// the hosts report is refused before any worker starts, with the
/// breakdown and a layout that fits; one that fits starts (the plan's line
/// printed); `--no-plan-check` starts the refused one anyway.
#[test]
fn the_plan_check_refuses_a_job_that_cannot_fit_and_starts_one_that_can() {
    let d = tempfile::tempdir().unwrap();
    let w = d.path().join("worker.sh");
    let marker = d.path().join("started");
    // 4 GB of RAM on this "host": 2 GB for each of its two CPU ranks
    std::fs::write(
        &w,
        format!(
            "#!/bin/sh\nif [ \"$1\" = env ]; then echo 'glm-worker: {}'; echo 'libtorch dir: /x'; echo 'cuda devices: 0'; echo 'host memory: 4000000000'; exit 0; fi\ntouch {}\n",
            env!("CARGO_PKG_VERSION"),
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let ws = w.display().to_string();
    let job = ["--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--set", "save=null", "--set", "train_iters=10"];
    // GLM 4 × 256: fits in 2 GB
    let o = launch().args(["--launcher", "local", "--num_gpus", "2", "--worker", &ws]).args(job).output().unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("glm-launch: plan: peak ") && out.contains("per rank of 2.00 GB (tp 1 × dp 2, ZeRO stage 0, micro-batch 8"), "{out}");
    assert!(marker.exists(), "the job started");
    std::fs::remove_file(&marker).unwrap();
    // 24 layers × 2048 (1.2 G parameters, about 19 GB of fp32 model states): refused
    let big = ["--set", "num_layers=24", "--set", "hidden_size=2048", "--set", "num_attention_heads=16"];
    let o = launch().args(["--launcher", "local", "--num_gpus", "2", "--worker", &ws]).args(job).args(big).output().unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(err.contains("the job does not fit: about ") && err.contains("and the selected hosts offer 2.00 GB per rank"), "{err}");
    assert!(err.contains("model states per rank (exact): parameters ") && err.contains("DOES NOT FIT"), "{err}");
    assert!(err.contains("HINT: no layout of 2 rank(s) fits: more ranks, or a smaller model"), "{err}");
    assert!(err.contains("--no-plan-check starts the job anyway"), "{err}");
    assert!(!marker.exists(), "nothing started");
    let o = launch().args(["--launcher", "local", "--num_gpus", "2", "--no-plan-check", "--worker", &ws]).args(job).args(big).output().unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(marker.exists(), "--no-plan-check started it");
}
