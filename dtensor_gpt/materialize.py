"""
A model built on the `meta` device holds nothing until each rank allocates its own shards:
`allocate` gives them memory, `init_weights` fills them with the model's own random
initialisation, and `load_checkpoint` reads a checkpoint's slices into them.

So a rank never holds more than its shards plus one whole tensor: N ranks fit a model N times
larger than one can, as torchtitan does (meta, parallelize, `to_empty`, init).

`init_weights` must give exactly the weights the single-device model gets from the same seed,
without ever building that model. It builds the model once more on `meta` (free) and records,
in order, every operation its constructor runs; then it replays them on the CPU's default
generator. A draw that a later one overwrites (nn.Linear's own init, which GPT re-initialises)
is replayed into a scratch tensor freed at once, only to move the generator as the constructor
did; each parameter's final values are made whole, one parameter at a time, and only this
rank's shard of them is kept.
"""

import contextlib
import io

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from dtensor_gpt import layout
from dtensor_gpt.partial_grads import reduce_partial_grads_after_backward

aten = torch.ops.aten
_OVERWRITE = {aten.normal_.default, aten.uniform_.default, aten.fill_.Scalar, aten.zero_.default,
              aten.random_.default, getattr(aten.random_, "from"), aten.random_.to, aten.exponential_.default,
              aten.cauchy_.default, aten.log_normal_.default, aten.geometric_.default}  # values ignore the old ones


def on_meta(model):
    """The names of `model`'s parameters and buffers that hold no memory yet (built on `meta`)."""
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, t in tensors if t.is_meta]


def refuse_meta_forward(model):
    """
    Make a forward of `model` while it is still on `meta` one clear error; the hook removes
    itself at the first forward that finds the model allocated.
    """
    def check(module, args):
        names = on_meta(module)
        if names:
            raise RuntimeError(f"the model's parameters are on the meta device ({names[0]} and {len(names) - 1} more) "
                               f"and hold no values; call load_checkpoint(model, path) or init_weights(model) first")
        handle.remove()

    handle = model.register_forward_pre_hook(check)


def shard_device(model):
    """Where this rank's shards belong: the device type of the model's mesh (the current CUDA device), else the CPU."""
    for p in model.parameters():
        if isinstance(p, DTensor):
            return torch.device(p.device_mesh.device_type)
    return torch.device("cpu")


def allocate(model, device=None):
    """
    Give a meta model's shards memory on `device` (default: `shard_device`), uninitialised;
    every parameter stays the same object (an optimizer made on meta keeps working, tied ones
    stay one), and megatron-sp's partial gradients are hooked here (see `apply_tp`).
    """
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # every Parameter stays the same object
    device = torch.device(device or shard_device(model))
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    for p in model.parameters():
        # The swap keeps the Python side of a parameter's hooks but not all of autograd's
        # registration of them (a later registration then skips it): none survive, and the
        # partial-gradient hooks are registered anew on the allocated parameters.
        p._backward_hooks = p._post_accumulate_grad_hooks = None
    if device.type == "meta":
        return model
    return reduce_partial_grads_after_backward(model)


def local_values(target):
    """The values this rank holds of a parameter (a DTensor's local shard)."""
    return target.to_local() if isinstance(target, DTensor) else target


class _Whole:
    """A tensor made whole on the CPU, read as a checkpoint source is (`layout.shard_values`)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def read_full(self, name):
        return self.tensor

    def read(self, name, dim, start, stop):
        return self.tensor.narrow(dim, start, stop - start)


class _Recorder(TorchDispatchMode):
    """Every operation in order, with its arguments and result kept alive so no storage is reused."""

    def __init__(self):
        super().__init__()
        self.events = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.events.append((func, args, kwargs, out))
        return out


def _key(t):
    return t.untyped_storage()._cdata


def _whole_view(t):
    return t.storage_offset() == 0 and t.is_contiguous() and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def _written(func, args, kwargs):
    """The tensor an operation writes in place, or None."""
    if "out" in kwargs:
        return kwargs["out"]
    first = func._schema.arguments[0].alias_info if func._schema.arguments else None
    if args and isinstance(args[0], torch.Tensor) and first is not None and first.is_write:
        return args[0]
    return None


def _scratch(t):
    """A CPU tensor laid out over a storage like `t`'s."""
    return torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)


def _replay(func, args, kwargs, storage=None):
    """Run a recorded operation on the CPU: in place on `storage` (a CPU tensor like the recorded one's), or as a factory."""
    tensors = [a for a in (*args[1:], *kwargs.values()) if isinstance(a, torch.Tensor)]
    if tensors or (storage is None and args and isinstance(args[0], torch.Tensor)):
        raise NotImplementedError(f"init_weights replays operations that read no other tensor, not {func}")
    kwargs = {k: torch.device("cpu") if isinstance(v, torch.device) else v for k, v in kwargs.items()}
    if storage is None:
        return func(*args, **kwargs)
    func(storage.as_strided(args[0].size(), args[0].stride(), args[0].storage_offset()), *args[1:], **kwargs)
    return storage


def _record(build):
    """What `build()` does on meta: (the model, its operations in order, {storage key: parameter name})."""
    recorder = _Recorder()
    with torch.random.fork_rng(devices=[]), torch.device("meta"), recorder, contextlib.redirect_stdout(io.StringIO()):
        built = build()
    names = {}
    for name, p in built.named_parameters():
        names.setdefault(_key(p), name)
    return built, recorder.events, names


def _writes(events, names):
    """
    For each event: (the tensor it writes in place, or None; the parameter storage it writes or
    creates, or None; whether it sets every value regardless of the old ones). Creating a
    storage counts as such a write.
    """
    seen, out = set(), []
    for func, args, kwargs, result in events:
        written = _written(func, args, kwargs)
        if written is not None:
            target, overwrites = _key(written), func in _OVERWRITE and _whole_view(written)
        elif isinstance(result, torch.Tensor) and _key(result) not in seen:
            target, overwrites = _key(result), True
        else:
            target, overwrites = None, False
        seen.update(_key(t) for t in (*args, *kwargs.values(), result) if isinstance(t, torch.Tensor))
        out.append((written, target if target in names else None, overwrites))
    return out


def init_weights(model, build=None):
    """
    Allocate this rank's shards of `model` (built on meta, parallelized or not; in place;
    returns `model`) and give them the values `build()` would give the whole model from the
    default CPU generator's current state, leaving the generator where `build()` would.
    `build` defaults to `type(model)(model.config)`: `torch.manual_seed(s)` then
    `init_weights(model)` holds exactly `torch.manual_seed(s); GPT(config)`'s weights.
    The peak is this rank's shards plus one whole parameter.
    """
    built, events, names = _record(build or (lambda: type(model)(model.config)))
    ours = {name for name, _ in model.named_parameters()}
    if set(names.values()) != ours:
        raise ValueError(f"build() makes parameters {sorted(set(names.values()) ^ ours)} that the model does not have, "
                         f"or lacks ones it has; pass the build that made this model")
    writes = _writes(events, names)
    final_from, last = {}, {}  # per parameter: the write from which its values are final, and its last write
    for i, (_, target, overwrites) in enumerate(writes):
        if target is not None:
            last[target] = i
            if overwrites:
                final_from[target] = i
    unknown = sorted(name for key, name in names.items() if key not in final_from)
    if unknown:
        raise NotImplementedError(f"init_weights cannot tell where {unknown[0]}'s values come from in build()")
    shapes = {_key(p): p for p in built.parameters()}
    params = dict(allocate(model).named_parameters())
    whole = {}
    with torch.no_grad():
        for i, ((func, args, kwargs, result), (written, target, _)) in enumerate(zip(events, writes)):
            if target is not None and i >= final_from[target]:
                if written is None:
                    whole[target] = _replay(func, args, kwargs)
                else:
                    whole[target] = _replay(func, args, kwargs, whole[target] if target in whole else _scratch(written))
                if i == last[target]:
                    meta, name = shapes[target], names[target]
                    values = whole.pop(target).as_strided(meta.shape, meta.stride(), meta.storage_offset())
                    values = layout.dp_chunk(layout.shard_values(_Whole(values), name, params[name]), params[name])
                    local_values(params[name]).copy_(values)
            elif torch.Tag.nondeterministic_seeded in func.tags:  # only to move the generator as build() did
                _replay(func, args, kwargs, None if written is None else _scratch(written))
    return model
