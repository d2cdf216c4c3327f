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
  attention is independent per head, so everything sharded on the head dim is exact. A
  mask shared by all heads (the static KV cache's, or megatron-overlap's causal mask of a
  sequence chunk, forward and backward) is replicated.
- The static KV cache's plain tensors: its write positions (`index_copy_`) and its mask
  (CPU SDPA) are plain tensors computed alike on every rank, so they count as replicated
  (a rule for those two ops, which torch.compile traces, unlike `implicit_replication()`).
- Optimizer lists: a plan leaves some parameters plain (LayerNorms under `megatron`), and
  foreach and fused optimizer ops (`_foreach_*`, `_fused_adamw_`, ...) refuse a list that
  mixes DTensors with non-scalar plain tensors, so foreach and fused AdamW fail on the
  unchanged model. Those ops treat each list position on its own, so the DTensor positions
  go through DTensor's rule and the plain ones run as plain tensors.
- Dropout on CPU: `F.dropout` draws its mask with `bernoulli_`. DTensor's RNG tracker
  refuses CPU, so each rank would fill its shard from the default generator, all ranks in
  the same state: the same mask for different shards. Here a sharded tensor gets one seed
  per shard drawn from the default generator (every rank draws them all, so the stream
  stays identical on every rank, as replicated activations need) and each rank fills its
  shard from its own shard's seed.
- Plain tensors in the CPU math attention: with dropout, CPU SDPA decomposes into ops that
  add a plain causal mask to DTensor scores; `plain_tensors_replicated()` lets a style treat
  such tensors as replicated within one module's forward.
"""

import contextlib
import re

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.experimental import register_sharding
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import return_and_correct_aliasing

aten = torch.ops.aten

OLDEST_TORCH = (2, 13)


def check_torch_version(version=None):
    """
    Refuse a torch whose DTensor cannot compute the packed q|k|v layout, before anything moves.

    Measured with torch 2.11.0: its redistribute planner raises on a `_StridedShard` it cannot
    read as a shard order (2.13 falls back to the greedy planner), and with that patched its
    addmm still expands the strided bias to the wrong width. Versions are compared by
    (major, minor), so 2.13's pre-releases and local builds pass.
    """
    version = version or torch.__version__
    found = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    if found < OLDEST_TORCH:
        raise RuntimeError(
            f"torch {version} is too old for dtensor_gpt.parallelize: the packed q|k|v layout needs "
            f"DTensor from torch>={'.'.join(map(str, OLDEST_TORCH))}; pip install torch==2.13.0"
        )


def strided_shard(dim, groups):
    """The placement of a tensor whose `dim` packs `groups` equal parts, each sharded evenly."""
    return _StridedShard(dim, split_factor=groups)


@contextlib.contextmanager
def _default_rule(op):
    """
    Let DTensor's own rule handle `op` for a call our handler does not cover.

    The handler table is looked up live (context parallelism swaps it for a copy) and the
    handler is put back even if the call fails. Not thread-safe, like the table itself.
    """
    handlers = DTensor._op_dispatcher._custom_op_handlers
    handler = handlers.pop(op, None)
    try:
        yield
    finally:
        if handler is not None:
            handlers[op] = handler


def _on_dim(placements, dim):
    """(mesh dim, placement) of every placement that shards tensor dimension `dim`."""
    return [(i, p) for i, p in enumerate(placements) if isinstance(p, (Shard, _StridedShard)) and p.dim == dim]


def _wrap(local, mesh, placements, global_shape):
    """A DTensor for a handler's output; autograd (above the dispatcher) attaches grads."""
    stride = torch.empty(global_shape, device="meta").stride()
    spec = DTensorSpec(mesh, tuple(placements), TensorMeta(torch.Size(global_shape), stride, local.dtype))
    return DTensor(local, spec, requires_grad=False)


def _packed_split(op_call, args, kwargs):
    """split(x, size, dim) of a `_StridedShard(dim, sf)` tensor into exactly sf equal parts."""
    x, split_size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % x.ndim
    on_dim = _on_dim(x.placements, dim)
    exact = (
        len(on_dim) == 1
        and isinstance(on_dim[0][1], _StridedShard)
        and split_size > 0
        and x.shape[dim] == split_size * on_dim[0][1].split_factor
        and split_size % x.device_mesh.size(on_dim[0][0]) == 0
    )
    if not exact and split_size > 0:
        sizes = [min(split_size, x.shape[dim] - i) for i in range(0, x.shape[dim], split_size)]
        return aten.split_with_sizes.default(x, sizes, dim)
    if not exact:
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    mesh_dim, packed = on_dim[0]
    placements = list(x.placements)
    placements[mesh_dim] = Shard(dim)
    local = x.to_local()
    shape = list(x.shape)
    shape[dim] = split_size
    parts = local.split(local.shape[dim] // packed.split_factor, dim)
    return return_and_correct_aliasing(op_call, args, kwargs, [_wrap(t, x.device_mesh, placements, shape) for t in parts])


def _packed_cat(op_call, args, kwargs):
    """cat of equal `Shard(dim)` tensors along dim: the inverse of `_packed_split`."""
    tensors = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    first = tensors[0]
    on_dim = _on_dim(first.placements, dim % first.ndim) if isinstance(first, DTensor) else []
    exact = (
        len(tensors) > 1
        and all(isinstance(t, DTensor) for t in tensors)
        and len(on_dim) == 1
        and type(on_dim[0][1]) is Shard
        and first.shape[dim] % first.device_mesh.size(on_dim[0][0]) == 0
        and all(t.device_mesh == first.device_mesh and t.placements == first.placements
                and t.shape == first.shape for t in tensors)
    )
    if not exact:
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    dim %= first.ndim
    placements = list(first.placements)
    placements[on_dim[0][0]] = strided_shard(dim, len(tensors))
    shape = list(first.shape)
    shape[dim] *= len(tensors)
    local = torch.cat([t.to_local() for t in tensors], dim)
    return _wrap(local, first.device_mesh, placements, shape)


def _plain_as_replicated(op_call, args, kwargs):
    """
    An op of DTensors and plain index or mask tensors (a static KV cache's write positions and
    visible-keys mask, computed alike on every rank from the cache's length): the plain tensors
    count as replicated. Unlike `implicit_replication()`, this is a rule torch.compile traces.
    """
    mesh = next(a.device_mesh for a in (*args, *kwargs.values()) if isinstance(a, DTensor))

    def replicated(a):
        if isinstance(a, torch.Tensor) and not isinstance(a, DTensor):
            return _wrap(a, mesh, [Replicate()] * mesh.ndim, a.shape)
        return a

    with _default_rule(op_call):
        return op_call(*map(replicated, args), **{k: replicated(v) for k, v in kwargs.items()})


def _shard_index(x):
    """(this rank's shard, number of shards) over the mesh dims that shard `x`; None if none do."""
    coordinate = x.device_mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: DTensor's rule skips the op
        return None
    index, count = 0, 1
    for mesh_dim, placement in enumerate(x.placements):
        if isinstance(placement, (Shard, _StridedShard)):
            size = x.device_mesh.size(mesh_dim)
            index, count = index * size + coordinate[mesh_dim], count * size
        elif not isinstance(placement, Replicate):
            return None
    return (index, count) if count > 1 else None


def _sharded_bernoulli_(op_call, args, kwargs):
    """bernoulli_(x, p) of a tensor sharded on a CPU mesh: an independent draw for every shard."""
    x = args[0]
    p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
    shard = _shard_index(x) if x.device_mesh.device_type == "cpu" else None
    if shard is None:
        with _default_rule(op_call):
            return op_call(*args, **kwargs)
    index, count = shard
    seeds = torch.randint(2**63 - 1, (count,), generator=kwargs.get("generator"))
    x._local_tensor.bernoulli_(p, generator=torch.Generator().manual_seed(seeds[index].item()))
    return x


@contextlib.contextmanager
def plain_tensors_replicated():
    """
    `implicit_replication()` that restores the setting it found, so that it nests: a plain
    tensor meeting a DTensor counts as replicated (every rank holds the same values).
    """
    dispatcher = DTensor._op_dispatcher
    before = dispatcher._allow_implicit_replication
    dispatcher._allow_implicit_replication = True
    try:
        yield
    finally:
        dispatcher._allow_implicit_replication = before


def _mask_on_heads(attn_mask):
    """
    The placement of SDPA's optional mask: none, or replicated when every head shares it (a
    static KV cache's positions mask, (T, S)); a mask per head would have to be sharded too.
    """
    if attn_mask is None:
        return None
    if len(attn_mask.shape) >= 3 and attn_mask.shape[-3] != 1:
        raise NotImplementedError("dtensor_gpt shards CPU attention with a mask shared by all heads only, "
                                  f"not one of shape {tuple(attn_mask.shape)}")
    return Replicate()


def _sdpa_on_heads(query, key, value, *args, attn_mask=None, **kwargs):
    """Forward: q, k, v and the output all sharded on heads (dim 1), or all replicated."""
    mask = _mask_on_heads(attn_mask)
    return [
        ([Replicate(), Replicate()], [Replicate(), Replicate(), Replicate(), None, None, mask, None]),
        ([Shard(1), Shard(1)], [Shard(1), Shard(1), Shard(1), None, None, mask, None]),
    ]


def _sdpa_backward_on_heads(grad_out, query, key, value, out, logsumexp, *args, attn_mask=None, **kwargs):
    """Backward: the six tensor inputs and three gradients, all on heads or all replicated."""
    mask = _mask_on_heads(attn_mask)
    return [
        ([Replicate()] * 3, [Replicate()] * 6 + [None, None, mask, None]),
        ([Shard(1)] * 3, [Shard(1)] * 6 + [None, None, mask, None]),
    ]


def _split_mixed_lists(op_call, args, kwargs):
    """A foreach or fused optimizer op over per-parameter lists: DTensor and plain positions apart."""
    n = len(args[0])

    def per_position(a):
        return isinstance(a, (list, tuple)) and len(a) == n

    lists = [a for a in (*args, *kwargs.values()) if per_position(a)]
    distributed = [any(isinstance(a[i], DTensor) for a in lists) for i in range(n)]
    if all(distributed) or not any(distributed):
        with _default_rule(op_call):
            return op_call(*args, **kwargs)

    def positions(want):
        def pick(a):
            return [x for x, d in zip(a, distributed) if d == want] if per_position(a) else a
        return [pick(a) for a in args], {k: pick(v) for k, v in kwargs.items()}

    dt_args, dt_kwargs = positions(True)
    with _default_rule(op_call):
        dt_out = op_call(*dt_args, **dt_kwargs)
    plain_args, plain_kwargs = positions(False)
    plain_out = op_call(*plain_args, **plain_kwargs)

    def merge(dt, plain):
        if dt is None:
            return None
        if isinstance(dt, tuple):
            return tuple(merge(d, p) for d, p in zip(dt, plain))
        dt, plain = iter(dt), iter(plain)
        return [next(dt) if d else next(plain) for d in distributed]

    return merge(dt_out, plain_out)


def _per_parameter_ops():
    """Every overload of the `_foreach_*` and `_fused_*` ops whose first argument is a list of tensors."""
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith(("aten::_foreach_", "aten::_fused_")):
            packet, _, overload = name[len("aten::"):].partition(".")
            op = getattr(getattr(aten, packet), overload or "default")
            if str(op._schema.arguments[0].type) == "List[Tensor]":
                yield op


_registered = False


def register():
    """Install the rules once per process; parallelize() calls this."""
    global _registered
    if _registered:
        return
    handlers = DTensor._op_dispatcher._custom_op_handlers
    handlers[aten.split.Tensor] = _packed_split
    handlers[aten.cat.default] = _packed_cat
    handlers[aten.bernoulli_.float] = _sharded_bernoulli_
    handlers[aten.index_copy_.default] = _plain_as_replicated
    handlers[aten._scaled_dot_product_flash_attention_for_cpu.default] = _plain_as_replicated
    handlers[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = _plain_as_replicated
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu.default)(_sdpa_on_heads)
    register_sharding(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)(
        _sdpa_backward_on_heads
    )
    handlers.update(dict.fromkeys(_per_parameter_ops(), _split_mixed_lists))
    _registered = True
