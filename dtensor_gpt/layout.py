"""
How each GPT tensor is split over TP ranks, and which global rows a rank holds.

A split is None (replicated: one copy, in rank 0's file) or {"dim": d, "groups": g}: the
tensor's dimension d packs g equal parts (3 for c_attn's q|k|v, else 1) and each part is cut
into TP equal pieces; rank r holds piece r of every part, concatenated. Checkpoints record
the split of every tensor, so any TP degree can read any other's files.
"""

import re

from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

# The megatron family's layout (megatron, megatron-sp and spd place parameters alike;
# tests/test_checkpoint.py checks this table against each plan's placements).
_RULES = [
    (r"transformer\.wte\.weight", {"dim": 0, "groups": 1}),
    (r"lm_head\.weight", {"dim": 0, "groups": 1}),
    (r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias)", {"dim": 0, "groups": 3}),
    (r"transformer\.h\.\d+\.attn\.c_proj\.weight", {"dim": 1, "groups": 1}),
    (r"transformer\.h\.\d+\.mlp\.c_fc\.(weight|bias)", {"dim": 0, "groups": 1}),
    (r"transformer\.h\.\d+\.mlp\.c_proj\.weight", {"dim": 1, "groups": 1}),
]


def canonical_split(name):
    """The split the megatron plans give parameter `name`, or its optimizer state (None: replicated)."""
    name = re.sub(r"^optimizer\.\w+?\.(?=transformer\.|lm_head\.)", "", name)
    for pattern, split in _RULES:
        if re.fullmatch(pattern, name):
            return dict(split)
    return None


def split_of(param):
    """The split a parameter actually has: from its DTensor placement, or None if plain."""
    if not isinstance(param, DTensor):
        return None
    tp = [p for p in param.placements if not isinstance(p, Replicate)]
    if not tp:
        return None
    if len(tp) > 1 or param.device_mesh.ndim != 1:
        raise ValueError(
            f"a parameter placed {param.placements} on a {param.device_mesh.ndim}-D mesh is not a "
            f"tensor-parallel shard; checkpoints hold TP-sharded or replicated tensors"
        )
    if isinstance(tp[0], _StridedShard):
        return {"dim": tp[0].dim, "groups": tp[0].split_factor}
    if isinstance(tp[0], Shard):
        return {"dim": tp[0].dim, "groups": 1}
    raise ValueError(f"cannot save a parameter placed {param.placements}")


def local_shape(shape, split, parts):
    shape = list(shape)
    if split is not None:
        shape[split["dim"]] //= parts
    return shape


def intervals(size, split, parts, rank):
    """The global [start, stop) ranges along the split dim that `rank` of `parts` holds."""
    part = size // split["groups"]
    piece = part // parts
    return [(g * part + rank * piece, g * part + (rank + 1) * piece) for g in range(split["groups"])]


def locate(size, split, parts, start, stop):
    """
    Where the global range [start, stop) of a tensor split over `parts` ranks lives:
    (rank, local start, local stop) pieces, in order.
    """
    part = size // split["groups"]
    piece = part // parts
    out = []
    while start < stop:
        group, offset = divmod(start, part)
        rank, within = divmod(offset, piece)
        length = min(stop - start, piece - within)
        local = group * piece + within
        out.append((rank, local, local + length))
        start += length
    return out


def divides(size, split, parts):
    return split is None or size % (split["groups"] * parts) == 0
