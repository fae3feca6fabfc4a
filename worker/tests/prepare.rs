//! `glm-worker prepare` at scale, as a user runs it: a store in shards
//! tokenized by several workers; a prepare killed midway and run again; slices
//! prepared one by one and joined; a format-1 store still used; and the
//! flags' errors, one line each.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use glm_worker::data::store::TokenStore;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_glm-worker"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn seed_vocab() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seed/vocab.txt");
    assert!(p.is_file(), "{} missing: tests need the shared seed folder beside the checkout", p.display());
    p.display().to_string()
}

/// A corpus folder of about 30 KB: JSON Lines and text.
fn corpus(dir: &Path) -> PathBuf {
    let c = dir.join("corpus");
    std::fs::create_dir_all(&c).unwrap();
    let poems = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "春眠不觉晓，处处闻啼鸟。", "Hello world, this is GLM."];
    let lines: String = (0..400).map(|i| serde_json::json!({"text": format!("{i}: {}", poems[i % 4].repeat(1 + i % 3))}).to_string() + "\n").collect();
    std::fs::write(c.join("a.jsonl"), lines).unwrap();
    let docs: String = (0..60).map(|i| format!("doc {i}\n{}\n\n", poems[(i + 1) % 4])).collect();
    std::fs::write(c.join("b.txt"), docs).unwrap();
    c
}

fn prepare(corpus: &Path, out: &Path, extra: &[&str]) -> Output {
    let vocab = seed_vocab();
    let mut args = vec!["prepare", "--data", corpus.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tokenizer", &vocab];
    args.extend(extra);
    worker().args(&args).output().unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    stdout(&o)
}

/// The store's files by name (progress files none), with their bytes.
fn files(store: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

fn docs(store: &Path) -> Vec<Vec<u32>> {
    let st = TokenStore::open(store).unwrap();
    (0..st.num_docs()).map(|i| st.doc(i)).collect()
}

fn shards_done(partial: &Path) -> usize {
    std::fs::read_dir(partial).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".json")).count() - 2
    // plan.json, tokenizer.json
}

/// A prepare killed (SIGKILL) after some shards keeps them; run again, it
/// continues and gives the uninterrupted store byte for byte.
#[test]
fn a_killed_prepare_continues_to_the_same_store() {
    let d = tempfile::tempdir().unwrap();
    let c = corpus(d.path());
    let flags = ["--shard-size", "2K", "--workers", "2"];
    let (whole, again) = (d.path().join("whole"), d.path().join("again"));
    let s = ok(prepare(&c, &whole, &flags));
    assert!(s.contains("prepare: tokenized") && s.contains("2 workers") && s.contains("peak resident memory"), "{s}");
    // "(N of N shards of 2 KiB input, ...)"
    let line = s.lines().find(|l| l.starts_with("prepare: tokenized")).unwrap();
    let words: Vec<&str> = line.split('(').nth(1).unwrap().split_whitespace().collect();
    let total: usize = words[2].parse().unwrap();
    assert_eq!(words[..4], [words[2], "of", words[2], "shards"], "{line}");
    assert!(total >= 8, "{s}");

    let o = worker()
        .args(["prepare", "--data", c.to_str().unwrap(), "--out", again.to_str().unwrap(), "--tokenizer", &seed_vocab()])
        .args(flags)
        .env("GLM_TEST_PREPARE_KILL", "3")
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(libc::SIGKILL), "{}{}", stdout(&o), stderr(&o));
    let partial = d.path().join(".again.partial");
    assert!(!again.exists() && partial.join("plan.json").is_file());
    let kept = shards_done(&partial);
    assert!((3..total).contains(&kept), "{kept} of {total} shards done");

    let s = ok(prepare(&c, &again, &flags));
    assert!(s.contains(&format!("prepare: {kept} of {total} shards were done before (an interrupted run or slices) and are kept")), "{s}");
    assert!(s.contains(&format!("({} of {total} shards", total - kept)), "{s}");
    assert!(!partial.exists());
    assert_eq!(files(&again), files(&whole), "the same store, byte for byte (meta.json too)");
    assert_eq!(docs(&again), docs(&whole));

    // a partial build of other settings is discarded, saying so
    let other = d.path().join("other");
    let o = worker()
        .args(["prepare", "--data", c.to_str().unwrap(), "--out", other.to_str().unwrap(), "--tokenizer", &seed_vocab()])
        .args(flags)
        .env("GLM_TEST_PREPARE_KILL", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(libc::SIGKILL));
    let s = ok(prepare(&c, &other, &["--shard-size", "3K"]));
    assert!(s.contains("discarded the partial build in") && s.contains("it was of another shard size (2 KiB there, 3 KiB here)"), "{s}");
    assert_eq!(docs(&other), docs(&whole), "other shards, the same documents");
}

/// Slices prepared one by one (as processes or nodes would, beside each
/// other) and joined give the store of one prepare; the join renames the
/// shards into place, it does not copy them.
#[test]
fn slices_joined_equal_one_prepare() {
    let d = tempfile::tempdir().unwrap();
    let c = corpus(d.path());
    let (one, sliced) = (d.path().join("one"), d.path().join("sliced"));
    ok(prepare(&c, &one, &["--shard-size", "2K"]));
    let s = ok(prepare(&c, &sliced, &["--shard-size", "2K", "--slice", "0/2", "--workers", "1"]));
    assert!(s.contains("prepare: slice 0/2: tokenized") && s.contains("the other slices' are to do, then prepare --join installs the store"), "{s}");
    assert!(!sliced.exists());
    // joining too early names what is missing and whose it is
    let o = worker().args(["prepare", "--out", sliced.to_str().unwrap(), "--join"]).output().unwrap();
    let e = stderr(&o);
    assert!(!o.status.success() && e.lines().count() == 1, "{e}");
    assert!(e.contains("--join: ") && e.contains("shards not done: units 1, 3, 5") && e.contains("(slice 1/2: not run)"), "{e}");
    // a slice of other settings may not mix in
    let o = prepare(&c, &sliced, &["--shard-size", "3K", "--slice", "1/2"]);
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("a partial build of this store with another shard size") && e.contains("slices 0/2 (done) work in it"), "{e}");
    let s = ok(prepare(&c, &sliced, &["--shard-size", "2K", "--slice", "1/2"]));
    assert!(s.contains("every shard is done: install the store with glm-worker prepare --out") && s.contains("--join"), "{s}");
    let partial = d.path().join(".sliced.partial");
    let inode = std::fs::metadata(partial.join("shard-00001.tokens.bin")).unwrap().ino();
    let o = worker().args(["prepare", "--out", sliced.to_str().unwrap(), "--join", "--data", c.to_str().unwrap()]).output().unwrap();
    let s = ok(o);
    assert!(s.contains("prepare: joined the") && s.contains("(renamed, no tokens copied)") && s.contains("documents in"), "{s}");
    assert_eq!(std::fs::metadata(sliced.join("shard-00001.tokens.bin")).unwrap().ino(), inode, "moved, not copied");
    assert!(!partial.exists());
    assert_eq!(files(&sliced), files(&one), "the same store, byte for byte");
    // the store is up to date for a plain prepare and for a slice
    assert!(ok(prepare(&c, &sliced, &["--shard-size", "2K"])).contains("is up to date"));
    assert!(ok(prepare(&c, &sliced, &["--slice", "1/2"])).contains("slice 1/2 has nothing to do"));
}

/// A store of format 1 (one tokens.bin and index.bin) is still read: a
/// prepare of the same corpus and tokenizer finds it up to date, and
/// samples are drawn from it.
#[test]
fn a_format_1_store_is_still_used() {
    let d = tempfile::tempdir().unwrap();
    let c = corpus(d.path());
    let store = d.path().join("store");
    ok(prepare(&c, &store, &["--shard-size", "0"]));
    let want = docs(&store);
    // as format 1 wrote it: the files' own names, version 1 in their headers and in meta.json, no shards
    for (shard, old) in [("shard-00000.tokens.bin", "tokens.bin"), ("shard-00000.index.bin", "index.bin")] {
        let mut b = std::fs::read(store.join(shard)).unwrap();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        std::fs::write(store.join(old), b).unwrap();
        std::fs::remove_file(store.join(shard)).unwrap();
    }
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(store.join("meta.json")).unwrap()).unwrap();
    meta["format_version"] = 1.into();
    meta.as_object_mut().unwrap().remove("shards");
    std::fs::write(store.join("meta.json"), serde_json::to_string_pretty(&meta).unwrap()).unwrap();
    assert_eq!(docs(&store), want);
    assert!(ok(prepare(&c, &store, &[])).contains("is up to date"));
    ok(worker().args(["samples", "--store", store.to_str().unwrap(), "--count", "2", "--seq-length", "32"]).output().unwrap());
}

/// Bad values of the new flags: one line naming the flag, exit 1, nothing
/// done.
#[test]
fn the_flags_errors_name_the_flag() {
    let d = tempfile::tempdir().unwrap();
    let c = corpus(d.path());
    let out = d.path().join("store");
    let vocab = seed_vocab();
    for (extra, want) in [
        (vec!["--shard-size", "12X"], "--shard-size 12X: unknown unit \"X\"; expected auto, 0 (one shard), a number of bytes or a size such as 256M or 1G"),
        (vec!["--shard-size", "1.5Q"], "--shard-size 1.5Q: unknown unit"),
        (vec!["--workers", "0"], "--workers 0: must be at least 1 (omit it for one per core"),
        (vec!["--slice", "3/2"], "--slice 3/2: expected i/n with 0 <= i < n (slices are numbered from 0: 0/2 to 1/2)"),
        (vec!["--slice", "1"], "--slice 1: expected i/n, e.g. 0/4"),
        (vec!["--join", "--slice", "0/2"], "--join with --slice: the slices tokenize"),
        (vec!["--join", "--workers", "2"], "--workers with --join: the store is what the slices tokenized"),
        (vec!["--join"], "--join: no partial build of"),
    ] {
        let mut args = vec!["prepare", "--data", c.to_str().unwrap(), "--out", out.to_str().unwrap()];
        if !extra.contains(&"--join") {
            args.extend(["--tokenizer", &vocab]);
        }
        args.extend(&extra);
        let o = worker().args(&args).output().unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {e}");
        assert_eq!(e.lines().count(), 1, "{extra:?}: one line: {e}");
        assert!(e.starts_with("glm-worker: error: ") && e.contains(want), "{extra:?}: {e}");
    }
    let mut left: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["corpus"], "nothing written");
}
