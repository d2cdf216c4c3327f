"""Run a function on N gloo processes and hand rank 0's result back to the test."""

import multiprocessing
import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtensor_gpt.launch import exit_distributed

# Workers fork from one clean server process per test process that has imported these already
# (a fresh interpreter spends about 4 s of CPU importing them); nothing of a test's own state
# reaches them, as with spawn. (Forking the test process itself was tried: inherited state gave
# wrong results.)
multiprocessing.set_forkserver_preload(["torch", "torch.distributed.tensor", "dtensor_gpt", "plans", "distributed"])


def _worker(rank, world_size, tmp, fn, args, timeout):
    # a forked worker's output would go where the server's goes: to files the test replays
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(os.path.join(tmp, f"{name}.{rank}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun sets it: examples/train.py checks --dp against it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=rank,
                            world_size=world_size, timeout=timeout and timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            with open(os.path.join(tmp, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    exit_distributed()


def run_distributed(fn, world_size, *args, timeout=None):
    """
    Run `fn(rank, world_size, *args)` on `world_size` new processes under gloo; what they print
    reaches this process's stdout and stderr (rank by rank) when they end.

    Rendezvous goes through a fresh file (no TCP port to collide between pytest-xdist
    workers); `fn` must be a module-level function so that it can be pickled. `timeout`
    (seconds) bounds every collective, so that a rank left waiting fails the test, not hangs it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.start_processes(_worker, args=(world_size, tmp, fn, args, timeout), nprocs=world_size, join=True,
                               start_method="forkserver")
        finally:
            for name, fd in (("stdout", 1), ("stderr", 2)):
                for rank in range(world_size):
                    path = os.path.join(tmp, f"{name}.{rank}")
                    if os.path.exists(path):
                        with open(path, "rb") as f:
                            data = f.read()
                        while data:
                            data = data[os.write(fd, data):]
        with open(os.path.join(tmp, "result.pkl"), "rb") as f:
            return pickle.load(f)
