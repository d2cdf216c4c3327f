"""
`parallelize(model, mesh, plan)`: apply a tensor-parallel plan to the unchanged GPT.

Everything is validated before any parameter moves, so a bad call leaves the model as it was.
"""

import math
import weakref
from collections.abc import Mapping
from fnmatch import fnmatch

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    parallelize_module,
)

from dtensor_gpt import sharding_rules
from dtensor_gpt.styles import PackedColwiseParallel
import plans


_plans = weakref.WeakKeyDictionary()


def plan_name(model):
    """The name of the plan `model` was parallelized with ("custom" for a mapping), or None."""
    return _plans.get(model)


def tp_submesh(mesh):
    """The 1-D mesh to shard over: `mesh` itself if 1-D, else its dimension named "tp"."""
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(f"mesh must be a torch.distributed.DeviceMesh, not {type(mesh).__name__}")
    if mesh.ndim == 1:
        return mesh
    names = mesh.mesh_dim_names or ()
    if "tp" not in names:
        raise ValueError(
            f"a {mesh.ndim}-D mesh needs a dimension named 'tp' to shard over, but its dimensions are "
            f"{names or 'unnamed'}; pass mesh_dim_names=(..., 'tp') to init_device_mesh"
        )
    return mesh["tp"]


def check_divisible(config, tp):
    """Heads, width and vocabulary must split evenly over `tp` ranks."""
    fields = {f: getattr(config, f) for f in ("n_head", "n_embd", "vocab_size")}
    common = math.gcd(*fields.values())
    valid = ", ".join(str(d) for d in range(1, common + 1) if common % d == 0)
    for field, value in fields.items():
        if value % tp:
            hint = "; or pad vocab_size to a multiple of tp" if field == "vocab_size" else ""
            raise ValueError(f"{field}={value} is not divisible by tp={tp}; use tp in {{{valid}}}{hint}")


def matching_modules(model, pattern):
    """Module names that `parallelize_module` applies `pattern` to (fnmatch per segment)."""
    parts = pattern.split(".")
    return [
        name
        for name, _ in model.named_modules()
        if name and len(name.split(".")) == len(parts)
        and all(fnmatch(seg, pat) for seg, pat in zip(name.split("."), parts))
    ]


def resolve_plan(model, mesh, plan, options):
    if isinstance(plan, str):
        styles = plans.get_plan(plan, model, mesh, **options)
    elif isinstance(plan, Mapping):
        if options:
            raise ValueError(f"options {sorted(options)} only apply to a named plan, not to a user's mapping")
        styles = dict(plan)
    else:
        raise ValueError(f"plan must be a plan name or a mapping of module patterns to ParallelStyle, not {type(plan).__name__}")
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
    return styles


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


def parallelize(model, mesh, plan="megatron", **options):
    """
    Make `model` tensor-parallel over `mesh` in place and return it.

    `plan` is a name from `plans.PLANS` (with its keyword `options`) or a mapping of module
    path patterns to `ParallelStyle`s. Parameters that were tied stay one parameter.

    Over a "tp" dimension of size 1 the plan is checked but nothing is converted: a one-rank
    shard is the whole tensor, so there is nothing to communicate, and plain tensors skip
    DTensor's per-operation dispatch, which dominates decoding (torchtitan likewise applies
    TP only above degree 1).
    """
    tp_mesh = tp_submesh(mesh)
    if isinstance(plan, str) and hasattr(model, "config"):
        check_divisible(model.config, tp_mesh.size())
    styles = resolve_plan(model, tp_mesh, plan, options)
    tied = tied_parameters(model)
    check_ties_covered(model, styles, tied)
    _plans[model] = plan if isinstance(plan, str) else "custom"
    if tp_mesh.size() == 1:
        return model
    sharding_rules.register()
    parallelize_module(model, tp_mesh, styles)
    retie(model, tied)
    return model
