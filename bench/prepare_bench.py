#!/usr/bin/env python3
"""`glm-worker prepare` at scale against the Hugging Face `tokenizers` library
(scripts/bench.sh prepare; a benchmark, not a test).

The corpus: the default corpus (glm_pretrain/data/data.json), the Chinese
fortunes it was made from, and the other text of this Debian machine
(/usr/share/doc, compressed or not, vim's documentation, the common licenses)
cut into documents of a few paragraphs; documents drawn at random (seed
1234, half of them Chinese) into JSON Lines `{"text": ...}` until the size
is reached, so consecutive documents differ and nothing repeats in a
cache-friendly way. Texts are written as prepare's reader would leave them
(curly quotes standardised, trimmed), so both sides tokenize the same text:
their token counts must agree.

Two tokenizers: the seed's bert-base-chinese vocab.txt, and a WordPiece of
16000 ids that prepare trains on the corpus's first 64 MB. Python loads each
from the tokenizer.json that prepare saved (the `tokenizers` library's own
format once GLM's `glm` table is dropped) and encodes the same texts with
`encode_batch_fast` in batches of 4 MB, timing the encoding alone (reading
and JSON parsing left out, so the baseline is the library at its fastest),
with RAYON_NUM_THREADS=1 and 2. prepare is timed as it reports (reading,
parsing, tokenizing, writing the store, hashing the corpus) with --workers 1
and 2. Then prepare with 2 workers at every size: peak resident memory.

    .venv/bin/python bench/prepare_bench.py --bin target/release/glm-worker \\
        --vocab ../shared/seed/vocab.txt --sizes 0.5,1,2 --work /tmp/prep-bench
"""

import argparse
import gzip
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CURLY = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u2013": "-"})
# what Rust's str::trim strips: White_Space (Python's strip also takes \x1c-\x1f)
RUST_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def clean(text):
    """The text as prepare's default reader leaves it."""
    return text.strip(RUST_SPACE).translate(CURLY)


def text_of(path):
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            return None
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def documents(text, limit=3000):
    """Paragraphs (blank-line separated) grouped into documents of about `limit` characters."""
    doc = []
    size = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        doc.append(para)
        size += len(para)
        if size >= limit:
            yield "\n\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n\n".join(doc)


def pool(root):
    zh, en = [], []
    for r in json.load(open(root / "glm_pretrain/data/data.json", encoding="utf-8")):
        zh.append((r.get("title") or "") + (r.get("content") or ""))
    for name in ["chinese", "tang300", "song100"]:
        p = Path("/usr/share/games/fortunes") / name
        if p.is_file():
            zh.extend(p.read_text(encoding="utf-8", errors="replace").split("\n%\n"))
    sources = []
    for base in ["/usr/share/doc", "/usr/share/vim", "/usr/share/common-licenses"]:
        for dirpath, _, names in os.walk(base):
            for n in sorted(names):
                p = Path(dirpath) / n
                if p.is_file() and not p.is_symlink() and p.suffix.lower() in {"", ".gz", ".txt", ".md", ".rst", ".debian"} | {".Debian"}:
                    sources.append(p)
    for p in sorted(sources):
        t = text_of(p)
        if t:
            en.extend(documents(t))
    keep = lambda docs: [c for c in (clean(d) for d in docs) if c]
    return keep(zh), keep(en)


def generate(path, size, zh, en, seed=1234):
    """JSON Lines of documents drawn at random until `size` bytes."""
    rng = random.Random(seed)
    line = lambda t: (json.dumps({"text": t}, ensure_ascii=False) + "\n").encode("utf-8")
    zl, el = [line(t) for t in zh], [line(t) for t in en]
    written = 0
    with open(path, "wb") as f:
        buf = []
        while written < size:
            b = rng.choice(zl) if rng.random() < 0.5 else rng.choice(el)
            buf.append(b)
            written += len(b)
            if len(buf) >= 4096:
                f.write(b"".join(buf))
                buf.clear()
        f.write(b"".join(buf))
    return written


def hf(data, tokenizer, batch_bytes=4 << 20):
    """Encodes every text of `data` with `tokenizer` (a tokenizers JSON): one JSON line of figures."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    encode_s = 0.0
    tokens = text_bytes = docs = 0
    t0 = time.perf_counter()

    def run(batch):
        nonlocal encode_s, tokens
        t = time.perf_counter()
        encs = tok.encode_batch_fast(batch, add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encs)
        encode_s += time.perf_counter() - t

    batch, size = [], 0
    with open(data, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            batch.append(text)
            n = len(text.encode("utf-8"))
            size += n
            text_bytes += n
            docs += 1
            if size >= batch_bytes:
                run(batch)
                batch, size = [], 0
    if batch:
        run(batch)
    wall = time.perf_counter() - t0
    peak = vm_hwm()
    print(json.dumps({"docs": docs, "text_bytes": text_bytes, "tokens": tokens, "encode_s": encode_s, "wall_s": wall, "peak_rss": peak}))


def vm_hwm():
    """This program's peak resident memory (bytes): VmHWM, which starts afresh at exec
    (getrusage's maximum also counts the parent that forked the process)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def plain_tokenizer(glm_json, out):
    """A tokenizer.json that the tokenizers library loads: prepare's without its `glm` table."""
    v = json.load(open(glm_json, encoding="utf-8"))
    v.pop("glm", None)
    json.dump(v, open(out, "w", encoding="utf-8"), ensure_ascii=False)
    return out


LINE = re.compile(
    r"tokenized (?P<mb>[\d.]+) MB of text in (?P<s>[\d.]+) s = (?P<mbs>[\d.]+) MB/s, (?P<tps>\d+) tokens/s \((?P<built>\d+) of (?P<shards>\d+) shards.*?(?P<workers>\d+) workers?, peak resident memory (?P<rss>\d+) MB\)"
)


def ours(binary, data, tokenizer, out, workers, extra=()):
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [binary, "prepare", "--data", str(data), "--out", str(out), "--tokenizer", str(tokenizer), "--workers", str(workers), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"prepare failed: {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    m = LINE.search(p.stdout)
    if not m:
        sys.exit(f"no rate line in prepare's output:\n{p.stdout}")
    meta = json.load(open(out / "meta.json"))
    shutil.rmtree(out, ignore_errors=True)
    r = {k: float(v) for k, v in m.groupdict().items()}
    r.update(wall=wall, tokens=meta["tokens"], text_bytes=meta["text_bytes"], docs=meta["documents"])
    return r


def python(data, tokenizer, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="true")
    p = subprocess.run([sys.executable, __file__, "hf", "--data", str(data), "--tokenizer", str(tokenizer)], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"the tokenizers run failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    h = sub.add_parser("hf", help="(internal) the tokenizers side of one run")
    h.add_argument("--data", required=True)
    h.add_argument("--tokenizer", required=True)
    ap.add_argument("--bin", default="target/release/glm-worker")
    ap.add_argument("--vocab", default="../shared/seed/vocab.txt")
    ap.add_argument("--sizes", default=os.environ.get("GLM_BENCH_PREPARE_GB", "0.5,1,2"), help="corpus sizes in GB (10^9 bytes): the first for the comparison, all for memory")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--repeat", type=int, default=int(os.environ.get("GLM_BENCH_PREPARE_REPEAT", "1")), help="runs of each comparison, the fastest kept")
    a = ap.parse_args()
    if a.cmd == "hf":
        return hf(a.data, a.tokenizer)
    root = Path(__file__).resolve().parent.parent
    sizes = [float(s) for s in a.sizes.split(",") if s.strip()]
    work = Path(a.work) if a.work else Path(__import__("tempfile").mkdtemp(prefix="prep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    binary = str(Path(a.bin).resolve())
    try:
        t = time.perf_counter()
        zh, en = pool(root)
        print(f"corpus pool: {len(zh)} Chinese documents ({sum(len(d.encode()) for d in zh) / 1e6:.1f} MB), "
              f"{len(en)} other documents ({sum(len(d.encode()) for d in en) / 1e6:.1f} MB) in {time.perf_counter() - t:.0f} s", flush=True)
        corpora = {}
        for gb in sizes:
            path = work / f"corpus-{gb:g}GB.jsonl"
            if not path.is_file():
                generate(path, int(gb * 1e9), zh, en)
            corpora[gb] = path
        first = corpora[sizes[0]]
        print(f"corpora: {', '.join(f'{p.name} {p.stat().st_size / 1e9:.2f} GB' for p in corpora.values())}; {os.cpu_count()} cores; "
              f"the machine may be shared: timings move", flush=True)

        # the tokenizers: the seed vocab as prepare saves it, and one trained on the corpus
        vocab_store = work / "vocab-store"
        probe = work / "probe.jsonl"
        with open(first, "rb") as f, open(probe, "wb") as g:
            g.write(f.read(1 << 20).rsplit(b"\n", 1)[0] + b"\n")
        subprocess.run([binary, "prepare", "--data", str(probe), "--out", str(vocab_store), "--tokenizer", a.vocab], check=True, capture_output=True)
        seed_tok = vocab_store / "tokenizer.json"
        train = work / "train.jsonl"
        with open(first, "rb") as f, open(train, "wb") as g:
            g.write(f.read(64 << 20).rsplit(b"\n", 1)[0] + b"\n")
        t = time.perf_counter()
        subprocess.run([binary, "prepare", "--data", str(train), "--out", str(work / "train-store"), "--tokenizer-cache", str(work / "model"),
                        "--vocab-size", "16000"], check=True, capture_output=True)
        trained_tok = next((work / "model").glob("tokenizer-*.json"))
        print(f"trained WordPiece (16000 ids) on 64 MB in {time.perf_counter() - t:.0f} s", flush=True)
        toks = {"seed vocab.txt (bert-base-chinese)": seed_tok, "trained WordPiece 16000": trained_tok}

        best = {}  # (tokenizer, run) -> the fastest of the repeats: (MB/s, tokens/s, peak MB, tokens, s)
        keep = lambda key, row: best.__setitem__(key, max(best.get(key, row), row))
        for rep in range(a.repeat):
            for name, tok in toks.items():
                plain = plain_tokenizer(tok, work / f"plain-{tok.parent.name}.json")
                for n in (1, 2):  # the two sides alternate, so a load that comes and goes hits both
                    r = ours(binary, first, tok, work / "store", n)
                    keep((name, f"glm-worker prepare --workers {n}"), (r["mbs"], r["tps"], r["rss"], r["tokens"], r["s"]))
                    print(f"  {name}: prepare --workers {n}: {r['mbs']:.2f} MB/s, {r['tps']:.0f} tokens/s, {r['s']:.1f} s, peak {r['rss']:.0f} MB", flush=True)
                    r = python(first, plain, n)
                    mbs, tps = r["text_bytes"] / 1e6 / r["encode_s"], r["tokens"] / r["encode_s"]
                    keep((name, f"tokenizers encode_batch_fast, {n} thread{'s' if n > 1 else ''}"), (mbs, tps, r["peak_rss"] / 1e6, r["tokens"], r["encode_s"]))
                    print(f"  {name}: tokenizers {n} thread(s): {mbs:.2f} MB/s, {tps:.0f} tokens/s, {r['encode_s']:.1f} s encoding "
                          f"({r['wall_s']:.1f} s with reading), peak {r['peak_rss'] / 1e6:.0f} MB", flush=True)
        rows = [(name, run, *v) for (name, run), v in best.items()]

        again = f", the fastest of {a.repeat} runs each" if a.repeat > 1 else ""
        print(f"\n== {first.name}: prepare (read, parse, tokenize, write; MB of text) against tokenizers (encoding only){again}")
        print(f"| tokenizer | run | MB/s | tokens/s | s | peak RSS MB | tokens |")
        print(f"|---|---|---|---|---|---|---|")
        for name, run, mbs, tps, rss, tokens, s in sorted(rows, key=lambda r: (list(toks).index(r[0]), r[1])):
            print(f"| {name} | {run} | {mbs:.2f} | {tps:,.0f} | {s:.1f} | {rss:.0f} | {tokens:,} |")
        for name in toks:
            r = {run: (mbs, tokens) for n, run, mbs, _, _, tokens, _ in rows if n == name}
            o1, o2 = r["glm-worker prepare --workers 1"], r["glm-worker prepare --workers 2"]
            p1, p2 = r["tokenizers encode_batch_fast, 1 thread"], r["tokenizers encode_batch_fast, 2 threads"]
            same = "equal" if o1[1] == o2[1] == p1[1] == p2[1] else f"DIFFER ({o1[1]}, {o2[1]}, {p1[1]}, {p2[1]})"
            print(f"{name}: per core {o1[0] / p1[0]:.2f}x tokenizers; 2 workers {o2[0] / o1[0]:.2f}x 1 worker "
                  f"(tokenizers: 2 threads {p2[0] / p1[0]:.2f}x 1); at 2: {o2[0] / p2[0]:.2f}x tokenizers; token counts {same}")

        print(f"\n== memory as the corpus grows: prepare --workers 2, seed vocab.txt")
        print("| corpus | MB/s | tokens/s | s | shards | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for gb, path in corpora.items():
            r = ours(binary, path, seed_tok, work / "store", 2)
            print(f"| {path.stat().st_size / 1e9:.2f} GB | {r['mbs']:.2f} | {r['tps']:,.0f} | {r['s']:.1f} | {r['shards']:.0f} | {r['rss']:.0f} |", flush=True)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
