"""
Sharding rules that DTensor (torch 2.13) lacks for the unchanged GPT, registered by the plugin.

This is the only module that touches private DTensor APIs (`_StridedShard`, the op
dispatcher's custom handlers); `tests/test_sharding_rules.py` pins their behaviour so that a
torch upgrade that changes them fails loudly instead of silently gathering activations.

- Packed q|k|v: `c_attn` is sharded `_StridedShard(0, split_factor=3)`, so each rank holds
  the q, k and v rows of its own heads and `c_attn(x)` comes out `_StridedShard(2, 3)`.
  Splitting that into its 3 equal chunks is exact locally (each chunk is `Shard(2)`), but
  DTensor's split rule all-gathers first. The backward of `split` concatenates the three
  `Shard(2)` gradients, which DTensor's cat rule also all-gathers. Both are replaced by local
  ops here when, and only when, the layout makes them exact.
- CPU SDPA: `_scaled_dot_product_flash_attention_for_cpu` and its backward have no rule;
  attention is independent per head, so everything sharded on the head dim is exact.
"""

import contextlib

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten
_handlers = DTensor._op_dispatcher._custom_op_handlers


def strided_shard(dim, groups):
    """The placement of a tensor whose `dim` packs `groups` equal parts, each sharded evenly."""
    return _StridedShard(dim, split_factor=groups)


@contextlib.contextmanager
def _default_rule(op):
    """Let DTensor's own rule handle `op` for a call our handler does not cover."""
    handler = _handlers.pop(op)
    try:
        yield
    finally:
        _handlers[op] = handler


def _wrap(local, mesh, placements, global_shape):
    """A DTensor for a handler's output; autograd (above the dispatcher) attaches grads."""
    stride = torch.empty(global_shape, device="meta").stride()
    spec = DTensorSpec(mesh, tuple(placements), TensorMeta(torch.Size(global_shape), stride, local.dtype))
    return DTensor(local, spec, requires_grad=False)


def _packed_split(op_call, args, kwargs):
    """split(x, size, dim) of a `_StridedShard(dim, sf)` tensor into exactly sf equal parts."""
    x, split_size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.ndim
    groups = x.shape[dim] // split_size if split_size else 0
    packed = [p for p in x.placements if isinstance(p, _StridedShard) and p.dim == dim]
    if (
        len(packed) != 1
        or groups != packed[0].split_factor
        or x.shape[dim] % split_size
        or any(isinstance(p, Shard) and p.dim == dim for p in x.placements)
    ):
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    placements = [Shard(dim) if p is packed[0] else p for p in x.placements]
    local = x.to_local()
    shape = list(x.shape)
    shape[dim] = split_size
    parts = [_wrap(part, x.device_mesh, placements, shape) for part in local.split(local.shape[dim] // groups, dim)]
    return return_and_correct_aliasing(op_call, args, kwargs, parts)


def _packed_cat(op_call, args, kwargs):
    """cat of equal `Shard(dim)` tensors along dim: the inverse of `_packed_split`."""
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = tensors[0]
    if not all(isinstance(t, DTensor) for t in tensors):
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    dim %= first.ndim
    sharded = [i for i, p in enumerate(first.placements) if isinstance(p, Shard) and p.dim == dim]
    if (
        len(tensors) < 2
        or len(sharded) != 1
        or first.shape[dim] % first.device_mesh.size(sharded[0])
        or any(
            t.device_mesh != first.device_mesh
            or t.placements != first.placements
            or t.shape != first.shape
            for t in tensors
        )
    ):
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    placements = list(first.placements)
    placements[sharded[0]] = strided_shard(dim, len(tensors))
    shape = list(first.shape)
    shape[dim] *= len(tensors)
    local = torch.cat([t.to_local() for t in tensors], dim)
    return _wrap(local, first.device_mesh, placements, shape)


def _sdpa_on_heads(query, key, value, *args, **kwargs):
    """Forward: q, k, v and the output are all sharded on heads (dim 1), or all replicated."""
    return [
        ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate()] + [None] * 4),
        ([Shard(1), Shard(1)], [Shard(1), Shard(1), Shard(1)] + [None] * 4),
    ]


def _sdpa_backward_on_heads(grad_out, query, key, value, out, logsumexp, *args, **kwargs):
    """Backward: the six tensor inputs and three gradients, all on heads or all replicated."""
    return [
        ([Replicate()] * 3, [Replicate()] * 6 + [None] * 4),
        ([Shard(1)] * 3, [Shard(1)] * 6 + [None] * 4),
    ]


_registered = False


def register():
    """Install the rules once per process; parallelize() calls this."""
    global _registered
    if _registered:
        return
    _handlers[aten.split.Tensor] = _packed_split
    _handlers[aten.cat.default] = _packed_cat
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)(_sdpa_on_heads)
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(
        _sdpa_backward_on_heads
    )
    _registered = True
