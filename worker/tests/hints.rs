//! Every hint glm-worker prints is a command that works: each test provokes
//! a hint, takes the suggested command or flags from the output as printed,
//! runs them (through bash, with glm-worker on PATH, as a user pastes them)
//! and checks that they succeed and do what the hint says.
//!
//! Covered elsewhere, by tests that run the hint: the merge command of eval
//! and generate for a tensor-parallel checkpoint, the `--set`s that replace
//! samples' flags under `--args`, and `--set train_micro_batch_size_per_gpu`
//! / `--set ds.gradient_accumulation_steps` for configs.json's batch keys
//! (worker/tests/cli.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `line` with bash in the checkout, glm-worker on PATH; mpirun as the
/// tests run it (allowed as root, oversubscribed on 2 cores).
fn sh(line: &str) -> Output {
    let bin = Path::new(env!("CARGO_BIN_EXE_glm-worker")).parent().unwrap().to_path_buf();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    Command::new("bash")
        .args(["-c", line])
        .current_dir(common::repo())
        .env("PATH", path)
        .env("OMP_NUM_THREADS", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .unwrap()
}

/// `glm-worker` and `args` as a shell command line.
fn line<S: AsRef<str>>(args: &[S]) -> String {
    std::iter::once("glm-worker".to_string()).chain(args.iter().map(|a| glm_common::text::shell_word(a.as_ref()))).collect::<Vec<_>>().join(" ")
}

/// stdout and stderr of a run that must have succeeded.
fn ok(line: &str) -> String {
    let o = sh(line);
    assert!(o.status.success(), "`{line}` failed:\n{}", all(&o));
    all(&o)
}

/// stdout and stderr of a run that must have failed.
fn fails(line: &str) -> String {
    let o = sh(line);
    assert!(!o.status.success(), "`{line}` succeeded:\n{}", all(&o));
    all(&o)
}

fn all(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The text between `start` and the next `end` in `text`.
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let rest = text.split_once(start).unwrap_or_else(|| panic!("no {start:?} in:\n{text}")).1;
    rest.split_once(end).unwrap_or_else(|| panic!("no {end:?} after {start:?} in:\n{text}")).0
}

/// The value and source the effective-configuration report gives `key`.
fn reported<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(key).and_then(|r| r.trim_start().strip_prefix("= ")))
        .unwrap_or_else(|| panic!("{key} is not reported:\n{out}"))
}

/// Validates the tiny configuration, with `extra` (shell text) appended.
fn tiny(ds: &str, extra: &str) -> String {
    format!("glm-worker --config {ds} --args configs/configs_tiny.json --set train_iters=0 {extra}")
}

const TINY_DS: &str = "configs/config_block_tiny.json";

#[test]
fn the_missing_config_hint_and_argument_tips_run() {
    let e = fails("glm-worker --set train_iters=0");
    let example = between(&e, "e.g. ", ")");
    assert!(ok(&format!("glm-worker --set train_iters=0 {example}")).contains("configuration is valid"));
    assert!(e.contains("see --help"), "{e}");
    assert!(ok("glm-worker --help").contains("--config"));
    // clap's tips for a misspelt option and subcommand
    let misspelt = tiny(TINY_DS, "").replace("--config", "--confg");
    let e = fails(&misspelt);
    let flag = between(&e, "a similar argument exists: '", "'");
    assert!(ok(&misspelt.replace("--confg", flag)).contains("configuration is valid"));
    let help = between(&e, "try '", "'");
    assert!(ok(&format!("glm-worker {help}")).contains("Usage"));
    let e = fails("glm-worker prepar --help");
    let sub = between(&e, "a similar subcommand exists: '", "'");
    assert!(ok(&format!("glm-worker {sub} --help")).contains("--data"));
}

#[test]
fn did_you_mean_names_the_key_to_set() {
    // (misspelt --set, its value, the report line it must then change, and to what)
    for (set, value, key, want) in [
        ("hiden_size", "64", "hidden_size", "64  (--set)"),
        ("gradient_clippin", "0.5", "gradient_clipping", "0.5  (--set)"),
        ("train_micro_batch_size_per_gpus", "4", "train_micro_batch_size_per_gpu", "4  (--set)"),
        ("ds.gradient_accumulation_step", "2", "gradient_accumulation_steps", "2  (--set)"),
        ("zero_optimization.stag", "1", "zero_optimization", "stage 1 "),
        ("fp16.enable", "true", "precision", "fp16 "),
    ] {
        let e = fails(&tiny(TINY_DS, &format!("--set {set}={value}")));
        let meant = between(&e, "(did you mean \"", "\"?)");
        let out = ok(&tiny(TINY_DS, &format!("--set {meant}={value}")));
        assert!(reported(&out, key).starts_with(want), "{set} -> {meant}: {}", reported(&out, key));
    }
}

#[test]
fn settings_the_deepspeed_file_decides_name_the_sets_that_change_them() {
    let d = tempfile::tempdir().unwrap();
    let ds = |name: &str, body: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let both = ds("both.json", r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8}"#);
    let global = ds("global.json", r#"{"train_batch_size": 8}"#);
    let micro = ds("micro.json", r#"{"train_micro_batch_size_per_gpu": 8}"#);
    let base = "configs/config_block_base.json".to_string();
    // (DeepSpeed file, configs.json key --set, the report line the hint must change, and to what)
    for (file, set, key, want) in [
        (&both, "batch_size=3", "train_micro_batch_size_per_gpu", "3  (--set)"),
        (&both, "gradient_accumulation_steps=4", "gradient_accumulation_steps", "4  (--set)"),
        (&global, "batch_size=2", "train_micro_batch_size_per_gpu", "2  (--set)"),
        (&global, "gradient_accumulation_steps=4", "gradient_accumulation_steps", "4  (--set)"),
        (&micro, "gradient_accumulation_steps=4", "gradient_accumulation_steps", "4  (--set)"),
        (&base, "loss_scale=128", "precision", "fp16 (fp32 master weights and optimizer state), static loss scale 128"),
        (
            &base,
            "loss_scale_window=500",
            "precision",
            "fp16 (fp32 master weights and optimizer state), dynamic loss scale 65536 (FP16_Optimizer's rules (ZeRO stage 0): window 500,",
        ),
        (
            &base,
            "min_scale=2",
            "precision",
            "fp16 (fp32 master weights and optimizer state), dynamic loss scale 65536 (FP16_Optimizer's rules (ZeRO stage 0): window 1000, min 2,",
        ),
    ] {
        let out = ok(&tiny(file, &format!("--set {set}")));
        let hint = between(&out, "(to change it there: ", ")\n");
        let out = ok(&tiny(file, hint));
        assert!(!out.contains("warning: --set "), "{set} -> {hint}:\n{out}");
        assert!(reported(&out, key).starts_with(want), "{set} -> {hint}: {}", reported(&out, key));
    }
    // hysteresis at stage 0 (FP16_Optimizer has none): the hint takes a ZeRO stage that has it
    let out = ok(&tiny(&base, "--set hysteresis=3"));
    assert!(out.contains("at ZeRO stage 0 DeepSpeed's fp16 optimizer has no hysteresis"), "{out}");
    let hint = between(&out, "(to change it there: ", ")\n");
    assert_eq!(hint, "--set fp16.hysteresis=3 --set zero_optimization.stage=1");
    let out = ok(&tiny(&base, hint));
    assert!(!out.contains("warning: --set ") && !out.contains("has no effect at ZeRO stage 0"), "{out}");
    assert!(reported(&out, "precision").contains("DynamicLossScaler's rules (ZeRO stages 1-3): window 1000, min 1, hysteresis 3)"), "{out}");
}

#[test]
fn precision_and_unsupported_value_hints_run() {
    let d = tempfile::tempdir().unwrap();
    // fp16 and bf16 both on: by a --set, and in the file
    let base = "configs/config_block_base.json";
    let e = fails(&tiny(base, "--set bf16.enabled=true"));
    let hint = between(&e, "to train in bf16: ", ")");
    assert!(reported(&ok(&tiny(base, &format!("--set bf16.enabled=true {hint}"))), "precision").starts_with("bf16"));
    let file = d.path().join("both.json");
    std::fs::write(&file, r#"{"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": true}, "bf16": {"enabled": true}}"#).unwrap();
    let e = fails(&tiny(&file.display().to_string(), ""));
    let hint = between(&e, "to train in bf16: ", ")");
    assert!(reported(&ok(&tiny(&file.display().to_string(), hint)), "precision").starts_with("bf16"));
    // fp16 overflowing at its minimum loss scale under ZeRO (an overflow
    // injected at step 1) stops the run: in bf16 it trains
    let cmd = tiny_train(
        d.path(),
        &["train_iters=1", "fp16.enabled=true", "fp16.initial_scale_power=0", "fp16.min_loss_scale=1", "fp16.hysteresis=1", "zero_optimization.stage=1"],
    );
    let e = fails(&format!("GLM_INJECT_INF_GRAD='*:1' {cmd}"));
    let hint = between(&e, "or train in bf16: ", ")");
    let out = ok(&format!("{cmd} {hint}"));
    assert!(reported(&out, "precision").starts_with("bf16") && out.contains("train: finished at iteration 1"), "{out}");
    // a value glm-pretrain-rs does not support, given by --set and by the file
    let e = fails(&tiny(TINY_DS, "--set transformer_xl=true"));
    let hint = between(&e, "; use false (", ")");
    ok(&tiny(TINY_DS, hint));
    let args = d.path().join("configs.json");
    let text = std::fs::read_to_string(common::repo().join("configs/configs_tiny.json")).unwrap();
    std::fs::write(&args, text.replace("\"block_lm\": true", "\"block_lm\": false")).unwrap();
    let cmd = format!("glm-worker --config {TINY_DS} --args {} --set train_iters=0", args.display());
    let e = fails(&cmd);
    let hint = between(&e, "; use true (", ")");
    ok(&format!("{cmd} {hint}"));
}

/// The tiny training command of `common::tiny_train_args` in `dir` (its own
/// DeepSpeed file: micro-batch 2, so that 1 or 2 data-parallel ranks both fit).
fn tiny_train(dir: &Path, sets: &[&str]) -> String {
    let ds = dir.join("ds.json");
    let corpus = dir.join("corpus.json");
    if !ds.exists() {
        std::fs::write(&ds, r#"{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.002}}}"#).unwrap();
        common::corpus_slice(&corpus, 300);
    }
    let sets: Vec<String> = ["eval_interval=0", "save_interval=1"].iter().chain(sets).map(|s| s.to_string()).collect();
    line(&common::tiny_train_args(dir, &ds, &corpus, 1200, &sets))
}

/// A checkpoint whose vocabulary was padded otherwise (here by 256; an
/// earlier build padded by make_vocab_size_divisible_by × tensor-parallel
/// size) resumes with the setting the error names.
#[test]
fn a_vocabulary_padded_otherwise_names_the_setting_that_loads_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let save = dir.join("padded256").display().to_string();
    ok(&tiny_train(dir, &["train_iters=1", "make_vocab_size_divisible_by=256", &format!("save={save}")]));
    let resume = tiny_train(dir, &["train_iters=2", &format!("load={save}")]);
    let e = fails(&resume);
    let set = between(&e, "): train with ", "\n");
    assert!(set.starts_with("--set make_vocab_size_divisible_by=") && !set.ends_with("=128"), "{e}");
    assert!(ok(&format!("{resume} {set}")).contains("train: finished at iteration 2"));
}

#[test]
fn missing_data_and_tokenizer_hints_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // validation only: notes
    let cmd = tiny_train(dir, &["train_iters=0", "tokenizer_path=/nonexistent/vocab.txt", "train_data=/nonexistent/corpus.json"]);
    let out = ok(&cmd);
    let data = between(&out, "note: train_data /nonexistent/corpus.json does not exist yet (training needs it; ", ")\n");
    let data = &data[data.find("--set ").unwrap_or_else(|| panic!("{data}"))..];
    let tok = between(&out, "note: tokenizer_path /nonexistent/vocab.txt does not exist (training needs it, or ", " to train one)");
    let out = ok(&format!("{cmd} {data} {tok}"));
    assert!(!out.contains("note:") && reported(&out, "tokenizer_path").starts_with("(train on the corpus)"), "{out}");
    // training: errors
    let cmd = tiny_train(dir, &["train_iters=1", "train_data=/nonexistent/corpus.json"]);
    let e = fails(&cmd);
    let hint = between(&e, "e.g. the default corpus: ", "\n");
    assert!(ok(&format!("{cmd} {hint}")).contains("train: finished at iteration 1"));
    let cmd = tiny_train(dir, &["train_iters=1", "tokenizer_path=/nonexistent/vocab.txt"]);
    let e = fails(&cmd);
    let hint = between(&e, "hint: point tokenizer_path at a BERT vocab.txt (or the folder holding it) or a tokenizer.json that exists, or ", " to train one");
    assert!(ok(&format!("{cmd} {hint}")).contains("train: finished at iteration 1"));
    // a vocabulary that does not cover the corpus
    let vocab = dir.join("vocab.txt");
    std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n明\n月\n").unwrap();
    let cmd = tiny_train(dir, &["train_iters=1", &format!("tokenizer_path={}", vocab.display())]);
    let out = ok(&cmd);
    let hint = between(&out, "let a tokenizer be trained on the corpus: ", ")\n");
    let out = ok(&format!("{cmd} {hint}"));
    assert!(!out.contains("[UNK]: the tokenizer does not cover"), "{out}");
}

#[test]
fn checkpoint_hints_run_as_printed() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let save = dir.join("save").display().to_string();
    let run = tiny_train(dir, &["train_iters=1", &format!("save={save}")]);
    ok(&run);
    // a used save directory: resume it, or start over
    let e = fails(&run);
    let resume = between(&e, "Resume that run with ", ", choose another");
    assert!(ok(&format!("{run} {resume}")).contains("nothing to do (checkpoint iteration 1"));
    let over = between(&e, "start over with ", " (removes");
    assert!(ok(&format!("{run} {over}")).contains("overwrite: removing the earlier run"));

    // a tensor-parallel checkpoint in one process: merge it, or start its ranks
    let parts = dir.join("parts").display().to_string();
    ok(&format!("glm-worker checkpoint split --load {save} --tp 2 --out {parts}"));
    let resume = tiny_train(dir, &["train_iters=2", &format!("load={parts}")]);
    let e = fails(&resume);
    ok(&format!("glm-worker {}", between(&e, "merge it first (glm-worker ", ")")));
    let load = between(&e, "then train with ", ";");
    assert!(ok(&format!("{resume} {load}")).contains("train: finished at iteration 2"));
    let ranks = between(&e, "or train on ", " ranks with ");
    let set = between(&e, &format!("or train on {ranks} ranks with "), "\n");
    assert!(ok(&format!("mpirun -np {ranks} --bind-to none {resume} {set}")).contains("train: finished at iteration 2"));

    // a whole checkpoint under tensor-parallel 2: split it, or train data-parallel
    let resume = format!("mpirun -np 2 --bind-to none {}", tiny_train(dir, &["train_iters=2", &format!("load={save}"), "model_parallel_size=2"]));
    let e = fails(&resume);
    ok(&format!("glm-worker {}", between(&e, "split it first (glm-worker ", ")")));
    let load = between(&e, "then train with ", ";");
    assert!(ok(&format!("{resume} {load}")).contains("train: finished at iteration 2"));
    let set = between(&e, "; or train with ", "\n");
    assert!(ok(&format!("{resume} {set}")).contains("train: finished at iteration 2"));

    // trained on 2 tensor-parallel ranks, resumed alone: its vocabulary is
    // padded as the original pads (a multiple of 128, which 2 ranks split),
    // so the merged checkpoint loads with no padding setting
    let tp2 = dir.join("tp2").display().to_string();
    ok(&format!("mpirun -np 2 --bind-to none {}", tiny_train(dir, &["train_iters=1", "model_parallel_size=2", &format!("save={tp2}")])));
    let resume = tiny_train(dir, &["train_iters=2", &format!("load={tp2}")]);
    let e = fails(&resume);
    ok(&format!("glm-worker {}", between(&e, "merge it first (glm-worker ", ")")));
    let load = between(&e, "then train with ", ";");
    assert!(!load.contains("make_vocab_size_divisible_by"), "{e}");
    assert!(ok(&format!("{resume} {load}")).contains("train: finished at iteration 2"));
}

#[test]
fn bench_comm_alone_gives_its_mpirun_line() {
    let e = fails("glm-worker bench-comm --mib 1 --iters 1");
    let cmd = between(&e, "needs several ranks: ", "\n");
    assert!(ok(cmd).contains("allreduce    1 MiB on 2 ranks"));
}

#[test]
fn store_hints_run() {
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("corpus.json");
    common::corpus_slice(&corpus, 40);
    let store = d.path().join("store").display().to_string();
    let prepare = |out: &str| format!("glm-worker prepare --data {} --out {out} --tokenizer-cache {} --vocab-size 500", corpus.display(), d.path().display());
    // a tokenizer that does not exist, then one that does not cover the corpus: omit --tokenizer
    let e = fails(&format!("{} --tokenizer nope.txt", prepare(&store)));
    assert!(e.contains("or omit --tokenizer to train one"), "{e}");
    ok(&prepare(&store));
    let vocab = d.path().join("vocab.txt");
    std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n明\n月\n").unwrap();
    let other = d.path().join("other").display().to_string();
    let out = ok(&format!("{} --tokenizer {}", prepare(&other), vocab.display()));
    assert!(out.contains("check --tokenizer; or let a tokenizer be trained on the corpus: omit --tokenizer"), "{out}");
    // samples: --set without --args; --summary without samples
    let samples = format!("glm-worker samples --store {store} --count 1");
    let e = fails(&format!("{samples} --set seq_length=40"));
    let args = between(&e, "e.g. ", ")");
    ok(&format!("{samples} --set seq_length=40 {args}"));
    let e = fails(&format!("glm-worker samples --store {store} --summary --count 0"));
    let count = between(&e, "give ", " or more");
    assert!(ok(&format!("glm-worker samples --store {store} --summary {count}")).contains("samples"));
    // a damaged store, a store of another format, another tokenizer: the command that rebuilds it
    let rebuilds = |damage: &dyn Fn()| {
        damage();
        let e = fails(&samples);
        ok(between(&e, "rebuild it: ", "\n"));
        ok(&samples);
    };
    let tokens = d.path().join("store/shard-00000.tokens.bin");
    rebuilds(&|| {
        let mut b = std::fs::read(&tokens).unwrap();
        b[..8].copy_from_slice(b"XXXXXXXX");
        std::fs::write(&tokens, b).unwrap();
    });
    rebuilds(&|| std::fs::remove_file(d.path().join("store/shard-00000.index.bin")).unwrap());
    let meta = d.path().join("store/meta.json");
    rebuilds(&|| {
        let m = std::fs::read_to_string(&meta).unwrap();
        std::fs::write(&meta, m.replace("\"format_version\": 2,", "\"format_version\": 99,")).unwrap();
    });
    std::fs::copy(d.path().join("other/tokenizer.json"), d.path().join("store/tokenizer.json")).unwrap();
    let e = fails(&samples);
    ok(between(&e, "rebuild the store with this tokenizer: ", ")\n"));
    ok(&samples);
}

#[test]
fn missing_libtorch_names_the_variable_that_finds_it() {
    let libtorch = between(&ok("glm-worker env"), "libtorch dir: ", "\n").trim().to_string();
    // a copy of the entry point beside the real core, with GLM_LIBTORCH_LIB (the only place then looked at) wrong
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("glm-worker");
    std::fs::copy(env!("CARGO_BIN_EXE_glm-worker"), &bin).unwrap();
    let core = PathBuf::from(env!("CARGO_BIN_EXE_glm-worker")).with_file_name("glm-worker-core");
    std::os::unix::fs::symlink(&core, d.path().join("glm-worker-core")).unwrap();
    let run = |lib: &Path| {
        Command::new(&bin)
            .arg("env")
            .env("GLM_LIBTORCH_LIB", lib)
            .env("PATH", "/nonexistent")
            .env_remove("LD_LIBRARY_PATH")
            .env_remove("LIBTORCH")
            .output()
            .unwrap()
    };
    let o = run(d.path());
    assert_eq!(o.status.code(), Some(127), "{}", all(&o));
    let var = between(&all(&o), "or set ", " to a torch 2.11").to_string();
    assert_eq!(var, "GLM_LIBTORCH_LIB");
    let o = run(Path::new(&libtorch));
    assert!(o.status.success() && all(&o).contains("sum(1,2,3) = 6"), "{}", all(&o));
}
