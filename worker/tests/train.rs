//! Training end to end through `glm-worker`, on a small slice of the default
//! corpus with a tiny model: the loss falls, an interrupted-and-resumed run
//! equals the uninterrupted one bit for bit, corrupt checkpoints are refused,
//! generation runs from a checkpoint, and bad configs fail clearly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{events, ok, repo};

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    /// A temp dir with `corpus.json` (the first 600 records of the default
    /// corpus) and a DeepSpeed config.
    fn new() -> Run {
        let dir = tempfile::tempdir().unwrap();
        common::corpus_slice(&dir.path().join("corpus.json"), 600);
        std::fs::write(
            dir.path().join("ds.json"),
            r#"{"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
                "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}}}"#,
        )
        .unwrap();
        Run { dir }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn worker(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_glm-worker")).current_dir(repo()).env("OMP_NUM_THREADS", "1").args(args).output().unwrap()
    }

    /// Trains with the tiny test model; `sets` add or override keys.
    fn train(&self, sets: &[String]) -> Output {
        let run = ["hidden_dropout=0.1", "warmup=0.1"].map(String::from);
        let args = common::tiny_train_args(self.dir.path(), &self.p("ds.json"), &self.p("corpus.json"), 1500, &[&run[..], sets].concat());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.worker(&args)
    }
}

#[test]
fn short_run_learns_and_writes_its_outputs() {
    let r = Run::new();
    let save = r.p("run");
    let out = ok(&r.train(&["train_iters=60".into(), "eval_interval=30".into(), "save_interval=30".into(), format!("save={}", save.display())]));
    assert!(out.contains("effective configuration") && out.contains("(--set)"), "{out}");
    let evals = events(&save, "eval");
    assert_eq!(evals.iter().map(|e| e["iteration"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 30, 60]);
    let first = evals[0]["loss"].as_f64().unwrap();
    let last = evals[2]["loss"].as_f64().unwrap();
    assert!(last < first - 1.5, "validation loss {first} -> {last}");
    let baseline = events(&save, "baseline")[0]["unigram_loss"].as_f64().unwrap();
    assert!(first > baseline, "an untrained model is worse than unigram ({first} vs {baseline})");
    assert_eq!(events(&save, "train").len(), 60);
    for f in ["latest", "30/model.safetensors", "60/optim.safetensors", "60/state.json", "60/tokenizer.json", "loss.png"] {
        assert!(save.join(f).is_file(), "{f}");
    }
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "60");
    let png = std::fs::read(save.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    // generation from the saved checkpoint
    let g = ok(&r.worker(&["generate", "--load", &save.display().to_string(), "--text", "床前明月光，[MASK]是地上霜。", "--max-tokens", "8"]));
    assert!(g.contains("checkpoint:") && g.contains("blank 0:"), "{g}");
    let g = ok(&r.worker(&["generate", "--load", &save.join("30").display().to_string(), "--text", "举头望明月", "--top-k", "5", "--max-tokens", "4"]));
    assert!(g.contains("(iteration 30)"), "{g}");
    for (flag, value, want) in [
        ("--temperature", "0", "--temperature 0: must be positive and finite"),
        ("--top-p", "1.5", "--top-p 1.5: must be in [0, 1]"),
        ("--max-tokens", "0", "--max-tokens 0"),
    ] {
        let o = r.worker(&["generate", "--load", &save.display().to_string(), "--text", "举头望明月", flag, value]);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(want), "{flag}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn resumed_run_equals_the_uninterrupted_one() {
    let r = Run::new();
    let (a, b) = (r.p("a"), r.p("b"));
    let common = ["train_iters=10".to_string(), "eval_interval=0".into(), "save_interval=4".into()];
    let mut sa = common.to_vec();
    sa.push(format!("save={}", a.display()));
    ok(&r.train(&sa));
    // resume from iteration 4 of run a into a new directory
    std::fs::create_dir_all(&b).unwrap();
    let mut sb = common.to_vec();
    sb.push(format!("save={}", b.display()));
    sb.push(format!("load={}", a.join("4").display()));
    let out = ok(&r.train(&sb));
    assert!(out.contains("resumed from") && out.contains("(iteration 4)"), "{out}");
    // a resume may change what only trains (dropout), not the model's shape, which is named
    let c = r.p("c");
    let mut sc = common.to_vec();
    sc.extend([format!("save={}", c.display()), format!("load={}", a.join("4").display()), "hidden_dropout=0.2".into(), "train_iters=5".into()]);
    ok(&r.train(&sc));
    let mut sd = common.to_vec();
    sd.extend([format!("load={}", a.join("4").display()), "intermediate_size=128".into()]);
    let o = r.train(&sd);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("the checkpoint's model differs from this run's: intermediate_size 256 in the checkpoint, 128 in this run"),
        "{e}"
    );
    let la: Vec<String> = events(&a, "train").iter().filter(|e| e["iteration"].as_u64().unwrap() > 4).map(|e| e["loss"].to_string()).collect();
    let lb: Vec<String> = events(&b, "train").iter().map(|e| e["loss"].to_string()).collect();
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "loss sequence after resuming");
    let wa = std::fs::read(a.join("10/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("10/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ");
}

/// The learning rate follows the original's AnnealingLR as its train_step
/// steps it: the first update runs at the schedule's start (lr 0 in
/// warmup), the warmup is warmup × lr_decay_iters updates (not rounded);
/// `no_load_lr_scheduler` restarts the schedule on resume, warmup included.
#[test]
fn the_learning_rate_schedule_steps_as_the_original() {
    let r = Run::new();
    let a = r.p("a");
    // warmup 0.25 of 10 = 2.5 updates, then cosine to 0.05 × lr over 7.5
    let sets = |extra: &[String]| -> Vec<String> {
        ["train_iters=6", "lr_decay_iters=10", "warmup=0.25", "lr_decay_style=cosine", "lr_decay_ratio=0.05", "eval_interval=0", "save_interval=3"]
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().cloned())
            .collect()
    };
    ok(&r.train(&sets(&[format!("save={}", a.display())])));
    let lrs = |dir: &Path| -> Vec<f64> { events(dir, "train").iter().map(|e| e["lr"].as_f64().unwrap()).collect() };
    let base = 0.003; // the DeepSpeed file's optimizer lr
    let cosine = |n: f64| base * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * (n - 2.5) / 7.5).cos()));
    let want = [0.0, base / 2.5, 2.0 * base / 2.5, cosine(3.0), cosine(4.0), cosine(5.0)];
    let got = lrs(&a);
    assert_eq!(got.len(), 6, "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-12 * base.max(1.0), "{got:?} != {want:?}");
    }
    // resumed at 3 with no_load_lr_scheduler: a fresh schedule from iteration 4
    let b = r.p("b");
    let out = ok(&r.train(&sets(&[format!("save={}", b.display()), format!("load={}", a.join("3").display()), "no_load_lr_scheduler=true".into()])));
    assert!(out.contains("no_load_lr_scheduler: the learning-rate schedule starts again (warmup included) at iteration 4"), "{out}");
    let got = lrs(&b);
    assert_eq!(got.len(), 3, "{got:?}");
    for (g, w) in got.iter().zip(&want[..3]) {
        assert!((g - w).abs() <= 1e-12, "{got:?}");
    }
    // the resumed run's checkpoints continue its restarted schedule
    let e = r.p("e");
    let mut more = sets(&[format!("save={}", e.display()), format!("load={}", b.join("6").display())]);
    more.push("train_iters=8".into());
    ok(&r.train(&more));
    let got = lrs(&e);
    assert_eq!(got.len(), 2, "{got:?}");
    for (g, w) in got.iter().zip(&want[3..5]) {
        assert!((g - w).abs() <= 1e-12, "{got:?} != {:?}", &want[3..5]);
    }
    // and without it the schedule continues
    let c = r.p("c");
    ok(&r.train(&sets(&[format!("save={}", c.display()), format!("load={}", a.join("3").display())])));
    assert_eq!(lrs(&c), lrs(&a)[3..].to_vec());
}

/// A finished run in a save directory is never replaced by accident: a
/// fresh run into it is refused (nothing touched) until `overwrite=true`;
/// two runs never write one directory at once; an empty `save` is an error.
#[test]
fn a_used_save_directory_is_never_replaced_by_accident() {
    let r = Run::new();
    let save = r.p("run");
    let base = ["train_iters=4".to_string(), "eval_interval=0".into(), "save_interval=2".into(), format!("save={}", save.display())];
    ok(&r.train(&base));
    let metrics = std::fs::read_to_string(save.join("metrics.jsonl")).unwrap();
    let o = r.train(&base);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a fresh run into a used save directory");
    assert!(
        err.contains(&format!("{}: already holds the checkpoints of a run (latest: iteration 4)", save.display())) && err.contains("--set overwrite=true"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(save.join("metrics.jsonl")).unwrap(), metrics, "metrics untouched");
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "4");
    // resuming it is fine
    let mut more = base.to_vec();
    more[0] = "train_iters=6".into();
    more.push(format!("load={}", save.display()));
    ok(&r.train(&more));
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "6");
    // overwrite=true starts over
    let mut over = base.to_vec();
    over.push("overwrite=true".into());
    let out = ok(&r.train(&over));
    assert!(out.contains("overwrite: removing the earlier run in"), "{out}");
    assert_eq!(std::fs::read_to_string(save.join("latest")).unwrap().trim(), "4");
    assert!(!save.join("6").exists(), "the earlier run's checkpoints are gone");

    // one run at a time: a second run into the directory of a running one is refused, naming it
    let long = ["train_iters=100000".to_string(), "eval_interval=0".into(), "save_interval=0".into(), format!("save={}", r.p("busy").display())];
    let args = common::tiny_train_args(r.dir.path(), &r.p("ds.json"), &r.p("corpus.json"), 1500, &long);
    let mut first = Command::new(env!("CARGO_BIN_EXE_glm-worker"))
        .current_dir(repo())
        .env("OMP_NUM_THREADS", "1")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !std::fs::read_to_string(r.p("busy/.lock")).unwrap_or_default().contains("pid ") {
        assert!(t0.elapsed().as_secs() < 120, "the first run never took its save directory");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let o = r.train(&long);
    let _ = first.kill();
    let _ = first.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("in use by another run (pid ") && err.contains(&format!("pid {} on", first.id())), "{err}");

    let o = r.train(&["train_iters=1".into(), "save=".into()]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("save = \"\" (--set): an empty path; name a directory, or null for no checkpoints"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `glm-worker eval` of a run's checkpoint: its "mixed" line is the run's
/// own validation at that iteration; per-mode lines; the test split; the
/// same numbers on two MPI ranks; clear errors for bad arguments.
#[test]
fn eval_reproduces_the_runs_validation_per_mode() {
    let r = Run::new();
    let save = r.p("run");
    ok(&r.train(&["train_iters=20".into(), "eval_interval=20".into(), "save_interval=20".into(), format!("save={}", save.display())]));
    let logged = events(&save, "eval").last().unwrap()["loss"].as_f64().unwrap();
    let store = r.dir.path().join("store").display().to_string();
    let loads = save.display().to_string();
    let eval = |extra: &[&str]| {
        let mut a = vec!["eval", "--load", &loads, "--store", &store, "--device", "cpu"];
        a.extend_from_slice(extra);
        ok(&r.worker(&a))
    };
    let line = |out: &str, mode: &str| -> Vec<f64> {
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(mode))
            .unwrap_or_else(|| panic!("no {mode} line: {out}"))
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap())
            .collect()
    };
    let out = eval(&[]);
    assert!(out.contains("(iteration 20), valid split"), "{out}");
    let mixed = line(&out, "mixed");
    assert!((mixed[0] - logged).abs() < 1e-4, "eval's mixed loss {} is the run's validation loss {logged}", mixed[0]);
    for mode in ["span", "sentence", "generation"] {
        let v = line(&out, mode);
        assert!(v[0] > 0.0 && (v[1] - v[0].exp()).abs() / v[1] < 1e-3 && (0.0..=1.0).contains(&v[2]) && v[3] > 0.0, "{mode}: {v:?}");
    }
    let test = eval(&["--split", "test", "--iters", "2"]);
    assert!(test.contains("test split: 1 documents, 2 batch(es)"), "{test}");
    // two ranks share the batches out and report the same numbers
    let o = common::mpirun(2)
        .current_dir(repo())
        .arg(env!("CARGO_BIN_EXE_glm-worker"))
        .args(["eval", "--load", &loads, "--store", &store, "--device", "cpu"])
        .output()
        .unwrap();
    let two = ok(&o);
    assert!(two.contains("shared over 2 ranks"), "{two}");
    for mode in ["mixed", "span", "sentence", "generation"] {
        let (a, b) = (line(&out, mode), line(&two, mode));
        assert!((a[0] - b[0]).abs() < 1e-4 && a[3] == b[3], "{mode}: one rank {a:?}, two ranks {b:?}");
    }
    // another corpus pointed at the run's own store: refused, the store kept
    // (re-tokenizing would replace a training run's store behind its back)
    let docs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(repo().join("glm_pretrain/data/data.json")).unwrap()).unwrap();
    let other = r.p("other.json");
    std::fs::write(&other, serde_json::to_string(&docs[docs.len() - 60..]).unwrap()).unwrap();
    let other = other.display().to_string();
    let meta = std::fs::read(r.dir.path().join("store/meta.json")).unwrap();
    let o = r.worker(&["eval", "--load", &loads, "--store", &store, "--data", &other, "--device", "cpu", "--iters", "1"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("this token store does not match what eval needs: it was built from another corpus"), "{e}");
    assert!(e.contains("give it a store of its own (--store <new dir>), or --rebuild to replace this one"), "{e}");
    assert_eq!(std::fs::read(r.dir.path().join("store/meta.json")).unwrap(), meta, "the run's store untouched");
    // a store of its own, or --rebuild, evaluates it
    let own = r.p("other-store").display().to_string();
    let out = ok(&r.worker(&["eval", "--load", &loads, "--store", &own, "--data", &other, "--device", "cpu", "--iters", "1"]));
    assert!(out.contains("valid split"), "{out}");
    let out = ok(&r.worker(&["eval", "--load", &loads, "--store", &store, "--data", &other, "--device", "cpu", "--iters", "1", "--rebuild"]));
    assert!(out.contains("valid split"), "{out}");
    for (args, want) in [(vec!["--split", "train"], "--split train: expected valid or test"), (vec!["--iters", "0"], "--iters 0: must be positive")] {
        let mut a = vec!["eval", "--load", &loads, "--store", &store];
        a.extend(args);
        let o = r.worker(&a);
        assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains(want), "{want}: {}", String::from_utf8_lossy(&o.stderr));
    }
}

/// Ctrl-C while the data is prepared (here: while the token store is being
/// built) stops the run at once, with a message, no checkpoint and no store.
#[test]
fn a_signal_during_preparation_stops_at_once() {
    let r = Run::new();
    // a corpus large enough that preparing it takes several seconds
    let docs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(repo().join("glm_pretrain/data/data.json")).unwrap()).unwrap();
    let big: Vec<&serde_json::Value> = docs.iter().cycle().take(docs.len() * 8).collect();
    std::fs::write(r.p("big.json"), serde_json::to_string(&big).unwrap()).unwrap();
    let save = r.p("run");
    let args = common::tiny_train_args(r.dir.path(), &r.p("ds.json"), &r.p("big.json"), 16000, &["train_iters=5".into(), format!("save={}", save.display())]);
    // the signal lands while the token store is being built: its work directory exists
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm-worker"));
    cmd.current_dir(repo()).args(&args);
    let (o, took) = interrupt_when(cmd, || has_entry(r.dir.path(), ".store.partial"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(took.as_secs_f64() < 5.0, "stopped after {took:?}");
    assert!(err.contains("interrupted (SIGINT) before training: stopped; nothing was trained or saved"), "{err}");
    assert!(!save.join("latest").exists(), "no checkpoint of an iteration that never trained");
    assert!(!r.p("store").join("meta.json").exists(), "the store it had not finished was not installed");

    // `prepare` too: a message, exit 130, and no store; once it reports the
    // corpus, its handler is in place and preparation under way
    let out = r.p("store-by-prepare");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_glm-worker"));
    cmd.args(["prepare", "--data", &r.p("big.json").display().to_string(), "--out", &out.display().to_string()]).args([
        "--tokenizer-cache",
        &r.p("cache").display().to_string(),
        "--vocab-size",
        "16000",
    ]);
    let (o, took) = interrupt_when(cmd, || has_entry(r.dir.path(), ".store-by-prepare.partial"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(took.as_secs_f64() < 5.0, "stopped after {took:?}");
    assert!(err.contains("interrupted (SIGINT): prepare stopped; a store it had not finished was not installed"), "{err}");
    assert!(!out.exists(), "no store");
}

/// Whether `dir` holds an entry whose name starts with `prefix`.
fn has_entry(dir: &std::path::Path, prefix: &str) -> bool {
    std::fs::read_dir(dir).map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with(prefix))).unwrap_or(false)
}

/// Starts `cmd` (one intra-op thread), waits until `ready()` says the phase
/// to interrupt is under way (it fails if the process ends first), sends
/// SIGINT; its output and how long it took to stop after the signal.
fn interrupt_when(mut cmd: Command, ready: impl Fn() -> bool) -> (std::process::Output, std::time::Duration) {
    let mut child = cmd.env("OMP_NUM_THREADS", "1").stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // polls an event (a file appearing), no fixed delay; the deadline only
    // turns a hang into a failure
    let t0 = std::time::Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the process ended ({status}) before the phase to interrupt began: {:?}", child.wait_with_output().unwrap());
        }
        assert!(t0.elapsed().as_secs() < 300, "the phase to interrupt never began");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t0 = std::time::Instant::now();
    // SAFETY: our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    (o, t0.elapsed())
}

/// As in GLM's pretraining, the residual dropouts use hidden_dropout:
/// output_dropout (classification heads only) changes nothing, and says so.
#[test]
fn residual_dropout_is_hidden_dropout_as_in_glm() {
    let r = Run::new();
    let losses = |name: &str, extra: &str| {
        let save = r.p(name);
        let out = ok(&r.train(&["train_iters=3".into(), "eval_interval=0".into(), extra.into(), format!("save={}", save.display())]));
        (events(&save, "train").iter().map(|e| e["loss"].to_string()).collect::<Vec<_>>(), out)
    };
    let (a, _) = losses("a", "output_dropout=0.1");
    let (b, out) = losses("b", "output_dropout=0.5");
    assert_eq!(a, b, "output_dropout must not change pretraining");
    assert!(out.contains("warning: output_dropout = 0.5 (--set) has no effect in pretraining"), "{out}");
    let (c, _) = losses("c", "hidden_dropout=0.5");
    assert_ne!(a, c, "hidden_dropout drives the residual dropouts");
}

#[test]
fn corrupt_checkpoints_are_refused() {
    let r = Run::new();
    let save = r.p("run");
    ok(&r.train(&["train_iters=2".into(), "eval_interval=0".into(), format!("save={}", save.display())]));
    let model = save.join("2/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() - 100]).unwrap();
    let o = r.worker(&["generate", "--load", &save.display().to_string(), "--text", "明月"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("model.safetensors: checksum mismatch"), "{err}");
    let o = r.train(&["train_iters=4".into(), format!("load={}", save.display())]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("checksum mismatch"));

    std::fs::write(save.join("latest"), "two\n").unwrap();
    let o = r.worker(&["generate", "--load", &save.display().to_string(), "--text", "明月"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("latest:1:1: expected an iteration number"), "{}", String::from_utf8_lossy(&o.stderr));
    let state = save.join("2/state.json");
    std::fs::write(&state, "{\"format_version\": 1,").unwrap();
    let o = r.worker(&["generate", "--load", &save.join("2").display().to_string(), "--text", "明月"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("corrupt checkpoint state"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn seed_configs_load_and_bad_configs_fail_clearly() {
    let r = Run::new();
    let seed = repo().join("configs");
    for ds in ["config_block_base.json", "config_block_large.json", "config_block_large_chinese.json"] {
        let o = r.worker(&["--config", &seed.join(ds).display().to_string(), "--args", "configs/configs.json", "--set", "train_iters=0"]);
        let out = ok(&o);
        assert!(out.contains("configuration is valid") && out.contains("precision") && out.contains("fp16 (fp32 master weights"), "{out}");
    }
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--set", "transformer_xl=true"], "transformer_xl = true (--set): not supported"),
        (vec!["--set", "hiden_size=3"], "did you mean \"hidden_size\""),
        (vec!["--set", "seq_length=1024"], "seq_length 1024 (--set) exceeds max_position_embeddings 256"),
        (vec!["--set", "num_attention_heads=3"], "hidden_size 256 is not divisible by num_attention_heads 3"),
        (vec!["--set", "lr_decay_style=exponential"], "lr_decay_style"),
        (vec!["--set", "model_parallel_size=2"], "world size 1 is not a multiple of model_parallel_size 2"),
        // a training-time hint names training's option, not prepare's --tokenizer
        (
            vec!["--set", "tokenizer_path=/nonexistent/vocab.txt", "--set", "save=null"],
            "/nonexistent/vocab.txt: tokenizer: no such file or folder; hint: point tokenizer_path at a BERT vocab.txt (or the folder holding it) or a tokenizer.json that exists, or --set tokenizer_path=null",
        ),
    ];
    for (extra, want) in cases {
        let mut args = vec!["--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json"];
        args.extend(extra);
        args.extend(["--set", "train_iters=1", "--device", "cpu", "--store", "/nonexistent/store"]);
        let o = r.worker(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{want}: {err}");
        assert!(err.lines().count() == 1 && err.contains(want), "want {want:?}: {err}");
    }
    // every source of a learning rate, and the optimizer's other numbers, have ranges
    let plain = r.p("plain.json");
    std::fs::write(&plain, r#"{"train_micro_batch_size_per_gpu": 2}"#).unwrap();
    let sched = r.p("sched.json");
    std::fs::write(&sched, r#"{"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.001}}}"#).unwrap();
    let (plain, sched) = (plain.display().to_string(), sched.display().to_string());
    let cases: Vec<(&str, &str, &str)> = vec![
        (&plain, "lr=-0.1", "lr = -0.1 (--set): must be >= 0"),
        ("configs/config_block_tiny.json", "optimizer.params.lr=-0.1", "optimizer.params.lr: must be >= 0"),
        (&sched, "scheduler.params.warmup_max_lr=-1", "scheduler.params.warmup_max_lr: must be positive and >= warmup_min_lr"),
        (&sched, "scheduler.params.warmup_min_lr=-1", "scheduler.params.warmup_min_lr: must be >= 0"),
        (&plain, "lr_decay_ratio=-0.5", "lr_decay_ratio = -0.5 (--set): must be in [0, 1]"),
        (&plain, "warmup=-0.1", "warmup = -0.1 (--set): a fraction in [0, 1]"),
        (&plain, "adam_eps=0", "adam_eps = 0 (--set): must be positive"),
        ("configs/config_block_tiny.json", "optimizer.params.eps=0", "optimizer.params.eps: must be positive"),
        (&plain, "adam_beta2=1.5", "adam_beta2 = 1.5 (--set): must be in [0, 1)"),
        (&plain, "eval_batch_size=0", "eval_batch_size = 0 (--set): must be positive"),
        (&plain, "eval_iters=0", "eval_iters = 0 (--set): must be positive when eval_interval"),
        // train_iters=0 ("configuration is valid") checks what a training start would
        (&plain, "num_attention_heads=3", "hidden_size 256 is not divisible by num_attention_heads 3"),
        (&plain, "num_layers=0", "hidden_size, num_layers and num_attention_heads must be positive"),
        (&plain, "model_parallel_size=2", "world size 1 is not a multiple of model_parallel_size 2"),
    ];
    for (ds, set, want) in cases {
        let o = r.worker(&["--config", ds, "--args", "configs/configs_tiny.json", "--set", set, "--set", "train_iters=0"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{set}: {err}");
        assert!(err.contains(want), "{set}: want {want:?}: {err}");
    }
    // a model whose parameters, gradients and optimizer state alone exceed
    // this machine's memory is refused before anything is allocated
    let o = r.worker(&[
        "--config", &plain, "--args", "configs/configs_tiny.json", "--set", "hidden_size=8192", "--set", "num_attention_heads=64", "--set", "num_layers=4000",
        "--set", "train_iters=0", "--device", "cpu",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the model does not fit: its parameters, gradients and optimizer state need about") && err.contains("HINT: a smaller model"), "{err}");
    // an explicit --set of a key the DeepSpeed file also sets wins, and says so
    let out = ok(&r.worker(&[
        "--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--set", "lr=0.01", "--set", "batch_size=3", "--set",
        "train_iters=0",
    ]));
    assert!(out.contains("= 0.01  (--set, over config_block_tiny.json)"), "{out}");
    assert!(
        out.contains(
            "warning: --set batch_size=3 has no effect: its batch sizes decide the micro-batch in config_block_tiny.json (to change it there: --set train_micro_batch_size_per_gpu=3)"
        ),
        "{out}"
    );
    // the keys without effect: one line with their count, listed on request
    let line = out.lines().find(|l| l.contains("no effect here")).unwrap_or_default();
    assert!(
        line.contains("keys (") && line.contains("in configs_tiny.json") && line.contains("1 in config_block_tiny.json") && line.contains("--show-ignored"),
        "{line}"
    );
    let out = ok(&r.worker(&["--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--show-ignored", "--set", "train_iters=0"]));
    assert!(
        out.contains("no effect here (config_block_tiny.json): wall_clock_breakdown") && out.contains("no effect here (configs_tiny.json): DDP_impl"),
        "{out}"
    );
    let o = r.worker(&["--config", &plain, "--args", "configs/configs_tiny.json", "--device", "cuda", "--set", "train_iters=0"]);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).to_lowercase().contains("cuda"),
        "--device cuda without a GPU: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let bad = r.p("bad.json");
    std::fs::write(&bad, r#"{"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}"#).unwrap();
    let o = r.worker(&["--config", &bad.display().to_string(), "--args", "configs/configs_tiny.json", "--set", "train_iters=0"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.json: train_batch_size 30 != train_micro_batch_size_per_gpu 4"));
}

/// valid_data validates from a store of its own beside the training store
/// and takes split's valid share; save_splits writes the original's index
/// order (numpy's RandomState(1234) permutation), load_splits reads an order
/// back and save_test_data writes the test split it gives; test_data is what
/// `eval --split test` evaluates.
#[test]
fn valid_and_test_data_and_the_split_files() {
    use glm_worker::data::split::{load_npy, numpy_permutation, save_npy};
    let r = Run::new();
    // 40 other records of the default corpus
    let all: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(repo().join("glm_pretrain/data/data.json")).unwrap()).unwrap();
    std::fs::write(r.p("valid.json"), serde_json::to_string(&all[600..640]).unwrap()).unwrap();
    let (valid, save) = (r.p("valid.json").display().to_string(), r.p("run"));
    let sets = |extra: &[String]| -> Vec<String> { [&["train_iters=2".to_string(), "eval_interval=2".into()][..], extra].concat() };
    let out = ok(&r.train(&sets(&[
        format!("valid_data={valid}"),
        format!("save_splits={}", r.p("splits").display()),
        format!("save_test_data={}", r.p("test1.txt").display()),
        format!("save={}", save.display()),
    ])));
    let store = r.p("store").display().to_string();
    assert!(out.contains(&format!("data: built valid_data store {store}-valid from {valid} (40 documents")), "{out}");
    assert!(out.contains(&format!("data: valid_data: 40 documents validate ({store}-valid)")), "{out}");
    assert!(out.contains("data: split 949,50,1: train 599 documents, valid 0 documents (valid_data validates), test 1 documents"), "{out}");
    assert_eq!(events(&save, "eval").len(), 2, "validation at iterations 0 and 2");
    assert!(out.contains(&format!("data: save_splits: the split's index order (600 documents) written to {}", r.p("splits.npy").display())), "{out}");
    assert_eq!(load_npy(&r.p("splits.npy"), 600, "load_splits").unwrap(), numpy_permutation(600, 1234).unwrap());
    let test1 = std::fs::read_to_string(r.p("test1.txt")).unwrap();
    assert!(test1.lines().count() == 1 && test1.trim().chars().count() > 2, "{test1:?}");
    // eval of the run: valid_data whole, the test split of train_data
    let loads = save.display().to_string();
    let e = ok(&r.worker(&["eval", "--load", &loads, "--store", &store, "--device", "cpu", "--iters", "1"]));
    assert!(e.contains("valid split: 40 documents"), "{e}");
    let e = ok(&r.worker(&["eval", "--load", &loads, "--store", &store, "--device", "cpu", "--iters", "1", "--split", "test"]));
    assert!(e.contains("test split: 1 documents"), "{e}");
    // the saved order read back gives the same test split; another order another
    ok(&r.train(&sets(&[format!("load_splits={}", r.p("splits.npy").display()), format!("save_test_data={}", r.p("test2.txt").display())])));
    assert_eq!(std::fs::read_to_string(r.p("test2.txt")).unwrap(), test1);
    let identity: Vec<u32> = (0..600).collect();
    save_npy(&r.p("identity.npy"), &identity).unwrap();
    ok(&r.train(&sets(&[format!("load_splits={}", r.p("identity.npy").display()), format!("save_test_data={}", r.p("test3.txt").display())])));
    assert_ne!(std::fs::read_to_string(r.p("test3.txt")).unwrap(), test1, "document 599 is not the permutation's last");
    let o = r.train(&sets(&[format!("load_splits={}", r.p("test1.txt").display())]));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("test1.txt: load_splits: not a numpy .npy file"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // test_data: its share is zero, and eval --split test evaluates it from <store>-test
    let save2 = r.p("run2");
    let out = ok(&r.train(&sets(&[format!("test_data={valid}"), format!("save={}", save2.display())])));
    assert!(out.contains("test 0 documents (test_data is the test set: glm-worker eval --split test)"), "{out}");
    let e = ok(&r.worker(&["eval", "--load", &save2.display().to_string(), "--store", &store, "--device", "cpu", "--iters", "1", "--split", "test"]));
    assert!(e.contains("test split: 40 documents"), "{e}");
    assert!(r.p("store-test").join("meta.json").is_file());
}

/// A weighted mixture (Megatron's `--data-path 2 a 3 b`): each corpus gets
/// a store of its own, samples follow the weights exactly (Megatron's
/// blending rule), metrics report samples, tokens and epochs per corpus,
/// validation each corpus and the weighted mix, a resume continues the same
/// sequence bit for bit, and bad weights are one-line errors naming the entry.
#[test]
fn a_weighted_mixture_draws_by_weight_reports_each_corpus_and_resumes_exactly() {
    let r = Run::new();
    // a small corpus (a few epochs in this run) and the 600-record one
    common::corpus_slice(&r.p("a.json"), 8);
    let mix = format!("train_data=[2, \"{}\", 3, \"{}\"]", r.p("a.json").display(), r.p("corpus.json").display());
    let (a, b) = (r.p("mix-a"), r.p("mix-b"));
    let common = [mix.clone(), "train_iters=10".into(), "eval_interval=5".into(), "save_interval=4".into(), format!("summary_dir={}", r.p("tb").display())];
    let out = ok(&r.train(&[&common[..], &[format!("save={}", a.display())]].concat()));
    assert!(out.contains("mixture of 2: 2 ") && out.contains("(\"a\", 40.0%)") && out.contains("(\"corpus\", 60.0%)"), "{out}");
    assert!(out.contains("data: built store of a (40.0%)") && out.contains("data: built store of corpus (60.0%)"), "{out}");
    assert!(r.p("store-mix1-a/meta.json").is_file() && r.p("store-mix2-corpus/meta.json").is_file());
    // 10 iterations of 8 samples: exactly 32 and 48
    let train = events(&a, "train");
    let last = &train.last().unwrap()["corpora"];
    assert_eq!((last[0]["name"].as_str(), last[0]["samples"].as_u64(), last[0]["tokens"].as_u64()), (Some("a"), Some(32), Some(32 * 64)));
    assert_eq!((last[1]["name"].as_str(), last[1]["samples"].as_u64()), (Some("corpus"), Some(48)));
    let epochs = last[0]["epochs"].as_f64().unwrap();
    assert!(epochs > 1.0, "the small corpus should pass an epoch in this run ({epochs})");
    assert!(out.contains("data: a begins epoch 2 at iteration"), "{out}");
    assert!(out.contains("| epochs a "), "{out}");
    // validation: each corpus, and the mix as their weighted mean
    let evals = events(&a, "eval");
    assert_eq!(evals.iter().map(|e| e["iteration"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 5, 10]);
    for e in &evals {
        let c = e["corpora"].as_array().unwrap();
        assert_eq!(c.iter().map(|c| c["name"].as_str().unwrap()).collect::<Vec<_>>(), vec!["a", "corpus"]);
        let mean = c.iter().map(|c| c["weight"].as_f64().unwrap() * c["loss"].as_f64().unwrap()).sum::<f64>();
        assert!((mean - e["loss"].as_f64().unwrap()).abs() < 1e-9, "{e}");
    }
    assert!(out.contains("validation at iteration 5 | a (40.0%) | loss"), "{out}");
    // a resume continues the same sequence, bit for bit
    let resumed = ok(&r.train(&[&common[..], &[format!("save={}", b.display()), format!("load={}", a.join("4").display())]].concat()));
    assert!(resumed.contains("data: store of a (40.0%)"), "the stores are reused: {resumed}");
    let after = |d: &Path, kind: &str, keys: &[&str]| -> Vec<String> {
        let picked = |e: &serde_json::Value| keys.iter().map(|k| e[*k].to_string()).collect::<Vec<_>>().join(" ");
        events(d, kind).iter().filter(|e| e["iteration"].as_u64().unwrap() > 4).map(picked).collect()
    };
    let la = after(&a, "train", &["iteration", "loss", "grad_norm", "corpora"]);
    assert_eq!(la.len(), 6);
    assert_eq!(la, after(&b, "train", &["iteration", "loss", "grad_norm", "corpora"]), "the sequence after resuming");
    assert_eq!(after(&a, "eval", &["iteration", "loss", "corpora"]), after(&b, "eval", &["iteration", "loss", "corpora"]));
    assert!(std::fs::read(a.join("10/model.safetensors")).unwrap() == std::fs::read(b.join("10/model.safetensors")).unwrap(), "final weights differ");
    // TensorBoard has each corpus's samples, tokens, epochs and validation, once a step
    let tb = tensorboard_events(&r.p("tb/runs/glm-tiny"));
    let series = |tag: &str| -> Vec<(u64, f64)> {
        tb["scalars"][tag].as_array().unwrap_or_else(|| panic!("no {tag}")).iter().map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap())).collect()
    };
    assert_eq!(series("Train/samples/a").last(), Some(&(10, 32.0)));
    assert_eq!(series("Train/samples/corpus").iter().map(|p| p.0).collect::<Vec<_>>(), (1..=10).collect::<Vec<u64>>());
    let at10 = &evals.last().unwrap()["corpora"][1];
    assert_eq!(series("Train/valid_loss/corpus").last(), Some(&(10, at10["loss"].as_f64().unwrap() as f32 as f64)));
    // glm-worker eval of the checkpoint: each corpus, and the mix the run logged
    let store = r.p("store").display().to_string();
    let e = ok(&r.worker(&["eval", "--load", &a.display().to_string(), "--store", &store, "--device", "cpu"]));
    assert!(
        e.contains("the mixture (each figure the weighted mean") && e.contains("a (40.0% of the mixture;") && e.contains("corpus (60.0% of the mixture;"),
        "{e}"
    );
    let mixed: f64 = e.lines().find(|l| l.starts_with("mixed")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let logged = evals.last().unwrap()["loss"].as_f64().unwrap();
    assert!((mixed - logged).abs() < 1e-4, "eval's mix {mixed} is the run's validation loss {logged}");

    // bad mixtures: one line naming the entry, before anything is built
    let (ap, cp) = (r.p("a.json").display().to_string(), r.p("corpus.json").display().to_string());
    for (set, want) in [
        (format!("train_data=[0, \"{ap}\", 1, \"{cp}\"]"), format!("weight 0 of \"{ap}\" (entry 1): a zero weight")),
        (format!("train_data=[-1, \"{ap}\", 1, \"{cp}\"]"), format!("weight -1 of \"{ap}\" (entry 1): weights must be positive")),
        (format!("train_data=[1, \"{ap}\", \"x\", \"{cp}\"]"), "\"x\" (entry 3) stands where a weight should".into()),
        (format!("train_data=1 {ap} 2"), "weight 2 (entry 3) names no corpus".into()),
        (
            format!("train_data=[1, \"{ap}\", 1, \"{}\"]", r.p("missing.json").display()),
            format!("{}: train_data: no such file or folder", r.p("missing.json").display()),
        ),
        (format!("train_data=[1, \"{ap}\", 1, \"{cp}\"]"), "save_splits (--set): train_data is a mixture".into()),
    ] {
        let extra = if want.starts_with("save_splits") { vec![set.clone(), format!("save_splits={}", r.p("s").display())] } else { vec![set.clone()] };
        let o = r.train(&[&extra[..], &["train_iters=1".to_string()]].concat());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(&want), "{set}: {e}");
        assert_eq!(e.trim().lines().count(), 1, "{set}: {e}");
    }
}

/// The TensorBoard events of `dir`, as the tensorboard package reads them.
fn tensorboard_events(dir: &Path) -> serde_json::Value {
    let python = repo().join(".venv/bin/python");
    let o =
        Command::new(&python).arg(repo().join("worker/tests/tensorboard_reader.py")).arg(dir).output().unwrap_or_else(|e| panic!("{}: {e}", python.display()));
    assert!(o.status.success(), "tensorboard_reader.py failed (scripts/setup.sh --test installs tensorboard):\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// summary_dir (the original's tags against the iteration) and DeepSpeed's
/// tensorboard block (Train/Samples/... against samples) hold the scalars of
/// metrics.jsonl, MFU included, and the configuration as text; a resumed run
/// appends to the same directories without duplicate steps.
#[test]
fn tensorboard_holds_the_metrics_and_a_resume_appends_without_duplicates() {
    let r = Run::new();
    let (a, b, tb, ds_tb) = (r.p("a"), r.p("b"), r.p("summary"), r.p("ds-tb"));
    let common = [
        "train_iters=10".to_string(),
        "eval_interval=5".into(),
        "save_interval=4".into(),
        format!("summary_dir={}", tb.display()),
        "tensorboard.enabled=true".into(),
        format!("tensorboard.output_path={}", ds_tb.display()),
        "tensorboard.job_name=job".into(),
    ];
    let out = ok(&r.train(&[&common[..], &[format!("save={}", a.display())]].concat()));
    let glm_dir = tb.join("runs/glm-tiny");
    assert!(out.contains(&format!("tensorboard: events in {}", glm_dir.display())) && out.contains("mfu: model FLOPs"), "{out}");
    assert!(out.contains("| MFU "), "{out}");
    // iteration 8 ran in run a, then a resume from its iteration-4 checkpoint (into another save)
    let resumed = ok(&r.train(&[&common[..], &[format!("save={}", b.display()), format!("load={}", a.join("4").display())]].concat()));
    assert!(resumed.contains("(iteration 4)"), "{resumed}");
    let train: Vec<serde_json::Value> = events(&a, "train").into_iter().filter(|e| e["iteration"].as_u64().unwrap() <= 4).chain(events(&b, "train")).collect();
    let evals: Vec<serde_json::Value> = events(&a, "eval").into_iter().filter(|e| e["iteration"].as_u64().unwrap() <= 4).chain(events(&b, "eval")).collect();
    assert_eq!(train.len(), 10);
    let glm = tensorboard_events(&glm_dir);
    let ds = tensorboard_events(&ds_tb.join("job"));
    for (got, prefix, per) in [(&glm, "Train/", 1u64), (&ds, "Train/Samples/", 8)] {
        let series = |name: &str| -> Vec<(u64, f64)> {
            got["scalars"][format!("{prefix}{name}")]
                .as_array()
                .unwrap_or_else(|| panic!("no {prefix}{name} in {}", got["scalars"].as_object().unwrap().keys().cloned().collect::<Vec<_>>().join(", ")))
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        };
        // each metric of every train event once, at its step, as float32
        for (name, key) in [
            ("train_loss", "loss"),
            ("lr", "lr"),
            ("elapsed_time", "ms_per_iter"),
            ("grad_norm", "grad_norm"),
            ("tokens_per_s", "tokens_per_s"),
            ("tflops", "tflops"),
            ("mfu", "mfu"),
            ("mem_mb", "mem_mb"),
        ] {
            let want: Vec<(u64, f64)> = train.iter().map(|e| (e["iteration"].as_u64().unwrap() * per, e[key].as_f64().unwrap() as f32 as f64)).collect();
            assert_eq!(series(name), want, "{prefix}{name}");
        }
        let epochs: Vec<(u64, f64)> =
            train.iter().map(|e| (e["iteration"].as_u64().unwrap() * per, e["corpora"][0]["epochs"].as_f64().unwrap() as f32 as f64)).collect();
        assert_eq!(series("epochs/train_data"), epochs);
        for (name, key) in [("valid_loss", "loss"), ("valid_ppl", "ppl"), ("valid_accuracy", "accuracy")] {
            let want: Vec<(u64, f64)> = evals.iter().map(|e| (e["iteration"].as_u64().unwrap() * per, e[key].as_f64().unwrap() as f32 as f64)).collect();
            assert_eq!(series(name), want, "{prefix}{name}");
        }
        // per mode, under the original's names (bert: span, sent: sentence, gpt: generation)
        for e in &evals {
            for m in e["modes"].as_array().unwrap() {
                let n = match m["mode"].as_str().unwrap() {
                    "span" => "bert",
                    "sentence" => "sent",
                    _ => "gpt",
                };
                let step = e["iteration"].as_u64().unwrap() * per;
                assert!(series(&format!("valid_{n}_loss")).contains(&(step, m["loss"].as_f64().unwrap() as f32 as f64)), "{n} at {step}");
            }
        }
        assert_eq!(series("valid_unigram_loss").len(), 1);
        let text = got["texts"]["config/text_summary"].as_array().unwrap();
        assert_eq!(text.iter().map(|t| t[0].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 4 * per], "the configuration at each start");
        assert!(text[0][1].as_str().unwrap().contains("| train_iters | 10 |"), "{}", text[0][1]);
    }
}
