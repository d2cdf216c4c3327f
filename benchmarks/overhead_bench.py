"""
The plugin's overhead: the DTensor megatron plan against the same forward written by hand.

    python benchmarks/overhead_bench.py [--context 512] [--new 32] [--repeats 5]

Both run GPT-2 124M (random weights) at TP=1 (one process, 2 threads) and at TP=2 (2 gloo
processes, 1 thread each): the hand-written one with plain tensors (each rank's q|k|v rows,
vocab rows and MLP columns cut out by hand) and explicit `all_reduce`/`all_gather`, the same
collectives the plan does (none at TP=1). Prefill: one forward of `context` tokens; decode:
`new` greedy tokens with a KV cache after that prompt, timed without the prompt's forward.
The two must produce the same tokens; the ratio of times is the plugin's overhead.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import run_distributed  # noqa: E402
from machine import machine_line  # noqa: E402


class HandWritten:
    """Megatron TP for nanoGPT with plain tensors: rank r's slices and explicit collectives."""

    def __init__(self, model, rank, world):
        c = model.config
        self.H, self.C, self.n = c.n_head // world, c.n_embd, world
        hs, heads, hidden = c.n_embd // c.n_head, c.n_head // world, 4 * c.n_embd // world
        own = slice(rank * heads * hs, (rank + 1) * heads * hs)
        cols = slice(rank * hidden, (rank + 1) * hidden)
        qkv = torch.cat([torch.arange(g * self.C, (g + 1) * self.C)[own] for g in range(3)])
        t = model.transformer
        vocab = c.vocab_size // world
        self.lo, self.hi = rank * vocab, (rank + 1) * vocab
        self.wte = t.wte.weight.detach()[self.lo:self.hi].clone()
        self.wpe = t.wpe.weight.detach().clone()
        self.ln_f = (t.ln_f.weight.detach(), t.ln_f.bias.detach())
        self.blocks = []
        for b in t.h:
            self.blocks.append(dict(
                ln1=(b.ln_1.weight.detach(), b.ln_1.bias.detach()), ln2=(b.ln_2.weight.detach(), b.ln_2.bias.detach()),
                qkv_w=b.attn.c_attn.weight.detach()[qkv].clone(), qkv_b=b.attn.c_attn.bias.detach()[qkv].clone(),
                proj_w=b.attn.c_proj.weight.detach()[:, own].clone(), proj_b=b.attn.c_proj.bias.detach(),
                fc_w=b.mlp.c_fc.weight.detach()[cols].clone(), fc_b=b.mlp.c_fc.bias.detach()[cols].clone(),
                mproj_w=b.mlp.c_proj.weight.detach()[:, cols].clone(), mproj_b=b.mlp.c_proj.bias.detach(),
                k=None, v=None))

    def reset(self):
        for b in self.blocks:
            b["k"] = b["v"] = None

    @torch.no_grad()
    def __call__(self, idx, cache=False):
        B, T = idx.shape
        past = self.blocks[0]["k"].size(2) if cache and self.blocks[0]["k"] is not None else 0
        inside = (idx >= self.lo) & (idx < self.hi)
        x = F.embedding((idx - self.lo) * inside, self.wte) * inside.unsqueeze(-1)
        self.reduce(x)
        x = x + self.wpe[past:past + T]
        for b in self.blocks:
            a = F.layer_norm(x, (self.C,), *b["ln1"])
            q, k, v = F.linear(a, b["qkv_w"], b["qkv_b"]).split(self.H * self.C // (self.H * self.n), dim=2)
            q, k, v = (t.view(B, T, self.H, -1).transpose(1, 2) for t in (q, k, v))
            if cache:
                if b["k"] is not None:
                    k, v = torch.cat([b["k"], k], 2), torch.cat([b["v"], v], 2)
                b["k"], b["v"] = k, v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=k.size(2) == T)
            y = F.linear(y.transpose(1, 2).reshape(B, T, -1), b["proj_w"])
            self.reduce(y)
            x = x + y + b["proj_b"]
            m = F.linear(F.gelu(F.linear(F.layer_norm(x, (self.C,), *b["ln2"]), b["fc_w"], b["fc_b"])), b["mproj_w"])
            self.reduce(m)
            x = x + m + b["mproj_b"]
        local = F.linear(F.layer_norm(x[:, -1:], (self.C,), *self.ln_f), self.wte)
        if self.n == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.n)]
        dist.all_gather(parts, local)
        return torch.cat(parts, -1)

    def reduce(self, t):
        if self.n > 1:
            dist.all_reduce(t)


def _bench(rank, world, context, new, repeats):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(2 // world)

    from dtensor_gpt import GPT, parallelize
    from dtensor_gpt.configs import config_by_name
    from dtensor_gpt.model import KVCache

    torch.manual_seed(0)
    reference = GPT(config_by_name("gpt2")).eval()
    hand = HandWritten(reference, rank, world)
    plugin = parallelize(reference, init_device_mesh("cpu", (world,)))
    prompt = torch.randint(0, 50257, (1, context), generator=torch.Generator().manual_seed(1))

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(fn())
        return statistics.median(times)

    def prefill(model):
        def run():
            start = time.perf_counter()
            model(prompt)
            return time.perf_counter() - start
        return run

    def decode_plugin(tokens=None):
        """Greedy tokens after the prompt; the prompt's own forward (prefill) is not timed."""
        cache = KVCache(len(plugin.transformer.h), context + new)  # as generate sizes it: the positions it will hold
        tokens = [] if tokens is None else tokens
        with torch.no_grad():
            idx = plugin(prompt, cache=cache)[0][:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(new):
                tokens.append(idx.item())
                idx = plugin(idx, cache=cache)[0][:, -1:].argmax(-1)
            return (time.perf_counter() - start) / new

    def decode_hand(tokens=None):
        hand.reset()
        tokens = [] if tokens is None else tokens
        idx = hand(prompt, cache=True)[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            tokens.append(idx.item())
            idx = hand(idx, cache=True)[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / new

    with torch.no_grad():
        same = (plugin(prompt)[0] - hand(prompt)).abs().max().item()
    ours, theirs = [], []
    decode_plugin(ours), decode_hand(theirs)
    tokens_equal = ours == theirs
    prefill_times = (timed(prefill(plugin)), timed(prefill(hand)))
    decode = (timed(decode_plugin), timed(decode_hand))
    return dict(max_logit_difference=same, tokens_equal=tokens_equal, prefill=prefill_times, decode=decode)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print("| GPT-2 124M | DTensor plugin | hand-written | ratio |")
    print("|---|---|---|---|")
    for tp in (1, 2):
        r = run_distributed(_bench, tp, args.context, args.new, args.repeats)
        assert r["tokens_equal"] and r["max_logit_difference"] < 1e-3, f"TP={tp}: the two forwards disagree: {r}"
        setting = "TP=1, 2 threads" if tp == 1 else "TP=2, 1 thread per rank"
        for name, what in (("prefill", f"prefill of {args.context} tokens"),
                           ("decode", f"decode, per token after {args.context} (KV cache)")):
            ours, theirs = r[name]
            print(f"| {setting}: {what} | {ours * 1000:.1f} ms | {theirs * 1000:.1f} ms | {ours / theirs:.2f}x |",
                  flush=True)

if __name__ == "__main__":
    main()
