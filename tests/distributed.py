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
# reaches them, as with spawn.
multiprocessing.set_forkserver_preload(["torch", "torch.distributed.tensor", "dtensor_gpt", "plans", "distributed"])


def _worker(rank, world_size, init_file, result_file, fn, args, timeout):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["WORLD_SIZE"] = str(world_size)  # as torchrun sets it: examples/train.py checks --dp against it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=timeout and timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args)
        if rank == 0:
            with open(result_file, "wb") as f:
                pickle.dump(result, f)
    except Exception:
        traceback.print_exc()
        dist.destroy_process_group()
        raise
    exit_distributed()


def run_distributed(fn, world_size, *args, timeout=None):
    """
    Spawn `world_size` processes running `fn(rank, world_size, *args)` under gloo.

    Rendezvous goes through a fresh file (no TCP port to collide between pytest-xdist
    workers); `fn` must be a module-level function so that spawn can pickle it. `timeout`
    (seconds) bounds every collective, so that a rank left waiting fails the test, not hangs it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        result_file = os.path.join(tmp, "result.pkl")
        mp.start_processes(
            _worker, args=(world_size, init_file, result_file, fn, args, timeout),
            nprocs=world_size, join=True, start_method="forkserver",
        )
        with open(result_file, "rb") as f:
            return pickle.load(f)
