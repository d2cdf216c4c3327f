"""
Tensor-parallel plans for nanoGPT module names, found by name.

A plan is data: a dict from module-path patterns (`fnmatch` per dotted segment, as
`parallelize_module` reads them) to `ParallelStyle`s. Each module here has a
`plan(model, mesh, **options)` that builds that dict for a model about to be parallelized
over `mesh`; `dtensor_gpt.parallelize` also accepts a user's own dict.
"""

import inspect

from plans import megatron, megatron_overlap, megatron_sp, spd

PLANS = {
    "megatron": megatron.plan,
    "megatron-sp": megatron_sp.plan,
    "megatron-overlap": megatron_overlap.plan,
    "spd": spd.plan,
}


def get_plan(name, model, mesh, **options):
    """The plan registered as `name` for `model` on `mesh`, built with `options`."""
    if name not in PLANS:
        raise ValueError(f"unknown plan {name!r}; known plans: {', '.join(sorted(PLANS))}")
    build = PLANS[name]
    accepted = list(inspect.signature(build).parameters)[2:]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"plan {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are: {', '.join(accepted) or 'none'}"
        )
    return build(model, mesh, **options)
