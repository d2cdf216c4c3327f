"""
`apply_tp(model, tp_mesh, styles)`: check a plan against the model, then apply it.

Everything is validated before any parameter moves, so a bad plan leaves the model as it
was; parameters that were tied (wte and lm_head) stay one parameter.
"""

from fnmatch import fnmatch

import torch.nn as nn
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from dtensor_gpt import sharding_rules
from dtensor_gpt.materialize import on_meta
from dtensor_gpt.partial_grads import reduce_partial_grads_after_backward
from dtensor_gpt.styles import PackedColwiseParallel


def matching_modules(model, pattern):
    """Module names that `parallelize_module` applies `pattern` to (fnmatch per segment)."""
    parts = pattern.split(".")
    return [
        name
        for name, _ in model.named_modules()
        if name and len(name.split(".")) == len(parts)
        and all(fnmatch(seg, pat) for seg, pat in zip(name.split("."), parts))
    ]


def check_plan(model, styles):
    """Every entry is a ParallelStyle that matches modules it can shard."""
    for pattern, style in styles.items():
        if not isinstance(style, ParallelStyle):
            raise ValueError(f"plan entry {pattern!r} maps to {type(style).__name__}, not a ParallelStyle")
        names = matching_modules(model, pattern)
        if not names:
            raise ValueError(
                f"plan entry {pattern!r} matches no module of {type(model).__name__}; "
                f"is this the model the plan is for?"
            )
        for name in names:
            check_style_fits(style, model.get_submodule(name), name)


def check_style_fits(style, module, name):
    """The module types a style can shard, checked before anything moves."""
    if isinstance(style, PackedColwiseParallel):
        kinds = (nn.Linear,)
    elif isinstance(style, (ColwiseParallel, RowwiseParallel)):
        kinds = (nn.Linear, nn.Embedding)
    else:
        return
    if not isinstance(module, kinds):
        raise ValueError(
            f"{type(style).__name__} shards {' or '.join(k.__name__ for k in kinds)} modules, "
            f"but {name} is a {type(module).__name__}"
        )


def moves_parameters(style):
    return not isinstance(style, (PrepareModuleInput, PrepareModuleOutput))


def check_ties_covered(model, styles, groups):
    """A tied parameter is sharded everywhere it is used or nowhere, never half."""
    moved = [name for pattern, style in styles.items() if moves_parameters(style)
             for name in matching_modules(model, pattern)]
    for group in groups:
        covered = [any(mod == m or mod.startswith(m + ".") for m in moved) for mod, _ in group]
        if any(covered) and not all(covered):
            names = ", ".join(f"{m}.{p}" if m else p for m, p in group)
            raise ValueError(f"the plan shards some but not all uses of the tied parameter {names}; "
                             f"give every one of them a style that shards it the same way")


def tied_parameters(model):
    """Groups of (module name, parameter name) that share one Parameter, e.g. wte and lm_head."""
    by_id = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            by_id.setdefault(id(p), []).append((mod_name, p_name))
    return [sorted(set(group)) for group in by_id.values() if len(set(group)) > 1]


def retie(model, groups):
    """Point every member of a tied group at the first member's (now distributed) Parameter."""
    for group in groups:
        (first_mod, first_name), *rest = group
        shared = getattr(model.get_submodule(first_mod), first_name)
        for mod_name, p_name in rest:
            other = getattr(model.get_submodule(mod_name), p_name)
            if getattr(other, "placements", None) != getattr(shared, "placements", None):
                raise ValueError(
                    f"tied parameters {first_mod}.{first_name} and {mod_name}.{p_name} were sharded "
                    f"differently ({getattr(shared, 'placements', None)} vs {getattr(other, 'placements', None)}); "
                    f"a plan must shard tied parameters the same way"
                )
            setattr(model.get_submodule(mod_name), p_name, shared)


def apply_tp(model, tp_mesh, styles):
    """
    Shard `model` over the 1-D `tp_mesh` with `styles` ({module pattern: ParallelStyle}).

    Over a mesh of size 1 the plan is checked but nothing is converted: a one-rank shard is
    the whole tensor, so there is nothing to communicate, and plain tensors skip DTensor's
    per-operation dispatch, which dominates decoding (torchtitan likewise applies TP only
    above degree 1).
    """
    check_plan(model, styles)
    tied = tied_parameters(model)
    check_ties_covered(model, styles, tied)
    if tp_mesh.size() == 1:
        return model
    sharding_rules.register()
    parallelize_module(model, tp_mesh, styles)
    retie(model, tied)
    if on_meta(model):
        return model  # the hooks go on the allocated parameters (`materialize.allocate`)
    return reduce_partial_grads_after_backward(model)
