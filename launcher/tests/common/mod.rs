//! What the launcher's integration tests share.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The tiny training job the real-worker tests launch: glm-worker
/// (built by the workspace), the first 300 records of the default corpus,
/// DeepSpeed config `ds_json`, every file under `dir`. Returns the worker's path and the worker arguments before the
/// run-specific `--set`s.
pub fn tiny_job(dir: &Path, ds_json: &str) -> (PathBuf, Vec<String>) {
    let worker = repo().join("target/release/glm-worker");
    assert!(worker.is_file(), "{}: build the workspace first (scripts/test.sh does)", worker.display());
    let corpus = repo().join("glm_pretrain/data/data.json");
    assert!(corpus.is_file(), "{}: scripts/setup.sh builds it", corpus.display());
    let docs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&corpus).unwrap()).unwrap();
    let small = dir.join("corpus.json");
    std::fs::write(&small, serde_json::to_string(&docs[..300]).unwrap()).unwrap();
    let ds = dir.join("ds.json");
    std::fs::write(&ds, ds_json).unwrap();
    let mut a: Vec<String> = ["--config", &ds.display().to_string(), "--args", "configs/configs_tiny.json", "--device", "cpu", "--vocab-size", "1200"].map(String::from).to_vec();
    a.extend(["--store".to_string(), dir.join("store").display().to_string(), "--tokenizer-cache".into(), dir.join("model").display().to_string()]);
    for s in ["num_layers=2", "hidden_size=64", "num_attention_heads=2", "seq_length=64", "max_position_embeddings=64", "log_interval=1", "eval_interval=0"] {
        a.extend(["--set".to_string(), s.to_string()]);
    }
    a.extend(["--set".to_string(), format!("train_data={}", small.display())]);
    (worker, a)
}

