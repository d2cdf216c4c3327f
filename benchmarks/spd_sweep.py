"""
Loss of Sync-Point Drop against the number of dropped blocks, at TP=2 and 4, on a trained model.

    python benchmarks/spd_sweep.py --data ../shared/data/tinyshakespeare.txt [--png spd_sweep.png]

Trains nanoGPT's CPU shakespeare_char model (n_layer=4, n_head=4, n_embd=128, block_size=64,
batch 12, lr 1e-3 -> 1e-4 over 2000 steps, dropout 0, with biases) with examples/train.py on
one process, unless --model already holds it.
Then, for each TP degree over spawned gloo processes: ranks the blocks by the paper's
block-wise sensitivity on a calibration batch (training data), and measures validation loss
with the K least sensitive blocks dropped, K = 0..n_layer, on the whole validation split.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402
from dtensor_gpt import GPT, GPTConfig  # noqa: E402
from dtensor_gpt.data import TextData, mean_loss  # noqa: E402
from machine import machine_line  # noqa: E402


def _sweep(rank, world_size, path, config, calibration, windows):
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import load_checkpoint, parallelize
    from plans.spd import block_sensitivity

    mesh = init_device_mesh("cpu", (world_size,))
    whole = GPT(config)  # block_sensitivity shards copies of the unparallelized model
    load_checkpoint(whole, path)
    sensitivity = block_sensitivity(whole, mesh, calibration)
    order = sorted(range(config.n_layer), key=sensitivity.__getitem__)
    losses = []
    for k in range(config.n_layer + 1):
        with torch.device("meta"):
            model = parallelize(GPT(config), mesh, "spd", spd_blocks=sorted(order[:k]))
        load_checkpoint(model, path)
        losses.append(mean_loss(model, *windows))
    return dict(sensitivity=sensitivity, order=order, losses=losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--model", default=os.path.join(HERE, "out", "shakespeare_char"),
                        help="the trained checkpoint; examples/train.py writes it there first if it is missing")
    parser.add_argument("--png")
    args = parser.parse_args()
    print(machine_line(), flush=True)

    data = TextData(args.data)
    if not os.path.exists(args.model):
        subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "train.py"), "--data", args.data,
                        "--bias", "--max-iters", str(args.steps), "--out", args.model, "--always-save-checkpoint"], check=True)
    with open(os.path.join(args.model, "index.json")) as f:
        config = GPTConfig(**json.load(f)["config"])
    generator = torch.Generator().manual_seed(0)
    calibration = torch.cat(data.batch("train", 12, 64, generator), 1)[:, :65]

    results = {tp: run_distributed(_sweep, tp, args.model, config, calibration, data.windows("val", config.block_size)) for tp in (2, 4)}
    L = config.n_layer
    print("\n| dropped blocks | all-reduces per forward (blocks) | " + " | ".join(
        f"TP={tp} val loss (ppl)" for tp in results) + " |")
    print("|---|---|" + "---|" * len(results))
    for k in range(L + 1):
        cells = [f"{r['losses'][k]:.4f} ({math.exp(r['losses'][k]):.2f})" for r in results.values()]
        print(f"| {k} | {2 * L - k} | " + " | ".join(cells) + " |")
    for tp, r in results.items():
        print(f"TP={tp}: sensitivity (loss increase) per block {[round(s, 4) for s in r['sensitivity']]}, "
              f"drop order {r['order']}")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for tp, r in results.items():
            ax.plot(range(L + 1), r["losses"], marker="o", label=f"TP={tp}")
        ax.set_xticks(range(L + 1))
        ax.set_xlabel("blocks with the sync point dropped (least sensitive first)")
        ax.set_ylabel("validation loss")
        ax.set_title("Sync-Point Drop on shakespeare_char (4 layers), zero-shot", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
