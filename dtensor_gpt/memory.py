"""
Training memory per rank: the bytes each module saves for backward (measured), and an
estimate of a step's peak from the config alone, to refuse before the first step what
cannot fit.
"""

import os
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


def activation_bytes(config, rows, tp=1):
    """
    What `saved_activation_bytes` counts for a forward and loss of `rows` rows of block_size
    tokens in fp32 under megatron at TP degree `tp`, by hand: per token and block, LayerNorms
    (input, mean, rstd) and the inputs of c_attn and c_fc, replicated; q, k, v, the attention
    output and its log-sum-exp per head, the inputs of attn.c_proj, GELU and mlp.c_proj,
    sharded. Then ln_f, lm_head's input, the token ids and targets (int64), the log-softmax
    (counted twice, by log_softmax and nll_loss, as the hooks see it), the positions, the loss.
    """
    C, H, V, L, T = config.n_embd, config.n_head, config.vocab_size, config.n_layer, config.block_size
    replicated = L * (4 * C + 4) + (C + 2) + C + 2 + 2
    sharded = L * (4 * C + H + C + 4 * C + 4 * C) + 2 * V
    return 4 * rows * T * (replicated + sharded // tp) + 8 * T + 4


def parameter_count(config, tp=1, dp=1):
    """One rank's parameters under megatron (block matrices, their column-parallel biases and wte sharded over tp), FSDP over dp."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    bias = 1 if config.bias else 0
    sharded = L * (12 * C * C + bias * 7 * C) + V * C
    replicated = config.block_size * C + L * (2 + 4 * bias) * C + (1 + bias) * C  # wpe, LayerNorms, c_proj biases
    return (sharded // tp + replicated) // dp


def training_step_bytes(config, rows, tp=1, dp=1):
    """
    An estimate of one rank's peak during a fp32 AdamW step of `rows` rows (all data-parallel
    ranks together): parameters, gradients and AdamW's two moments; the saved activations of
    its rows/dp; and the logits the caller holds and their gradient, each a vocabulary shard.
    """
    logits = 2 * 4 * (rows // dp) * config.block_size * (config.vocab_size // tp)
    return 4 * 4 * parameter_count(config, tp, dp) + activation_bytes(config, rows // dp, tp) + logits


def available_bytes(device):
    """Memory a new allocation can take without swapping: the GPU's free bytes, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if not os.path.exists("/proc/meminfo"):
        return None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
