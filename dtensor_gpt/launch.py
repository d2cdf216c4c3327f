"""Process-group set-up shared by the examples and tools: NCCL on GPUs, gloo on CPU."""

import contextlib
import datetime
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_store = None  # this attempt's store, where every rank's heartbeat counts up while it runs
HEARTBEAT = 0.2  # seconds between a rank's beats
_witness = None  # on rank 0 under torchrun, the server that proves its round is the live one
_doing = "the set-up"  # what this rank is doing, for the line a failure ends it with
PEER_LOST = ("timed out", "connection reset by peer", "connection closed by peer")


def init_distributed(mesh_shape=None, mesh_dim_names=None, timeout=None):
    """
    Join the job torchrun started (or a one-process job when run directly) and build a mesh.

    CUDA/NCCL is used when every local rank can have a GPU of its own, CPU/gloo otherwise.
    `timeout` (seconds) bounds every collective, so a stalled or dead peer ends the job
    (see `stalls_reported`) instead of torch's default 30 minutes. Returns (mesh, device).

    Under torchrun the process group's keys go under a name of this round's (`this_round`).
    """
    global _store
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
        limit = datetime.timedelta(seconds=timeout) if timeout else None
        store, rank, world_size = next(dist.rendezvous("env://", **({"timeout": limit} if limit else {})))
        _store = this_round(store, rank, timeout or 1800)
        if world_size > 1:
            threading.Thread(target=beat, args=(_store, rank), daemon=True).start()
        dist.init_process_group(backend, timeout=limit, store=_store, rank=rank, world_size=world_size)
    shape = mesh_shape or (dist.get_world_size(),)
    return init_device_mesh(device.type, shape, mesh_dim_names=mesh_dim_names), device


def this_round(store, rank, timeout):
    """
    `store` under a name this torchrun round's workers alone share. torchrun's workers share
    the agents' store, whose keys outlive a restart: under the old keys a new worker would
    read the dead ones' addresses and never connect (pytorch/pytorch#135712, #167288). Nor
    does TORCHELASTIC_RESTART_COUNT name a round: a node whose link was cut rejoins the next
    round without counting a failure, so its count falls behind the other nodes'. Rank 0
    draws the name, holds it in a store server of its own and publishes that server's address
    (over the last round's): the address its node reaches the agents' store from, since rank 0
    need not run where that store does; the others read the name from that server, again
    while the address is the last round's (its rank 0 is gone, so nothing answers there).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # a store of this job's own: nothing old in it
        return store
    global _witness
    if rank == 0:
        with socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))) as probe:
            host = probe.getsockname()[0]
        _witness = witness = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False)
        _witness.set("round", uuid.uuid4().hex)
        store.set("dtensor_gpt/round", f"{host} {_witness.port}")
    deadline = time.monotonic() + timeout
    while rank != 0:
        try:
            host, port = store.get("dtensor_gpt/round").decode().split()
            port = int(port)
            socket.create_connection((host, port), timeout=1).close()  # the last round's address refuses, quietly
            witness = dist.TCPStore(host, port, timeout=datetime.timedelta(seconds=1))
            break
        except (OSError, RuntimeError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    return dist.PrefixStore(f"dtensor_gpt/round-{witness.get('round').decode()}", store)


def doing(what):
    """Say what this rank does from now on ("iteration 7's training step"), for `stalls_reported`'s line."""
    global _doing
    _doing = what


def beat(store, rank):
    """
    Count up this rank's heartbeat in the store, from its own thread: a rank blocked in a
    collective still beats (the wait releases the GIL), a stopped or dead one does not. This
    is what tells the ranks that wait on a stalled peer from the stalled one, whenever each
    comes to report: a survivor that saw a connection reset must not wait for the others'
    --timeout to learn that they live.
    """
    try:
        while True:
            store.add(f"alive/{rank}", 1)
            time.sleep(HEARTBEAT)
    except RuntimeError:  # the store is gone: the job is ending, or the link is cut (silent_ranks says so)
        return


def silent_ranks(seconds):
    """
    The ranks whose heartbeat does not move in `seconds` and that have not come to look either
    (a survivor that looked first may have exited since). None when the store itself does not
    answer by then (it refuses, or a cut link leaves its calls hanging till the link is back).
    """
    ranks, found = range(dist.get_world_size()), [None]

    def look():
        try:
            _store.set(f"looked/{dist.get_rank()}", "1")
            before = [_store.add(f"alive/{r}", 0) for r in ranks]
            time.sleep(seconds)
            found[0] = [r for r in ranks if _store.add(f"alive/{r}", 0) == before[r]
                        and not _store.check([f"looked/{r}"])]
        except RuntimeError:
            pass

    looking = threading.Thread(target=look, daemon=True)
    looking.start()
    looking.join(seconds + 2)
    return found[0]


@contextlib.contextmanager
def stalls_reported(timeout):
    """
    End the job when a collective times out or a peer's connection breaks: every rank still
    running prints one line naming the ranks that stopped answering (those whose heartbeat
    stands still for 2 s) and what it was waiting in, then exits with 3.
    """
    try:
        yield
    except RuntimeError as e:
        if _store is None or not any(s in str(e).lower() for s in PEER_LOST):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # torchrun ends the others once a rank dies: say why first
        silent = silent_ranks(2)
        who = (("the store does not answer either (rank 0 holds it; under torchrun, the first node's agent): this "
                "rank is cut off from the others, or they are all gone") if silent is None else
               f"rank(s) {', '.join(map(str, silent))} do not answer (stalled or dead)" if silent else
               "every rank answers afterwards, so one was only slow")
        timed_out = "timed out" in str(e).lower()
        what = f"did not complete within --timeout {timeout:g} s" if timed_out else "lost a peer's connection"
        detail = re.search(r"(?i)timed out[^\n]*|connection (reset|closed) by peer", str(e))
        print(f"error: rank {dist.get_rank()}: a collective in {_doing} {what}: {who}"
              f"{'; raise --timeout if the job is merely slow' if timed_out else ''}"
              f" (gloo: {detail.group(0) if detail else str(e).splitlines()[0]})", file=sys.stderr)
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
