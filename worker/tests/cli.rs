//! End-to-end checks of `glm-worker` as a user runs it: the entry point finds
//! libtorch, `prepare` builds/reuses/rebuilds stores, and bad input gives one
//! clear located error line, a non-zero exit, and nothing on disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glm-worker"))
}

fn run(args: &[&str]) -> Output {
    worker().args(args).output().expect("glm-worker runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The seed files the project was started from (`../shared/seed` beside the checkout).
fn repo_file(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel).display().to_string()
}

fn seed(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed").join(name);
    assert!(p.is_file(), "{} missing: tests need the shared seed folder beside the checkout", p.display());
    p
}

const CORPUS: &str = r#"[
{"title": "静夜思", "content": "床前明月光，疑是地上霜。举头望明月，低头思故乡。"},
{"title": "春晓", "content": "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。"},
{"title": "登鹳雀楼", "content": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"},
{"title": "“引号”", "content": "Hello world, this is GLM. 你好，世界！"}
]"#;

fn prepare(corpus: &Path, out: &Path, cache: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "prepare".to_string(),
        "--data".into(),
        corpus.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--tokenizer-cache".into(),
        cache.display().to_string(),
        "--vocab-size".into(),
        "500".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    worker().args(&args).output().unwrap()
}

/// Nothing but `keep` in `dir`: no store, no temporary leftovers.
fn assert_only(dir: &Path, keep: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "unexpected files in {}", dir.display());
}

#[test]
fn env_runs_through_the_entry_point() {
    let o = run(&["env"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("sum(1,2,3) = 6"), "{}", stdout(&o));
}

#[test]
fn missing_libtorch_is_a_clear_error() {
    // A copy of the entry point with no libtorch to be found anywhere.
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("glm-worker");
    std::fs::copy(env!("CARGO_BIN_EXE_glm-worker"), &bin).unwrap();
    std::fs::write(d.path().join("glm-worker-core"), b"not run").unwrap();
    let o = Command::new(&bin)
        .arg("env")
        .env("PATH", "/nonexistent")
        .env("GLM_LIBTORCH_LIB", d.path())
        .env_remove("LD_LIBRARY_PATH")
        .env_remove("LIBTORCH")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(127), "{err}");
    assert_eq!(err.lines().next().unwrap(), "glm-worker: error: libtorch 2.11.x not found (glm-worker needs libtorch_cpu.so from torch==2.11.0)");
    assert!(err.contains(&format!("looked in: {}", d.path().display())) && err.contains("HINT"), "{err}");
}

#[test]
fn prepare_trains_reuses_and_detects_changes() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("data.json");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = d.path().join("store");
    let cache = d.path().join("model");

    let o = prepare(&corpus, &out, &cache, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("trained WordPiece") && s.contains("4 documents"), "{s}");
    for f in ["shard-00000.tokens.bin", "shard-00000.index.bin", "meta.json", "tokenizer.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1, "tokenizer cached");

    let o = prepare(&corpus, &out, &cache, &[]);
    assert!(stdout(&o).contains("cached") && stdout(&o).contains("up to date"), "{}", stdout(&o));

    // the store's own tokenizer.json is the same tokenizer
    let tj = out.join("tokenizer.json").display().to_string();
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &tj]);
    assert!(stdout(&o).contains("up to date"), "{}", stdout(&o));

    // same size, new content: detected through the content hash
    std::fs::write(&corpus, CORPUS.replace("静夜思", "夜思静")).unwrap();
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &tj]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("rebuilt") && stdout(&o).contains("corpus changed"), "{}", stdout(&o));

    // a different tokenizer: detected through its hash; a store built for
    // another tokenizer is not replaced (it may be a training run's) unless
    // --force says so
    let vocab = seed("vocab.txt").display().to_string();
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &vocab]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let e = stderr(&o);
    assert!(
        e.contains("this token store does not match what prepare needs: it was built with another tokenizer") && e.contains("--force to replace this one"),
        "{e}"
    );
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &vocab, "--force"]);
    assert!(o.status.success() && stdout(&o).contains("rebuilt"), "{}{}", stdout(&o), stderr(&o));
    assert_only(d.path(), &["data.json", "store", "model"]);

    // a damaged store is rebuilt, not reused
    let tokens = out.join("shard-00000.tokens.bin");
    let len = std::fs::metadata(&tokens).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&tokens).unwrap().set_len(len - 2).unwrap();
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &vocab]);
    assert!(stdout(&o).contains("damaged store") && stdout(&o).contains("truncated"), "{}", stdout(&o));
}

#[test]
fn seed_vocab_builds_a_store_and_samples_decode() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("data.json");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = d.path().join("store");
    let vocab = seed("vocab.txt").display().to_string();
    let o = prepare(&corpus, &out, d.path(), &["--tokenizer", &vocab]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("21133 ids, padded to 21248"), "{s}");
    // the share of [UNK] is reported; Chinese text is covered by this vocabulary
    assert!(s.contains("% [UNK])") && !s.contains("warning:"), "{s}");
    // a corpus in a script the vocabulary lacks is reported as such
    let ethiopic = d.path().join("ethiopic.json");
    std::fs::write(&ethiopic, r#"[{"content": "ሰላም ዓለም። ይህ ጽሑፍ በግዕዝ ፊደል ነው። ሰላም ዓለም።"}, {"content": "床前明月光"}]"#).unwrap();
    let o = prepare(&ethiopic, &d.path().join("store2"), d.path(), &["--tokenizer", &vocab]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("of the corpus's tokens are [UNK]: the tokenizer does not cover this text"), "{s}");
    let o = run(&["samples", "--store", &out.display().to_string(), "--count", "2", "--seq-length", "48"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("[MASK]") && s.contains("<|endofpiece|>"), "{s}");
    // token ids as JSON lines, with a run's own masking settings
    let o = run(&[
        "samples",
        "--store",
        &out.display().to_string(),
        "--count",
        "2",
        "--json",
        "--args",
        &repo_file("configs/configs_tiny.json"),
        "--set",
        "seq_length=40",
        "--mode",
        "sentence",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for v in &lines {
        let n = v["len"].as_u64().unwrap() as usize;
        assert!(n <= 40 && v["tokens"].as_array().unwrap().len() == n && v["loss_mask"].as_array().unwrap().len() == n && v["mode"] == "sentence", "{v}");
    }
    let o = run(&["samples", "--store", &out.display().to_string(), "--set", "seq_length=40"]);
    assert!(!o.status.success() && stderr(&o).contains("--set needs --args"), "{}", stderr(&o));
    // an OS error is said once, without Rust's debug form
    let o = run(&["samples", "--store", &out.display().to_string(), "--args", "/nonexistent/configs.json"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.matches("No such file or directory").count() == 1 && !e.contains("Os {"), "{e}");
}

#[test]
fn bad_input_gives_one_located_line_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("model");
    let out = d.path().join("store");
    let cases: Vec<(PathBuf, Vec<String>, &str)> = vec![
        // the seed's sample.json is a fragment without `[` `]`
        (seed("sample.json"), vec![], "sample.json:1:1: expected `[`"),
        (d.path().join("bad.json"), vec![], "bad.json:3: malformed JSON"),
        (d.path().join("empty.json"), vec![], "empty.json: the corpus holds no documents with text"),
        (
            d.path().join("ok.json"),
            vec!["--tokenizer".into(), d.path().join("nope.txt").display().to_string()],
            "nope.txt: tokenizer: no such file or folder; hint: pass a BERT vocab.txt (or the folder holding it) or a tokenizer.json with --tokenizer",
        ),
        (d.path().join("bad.jsonl"), vec![], "bad.jsonl:2:10: malformed JSON"),
        (d.path().join("ok.json"), vec!["--split".into(), "1,x".into()], "split \"1,x\""),
        (d.path().join("data.json.gz"), vec![], "data.json.gz: a gzip-compressed file: decompress it first (gunzip); expected UTF-8 text"),
        (d.path().join("utf16.txt"), vec![], "utf16.txt: UTF-16 text (it starts with a UTF-16 byte-order mark): save it as UTF-8"),
        (
            d.path().join("ok.json"),
            vec!["--tokenizer".into(), d.path().join("vocab.bin").display().to_string()],
            "vocab.bin: a binary file (a NUL byte at offset 4)",
        ),
    ];
    std::fs::write(d.path().join("data.json.gz"), b"\x1F\x8B\x08\x00\x00\x00\x00\x00").unwrap();
    std::fs::write(d.path().join("utf16.txt"), b"\xFF\xFEa\x00b\x00").unwrap();
    std::fs::write(d.path().join("vocab.bin"), b"[PAD\x00\x01\x02").unwrap();
    std::fs::write(d.path().join("bad.json"), "[\n{\"content\": \"a\"},\n").unwrap();
    std::fs::write(d.path().join("empty.json"), "[]").unwrap();
    std::fs::write(d.path().join("ok.json"), CORPUS).unwrap();
    std::fs::write(d.path().join("bad.jsonl"), "{\"text\": \"a\"}\n{\"text\": x}\n").unwrap();
    for (corpus, extra, want) in cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let o = prepare(&corpus, &out, &cache, &extra);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{}: {err}", corpus.display());
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(lines[0].starts_with("glm-worker: error: ") && lines[0].contains(want), "want {want:?} in {err}");
        assert!(!out.exists(), "no store after a failure");
        assert!(!cache.exists() || std::fs::read_dir(&cache).unwrap().count() == 0, "no tokenizer after a failure");
    }
    assert_only(d.path(), &["bad.json", "empty.json", "ok.json", "bad.jsonl", "data.json.gz", "utf16.txt", "vocab.bin"]);
    // a UTF-8 byte-order mark (Windows editors write one) is no error: not in
    // a corpus, not in a configuration file
    let bom = |body: &str| [b"\xEF\xBB\xBF".as_slice(), body.as_bytes()].concat();
    std::fs::write(d.path().join("bom.json"), bom(CORPUS)).unwrap();
    let o = prepare(&d.path().join("bom.json"), &out, &cache, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ds = d.path().join("ds.json");
    std::fs::write(&ds, bom(r#"{"train_micro_batch_size_per_gpu": 2}"#)).unwrap();
    let args = d.path().join("configs.json");
    std::fs::write(&args, bom(&std::fs::read_to_string(repo_file("configs/configs_tiny.json")).unwrap())).unwrap();
    let o = worker()
        .current_dir(repo_file(""))
        .args(["--config", &ds.display().to_string(), "--args", &args.display().to_string(), "--set", "train_iters=0"])
        .output()
        .unwrap();
    assert!(o.status.success() && stdout(&o).contains("configuration is valid"), "{}", stderr(&o));
}

#[test]
fn seed_vocab_round_trips_chinese() {
    // Through the library: the seed vocab (bert-base-chinese) must load with
    // its exact ids and give back Chinese text unchanged.
    use glm_worker::data::tokenizer::GlmTokenizer;
    let tok = GlmTokenizer::load(&seed("vocab.txt"), &Default::default()).unwrap();
    assert_eq!(tok.vocab_size(), 21133);
    let s = tok.special;
    assert_eq!((s.pad, s.unk, s.cls, s.sep, s.mask), (0, 100, 101, 102, 103));
    assert_eq!((s.sop, s.eop, s.gmask, s.smask, s.eod), (21128, 21129, 21130, 21131, 21132));
    for text in [
        "近日，范冰冰将重新复出的消息传得是沸沸扬扬，因为某媒体官微公布了一组海报。",
        "现在市面上的小米8、三星note9、华为p20 pro和vivo nex等等旗舰手机可以说都是很具竞争力。",
        "床前明月光，疑是地上霜。",
    ] {
        let ids = tok.encode(text).unwrap();
        assert!(!ids.contains(&s.unk), "{text}: {ids:?}");
        assert_eq!(tok.decode(&ids, true), text);
    }
    assert_eq!(tok.encode("中国").unwrap(), vec![704, 1744]);
}

#[test]
fn an_oversized_model_and_bad_benchmark_arguments_are_one_line_errors() {
    // 51 T parameters: more than any address space holds, so the allocation
    // fails at once whatever the kernel's overcommit policy
    let o =
        worker().env_remove("RUST_BACKTRACE").args(["bench-step", "--hidden", "65536", "--layers", "1000", "--iters", "1", "--warmup", "0"]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let first = err.lines().next().unwrap_or_default();
    assert!(
        first.starts_with(
            "glm-worker: error: building the model (hidden_size 65536, num_layers 1000, vocab_size 16000: 51.5 T parameters, 206 TB as fp32 on cpu"
        ) && first.ends_with("libtorch: out of CPU memory: asked for 206 TB (Cannot allocate memory)"),
        "{err}"
    );
    assert!(err.lines().count() == 2 && err.lines().nth(1).unwrap().starts_with("HINT: "), "one error line and a hint: {err}");
    assert!(!err.contains("panicked") && !err.contains("frame #"), "{err}");
    for (arg, value, want) in
        [("--threads", "0", "0 is not in 1.."), ("--seq", "1", "1 is not in 2.."), ("--vocab", "5", "5 is not in 16.."), ("--iters", "0", "0 is not in 1..")]
    {
        let o = run(&["bench-step", arg, value]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{arg} {value}: {err}");
        assert!(err.contains(&format!("invalid value '{value}' for '{arg}")) && err.contains(want), "{err}");
    }
}

mod common;

/// A token store of `CORPUS` under `dir` (seed vocabulary), as `samples` reads it.
fn samples_store(dir: &Path) -> String {
    let corpus = dir.join("data.json");
    std::fs::write(&corpus, CORPUS).unwrap();
    let out = dir.join("store");
    let vocab = seed("vocab.txt").display().to_string();
    let o = prepare(&corpus, &out, dir, &["--tokenizer", &vocab]);
    assert!(o.status.success(), "{}", stderr(&o));
    out.display().to_string()
}

/// The one error line of a failed run (exit 1), without its prefix.
fn one_error_line(o: &Output) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err.trim_end().strip_prefix("glm-worker: error: ").unwrap_or_else(|| panic!("{err}")).to_string()
}

#[test]
fn samples_summary_needs_samples_and_prints_json_with_json() {
    let d = tempfile::tempdir().unwrap();
    let store = samples_store(d.path());
    // no samples to measure: refused, naming --count
    let e = one_error_line(&run(&["samples", "--store", &store, "--count", "0", "--summary"]));
    assert!(e.contains("--count 0 with --summary") && e.contains("--count 1 or more"), "{e}");
    let e = one_error_line(&run(&["samples", "--store", &store, "--count", "0", "--summary", "--json"]));
    assert!(e.contains("--count 0"), "{e}");
    // listing none is fine: it checks the store and the settings, and prints nothing
    let o = run(&["samples", "--store", &store, "--count", "0"]);
    assert!(o.status.success() && stdout(&o).is_empty(), "{}{}", stdout(&o), stderr(&o));
    let o = run(&["samples", "--store", &store, "--count", "0", "--args", &repo_file("configs/configs_tiny.json"), "--set", "seq_length=1"]);
    assert!(!o.status.success() && stderr(&o).contains("seq_length"), "{}", stderr(&o));

    // --summary --json: one JSON object of the figures the text prints
    let common = ["samples", "--store", &store, "--count", "20", "--seq-length", "48", "--summary"];
    let text = stdout(&run(&common));
    let o = run(&[&common[..], &["--json"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["count"] == 20 && v["mode"] == "span" && v["seq_length"] == 48, "{v}");
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    assert!(f("samples_per_s") > 0.0 && f("samples_per_s").is_finite() && f("tokens_per_s") > 0.0 && f("seconds") > 0.0, "{v}");
    let used = format!(
        "{:.1}% of positions used (rest padding), {:.1} Part B blocks per sample, {:.1} loss tokens per sample",
        f("positions_used_percent"),
        f("blocks_per_sample"),
        f("loss_tokens_per_sample")
    );
    let spans = format!(
        "mean span length {:.2} (distribution mean {:.2}), {:.1}% of Part A+B tokens masked",
        f("mean_span_length"),
        f("distribution_mean_span_length"),
        f("masked_percent")
    );
    assert!(text.contains(&used) && text.contains(&spans), "text:\n{text}json: {v}");
    assert!(v["suffix_form_percent"].is_null(), "{v}");
    // generation: the prefix/suffix share, no span figures
    let o = run(&["samples", "--store", &store, "--count", "10", "--mode", "generation", "--summary", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&o), stderr(&o)));
    assert!(v["mode"] == "generation" && v["suffix_form_percent"].is_f64() && v["mean_span_length"].is_null(), "{v}");
}

#[test]
fn samples_refuses_flags_that_args_overrides_with_a_working_set() {
    let d = tempfile::tempdir().unwrap();
    let store = samples_store(d.path());
    let tiny = repo_file("configs/configs_tiny.json");
    let with_args = |extra: &[&str]| run(&[&["samples", "--store", &store, "--args", &tiny][..], extra].concat());
    let cases: [(&[&str], String); 5] = [
        (&["--seq-length", "40"], format!("--seq-length conflicts with --args: {tiny}'s seq_length (256) decides; use --set seq_length=40 instead")),
        (&["--seed", "7"], format!("--seed conflicts with --args: {tiny}'s seed (1234) decides; use --set seed=7 instead")),
        (&["--task-mask"], format!("--task-mask conflicts with --args: {tiny}'s task_mask (true) decides; use --set task_mask=true instead")),
        (
            &["--seq-length", "40", "--seed", "7", "--task-mask"],
            format!(
                "--seq-length, --seed and --task-mask conflict with --args: {tiny}'s seq_length (256), {tiny}'s seed (1234) and {tiny}'s task_mask (true) decide; use --set seq_length=40 --set seed=7 --set task_mask=true instead"
            ),
        ),
        (&["--set", "seq_length=64", "--seq-length", "40"], "--seq-length conflicts with --args: --set's seq_length (64) decides; use --set seq_length=40 instead".into()),
    ];
    for (flags, want) in cases {
        let e = one_error_line(&with_args(&[flags, &["--summary", "--json"]].concat()));
        assert_eq!(e, want, "{flags:?}");
        // the suggested --set works as written, and does what the flag meant
        let hint: Vec<&str> = e.split("; use ").nth(1).and_then(|h| h.strip_suffix(" instead")).unwrap().split(' ').collect();
        let o = with_args(&[&hint[..], &["--summary", "--json", "--count", "4"]].concat());
        assert!(o.status.success(), "{hint:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let seq = if flags.contains(&"--seq-length") { 40 } else { 256 };
        assert_eq!(v["seq_length"], seq, "{hint:?}: {v}");
    }
    // --set seed=7 draws other samples than the file's seed
    let draw = |extra: &[&str]| stdout(&with_args(&[extra, &["--json", "--count", "2", "--set", "seq_length=40"]].concat()));
    assert_ne!(draw(&["--set", "seed=7"]), draw(&[]));
    // without --args the flags are the settings, with their defaults
    let o = run(&["samples", "--store", &store, "--summary", "--json", "--count", "2"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap_or_else(|e| panic!("{e}: {}", stderr(&o)));
    assert_eq!(v["seq_length"], 128, "{v}");
}

#[test]
fn eval_and_generate_of_a_tensor_parallel_checkpoint_name_themselves_and_a_working_merge() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds.json");
    std::fs::write(
        &ds,
        r#"{"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2,
            "optimizer": {"type": "Adam", "params": {"lr": 0.002, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.01}}}"#,
    )
    .unwrap();
    let save = d.path().join("save");
    let sets = ["train_iters=1".to_string(), "eval_interval=0".into(), "save_interval=1".into(), format!("save={}", save.display())];
    common::ok(&common::tiny_command(d.path(), 0, &ds, &sets).output().unwrap());
    let in_repo = |args: &[&str]| worker().current_dir(common::repo()).env("OMP_NUM_THREADS", "1").args(args).output().unwrap();
    // a tensor-parallel checkpoint: the whole one split over 2 ranks
    let parts = d.path().join("parts");
    let out = common::ok(&in_repo(&["checkpoint", "split", "--load", &save.display().to_string(), "--tp", "2", "--out", &parts.display().to_string()]));
    // the split says what a run on the parts sets, and a run with exactly that resumes from them on 2 ranks
    let line = out.lines().find_map(|l| l.strip_prefix("checkpoint: to train on them: ")).unwrap_or_else(|| panic!("{out}"));
    let printed = line.split(" (on a multiple").next().unwrap();
    // the vocabulary is padded as the original pads (128), which 2 ranks split: no padding setting
    assert!(printed.contains("--set model_parallel_size=2") && !printed.contains("make_vocab_size_divisible_by"), "{line}");
    let resumed = d.path().join("resumed");
    let mut sets: Vec<String> = printed.split_whitespace().filter(|w| *w != "--set").map(String::from).collect();
    sets.extend(["train_iters=2".to_string(), "eval_interval=0".into(), format!("save={}", resumed.display())]);
    let o = common::tiny_command(d.path(), 2, &ds, &sets).output().unwrap();
    let out = common::ok(&o);
    assert!(out.contains("checkpoint: resumed from") && out.contains("(iteration 1)"), "{out}");
    let (parts_s, merged) = (parts.display().to_string(), d.path().join("parts-merged").display().to_string());
    let evaluate = |load: &str| {
        let store = d.path().join("eval_store").display().to_string();
        in_repo(&["eval", "--load", load, "--device", "cpu", "--iters", "1", "--batch-size", "2", "--store", &store])
    };
    for (command, o) in [("eval", evaluate(&parts_s)), ("generate", in_repo(&["generate", "--load", &parts_s, "--text", "明月[MASK]", "--max-tokens", "2"]))]
    {
        let e = one_error_line(&o);
        assert_eq!(
            e,
            format!(
                "{parts_s}: this checkpoint is split over tensor-parallel ranks (mp_rank_XX/); {command} needs a whole-model checkpoint: merge it first (glm-worker checkpoint merge --load {parts_s} --out {merged}), then give {command} --load {merged}"
            )
        );
        assert!(!e.contains("generation needs"), "{e}");
    }
    // the merge command in the message runs as written, and its output is what eval and generate read
    let e = one_error_line(&evaluate(&parts_s));
    let merge = e.split_once("merge it first (glm-worker ").unwrap().1.split_once(')').unwrap().0;
    common::ok(&in_repo(&merge.split(' ').collect::<Vec<_>>()));
    let out = common::ok(&evaluate(&merged));
    assert!(out.contains("eval: ") && out.contains("mixed"), "{out}");
    let out = common::ok(&in_repo(&["generate", "--load", &merged, "--text", "明月[MASK]", "--max-tokens", "2"]));
    assert!(out.contains("blank 0:"), "{out}");
}

/// The tiny configuration validated (`train_iters=0`) with `sets` as `--set`s.
fn validate_tiny(sets: &[&str]) -> Output {
    let mut args = vec!["--config", "configs/config_block_tiny.json", "--args", "configs/configs_tiny.json", "--set", "train_iters=0"];
    for s in sets {
        args.extend(["--set", s]);
    }
    worker().current_dir(repo_file("")).args(&args).output().unwrap()
}

/// `--set` reaches every value the user may want to change: configs.json's
/// keys, the DeepSpeed file's top-level keys (a plain key configs.json does
/// not have, or any key behind `ds.`) and its nested ones (a dotted path); a
/// bad value is blamed on the `--set` that gave it, not on a file that does
/// not contain it; `lr = 0` is accepted with a warning and the weights then
/// stay put; `loss_normalization` is read and shown.
#[test]
fn set_reaches_every_file_and_its_errors_name_the_set() {
    let check = validate_tiny;
    let out = stdout(&check(&["train_micro_batch_size_per_gpu=3"]));
    assert!(out.contains("train_micro_batch_size_per_gpu = 3  (--set)"), "{out}");
    let out = stdout(&check(&["ds.gradient_accumulation_steps=2"]));
    assert!(out.contains("gradient_accumulation_steps    = 2  (--set)") && out.contains("train_batch_size               = 16  (--set)"), "{out}");
    // a configs.json key the DeepSpeed file decides: the warning's command does it
    let o = check(&["batch_size=5"]);
    let out = stdout(&o);
    let hint = out.lines().find_map(|l| l.split("(to change it there: --set ").nth(1)).unwrap_or_else(|| panic!("{out}"));
    let hint = hint.trim_end_matches(')');
    assert_eq!(hint, "train_micro_batch_size_per_gpu=5");
    let out = stdout(&check(&[hint]));
    assert!(out.contains("train_micro_batch_size_per_gpu = 5  (--set)") && !out.contains("has no effect"), "{out}");
    let o = check(&["gradient_accumulation_steps=4"]);
    let out = stdout(&o);
    let hint = out.lines().find_map(|l| l.split("(to change it there: --set ").nth(1)).unwrap_or_else(|| panic!("{out}")).trim_end_matches(')').to_string();
    assert_eq!(hint, "ds.gradient_accumulation_steps=4");
    assert!(stdout(&check(&[&hint])).contains("gradient_accumulation_steps    = 4  (--set)"));
    // bad values, each blamed on its --set
    for (set, want) in [
        ("zero_optimization.stage=3", "--set zero_optimization.stage=3: zero_optimization.stage: 3: stages 0, 1 and 2 are supported"),
        (r#"zero_optimization.stage="2""#, r#"--set zero_optimization.stage="2": zero_optimization.stage: expected a number, found "2""#),
        ("zero_optimization.stage=1.5", "--set zero_optimization.stage=1.5: zero_optimization.stage: expected a non-negative integer, found 1.5"),
        ("fp16.loss_scale=nan", r#"--set fp16.loss_scale="nan": fp16.loss_scale: expected a number"#),
        ("fp16.loss_scale=-1", "--set fp16.loss_scale=-1: fp16.loss_scale: must be >= 0"),
        ("fp16.hysteresis=0", "--set fp16.hysteresis=0: fp16.hysteresis: must be positive"),
        ("loss_normalization=mean", r#"--set loss_normalization="mean": loss_normalization: "mean": expected "global_tokens" or "per_rank_mean""#),
        ("optimizer.params.lr=-1", "--set optimizer.params.lr=-1: optimizer.params.lr: must be >= 0"),
        // as typed: behind ds. where configs.json has the same key
        ("ds.gradient_accumulation_steps=0", "--set ds.gradient_accumulation_steps=0: gradient_accumulation_steps: must be positive"),
        // the batch rule, blamed on the --set that broke it
        ("train_batch_size=7", "--set train_batch_size=7: train_batch_size: train_batch_size 7 != train_micro_batch_size_per_gpu 8"),
    ] {
        let e = one_error_line(&check(&[set]));
        assert!(e.contains(want) && e.ends_with("(overriding configs/config_block_tiny.json)"), "{set}: {e}");
    }
    // a scaler setting the rules cannot start from: blamed on the key that gave it
    let e = one_error_line(&check(&["fp16.enabled=true", "fp16.initial_scale_power=1", "fp16.min_loss_scale=4"]));
    assert!(e.starts_with("config: --set fp16.initial_scale_power=1: fp16.initial_scale_power: loss scaler: 1 gives a start scale 2"), "{e}");
    // stage 0 with torch's Adam: DeepSpeed's FP16_UnfusedOptimizer, minimum 0.25 without dynamic keys
    let out = stdout(&check(&["fp16.enabled=true", "optimizer.params.torch_adam=true"]));
    assert!(out.contains("dynamic loss scale 65536 (FP16_Optimizer's rules (ZeRO stage 0): window 1000, min 0.25, no hysteresis)"), "{out}");
    let e = one_error_line(&check(&["fp16.enabled=true", "bf16.enabled=true"]));
    assert!(e.contains("--set fp16.enabled=true: fp16.enabled: fp16 and bf16 are both enabled"), "{e}");
    let out = stdout(&check(&["loss_normalization=per_rank_mean"]));
    assert!(out.contains("loss_normalization") && out.contains("per_rank_mean (each rank's mean over its own loss tokens") && out.contains("(--set)"), "{out}");
    let out = stdout(&check(&["optimizer.params.lr=0"]));
    assert!(out.contains("lr                             = 0  (--set)") && out.contains("warning: lr = 0 (--set): the weights will not move"), "{out}");

    // lr = 0 trains (through the training path) without moving the weights
    let d = tempfile::tempdir().unwrap();
    let save = d.path().join("run");
    let o = common::tiny_command(
        d.path(),
        0,
        Path::new(&repo_file("configs/config_block_tiny.json")),
        &["optimizer.params.lr=0".into(), "train_iters=2".into(), "save_interval=1".into(), "eval_interval=0".into(), format!("save={}", save.display())],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let w = |it: &str| std::fs::read(save.join(it).join("model.safetensors")).unwrap();
    assert!(w("1") == w("2"), "lr = 0: the weights after iterations 1 and 2 are the same");
    assert!(common::events(&save, "train").iter().all(|e| e["loss"].as_f64().is_some_and(f64::is_finite)));
}

/// scripts/docs_check.sh runs ```sh blocks (and only those), fails naming
/// the file and line of a command that fails, and shortens training.
#[test]
fn docs_check_runs_sh_blocks_and_fails_on_a_failing_command() {
    let d = tempfile::tempdir().unwrap();
    let md = d.path().join("doc.md");
    std::fs::write(&md, "# a doc\n```text\nfalse\n```\n```sh\ntrue  # a comment\nls configs/configs.json \\\n  configs/configs_large.json\n```\n").unwrap();
    let check = |f: &Path| Command::new(repo_file("scripts/docs_check.sh")).arg(f).output().unwrap();
    let o = check(&md);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("docs_check: all 2 commands of 1 files ran"), "{}", stdout(&o));
    let bad = d.path().join("bad.md");
    std::fs::write(&bad, "```sh validate\ntarget/release/glm-worker --config configs/config_block_tiny.json --args configs/configs_tiny.json\nfalse\n```\n")
        .unwrap();
    let o = check(&bad);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("--args configs/configs_tiny.json --set train_iters=0"), "training validated only: {out}");
    assert!(out.contains(&format!("docs_check: FAIL {}:3", bad.display())) && out.contains("FAILED 1 of 2 commands"), "{out}");
}

/// `tokenizer_type` takes the original's names (an unknown one is refused
/// listing them) and the report says which command-token ids each gets;
/// `tokenizer_model_type` decides WordPiece casing as the original does: a
/// trained tokenizer for a `-cased` model keeps case and is cached under
/// its own name. (tests/tokenizers.rs tests the types themselves.)
#[test]
fn tokenizer_type_is_honoured_and_model_type_sets_casing() {
    let check = validate_tiny;
    let out = stdout(&check(&[]));
    assert!(
        out.contains("tokenizer_type") && out.contains("= BertWordPieceTokenizer, tokenizer_model_type bert-base-uncased (lower-cased)  (configs_tiny.json)"),
        "{out}"
    );
    let out = stdout(&check(&["tokenizer_model_type=bert-base-cased"]));
    assert!(out.contains("= BertWordPieceTokenizer, tokenizer_model_type bert-base-cased (cased)  (--set)"), "{out}");
    let e = one_error_line(&check(&["tokenizer_type=SentencePiece"]));
    assert!(e.contains("tokenizer_type = \"SentencePiece\" (--set): expected one of BertWordPieceTokenizer, GPT2BPETokenizer, ChineseSPTokenizer"), "{e}");
    for (sets, shown) in [
        (&["tokenizer_type=GPT2BPETokenizer", "tokenizer_model_type=gpt2"][..], "GPT2BPETokenizer, tokenizer_model_type gpt2 (GPT-2's command ids)"),
        (&["tokenizer_type=GPT2BPETokenizer", "tokenizer_model_type=roberta"], "GPT2BPETokenizer, tokenizer_model_type roberta (RoBERTa's command ids)"),
        (&["tokenizer_type=ChineseSPTokenizer"], "ChineseSPTokenizer, fix_command_token false ([gMASK] shares <|endofpiece|>'s id, as the original's)"),
        (&["tokenizer_type=ChineseSPTokenizer", "fix_command_token=true"], "ChineseSPTokenizer, fix_command_token true  (--set)"),
    ] {
        let out = stdout(&check(sets));
        assert!(out.contains(&format!("= {shown}")), "{shown}: {out}");
    }
    // a cased tokenizer trained on the corpus: its own cache file, case kept
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("c.json");
    std::fs::write(&corpus, CORPUS).unwrap();
    let (out_dir, cache) = (d.path().join("store"), d.path().join("model"));
    let o = prepare(&corpus, &out_dir, &cache, &["--cased"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.len() == 1 && names[0].ends_with("-v500-cased.json"), "{names:?}");
    let tok = std::fs::read_to_string(cache.join(&names[0])).unwrap();
    assert!(tok.contains("\"lowercase\":false") || tok.contains("\"lowercase\": false"), "a cased normalizer");
    assert!(tok.contains("\"GLM\"") || tok.contains("GLM"), "an upper-case token survives: Hello world, this is GLM");
}

/// `split` is read as the original's get_split (the shares in the report),
/// `valid_data`/`test_data` take their shares, and the split files' keys are
/// checked before anything is prepared: an empty corpus list, nothing left
/// to split, a test split to save that is not there; split-file keys where
/// nothing is split are announced as having no effect.
#[test]
fn split_keys_are_read_as_the_original() {
    let check = validate_tiny;
    let out = stdout(&check(&[]));
    assert!(
        out.contains("= 949,50,1 (train 0.949 / valid 0.05 / test 0.001; documents shuffled with the original's fixed seed 1234)  (configs_tiny.json)"),
        "{out}"
    );
    assert!(out.contains("= (none: the valid split of train_data)"), "{out}");
    let out = stdout(&check(&["split=0.9"]));
    assert!(out.contains("= 0.9 (train 0.9 / valid 0.1 / test 0; documents shuffled"), "{out}");
    let out = stdout(&check(&["valid_data=glm_pretrain/data/data.json"]));
    assert!(out.contains("= 949,50,1 (train 0.9989 / valid 0 / test 0.0011;"), "{out}");
    assert!(out.contains("= [\"glm_pretrain/data/data.json\"]  (--set)"), "{out}");
    let out = stdout(&check(&["split=1", "load_splits=splits.npy"]));
    assert!(out.contains("= 1 (train 1 / valid 0 / test 0; no split: every document trains, none validates)"), "{out}");
    assert!(out.contains("warning: load_splits (--set) has no effect: split \"1\" does not split the documents (as in the original)"), "{out}");
    let out = stdout(&check(&["load_splits=a.npy", "save_splits=b"]));
    assert!(
        out.contains("save_splits")
            && out.contains("= b.npy  (--set)")
            && out.contains("warning: save_splits (--set) has no effect beside load_splits (--set)"),
        "{out}"
    );
    for (sets, want) in [
        (&["valid_data=[]"][..], "valid_data = [] (--set): name corpus files or folders, or null for the valid split of train_data"),
        (
            &["test_data=wudao", "save_test_data=t.txt"],
            "save_test_data (--set): split \"949,50,1\" (configs_tiny.json) has no test split to save: test_data (--set) takes the test share",
        ),
        (&["split=0,1,0", "valid_data=wudao"], "split \"0,1,0\" (--set): no share is left for any split once valid_data takes the valid share"),
        (&["split=1,2,3,4"], "split \"1,2,3,4\" (--set): at most three weights"),
        (&["save_splits="], "save_splits = \"\" (--set): an empty path"),
    ] {
        let e = one_error_line(&check(sets));
        assert!(e.contains(want), "{sets:?}: {e}");
    }
}

/// `wudao:<path>` (prepare's --data, configs.json's corpus keys) reads with
/// the original's WuDao reader: only texts over 100 characters, title.strip() + " " + content as is; the store
/// records the reader and is rebuilt when it changes. "wudao" alone is the
/// default corpus with the default reader, announced once.
#[test]
fn wudao_reader_and_the_default_corpus_note() {
    use glm_worker::data::store::TokenStore;
    use glm_worker::data::tokenizer::GlmTokenizer;
    let d = tempfile::tempdir().unwrap();
    let long = format!("“{}”", "长".repeat(120));
    // (WuDao's own layout, {"RECORDS": [...]}, is read too: data/corpus.rs's tests;
    // an array is read by both readers)
    let records = serde_json::json!([
        {"title": " 标题 ", "content": long},
        {"title": "短", "content": "太短了"},
        {"content": "明".repeat(101)},
        {"content": "月".repeat(100)},
    ]);
    let corpus = d.path().join("wudao.json");
    std::fs::write(&corpus, records.to_string()).unwrap();
    let (out, cache, vocab) = (d.path().join("store"), d.path().join("model"), seed("vocab.txt"));
    let wudao = format!("wudao:{}", corpus.display());
    let vocab_s = vocab.display().to_string();
    let o =
        run(&["prepare", "--data", &wudao, "--out", &out.display().to_string(), "--tokenizer-cache", &cache.display().to_string(), "--tokenizer", &vocab_s]);
    let s = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        s.contains("the original's WuDao reader (wudao:)")
            && s.contains("prepare: 2 documents (0 empty, 0 skipped, 2 of at most 100 characters dropped by the WuDao reader"),
        "{s}"
    );
    let tok = GlmTokenizer::load(&vocab, &Default::default()).unwrap();
    let store = TokenStore::open(&out).unwrap();
    assert_eq!(store.doc(0), tok.encode(&format!("标题 {long}")).unwrap(), "title.strip() + \" \" + content, quotes as they are");
    assert_eq!(store.doc(1), tok.encode(&"明".repeat(101)).unwrap());
    let meta = std::fs::read_to_string(out.join("meta.json")).unwrap();
    assert!(meta.contains("\"reader\": \"wudao\"") && meta.contains("\"short_records\": 2"), "{meta}");
    // the same files by the default reader: another store
    let o = run(&["prepare", "--data", &corpus.display().to_string(), "--out", &out.display().to_string(), "--tokenizer", &vocab_s]);
    let s = stdout(&o);
    assert!(
        s.contains("rebuilt") && s.contains("the store was read by the original's WuDao reader (wudao:), this corpus is read by this project's default reader"),
        "{s}"
    );
    assert!(s.contains("prepare: 4 documents"), "{s}");
    // configs.json: "wudao" is announced once; the two readers in one corpus are refused
    let out = stdout(&validate_tiny(&["train_data=wudao", "valid_data=wudao"]));
    let notes: Vec<&str> = out.lines().filter(|l| l.contains("\"wudao\"")).collect();
    assert_eq!(notes.len(), 1, "{out}");
    assert!(
        notes[0].starts_with(
            "warning: train_data, valid_data \"wudao\" (--set, --set) is the default corpus glm_pretrain/data/data.json read by this project's reader"
        ) && notes[0].contains("title.strip() + \" \" + content, keeps only texts over 100 characters")
            && notes[0].contains("wudao:<file or folder>"),
        "{out}"
    );
    let out = stdout(&validate_tiny(&[&format!("train_data={wudao}")]));
    assert!(out.contains(&format!("= [\"{wudao}\"]  (--set)")) && !out.contains("\"wudao\" ("), "{out}");
    let e = one_error_line(&validate_tiny(&[&format!("train_data=[\"wudao\", \"{wudao}\"]")]));
    assert!(e.contains("train_data = [\"wudao\", \"") && e.contains("mixes wudao:<path> entries"), "{e}");
}
