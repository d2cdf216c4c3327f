"""
`parallelize(model, mesh, plan)`: apply a tensor-parallel plan, by name or as a mapping, to
the unchanged GPT.

Everything is validated before any parameter moves, so a bad call leaves the model as it was.
"""

import math
import weakref
from collections.abc import Mapping

from torch.distributed.device_mesh import DeviceMesh

import plans
from dtensor_gpt.apply_tp import apply_tp
from dtensor_gpt.materialize import on_meta, refuse_meta_forward
from dtensor_gpt.sharding_rules import check_torch_version

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
    """
    Heads (and so the width) must split evenly over `tp` ranks: each rank computes whole
    heads. The vocabulary need not: DTensor shards it unevenly, so no padding row ever
    enters the softmax.
    """
    if config.n_head % tp:
        valid = ", ".join(str(d) for d in range(1, config.n_head + 1) if config.n_head % d == 0)
        raise ValueError(f"n_head={config.n_head} is not divisible by tp={tp}; use tp in {{{valid}}}")


def resolve_plan(model, mesh, plan, options):
    if isinstance(plan, str):
        return plans.get_plan(plan, model, mesh, **options)
    if isinstance(plan, Mapping):
        if options:
            raise ValueError(f"options {sorted(options)} only apply to a named plan, not to a user's mapping")
        return dict(plan)
    raise ValueError(f"plan must be a plan name or a mapping of module patterns to ParallelStyle, not {type(plan).__name__}")


def parallelize(model, mesh, plan="megatron", **options):
    """
    Make `model` tensor-parallel over `mesh` in place and return it.

    `plan` is a name from `plans.PLANS` (with its keyword `options`) or a mapping of module
    path patterns to `ParallelStyle`s. Over a "tp" dimension of size 1 the plan is checked
    and nothing is converted (see `apply_tp`). A model built on the meta device stays there,
    its parameters placed but holding nothing, until `load_checkpoint` or `init_weights`
    allocates this rank's shards; a forward before that is one clear error.
    """
    check_torch_version()
    tp_mesh = tp_submesh(mesh)
    if isinstance(plan, str) and hasattr(model, "config"):
        check_divisible(model.config, tp_mesh.size())
    styles = resolve_plan(model, tp_mesh, plan, options)
    apply_tp(model, tp_mesh, styles)
    if on_meta(model):
        refuse_meta_forward(model)
    _plans[model] = plan if isinstance(plan, str) else "custom"
    return model
