"""PyTorch side of worker/tests/deepspeed.rs: files in the original's
DeepSpeed layout, written and read by PyTorch itself, and the loss of their
weights computed by bench/glm_torch.py's GLM.

  write --out DIR --vocab V --layers L --hidden H --heads N --max-pos P --tp T
        [--dtype fp32|fp16] [--iteration I] [--drop KEY] [--extra KEY]
        [--int KEY] [--no-args] [--seed S]
      A random GLM state dict under the original's names (GLMModel's), cut
      into T tensor-parallel parts as change_mp.py cuts them, saved as
      DIR/I/mp_rank_XX_model_states.pt with what GLM's DeepSpeed runs save
      beside the weights (an argparse Namespace, optimizer, scheduler and
      random states), and DIR/latest_checkpointed_iteration.txt.
  loss --ckpt DIR --batches FILE
      Merges DIR's parts as change_mp.py does, loads them into glm_torch's
      GLM (fp32) and prints {mode: token-weighted loss} over the batches
      FILE holds (glm-worker's GLM_EVAL_BATCHES lines).
  check-export --export DIR --safetensors FILE [--parts T]
      torch.load (its default, weights_only=True) of every exported part;
      the merged weights must equal FILE's (a checkpoint's
      model.safetensors, read with numpy), and the T parts must be
      change_mp.py's split of them. Prints "ok".

The change_mp.py logic below is the original's (split: "Increase MP size",
merge: "Decrease MP size"), kept to the lines that touch GLM's tensors.
"""
import argparse
import collections
import json
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))
import glm_torch  # noqa: E402


def state_dict(vocab, h, layers, ffn, max_pos, seed):
    """Random weights large enough that the loss depends on every one of
    them (a misplaced slice changes it by far more than the tolerance)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std: torch.randn(*shape, generator=g) * std
    sd = collections.OrderedDict()
    sd["word_embeddings.weight"] = rnd(vocab, h, std=1.0)
    sd["transformer.position_embeddings.weight"] = rnd(max_pos + 1, h, std=0.5)
    sd["transformer.block_position_embeddings.weight"] = rnd(max_pos + 1, h, std=0.5)
    for i in range(layers):
        n = f"transformer.layers.{i}"
        for ln in ["input_layernorm", "post_attention_layernorm"]:
            sd[f"{n}.{ln}.weight"] = 1 + rnd(h, std=0.1)
            sd[f"{n}.{ln}.bias"] = rnd(h, std=0.1)
        for name, rows, cols in [("attention.query_key_value", 3 * h, h), ("attention.dense", h, h),
                                 ("mlp.dense_h_to_4h", ffn, h), ("mlp.dense_4h_to_h", h, ffn)]:
            sd[f"{n}.{name}.weight"] = rnd(rows, cols, std=0.2)
            sd[f"{n}.{name}.bias"] = rnd(rows, std=0.2)
    sd["transformer.final_layernorm.weight"] = 1 + rnd(h, std=0.1)
    sd["transformer.final_layernorm.bias"] = rnd(h, std=0.1)
    return sd


def split(module, ratio):
    """change_mp.py's "Increase MP size" for one file: `ratio` parts."""
    out = []
    for shift in range(ratio):
        d = collections.OrderedDict()
        for k, v in module.items():
            assert len(v.shape) < 3
            if len(v.shape) == 2 and 'position' not in k:
                if 'query' in k:
                    part = v.shape[0] // ratio // 3
                    d[k] = torch.cat([v[shift * part:(shift + 1) * part, :].clone(),
                                      v[(shift + ratio) * part:(shift + 1 + ratio) * part, :].clone(),
                                      v[(shift + 2 * ratio) * part:(shift + 1 + 2 * ratio) * part, :].clone()], 0)
                elif 'word' in k or 'h_to_4h' in k or 'relative' in k or "r_w_bias" in k or "r_r_bias" in k:
                    part = v.shape[0] // ratio
                    d[k] = v[shift * part:(shift + 1) * part, :].clone()
                else:
                    part = v.shape[1] // ratio
                    d[k] = v[:, shift * part:(shift + 1) * part].clone()
            elif len(v.shape) == 1 and ('dense_h_to_4h' in k or "attention.relative" in k):
                part = v.shape[0] // ratio
                d[k] = v[shift * part:(shift + 1) * part].clone()
            elif len(v.shape) == 1 and 'query_key_value' in k:
                part = v.shape[0] // ratio // 3
                d[k] = torch.cat([v[shift * part:(shift + 1) * part].clone(),
                                  v[(shift + ratio) * part:(shift + 1 + ratio) * part].clone(),
                                  v[(shift + 2 * ratio) * part:(shift + 1 + 2 * ratio) * part].clone()], 0)
            else:
                d[k] = v.clone()
        out.append(d)
    return out


def merge(modules):
    """change_mp.py's "Decrease MP size" to one part."""
    d = collections.OrderedDict((k, v.clone()) for k, v in modules[0].items())
    for new in modules[1:]:
        for k, v in new.items():
            assert len(v.shape) < 3
            if len(v.shape) == 2 and 'position' not in k:
                if 'query' in k:
                    size_1 = d[k].shape[0] // 3
                    size_2 = v.shape[0] // 3
                    target = d[k]
                    d[k] = torch.cat([target[:size_1, :], v[:size_2, :], target[size_1:size_1 * 2, :],
                                      v[size_2:size_2 * 2, :], target[size_1 * 2:, :], v[size_2 * 2:, :]], 0)
                elif 'word' in k or 'h_to_4h' in k or 'relative' in k or "r_w_bias" in k or "r_r_bias" in k:
                    d[k] = torch.cat([d[k], v], 0)
                else:
                    d[k] = torch.cat([d[k], v], 1)
            elif len(v.shape) == 1 and 'query_key_value' in k:
                size_1 = d[k].shape[0] // 3
                size_2 = v.shape[0] // 3
                target = d[k]
                d[k] = torch.cat([target[:size_1], v[:size_2], target[size_1:size_1 * 2], v[size_2:size_2 * 2],
                                  target[size_1 * 2:], v[size_2 * 2:]], 0)
            elif len(v.shape) == 1 and ('dense_h_to_4h' in k or "attention.relative" in k):
                d[k] = torch.cat([d[k], v], 0)
    return d


def read_parts(ckpt, **load):
    """The module of every mp_rank file of DeepSpeed save dir `ckpt`, in rank order."""
    with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt")) as f:
        it_dir = os.path.join(ckpt, f.read().strip())
    names = sorted((n for n in os.listdir(it_dir) if n.startswith("mp_rank_")), key=lambda n: int(n.split("_")[2]))
    return [torch.load(os.path.join(it_dir, n), map_location="cpu", **load) for n in names]


def write(a):
    sd = state_dict(a.vocab, a.hidden, a.layers, 4 * a.hidden, a.max_pos, a.seed)
    if a.dtype == "fp16":
        sd = collections.OrderedDict((k, v.half()) for k, v in sd.items())
    if a.drop:
        del sd[a.drop]
    if a.extra:
        sd[a.extra] = torch.zeros(a.hidden)
    if a.int:
        sd[a.int] = sd[a.int].long()
    it_dir = os.path.join(a.out, a.tag or str(a.iteration))
    os.makedirs(it_dir, exist_ok=True)
    # what GLM's arguments.py gives a run (a few keys of its many), some of
    # which this program does not take (paths, layout, its own unsupported
    # values, keys it does not know)
    ns = argparse.Namespace(
        num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, max_position_embeddings=a.max_pos,
        intermediate_size=None, layernorm_epsilon=1e-5, hidden_dropout=0.1, attention_dropout=0.1, output_dropout=0.1,
        make_vocab_size_divisible_by=128, model_parallel_size=a.tp, tokenizer_type="BertWordPieceTokenizer",
        tokenizer_model_type="bert-base-uncased", seq_length=a.max_pos, batch_size=4, eval_iters=2, split="949,50,1",
        task_mask=True, block_lm=True, transformer_xl=False, resume_dataloader=False, fp16=a.dtype == "fp16",
        train_data=["/data/of/another/machine"], save="/checkpoints/elsewhere", deepspeed=True, local_rank=0,
        a_key_of_a_newer_glm="x", lr=1e-4, warmup=0.04, cuda=True)
    parts = split(sd, a.tp)
    for r, module in enumerate(parts):
        opt_state = {i: {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2), "step": 10} for i in range(2)}
        d = {
            "module": module,
            "optimizer": {"state": opt_state, "param_groups": [{"lr": 1e-4, "params": [0, 1]}], "loss_scaler": None},
            "lr_scheduler": None,
            "csr_tensor_module_names": set(),
            "skipped_steps": 0,
            "global_steps": a.iteration,
            "global_samples": a.iteration * 4,
            "dp_world_size": 1,
            "mp_world_size": a.tp,
            "iteration": a.iteration,
            "client_lr_scheduler": {"num_iters": a.iteration, "start_lr": 1e-4, "decay_style": "cosine"},
            "random_rng_state": random.getstate(),
            "np_rng_state": np.random.get_state(),
            "torch_rng_state": torch.get_rng_state(),
            "rng_tracker_states": {"model-parallel-rng": torch.get_rng_state()},
        }
        if not a.no_args:
            d["args"] = ns
        torch.save(d, os.path.join(it_dir, f"mp_rank_{r:02d}_model_states.pt"))
    with open(os.path.join(a.out, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(a.tag or str(a.iteration))


def loss(a):
    parts = read_parts(a.ckpt, weights_only=False)
    sd = merge([p["module"] for p in parts])
    args = parts[0]["args"]
    model = glm_torch.Glm(sd["word_embeddings.weight"].shape[0], args.hidden_size, args.num_layers,
                          args.num_attention_heads, 4 * args.hidden_size, args.max_position_embeddings)
    names = {"word_embeddings.weight": "word_embeddings.weight"}
    for k in sd:
        if k.startswith("transformer."):
            names[k] = k[len("transformer."):].replace("attention.", "").replace("mlp.", "")
    model.load_state_dict({names[k]: v.float() for k, v in sd.items()}, strict=True)
    model.eval()
    total = collections.defaultdict(lambda: [0.0, 0])
    with open(a.batches) as f, torch.no_grad():
        for line in f:
            b = json.loads(line)
            t = {k: torch.tensor(b[k]) for k in ["tokens", "targets", "position_ids", "block_position_ids", "loss_mask", "sep"]}
            n = int(t["loss_mask"].ne(0).sum())
            if n == 0:
                continue
            mean = model(t["tokens"], t["position_ids"], t["block_position_ids"], t["sep"], t["targets"], t["loss_mask"], 0.0)
            total[b["mode"]][0] += float(mean) * n
            total[b["mode"]][1] += n
    print(json.dumps({m: s / n for m, (s, n) in total.items()}))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", v
        lo, hi = v["data_offsets"]
        out[k] = torch.from_numpy(np.frombuffer(data[lo:hi], dtype="<f4").copy()).view(v["shape"])
    return out


def check_export(a):
    parts = read_parts(a.export)  # torch.load's default: weights_only=True
    assert len(parts) == a.parts, f"{len(parts)} parts, expected {a.parts}"
    want = read_safetensors(a.safetensors)
    merged = merge([p["module"] for p in parts])
    assert sorted(merged) == sorted(want), (sorted(merged), sorted(want))
    for k, v in want.items():
        assert merged[k].dtype == torch.float32 and torch.equal(merged[k], v), k
    for r, (p, q) in enumerate(zip(parts, split(want, a.parts))):
        for k in q:
            assert torch.equal(p["module"][k], q[k]), f"part {r}: {k} is not change_mp.py's split"
        assert p["mp_world_size"] == a.parts and isinstance(p["iteration"], int)
    print("ok")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", required=True)
    for k in ["vocab", "layers", "hidden", "heads", "max-pos"]:
        w.add_argument(f"--{k}", type=int, required=True)
    w.add_argument("--tp", type=int, default=1)
    w.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    w.add_argument("--iteration", type=int, default=5000)
    w.add_argument("--tag")
    w.add_argument("--seed", type=int, default=7)
    w.add_argument("--drop")
    w.add_argument("--extra")
    w.add_argument("--int")
    w.add_argument("--no-args", action="store_true")
    l = sub.add_parser("loss")
    l.add_argument("--ckpt", required=True)
    l.add_argument("--batches", required=True)
    c = sub.add_parser("check-export")
    c.add_argument("--export", required=True)
    c.add_argument("--safetensors", required=True)
    c.add_argument("--parts", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    {"write": write, "loss": loss, "check-export": check_export}[a.cmd](a)


if __name__ == "__main__":
    main()
