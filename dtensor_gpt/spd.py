"""
Sync-Point Drop (Kim et al., ICML 2025, arXiv 2502.20727) as a ParallelStyle for a GPT block.

A Megatron block synchronizes twice: after attention and after the MLP. In a block with its
sync point dropped, rank r keeps its partial attention output p_r (its heads through its
slice of the row-parallel `attn.c_proj`, bias left out), feeds its own MLP shard with
ln_2(x + p_r + b_a), and the block's one all-reduce sums both partials:

    out = x + b_a + b_m + sum_r (p_r + m_r),   m_r = c_proj_r(gelu(c_fc_r(ln_2(x + p_r + b_a))))

The block's own forward runs unchanged; hooks route the values. The MLP input differs
from rank to rank, so DTensor (which only knows replicated, sharded and partial values)
cannot carry its gradient; the hooks make the backward the exact gradient of the formula:
every rank-local contribution to a shared tensor (x, b_a, ln_2's parameters) is summed over
ranks, and the replicated paths are counted once.
"""

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from dtensor_gpt.compress import check_compress, compressed_sum
from dtensor_gpt.styles import PackedColwiseParallel


def sum_grad_over_ranks(t, mesh):
    """Identity forward; backward sums the gradient over `mesh` (Megatron's "f" operator)."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def sum_over_ranks(t, mesh):
    """All-reduce forward; identity backward (Megatron's "g" operator)."""
    return t.redistribute(mesh, [Replicate()]).to_local()


class RankLocalColwiseParallel(ColwiseParallel):
    """
    ColwiseParallel for an input that differs per rank (the MLP input of a dropped block).

    The input is treated as replicated, so the forward is the usual local matmul, but its
    gradient is left as this rank's own contribution instead of being all-reduced: no other
    rank used this rank's input.
    """

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        return DTensor.from_local(
            inputs[0], device_mesh, [Replicate()], run_check=False, grad_placements=[Partial()]
        )


class SyncPointDrop(ParallelStyle):
    """
    A nanoGPT `Block` sharded as in Megatron, with the all-reduce after attention dropped.

    Parameters are placed exactly as in the `megatron` plan (checkpoints are interchangeable);
    one forward does 1 all-reduce instead of 2.

    Keyword Args:
        compress (str, optional): send the one sum as "bf16" or "int8" (`dtensor_gpt.compress`).
            Default: None, float32.

    Example::
        >>> parallelize_module(model, tp_mesh, {"transformer.h.11": SyncPointDrop()})
    """

    def __init__(self, *, compress=None):
        super().__init__()
        check_compress(compress)
        self.compress = compress

    def _apply(self, block, device_mesh):
        parallelize_module(block, device_mesh, {
            "attn": PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
            ),
            "attn.c_attn": PackedColwiseParallel(),
            "attn.c_proj": RowwiseParallel(output_layouts=Partial(), use_local_output=False),
            "mlp.c_fc": RankLocalColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(output_layouts=Partial(), use_local_output=False),
        })
        attn_proj, mlp_proj = block.attn.c_proj, block.mlp.c_proj
        state = {}

        def attn_bias():
            return attn_proj.bias.to_local() if attn_proj.bias is not None else 0.0

        def keep_input(module, args):
            state["x"] = args[0]

        def hide_attn_bias(module, args):
            # p_r must not contain the bias: b_a is added once per rank below, by hand
            state["b_a"] = module.bias
            module.bias = None

        def attention_partial(module, args, p):
            module.bias = state.pop("b_a")
            state["p"] = p
            x = state["x"]
            # every rank's MLP input uses x and b_a: sum their gradients from this path over
            # ranks; x + (f(x) - x) has x's value and that gradient
            b_a = attn_bias()
            if module.bias is not None:
                b_a = sum_grad_over_ranks(b_a, device_mesh)
            return p.to_local() + b_a + (sum_grad_over_ranks(x, device_mesh) - x)

        def mlp_partial(module, args, m):
            state["m"] = m
            return m.to_local()

        def one_sync(module, args, output):
            x, p, m = state.pop("x"), state.pop("p"), state.pop("m")
            partials = p + m
            total = (sum_over_ranks(partials, device_mesh) if self.compress is None
                     else compressed_sum(partials, self.compress, device_mesh))
            return x + attn_bias() + total

        block.register_forward_pre_hook(keep_input)
        attn_proj.register_forward_pre_hook(hide_attn_bias)
        attn_proj.register_forward_hook(attention_partial)
        mlp_proj.register_forward_hook(mlp_partial)
        block.register_forward_hook(one_sync)
        block.ln_2.register_forward_pre_hook(_hook_parameters_in_use(lambda grad: sum_over_ranks(
            DTensor.from_local(grad, device_mesh, [Partial()], run_check=False), device_mesh
        )))
        return block


def _hook_parameters_in_use(hook):
    """
    A forward pre-hook that registers `hook` once on each parameter its module runs with.
    FSDP2 (`fully_shard` after `parallelize`, examples/train.py --dp) replaces the module's
    parameters and runs it on gathered ones of its own, kept from step to step: a hook on
    the parameters `parallelize` saw would never fire.
    """
    hooked = []

    def pre_forward(module, args):
        for param in module.parameters(recurse=False):
            if param.requires_grad and not any(param is h for h in hooked):
                hooked.append(param)
                param.register_hook(hook)

    return pre_forward
