//! The original's DeepSpeed checkpoints in and out (`glm-worker checkpoint
//! import` / `export --format deepspeed`), against PyTorch itself
//! (`deepspeed_reference.py`, run with the project's venv): files
//! `torch.save` wrote in the original's layout — one part in fp32, two
//! tensor-parallel parts in fp16, with a `Namespace`, optimizer and random
//! states beside the weights — import and give the loss `bench/glm_torch.py`
//! computes on the same weights and the very batches `glm-worker eval`
//! evaluated; training goes on from them; an export is what `torch.load`
//! (weights only) reads, split as `change_mp.py` splits, and imports back
//! unchanged; what cannot be used is refused naming the file and the key,
//! with nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::ok;

use glm_worker::data::tokenizer::{padded_vocab_size, GlmTokenizer};

/// A tiny run of this program: its tokenizer, token store and checkpoint.
struct Tiny {
    dir: PathBuf,
    tokenizer: PathBuf,
    /// The embedding's rows for that tokenizer (padded to 128).
    rows: usize,
}

/// Trains the tiny model two iterations into `<dir>/run` (tokenizer in
/// `<dir>/model`, store in `<dir>/store`, corpus `<dir>/corpus.json`).
fn tiny(dir: &Path) -> Tiny {
    let ds = common::repo().join("configs/config_block_tiny.json");
    let sets = [format!("save={}", dir.join("run").display()), "train_iters=2".into(), "eval_interval=0".into()];
    ok(&common::tiny_command(dir, 0, &ds, &sets).output().unwrap());
    let tokenizer = std::fs::read_dir(dir.join("model")).unwrap().map(|e| e.unwrap().path()).find(|p| p.extension().is_some_and(|e| e == "json")).unwrap();
    let v = GlmTokenizer::load_saved(&tokenizer).unwrap().vocab_size();
    Tiny { dir: dir.to_path_buf(), tokenizer, rows: padded_vocab_size(v, 128, 1) }
}

/// Runs `deepspeed_reference.py` with the project's venv; its stdout.
fn reference(args: &[&str]) -> String {
    let python = common::repo().join(".venv/bin/python");
    let script = common::repo().join("worker/tests/deepspeed_reference.py");
    let o = Command::new(&python)
        .arg(&script)
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh --test makes the venv with torch and numpy)", python.display()));
    ok(&o)
}

/// Writes a GLM of the tiny shape with `vocab` rows in the original's
/// layout at `out` (`extra`: more of deepspeed_reference.py's options).
fn write_original(out: &Path, vocab: usize, extra: &[&str]) {
    let (out, vocab) = (out.display().to_string(), vocab.to_string());
    let mut args = vec!["write", "--out", &out, "--vocab", &vocab, "--layers", "2", "--hidden", "64", "--heads", "2", "--max-pos", "64"];
    args.extend(extra);
    reference(&args);
}

fn worker(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-worker"));
    c.current_dir(common::repo()).env("OMP_NUM_THREADS", "1").args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn import(t: &Tiny, from: &Path, out: &Path, extra: &[&str]) -> Output {
    let (from, out, tok) = (from.display().to_string(), out.display().to_string(), t.tokenizer.display().to_string());
    let corpus = format!("train_data={}", t.dir.join("corpus.json").display());
    let mut args = vec!["checkpoint", "import", "--from", &from, "--out", &out, "--tokenizer", &tok, "--set", &corpus];
    args.extend(extra);
    worker(&args, &[])
}

fn state(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap()
}

fn weights(dir: &Path) -> BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(dir.join("model.safetensors")).unwrap().into_iter().collect()
}

/// `glm-worker eval` of `load` on the tiny run's store: the loss per mode,
/// and the batches it evaluated (written to `batches`).
fn eval(t: &Tiny, load: &Path, batches: &Path) -> BTreeMap<String, f64> {
    let (load, store) = (load.display().to_string(), t.dir.join("store").display().to_string());
    let out = ok(&worker(&["eval", "--load", &load, "--store", &store, "--device", "cpu"], &[("GLM_EVAL_BATCHES", batches)]));
    let modes = ["mixed", "span", "sentence", "generation"];
    let losses: BTreeMap<String, f64> = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && modes.contains(&f[0])).then(|| (f[0].to_string(), f[1].parse().unwrap()))
        })
        .collect();
    assert_eq!(losses.len(), 4, "{out}");
    losses
}

/// The losses of `glm-worker eval` (4 decimals) and of PyTorch on the same
/// batches agree.
fn assert_same_losses(ours: &BTreeMap<String, f64>, theirs: &serde_json::Value, what: &str) {
    for (mode, loss) in ours {
        let t = theirs[mode].as_f64().unwrap_or_else(|| panic!("{what}: PyTorch has no {mode} loss: {theirs}"));
        // the table's rounding (5e-5) and two fp32 implementations; a
        // misplaced slice moves the loss by 1e-2 and more
        assert!((loss - t).abs() < 1e-3, "{what}: {mode} loss {loss} in glm-worker eval, {t} in PyTorch");
    }
}

#[test]
fn the_originals_files_import_and_evaluate_as_pytorch_computes_them() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let (a, b) = (d.path().join("ds-tp1"), d.path().join("ds-tp2-fp16"));
    write_original(&a, t.rows, &[]);
    write_original(&b, t.rows, &["--tp", "2", "--dtype", "fp16"]);
    let (ia, ib) = (d.path().join("imported-tp1"), d.path().join("imported-tp2"));
    let out = ok(&import(&t, &a, &ia, &[]));
    assert!(out.contains("imported into") && out.contains("(iteration 5000)") && out.contains("fp32 weights"), "{out}");
    let out = ok(&import(&t, &b, &ib, &[]));
    assert!(out.contains("2 tensor-parallel parts merged as change_mp.py merges them") && out.contains("fp16 weights widened to fp32"), "{out}");
    for dir in [&ia, &ib] {
        assert_eq!(std::fs::read_to_string(dir.join("latest")).unwrap().trim(), "5000");
        let s = state(&dir.join("5000"));
        // the iteration the original resumes at; weights only
        assert_eq!(s["iteration"], 5000);
        assert_eq!(s["has_optimizer"], false);
        assert!(s["imported_from"].as_str().unwrap().contains("DeepSpeed"), "{s}");
        assert_eq!(s["model"]["num_attention_heads"], 2, "from the file's Namespace");
        assert_eq!(s["model"]["vocab_size"], t.rows);
        // the original's paths and layout are not taken; its other settings are
        assert_eq!(s["args"]["model_parallel_size"], 1);
        assert_eq!(s["args"]["seq_length"], 64);
        assert_eq!(s["args"]["train_data"][0], t.dir.join("corpus.json").display().to_string());
    }
    assert_eq!(state(&ib.join("5000"))["precision"], "fp16");
    // the two parts merge into the one-part file's weights, in half precision
    let (wa, wb) = (weights(&ia.join("5000")), weights(&ib.join("5000")));
    assert_eq!(wa.len(), wb.len());
    for (name, x) in &wa {
        let y = &wb[name];
        assert_eq!(y.kind(), tch::Kind::Float);
        assert!(x.to_kind(tch::Kind::Half).to_kind(tch::Kind::Float).equal(y), "{name}: not the fp16 weights merged as change_mp.py merges them");
    }
    // eval's loss is PyTorch's on the same weights and batches
    for (imported, original, what) in [(&ia, &a, "one part, fp32"), (&ib, &b, "two parts, fp16")] {
        let batches = d.path().join(format!("batches-{}.jsonl", imported.file_name().unwrap().to_string_lossy()));
        let ours = eval(&t, imported, &batches);
        let theirs: serde_json::Value =
            serde_json::from_str(&reference(&["loss", "--ckpt", &original.display().to_string(), "--batches", &batches.display().to_string()])).unwrap();
        assert_same_losses(&ours, &theirs, what);
    }
    // training goes on from the file's iteration, with a fresh optimizer,
    // with the --sets the import printed
    let printed = ok(&import(&t, &b, &d.path().join("imported-again"), &[]));
    let hint = printed.split("to train: ").nth(1).and_then(|h| h.split(" (its tokenizer").next()).unwrap_or_else(|| panic!("no hint: {printed}"));
    let mut sets: Vec<String> = hint.split_whitespace().filter(|w| *w != "--set").map(String::from).collect();
    assert!(sets.iter().any(|s| s.starts_with("load=")) && sets.iter().any(|s| s.starts_with("tokenizer_path=")), "{hint}");
    sets.extend([format!("save={}", d.path().join("more").display()), "train_iters=5002".into(), "eval_interval=0".into()]);
    let ds = common::repo().join("configs/config_block_tiny.json");
    let out = ok(&common::tiny_command(d.path(), 0, &ds, &sets).output().unwrap());
    assert!(out.contains("(iteration 5000)") && out.contains("without optimizer state: AdamW starts afresh"), "{out}");
    let its: Vec<u64> = common::events(&d.path().join("more"), "train").iter().map(|e| e["iteration"].as_u64().unwrap()).collect();
    assert_eq!(its, [5001, 5002]);
}

#[test]
fn an_export_is_what_torch_load_reads_and_imports_back_unchanged() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let run = d.path().join("run");
    let saved = run.join("2");
    for tp in ["1", "2"] {
        let out = d.path().join(format!("export-tp{tp}"));
        let o = ok(&worker(
            &["checkpoint", "export", "--load", &run.display().to_string(), "--format", "deepspeed", "--out", &out.display().to_string(), "--tp", tp],
            &[],
        ));
        assert!(o.contains(&format!("{tp} file(s)")), "{o}");
        assert_eq!(std::fs::read_to_string(out.join("latest_checkpointed_iteration.txt")).unwrap().trim(), "2");
        // torch.load with its default (weights only); the weights, and change_mp.py's split of them
        let checked = reference(&[
            "check-export",
            "--export",
            &out.display().to_string(),
            "--safetensors",
            &saved.join("model.safetensors").display().to_string(),
            "--parts",
            tp,
        ]);
        assert_eq!(checked.trim(), "ok");
        // and back: the same weights (the same file) and state, without the optimizer
        let back = d.path().join(format!("back-tp{tp}"));
        let o = ok(&worker(&["checkpoint", "import", "--from", &out.display().to_string(), "--out", &back.display().to_string()], &[]));
        assert!(o.contains("imported into"), "{o}");
        assert!(std::fs::read(back.join("2/model.safetensors")).unwrap() == std::fs::read(saved.join("model.safetensors")).unwrap(), "tp {tp}: other weights");
        let (s0, s1) = (state(&saved), state(&back.join("2")));
        for k in [
            "iteration", "consumed_samples", "mode_group", "skipped_steps", "schedule_start", "precision", "model", "tokenizer_sha256", "deepspeed_config",
            "args",
        ] {
            assert_eq!(s0[k], s1[k], "tp {tp}: {k}");
        }
        assert_eq!(s1["has_optimizer"], false);
        assert_eq!(std::fs::read(back.join("2/tokenizer.json")).unwrap(), std::fs::read(saved.join("tokenizer.json")).unwrap());
    }
    let _ = t;
}

/// An import that must fail: its error names `want` (each), nothing is
/// left at `out` or beside it.
fn refused(o: Output, out: &Path, want: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "succeeded: {}", String::from_utf8_lossy(&o.stdout));
    for w in want {
        assert!(err.contains(w), "the error does not say {w:?}: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(!out.exists(), "{} was written", out.display());
    let left: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn what_cannot_be_imported_is_refused_naming_the_file_and_nothing_is_written() {
    let d = tempfile::tempdir().unwrap();
    let t = tiny(d.path());
    let out = d.path().join("imported");
    let file = |dir: &Path, r: usize| dir.join("5000").join(format!("mp_rank_{r:02}_model_states.pt")).display().to_string();
    let case = |name: &str, extra: &[&str]| {
        let dir = d.path().join(name);
        write_original(&dir, t.rows, extra);
        dir
    };

    // not PyTorch's format
    let dir = d.path().join("not-a-zip");
    std::fs::create_dir_all(dir.join("5000")).unwrap();
    std::fs::write(dir.join("latest_checkpointed_iteration.txt"), "5000").unwrap();
    std::fs::write(file(&dir, 0), "hello").unwrap();
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "not a PyTorch file"]);
    // a pickle opcode the reader refuses (INST), in a zip as torch.save lays it out
    let dir = d.path().join("inst");
    std::fs::create_dir_all(dir.join("5000")).unwrap();
    let p = file(&dir, 0);
    let python = common::repo().join(".venv/bin/python");
    let zipped = format!("import zipfile; z = zipfile.ZipFile({p:?}, 'w'); z.writestr('a/data.pkl', b'\\x80\\x02(i__main__\\nX\\n.'); z.writestr('a/version', '3\\n'); z.close()");
    ok(&Command::new(&python).args(["-c", &zipped]).output().unwrap());
    refused(import(&t, &dir.join("5000"), &out, &[]), &out, &[&p, "unsupported pickle opcode INST"]);
    // a missing key, an unexpected one, an integer tensor
    let dir = case("missing", &["--drop", "transformer.layers.1.mlp.dense_4h_to_h.bias"]);
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "missing key(s) transformer.layers.1.mlp.dense_4h_to_h.bias"]);
    let dir = case("unexpected", &["--extra", "transformer.layers.0.attention.rotary.bias"]);
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "unexpected key(s) transformer.layers.0.attention.rotary.bias"]);
    let dir = case("integer", &["--int", "transformer.layers.0.input_layernorm.weight"]);
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "transformer.layers.0.input_layernorm.weight: a LongStorage tensor"]);
    // a configuration of another model: against the file's args, and (without them) its weights
    let tiny_args = ["--args", "configs/configs_tiny.json"];
    let dir = case("good", &[]);
    refused(
        import(&t, &dir, &out, &tiny_args),
        &out,
        &[&file(&dir, 0), "hidden_size = 256 (configs_tiny.json), but the checkpoint's args have hidden_size = 64"],
    );
    // a tokenizer_model_type that reads text otherwise (cased); an equivalent one is taken below
    refused(
        import(&t, &dir, &out, &["--set", "tokenizer_model_type=bert-base-cased"]),
        &out,
        &[&file(&dir, 0), "tokenizer_model_type bert-base-cased (cased)) is not the checkpoint's"],
    );
    let dir = case("no-args", &["--no-args"]);
    refused(
        import(&t, &dir, &out, &tiny_args),
        &out,
        &[&file(&dir, 0), "hidden_size = 256 (configs_tiny.json), but the checkpoint's weights have hidden_size = 64 (word_embeddings.weight is ["],
    );
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "--set num_attention_heads=N"]);
    // a part missing
    let dir = case("tp2", &["--tp", "2"]);
    std::fs::remove_file(file(&dir, 1)).unwrap();
    refused(import(&t, &dir, &out, &[]), &out, &[&file(&dir, 0), "mp_world_size 2, but 1 part(s)"]);
    // another tokenizer than the checkpoint's: more ids than rows, or far fewer
    let tok = t.tokenizer.display().to_string();
    let dir = d.path().join("small-vocab");
    write_original(&dir, t.rows - 128, &[]);
    refused(import(&t, &dir, &out, &[]), &out, &[&tok, &format!("but the checkpoint's embedding has {} rows", t.rows - 128)]);
    let dir = d.path().join("large-vocab");
    write_original(&dir, t.rows + 128, &[]);
    refused(import(&t, &dir, &out, &[]), &out, &[&tok, "more than padding to a multiple of 128"]);
    // and the good one imports (bert-large-uncased reads text as the checkpoint's bert-base-uncased)
    ok(&import(&t, &d.path().join("good"), &out, &["--set", "tokenizer_model_type=bert-large-uncased"]));
    // not over an existing checkpoint
    let o = import(&t, &d.path().join("good"), &out, &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite"));
    // a release checkpoint starts at 0, as the original starts it; one file may be named alone
    let dir = case("release", &["--tag", "release"]);
    let o = ok(&import(&t, &dir, &d.path().join("released"), &[]));
    assert!(o.contains("(iteration 0)") && o.contains("tag release"), "{o}");
    let o = ok(&import(&t, &dir.join("release/mp_rank_00_model_states.pt"), &d.path().join("one-file"), &["--iteration", "7"]));
    assert!(o.contains("(iteration 7)"), "{o}");
}
