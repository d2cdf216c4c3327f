"""
Decoding speed against the memory-bandwidth limit, side by side in one run.

    python benchmarks/decode_roofline.py [--config gpt2] [--context 512] [--new 32] [--tp 1 2]
        [--dtypes fp32 bf16 int8] [--batches 1 4 16] [--device cpu|cuda] [--compile-modes default reduce-overhead]

GPT-2 124M with random weights, a `context`-token prompt, then `new` greedy tokens with the KV
cache, tokens/s from the first new token to the last (the prompt's forward is not counted).
Rows: eager and compiled (`dtensor_gpt.compile_decoding`, inductor, in each of
`--compile-modes`) in each dtype at each TP degree, the hand-written eager Megatron forward of
benchmarks/overhead_bench.py (fp32), and the compiled model in each dtype with batches of
`--batches` rows. int8 is weight-only (`dtensor_gpt.int8`: the Linear weights int8 with a scale
per output channel, quantised from the random bf16 weights; bf16 activations and cache). TP=1 is the unparallelized model on
2 threads; TP=2 the megatron plan on 2 gloo processes of 1 thread each, sampling on the
vocabulary shards as examples/generate.py does (no logits gathered).

The roofline: a decoding step must read every weight of its rank once (the embedding table
too, as lm_head's weight; of the position table one row) and, per row of the batch, the keys
and values of every cached position; no step can be faster than those bytes divided by the
memory bandwidth. The bandwidth is measured in the same run, in each process with its own
thread setting while every rank measures at once: the best of 5 copies of a 256 MiB tensor
(`torch.Tensor.copy_`, counting the bytes read and written), STREAM's copy. "% of roofline"
is the roofline time over the measured time. Every mode must give the eager tokens.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from distributed import run_distributed  # noqa: E402
from overhead_bench import HandWritten  # noqa: E402

from dtensor_gpt import GPT, compile_decoding, parallelize  # noqa: E402
from dtensor_gpt.configs import config_by_name  # noqa: E402
from dtensor_gpt.int8 import quantize_model  # noqa: E402
from dtensor_gpt.sampling import VocabParallelSampler  # noqa: E402
from machine import machine_line  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.bfloat16}  # int8: the activations'


def build(config, name, device):
    """GPT of `config` with random weights in dtype `name` (int8: weight-only, bf16 activations), on `device`."""
    with torch.device(device):  # initialised where it runs: a GPT-2-XL on one CPU thread takes a minute
        model = GPT(config).to(dtype=DTYPES[name]).eval()
    return quantize_model(model) if name == "int8" else model


def bandwidth(device, mib=256, repeats=5):
    """Bytes per second this process copies (read + write), the best of `repeats`."""
    a = torch.ones(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()  # every rank copies at once, as every rank decodes at once
        synchronize(device)
        start = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * a.numel() * 4 / best


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bytes_per_step(model, dtype, rows, context):
    """
    What one decoding step must read on this rank: its weights once (int8 ones and their scales
    as held), each row's cached keys and values (in `dtype`, the activations').
    """
    size = torch.finfo(dtype).bits // 8
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p
    weights = sum(local(p).numel() * p.element_size() for name, p in model.named_parameters()
                  if name != "transformer.wpe.weight")
    weights += model.config.n_embd * size  # one position's row
    heads_width = local(model.transformer.h[0].attn.c_proj.weight).shape[1]  # this rank's heads x head size
    kv = 2 * model.config.n_layer * rows * context * heads_width
    return weights + kv * size


def decode_seconds(generate, prompt, new):
    """Seconds per token of one generation, from the first new token to the last, and its tokens."""
    stamps = []

    def stamp(_):
        synchronize(prompt.device)  # a GPU's step has run only when its queue has
        stamps.append(time.perf_counter())

    out = generate(prompt, new, stamp)
    return (stamps[-1] - stamps[0]) / (new - 1), out


def prompts(model, batch, context, device):
    """`batch` random prompts; row 0 is the same for every batch size."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, context), generator=g).to(device)


def fastest(generate, prompt, args):
    """The fastest of --repeats generations: (seconds per token, tokens)."""
    return min((decode_seconds(generate, prompt, args.new) for _ in range(args.repeats)), key=lambda r: r[0])


def plugin_generate(model):
    def run(prompt, new, on_token):
        sampler = VocabParallelSampler(seed=0)
        return model.generate(prompt, new, top_k=1, on_token=on_token, sample=sampler).tolist()
    return run


def hand_generate(hand):
    def run(prompt, new, on_token):
        hand.reset()
        idx = hand(prompt, cache=True)[:, -1:].argmax(-1)
        out = [idx]
        for _ in range(new - 1):
            on_token(idx)
            idx = hand(idx, cache=True)[:, -1:].argmax(-1)
            out.append(idx)
        on_token(idx)
        return torch.cat([prompt, *out], 1).tolist()
    return run


def measure(rank, world, args):
    """Rows of (mode, dtype, batch, seconds per token, compile seconds, roofline seconds, same tokens as eager)."""
    threads = 2 // world if args.device == "cpu" else 1
    torch.set_num_threads(threads)
    device = args.device
    per_second = bandwidth(device)
    rows, reference, rooflines = [], {}, {}
    mesh = None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (world,))
    variants = [("eager", None)] + [("compiled" if m == "default" else f"compiled, {m}", m) for m in args.compile_modes]
    for name in args.dtypes:
        dtype = DTYPES[name]
        for mode, compile_mode in variants:
            compiled = compile_mode is not None
            torch.manual_seed(0)
            model = build(config_by_name(args.config), name, device)
            if mesh is not None:
                parallelize(model, mesh, "megatron", loss_parallel=True)
            compile_seconds = 0.0
            if compiled:
                compile_decoding(model, mode=None if compile_mode == "default" else compile_mode)
            for batch in (args.batches if compiled else [1]):
                generate = plugin_generate(model)
                start = time.perf_counter()
                # warm-up, as long as the timed runs: the cache has the generation's length, and the step compiles for it
                generate(prompts(model, batch, args.context, device), args.new, lambda _: None)
                if compiled and batch == 1:
                    compile_seconds = time.perf_counter() - start
                seconds, tokens = fastest(generate, prompts(model, batch, args.context, device), args)
                reference.setdefault(name, tokens[0])  # eager's, batch 1: the first row of every batch
                roofline = bytes_per_step(model, dtype, batch, args.context + args.new // 2) / per_second
                rooflines[name, batch] = roofline
                rows.append((mode, name, batch, seconds, compile_seconds, roofline, tokens[0] == reference[name]))
    if "fp32" in args.dtypes and args.device == "cpu":
        torch.manual_seed(0)
        reference_model = GPT(config_by_name(args.config)).eval()
        generate = hand_generate(HandWritten(reference_model, rank, world))  # the same shards, cut by hand
        prompt = prompts(reference_model, 1, args.context, device)
        with torch.no_grad():
            generate(prompt, args.new, lambda _: None)
            seconds, tokens = fastest(generate, prompt, args)
        rows.append(("hand-written eager", "fp32", 1, seconds, 0.0, rooflines["fp32", 1], tokens[0] == reference["fp32"]))
    return dict(rows=rows, bandwidth=per_second, threads=threads)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2", help="a named model size (dtensor_gpt.configs)")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row; the fastest counts")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=list(DTYPES),
                   help="int8: weight-only (dtensor_gpt.int8), bf16 activations")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile-modes", nargs="+", default=["default"], choices=["default", "reduce-overhead"],
                   help="Inductor modes of the compiled rows; reduce-overhead replays each block as a CUDA graph on a GPU")
    args = p.parse_args()
    print(machine_line(), flush=True)
    if args.device == "cuda" and args.tp != [1]:
        p.error("--device cuda measures TP=1 only (one GPU)")
    print(f"{args.config}, {args.context}-token prompt, {args.new} greedy tokens, {args.device}")
    print("| TP | mode | dtype | batch | ms / token | tokens/s | compile s | roofline ms | % of roofline | tokens as eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tp in args.tp:
        if tp == 1:
            result = measure(0, 1, args)
        else:
            result = run_distributed(measure, tp, args)
        for mode, dtype, batch, seconds, compile_seconds, roofline, same in result["rows"]:
            print(f"| {tp} | {mode} | {dtype} | {batch} | {seconds * 1e3:.1f} | {batch / seconds:.1f} | "
                  f"{compile_seconds:.1f} | {roofline * 1e3:.2f} | {100 * roofline / seconds:.0f}% | {'yes' if same else 'NO'} |",
                  flush=True)
        print(f"<!-- TP={tp}: {result['bandwidth'] / 1e9:.1f} GB/s per process, {result['threads']} thread(s) -->")


if __name__ == "__main__":
    main()
