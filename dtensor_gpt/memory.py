"""Activation memory: the bytes each module saves for backward, per rank."""

from collections import Counter

import torch
from torch.distributed.tensor import DTensor


def saved_activation_bytes(model, *inputs, loss_fn=lambda out: out[1]):
    """
    {module path: bytes this rank saves for backward while that module runs} for one
    forward of `model(*inputs)`, through `torch.autograd.graph.saved_tensors_hooks`.

    A DTensor counts its local shard; parameters saved by an op are not activations and
    are left out; what the model's own forward saves outside any submodule counts under "".
    Deterministic: it depends on shapes only.
    """
    params = {p.data_ptr() for p in model.parameters()} | {
        p.to_local().data_ptr() for p in model.parameters() if isinstance(p, DTensor)
    }
    names = {module: name for name, module in model.named_modules()}
    stack, saved = [""], Counter()

    def enter(module, args):
        stack.append(names[module])

    def leave(module, args, output):
        stack.pop()

    def pack(t):
        local = t.to_local() if isinstance(t, DTensor) else t
        if local.data_ptr() not in params:
            saved[stack[-1]] += local.numel() * local.element_size()
        return t

    handles = [m.register_forward_pre_hook(enter) for m in names if m is not model]
    handles += [m.register_forward_hook(leave) for m in names if m is not model]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model(*inputs))
    finally:
        for h in handles:
            h.remove()
    return dict(saved)
