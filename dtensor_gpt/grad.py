"""Gradient clipping and fp16 loss scaling for a model whose parameters mix plain tensors and DTensors."""

import math

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


class LossScaler:
    """
    fp16's dynamic loss scaling, torch.amp.GradScaler's rule (start at 2**16, halve and skip
    the step on an overflow, double after 2000 steps without one) for gradients that mix
    DTensors and plain tensors, which torch.amp.GradScaler refuses (torch 2.13: its
    `_amp_foreach_non_finite_check_and_unscale_` "got mixed torch.Tensor and DTensor", measured
    under `megatron`). The overflow check is the gradients' global norm (`clip_grad_norm_`'s),
    the same number on every rank, so every rank skips the same steps, whichever shard
    overflowed. Disabled (bf16, fp32), it scales by 1 and never skips.
    """

    def __init__(self, enabled, scale=2.0**16, clean_steps=0, growth_interval=2000):
        self.enabled, self.scale, self.clean_steps, self.growth_interval = enabled, scale, clean_steps, growth_interval

    def scaled(self, loss):
        return loss * self.scale if self.enabled else loss

    @torch.no_grad()
    def unscale_and_clip_(self, parameters, max_norm):
        """Divide the gradients by the scale and clip them (max_norm 0: no clipping); False: skip this step."""
        parameters = list(parameters)
        if not self.enabled:
            if max_norm:
                clip_grad_norm_(parameters, max_norm)
            return True
        for p in parameters:
            if p.grad is not None:
                p.grad.div_(self.scale)
        finite = math.isfinite(clip_grad_norm_(parameters, max_norm or math.inf))
        if finite:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.scale, self.clean_steps = self.scale * 2, 0
        else:
            self.scale, self.clean_steps = self.scale / 2, 0
        return finite

    def state(self):
        return {"loss_scale": self.scale, "clean_steps": self.clean_steps}
