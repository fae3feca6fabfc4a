//! Helpers shared by the integration tests: the repository, the tiny
//! training setup, metrics, and MPI jobs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The stdout of a run that must have succeeded (else both streams).
pub fn ok(o: &Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "exit {:?}\nstdout:\n{out}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    out
}

/// Writes the first `n` records of the default corpus to `path`.
pub fn corpus_slice(path: &Path, n: usize) {
    let default = repo().join("glm_pretrain/data/data.json");
    let text = std::fs::read_to_string(&default).unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh builds it)", default.display()));
    let docs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    std::fs::write(path, serde_json::to_string(&docs[..n.min(docs.len())]).unwrap()).unwrap();
}

/// glm-worker's arguments for training the tiny test model (2 layers,
/// hidden 64, seq 64) on CPU with the DeepSpeed config `ds`, on `corpus`,
/// with its token store and tokenizer under `dir`; `sets` (after the
/// model's) add or override keys of configs.json.
pub fn tiny_train_args(dir: &Path, ds: &Path, corpus: &Path, vocab_size: usize, sets: &[String]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--config".into(),
        ds.display().to_string(),
        "--args".into(),
        "configs/configs_tiny.json".into(),
        "--store".into(),
        dir.join("store").display().to_string(),
        "--tokenizer-cache".into(),
        dir.join("model").display().to_string(),
        "--vocab-size".into(),
        vocab_size.to_string(),
        "--device".into(),
        "cpu".into(),
    ];
    // save=null first: configs_tiny.json saves into the checkout's
    // glm_pretrain/model/checkpoints/glm-tiny, which no test may touch
    // (a test that saves names its own directory, later, which wins)
    let model = [
        "save=null", "num_layers=2", "hidden_size=64", "num_attention_heads=2", "seq_length=64", "max_position_embeddings=64", "log_interval=1", "eval_iters=4",
    ];
    for s in model.iter().map(|s| s.to_string()).chain([format!("train_data={}", corpus.display())]).chain(sets.iter().cloned()) {
        args.push("--set".into());
        args.push(s);
    }
    args
}

/// The events of `kind` ("train", "eval") in `<dir>/metrics.jsonl`.
pub fn events(dir: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["type"] == kind)
        .collect()
}

/// `mpirun -np <np>` as the tests run it: oversubscribed on 2 cores, no
/// binding, allowed as root, one intra-op thread per rank.
pub fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMP_NUM_THREADS", "1");
    c
}

/// The command that trains the tiny test model (`tiny_train_args`) on the
/// first 300 records of the default corpus (written to `dir` on first use)
/// on `np` MPI ranks, or without mpirun when `np` is 0.
pub fn tiny_command(dir: &Path, np: usize, ds: &Path, sets: &[String]) -> Command {
    let corpus = dir.join("corpus.json");
    if !corpus.exists() {
        corpus_slice(&corpus, 300);
    }
    let args = tiny_train_args(dir, ds, &corpus, 1200, sets);
    let worker = env!("CARGO_BIN_EXE_glm-worker");
    let mut cmd = if np == 0 {
        Command::new(worker)
    } else {
        let mut c = mpirun(np);
        c.arg(worker);
        c
    };
    cmd.current_dir(repo()).env("OMP_NUM_THREADS", "1").args(&args);
    cmd
}

/// Runs the `#[ignore]`d test `child` of this test binary on two MPI ranks
/// and asserts that it passed on both. Each rank's output goes to its own
/// file (`--output-filename`): the two ranks' lines interleave on a shared
/// stdout, even within a line, so counting results there is a race.
pub fn run_child_on_two_ranks(child: &str) {
    let exe = std::env::current_exe().unwrap();
    let outdir = tempfile::tempdir().unwrap();
    let o = mpirun(2)
        .args(["--output-filename", &outdir.path().display().to_string()])
        .arg(&exe)
        .args(["--ignored", "--exact", child, "--test-threads", "1", "--color", "never"])
        .output()
        .expect("mpirun (openmpi-bin; scripts/setup.sh installs it)");
    let rank_out = |r: usize| std::fs::read_to_string(outdir.path().join(format!("1/rank.{r}/stdout"))).unwrap_or_default();
    let (a, b) = (rank_out(0), rank_out(1));
    // a failure shows the children's output indented, so that their result
    // lines are not read as this binary's by scripts/test.sh's summary
    let indent = |t: &str| t.lines().map(|l| format!("  | {l}\n")).collect::<String>();
    assert!(o.status.success(), "rank 0:\n{}rank 1:\n{}{}", indent(&a), indent(&b), indent(&String::from_utf8_lossy(&o.stderr)));
    for (r, out) in [(0, &a), (1, &b)] {
        assert!(out.contains("test result: ok. 1 passed"), "rank {r} did not pass {child}:\n{}", indent(out));
    }
}

/// A small dropout-free GLM for the in-process parity tests.
pub fn small_glm(seq: i64, vocab: usize) -> glm_worker::model::glm::GlmConfig {
    glm_worker::model::glm::GlmConfig {
        vocab_size: vocab,
        hidden_size: 64,
        num_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 256,
        max_position_embeddings: seq as usize,
        layernorm_epsilon: 1e-5,
        hidden_dropout: 0.0,
        attention_dropout: 0.0,
        output_dropout: 0.0,
        block_position_encoding: true,
    }
}

/// A batch of one sample per seed: random tokens and targets (ids from 10
/// up), Part A the first `sep` positions, the loss on the rest.
pub fn random_batch(seeds: impl Iterator<Item = u64>, seq: i64, vocab: usize, sep: i64) -> glm_worker::model::glm::Batch {
    use tch::Tensor;
    let (mut tokens, mut targets) = (Vec::new(), Vec::new());
    for seed in seeds {
        let mut rng = glm_worker::rng::Rng::new(seed);
        for _ in 0..seq {
            tokens.push(10 + rng.below(vocab as u64 - 10) as i64);
            targets.push(10 + rng.below(vocab as u64 - 10) as i64);
        }
    }
    let n = tokens.len() as i64 / seq;
    let row = |f: &dyn Fn(i64) -> i64| Tensor::from_slice(&(0..seq).map(f).collect::<Vec<_>>()).unsqueeze(0).repeat([n, 1]);
    glm_worker::model::glm::Batch {
        tokens: Tensor::from_slice(&tokens).view([n, seq]),
        targets: Tensor::from_slice(&targets).view([n, seq]),
        position_ids: row(&|i| i.min(sep - 1)),
        block_position_ids: row(&|i| if i < sep { 0 } else { i - sep + 1 }),
        loss_mask: row(&|i| i64::from(i >= sep)),
        sep: Tensor::from_slice(&vec![sep; n as usize]),
    }
}
