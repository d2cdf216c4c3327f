"""
Why `dtensor_gpt/one_row_products.py` exists: how fast a one-row product and a one-query
attention read memory on this CPU, as the matrix kernels compute them and as the pass's fused
reductions do.

    python benchmarks/one_row_bandwidth.py [--threads 2]

GB/s of weight (or cache) bytes read per call, the best of 15 calls: GPT-2's head weight
(50304 x 768) times one row, eager (`F.linear`, oneDNN/MKL) and compiled with the pass; and one
query of 12 heads over 544 cached positions (`F.scaled_dot_product_attention` with the cache's
mask), eager and compiled with the pass, in fp32 and bf16.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from dtensor_gpt.one_row_products import OneRowProductsAsReductions
from machine import machine_line


def best(fn, *args, calls=15):
    fn(*args)
    fastest = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    print(machine_line(), flush=True)
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s); GB/s of weight or cache bytes read per call")
    print("| operation | dtype | eager | compiled with the pass |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        weight, x = torch.randn(50304, 768, generator=g).to(dtype), torch.randn(1, 768, generator=g).to(dtype)
        q = torch.randn(1, 12, 1, 64, generator=g).to(dtype)
        k, v = (torch.randn(1, 12, 544, 64, generator=g).to(dtype) for _ in range(2))
        mask = torch.ones(1, 544, dtype=torch.bool)
        cases = [("head, one row", F.linear, (x, weight), weight.numel() * weight.element_size()),
                 ("attention, one query", attention, (q, k, v, mask), 2 * k.numel() * k.element_size())]
        for name, fn, inputs, size in cases:
            compiled = torch.compile(fn, fullgraph=True, dynamic=False,
                                     options={"post_grad_custom_pre_pass": OneRowProductsAsReductions()})
            eager, fused = best(fn, *inputs), best(compiled, *inputs)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {size / eager / 1e9:.1f} | {size / fused / 1e9:.1f} |", flush=True)


if __name__ == "__main__":
    main()
