"""
Megatron sequence parallelism (Korthikanti et al. 2022) for nanoGPT module names.

Between the tensor-parallel regions (LayerNorms, dropouts, the residual stream) activations
are sharded on the sequence dimension, `Shard(1)`. Each region is entered with an
all-gather and left with a reduce-scatter instead of an all-reduce: the same bytes on the
wire as Megatron's 2 all-reduces per block, and 1/TP of the activation memory outside them.
Sequence lengths that TP does not divide are sharded unevenly by DTensor (no padding enters
the math, so results are unchanged).
"""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from dtensor_gpt.styles import PackedColwiseParallel, PrepareAttentionInput


def gather_sequence(style=PrepareModuleInput):
    """Enter a tensor-parallel region: all-gather the sequence shards (with `style`, a PrepareModuleInput)."""
    return style(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=False)


def plan(model, mesh, *, loss_parallel=False):
    """
    `loss_parallel=True` keeps logits vocab-sharded DTensors for `loss_parallel()`. It takes no
    `compress`: its row-parallel outputs are reduce-scattered, which dtensor_gpt.compress does not cover.
    """
    return {
        # 1. vocab-parallel embedding, reduce-scattered straight onto sequence shards
        "transformer.wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        # position embeddings (T, C) stay replicated; adding them to Shard(1) tokens is local
        "transformer.wpe": PrepareModuleOutput(
            output_layouts=(Replicate(),), desired_output_layouts=(Replicate(),), use_local_output=False
        ),
        "transformer.drop": SequenceParallel(use_local_output=False),
        # 2. per block: LayerNorms on sequence shards; attention and MLP gathered in, scattered out
        "transformer.h.*.ln_1": SequenceParallel(use_local_output=False),
        "transformer.h.*.attn": gather_sequence(PrepareAttentionInput),
        "transformer.h.*.attn.c_attn": PackedColwiseParallel(),
        "transformer.h.*.attn.c_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "transformer.h.*.ln_2": SequenceParallel(use_local_output=False),
        "transformer.h.*.mlp": gather_sequence(),
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        # 3. final LayerNorm on shards, then the column-parallel head (tied to wte)
        "transformer.ln_f": SequenceParallel(use_local_output=False),
        "lm_head": ColwiseParallel(
            input_layouts=Shard(1),
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
