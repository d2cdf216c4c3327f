"""
SPD-aware training against zero-shot SPD, 4-layer character model, TP=2 on CPU.

    python benchmarks/spd_training.py --data ../shared/data/tinyshakespeare.txt [--dir benchmarks/out/spd]

Trains from scratch with examples/train.py (nanoGPT's CPU shakespeare_char settings, 2000
iterations, torchrun with 2 processes) under `megatron` and under `spd` with the sync point
dropped in the last half and in all blocks (sync points per forward in the blocks: 2L, 1.5L,
L), then evaluates every trained model, and the trained megatron model with SPD applied
zero-shot, on the same 50 validation batches at TP=2.
"""

import argparse
import math
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402

RUNS = [("megatron", "megatron", "all"), ("spd-half", "spd", "last:2"), ("spd-all", "spd", "all")]


def _evaluate(rank, world_size, path, plan, spd_blocks, data_path):
    import json

    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize
    from dtensor_gpt.data import TextData

    with open(os.path.join(path, "index.json")) as f:
        config = GPTConfig(**json.load(f)["config"])
    model = GPT(config)
    options = dict(spd_blocks=spd_blocks) if plan == "spd" else {}
    parallelize(model, init_device_mesh("cpu", (world_size,)), plan, **options)
    load_checkpoint(model, path)
    data = TextData(data_path, pad_to=4)
    generator = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for _ in range(50):
            x, y = data.batch("val", 12, 64, generator)
            losses.append(model(x, y)[1].item())
    return sum(losses) / len(losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dir", default=os.path.join(HERE, "out", "spd"))
    args = parser.parse_args()
    train = os.path.join(HERE, "..", "examples", "train.py")
    for name, plan, blocks in RUNS:
        out = os.path.join(args.dir, name)
        if not os.path.exists(out):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", train,
                            "--data", args.data, "--plan", plan, "--spd-blocks", blocks, "--out", out], check=True)
    rows = []
    for name, plan, blocks in RUNS:
        loss = run_distributed(_evaluate, 2, os.path.join(args.dir, name), plan, blocks, args.data)
        zero_shot = "" if plan == "megatron" else run_distributed(
            _evaluate, 2, os.path.join(args.dir, "megatron"), plan, blocks, args.data)
        syncs = {"megatron": 8, "spd-half": 6, "spd-all": 4}[name]
        rows.append((name, syncs, loss, zero_shot))
    print("| plan (4 blocks) | all-reduces per forward in blocks | val loss, trained so (ppl) | "
          "val loss, SPD applied zero-shot to the megatron model (ppl) |")
    print("|---|---|---|---|")
    for name, syncs, loss, zero in rows:
        zs = f"{zero:.4f} ({math.exp(zero):.2f})" if zero != "" else "—"
        print(f"| {name} | {syncs} | {loss:.4f} ({math.exp(loss):.2f}) | {zs} |")


if __name__ == "__main__":
    main()
