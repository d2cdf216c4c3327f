"""
Megatron-LM tensor parallelism (Shoeybi et al. 2019) for nanoGPT module names.

Each block enters its two parallel regions (attention, MLP) with the identity ("f") and
leaves them with one all-reduce ("g"): 2 all-reduces per block in forward, the minimum
for this scheme. The embedding is vocab-parallel (1 all-reduce) and shares its weight with
the column-parallel `lm_head`, whose vocab-sharded logits are either gathered (1 all-gather,
for generation) or left sharded for `loss_parallel()` (training).
"""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
)

from dtensor_gpt.styles import PackedColwiseParallel


def plan(*, loss_parallel=False):
    """`loss_parallel=True` keeps logits vocab-sharded DTensors for `loss_parallel()`."""
    return {
        # 1. vocab-parallel embedding: each rank looks up its vocab rows, one all-reduce
        "transformer.wte": RowwiseParallel(input_layouts=Replicate()),
        # 2. attention: x enters as a replicated DTensor so the model's shape arithmetic
        #    (B, T, C = x.size()) sees global sizes; q|k|v of each rank's own heads
        "transformer.h.*.attn": PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        "transformer.h.*.attn.c_attn": PackedColwiseParallel(),
        "transformer.h.*.attn.c_proj": RowwiseParallel(),
        # 3. MLP
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": RowwiseParallel(),
        # 4. output projection, tied to wte (both shard the vocab dimension)
        "lm_head": ColwiseParallel(
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
