//! The document split equals the original's (tests/split_reference.py runs
//! its get_split and split_ds with numpy): the fixed-seed permutation of
//! numpy's legacy RandomState(1234), the shares, the counts, the indices of
//! each split, and the `.npy` files of save_splits/load_splits both ways.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use glm_worker::data::split::{get_split, load_npy, numpy_permutation, save_npy, split_documents, SPLIT_SEED};
use serde_json::{json, Value};

const SIZES: [usize; 12] = [0, 1, 2, 3, 7, 20, 199, 200, 1000, 5672, 10007, 65537];
const SPLITS: [&str; 12] = ["949,50,1", "0.9", "1000,1,1", "8/1/1", "1", "0.5,0.2,0.1", "98,1,1", "0.3,0.3", "2,1", "1,1,1", "0", "100,0,1"];

fn reference(request: &Value) -> Value {
    let python = common::repo().join(".venv/bin/python");
    let mut child = Command::new(&python)
        .arg(common::repo().join("worker/tests/split_reference.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh --test makes the venv with numpy)", python.display()));
    child.stdin.take().unwrap().write_all(request.to_string().as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "split_reference.py failed (scripts/setup.sh --test installs numpy):\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn the_split_is_the_originals() {
    let d = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for &n in &SIZES {
        for split in SPLITS {
            for (valid, test) in [(false, false), (true, false), (false, true), (true, true)] {
                // (where the original divides by zero, nothing being left, here is an error)
                if get_split(split, valid, test).is_ok() {
                    cases.push((n, split, valid, test));
                }
            }
        }
    }
    // the original writes the permutation with np.save; load_splits reads it
    let ours = d.path().join("ours");
    let written = save_npy(&ours, &numpy_permutation(5672, SPLIT_SEED).unwrap()).unwrap();
    let request = json!({
        "permutations": SIZES,
        "cases": cases.iter().map(|(n, s, v, t)| json!({"n": n, "split": s, "valid": v.then_some(["corpus"]), "test": t.then_some(["corpus"])})).collect::<Vec<_>>(),
        "npy": d.path().join("theirs.npy"),
        "npy_n": 5672,
        "load": written,
    });
    let r = reference(&request);
    for (n, want) in SIZES.iter().zip(r["permutations"].as_array().unwrap()) {
        assert_eq!(numpy_permutation(*n, SPLIT_SEED).unwrap(), ids(want), "RandomState(1234).shuffle(np.arange({n}))");
    }
    let mut compared = 0;
    for ((n, split, valid, test), want) in cases.iter().zip(r["cases"].as_array().unwrap()) {
        let shares = get_split(split, *valid, *test).unwrap();
        let got = split_documents(*n, &shares, None).unwrap();
        let want: Vec<Vec<u32>> = want.as_array().unwrap().iter().map(ids).collect();
        assert_eq!(got.parts.to_vec(), want, "{n} documents, split {split:?}, valid_data {valid}, test_data {test}");
        compared += 1;
    }
    assert!(compared > 400, "{compared} cases");
    // numpy reads what save_splits writes, and load_splits what numpy writes
    assert_eq!(ids(&r["loaded"]), numpy_permutation(5672, SPLIT_SEED).unwrap());
    assert_eq!(load_npy(&d.path().join("theirs.npy"), 5672, "load_splits").unwrap(), numpy_permutation(5672, SPLIT_SEED).unwrap());
    // "0.9" of 200 documents: the rest of 1 is a share, 1 - 0.9 = 0.0999...98,
    // and 200 times it rounds down: 180 train, 19 valid, one document in neither
    let p = split_documents(200, &get_split("0.9", false, false).unwrap(), None).unwrap();
    assert_eq!(p.parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![180, 19, 0]);
}
