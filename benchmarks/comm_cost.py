"""
What communication costs in time. GPT-2 124M under each TP plan on emulated nodes whose links
`tc` caps (benchmarks/cluster.py), a cost model fitted to a collective microbenchmark on the
same links and checked against every measured cell, and the same model on paper for real links.

    python benchmarks/comm_cost.py measure --tp 2 --repeats 5    # plans x link rate, TP=2 (root; about 18 min on 2 quiet cores)
    python benchmarks/comm_cost.py measure --tp 4 --repeats 3
    python benchmarks/comm_cost.py measure --tp 2,4 --decode-rows 8 --context 128 --new 16 --measures prefill,decode \
        --repeats 2 --plans megatron,megatron-overlap,megatron+int8,megatron+bf16,spd:all --results docs/comm_cost/decode-8-rows
    python benchmarks/comm_cost.py placement    # dp=2 x tp=2 on 2 nodes: TP inside the nodes or across (root)
    python benchmarks/comm_cost.py report [--png docs/comm_cost.png]   # tables (markdown), PNG, on-paper table
    python benchmarks/comm_cost.py report --results docs/comm_cost docs/comm_cost/new-plans   # and the new plans' cells apart

measure: TP nodes of one rank each, so that every TP collective crosses the capped links; one
job (benchmarks/cluster_job.py) per TP degree first times torch.distributed's collectives (the
microbenchmark), then, under each plan, the prefill of 512 tokens, decoding per token after it
(KV cache), and one training step of 512 tokens (forward, backward, AdamW); or, with
--decode-rows 8, a batch of 8 rows' prefill and decoding (a token of every row per step). The job sets the
link rate itself and visits every rate in every repeat (in alternating order), so that a shared
machine whose load drifts slows every rate alike; each time is stored with the 1-minute load
average it was taken under, and the job with its load over its whole run, in docs/comm_cost/.
`report` reads those files only.

The cost model (dtensor_gpt.cost, which the plan adviser dtensor_gpt.advise uses too). A
cell's time at link rate R is its time on the unlimited link (computation, and the unlimited
link's own communication) plus, for every collective the cell issues (kind and message bytes,
from dtensor_gpt.comm), its time at R minus its time unlimited:

    t(kind, bytes, R) = alpha[kind, R] + wire(kind, bytes, N) / beta[kind, R]

wire is what each rank sends in a ring: bytes x 2(N-1)/N for an all-reduce, x (N-1)/N for an
all-gather or reduce-scatter of N ranks, or an all-to-all (compressed sums, "megatron+int8"); alpha and beta are least-squares fits (relative error)
to the microbenchmark of the same job, on the same links. A plan whose blocks run in overlapped
chunks ("megatron-overlap") takes the max-type term instead (dtensor_gpt.cost.predict_step): its
blocks cost the longer of their computation and their communication plus one chunk of the
shorter, in the chunks the step really splits into (a decoded token of one row: none). A
compressed plan needs nothing more: its collectives are those it issued, and its quantisation's
computation is in its unlimited-link time. `report --results A B` reads several directories, each
checked and counted apart (the first is the validated set, docs/comm_cost; the new plans' cells
are in docs/comm_cost/new-plans).
"""

import argparse
import json
import os
import statistics
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(ROOT, "docs", "comm_cost")
JOB = os.path.join(HERE, "cluster_job.py")

RATES = ["unlimited", "1gbit", "300mbit", "100mbit"]
SIZES = [2048, 8192, 32768, 131072, 524288, 2097152]
PLANS = ["megatron", "megatron-sp", "spd:last:6", "spd:all", "megatron-overlap", "megatron+bf16", "megatron+int8"]  # +: compress=
MEASURES = ["decode", "prefill", "train"]
WORKLOAD = dict(config="gpt2", context=512, new=8, decode_rows=1, train_batch=1, train_seq=512, repeats=3,
                measures="prefill,decode,train")
# examples/train.py's own model (nanoGPT's CPU shakespeare_char) with its batch (12 rows of 64 characters, 6
# per dp rank) and with 64 rows; then GPT-2 124M with one 512-token row per dp rank
NANOGPT = ["--config", "gpt2", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--vocab-size", "65"]
PLACEMENT = [
    dict(name="nanogpt", label="nanoGPT shakespeare_char", rates=["unlimited", "1gbit", "100mbit"], repeats=5,
         job=NANOGPT + ["--train-batch", "6", "--train-seq", "64"]),
    dict(name="nanogpt-64rows", label="nanoGPT shakespeare_char", rates=["unlimited", "1gbit", "100mbit"], repeats=5,
         job=NANOGPT + ["--train-batch", "32", "--train-seq", "64"]),
    dict(name="gpt2", label="GPT-2 124M", rates=["unlimited", "100mbit"], repeats=2,
         job=["--config", "gpt2", "--train-batch", "1", "--train-seq", "512"]),
]


# ----------------------------------------------------------------------- the machine's load

def _running_threads(pids):
    running = 0
    for pid in pids:
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/stat") as f:
                    running += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return running


class LoadMonitor:
    """
    While a job runs: the 1-minute load average, and the runnable threads that are not ours
    (the kernel's procs_running less this process's tree), sampled every second.
    """

    def __init__(self):
        self.loads, self.others = [], []
        self._stop = threading.Event()

    def _sample(self):
        from cluster import _descendants

        while not self._stop.wait(1.0):
            with open("/proc/stat") as f:
                running = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
            ours = _running_threads([os.getpid(), *_descendants(os.getpid())])
            self.others.append(max(0, running - ours))
            self.loads.append(os.getloadavg()[0])

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        mean = lambda xs: round(statistics.fmean(xs), 2) if xs else None
        return dict(load1_mean=mean(self.loads), load1_max=round(max(self.loads), 2) if self.loads else None,
                    other_runnable_mean=mean(self.others))


# ------------------------------------------------------------------------------- measuring

def run_job(cluster, name, job_args, nproc_per_node, args, say):
    """One job on the cluster, setting the link rates itself; its result, with the load, saved as RESULTS/name.json."""
    path = os.path.join(args.results, f"{name}.json")
    if os.path.exists(path) and not args.again:
        say(f"{name}: kept (--again measures it anew)")
        return
    partial = path + ".partial"
    load1_at_start = round(os.getloadavg()[0], 2)
    with LoadMonitor() as monitor:
        start = time.time()
        cluster.torchrun([JOB, "--out", partial, *job_args], nproc_per_node, timeout=args.job_timeout, rate_control=True)
    with open(partial) as f:
        result = json.load(f)
    os.remove(partial)
    result.update(name=name, seconds=round(time.time() - start, 1), load=dict(load1_at_start=load1_at_start, **monitor.summary()),
                  cpus=os.cpu_count(), job_args=job_args, burst_seconds=cluster.burst_seconds)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    say(f"{name}: {result['seconds']} s, load {result['load']}")


def measure(args, say):
    from cluster import Cluster

    w = {**WORKLOAD, **{k: v for k, v in vars(args).items() if k in WORKLOAD and v is not None}}
    for tp in args.tp:
        with Cluster(tp) as cluster:
            job = ["--rates", ",".join(args.rates), "--collectives", ",".join(map(str, SIZES)), "--groups", "world",
                   "--plans", ",".join(args.plans), "--config", w["config"], "--context", str(w["context"]),
                   "--new", str(w["new"]), "--decode-rows", str(w["decode_rows"]), "--measures", w["measures"],
                   "--train-batch", str(w["train_batch"]), "--train-seq", str(w["train_seq"]), "--repeats", str(w["repeats"])]
            run_job(cluster, f"tp{tp}", job, 1, args, say)


def placement(args, say):
    from cluster import Cluster

    with Cluster(2) as cluster:
        for workload in PLACEMENT:
            # the links' microbenchmark: a pair across the nodes per local rank, both at once (as the dp groups run)
            job = ["--placement", "--rates", ",".join(args.rates or workload["rates"]), *workload["job"],
                   "--repeats", str(workload["repeats"]), "--collectives", ",".join(map(str, SIZES)), "--groups", "cross"]
            run_job(cluster, f"placement-{workload['name']}", job, 2, args, say)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/comm_cost.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["measure", "placement", "report"])
    parser.add_argument("--results", nargs="+", default=[RESULTS],
                        help=f"directory of the results (default {RESULTS}); report reads several, the first the validated cells")
    parser.add_argument("--tp", default="2,4", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rates", type=lambda s: s.split(","), help=f"link rates (default {','.join(RATES)})")
    parser.add_argument("--plans", default=",".join(PLANS), type=lambda s: s.split(","))
    parser.add_argument("--again", action="store_true", help="measure anew what --results already holds")
    parser.add_argument("--job-timeout", type=float, default=3600, help="seconds before a job is killed")
    parser.add_argument("--png", help="with report: draw time against link rate to this file")
    for name, value in WORKLOAD.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), help=f"measure's workload (default {value})")
    args = parser.parse_args(argv)
    if args.command != "report":
        from machine import machine_line

        print(machine_line(), flush=True)
    say = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
    if args.command == "report":
        from comm_cost_report import report

        return report(args)
    from cluster import JobFailed, missing_requirements

    if len(args.results) > 1:
        parser.error(f"{args.command} writes one results directory; --results names {len(args.results)}")
    args.results = args.results[0]

    reason = missing_requirements()
    if reason:
        print(f"comm_cost.py: cannot measure: the emulated cluster {reason}", file=sys.stderr)
        return 2
    os.makedirs(args.results, exist_ok=True)
    try:
        if args.command == "measure":
            args.rates = args.rates or RATES
            measure(args, say)
        else:
            placement(args, say)
    except (JobFailed, KeyboardInterrupt) as e:
        print(f"comm_cost.py: {e or 'interrupted'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
