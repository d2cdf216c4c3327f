"""
Megatron-LM tensor parallelism (Shoeybi et al. 2019) for nanoGPT module names.

Each block enters its two parallel regions (attention, MLP) with the identity ("f") and
leaves them with one all-reduce ("g"): 2 all-reduces per block in forward, the minimum
for this scheme. The embedding is vocab-parallel (1 all-reduce) and shares its weight with
the column-parallel `lm_head`, whose vocab-sharded logits are either gathered (1 all-gather,
for generation) or left sharded for `loss_parallel()` (training).
"""

from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from dtensor_gpt.compress import check_compress, row_parallel
from dtensor_gpt.styles import PackedColwiseParallel, PrepareAttentionInput


def block(compress=None):
    """Styles for one block, keyed by path inside the block; `compress` sends the two sums as bf16 or int8."""
    return {
        # x enters attention as a replicated DTensor so the model's shape arithmetic
        # (B, T, C = x.size()) sees global sizes (and, with dropout, the CPU math attention's
        # causal mask counts as replicated); c_attn gives q|k|v of each rank's own heads
        "attn": PrepareAttentionInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),), use_local_output=False
        ),
        "attn.c_attn": PackedColwiseParallel(),
        "attn.c_proj": row_parallel(compress),
        "mlp.c_fc": ColwiseParallel(),
        "mlp.c_proj": row_parallel(compress),
    }


def embedding_and_head(loss_parallel):
    return {
        # vocab-parallel embedding: each rank looks up its vocab rows, one all-reduce
        "transformer.wte": RowwiseParallel(input_layouts=Replicate()),
        # output projection, tied to wte (both shard the vocab dimension)
        "lm_head": ColwiseParallel(
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }


def plan(model, mesh, *, loss_parallel=False, compress=None):
    """
    `loss_parallel=True` keeps logits vocab-sharded DTensors for `loss_parallel()`;
    `compress="bf16"` or `"int8"` sends the blocks' row-parallel sums compressed
    (`dtensor_gpt.compress`); the embedding's all-reduce stays exact.
    """
    check_compress(compress)
    styles = embedding_and_head(loss_parallel)
    styles.update({f"transformer.h.*.{path}": style for path, style in block(compress).items()})
    return styles
