"""
nanoGPT's CPU shakespeare_char anchor at TP=2, over several seeds.

    python benchmarks/anchor.py --data ../shared/data/tinyshakespeare.txt [--seeds 1337,1,2,3,4] [-- --no-bias]

Runs examples/train.py with its defaults (nanoGPT's settings) under torchrun with 2 processes
once per seed, and reports for each run the final validation loss as nanoGPT measures it (the
mean over 20 random batches, which moves by about 0.02 from one draw to the next), the
wall time, and the loss over the whole validation split read in consecutive 64-character
windows: the same quantity without sampling noise. Arguments after `--` go to train.py.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys


HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "examples", "train.py")

from dtensor_gpt import GPT, GPTConfig, load_checkpoint  # noqa: E402
from dtensor_gpt.data import TextData, mean_loss  # noqa: E402
from machine import machine_line  # noqa: E402


def train_once(data, seed, out, nproc, extra=()):
    """Run examples/train.py under torchrun; return (its final val loss on 20 random batches, seconds)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               TRAIN, "--data", data, "--seed", str(seed), "--out", out, "--always-save-checkpoint", "--overwrite", *extra]
    log = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    final = re.search(r"trained to iteration \d+ in (\d+)s; final val loss ([\d.]+)", log)
    return float(final.group(2)), int(final.group(1))


def whole_split_loss(path, data, block_size):
    """Mean next-character loss over every window of the validation split."""
    with open(os.path.join(path, "index.json")) as f:
        model = GPT(GPTConfig(**json.load(f)["config"]))
    load_checkpoint(model, path)
    return mean_loss(model.eval(), *data.windows("val", block_size))


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="1337,1,2,3,4")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--dir", default=os.path.join(HERE, "out", "anchor"))
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    data = TextData(args.data)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = os.path.join(args.dir, f"seed-{seed}")
        sampled, seconds = train_once(args.data, seed, out, args.nproc, extra)
        whole = whole_split_loss(out, data, 64)
        rows.append((seed, sampled, whole, seconds))
        print(f"seed {seed}: val loss {sampled:.4f} (20 batches), {whole:.4f} (whole split), {seconds} s", flush=True)
    print(f"\n| seed | val loss, 20 random batches | val loss, whole split | wall time |")
    print("|---|---|---|---|")
    for seed, sampled, whole, seconds in rows:
        print(f"| {seed} | {sampled:.4f} | {whole:.4f} | {seconds} s |")
    for name, column in (("20 random batches", 1), ("whole split", 2)):
        values = [row[column] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name}: mean {statistics.mean(values):.4f}, sd {spread:.4f}, "
              f"min {min(values):.4f}, max {max(values):.4f} over {len(values)} seeds")


if __name__ == "__main__":
    main()
