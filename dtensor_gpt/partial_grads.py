"""
Gradients of replicated parameters that backward leaves `Partial`: reduced once, together.

Under sequence parallelism a LayerNorm sees only this rank's positions, so the gradients of
its replicated weight and bias come out of backward as `Partial` sums. DTensor reduces a
`Partial` tensor whenever an operation needs its value: the for-loop AdamW reads each
gradient 3 times, so each such parameter cost 3 all-reduces per step (measured:
150 for GPT-2 under `megatron-sp`), and gradient clipping one more. Megatron-LM reduces these
gradients once after backward, all of them in one buffer; so does this. At the end of every
backward that produced one, the `Partial` gradients of the hooked parameters are concatenated
(per mesh, placements and dtype), redistributed to `Replicate` by DTensor in one all-reduce,
and put back. Gradient accumulation stays exact: a later backward's `Partial` gradient is
added to the reduced one on one rank only (see `_accumulate_on_one_rank`).

Under FSDP2 (`fully_shard` after `parallelize`, examples/train.py --dp) none of this runs:
FSDP2 replaces the hooked parameters, and it reduces each `Partial` gradient itself, over
tp, one all-reduce per parameter per backward, before its reduce-scatter over dp
(tests/test_dp_tp.py counts them).
"""

import torch
from torch.autograd import Variable
from torch.distributed.tensor import DTensor, Replicate


_reducing = []  # non-empty while the end of a backward reduces


def reducing():
    """Whether the end of a backward is reducing partial gradients now (for dtensor_gpt.comm: no module issues it)."""
    return bool(_reducing)


def _replicated_parameters(model):
    return [p for p in model.parameters()
            if isinstance(p, DTensor) and p.requires_grad and all(pl.is_replicate() for pl in p.placements)]


def _is_partial(grad):
    return isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements)


def _reduced(placements):
    return tuple(Replicate() if pl.is_partial() else pl for pl in placements)


@torch.no_grad()
def _reduce_together(parameters):
    _reducing.append(True)
    try:
        _reduce_groups(parameters)
    finally:
        _reducing.pop()


def _reduce_groups(parameters):
    groups = {}
    for p in parameters:
        if _is_partial(p.grad):
            groups.setdefault((p.grad.device_mesh, p.grad.placements, p.grad.dtype), []).append(p)
    for (mesh, placements, _), group in groups.items():
        locals_ = [p.grad.to_local() for p in group]
        flat = torch.cat([t.reshape(-1) for t in locals_])
        flat = DTensor.from_local(flat, mesh, placements, run_check=False).redistribute(mesh, _reduced(placements))
        flat = flat.to_local()
        start = 0
        for p, t in zip(group, locals_):
            p.grad = DTensor.from_local(flat[start:start + t.numel()].view_as(t), mesh, _reduced(placements),
                                        run_check=False, shape=p.grad.shape, stride=p.grad.stride())
            start += t.numel()


def _accumulate_on_one_rank(param):
    """
    Before a `Partial` gradient is added to a reduced (`Replicate`) one, make the reduced one
    `Partial` without communication: its value on the first rank of each partial mesh
    dimension, zeros elsewhere (DTensor's own conversion divides by the rank count, which
    rounds); the sum is then `Partial` and the end of this backward reduces it once.
    """
    def hook(grad):
        held = param.grad
        if _is_partial(grad) and isinstance(held, DTensor) and not _is_partial(held):
            mesh, local = held.device_mesh, held.to_local()
            first = all(mesh.get_local_rank(d) == 0 for d, pl in enumerate(grad.placements) if pl.is_partial())
            param.grad = DTensor.from_local(local if first else torch.zeros_like(local), mesh, grad.placements,
                                            run_check=False, shape=held.shape, stride=held.stride())
        return grad

    return hook


def reduce_partial_grads_after_backward(model):
    """
    Hook `model`'s replicated DTensor parameters (in place; returns `model`) so that their
    `Partial` gradients are reduced once, together, at the end of each backward.
    """
    parameters = _replicated_parameters(model)
    queued_in = [None]  # the backward (autograd graph task) whose end will reduce

    def accumulated(param):
        task = torch._C._current_graph_task_id()
        if queued_in[0] != task and _is_partial(param.grad):
            queued_in[0] = task
            Variable._execution_engine.queue_callback(lambda: _reduce_together(parameters))

    for p in parameters:
        p.register_hook(_accumulate_on_one_rank(p))
        p.register_post_accumulate_grad_hook(accumulated)
    return model
