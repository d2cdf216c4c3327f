"""
Does megatron-overlap hide its all-reduces? The same forward (and training step) timed under
`megatron` and under `megatron-overlap`, and the all-reduces alone, on gloo processes.

    python benchmarks/overlap_bench.py [--tp 2] [--n-embd 768] [--n-layer 2] [--batch 1] [--seq 512] [--chunks 2,4] [--repeats 10]

Every plan runs in turn within each repeat (a shared machine's drifting load slows them
alike); medians are printed. "blocked in waits" is the part of a forward spent waiting for
collectives to finish (functional collectives' wait_tensor, timed): under megatron each
all-reduce is waited for as soon as it is issued; what overlapping hides no longer shows here. "all-reduces alone" is the time of the all-reduces that
`megatron`'s forward issues (2 per block of (batch, seq, n_embd) floats), back to back: the
most that overlapping could hide. "gloo during compute": one such all-reduce issued as a
functional collective (as DTensor issues it), matmuls of about its duration, then the wait;
against each alone. Near the longer of the two, gloo ran while the process computed; near
their sum, it did not. With one compute thread per process, gloo's own thread needs a free
core to move data while the process computes; a machine with no spare core shows little gain.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed._functional_collectives as funcol  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor.parallel import loss_parallel  # noqa: E402

from dtensor_gpt import GPT, GPTConfig, parallelize  # noqa: E402
from machine import machine_line  # noqa: E402


def timed(fn, repeats_inside=1):
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats_inside):
        fn()
    return (time.perf_counter() - start) / repeats_inside


def count_blocked_seconds():
    """Make every wait for a functional collective add its seconds to the returned list's one item."""
    blocked, wait = [0.0], funcol.wait_tensor

    def timed_wait(tensor):
        start = time.perf_counter()
        out = wait(tensor)
        blocked[0] += time.perf_counter() - start
        return out

    funcol.wait_tensor = timed_wait
    return blocked


def worker(rank, world_size, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    config = GPTConfig(n_layer=args.n_layer, n_head=12, n_embd=args.n_embd, block_size=args.seq, vocab_size=args.vocab)
    mesh = init_device_mesh("cpu", (world_size,))
    plans = {"megatron": {}, **{f"megatron-overlap, {k} chunks": dict(chunks=k) for k in args.chunks}}
    models = {}
    for name, options in plans.items():
        torch.manual_seed(0)
        plan = "megatron" if name == "megatron" else "megatron-overlap"
        models[name] = parallelize(GPT(config), mesh, plan, loss_parallel=True, **options)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    activation = torch.randn(args.batch, args.seq, args.n_embd)

    def forward(model):
        with torch.no_grad(), loss_parallel():
            model(idx, idx)

    def train(model):
        with loss_parallel():
            model(idx, idx)[1].backward()

    def all_reduces():
        for _ in range(2 * args.n_layer):
            dist.all_reduce(activation)

    weight = torch.randn(args.n_embd, args.n_embd)

    def matmuls():
        for _ in range(args.matmuls):
            activation @ weight

    def both():
        summed = funcol.all_reduce(activation, "sum", dist.group.WORLD)
        matmuls()
        summed.wait()

    times, blocked = {}, count_blocked_seconds()
    for repeat in range(args.repeats + 1):  # the first repeat warms up
        for name, model in models.items():
            for what, fn in (("forward", forward), ("forward + backward", train)):
                blocked[0] = 0.0
                seconds = timed(lambda: fn(model))
                if repeat:
                    times.setdefault(what, {}).setdefault(name, []).append(seconds)
                    times.setdefault(f"{what}: blocked in waits", {}).setdefault(name, []).append(blocked[0])
        for what, name, fn in (("forward", "all-reduces alone", all_reduces),
                               ("gloo during compute", "one all-reduce", lambda: dist.all_reduce(activation)),
                               ("gloo during compute", f"{args.matmuls} matmuls", matmuls),
                               ("gloo during compute", "both at once", both)):
            seconds = timed(fn)
            if repeat:
                times.setdefault(what, {}).setdefault(name, []).append(seconds)
    if rank == 0:
        print(f"TP={world_size}, n_layer={args.n_layer} n_embd={args.n_embd}, batch {args.batch} x seq {args.seq}, "
              f"median of {args.repeats} (ms):")
        for what, rows in times.items():
            for name, values in rows.items():
                print(f"  {what:36} {name:30} {1000 * statistics.median(values):8.1f}")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512, help="small: the blocks' time is what overlaps")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunks", default="2,4", type=lambda s: [int(k) for k in s.split(",")])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--matmuls", type=int, default=2, help="(batch x seq, n_embd) @ (n_embd, n_embd) products "
                        "during one all-reduce in 'gloo during compute'")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.tp, os.path.join(tmp, "rendezvous"), args), nprocs=args.tp,
                           join=True, start_method="spawn")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
