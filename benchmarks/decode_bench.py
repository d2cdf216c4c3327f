"""
KV-cache decoding against recompute decoding, GPT-2 124M (random weights), CPU.

    python benchmarks/decode_bench.py [--context 512] [--new 32] [--compile] [--dtype fp32|bf16|fp16]

TP=1 runs the unparallelized model on 2 threads; TP=2 runs the megatron plan on 2 gloo
processes of 1 thread each. Each measures the prefill of a `context`-token prompt, then
`new` greedy tokens with the KV cache and without it (recomputing the whole context each step);
tokens/s counts from the first generated token to the last, without the prompt's forward.
--compile compiles the decoding step (`compile_decoding`) in a first, untimed generation of
`new` tokens (its time is printed apart); the recompute column runs eagerly either way.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from distributed import run_distributed  # noqa: E402
from dtensor_gpt import GPT, compile_decoding, init_weights, parallelize  # noqa: E402
from dtensor_gpt.configs import config_by_name  # noqa: E402
from dtensor_gpt.model import KVCache  # noqa: E402
from dtensor_gpt.safetensors_stream import DTYPE_NAMES  # noqa: E402
from machine import machine_line  # noqa: E402


def measure(model, context, new, compile, dtype):
    model.to(DTYPE_NAMES[dtype])
    prompt = torch.randint(0, 50257, (1, context), generator=torch.Generator().manual_seed(0))
    compiling = None
    if compile:
        compile_decoding(model)
        start = time.perf_counter()
        model.generate(prompt, new, top_k=1)  # the same cache length as the timed generation
        compiling = time.perf_counter() - start
    with torch.no_grad():
        model(prompt)  # warm-up
        start = time.perf_counter()
        model(prompt, cache=KVCache(len(model.transformer.h), model.config.block_size))
        prefill = time.perf_counter() - start
        cached, with_cache = tokens_per_second(model, prompt, new, use_cache=True)
        plain, without = tokens_per_second(model, prompt, new, use_cache=False)
    assert torch.equal(cached, plain)
    return prefill, with_cache, without, compiling


def tokens_per_second(model, prompt, new, use_cache):
    """Rate from the first generated token to the last, so the prompt's forward is not counted."""
    stamps = []
    out = model.generate(prompt, new, top_k=1, use_cache=use_cache, on_token=lambda _: stamps.append(time.perf_counter()))
    return out, (new - 1) / (stamps[-1] - stamps[0])


def _tp(rank, world_size, context, new, compile, dtype):
    from torch.distributed.device_mesh import init_device_mesh

    with torch.device("meta"):
        model = parallelize(GPT(config_by_name("gpt2")), init_device_mesh("cpu", (world_size,))).eval()
    torch.manual_seed(0)
    init_weights(model)
    return measure(model, context, new, compile, dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="compile the decoding step first")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    options = (args.context, args.new, args.compile, args.dtype)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = [("1 (2 threads)", measure(GPT(config_by_name("gpt2")).eval(), *options))]
    rows.append(("2 (1 thread per rank)", run_distributed(_tp, 2, *options)))
    setting = f"{args.dtype}{', compiled' if args.compile else ''}"
    print(f"| TP ({setting}) | prefill of {args.context} tokens | decode tokens/s, KV cache | "
          f"decode tokens/s, recompute | speed-up |{' compiling (first generation) |' if args.compile else ''}")
    print(f"|---|---|---|---|---|{'---|' if args.compile else ''}")
    for tp, (prefill, cached, plain, compiling) in rows:
        print(f"| {tp} | {prefill * 1000:.0f} ms | {cached:.1f} | {plain:.2f} | {cached / plain:.1f}x |"
              f"{f' {compiling:.1f} s |' if args.compile else ''}")


if __name__ == "__main__":
    main()
