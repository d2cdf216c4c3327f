"""
Converter throughput and memory against a plain copy of the same bytes.

    python benchmarks/reshard_bench.py [--configs gpt2 gpt2-xl] [--dir /tmp/reshard-bench]

For each config: saves a randomly initialized model as a TP=1 checkpoint, then times
`python -m dtensor_gpt.reshard` to TP=4 (TP=5 for gpt2-xl's 25 heads) and a plain `cp -r` of
the same directory, sampling the converter's resident memory (/proc: anonymous memory,
which the process owns, and file-backed pages of the memory maps, which the kernel can drop).
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

import torch

from dtensor_gpt import GPT, save_checkpoint
from dtensor_gpt.configs import config_by_name

TP = {"gpt2": 4, "gpt2-medium": 4, "gpt2-large": 4, "gpt2-xl": 5}


def run_sampled(cmd):
    """(seconds, peak anonymous MiB, peak file-backed MiB) of a command."""
    start = time.time()
    proc = subprocess.Popen(cmd)
    anon = file = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            anon = max(anon, int(fields.get("RssAnon", "0 kB").split()[0]))
            file = max(file, int(fields.get("RssFile", "0 kB").split()[0]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise SystemExit(f"{cmd} failed with {proc.returncode}")
    return time.time() - start, anon / 1024, file / 1024


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["gpt2", "gpt2-xl"])
    parser.add_argument("--dir", default="/tmp/reshard-bench")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for name in args.configs:
        src, dst, copy = (os.path.join(args.dir, f"{name}-{k}") for k in ("tp1", "tp", "copy"))
        for path in (src, dst, copy):
            shutil.rmtree(path, ignore_errors=True)
        torch.manual_seed(0)
        model = GPT(config_by_name(name))
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        save_checkpoint(model, src)
        del model
        size = dir_bytes(src)
        seconds, anon, file = run_sampled([sys.executable, "-m", "dtensor_gpt.reshard", src, dst, "--tp", str(TP[name])])
        copy_seconds, _, _ = run_sampled(["cp", "-r", src, copy])
        rows.append((name, TP[name], size, largest, seconds, copy_seconds, anon, file))
        for path in (dst, copy):
            shutil.rmtree(path)
    print("| model | to TP | bytes | largest tensor | reshard s (MB/s) | cp -r s (MB/s) | peak anon MiB | peak file-backed MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tp, size, largest, s, c, anon, file in rows:
        print(f"| {name} | {tp} | {size / 1e6:,.0f} MB | {largest / 2**20:,.0f} MiB | {s:.1f} ({size / 1e6 / s:,.0f}) | "
              f"{c:.1f} ({size / 1e6 / c:,.0f}) | {anon:,.0f} | {file:,.0f} |")


if __name__ == "__main__":
    main()
