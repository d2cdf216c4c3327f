"""
What a dead rank costs a training run: the time from the kill to the first step after
torchrun's restart, for the shipped model's recipe (examples/train.py's defaults) at TP=2.

    python benchmarks/recovery.py --data ../shared/data/tinyshakespeare.txt [--kill-at 30] [--save-interval 20]

Runs `torchrun --max-restarts 1 ... --resume auto` with DTENSOR_GPT_FAULT killing rank 1 as
iteration --kill-at begins (right after iteration kill-at - 1's progress line, which gives the
kill's time), and times each line of rank 0 as it comes. Reports the time to torchrun's restart
line (`--resume auto: continuing ...`: new processes, rendezvous, the checkpoint loaded) and to
the first step after it, and the iterations the restart computes again (those since the last save).
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from machine import machine_line  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--kill-at", type=int, default=30)
    p.add_argument("--save-interval", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=1",
               os.path.join(HERE, "..", "examples", "train.py"), "--data", os.path.abspath(args.data),
               "--out", os.path.join(tmp, "run"), "--resume", "auto", "--max-iters", str(args.kill_at + 5),
               "--lr-decay-iters", "2000", "--save-interval", str(args.save_interval), "--log-interval", "1"]
        env = dict(os.environ, DTENSOR_GPT_FAULT=f"rank=1,iter={args.kill_at},kill")
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, stderr=subprocess.DEVNULL)
        stamped = [(time.time(), line.rstrip()) for line in job.stdout]
        if job.wait():
            sys.exit(f"the job failed (exit status {job.returncode}): {cmd}")
    killed = next(t for t, line in stamped if line.startswith(f"iter {args.kill_at - 1}:"))
    restart, resumed = next((t, line) for t, line in stamped if line.startswith("--resume auto: continuing"))
    first = int(re.search(r"at iteration (\d+)", resumed).group(1))
    stepped = next(t for t, line in stamped if t > restart and line.startswith(f"iter {first}:"))
    print(f"kill of rank 1 as iteration {args.kill_at} began -> restarted and loaded iteration {first}'s "
          f"checkpoint: {restart - killed:.1f} s; -> its first step done: {stepped - killed:.1f} s; "
          f"then {args.kill_at - first} iterations computed again; {machine_line()}")


if __name__ == "__main__":
    main()
