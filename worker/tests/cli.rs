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
    for f in ["tokens.bin", "index.bin", "meta.json", "tokenizer.json"] {
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

    // a different tokenizer: detected through its hash
    let vocab = seed("vocab.txt").display().to_string();
    let o = prepare(&corpus, &out, &cache, &["--tokenizer", &vocab]);
    assert!(stdout(&o).contains("tokenizer changed"), "{}", stdout(&o));
    assert_only(d.path(), &["data.json", "store", "model"]);

    // a damaged store is rebuilt, not reused
    let tokens = out.join("tokens.bin");
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
            "nope.txt: tokenizer: no such file; hint: pass a BERT vocab.txt or a tokenizer.json with --tokenizer",
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
    let tok = GlmTokenizer::load(&seed("vocab.txt")).unwrap();
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
