"""
A network cut between two nodes, and the restart that follows: a 2-node TP=2 training run on
the emulated cluster (benchmarks/cluster.py, as root) whose link is pulled for longer than
--timeout, then plugged back.

    python benchmarks/link_cut.py --data ../shared/data/tinyshakespeare.txt [--timeout 4] [--cut 12] [--cut-at 14]

Runs examples/train.py (the shipped model's recipe, one rank per node) under `torchrun
--max-restarts 1 ... --resume auto --timeout T` on both nodes, and as rank 0 prints iteration
--cut-at's progress line, sets node 1's switch port down (its eth0 loses its carrier: a pulled
cable) for --cut seconds, then up again. Prints, timed from the cut: each rank's error line,
torchrun's restart (`--resume auto: continuing ...`) and the first step after it; the run must
end with status 0 on both nodes. Then the same command without a cut, in a fresh --out, and
whether both final checkpoints hold the same tensors bit for bit.
"""

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from cluster import Cluster, JobFailed, missing_requirements  # noqa: E402
from machine import machine_line  # noqa: E402

TRAIN = os.path.join(HERE, "..", "examples", "train.py")


class LinkCut:
    """Cluster.run's watch: stamps every line of every node, pulls node 1's cable after `trigger`, plugs it back."""

    def __init__(self, cluster, trigger, seconds):
        self.cluster, self.trigger, self.seconds = cluster, trigger, seconds
        self.partial = [""] * cluster.nodes
        self.lines = []  # (time, node, line)
        self.cut = self.restored = None

    def __call__(self, new):
        now = time.time()
        for node, text in enumerate(new):
            *complete, self.partial[node] = (self.partial[node] + text).split("\n")
            self.lines += [(now, node, line) for line in complete]
        if self.cut is None and any(line.startswith(self.trigger) for _, _, line in self.lines):
            self.cluster.set_link(1, up=False)
            self.cut = time.time()
        if self.cut is not None and self.restored is None and now - self.cut >= self.seconds:
            self.cluster.set_link(1, up=True)
            self.restored = time.time()

    def first(self, prefix, after=0.0):
        """(time, node, line) of the first line starting with `prefix` after `after`."""
        return next(((t, node, line) for t, node, line in self.lines if t > after and line.startswith(prefix)), None)


def tensors(directory):
    from safetensors.torch import load_file

    return {(f, k): v for f in sorted(os.listdir(directory)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(directory, f)).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--timeout", type=float, default=4, help="train.py's --timeout (default: 4 s)")
    p.add_argument("--cut", type=float, default=12, help="seconds the link stays down, above --timeout (default: 12)")
    p.add_argument("--cut-at", type=int, default=14, help="cut as iteration N's progress line is printed (default: 14)")
    p.add_argument("--save-interval", type=int, default=10)
    p.add_argument("--max-iters", type=int, default=20)
    args = p.parse_args()
    if not args.timeout < args.cut:
        p.error(f"--cut {args.cut:g} must be longer than --timeout {args.timeout:g}: a shorter cut is only a slow step")
    if not args.cut_at < args.max_iters:
        p.error(f"--cut-at {args.cut_at} must be below --max-iters {args.max_iters}")
    reason = missing_requirements()
    if reason:
        sys.exit(f"link_cut.py: cannot run: the emulated cluster {reason}")
    with tempfile.TemporaryDirectory() as tmp, Cluster(2) as cluster:
        def train(out, watch=None):
            command = [TRAIN, "--data", os.path.abspath(args.data), "--out", os.path.join(tmp, out), "--resume", "auto",
                       "--timeout", f"{args.timeout:g}", "--max-iters", str(args.max_iters), "--lr-decay-iters", "2000",
                       "--save-interval", str(args.save_interval), "--log-interval", "1"]
            return cluster.torchrun(command, nproc_per_node=1, timeout=600, max_restarts=1, watch=watch)

        cut = LinkCut(cluster, f"iter {args.cut_at}:", args.cut)
        try:
            train("run", cut)
            train("straight")
        except JobFailed as e:
            sys.exit(f"link_cut.py: {e}")
        final, straight = tensors(os.path.join(tmp, "run")), tensors(os.path.join(tmp, "straight"))
    if cut.cut is None:
        sys.exit(f"link_cut.py: iteration {args.cut_at}'s progress line never came: no cut")
    print(f"link of node 1 cut as iteration {args.cut_at} was printed, for {cut.restored - cut.cut:.1f} s "
          f"(train.py --timeout {args.timeout:g}); seconds from the cut:")
    for t, node, line in sorted(cut.lines + [(cut.restored, None, "the link is back up")], key=lambda e: e[0]):
        if node is None or line.startswith("error:"):
            print(f"  {t - cut.cut:5.1f}  {'' if node is None else f'node {node}: '}{line}")
    restart = cut.first("--resume auto: continuing", after=cut.cut)
    if restart:
        resumed_at = int(restart[2].split("at iteration ")[1].split()[0])
        stepped = cut.first(f"iter {resumed_at}:", after=restart[0])
        print(f"  {restart[0] - cut.cut:5.1f}  node {restart[1]}: {restart[2]}")
        if stepped:
            print(f"  {stepped[0] - cut.cut:5.1f}  node {stepped[1]}: {stepped[2]} (the first step after the restart)")
    same = final.keys() == straight.keys() and all(final[k].equal(straight[k]) for k in final)
    print(f"both nodes exit 0; final checkpoint against an uninterrupted run's: {len(final)} tensors, "
          f"{'all bit-identical' if same else 'NOT identical'}; {machine_line()}")


if __name__ == "__main__":
    main()
