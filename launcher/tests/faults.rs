//! Faults on purpose (`GLM_TEST_FAULT`, see worker/src/test_hooks.rs) in
//! real jobs of glm-worker started by glm-launch on this machine (OpenMPI's
//! mpirun): a frozen rank is named and ends the job within its deadline,
//! leaving a checkpoint that resumes; a killed rank restarts the job from
//! its latest checkpoint and ends as a run resumed from that checkpoint ends;
//! a fault that repeats is not retried forever. The same on the ssh back
//! end's test hosts, and the elastic shrink, are in ssh.rs.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{output_within, repo, start, text, tiny_job};

const DS: &str = r#"{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}, "zero_optimization": {"stage": 1}}"#;

/// glm-launch with `n` workers here, the tiny job saving into `save` every
/// 2 iterations up to `iters`, logs under `run`.
fn launch(dir: &Path, n: usize, save: &Path, run: &Path, iters: u64, extra: &[&str]) -> Command {
    let (worker, job) = tiny_job(dir, DS);
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-launch"));
    c.current_dir(repo())
        .env("OMP_NUM_THREADS", "1")
        .env_remove("GLM_TEST_FAULT")
        .env_remove("GLM_TEST_FAULT_MARK")
        .args(["--launcher", "local", "--num_gpus", &n.to_string(), "--worker", &worker.display().to_string(), "--run_dir", &run.display().to_string()])
        .args(extra)
        .args(job)
        .args(["--set", "save_interval=2", "--set", &format!("train_iters={iters}"), "--set", &format!("save={}", save.display())]);
    c
}

fn latest(save: &Path) -> u64 {
    std::fs::read_to_string(save.join("latest")).unwrap().trim().parse().unwrap()
}

/// Waits for `file` to appear (the fault's mark): the moment it fired.
fn wait_for(file: &Path, secs: u64) -> Instant {
    let t0 = Instant::now();
    while !file.exists() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "{} never appeared", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    Instant::now()
}

/// Whether process `pid` still runs (a zombie waiting for init to reap it
/// does not).
fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
}

/// A rank frozen by SIGSTOP at iteration 5 of a 2- and a 4-rank job with a
/// 5 s collective timeout: the ranks waiting for it stop the job within the
/// timeout + 15 s, glm-launch names the frozen rank (not the ones that
/// waited), nothing is left running, and the last complete checkpoint
/// resumes: iteration 2's (iteration 4's was still being written in the
/// background, so it was never installed).
#[test]
fn a_frozen_rank_is_named_and_the_job_ends_within_its_deadline() {
    for n in [2usize, 4] {
        let d = tempfile::tempdir().unwrap();
        let (save, mark) = (d.path().join("save"), d.path().join("fired"));
        let frozen = n - 1;
        let mut c = launch(d.path(), n, &save, &d.path().join("run"), 8, &["--collective-timeout", "5"]);
        c.env("GLM_TEST_FAULT", format!("stop:{frozen}:5")).env("GLM_TEST_FAULT_MARK", &mark);
        let child = start(&mut c);
        let fired = wait_for(&mark, 240);
        let o = child.finish();
        let took = fired.elapsed();
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(124), "{n} ranks:\n{out}\n{err}");
        assert!(took < Duration::from_secs(5 + 15), "{n} ranks: the job ended {took:?} after the fault");
        let named = format!("rank {frozen} on localhost: no progress for");
        assert!(err.contains(&named) && err.contains("(last: iteration"), "{n} ranks: names the frozen rank:\n{err}");
        assert!(err.contains("stopped the job: collective timeout:") && err.contains("past --collective-timeout 5 s"), "{err}");
        assert!(!err.contains("rank 0 on localhost: no progress"), "the waiting ranks are not blamed:\n{err}");
        let pid: i32 = std::fs::read_to_string(&mark).unwrap().trim().parse().unwrap();
        // mpirun's SIGKILL of the frozen rank lands as it exits
        let t0 = Instant::now();
        while alive(pid) {
            assert!(t0.elapsed() < Duration::from_secs(10), "the frozen rank {pid} was left behind");
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(latest(&save), 2, "{out}");
        // the checkpoint before the fault resumes
        let o =
            output_within(&mut launch(d.path(), n, &save, &d.path().join("run2"), 4, &["--set", &format!("load={}", save.display())]), 240).expect("resume");
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}\n{err}");
        assert!(out.contains("(iteration 2)") && out.contains("iteration       4/4"), "{out}");
    }
}

/// The weights (model and optimizer files) of checkpoint `it` under `save`.
fn weights(save: &Path, it: u64) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = save.join(it.to_string());
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| (p.file_name().unwrap().into(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "{}: no weights", dir.display());
    out
}

/// `kill -9` of rank 1 at iteration 5 with --max-restarts 2: the job
/// restarts from checkpoint 2 (iteration 4's was still being written in the
/// background, so it was never installed) and finishes; its final weights equal
/// (bitwise, on this machine) those of a run resumed from the same
/// checkpoint without a fault; restarts.jsonl records the restart. A fault
/// that strikes every attempt is not retried forever, and a failure before
/// the first checkpoint starts again from scratch.
#[test]
fn a_killed_rank_restarts_the_job_from_its_latest_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let (save, run) = (d.path().join("save"), d.path().join("run"));
    let mut c = launch(d.path(), 2, &save, &run, 8, &["--max-restarts", "2", "--collective-timeout", "30"]);
    c.env("GLM_TEST_FAULT", "kill:1:5");
    let o = output_within(&mut c, 300).expect("glm-launch ended");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("glm-launch: rank 1 on localhost") && err.contains("killed by signal 9"), "{err}");
    assert!(
        err.contains("glm-launch: restart 1 of 2 after killed by signal 9 (Killed) (rank 1 on localhost") && err.contains("resuming from checkpoint 2"),
        "{err}"
    );
    assert!(out.contains("(after 1 restart(s)") && out.contains("resumed from") && out.contains("iteration       8/8"), "{out}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(run.join("restarts.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!((r["restart"].as_u64(), r["rank"].as_u64(), r["resumed_from"].as_u64(), r["world"].as_u64()), (Some(1), Some(1), Some(2), Some(2)), "{r}");
    assert!(r["cause"].as_str().unwrap().contains("signal 9") && r["lost_s"].as_f64().unwrap() >= 0.0 && r["iteration"].as_u64().unwrap() >= 1, "{r}");
    assert!(run.join("restart-1/logs/rank_0000.log").is_file());
    // the same checkpoint, resumed without a fault
    let reference = d.path().join("reference");
    let o = output_within(&mut launch(d.path(), 2, &reference, &d.path().join("run-ref"), 8, &["--set", &format!("load={}", save.join("2").display())]), 300)
        .expect("reference run");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(weights(&save, 8), weights(&reference, 8), "the restarted run ends where a resumed run ends");

    // a fault that strikes every attempt: one restart, then the rule stops it
    let d = tempfile::tempdir().unwrap();
    let (save, run) = (d.path().join("save"), d.path().join("run"));
    let mut c = launch(d.path(), 2, &save, &run, 8, &["--max-restarts", "3"]);
    c.env("GLM_TEST_FAULT", "kill:1:5:*");
    let o = output_within(&mut c, 300).expect("glm-launch ended");
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(
        err.contains("the same failure as the attempt before (killed by signal 9 (Killed), rank 1) before any newer checkpoint (the latest is still 2)"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(run.join("restarts.jsonl")).unwrap().lines().count(), 1);

    // a failure before the first checkpoint: from scratch
    let d = tempfile::tempdir().unwrap();
    let (save, run) = (d.path().join("save"), d.path().join("run"));
    let mut c = launch(d.path(), 2, &save, &run, 3, &["--max-restarts", "1"]);
    c.env("GLM_TEST_FAULT", "exit:0:1");
    let o = output_within(&mut c, 300).expect("glm-launch ended");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("no checkpoint in") && err.contains("starting again from scratch"), "{err}");
    assert_eq!(latest(&save), 3);
}

/// Rank 1 slowed by 300 ms a step (`GLM_TEST_FAULT=slow=300:1:1`): every
/// log line and metrics event names it the slowest, with its own work per
/// step (the waits it imposes on rank 0 not counted there).
#[test]
fn a_slow_rank_is_named_the_straggler() {
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("save");
    let mut c = launch(d.path(), 2, &save, &d.path().join("run"), 4, &[]);
    c.env("GLM_TEST_FAULT", "slow=300:1:1");
    let o = output_within(&mut c, 300).expect("glm-launch ended");
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.matches(", slowest rank 1").count(), 4, "{out}");
    for l in std::fs::read_to_string(save.join("metrics.jsonl")).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(l).unwrap();
        if e["type"] == "train" {
            let r = &e["ranks"];
            assert_eq!(r["slowest"], 1, "{e}");
            assert!(r["max_ms"].as_f64().unwrap() - r["min_ms"].as_f64().unwrap() > 150.0, "{e}");
        }
    }
}

/// Every rank frozen at iteration 3 (no collective waits, so no worker's
/// watchdog acts: as a hung CUDA synchronisation would be): glm-launch's own
/// deadline (the timeout + 10 s without progress) stops the job and names
/// the ranks.
#[test]
fn a_job_without_progress_is_stopped_by_glm_launch() {
    let d = tempfile::tempdir().unwrap();
    let mark = d.path().join("fired");
    let mut c = launch(d.path(), 2, &d.path().join("save"), &d.path().join("run"), 8, &["--collective-timeout", "3"]);
    c.env("GLM_TEST_FAULT", "stop:*:3").env("GLM_TEST_FAULT_MARK", &mark);
    let child = start(&mut c);
    let fired = wait_for(&mark, 240);
    let o = child.finish();
    let took = fired.elapsed();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(124), "{out}\n{err}");
    assert!(took < Duration::from_secs(3 + 10 + 15), "ended {took:?} after the fault");
    assert!(err.contains("glm-launch: the job made no progress for 13 s and glm-launch stopped it: "), "{err}");
    for r in 0..2 {
        assert!(err.contains(&format!("rank {r} on localhost: no progress for")), "{err}");
    }
    // nothing is left behind (the last rank to mark the fault)
    let pid: i32 = std::fs::read_to_string(&mark).unwrap().trim().parse().unwrap();
    let t0 = Instant::now();
    while alive(pid) {
        assert!(t0.elapsed() < Duration::from_secs(10), "rank {pid} was left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
}
