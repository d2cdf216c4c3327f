"""
Loss of Sync-Point Drop against the number of dropped blocks, at TP=2 and 4, on a trained model.

    python benchmarks/spd_sweep.py --data ../shared/data/tinyshakespeare.txt [--png spd_sweep.png]

Trains nanoGPT's CPU shakespeare_char model (n_layer=4, n_head=4, n_embd=128, block_size=64,
batch 12, lr 1e-3 -> 1e-4 over 2000 steps, dropout 0) on one process, or loads it from --model.
Then, for each TP degree over spawned gloo processes: ranks the blocks by the paper's
block-wise sensitivity on a calibration batch (training data), and measures validation loss
with the K least sensitive blocks dropped, K = 0..n_layer, on fixed validation batches.
"""

import argparse
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402
from dtensor_gpt import GPT, GPTConfig  # noqa: E402
from dtensor_gpt.data import TextData  # noqa: E402


def train(data, steps, seed=1337):
    """nanoGPT's train_shakespeare_char.py with its CPU settings, on one process."""
    torch.manual_seed(seed)
    config = GPTConfig(block_size=64, vocab_size=data.vocab_size, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        lr = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * min(step, steps) / steps)) if step >= 100 else 1e-3 * (step + 1) / 100
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = data.batch("train", 12, 64, generator)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: train loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return model


def _sweep(rank, world_size, state, config, calibration, batches):
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import parallelize
    from dtensor_gpt.spd import block_sensitivity

    def fresh():
        model = GPT(config)
        model.load_state_dict(state)
        return model

    mesh = init_device_mesh("cpu", (world_size,))
    sensitivity = block_sensitivity(fresh(), mesh, calibration)
    order = sorted(range(config.n_layer), key=sensitivity.__getitem__)
    losses = []
    for k in range(config.n_layer + 1):
        model = parallelize(fresh(), mesh, "spd", spd_blocks=sorted(order[:k]))
        with torch.no_grad():
            losses.append(sum(model(x, y)[1].item() for x, y in batches) / len(batches))
    return dict(sensitivity=sensitivity, order=order, losses=losses)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--model", help="a state dict saved by an earlier run (skips training)")
    parser.add_argument("--save", default=os.path.join(HERE, "out", "shakespeare_char.pt"))
    parser.add_argument("--png")
    args = parser.parse_args()

    data = TextData(args.data, pad_to=4)
    if args.model:
        state = torch.load(args.model, weights_only=True)
    else:
        state = train(data, args.steps).state_dict()
        os.makedirs(os.path.dirname(args.save), exist_ok=True)
        torch.save(state, args.save)
        print(f"saved {args.save}")
    config = GPTConfig(block_size=64, vocab_size=data.vocab_size, n_layer=4, n_head=4, n_embd=128)
    generator = torch.Generator().manual_seed(0)
    calibration = torch.cat(data.batch("train", 12, 64, generator), 1)[:, :65]
    batches = [data.batch("val", 12, 64, generator) for _ in range(20)]

    results = {tp: run_distributed(_sweep, tp, state, config, calibration, batches) for tp in (2, 4)}
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
        ax.set_xlabel("blocks with the sync point dropped (least sensitive first)")
        ax.set_ylabel("validation loss")
        ax.set_title("Sync-Point Drop on shakespeare_char (4 layers), zero-shot", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
