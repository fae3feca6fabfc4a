//! The original's three tokenizers (`tokenizer_type`): ids equal to the
//! Python reference implementations, command-token ids as the original's
//! classes assign them, the errors for wrong files, stores that know their
//! type, and a short training run plus `generate` with each type.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use glm_worker::data::tokenizer::{GlmTokenizer, TokenizerSpec, TokenizerType};
use serde_json::Value;

const WP: TokenizerType = TokenizerType::WordPiece;
const GPT2: TokenizerType = TokenizerType::Gpt2Bpe;
const SP: TokenizerType = TokenizerType::ChineseSp;

/// The reference models and ids (tests/tokenizer_reference.py), made once
/// per test binary.
fn reference() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // made anew by each run of this binary (training is deterministic)
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tokenizer-reference");
        let python = common::repo().join(".venv/bin/python");
        let o = Command::new(&python)
            .arg(common::repo().join("worker/tests/tokenizer_reference.py"))
            .arg(common::repo().join("glm_pretrain/data/data.json"))
            .arg(common::repo().join("configs/seed/vocab.txt"))
            .arg(&dir)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/setup.sh --test makes the venv with sentencepiece and tokenizers)", python.display()));
        assert!(o.status.success(), "reference script failed (scripts/setup.sh --test installs its packages):\n{}", String::from_utf8_lossy(&o.stderr));
        dir
    })
}

fn cases() -> Vec<Value> {
    let r: Value = serde_json::from_str(&std::fs::read_to_string(reference().join("reference.json")).unwrap()).unwrap();
    r["cases"].as_array().unwrap().clone()
}

fn reference_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(reference().join("reference.json")).unwrap()).unwrap()
}

fn size(model: &str) -> u32 {
    reference_json()["sizes"][model].as_u64().unwrap() as u32
}

fn load(path: &Path, kind: TokenizerType, model_type: &str, fix: bool) -> GlmTokenizer {
    GlmTokenizer::load(path, &TokenizerSpec::new(kind, model_type, fix)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Each type's ids equal its reference implementation's on >= 200 mixed
/// texts: SentencePiece for .model files (unigram, and BPE with byte
/// fallback), `tokenizers`' byte-level BPE for GPT-2 and RoBERTa pairs, and
/// its BERT WordPiece for the seed's vocab.txt, cased and uncased.
#[test]
fn ids_equal_the_reference_implementations_per_type() {
    let r = reference();
    let vocab = common::repo().join("configs/seed/vocab.txt");
    let toks = [
        ("sp_unigram", load(&r.join("sp_unigram.model"), SP, "", false)),
        ("sp_bpe", load(&r.join("sp_bpe.model"), SP, "", true)),
        ("gpt2", load(&r.join("gpt2"), GPT2, "gpt2", false)),
        ("roberta", load(&r.join("roberta/vocab.json"), GPT2, "roberta", false)),
        ("bert_uncased", load(&vocab, WP, "bert-base-uncased", false)),
        ("bert_cased", load(&vocab, WP, "bert-base-cased", false)),
    ];
    let cases = cases();
    assert!(cases.len() >= 200, "{} texts", cases.len());
    // A unigram text can have two best segmentations of equal score (a run
    // of one character longer than the longest piece: 16+16+15 or 15+16+16);
    // SentencePiece and `tokenizers` then break the tie differently. Such a
    // tie is allowed, any other difference is not.
    let scores: Vec<f64> = reference_json()["sp_unigram_scores"].as_array().unwrap().iter().map(|s| s.as_f64().unwrap()).collect();
    let uni = &toks[0].1;
    let tie = |a: &[u32], b: &[u32]| {
        let text = |ids: &[u32]| -> String { ids.iter().map(|&i| uni.id_to_token(i).unwrap()).collect() };
        let total = |ids: &[u32]| -> f64 { ids.iter().map(|&i| scores[i as usize]).sum() };
        text(a) == text(b) && a.len() == b.len() && (total(a) - total(b)).abs() < 1e-3
    };
    let mut ties = 0;
    for (model, tok) in &toks {
        let texts: Vec<String> = cases.iter().map(|c| c["text"].as_str().unwrap().to_string()).collect();
        let batch = tok.encode_batch(texts).unwrap();
        let mut bad = Vec::new();
        for (c, got) in cases.iter().zip(&batch) {
            let want = ids(&c[model]);
            assert_eq!(tok.encode(c["text"].as_str().unwrap()).unwrap(), *got, "{model}: one text and a batch agree");
            let mut one = Vec::new();
            tok.encode_into(c["text"].as_str().unwrap(), &mut one).unwrap();
            assert_eq!(one, *got, "{model}: prepare's encoder (on its thread, no Encoding) and a batch agree");
            if *got != want {
                if *model == "sp_unigram" && tie(&want, got) {
                    ties += 1;
                    continue;
                }
                bad.push(format!("{:?}: {want:?} != {got:?}", c["text"]));
            }
        }
        assert!(bad.is_empty(), "{model}: {} of {} texts differ from the reference:\n{}", bad.len(), cases.len(), bad.join("\n"));
    }
    assert!(ties <= 5, "{ties} ties: not a rare case any more");
    // and SentencePiece's decoding
    for c in &cases {
        let want = ids(&c["sp_unigram"]);
        if !want.contains(&0) {
            assert_eq!(uni.decode(&want, true), c["sp_unigram_decoded"].as_str().unwrap(), "{:?}", c["text"]);
        }
    }
}

/// The command tokens get the ids the original's tokenizer classes give
/// them (data_utils/tokenization.py), for every type and switch, and are
/// matched whole in raw text, whitespace before [MASK]-like ones dropped
/// for GPT-2 and SentencePiece as the original's `lstrip`.
#[test]
fn command_tokens_have_the_original_ids_per_type() {
    let r = reference();
    let table = |t: &GlmTokenizer| -> Vec<(String, u32)> { t.command_tokens().iter().map(|c| (c.name.clone(), c.id)).collect() };
    let named = |v: &[(&str, u32)]| -> Vec<(String, u32)> { v.iter().map(|(n, i)| (n.to_string(), *i)).collect() };

    // BertWordPieceTokenizer, bert-base-chinese's 21128 pieces (the seed's vocab.txt)
    let wp = load(&common::repo().join("configs/seed/vocab.txt"), WP, "bert-base-uncased", false);
    let want = [
        ("pad", 0),
        ("ENC", 101),
        ("MASK", 103),
        ("unk", 100),
        ("sep", 102),
        ("eos", 21132),
        ("sop", 21128),
        ("eop", 21129),
        ("gMASK", 21130),
        ("sMASK", 21131),
    ];
    assert_eq!(table(&wp), named(&want));
    assert_eq!(wp.vocab_size(), 21133);

    // GPT2BPETokenizer with a GPT-2 vocabulary: <|endoftext|> is pad and eos
    let gpt2 = load(&r.join("gpt2"), GPT2, "gpt2", false);
    let (v, eot) = (size("gpt2"), gpt2.encode("<|endoftext|>").unwrap()[0]);
    let want = [
        ("pad", eot),
        ("eos", eot),
        ("sop", v),
        ("eop", v + 1),
        ("ENC", v + 2),
        ("MASK", v + 3),
        ("sep", v + 4),
        ("unk", v + 5),
        ("gMASK", v + 6),
        ("sMASK", v + 7),
    ];
    assert_eq!(table(&gpt2), named(&want));
    assert_eq!(eot, 0, "the special token the BPE was trained with comes first");
    assert_eq!(gpt2.vocab_size() as u32, v + 8);

    // RoBERTa's vocabulary: its own specials stand for the commands
    let rob = load(&r.join("roberta"), GPT2, "roberta", false);
    let v = size("roberta");
    let want = [("pad", 2), ("eos", 2), ("sep", 2), ("ENC", 0), ("MASK", 4), ("unk", 3), ("sop", v), ("eop", v + 1), ("gMASK", v + 2), ("sMASK", v + 3)];
    assert_eq!(table(&rob), named(&want));
    assert_eq!(rob.encode("a [MASK]").unwrap(), [rob.encode("a").unwrap(), vec![4]].concat(), "[MASK] is <mask>'s id, the space before it dropped");

    // ChineseSPTokenizer: as the original without fix_command_token
    // (GLM-10B-chinese: [gMASK] shares <|endofpiece|>'s id) and with it
    let n = size("sp_unigram");
    let model = r.join("sp_unigram.model");
    let head = [("pad", n), ("eos", n), ("sep", n + 1), ("ENC", n + 2), ("MASK", n + 3), ("unk", n + 4), ("sop", n + 6), ("eop", n + 7)];
    let sp = load(&model, SP, "", false);
    assert_eq!(table(&sp), named(&[&head[..], &[("gMASK", n + 7), ("sMASK", n + 8)]].concat()));
    assert_eq!(sp.vocab_size() as u32, n + 9);
    let fixed = load(&model, SP, "", true);
    assert_eq!(table(&fixed), named(&[&head[..], &[("sMASK", n + 8), ("gMASK", n + 9)]].concat()));
    assert_eq!(fixed.vocab_size() as u32, n + 10);
    assert_ne!(sp.sha256, fixed.sha256, "two layouts are two tokenizers to a store");

    // typed in raw text: whole, lstrip for [MASK]/[gMASK]/[sMASK] only
    let text_ids = |t: &str| fixed.encode(t).unwrap();
    assert_eq!(text_ids("春天 [gMASK] 来了"), [text_ids("春天"), vec![n + 9], text_ids(" 来了")].concat());
    assert_eq!(text_ids("春天 [SEP]来了"), [text_ids("春天 "), vec![n + 1], text_ids("来了")].concat());
    assert_eq!(text_ids("<|endoftext|>"), [n]);
    assert_eq!(text_ids(" \n "), Vec::<u32>::new(), "blank text is no tokens, as the original");

    // saved and loaded back (as stores and checkpoints do): the same ids
    let d = tempfile::tempdir().unwrap();
    for t in [&wp, &gpt2, &rob, &sp, &fixed] {
        let p = d.path().join("tokenizer.json");
        std::fs::write(&p, t.to_json().unwrap()).unwrap();
        let back = GlmTokenizer::load_saved(&p).unwrap();
        assert_eq!((back.sha256.as_str(), back.tokenizer_type(), table(&back)), (t.sha256.as_str(), t.tokenizer_type(), table(t)));
        assert_eq!(back.encode("你好 [MASK] world").unwrap(), t.encode("你好 [MASK] world").unwrap());
    }
}

/// A missing or wrong file is an error that names what the type expects.
#[test]
fn wrong_tokenizer_files_are_errors_naming_what_was_expected() {
    let r = reference();
    let err = |p: &Path, kind: TokenizerType, model_type: &str| match GlmTokenizer::load(p, &TokenizerSpec::new(kind, model_type, false)) {
        Ok(_) => panic!("{} loaded as {kind:?}", p.display()),
        Err(e) => e.to_string(),
    };
    let vocab_txt = common::repo().join("configs/seed/vocab.txt");
    let e = err(&vocab_txt, GPT2, "gpt2");
    assert!(e.contains("vocab.txt") && e.contains("expected GPT-2's vocab.json + merges.txt"), "{e}");
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(r.join("gpt2/vocab.json"), d.path().join("vocab.json")).unwrap();
    let e = err(d.path(), GPT2, "gpt2");
    assert!(e.contains("merges.txt: missing: GPT-2's byte-level BPE needs vocab.json and merges.txt side by side"), "{e}");
    let e = err(&r.join("gpt2"), GPT2, "roberta");
    assert!(e.contains("has no <s> token") && e.contains("roberta"), "{e}");
    let e = err(&r.join("roberta"), GPT2, "gpt2");
    assert!(e.contains("no <|endoftext|> token") && e.contains("tokenizer_model_type=roberta"), "{e}");
    let e = err(&vocab_txt, SP, "");
    assert!(e.contains("expected a SentencePiece .model"), "{e}");
    let e = err(&d.path().join("none.model"), SP, "");
    assert!(e.contains("none.model: no such file or folder (expected a SentencePiece .model"), "{e}");
    let e = err(d.path(), SP, "");
    assert!(e.contains("no .model file in this folder"), "{e}");
    // a saved tokenizer.json of one type is not used as another
    let saved = d.path().join("tokenizer.json");
    std::fs::write(&saved, load(&r.join("sp_unigram.model"), SP, "", false).to_json().unwrap()).unwrap();
    let e = err(&saved, GPT2, "gpt2");
    assert!(e.contains("holds a ChineseSPTokenizer tokenizer") && e.contains("the run asks for GPT2BPETokenizer"), "{e}");
    let e = match GlmTokenizer::load(&saved, &TokenizerSpec::new(SP, "", true)) {
        Ok(_) => panic!("the unfixed layout loaded as the fixed one"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("fix_command_token"), "{e}");
}

fn worker() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_glm-worker"));
    c.current_dir(common::repo()).env("OMP_NUM_THREADS", "1");
    c
}

fn run(args: &[&str]) -> Output {
    worker().args(args).output().unwrap()
}

/// The store records the tokenizer type, and one built with another type
/// is rebuilt, saying why.
#[test]
fn a_store_knows_its_tokenizer_type() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let corpus = d.path().join("c.json");
    common::corpus_slice(&corpus, 50);
    let (store, cache) = (d.path().join("store").display().to_string(), d.path().join("model").display().to_string());
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a = vec!["prepare", "--data", corpus.to_str().unwrap(), "--out", &store, "--tokenizer-cache", &cache];
        a.extend(extra);
        if !extra.contains(&"--vocab-size") {
            a.extend(["--vocab-size", "300"]);
        }
        a.into_iter().map(String::from).collect()
    };
    let prepare = |extra: &[&str]| common::ok(&worker().args(args(extra)).output().unwrap());
    prepare(&[]);
    let meta = |k: &str| -> Value { serde_json::from_str::<Value>(&std::fs::read_to_string(Path::new(&store).join("meta.json")).unwrap()).unwrap()[k].clone() };
    assert_eq!(meta("tokenizer_type"), "BertWordPieceTokenizer");
    let sp_model = r.join("sp_unigram.model").display().to_string();
    // a store of another tokenizer type is not replaced without --force
    let o = worker().args(args(&["--tokenizer-type", "ChineseSPTokenizer", "--tokenizer", &sp_model])).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("it was built with another tokenizer (a BertWordPieceTokenizer tokenizer") && e.contains("--force"), "{e}");
    assert_eq!(meta("tokenizer_type"), "BertWordPieceTokenizer");
    let out = prepare(&["--tokenizer-type", "ChineseSPTokenizer", "--tokenizer", &sp_model, "--force"]);
    assert!(out.contains("rebuilt"), "{out}");
    assert_eq!(meta("tokenizer_type"), "ChineseSPTokenizer");
    // the store's own tokenizer.json rebuilds it without naming the type again
    let saved = Path::new(&store).join("tokenizer.json").display().to_string();
    let out = prepare(&["--tokenizer", &saved]);
    assert!(out.contains("is up to date"), "{out}");
    // a tokenizer trained on the corpus for each type, cached under its own name
    prepare(&["--tokenizer-type", "GPT2BPETokenizer", "--force"]);
    let e = String::from_utf8_lossy(&worker().args(args(&["--tokenizer-type", "ChineseSPTokenizer"])).output().unwrap().stderr).into_owned();
    assert!(e.contains("a unigram model keeps a piece for every character of the corpus, and it has more than the vocabulary size 300"), "{e}");
    prepare(&["--tokenizer-type", "ChineseSPTokenizer", "--fix-command-token", "--vocab-size", "3000", "--force"]);
    let names: Vec<String> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    for end in ["-v300.json", "-v300-gpt2bpe.json", "-v3000-chinesesp-fixed.json"] {
        assert!(names.len() == 3 && names.iter().any(|n| n.ends_with(end)), "{end}: {names:?}");
    }
    let e = String::from_utf8_lossy(&worker().args(args(&["--tokenizer-type", "SentencePiece"])).output().unwrap().stderr).into_owned();
    assert!(e.contains("--tokenizer-type SentencePiece: expected one of BertWordPieceTokenizer, GPT2BPETokenizer, ChineseSPTokenizer"), "{e}");
}

/// Each type trains (given files, or trained on the corpus) and its
/// checkpoint generates text, in its own ids.
#[test]
fn each_type_trains_and_generates() {
    let r = reference();
    let d = tempfile::tempdir().unwrap();
    let ds = common::repo().join("configs/config_block_tiny.json");
    let corpus = d.path().join("corpus.json");
    common::corpus_slice(&corpus, 100);
    let runs: [(&str, &[String]); 4] = [
        ("gpt2", &["tokenizer_type=GPT2BPETokenizer".into(), format!("tokenizer_path={}", r.join("gpt2").display())]),
        ("sp", &["tokenizer_type=ChineseSPTokenizer".into(), format!("tokenizer_path={}", r.join("sp_unigram.model").display()), "task_mask=true".into()]),
        ("gpt2-trained", &["tokenizer_type=GPT2BPETokenizer".into(), "tokenizer_path=null".into()]),
        ("sp-trained", &["tokenizer_type=ChineseSPTokenizer".into(), "tokenizer_path=null".into(), "fix_command_token=true".into()]),
    ];
    for (name, sets) in runs {
        let dir = d.path().join(name);
        let save = dir.join("ckpt");
        let mut sets: Vec<String> = sets.to_vec();
        sets.extend(["train_iters=3".into(), "eval_interval=0".into(), format!("save={}", save.display()), "save_interval=3".into()]);
        // a unigram model needs a piece per character: more than 600
        let args = common::tiny_train_args(&dir, &ds, &corpus, 3000, &sets);
        let out = common::ok(&worker().args(&args).output().unwrap());
        assert!(out.contains("tokenizer_type") && save.join("3/tokenizer.json").is_file(), "{name}: {out}");
        let o = run(&["generate", "--load", &save.display().to_string(), "--text", "明月[MASK]", "--max-tokens", "3"]);
        let g = common::ok(&o);
        assert!(g.contains("blank 0:"), "{name}: {g}");
        let saved = GlmTokenizer::load_saved(&save.join("3/tokenizer.json")).unwrap();
        let kind = if name.starts_with("gpt2") { GPT2 } else { SP };
        assert_eq!(saved.tokenizer_type(), kind, "{name}");
        assert!(g.contains("(iteration 3)"), "{name}: {g}");
    }
}
