"""Reference ids for tests/tokenizers.rs, from the Python reference
implementations (`sentencepiece`, `tokenizers`; scripts/setup.sh --test
installs them into .venv).

No model hub is reachable, so the models are made here: a SentencePiece
unigram model and a SentencePiece BPE model with byte fallback (both as
the original's ChineseSPTokenizer loads them: a .model file), GPT-2-style
and RoBERTa-style byte-level BPE pairs (vocab.json + merges.txt, as the
original's GPT2BPETokenizer loads them), all trained on the default corpus
plus some English. Then >= 200 mixed texts (Chinese, English, emoji,
punctuation, odd whitespace) and each model's ids for them.

usage: tokenizer_reference.py CORPUS.json BERT_VOCAB.txt OUT_DIR
"""

import json
import os
import random
import sys

import sentencepiece as spm
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

corpus_json, bert_vocab, out = sys.argv[1:4]
os.makedirs(out, exist_ok=True)
docs = [d["content"] for d in json.load(open(corpus_json, encoding="utf-8"))]
english = [
    "The quick brown fox jumps over the lazy dog.",
    "General Language Model pretraining with autoregressive blank infilling.",
    "It's a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "Don't panic! We'll train 3 models on 2 GPUs in 10 minutes, won't we?",
    "Numbers like 3.14159 and 2,718 appear too; so do e-mail addresses: someone@example.org.",
]
lines = [l for d in docs[:2000] for l in d.split("\n") if l.strip()] + english * 30
with open(os.path.join(out, "train.txt"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")

common = dict(input=os.path.join(out, "train.txt"), vocab_size=3000, character_coverage=0.98, minloglevel=2, num_threads=1)
spm.SentencePieceTrainer.train(model_prefix=os.path.join(out, "sp_unigram"), model_type="unigram", **common)
spm.SentencePieceTrainer.train(model_prefix=os.path.join(out, "sp_bpe"), model_type="bpe", byte_fallback=True, **common)

for name, specials in [("gpt2", ["<|endoftext|>"]), ("roberta", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])]:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(lines, vocab_size=2000, min_frequency=2, special_tokens=specials, show_progress=False)
    os.makedirs(os.path.join(out, name), exist_ok=True)
    bpe.save_model(os.path.join(out, name))

fragments = [
    "你好，世界！", "Hello, World!", "GLM-10B", "😀👍🏽", "🇨🇳", "  多个  空格  ", "\ttab\there", "line\nbreak", "ＡＢＣ全角１２３",
    "（括号）【方括号】", "“引号”‘单引号’", "e.g. 3.14159", "naïve café", "Ünïcödé", "a—b–c", "…省略号……", "¡Hola!", "日本語のテキスト",
    "한국어", "x=1;y=2", " leading", "trailing ", "$100 & 50%", "<html>", "don't won't", "ＧＰＴ", "①②③", "㈱", "ﬁ ligature",
    "\u200bzero\u200bwidth", "", " ", "Mr. Smith went to Washington.", "春眠不觉晓，处处闻啼鸟。", "The 2nd of May, 2021", "<s>hi</s>",
    "<unk>", "a<pad>b", "龘靐齉", "Ω≈ç√∫", "🤖 robots 机器人", "\r\nCRLF", "   ", "ALL CAPS and MiXeD cAsE",
]
rnd = random.Random(20)
texts = list(fragments)
texts += [rnd.choice(fragments) + rnd.choice(["", " ", "  ", "\n"]) + rnd.choice(fragments) for _ in range(150)]
texts += [rnd.choice(docs)[: rnd.randrange(10, 200)] for _ in range(100)]


def blank_or(ids, t):
    # the original's split_on_tokens: blank text is no tokens
    return [] if not t.strip() else ids


unigram = spm.SentencePieceProcessor(model_file=os.path.join(out, "sp_unigram.model"))
sp_bpe = spm.SentencePieceProcessor(model_file=os.path.join(out, "sp_bpe.model"))
gpt2 = ByteLevelBPETokenizer(os.path.join(out, "gpt2", "vocab.json"), os.path.join(out, "gpt2", "merges.txt"))
roberta = ByteLevelBPETokenizer(os.path.join(out, "roberta", "vocab.json"), os.path.join(out, "roberta", "merges.txt"))
uncased = BertWordPieceTokenizer(bert_vocab, lowercase=True)
cased = BertWordPieceTokenizer(bert_vocab, lowercase=False, strip_accents=False)

cases = []
for t in texts:
    cases.append(
        {
            "text": t,
            "sp_unigram": blank_or(unigram.encode(t), t),
            "sp_unigram_decoded": unigram.decode(unigram.encode(t)),
            "sp_bpe": blank_or(sp_bpe.encode(t), t),
            "gpt2": blank_or(gpt2.encode(t).ids, t),
            "roberta": blank_or(roberta.encode(t).ids, t),
            "bert_uncased": uncased.encode(t, add_special_tokens=False).ids,
            "bert_cased": cased.encode(t, add_special_tokens=False).ids,
        }
    )
sizes = {"sp_unigram": unigram.get_piece_size(), "sp_bpe": sp_bpe.get_piece_size(), "gpt2": gpt2.get_vocab_size(), "roberta": roberta.get_vocab_size()}
with open(os.path.join(out, "reference.json"), "w", encoding="utf-8") as f:
    # piece scores, to tell a tie between two best segmentations from a difference
    scores = [unigram.get_score(i) for i in range(unigram.get_piece_size())]
    json.dump({"sizes": sizes, "cases": cases, "sp_unigram_scores": scores}, f, ensure_ascii=False)
