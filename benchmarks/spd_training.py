"""
SPD-aware training against zero-shot SPD, 4-layer character model, TP=2 on CPU.

    python benchmarks/spd_training.py --data ../shared/data/tinyshakespeare.txt [--seeds 1337,1,2] [--dir benchmarks/out/spd]

Trains from scratch with examples/train.py (nanoGPT's CPU shakespeare_char settings, 2000
iterations, torchrun with 2 processes), once per seed, under `megatron` and under `spd` with
the sync point dropped in the last half and in all blocks (sync points per forward in the
blocks: 2L, 1.5L, L). Then evaluates every trained model, and each trained megatron model
with SPD applied zero-shot, at TP=2 on the whole validation split (every consecutive window,
so the figures carry no sampling noise; what differs between seeds is training itself).
"""

import argparse
import math
import os
import statistics
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402
from machine import machine_line  # noqa: E402

RUNS = [("megatron", "megatron", "all"), ("spd-half", "spd", "last:2"), ("spd-all", "spd", "all")]


def _evaluate(rank, world_size, path, plan, spd_blocks, data_path):
    import json

    import torch
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize
    from dtensor_gpt.data import TextData, mean_loss

    with open(os.path.join(path, "index.json")) as f:
        config = GPTConfig(**json.load(f)["config"])
    with torch.device("meta"):
        model = GPT(config)
    options = dict(spd_blocks=spd_blocks) if plan == "spd" else {}
    parallelize(model, init_device_mesh("cpu", (world_size,)), plan, **options)
    load_checkpoint(model, path)
    return mean_loss(model, *TextData(data_path).windows("val", config.block_size))


def summary(values):
    mean = statistics.mean(values)
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread} ({math.exp(mean):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--dir", default=os.path.join(HERE, "out", "spd"))
    args = parser.parse_args()
    print(machine_line(), flush=True)
    train = os.path.join(HERE, "..", "examples", "train.py")
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        for name, plan, blocks in RUNS:
            out = os.path.join(args.dir, f"{name}-seed-{seed}")
            if os.path.exists(out):
                print(f"reusing {out} (delete it to train again)", flush=True)
            else:
                subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                train, "--data", args.data, "--no-bias", "--plan", plan, "--spd-blocks", blocks, "--seed", str(seed),
                                "--out", out, "--always-save-checkpoint"], check=True, stdout=subprocess.DEVNULL)
    print("| plan (4 blocks) | all-reduces per forward in blocks | val loss, trained so (ppl) | "
          "val loss, SPD applied zero-shot to the megatron model (ppl) | per seed " + ", ".join(map(str, seeds)) + " |")
    print("|---|---|---|---|---|")
    for name, plan, blocks in RUNS:
        trained = [run_distributed(_evaluate, 2, os.path.join(args.dir, f"{name}-seed-{seed}"), plan, blocks, args.data)
                   for seed in seeds]
        zero_shot = [run_distributed(_evaluate, 2, os.path.join(args.dir, f"megatron-seed-{seed}"), plan, blocks,
                                     args.data) for seed in seeds] if plan != "megatron" else None
        syncs = {"megatron": 8, "spd-half": 6, "spd-all": 4}[name]
        each = ", ".join(f"{t:.4f}" + (f" / {z:.4f}" if zero_shot else "") for t, z in zip(trained, zero_shot or trained))
        print(f"| {name} | {syncs} | {summary(trained)} | {summary(zero_shot) if zero_shot else '—'} | {each} |",
              flush=True)


if __name__ == "__main__":
    main()
