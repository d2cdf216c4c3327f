"""
How each GPT tensor is split over TP ranks, and which global rows a rank holds.

A split is None (replicated: one copy, in rank 0's file) or {"dim": d, "groups": g}: the
tensor's dimension d packs g equal parts (3 for c_attn's q|k|v, else 1) and each part is cut
into TP pieces as DTensor's `Shard` cuts it (`torch.chunk`: pieces of ceil(size / TP), the
last ones shorter, so a vocabulary of 65 at TP=4 is 17, 17, 17, 14 rows); rank r holds piece
r of every part, concatenated. Checkpoints record the split of every tensor, so any TP
degree can read any other's files.
"""

import re

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

# The megatron family's layout (megatron, megatron-sp and spd place parameters alike;
# tests/test_checkpoint.py checks this table against each plan's placements). An int8 weight's
# scale (`dtensor_gpt.int8`) is split with its output channels: whole beside a row-parallel one.
_RULES = [
    (r"transformer\.wte\.weight(_scale)?", {"dim": 0, "groups": 1}),
    (r"lm_head\.weight(_scale)?", {"dim": 0, "groups": 1}),
    (r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias|weight_scale)", {"dim": 0, "groups": 3}),
    (r"transformer\.h\.\d+\.attn\.c_proj\.weight", {"dim": 1, "groups": 1}),
    (r"transformer\.h\.\d+\.mlp\.c_fc\.(weight|bias|weight_scale)", {"dim": 0, "groups": 1}),
    (r"transformer\.h\.\d+\.mlp\.c_proj\.weight", {"dim": 1, "groups": 1}),
]


def canonical_split(name):
    """The split the megatron plans give parameter `name`, or its optimizer state (None: replicated)."""
    name = re.sub(r"^optimizer\.\w+?\.(?=transformer\.|lm_head\.)", "", name)
    for pattern, split in _RULES:
        if re.fullmatch(pattern, name):
            return dict(split)
    return None


def packed_parts(name, dim):
    """How many equal parts dimension `dim` of tensor `name` packs: 3 for c_attn's q|k|v rows, else 1."""
    split = canonical_split(name)
    return split["groups"] if split is not None and split["dim"] == dim else 1


def mesh_dims(param):
    """{"tp": (mesh dim, placement), "dp": ...} of a DTensor; an unnamed 1-D mesh is the TP mesh."""
    mesh = param.device_mesh
    names = mesh.mesh_dim_names or (("tp",) if mesh.ndim == 1 else ())
    if len(names) != mesh.ndim or not set(names) <= {"dp", "tp"}:
        raise ValueError(f"checkpoints know meshes with dimensions 'dp' and 'tp', not {mesh.mesh_dim_names}")
    return {name: (i, param.placements[i]) for i, name in enumerate(names)}


def split_of(param):
    """The TP split a parameter actually has (from its placement on the "tp" mesh dim), or None."""
    if not isinstance(param, DTensor):
        return None
    _, tp = mesh_dims(param).get("tp", (None, Replicate()))
    if isinstance(tp, Replicate):
        return None
    if isinstance(tp, _StridedShard):
        return {"dim": tp.dim, "groups": tp.split_factor}
    if isinstance(tp, Shard):
        return {"dim": tp.dim, "groups": 1}
    raise ValueError(f"cannot save a parameter placed {param.placements}")


def tp_rank(param):
    """(rank, degree) of this process on the parameter's TP mesh dim; (0, 1) without one."""
    dims = mesh_dims(param)
    if "tp" not in dims:
        return 0, 1
    mesh, i = param.device_mesh, dims["tp"][0]
    return mesh.get_local_rank(i), mesh.size(i)


def dp_shard(param):
    """(rank, degree) of the data-parallel (FSDP) dim-0 sharding, or None."""
    dims = mesh_dims(param) if isinstance(param, DTensor) else {}
    if "dp" not in dims or isinstance(dims["dp"][1], Replicate):
        return None
    mesh, i = param.device_mesh, dims["dp"][0]
    return mesh.get_local_rank(i), mesh.size(i)


def tp_local(param):
    """
    This rank's TP shard of a parameter, gathered over its data-parallel (FSDP2) shards:
    FSDP2 keeps chunk d of dim 0 of the TP shard on data-parallel rank d. (DTensor's own
    redistribute of such nested strided placements returns the whole tensor in torch 2.13.)
    """
    if not isinstance(param, DTensor):
        return param.detach()
    local = param.to_local()
    dp = dp_shard(param)
    if dp is None:
        return local
    split, (rank, tp) = split_of(param), tp_rank(param)
    rows = local_shape(param.shape, split, tp, rank)[0] if split is not None and split["dim"] == 0 else param.shape[0]
    sizes = [len(c) for c in torch.arange(rows).chunk(dp[1])]
    padded = local.new_zeros((max(sizes),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    pieces = [torch.empty_like(padded) for _ in sizes]
    mesh, i = param.device_mesh, mesh_dims(param)["dp"][0]
    dist.all_gather(pieces, padded, group=mesh.get_group(i))
    return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])


def piece(size, parts, rank):
    """The [start, stop) that `rank` holds of `size` positions cut into `parts` as `Shard` cuts them."""
    step = -(-size // parts)
    start = min(rank * step, size)
    return start, min(start + step, size)


def intervals(size, split, parts, rank):
    """The global [start, stop) ranges along the split dim that `rank` of `parts` holds."""
    part = size // split["groups"]
    start, stop = piece(part, parts, rank)
    return [(g * part + start, g * part + stop) for g in range(split["groups"])]


def local_shape(shape, split, parts, rank):
    """The shape of `rank`'s piece of a tensor of global `shape`."""
    shape = list(shape)
    if split is not None:
        shape[split["dim"]] = sum(b - a for a, b in intervals(shape[split["dim"]], split, parts, rank))
    return shape


def locate(size, split, parts, start, stop):
    """
    Where the global range [start, stop) of a tensor split over `parts` ranks lives:
    (rank, local start, local stop) pieces, in order.
    """
    part = size // split["groups"]
    step = -(-part // parts)
    out = []
    while start < stop:
        group, offset = divmod(start, part)
        rank = offset // step
        first, last = piece(part, parts, rank)
        length = min(stop - start, last - offset)
        local = group * (last - first) + offset - first
        out.append((rank, local, local + length))
        start += length
    return out


def divides(size, split, parts):
    """Whether `parts` ranks can hold a tensor so: a packed (groups > 1) dimension must cut evenly."""
    return split is None or split["groups"] == 1 or size % (split["groups"] * parts) == 0


def shard_values(source, name, target):
    """Tensor `name` of `source` (a checkpoint) as `target`'s TP rank holds it: only its own shard's ranges are read."""
    if target.dim() == 0:
        return source.read_full(name)
    split = split_of(target)
    if split is None:
        dim, ranges = 0, [(0, target.shape[0])]
    else:
        rank, parts = tp_rank(target)
        dim, ranges = split["dim"], intervals(target.shape[split["dim"]], split, parts, rank)
    return torch.cat([source.read(name, dim, a, b) for a, b in ranges], dim)


def dp_chunk(values, target):
    """FSDP2 keeps chunk `rank` of dim 0 of the TP shard."""
    dp = dp_shard(target)
    return values if dp is None else values.chunk(dp[1], dim=0)[dp[0]].clone()
