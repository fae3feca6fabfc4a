//! Saving without stalling, end to end through `glm-worker`: checkpoints
//! written in the background are the bytes a synchronous save writes (also
//! while training moves on), `keep_last` keeps the newest and never the
//! one `latest` names, a failed write stops the job naming rank and path
//! with the previous checkpoint intact, a stop waits for the save in
//! flight, and saves by the clock happen at the same iteration on every
//! rank. Saves are held and failed with the test hooks of
//! `worker/src/test_hooks.rs`, never with sleeps.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{events, ok};

/// A DeepSpeed config for the tiny test model: micro-batch 4, accumulation
/// 2, ZeRO `stage`.
fn ds(dir: &Path, stage: u8) -> PathBuf {
    let p = dir.join(format!("ds{stage}.json"));
    std::fs::write(
        &p,
        format!(
            r#"{{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0, "zero_optimization": {{"stage": {stage}}},
                "optimizer": {{"type": "Adam", "params": {{"lr": 0.003, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}}}}}}"#
        ),
    )
    .unwrap();
    p
}

/// The tiny model's training command (`np` MPI ranks, 0: none) with
/// hidden dropout, so every iteration's update is its own.
fn train(dir: &Path, np: usize, stage: u8, sets: &[String]) -> Command {
    common::tiny_command(dir, np, &ds(dir, stage), &run_sets(sets))
}

fn run_sets(sets: &[String]) -> Vec<String> {
    ["hidden_dropout=0.1".to_string(), "eval_interval=0".into()].into_iter().chain(sets.iter().cloned()).collect()
}

/// `train` on two MPI ranks, each rank's output in its own files under
/// `out` (`<out>/1/rank.N/stdout`, `stderr`).
fn train_two_ranks(dir: &Path, stage: u8, sets: &[String], out: &Path) -> Command {
    let corpus = dir.join("corpus.json");
    if !corpus.exists() {
        common::corpus_slice(&corpus, 300);
    }
    let mut c = common::mpirun(2);
    c.args(["--output-filename", &out.display().to_string()])
        .arg(env!("CARGO_BIN_EXE_glm-worker"))
        .args(common::tiny_train_args(dir, &ds(dir, stage), &corpus, 1200, &run_sets(sets)))
        .current_dir(common::repo());
    c
}

fn losses(save: &Path) -> Vec<(u64, String)> {
    events(save, "train").iter().map(|e| (e["iteration"].as_u64().unwrap(), e["loss"].to_string())).collect()
}

/// Whether the effective configuration in `out` shows `key` as `value`.
fn reported(out: &str, key: &str, value: &str) -> bool {
    out.lines().filter_map(|l| l.split_once(" = ")).any(|(k, v)| k.trim() == key && v == value)
}

/// Whether the run writing `<save>/metrics.jsonl` has logged iteration
/// `it` (read while it appends: a line not yet whole is skipped).
fn logged(save: &Path, it: u64) -> bool {
    let text = std::fs::read_to_string(save.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|e| e["type"] == "train" && e["iteration"] == it)
}

fn latest(save: &Path) -> String {
    std::fs::read_to_string(save.join("latest")).unwrap().trim().to_string()
}

/// The checkpoint directories (iterations) of `save`, ascending.
fn checkpoints(save: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(save).unwrap().flatten().filter_map(|e| e.file_name().to_string_lossy().parse().ok()).collect();
    v.sort_unstable();
    v
}

/// `glm-worker checkpoint inspect` of `dir` succeeds and calls it complete
/// (every part and shard present, every checksum right).
fn complete(dir: &Path) {
    let o = Command::new(env!("CARGO_BIN_EXE_glm-worker")).args(["checkpoint", "inspect", &dir.display().to_string()]).output().unwrap();
    let out = ok(&o);
    assert!(out.contains("complete: yes"), "{out}");
}

/// A child process whose stdout lines arrive on a channel while it runs.
struct Running {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Running {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(l);
            }
        });
        Running { child, lines, seen: Vec::new() }
    }

    /// Waits (with a deadline that only turns a hang into a failure) for
    /// `event` to hold, failing if the process ends first.
    fn wait_for(&mut self, what: &str, event: impl Fn(&[String]) -> bool) {
        let t0 = Instant::now();
        while !event(&self.seen) {
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(20)) {
                self.seen.push(l);
                continue;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
                panic!("the run ended ({status}) before {what}:\n{}\n{err}", self.seen.join("\n"));
            }
            assert!(t0.elapsed().as_secs() < 300, "never saw {what}:\n{}", self.seen.join("\n"));
        }
    }

    /// The rest of the output once the process has ended (a test that
    /// fails before leaves no process behind: see `Drop`).
    fn finish(mut self) -> (std::process::ExitStatus, String, String) {
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        let mut err = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (status, self.seen.join("\n"), err)
    }
}

impl Drop for Running {
    /// A run a failed test leaves (one held by `GLM_HOLD_SAVE` would wait
    /// for ever) is killed.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A checkpoint written in the background while training goes on holds
/// the state of its own iteration: its files are the bytes a synchronous
/// save writes, and a run resumed from it continues on the uninterrupted
/// run's losses. The background save of iteration 2 is held until
/// iterations 3 and 4 have updated the buffers it copied.
#[test]
fn background_saves_write_the_bytes_of_synchronous_ones() {
    let d = tempfile::tempdir().unwrap();
    let (sync, bg, resumed) = (d.path().join("sync"), d.path().join("bg"), d.path().join("resumed"));
    let release = d.path().join("release");
    let run = |save: &Path, decoupled: bool| -> Vec<String> {
        vec!["train_iters=6".into(), "save_interval=2".into(), format!("save={}", save.display()), format!("checkpoint.writer.decoupled={decoupled}")]
    };
    let out = ok(&train(d.path(), 0, 0, &run(&sync, false)).output().unwrap());
    assert!(reported(&out, "checkpoint.writer.decoupled", "false (training waits while the files are written)  (--set)"), "{out}");
    let mut cmd = train(d.path(), 0, 0, &run(&bg, true));
    cmd.env("GLM_HOLD_SAVE", &release);
    let mut r = Running::spawn(cmd);
    // iteration 4 trained (its metrics line is written before its save
    // point, where the run waits for iteration 2's save): the buffers have
    // moved twice since iteration 2's snapshot
    r.wait_for("iteration 4", |_| logged(&bg, 4));
    assert!(!bg.join("2").exists(), "iteration 2's save is held");
    std::fs::write(&release, "").unwrap();
    let (status, out, err) = r.finish();
    assert!(status.success(), "{out}\n{err}");
    assert!(out.contains("checkpoint: waiting for the checkpoint of iteration 2 to be written"), "{out}");
    assert!(out.contains("files written in the background"), "{out}");
    assert_eq!(losses(&sync), losses(&bg), "the same run");
    for it in ["2", "4", "6"] {
        for f in ["model.safetensors", "optim.safetensors", "tokenizer.json"] {
            let (a, b) = (std::fs::read(sync.join(it).join(f)).unwrap(), std::fs::read(bg.join(it).join(f)).unwrap());
            assert!(a == b, "{it}/{f} differs between the synchronous and the background save");
        }
        // state.json too, but for the recorded DeepSpeed config (its writer
        // setting) and save directory
        let state = |s: &Path| {
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(s.join(it).join("state.json")).unwrap()).unwrap();
            v.as_object_mut().unwrap().remove("deepspeed_config");
            v["args"].as_object_mut().unwrap().remove("save");
            v
        };
        assert_eq!(state(&sync), state(&bg), "{it}/state.json");
    }
    // resumed from the background save of iteration 2: the uninterrupted losses
    std::fs::create_dir_all(&resumed).unwrap();
    let sets = ["train_iters=6".to_string(), "save_interval=0".into(), format!("save={}", resumed.display()), format!("load={}", bg.join("2").display())];
    ok(&train(d.path(), 0, 0, &sets).output().unwrap());
    let tail: Vec<(u64, String)> = losses(&sync).into_iter().filter(|(it, _)| *it > 2).collect();
    assert_eq!(losses(&resumed), tail, "resumed from the background save of iteration 2");
}

/// `keep_last` keeps the newest N complete checkpoints, removing older
/// ones only once a newer one is installed, and never the one `latest`
/// names; a resume into the same directory goes on keeping.
#[test]
fn keep_last_keeps_the_newest_and_never_latest() {
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("run");
    let sets =
        |iters: u64, keep: u64| vec![format!("train_iters={iters}"), "save_interval=1".into(), format!("keep_last={keep}"), format!("save={}", save.display())];
    let out = ok(&train(d.path(), 0, 0, &sets(5, 2)).output().unwrap());
    assert_eq!(checkpoints(&save), [4, 5]);
    assert_eq!(latest(&save), "5");
    for it in 1..=3 {
        assert!(out.contains(&format!("checkpoint: keep_last 2: removed {}", save.join(it.to_string()).display())), "{out}");
    }
    assert!(reported(&out, "keep_last", "2 (older complete checkpoints removed)  (--set)"), "{out}");
    complete(&save.join("4"));
    // resumed into the same directory with keep_last 1: latest alone remains
    let mut s = sets(7, 1);
    s.push(format!("load={}", save.display()));
    ok(&train(d.path(), 0, 0, &s).output().unwrap());
    assert_eq!(checkpoints(&save), [7]);
    assert_eq!(latest(&save), "7");
    complete(&save.join("7"));
    assert!(!std::fs::read_dir(&save).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with('.') && e.path().is_dir()), "no temporaries");
}

/// A write that fails (the hook puts a directory where the writer's first
/// file goes) stops the job at the next step with an error naming the rank
/// and the path; nothing of that checkpoint is installed, the previous
/// checkpoint is intact and `latest` names it, also under keep_last 1. On
/// two data-parallel ranks at ZeRO stage 1 a failure of rank 1's shard
/// stops both: rank 1 names its path, rank 0 says another rank failed.
#[test]
fn a_failed_write_stops_the_job_and_keeps_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let check = |save: &Path, stops: std::ops::RangeInclusive<u64>| {
        assert_eq!(latest(save), "2");
        assert_eq!(checkpoints(save), [2]);
        assert!(!save.join(".tmp-4").exists(), "the failed checkpoint's temporary is removed");
        complete(&save.join("2"));
        let last = losses(save).last().unwrap().0;
        assert!(stops.contains(&last), "stopped after iteration {last}, not in {stops:?}");
    };
    for decoupled in [true, false] {
        let save = d.path().join(format!("one-{decoupled}"));
        let sets = [
            "train_iters=20".to_string(),
            "save_interval=2".into(),
            "keep_last=1".into(),
            format!("save={}", save.display()),
            format!("checkpoint.writer.decoupled={decoupled}"),
        ];
        let o = train(d.path(), 0, 0, &sets).env("GLM_INJECT_SAVE_FAILURE", "0:4").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        let path = save.join(".tmp-4").join("model.safetensors");
        let want = format!("checkpoint of iteration 4: rank 0 could not write its files: {}", path.display());
        assert!(err.contains(&want) && err.contains("nothing was installed; latest still names iteration 2"), "want {want}: {err}");
        // the background writer's failure is agreed after iteration 5, or
        // at the latest at the next save (6), which waits for it; inline at 4
        check(&save, if decoupled { 5..=6 } else { 4..=4 });
    }
    let save = d.path().join("two");
    let sets = ["train_iters=20".to_string(), "save_interval=2".into(), format!("save={}", save.display())];
    let outdir = d.path().join("out");
    let o = train_two_ranks(d.path(), 1, &sets, &outdir).env("GLM_INJECT_SAVE_FAILURE", "1:4").output().unwrap();
    assert!(!o.status.success());
    let stderr = |r: usize| std::fs::read_to_string(outdir.join(format!("1/rank.{r}/stderr"))).unwrap_or_default();
    let shard = save.join(".tmp-4").join("zero_dp_rank_01_optim.safetensors");
    assert!(stderr(1).contains(&format!("checkpoint of iteration 4: rank 1 could not write its files: {}", shard.display())), "{}", stderr(1));
    assert!(stderr(0).contains("checkpoint of iteration 4: another rank failed to write its files (see its error); nothing was installed"), "{}", stderr(0));
    check(&save, 5..=6);
}

/// SIGTERM while a checkpoint is being written: the run stops after the
/// current iteration, waits for that checkpoint, then saves the stop
/// iteration; both are complete and `latest` names the last. The save of
/// iteration 2 is held (`GLM_HOLD_SAVE`) until the run says it waits.
#[test]
fn a_stop_waits_for_the_save_in_flight() {
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("run");
    let release = d.path().join("release");
    let sets = ["train_iters=100000".to_string(), "save_interval=2".into(), format!("save={}", save.display())];
    let mut cmd = train(d.path(), 0, 0, &sets);
    cmd.env("GLM_HOLD_SAVE", &release);
    let mut r = Running::spawn(cmd);
    // iteration 2's checkpoint has begun: its temporary directory exists
    r.wait_for("the save of iteration 2", |_| save.join(".tmp-2").is_dir());
    // SAFETY: our own child.
    unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) };
    r.wait_for("the wait", |seen| seen.iter().any(|l| l.contains("checkpoint: waiting for the checkpoint of iteration 2 to be written")));
    // held: the process waits for the writer, nothing is installed yet
    assert!(r.child.try_wait().unwrap().is_none(), "the run ended with its save in flight");
    assert!(!save.join("2").exists() && !save.join("latest").exists());
    std::fs::write(&release, "").unwrap();
    let (status, out, err) = r.finish();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{out}\n{err}");
    let stopped = losses(&save).last().unwrap().0;
    assert!(out.contains(&format!("train: stopped by signal {} after iteration {stopped}", libc::SIGTERM)), "{out}");
    assert_eq!(latest(&save), stopped.to_string());
    complete(&save.join("2"));
    complete(&save.join(stopped.to_string()));
}

/// `save_interval_minutes` (fractions accepted): a save is due when that
/// long has passed on some rank's clock, and the world agrees, so every
/// rank saves at the same iteration. Here only rank 1 reads its clock
/// (`GLM_SAVE_CLOCK_RANK`), and every checkpoint has both ranks' ZeRO
/// shards, checksummed in the part's state.json. Bad values name the key.
#[test]
fn saves_by_the_clock_happen_at_the_same_iteration_on_every_rank() {
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("run");
    let sets = ["train_iters=4".to_string(), "save_interval=0".into(), "save_interval_minutes=0.000000001".into(), format!("save={}", save.display())];
    let o = train(d.path(), 2, 1, &sets).env("GLM_SAVE_CLOCK_RANK", "1").output().unwrap();
    let out = ok(&o);
    assert!(reported(&out, "save_interval_minutes", "0.000000001 (a save when as long has passed since the last)  (--set)"), "{out}");
    // due after every iteration on rank 1's clock: every rank saved 1, 2, 3 (and 4, the end)
    assert_eq!(checkpoints(&save), [1, 2, 3, 4]);
    for it in 1..=4 {
        let dir = save.join(it.to_string());
        for r in 0..2 {
            assert!(dir.join(format!("zero_dp_rank_{r:02}_optim.safetensors")).is_file(), "rank {r}'s shard of iteration {it}");
        }
        complete(&dir);
        assert!(out.contains(&format!("checkpoint: saved {}", dir.display())), "{out}");
    }
    assert_eq!(latest(&save), "4");
    let check = |set: &str, want: &str| {
        let o: Output = train(d.path(), 0, 0, &["train_iters=0".to_string(), set.to_string()]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{set}: want {want}: {err}");
    };
    check("save_interval_minutes=-1", "save_interval_minutes = -1 (--set): must be >= 0 and finite");
    check("keep_last=-2", "keep_last = -2 (--set)");
    check("checkpoint.writer.decoupled=yes", "--set checkpoint.writer.decoupled=\"yes\": checkpoint.writer.decoupled: expected true or false");
}
