//! Multi-process training under `mpirun` (OpenMPI, `--oversubscribe` on 2
//! cores): data parallelism must give the single-process results.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{ok, repo};

fn ds(dir: &Path, name: &str, micro: usize, global: usize) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(
        &p,
        format!(
            r#"{{"train_batch_size": {global}, "train_micro_batch_size_per_gpu": {micro}, "gradient_clipping": 1.0,
                "optimizer": {{"type": "Adam", "params": {{"lr": 0.002, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}}}},
                "zero_optimization": {{"stage": 0, "reduce_bucket_size": 100000}}}}"#
        ),
    )
    .unwrap();
    p
}

/// Runs glm-worker on `np` ranks (np = 0: without mpirun) with a tiny,
/// dropout-free model on the first 300 records of the default corpus.
fn run(dir: &Path, np: usize, ds: &Path, sets: &[String]) -> Output {
    let _one_at_a_time = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    command(dir, np, ds, sets).output().expect("mpirun (openmpi-bin; scripts/setup.sh installs it)")
}

/// The command `run` runs.
fn command(dir: &Path, np: usize, ds: &Path, sets: &[String]) -> Command {
    let dropout_free = ["hidden_dropout=0", "attention_dropout=0", "output_dropout=0", "eval_interval=3"].map(String::from);
    common::tiny_command(dir, np, ds, &[&dropout_free[..], sets].concat())
}

/// mpirun jobs of concurrently running tests contend for the 2 cores and
/// OpenMPI's session directory; run them one at a time.
static MPIRUN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn losses(save: &Path, kind: &str) -> Vec<(u64, f64)> {
    common::events(save, kind).into_iter().map(|v| (v["iteration"].as_u64().unwrap(), v["loss"].as_f64().unwrap())).collect()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], rel: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for ((ia, la), (ib, lb)) in a.iter().zip(b) {
        assert_eq!(ia, ib);
        assert!((la - lb).abs() <= rel * la.abs(), "iteration {ia}: {la} vs {lb} (relative tolerance {rel})");
    }
}

#[test]
fn data_parallel_equals_one_process_with_the_whole_batch() {
    let d = tempfile::tempdir().unwrap();
    let one = d.path().join("one");
    let two = d.path().join("two");
    // the data-parallel run goes first: its rank 0 must prepare tokenizer
    // and store while rank 1 waits (concurrent preparation gave ranks
    // different tokenizers once)
    let out = ok(&run(d.path(), 2, &ds(d.path(), "ds2.json", 4, 8), &["train_iters=6".into(), "eval_batch_size=4".into(), format!("save={}", two.display())]));
    ok(&run(d.path(), 0, &ds(d.path(), "ds1.json", 8, 8), &["train_iters=6".into(), "eval_batch_size=4".into(), format!("save={}", one.display())]));
    assert!(out.contains("world 2 = tensor-parallel 1 × data-parallel 2"), "{out}");
    assert_close(&losses(&one, "train"), &losses(&two, "train"), 1e-5);
    assert_close(&losses(&one, "eval"), &losses(&two, "eval"), 1e-5);
    // one checkpoint writer: the same files as the single process
    assert!(two.join("6/model.safetensors").is_file() && two.join("latest").is_file());
}

#[test]
fn data_parallel_resume_equals_the_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let cfg = ds(d.path(), "ds2.json", 2, 4);
    ok(&run(d.path(), 2, &cfg, &["train_iters=6".into(), "save_interval=3".into(), format!("save={}", a.display())]));
    ok(&run(d.path(), 2, &cfg, &["train_iters=6".into(), format!("load={}", a.join("3").display()), format!("save={}", b.display())]));
    let la: Vec<_> = losses(&a, "train").into_iter().filter(|(i, _)| *i > 3).collect();
    let lb = losses(&b, "train");
    assert_eq!(la, lb, "losses after resuming at iteration 3");
    assert!(std::fs::read(a.join("6/model.safetensors")).unwrap() == std::fs::read(b.join("6/model.safetensors")).unwrap());
}

/// The value the effective-configuration report prints for `key`.
fn reported(out: &str, key: &str) -> String {
    let line = out.lines().find(|l| l.trim_start().starts_with(&format!("{key} "))).unwrap_or_else(|| panic!("no {key} in the report:\n{out}"));
    line.split_once('=').map_or("", |(_, v)| v).split_whitespace().next().unwrap_or("").to_string()
}

/// Two checkpoints' weights: the largest |a − b| over the largest |b| of
/// the whole model (as `zero.rs` compares weights), and the tensor where
/// the difference is largest relative to its own largest weight, with it.
fn weights_differ(a: &Path, b: &Path) -> (f64, String, f64) {
    let read = |p: &Path| -> std::collections::BTreeMap<String, tch::Tensor> {
        tch::Tensor::read_safetensors(p.join("model.safetensors")).unwrap().into_iter().collect()
    };
    let (wa, wb) = (read(a), read(b));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    let (mut diff, mut largest, mut worst) = (0.0f64, 0.0f64, (String::new(), 0.0f64));
    for (k, t) in &wa {
        let (d, m) = ((t - &wb[k]).abs().max().double_value(&[]), wb[k].abs().max().double_value(&[]));
        (diff, largest) = (diff.max(d), largest.max(m));
        if d / m > worst.1 {
            worst = (k.clone(), d / m);
        }
    }
    (diff / largest, worst.0, worst.1)
}

/// Elastic layouts (issue 22): one global batch of 8 factored as
/// data-parallel 2 × micro-batch 4 (ZeRO stage 2), one process × 2
/// accumulation steps × micro-batch 4, and one process × micro-batch 8
/// trains the same (fp32, no dropout): the same samples in the same
/// blank-infilling modes (a function of the sample index, the mode group
/// fixed at the first run's global batch) and the loss normalised by the
/// whole global batch's loss tokens. And the data-parallel run's checkpoint
/// of iteration 3, resumed on one process from the same DeepSpeed file (2
/// accumulation steps derived from its batch keys), continues its losses.
#[test]
fn every_factoring_of_the_global_batch_trains_the_same_and_resumes_across_them() {
    let d = tempfile::tempdir().unwrap();
    let (dp2, acc2, micro8, resumed) = (d.path().join("dp2"), d.path().join("acc2"), d.path().join("micro8"), d.path().join("resumed"));
    let (micro4_ds, micro8_ds) = (ds(d.path(), "micro4.json", 4, 8), ds(d.path(), "micro8.json", 8, 8));
    let sets = |save: &Path, extra: &[&str]| -> Vec<String> {
        ["train_iters=6", "save_interval=3", "eval_batch_size=4"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .chain([format!("save={}", save.display())])
            .collect()
    };
    // the data-parallel run first: its rank 0 prepares the data
    let zero2 = ["zero_optimization.stage=2", "zero_optimization.reduce_bucket_size=20000", "zero_optimization.allgather_bucket_size=5000"];
    let out = ok(&run(d.path(), 2, &micro4_ds, &sets(&dp2, &zero2)));
    assert!(out.contains("world 2 = tensor-parallel 1 × data-parallel 2") && out.contains("stage 2 (optimizer state"), "{out}");
    assert_eq!(reported(&out, "gradient_accumulation_steps"), "1");
    let out = ok(&run(d.path(), 0, &micro4_ds, &sets(&acc2, &[])));
    assert_eq!((reported(&out, "train_micro_batch_size_per_gpu"), reported(&out, "gradient_accumulation_steps")), ("4".into(), "2".into()));
    let out = ok(&run(d.path(), 0, &micro8_ds, &sets(&micro8, &[])));
    assert_eq!((reported(&out, "train_micro_batch_size_per_gpu"), reported(&out, "gradient_accumulation_steps")), ("8".into(), "1".into()));
    let want = losses(&dp2, "train");
    assert_eq!(want.len(), 6);
    for (name, other) in [("1 process × 2 accumulation steps × micro-batch 4", &acc2), ("1 process × micro-batch 8", &micro8)] {
        eprintln!("{name}: train losses {:?} vs data-parallel 2 {want:?}", losses(other, "train"));
        assert_close(&want, &losses(other, "train"), 1e-6);
        assert_close(&losses(&dp2, "eval"), &losses(other, "eval"), 1e-6);
        let (rel, tensor, in_tensor) = weights_differ(&dp2.join("6"), &other.join("6"));
        match rel {
            0.0 => eprintln!("{name}: final weights equal data-parallel 2's bit for bit"),
            _ => eprintln!(
                "{name}: final weights differ from data-parallel 2's by {rel:.1e} of the largest weight (most in {tensor}: {in_tensor:.1e} of its largest)"
            ),
        }
        assert!(rel <= 1e-6, "{name}: final weights differ by {rel:.1e} relative to the largest weight");
    }
    // the checkpoint records the mode group: the first run's global batch
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dp2.join("3/state.json")).unwrap()).unwrap();
    assert_eq!(state["mode_group"], 8, "{state}");
    let report = ok(&Command::new(env!("CARGO_BIN_EXE_glm-worker")).args(["checkpoint", "inspect", &dp2.join("3").display().to_string()]).output().unwrap());
    assert!(report.contains("blank-infilling modes per 8 samples"), "{report}");

    // resumed on one process with the same DeepSpeed file: accumulation 2
    let out = ok(&run(
        d.path(),
        0,
        &micro4_ds,
        &["train_iters=6".to_string(), "eval_batch_size=4".into(), format!("load={}", dp2.join("3").display()), format!("save={}", resumed.display())],
    ));
    assert!(out.contains("(iteration 3)") && out.contains("optimizer state re-partitioned from data-parallel 2, ZeRO stage 2 to data-parallel 1"), "{out}");
    assert_eq!(reported(&out, "gradient_accumulation_steps"), "2");
    let tail: Vec<_> = want.iter().copied().filter(|(i, _)| *i > 3).collect();
    assert_close(&tail, &losses(&resumed, "train"), 1e-6);
    let (rel, ..) = weights_differ(&dp2.join("6"), &resumed.join("6"));
    eprintln!("resumed on 1 process × 2 accumulation steps: final weights differ by {rel:.1e} of the largest weight");
    assert!(rel <= 1e-6, "resumed: final weights differ by {rel:.1e} relative to the largest weight");
}

#[test]
fn invalid_layouts_fail_clearly() {
    let d0 = tempfile::tempdir().unwrap();
    // heads must split evenly over the tensor-parallel ranks
    let o = run(
        d0.path(),
        2,
        &ds(d0.path(), "ds.json", 4, 4),
        &["model_parallel_size=2".into(), "num_attention_heads=1".into(), "hidden_size=64".into(), "train_iters=1".into()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("num_attention_heads 1 is not divisible by model_parallel_size 2"), "{err}");
    let d = tempfile::tempdir().unwrap();
    let o = run(d.path(), 3, &ds(d.path(), "ds.json", 4, 12), &["model_parallel_size=2".into(), "train_iters=1".into()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("world size 3 is not a multiple of model_parallel_size 2"), "{err}");
    // a batch triple that contradicts the data-parallel size
    let o = run(d.path(), 2, &ds(d.path(), "bad.json", 4, 4), &["train_iters=1".into()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("train_batch_size 4, train_micro_batch_size_per_gpu 4 cannot satisfy") && err.contains("data-parallel size 2"),
        "{err}"
    );
}

#[test]
fn tensor_parallel_equals_one_process() {
    let d = tempfile::tempdir().unwrap();
    let (one, tp2, tp2dp2) = (d.path().join("one"), d.path().join("tp2"), d.path().join("tp2dp2"));
    // the vocabulary is padded to a multiple of make_vocab_size_divisible_by
    // (128), as the original pads, which 2 ranks split: the same embedding
    ok(&run(
        d.path(),
        2,
        &ds(d.path(), "ds_tp2.json", 4, 4),
        &["train_iters=6".into(), "model_parallel_size=2".into(), "eval_batch_size=2".into(), format!("save={}", tp2.display())],
    ));
    let out = ok(&run(
        d.path(),
        4,
        &ds(d.path(), "ds_tp2dp2.json", 2, 4),
        &["train_iters=6".into(), "model_parallel_size=2".into(), "eval_batch_size=2".into(), format!("save={}", tp2dp2.display())],
    ));
    assert!(out.contains("world 4 = tensor-parallel 2 × data-parallel 2"), "{out}");
    ok(&run(d.path(), 0, &ds(d.path(), "ds_one.json", 4, 4), &["train_iters=6".into(), "eval_batch_size=2".into(), format!("save={}", one.display())]));
    for other in [&tp2, &tp2dp2] {
        assert_close(&losses(&one, "train"), &losses(other, "train"), 1e-5);
        assert_close(&losses(&one, "eval"), &losses(other, "eval"), 1e-5);
    }
    // one part per tensor-parallel rank, each holding its slices
    for r in ["mp_rank_00", "mp_rank_01"] {
        assert!(tp2dp2.join("6").join(r).join("model.safetensors").is_file(), "{r}");
    }
    assert_eq!(std::fs::read_to_string(tp2dp2.join("latest")).unwrap().trim(), "6");
    // resuming it in one process points at merge; a changed dropout is fine, a changed shape is named
    let o = run(d.path(), 0, &ds(d.path(), "ds_one.json", 4, 4), &["train_iters=8".into(), format!("load={}", tp2.display())]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("saved with tensor-parallel 2, and this run has tensor-parallel 1: merge it first (glm-worker checkpoint merge"),
        "{e}"
    );

    // merged TP=2 weights after 6 updates equal the one-process weights
    let merged = d.path().join("merged");
    let worker = env!("CARGO_BIN_EXE_glm-worker");
    let cmd = |args: &[&str]| ok(&Command::new(worker).current_dir(repo()).args(args).output().unwrap());
    cmd(&["checkpoint", "merge", "--load", &tp2.display().to_string(), "--out", &merged.display().to_string()]);
    let read = |p: PathBuf| -> std::collections::BTreeMap<String, tch::Tensor> { tch::Tensor::read_safetensors(p).unwrap().into_iter().collect() };
    let (m, w) = (read(merged.join("model.safetensors")), read(one.join("6/model.safetensors")));
    assert_eq!(m.keys().collect::<Vec<_>>(), w.keys().collect::<Vec<_>>());
    for (name, t) in &m {
        assert!(t.allclose(&w[name], 1e-5, 1e-6, false), "{name}: merged TP=2 weights differ from one process");
    }
    let g = cmd(&["generate", "--load", &merged.display().to_string(), "--text", "明月[MASK]", "--max-tokens", "3"]);
    assert!(g.contains("blank 0:"), "{g}");
    // splitting the merged checkpoint gives back the parts exactly
    let parts = d.path().join("parts");
    cmd(&["checkpoint", "split", "--load", &merged.display().to_string(), "--tp", "2", "--out", &parts.display().to_string()]);
    for r in ["mp_rank_00", "mp_rank_01"] {
        let (a, b) = (read(parts.join(r).join("model.safetensors")), read(tp2.join("6").join(r).join("model.safetensors")));
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{r} {name}: split differs from the trained part");
        }
    }
    let o = Command::new(worker).args(["generate", "--load", &tp2.display().to_string(), "--text", "明月"]).output().unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("split over tensor-parallel ranks"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn tensor_and_data_parallel_resume_equals_the_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    let cfg = ds(d.path(), "ds.json", 2, 4);
    // with dropout: the per-rank attention-dropout streams must resume too
    let sets = |extra: Vec<String>| -> Vec<String> {
        ["train_iters=6".to_string(), "model_parallel_size=2".into(), "eval_interval=0".into(), "hidden_dropout=0.1".into(), "attention_dropout=0.1".into()]
            .into_iter()
            .chain(extra)
            .collect()
    };
    ok(&run(d.path(), 4, &cfg, &sets(vec!["save_interval=3".into(), format!("save={}", a.display())])));
    let out = ok(&run(d.path(), 4, &cfg, &sets(vec![format!("load={}", a.join("3").display()), format!("save={}", b.display())])));
    assert!(out.contains("(iteration 3)"), "{out}");
    let la: Vec<_> = losses(&a, "train").into_iter().filter(|(i, _)| *i > 3).collect();
    assert_eq!(la, losses(&b, "train"), "losses after resuming at iteration 3");
    for r in ["mp_rank_00", "mp_rank_01"] {
        let wa = std::fs::read(a.join("6").join(r).join("model.safetensors")).unwrap();
        let wb = std::fs::read(b.join("6").join(r).join("model.safetensors")).unwrap();
        assert!(wa == wb, "{r}: final weights differ");
    }
}

#[test]
fn comm_check_passes_on_three_ranks() {
    let _one_at_a_time = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let o = common::mpirun(3).arg(env!("CARGO_BIN_EXE_glm-worker")).args(["comm-check", "--device", "cpu", "--mib", "1", "--iters", "2"]).output().unwrap();
    let out = ok(&o);
    assert!(out.contains("3 rank(s), Cpu tensors through MPI"), "{out}");
    assert_eq!(out.matches(": ok").count(), 17, "{out}");
    assert!(out.contains("GB/s bus") && out.contains("all checks passed"), "{out}");
}

/// The same checks with every collective staged through host copies
/// (`GLM_COMM_BACKEND=host-staged`); a misspelt back end is refused by name.
#[test]
fn comm_check_passes_staged_through_host_memory() {
    let _one_at_a_time = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let o = common::mpirun(2)
        .env("GLM_COMM_BACKEND", "host-staged")
        .arg(env!("CARGO_BIN_EXE_glm-worker"))
        .args(["comm-check", "--device", "cpu", "--mib", "1", "--iters", "2"])
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains("2 rank(s), Cpu tensors through host memory over MPI"), "{out}");
    assert_eq!(out.matches(": ok").count(), 17, "{out}");
    assert!(out.contains("all checks passed"), "{out}");
    let o = Command::new(env!("CARGO_BIN_EXE_glm-worker"))
        .env("GLM_COMM_BACKEND", "host_staged")
        .args(["comm-check", "--device", "cpu", "--mib", "1", "--iters", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("GLM_COMM_BACKEND=host_staged: expected native") && err.contains("host-staged"), "{err}");
}

#[test]
fn comm_check_on_cuda_runs_nccl_or_says_why_not() {
    let o = Command::new(env!("CARGO_BIN_EXE_glm-worker")).args(["comm-check", "--device", "cuda", "--mib", "1", "--iters", "2"]).output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    if o.status.success() {
        assert!(out.contains("through NCCL") && out.contains("all checks passed"), "{out}");
    } else {
        assert!(err.contains("--device cuda: CUDA is not available"), "{err}");
    }
}

/// The processes mpirun `parent` started (its children, by /proc).
fn children(parent: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

#[test]
fn a_signal_to_one_tensor_parallel_rank_stops_every_rank_after_the_same_iteration() {
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("save");
    let cfg = ds(d.path(), "ds.json", 4, 4);
    let sets = [
        "train_iters=100000".to_string(),
        "model_parallel_size=2".into(),
        "eval_interval=0".into(),
        "save_interval=0".into(),
        format!("save={}", save.display()),
    ];
    let _one_at_a_time = MPIRUN.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = command(d.path(), 2, &cfg, &sets).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // training is under way once rank 0 has logged an iteration
    let t0 = std::time::Instant::now();
    while !save.join("metrics.jsonl").is_file() {
        assert!(t0.elapsed().as_secs() < 300, "no training progress");
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let ranks = children(child.id());
    assert_eq!(ranks.len(), 2, "mpirun's children: {ranks:?}");
    // SIGTERM to one rank only (the one started last)
    unsafe { libc::kill(*ranks.iter().max().unwrap(), libc::SIGTERM) };
    let t1 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t1.elapsed().as_secs() > 120 {
            let _ = child.kill();
            panic!("the other rank did not stop: the job hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    // every rank exits 128 + SIGTERM, whichever mpirun reports first, and
    // rank 0 (the reporter) names the signal even if it went to rank 1
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert!(out.contains(&format!("train: stopped by signal {} after iteration", libc::SIGTERM)), "{out}");
    // both tensor-parallel parts of the stop iteration, and `latest` naming it
    let it = std::fs::read_to_string(save.join("latest")).unwrap().trim().to_string();
    for r in ["mp_rank_00", "mp_rank_01"] {
        assert!(save.join(&it).join(r).join("model.safetensors").is_file(), "{r} of iteration {it}");
    }
}

/// ZeRO through the real path: glm-worker on two MPI ranks at stage 2
/// trains like stage 0, reports what each rank holds, writes one optimizer
/// shard per rank, resumes bitwise, and re-partitions its optimizer state
/// for one process (directly, and through `checkpoint merge`).
#[test]
fn zero_stage_two_under_mpirun_matches_stage_zero_and_reshards_on_resume() {
    let d = tempfile::tempdir().unwrap();
    let (s0, s2, same, one, merged_run) = (d.path().join("s0"), d.path().join("s2"), d.path().join("same"), d.path().join("one"), d.path().join("merged_run"));
    let cfg = ds(d.path(), "ds.json", 2, 4);
    let zero2 =
        ["zero_optimization.stage=2".to_string(), "zero_optimization.reduce_bucket_size=20000".into(), "zero_optimization.allgather_bucket_size=5000".into()];
    let sets = |extra: Vec<String>| -> Vec<String> { ["train_iters=4".to_string(), "eval_interval=0".into()].into_iter().chain(extra).collect() };
    ok(&run(d.path(), 2, &cfg, &sets(vec![format!("save={}", s0.display())])));
    let out = ok(&run(d.path(), 2, &cfg, &sets([zero2.to_vec(), vec!["save_interval=2".into(), format!("save={}", s2.display())]].concat())));
    assert!(out.contains("zero_optimization") && out.contains("stage 2 (optimizer state and gradients partitioned)"), "{out}");
    assert!(out.contains("memory: this rank (ZeRO stage 2, data-parallel 2)") && out.contains("memory: theory per rank"), "{out}");
    assert_close(&losses(&s0, "train"), &losses(&s2, "train"), 1e-6);
    let it2 = s2.join("2");
    for f in ["model.safetensors", "zero_dp_rank_00_optim.safetensors", "zero_dp_rank_01_optim.safetensors"] {
        assert!(it2.join(f).is_file(), "{f}");
    }
    assert!(!it2.join("optim.safetensors").exists());

    // same layout: bitwise
    ok(&run(d.path(), 2, &cfg, &sets([zero2.to_vec(), vec![format!("load={}", it2.display()), format!("save={}", same.display())]].concat())));
    let tail: Vec<_> = losses(&s2, "train").into_iter().filter(|(i, _)| *i > 2).collect();
    assert_eq!(tail, losses(&same, "train"), "stage 2 resumed with the same layout");
    assert!(std::fs::read(s2.join("4/model.safetensors")).unwrap() == std::fs::read(same.join("4/model.safetensors")).unwrap());

    // one process, stage 0: the shards are re-partitioned
    let ds1 = one_process_ds(d.path());
    let out = ok(&run(d.path(), 0, &ds1, &sets(vec![format!("load={}", it2.display()), format!("save={}", one.display())])));
    assert!(out.contains("optimizer state re-partitioned from data-parallel 2, ZeRO stage 2 to data-parallel 1, ZeRO stage 0"), "{out}");
    assert_close(&tail, &losses(&one, "train"), 1e-6);

    // inspect, then merge with the optimizer state and resume from that
    let worker = env!("CARGO_BIN_EXE_glm-worker");
    let cmd = |args: &[&str]| Command::new(worker).current_dir(repo()).args(args).output().unwrap();
    let report = ok(&cmd(&["checkpoint", "inspect", &it2.display().to_string()]));
    for want in ["iteration 2", "tensor-parallel 1 × data-parallel 2, ZeRO stage 2", "zero_dp_rank_01_optim.safetensors", "flat ranges", "complete: yes"] {
        assert!(report.contains(want), "{want}: {report}");
    }
    let merged = d.path().join("merged");
    let out = ok(&cmd(&["checkpoint", "merge", "--load", &it2.display().to_string(), "--out", &merged.display().to_string(), "--with-optimizer"]));
    assert!(out.contains("and the whole optimizer state"), "{out}");
    ok(&run(d.path(), 0, &ds1, &sets(vec![format!("load={}", merged.display()), format!("save={}", merged_run.display())])));
    assert_close(&tail, &losses(&merged_run, "train"), 1e-6);

    // a damaged shard: inspect says so and fails, and resuming refuses it
    let shard = it2.join("zero_dp_rank_01_optim.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 7]).unwrap();
    let o = cmd(&["checkpoint", "inspect", &it2.display().to_string()]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stdout).contains("complete: NO"), "{}", String::from_utf8_lossy(&o.stdout));
    let o = run(d.path(), 0, &ds1, &sets(vec![format!("load={}", it2.display())]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("zero_dp_rank_01_optim.safetensors") && err.contains("checksum mismatch"), "{err}");
}

/// The DeepSpeed config of one process with the global batch of `ds(…, 2, 4)` on two.
fn one_process_ds(dir: &Path) -> PathBuf {
    ds(dir, "ds_one.json", 4, 4)
}

/// A weighted mixture reads the same sequence at any data-parallel size: a
/// run on 2 ranks, resumed on one process (2 accumulation steps) from its
/// iteration-3 checkpoint, continues its losses and each corpus's samples.
#[test]
fn a_mixture_resumed_at_another_data_parallel_size_continues_the_sequence() {
    let d = tempfile::tempdir().unwrap();
    common::corpus_slice(&d.path().join("corpus.json"), 300);
    common::corpus_slice(&d.path().join("small.json"), 40);
    let (dp2, resumed) = (d.path().join("dp2"), d.path().join("resumed"));
    let micro4 = ds(d.path(), "micro4.json", 4, 8);
    let mix = format!("train_data=1 {} 3 {}", d.path().join("small.json").display(), d.path().join("corpus.json").display());
    let sets = |extra: &[String]| -> Vec<String> {
        [mix.clone(), "train_iters=6".into(), "save_interval=3".into(), "eval_batch_size=4".into()].into_iter().chain(extra.iter().cloned()).collect()
    };
    let out = ok(&run(d.path(), 2, &micro4, &sets(&[format!("save={}", dp2.display())])));
    assert!(out.contains("world 2 = tensor-parallel 1 × data-parallel 2") && out.contains("mixture of 2"), "{out}");
    let out = ok(&run(d.path(), 0, &micro4, &sets(&[format!("load={}", dp2.join("3").display()), format!("save={}", resumed.display())])));
    assert!(out.contains("(iteration 3)"), "{out}");
    let want: Vec<_> = losses(&dp2, "train").into_iter().filter(|(i, _)| *i > 3).collect();
    assert_eq!(want.len(), 3);
    assert_close(&want, &losses(&resumed, "train"), 1e-6);
    assert_close(&losses(&dp2, "eval").into_iter().filter(|(i, _)| *i > 3).collect::<Vec<_>>(), &losses(&resumed, "eval"), 1e-6);
    let used = |dir: &Path| -> Vec<String> {
        common::events(dir, "train").iter().filter(|e| e["iteration"].as_u64().unwrap() > 3).map(|e| e["corpora"].to_string()).collect()
    };
    assert_eq!(used(&dp2), used(&resumed));
    assert!(used(&resumed).last().unwrap().contains("\"samples\":12") && used(&resumed).last().unwrap().contains("\"samples\":36"), "{:?}", used(&resumed));
}
