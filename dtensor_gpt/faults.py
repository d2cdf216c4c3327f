"""
Fault injection, so that the tests can kill or stall a rank of a real torchrun job where a
failure hurts most. Unset, nothing happens. DTENSOR_GPT_FAULT holds one fault per torchrun
attempt, separated by ";": the first fires in the first attempt, the second in the first
restart (TORCHELASTIC_RESTART_COUNT=1), and so on; attempts past the list run clean.

    rank=1,iter=7,kill        SIGKILL rank 1 as iteration 7's training step begins
    rank=0,iter=8,save,kill   SIGKILL rank 0 while it saves at iteration 8: its rank file
                              written, the checkpoint's index not
    rank=1,iter=7,stop        SIGSTOP rank 1 instead: a rank that stalls without dying
"""

import os
import signal

import torch.distributed as dist

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def planned():
    """This attempt's fault as (rank, iteration, where: "step" or "save", signal), or None; a bad spec raises ValueError."""
    faults = [_parsed(f) for f in os.environ.get("DTENSOR_GPT_FAULT", "").split(";") if f.strip()]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return faults[attempt] if attempt < len(faults) else None


def _parsed(fault):
    fields = dict(f.partition("=")[::2] for f in fault.replace(" ", "").split(","))
    actions = [a for a in SIGNALS if a in fields]
    if set(fields) - {"rank", "iter", "save", *SIGNALS} or len(actions) != 1 or \
            not fields.get("rank", "").isdigit() or not fields.get("iter", "").isdigit():
        raise ValueError(f"DTENSOR_GPT_FAULT: {fault.strip()!r} is not 'rank=R,iter=I[,save],kill|stop'; "
                         f"e.g. rank=1,iter=7,kill")
    return int(fields["rank"]), int(fields["iter"]), "save" if "save" in fields else "step", SIGNALS[actions[0]]


def fault_point(where, iteration):
    """Fire this attempt's fault if it is planned here: this rank, this iteration, this point."""
    fault = planned()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if fault and fault[:3] == (rank, iteration, where):
        os.kill(os.getpid(), fault[3])
