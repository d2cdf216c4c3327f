"""
Training with dropout at TP=2 against TP=1, over seeds.

    python benchmarks/dropout_tp.py --data ../shared/data/tinyshakespeare.txt [--dropout 0.2] [--seeds 1337,1,2] [-- TRAIN.PY FLAGS]

Runs examples/train.py with its defaults (nanoGPT's CPU shakespeare_char settings: 4 layers,
4 heads, n_embd 128, block 64, batch 12, 2000 iterations) and --dropout, under torchrun with
2 processes (TP=2, the plugin's per-shard masks) and with 1 (TP=1: the plain model, no plugin
code runs), once per seed, seed by seed. The masks differ between TP degrees, so the runs
cannot match step for step; what must match is the distribution over seeds. Reports each
run's validation loss on 20 random batches (nanoGPT's measure) and on the whole validation
split (every consecutive 64-character window, no sampling noise), then mean ± sd per TP.
Arguments after `--` go to train.py (e.g. `-- --plan megatron-sp`).
"""

import argparse
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# one thread per process at both degrees, as torchrun gives TP=2's processes (on this 2-core
# machine under load, 100 iterations at TP=1 took 120 s with 2 threads and 21 s with 1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

from anchor import train_once, whole_split_loss  # noqa: E402
from dtensor_gpt.data import TextData  # noqa: E402
from machine import machine_line  # noqa: E402


def mean_sd(values):
    spread = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.4f}{spread}"


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--seeds", default="1337,1,2")
    parser.add_argument("--tp", default="2,1", help="TP degrees (processes per run)")
    parser.add_argument("--dir", default=os.path.join(HERE, "out", "dropout"))
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    data = TextData(args.data, pad_to=4)
    degrees = [int(t) for t in args.tp.split(",")]
    rows = {tp: [] for tp in degrees}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for tp in degrees:
            out = os.path.join(args.dir, f"tp{tp}-seed-{seed}")
            sampled, seconds = train_once(args.data, seed, out, tp, ["--dropout", str(args.dropout), *extra])
            whole = whole_split_loss(out, data, 64)
            rows[tp].append((seed, sampled, whole, seconds))
            print(f"TP={tp} seed {seed}: val loss {sampled:.4f} (20 batches), {whole:.4f} (whole split), "
                  f"{seconds} s", flush=True)
    print(f"\n| dropout {args.dropout} | seeds | val loss, 20 random batches | val loss, whole split | wall time |")
    print("|---|---|---|---|---|")
    for tp, runs in rows.items():
        seeds = ", ".join(str(r[0]) for r in runs)
        seconds = [r[3] for r in runs]
        print(f"| TP={tp} | {seeds} | {mean_sd([r[1] for r in runs])} | {mean_sd([r[2] for r in runs])} | "
              f"{min(seconds)}–{max(seconds)} s |")


if __name__ == "__main__":
    main()
