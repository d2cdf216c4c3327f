"""Gradient clipping for a model whose parameters mix plain tensors and DTensors."""

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm):
    """
    Scale gradients so that their global 2-norm is at most `max_norm`; return that norm.

    `torch.nn.utils.clip_grad_norm_` multiplies every gradient by one coefficient tensor,
    which fails when a TP plan leaves some parameters plain (LayerNorms under `megatron`)
    and shards others. Here each DTensor gradient's norm is computed over all its shards
    (sharded and partial gradients are reduced by DTensor), so every rank gets the same
    total and scales by the same Python float.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = []
    for g in grads:
        n = g.norm()
        squares.append((n.full_tensor() if isinstance(n, DTensor) else n) ** 2)
    total = torch.stack(squares).sum().sqrt().item() if squares else 0.0
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
