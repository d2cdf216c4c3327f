"""Process-group set-up shared by the examples and tools: NCCL on GPUs, gloo on CPU."""

import contextlib
import datetime
import os
import re
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_monitor = None  # a spare gloo group: after a timeout the main group's connections are closed


def init_distributed(mesh_shape=None, mesh_dim_names=None, timeout=None):
    """
    Join the job torchrun started (or a one-process job when run directly) and build a mesh.

    CUDA/NCCL is used when every local rank can have a GPU of its own, CPU/gloo otherwise.
    `timeout` (seconds) bounds every collective, so a stalled or dead peer ends the job
    (see `stalls_reported`) instead of torch's default 30 minutes. Returns (mesh, device).
    """
    global _monitor
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout) if timeout else None)
        if dist.get_world_size() > 1:
            _monitor = dist.new_group(backend="gloo")
    shape = mesh_shape or (dist.get_world_size(),)
    return init_device_mesh(device.type, shape, mesh_dim_names=mesh_dim_names), device


@contextlib.contextmanager
def stalls_reported(timeout):
    """
    End the job with one message when a collective times out: rank 0 names the ranks that
    no longer answer (torch's `monitored_barrier` on a spare group), the others stay quiet.
    """
    try:
        yield
    except RuntimeError as e:
        if "timed out" not in str(e).lower() or _monitor is None:
            raise
        rank = dist.get_rank()
        try:
            dist.monitored_barrier(group=_monitor, timeout=datetime.timedelta(seconds=min(timeout, 10)), wait_all_ranks=True)
            who = "every rank answers afterwards, so one was only slow"
        except RuntimeError as probe:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(probe))
            who = f"rank(s) {found.group(1)} do not answer (stalled or dead)" if found else "a peer does not answer"
        if rank == 0:
            detail = re.search(r"[Tt]imed out[^\n]*", str(e)).group(0)
            print(f"error: a collective did not complete within --timeout {timeout:g} s: {who}; raise --timeout "
                  f"if the job is merely slow (gloo: {detail})", file=sys.stderr)
        else:
            time.sleep(2)  # let rank 0 report before torchrun stops the job
        sys.stderr.flush()
        os._exit(3)


def exit_distributed(code=0):
    """
    Leave the job and end the process: barrier, destroy the process group, flush, exit.

    Exiting skips interpreter finalization on purpose: in torch 2.13 a gloo worker thread
    that still holds a finished functional collective can abort the process there
    ("terminate called without an active exception"; pytorch/pytorch#179291), measured
    here at 6 of 15 four-rank runs of a single DTensor redistribute, 0 of 30 with this.
    """
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
