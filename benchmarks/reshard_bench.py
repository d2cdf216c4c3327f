"""
Converter throughput and memory against a plain copy of the same bytes, and what verifying
the source costs.

    python benchmarks/reshard_bench.py [--configs gpt2 gpt2-xl] [--repeats 3] [--dir /tmp/reshard-bench]

For each config: saves a randomly initialized model as a TP=1 checkpoint, then times
`python -m dtensor_gpt.reshard` to TP=4 (TP=5 for gpt2-xl's 25 heads), as it runs by default
(every source file's sha256 checked first) and with --no-verify, and a plain `cp -r` of the
same directory, sampling the converter's resident memory (/proc: anonymous memory, which the
process owns, and file-backed pages of the memory maps, which the kernel can drop) and its
CPU time (user + system, which other processes on a shared machine disturb far less than
the wall time). Each command runs --repeats times, alternating; the least time counts. It
also times hashing the checkpoint's index, which every opening of a checkpoint does, and
the verification alone: the CPU time of opening the source with and without verify.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import timeit

import torch

from dtensor_gpt import GPT, save_checkpoint
from dtensor_gpt.configs import config_by_name
from dtensor_gpt.format import index_sha256
from dtensor_gpt.sources import open_source
from machine import machine_line
from proc_memory import resident_kib

TP = {"gpt2": 4, "gpt2-medium": 4, "gpt2-large": 4, "gpt2-xl": 5}


def run_sampled(cmd):
    """(seconds, CPU seconds (user + system), peak anonymous MiB, peak file-backed MiB) of a command."""
    start = time.time()
    proc = subprocess.Popen(cmd)
    anon = file = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        resident = resident_kib(proc.pid)
        if resident:
            anon, file = max(anon, resident["RssAnon"]), max(file, resident["RssFile"])
        time.sleep(0.02)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{cmd} failed with {os.waitstatus_to_exitcode(status)}")
    return time.time() - start, usage.ru_utime + usage.ru_stime, anon / 1024, file / 1024


def cpu_seconds(fn):
    start = time.process_time()
    fn()
    return time.process_time() - start


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["gpt2", "gpt2-xl"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="/tmp/reshard-bench")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    os.makedirs(args.dir, exist_ok=True)
    rows, notes = [], []
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
        with open(os.path.join(src, "index.json")) as f:
            index = json.load(f)
        hashing = timeit.timeit(lambda: index_sha256(index), number=100) / 100
        notes.append(f"{name}: every opening hashes its index ({len(json.dumps(index, sort_keys=True, separators=(',', ':'))):,} "
                     f"bytes of canonical JSON) in {hashing * 1e3:.1f} ms")
        opening = {verify: min(cpu_seconds(lambda: open_source(src, verify)) for _ in range(args.repeats)) for verify in (True, False)}
        checking = opening[True] - opening[False]
        convert = [sys.executable, "-m", "dtensor_gpt.reshard", src, dst, "--tp", str(TP[name])]
        runs = {"verified": [], "unverified": [], "copy": []}
        for _ in range(args.repeats):
            for kind, cmd in (("verified", convert), ("unverified", convert + ["--no-verify"]), ("copy", ["cp", "-r", src, copy])):
                runs[kind].append(run_sampled(cmd))
                shutil.rmtree(copy if kind == "copy" else dst)
        (seconds, cpu), (unverified, unverified_cpu), (copy_seconds, _) = (
            (min(r[0] for r in runs[k]), min(r[1] for r in runs[k])) for k in runs)
        anon, file = (max(r[i] for r in runs["verified"]) for i in (2, 3))
        rows.append((name, TP[name], size, largest, seconds, cpu, unverified, unverified_cpu, checking, copy_seconds, anon, file))
    print("| model | to TP | bytes | largest tensor | reshard s (MB/s) | reshard CPU s | --no-verify s (CPU s) | "
          "verifying alone, CPU s (MB/s) | cp -r s (MB/s) | peak anon MiB | peak file-backed MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, tp, size, largest, s, cpu, u, ucpu, v, c, anon, file in rows:
        print(f"| {name} | {tp} | {size / 1e6:,.0f} MB | {largest / 2**20:,.0f} MiB | {s:.1f} ({size / 1e6 / s:,.0f}) | {cpu:.1f} | "
              f"{u:.1f} ({ucpu:.1f}) | {v:.1f} ({size / 1e6 / v:,.0f}) | {c:.1f} ({size / 1e6 / c:,.0f}) | {anon:,.0f} | {file:,.0f} |")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
