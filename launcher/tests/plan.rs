//! `glm-launch plan` end to end: the JSON a script reads, the cluster from
//! a hostfile, and bad input refused in one line.

use std::process::Command;

mod common;
use common::{repo, text};

fn plan(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_glm-launch")).current_dir(repo()).arg("plan").args(args).output().unwrap()
}

const LARGE: [&str; 6] = ["--config", "configs/config_block_large.json", "--args", "configs/configs_large.json", "--vocab", "30522"];

/// The JSON is versioned, its model states add up, and the best layout of
/// the search fits and keeps the global batch; DeepSpeed's underscore
/// spellings of the options are accepted.
#[test]
fn json_plan_is_versioned_and_adds_up() {
    let o = plan(&[&["--gpu", "h100-sxm", "--nodes", "1", "--gpus_per_node", "8", "--json"][..], &LARGE].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["format"].as_str(), v["version"].as_u64(), v["vocab"].as_u64()), (Some("glm-plan"), Some(1), Some(30522)));
    let p = &v["plan"];
    assert_eq!(p["layout"]["tp"].as_u64().unwrap() * p["layout"]["dp"].as_u64().unwrap(), 8);
    let s = &p["memory"]["states"];
    let parts: u64 = ["params", "grads", "master", "moments"].iter().map(|k| s[k].as_u64().unwrap()).sum();
    assert_eq!(parts, s["total"].as_u64().unwrap());
    assert_eq!(p["padded_vocab"].as_u64(), Some(30592));
    assert!(p["fits"].as_bool().unwrap() && p["speed"]["tokens_per_s"].as_f64().unwrap() > 0.0, "{p}");
    let b = &v["best"];
    assert!(b["fits"].as_bool().unwrap(), "{b}");
    let l = &b["layout"];
    let global: u64 = ["micro", "accum", "dp"].iter().map(|k| l[k].as_u64().unwrap()).product();
    assert_eq!(global, 128, "the configured global batch (16 × 8) kept: {l}");
}

/// A hostfile's hosts and slots are the cluster, selected as glm-launch
/// selects them; hosts of different sizes are refused.
#[test]
fn a_hostfile_is_the_cluster() {
    let d = tempfile::tempdir().unwrap();
    let h = d.path().join("hosts");
    std::fs::write(&h, "node-a slots=4\nnode-b slots=4\nnode-c slots=2\n").unwrap();
    let hs = h.display().to_string();
    let o = plan(&[&["--gpu", "a100-80gb", "--hostfile", &hs, "--num_nodes", "2", "--no-search"][..], &LARGE].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("2 node(s) × 4 rank(s) of A100 SXM 80GB"), "{out}");
    assert!(out.contains("configured layout: tp 1 × dp 8,"), "{out}");
    let o = plan(&[&["--gpu", "a100-80gb", "--hostfile", &hs][..], &LARGE].concat());
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("the selected hosts have different numbers of slots (node-a 4, node-b 4, node-c 2)"), "{}", text(&o).1);
}

/// Bad input: one line naming the flag or key, exit status 2.
#[test]
fn bad_input_is_refused_in_one_line() {
    let d = tempfile::tempdir().unwrap();
    let bad_profile = d.path().join("p.json");
    std::fs::write(&bad_profile, r#"{"format": "glm-profile", "version": 1}"#).unwrap();
    let bp = bad_profile.display().to_string();
    let h100 = ["--gpu", "h100-sxm"];
    for (args, want) in [
        (vec!["--gpu", "v100"], "--gpu v100: expected one of a100-40gb, a100-80gb, h100-sxm, h100-pcie, h200"),
        (vec![], "name the device: --gpu"),
        (vec!["--gpu", "h100-sxm", "--profile", &bp], "--gpu or --profile, not both"),
        (vec!["--profile", &bp], "not a device profile"),
        (vec!["--nodes", "0", "--gpu", "h100-sxm"], "--nodes 0 --gpus-per-node 1: both at least 1"),
        ([&h100[..], &["--gpus-per-node", "8", "--pp", "3"]].concat(), "--pp 3: must divide the cluster's 8 rank(s)"),
        ([&h100[..], &["--set", "num_attention_heads=0"]].concat(), "hidden_size, num_layers and num_attention_heads must be positive"),
        ([&h100[..], &["--set", "num_attention_heads=5"]].concat(), "hidden_size 1024 is not divisible by num_attention_heads 5"),
        ([&h100[..], &["--gpus-per-node", "3", "--set", "model_parallel_size=3"]].concat(), "num_attention_heads 16 is not divisible by model_parallel_size 3"),
        ([&h100[..], &["--loss-fraction", "2"]].concat(), "--loss-fraction 2: the share of a sequence's positions"),
        ([&h100[..], &["--memory-gb=-1"]].concat(), "--memory-gb -1: must be a positive number"),
        ([&h100[..], &["--inter-gbps", "10"]].concat(), "--inter-gbps is the bandwidth between nodes, and the cluster has one"),
        ([&h100[..], &["--set", "seq_length=4096"]].concat(), "seq_length 4096 exceeds max_position_embeddings 512"),
    ] {
        let o = plan(&[&args[..], &LARGE].concat());
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {out}{err}");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}
