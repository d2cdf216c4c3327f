"""
Megatron-LM tensor parallelism with each block's all-reduces hidden behind its computation.

The parameters, the collectives' kinds and the bytes on the wire are `megatron`'s; each block
runs in `chunks` chunks (rows of the batch, or positions of one row's sequence), so it issues
`chunks` times as many all-reduces, each 1/chunks the size, and computes the next chunk while
one flies (`dtensor_gpt.overlap`). One row of one token runs exactly as `megatron`.
"""

from dtensor_gpt.overlap import OverlappedBlock
from plans import megatron

CHUNKS = 2  # the smallest split that overlaps: each all-reduce but a block's last flies during compute


def plan(model, mesh, *, chunks=CHUNKS, loss_parallel=False):
    """`chunks`: how many pieces each block's work is split into (at most the rows, or one row's positions)."""
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks={chunks!r} must be a whole number >= 1 (1 runs every block whole, as megatron)")
    if model.config.dropout:
        raise ValueError(
            f"plan 'megatron-overlap' needs dropout=0 (config.dropout={model.config.dropout}): chunks would draw "
            f"other masks than the model's; train with dropout under 'megatron'"
        )
    styles = megatron.embedding_and_head(loss_parallel)
    styles["transformer.h.*"] = OverlappedBlock(megatron.block(), chunks=chunks)
    return styles
