"""
Peak memory per rank, and load time, of the two entry points on models too large to hold
whole many times over: every rank builds on meta and allocates its own shards only.

    python benchmarks/rank_memory.py [--models gpt2-large:1,2,4 gpt2-xl:1,5] [--dir /tmp/rank-memory]

For each model (random weights from seed 0, saved once as a TP=1 checkpoint in --dir by a process
that builds on meta and initialises): `examples/generate.py --checkpoint DIR` for 2 new tokens,
then the first step of `examples/train.py` from scratch (the same architecture, GPT-2's BPE
vocabulary, block_size 128, batch 1; one evaluation batch per split), at each TP degree. Each
rank's peak anonymous memory (RssAnon, sampled from /proc every 0.05 s) is set against the goal

    generate:  model bytes / TP + the largest tensor + 0.5 GB of runtime
    train:     that plus AdamW's step (gradients and two moments: 3 x model bytes / TP)
               and the step's activations and logits (dtensor_gpt.memory.training_step_bytes)

Load time is generate.py's own figure (build, parallelize, read the checkpoint), printed in its
summary line, beside the machine's 1-minute load average when it ended (a time taken while
other processes compete for the cores is longer by about their share). A step the machine cannot hold is refused by train.py before it allocates, and
shown as refused.
"""

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(ROOT, "..", "shared", "data")

from machine import machine_line  # noqa: E402
from proc_memory import command_line, descendants, resident_kib  # noqa: E402

RUNTIME = 0.5e9
BLOCK_SIZE = 128


def make_checkpoint(name, path):
    """A TP=1 checkpoint of `name` with seed 0's weights, built on meta: this process holds the model once."""
    import contextlib

    import torch

    from dtensor_gpt import GPT, init_weights, save_checkpoint
    from dtensor_gpt.configs import config_by_name

    with torch.device("meta"), contextlib.redirect_stdout(None):
        model = GPT(config_by_name(name))
    torch.manual_seed(0)
    save_checkpoint(init_weights(model), path)


def sizes(name):
    """(model bytes, largest tensor bytes) of config `name` in fp32."""
    import contextlib

    import torch

    from dtensor_gpt import GPT
    from dtensor_gpt.configs import config_by_name

    with torch.device("meta"), contextlib.redirect_stdout(None):
        model = GPT(config_by_name(name))
    shapes = [p.numel() * 4 for p in model.parameters()]
    return sum(shapes), max(shapes)


def train_step_bytes(name, tp):
    from dataclasses import replace

    from dtensor_gpt.configs import config_by_name
    from dtensor_gpt.memory import training_step_bytes

    return training_step_bytes(replace(config_by_name(name), block_size=BLOCK_SIZE), 1, tp)


def run_ranks(cmd, script):
    """(return code, output, peak RssAnon bytes of each rank) of a torchrun command; ranks are the processes running `script`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {}
    while proc.poll() is None:
        for pid in descendants(proc.pid):
            if any(part.endswith(script.encode()) for part in command_line(pid)):
                resident = resident_kib(pid)
                if resident:
                    peaks[pid] = max(peaks.get(pid, 0), resident["RssAnon"] * 1024)
        time.sleep(0.05)
    return proc.returncode, proc.stdout.read(), sorted(peaks.values())


def torchrun(tp):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp)]


def generate(name, path, tp):
    cmd = torchrun(tp) + ["examples/generate.py", "--checkpoint", path, "--max-new-tokens", "2", "--prompt", "Hello",
                          "--tokenizer", os.path.join(SHARED, "gpt2.tiktoken")]
    rc, out, peaks = run_ranks(cmd, "generate.py")
    if rc:
        raise SystemExit(f"generate.py {name} at tp={tp} failed:\n{out[-3000:]}")
    return peaks, float(re.search(r"checkpoint loaded in ([\d.]+)s", out).group(1))


def train(name, tp):
    from dtensor_gpt.configs import config_by_name

    config = config_by_name(name)
    cmd = torchrun(tp) + ["examples/train.py", "--data", os.path.join(SHARED, "tinyshakespeare.txt"),
                          "--tokenizer", os.path.join(SHARED, "gpt2.tiktoken"), "--n-layer", str(config.n_layer),
                          "--n-head", str(config.n_head), "--n-embd", str(config.n_embd), "--no-bias" if not config.bias else "--bias",
                          "--block-size", str(BLOCK_SIZE), "--batch-size", "1", "--max-iters", "1", "--eval-iters", "1"]
    rc, out, peaks = run_ranks(cmd, "train.py")
    refusal = re.search(r"error: (a training step .*)", out)
    if refusal:
        return None, refusal.group(1)
    if rc:
        raise SystemExit(f"train.py {name} at tp={tp} failed:\n{out[-3000:]}")
    return peaks, None


def gb(n):
    return f"{n / 1e9:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gpt2-large:1,2,4", "gpt2-xl:1,5"],
                        help="NAME:TP,TP,... (names from dtensor_gpt/configs.py)")
    parser.add_argument("--dir", default="/tmp/rank-memory", help="where the checkpoints are made (kept for reruns)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--make", nargs=2, metavar=("NAME", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:  # the child that makes a checkpoint: its memory goes back when it exits
        make_checkpoint(*args.make)
        return
    print(machine_line(), flush=True)
    rows = []
    for spec in args.models:
        name, degrees = spec.split(":")
        path = os.path.join(args.dir, name)
        if not os.path.exists(os.path.join(path, "index.json")):
            print(f"saving {name} to {path}", flush=True)
            subprocess.run([sys.executable, __file__, "--make", name, path], check=True)
        total, largest = sizes(name)
        for tp in map(int, degrees.split(",")):
            peaks, load = generate(name, path, tp)
            goal = total / tp + largest + RUNTIME
            rows.append((name, total, tp, "generate.py", peaks, goal, f"{load:.1f} (load average {os.getloadavg()[0]:.1f})"))
            print(rows[-1], flush=True)
            if not args.skip_train:
                peaks, refusal = train(name, tp)
                goal = train_step_bytes(name, tp) + largest + RUNTIME
                rows.append((name, total, tp, "train.py first step", peaks, goal, refusal or ""))
                print(rows[-1], flush=True)
    print("\n| model (fp32 bytes) | TP | entry point | peak anonymous memory per rank, GB | goal, GB | met | load s / note |")
    print("|---|---|---|---|---|---|---|")
    for name, total, tp, what, peaks, goal, note in rows:
        peak = "refused" if peaks is None else (f"{gb(max(peaks))}" if len(set(map(gb, peaks))) == 1 else
                                                f"{gb(min(peaks))} to {gb(max(peaks))}")
        met = "" if peaks is None else ("yes" if max(peaks) <= goal else "no")
        print(f"| {name} ({gb(total)} GB) | {tp} | {what} | {peak} | {gb(goal)} | {met} | {note} |")


if __name__ == "__main__":
    main()
