"""
Training speed at nanoGPT's speed settings: eager and compiled blocks, fp32 and bf16 autocast, TP 1 and 2.

    python benchmarks/train_speed.py [--configs nanogpt gpt2] [--tp 1 2] [--steps 5]

Each run builds examples/train.py's model (`build`, plan megatron) and times its step
(`train_step`: forward and loss under autocast, backward, clipping, AdamW) on random tokens,
one thread per process, after 2 untimed steps (the compiled runs compile in them). Configs:
nanoGPT's CPU shakespeare_char recipe (examples/train.py's defaults: 4 layers, 128 wide,
batch 12 x 64, 65 characters) and GPT-2 124M at batch 1 x 512. Model FLOPs per token are
nanoGPT's estimate_mfu's (6 per non-embedding parameter plus 12·L·H·Q·T for attention, T the
sequence trained); the MFU divides them by the peak of the cores the run uses: clock (from
/proc/cpuinfo) x FLOPs per cycle per core (--flops-per-cycle, fp32 and bf16; the default 32
and 64 are AMD Zen 4's: AVX-512 on two 256-bit FMA pipes, and AVX512-BF16 dot products at
twice fp32's rate). At TP=2 the "gloo floor" is the step's collectives (counted in the eager
fp32 step) times a small all-reduce's measured time: what TP=2 spends waiting on gloo at least.
On a shared machine the wall times depend on the other jobs; rank 0's CPU seconds per step
(its process time) depend much less on them, and their ratios are the ones to read there.
"""

import argparse
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from distributed import run_distributed  # noqa: E402
from machine import machine_line  # noqa: E402

CONFIGS = {  # name: (train.py's model flags, batch rows, vocabulary)
    "nanogpt": (["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "12"], 65),
    "gpt2": (["--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--block-size", "512", "--batch-size", "1"], 50257),
}
VARIANTS = [("eager fp32", []), ("compiled fp32", ["--compile"]), ("eager bf16", ["--dtype", "bf16"]),
            ("compiled bf16", ["--compile", "--dtype", "bf16"])]


def _collectives(model, optimizer, scaler, batch, args, dp):
    """The collectives of one step, and a small all-reduce's time (seconds; mean of 200)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    from train import train_step

    with CommDebugMode() as comm:
        train_step(model, optimizer, scaler, [batch], args, dp)
    x = torch.zeros(16)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(200):
        dist.all_reduce(x)
    return comm.get_total_counts(), (time.perf_counter() - start) / 200


def _measure(rank, world_size, config, steps):
    """Seconds per step of each variant on this TP degree (wall, and this process's CPU), and the eager step's collectives."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import GPTConfig
    from dtensor_gpt.grad import LossScaler
    from train import DataParallel, build, parse_args, train_step

    flags, vocab = CONFIGS[config]
    mesh, out = init_device_mesh("cpu", (world_size,)), {}
    for name, extra in VARIANTS:
        args = parse_args(["--data", __file__, *flags, *extra])
        model_config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                 block_size=args.block_size, vocab_size=vocab, bias=True, dropout=0.0)
        model, optimizer = build(args, model_config, mesh)
        torch._dynamo.reset()
        dp, scaler = DataParallel(mesh), LossScaler(False)
        tokens = torch.randint(0, vocab, (args.batch_size, args.block_size + 1), generator=torch.Generator().manual_seed(0))
        batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        for _ in range(2):
            train_step(model, optimizer, scaler, [batch], args, dp)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            train_step(model, optimizer, scaler, [batch], args, dp)
        out[name] = (time.perf_counter() - start) / steps
        out[name, "cpu"] = (time.process_time() - cpu) / steps
        if name == "eager fp32" and world_size > 1:
            out["collectives"] = _collectives(model, optimizer, scaler, batch, args, dp)
        out["flops_per_token"] = 6 * model.get_num_params() + 12 * args.n_layer * args.n_embd * args.block_size
        out["tokens"] = args.batch_size * args.block_size
    return out


def clock_hz(cpuinfo="/proc/cpuinfo"):
    with open(cpuinfo) as f:
        return float(re.search(r"cpu MHz\s*:\s*([\d.]+)", f.read())[1]) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run, after 2 untimed ones")
    parser.add_argument("--flops-per-cycle", nargs=2, type=float, default=[32, 64], metavar=("FP32", "BF16"),
                        help="one core's peak FLOPs per cycle in fp32 and bf16 (default: AMD Zen 4's)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    peak = {"fp32": clock_hz() * args.flops_per_cycle[0], "bf16": clock_hz() * args.flops_per_cycle[1]}
    print(f"peak per core: {peak['fp32'] / 1e9:.0f} GFLOPS fp32, {peak['bf16'] / 1e9:.0f} GFLOPS bf16; one thread per process")
    print("| config | TP | run | s per step | tokens/s | model TFLOPS | MFU | vs eager fp32 | rank 0's CPU s per step | "
          "vs eager fp32, in CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for tp in args.tp:
            r = run_distributed(_measure, tp, config, args.steps)
            for name, _ in VARIANTS:
                rate = r["tokens"] / r[name]
                flops = rate * r["flops_per_token"]
                print(f"| {config} | {tp} | {name} | {r[name]:.3f} | {rate:,.0f} | {flops / 1e12:.3f} | "
                      f"{flops / (tp * peak[name[-4:]]):.1%} | {r['eager fp32'] / r[name]:.2f}x | {r[name, 'cpu']:.3f} | "
                      f"{r['eager fp32', 'cpu'] / r[name, 'cpu']:.2f}x |", flush=True)
            if "collectives" in r:
                counts, seconds = r["collectives"]
                print(f"gloo floor at TP={tp}, {config}: {counts} collectives per step x {seconds * 1e3:.2f} ms "
                      f"(a small all-reduce) = {counts * seconds:.3f} s of the eager fp32 step's {r['eager fp32']:.3f} s",
                      flush=True)


if __name__ == "__main__":
    main()
