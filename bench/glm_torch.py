"""Eager-PyTorch reference of glm-worker's training step, for scripts/bench.sh.

The same GLM as worker/src/model/glm.rs (word + position + block-position
embeddings, pre-LN blocks with fused qkv, scaled_dot_product_attention under
the GLM mask, tanh GeLU, tied output, logits only at loss positions), the same
AdamW arithmetic (torch.optim.AdamW, no decay for biases/LayerNorm), clipping
to norm 1, and the same synthetic batch: random tokens, Part A = first half
(bidirectional), Part B = second half (causal, in the loss).

--dtype bf16|fp16 is the usual eager mixed precision: fp32 parameters and
AdamW (fused on CUDA), the forward under torch.autocast; fp16 adds a
torch.amp.GradScaler (unscaled before clipping). --checkpoint-activations
recomputes each transformer block in the backward pass
(torch.utils.checkpoint, non-reentrant). tflops counts model FLOPs only
(6·N + 12·L·h·s per token), not the recomputation. peak_mem_mb: on CUDA the
device memory the run took (cudaMemGetInfo after the timed steps minus before
the model, measured the same way by glm-worker's bench-step: the caching
allocator keeps its high-water mark, plus cuBLAS/cuDNN workspaces), alloc_mb
torch's peak allocated memory; on the CPU the process's peak RSS; MB = 1e6 bytes.

Prints one line: "torch device=D threads=T dtype=P ckpt=C tokens/s=X
tflops=Y ms/it=Z peak_mem_mb=M". Exits 2 if this torch cannot run the
requested precision on the device (fp16 autocast on the CPU).
"""
import argparse
import math
import resource
import sys
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


class Block(torch.nn.Module):
    def __init__(self, h, heads, ffn, layers):
        super().__init__()
        self.heads = heads
        self.input_layernorm = torch.nn.LayerNorm(h, eps=1e-5)
        self.query_key_value = torch.nn.Linear(h, 3 * h)
        self.dense = torch.nn.Linear(h, h)
        self.post_attention_layernorm = torch.nn.LayerNorm(h, eps=1e-5)
        self.dense_h_to_4h = torch.nn.Linear(h, ffn)
        self.dense_4h_to_h = torch.nn.Linear(ffn, h)
        for lin, std in [(self.query_key_value, 0.02), (self.dense, 0.02 / math.sqrt(2 * layers)),
                         (self.dense_h_to_4h, 0.02), (self.dense_4h_to_h, 0.02 / math.sqrt(2 * layers))]:
            torch.nn.init.normal_(lin.weight, 0.0, std)
            torch.nn.init.zeros_(lin.bias)

    def forward(self, x, mask, p):
        b, s, h = x.shape
        q, k, v = self.query_key_value(self.input_layernorm(x)).split(h, dim=-1)
        heads = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # (b, nh, s, hd)
        a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask, dropout_p=p)
        x = x + F.dropout(self.dense(a.transpose(1, 2).reshape(b, s, h)), p)
        y = F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(x)), approximate="tanh")
        return x + F.dropout(self.dense_4h_to_h(y), p)


class Glm(torch.nn.Module):
    def __init__(self, vocab, h, layers, heads, ffn, max_pos):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(vocab, h)
        self.position_embeddings = torch.nn.Embedding(max_pos + 1, h)
        self.block_position_embeddings = torch.nn.Embedding(max_pos + 1, h)
        for e in [self.word_embeddings, self.position_embeddings, self.block_position_embeddings]:
            torch.nn.init.normal_(e.weight, 0.0, 0.02)
        self.layers = torch.nn.ModuleList([Block(h, heads, ffn, layers) for _ in range(layers)])
        self.final_layernorm = torch.nn.LayerNorm(h, eps=1e-5)
        self.checkpoint_activations = False

    def forward(self, tokens, pos, block_pos, sep, targets, loss_mask, p):
        s = tokens.shape[1]
        x = self.word_embeddings(tokens) + self.position_embeddings(pos) + self.block_position_embeddings(block_pos)
        x = F.dropout(x, p)
        ar = torch.arange(s, device=tokens.device)
        mask = ((ar[None, :] <= ar[:, None])[None] | (ar[None, :] < sep[:, None])[:, None, :])[:, None]
        for layer in self.layers:
            if self.checkpoint_activations:
                x = torch.utils.checkpoint.checkpoint(layer, x, mask, p, use_reentrant=False)
            else:
                x = layer(x, mask, p)
        x = self.final_layernorm(x)
        idx = loss_mask.view(-1).nonzero().squeeze(1)
        logits = x.reshape(-1, x.shape[-1]).index_select(0, idx) @ self.word_embeddings.weight.t()
        return F.cross_entropy(logits, targets.view(-1).index_select(0, idx))


DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                    help="fp32, or autocast mixed precision with fp32 parameters and AdamW (fp16: with a GradScaler)")
    ap.add_argument("--checkpoint-activations", action="store_true",
                    help="recompute each transformer block in the backward pass")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1234)
    ffn = 4 * a.hidden
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    amp = DTYPES[a.dtype]
    if cuda:
        torch.zeros(1, device=dev)  # the context, before the baseline
        free, total = torch.cuda.mem_get_info(dev)
        baseline = total - free
    model = Glm(a.vocab, a.hidden, a.layers, a.heads, ffn, a.seq).to(dev)
    model.checkpoint_activations = a.checkpoint_activations
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "layernorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "layernorm" in n]
    opt_kw = {"fused": True} if amp is not None and cuda else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6, **opt_kw)
    scaler = torch.amp.GradScaler(dev.type) if a.dtype == "fp16" else None
    b, s = a.batch, a.seq
    half = s // 2
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(10, a.vocab, (b, s), generator=g)
    targets = torch.randint(10, a.vocab, (b, s), generator=g)
    pos = torch.cat([torch.arange(half), torch.full((s - half,), half - 1)]).repeat(b, 1)
    block_pos = torch.cat([torch.zeros(half, dtype=torch.long), torch.arange(1, s - half + 1)]).repeat(b, 1)
    sep = torch.full((b,), half)
    loss_mask = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(s - half, dtype=torch.long)]).repeat(b, 1)
    tokens, targets, pos, block_pos, sep, loss_mask = (t.to(dev) for t in (tokens, targets, pos, block_pos, sep, loss_mask))

    def train_step():
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = model(tokens, pos, block_pos, sep, targets, loss_mask, a.dropout)
        if scaler is None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad(set_to_none=False)
        loss.item()

    times = []
    try:
        for i in range(a.warmup + a.iters):
            if i == a.warmup and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(dev)
            t0 = time.perf_counter()
            train_step()
            if cuda:
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
    except (RuntimeError, NotImplementedError) as e:
        if a.dtype == "fp16" and not cuda:
            print(f"glm_torch: {a.dtype} autocast on {a.device} is not supported by torch {torch.__version__}: {e}",
                  file=sys.stderr)
            sys.exit(2)
        raise
    if cuda:
        free, total = torch.cuda.mem_get_info(dev)
        peak = total - free - baseline
        alloc = f" alloc_mb={torch.cuda.max_memory_allocated(dev) / 1e6:.0f}"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        alloc = ""
    sec = sum(times) / len(times)
    h, L = a.hidden, a.layers
    flops_per_token = 6 * (L * (4 * h * h + 2 * h * ffn) + a.vocab * h) + 12 * L * h * s
    tps = b * s / sec
    print(f"torch device={a.device} threads={a.threads} dtype={a.dtype} ckpt={int(a.checkpoint_activations)} "
          f"tokens/s={tps:.0f} tflops={tps * flops_per_token / 1e12:.4f} ms/it={sec * 1000:.1f} "
          f"peak_mem_mb={peak / 1e6:.0f}{alloc}")


if __name__ == "__main__":
    main()
