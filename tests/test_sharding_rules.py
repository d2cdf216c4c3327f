"""
Pins the private DTensor behaviour `dtensor_gpt.sharding_rules` relies on, on 2 gloo ranks:
packed q|k|v placement, the local split and cat, their fallbacks, the CPU SDPA rules, the
per-shard dropout masks, the scoped implicit replication, and foreach and fused AdamW over
parameter lists that mix DTensors and plain tensors.
"""

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.placement_types import _StridedShard

from distributed import run_distributed
from dtensor_gpt import sharding_rules
from dtensor_gpt.sharding_rules import strided_shard


def _rules(rank, world_size):
    sharding_rules.register()
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    C, part = 8, 8 // world_size
    packed = torch.randn(2, 5, 3 * C, requires_grad=True)
    checks = {}

    x = distribute_tensor(packed.detach(), mesh, [strided_shard(2, 3)]).requires_grad_()
    own = torch.cat([packed[..., g * C + rank * part: g * C + (rank + 1) * part] for g in range(3)], -1)
    checks["own heads' q|k|v rows"] = torch.equal(x.to_local(), own)

    upstream = [torch.full((2, 5, C), float(g + 1)) for g in range(3)]
    upstream_sharded = [distribute_tensor(g, mesh, [Shard(2)]) for g in upstream]
    with CommDebugMode() as mode:
        q, k, v = x.split(C, dim=2)
        torch.autograd.backward([q, k, v], upstream_sharded)
    checks["split and its backward are local"] = mode.get_total_counts() == 0
    checks["split gives Shard(2) q, k, v"] = all(t.placements == (Shard(2),) for t in (q, k, v))
    expected = packed.split(C, dim=2)
    checks["split values"] = all(torch.equal(t.full_tensor(), e) for t, e in zip((q, k, v), expected))
    checks["gradient through split"] = x.grad.placements == (strided_shard(2, 3),) and torch.equal(
        x.grad.full_tensor(), torch.cat(upstream, -1)
    )

    with CommDebugMode() as mode:
        pieces = x.split(4, dim=2)
    checks["other splits fall back to DTensor's rule"] = mode.get_total_counts() > 0 and all(
        torch.equal(p.full_tensor(), e) for p, e in zip(pieces, packed.split(4, dim=2))
    )

    rows = distribute_tensor(packed.detach(), mesh, [Shard(0)])
    checks["cat along an unsharded dim is DTensor's"] = torch.equal(
        torch.cat([rows, rows], 2).full_tensor(), torch.cat([packed, packed], 2)
    )

    q, k, v = (distribute_tensor(t.detach().view(2, 5, 4, 2).transpose(1, 2), mesh, [Shard(1)]).requires_grad_()
               for t in expected)
    with CommDebugMode() as mode:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.sum().backward()
    checks["SDPA on heads is local"] = mode.get_total_counts() == 0 and y.placements == (Shard(1),)
    q0, k0, v0 = (t.detach().view(2, 5, 4, 2).transpose(1, 2).requires_grad_() for t in expected)
    y0 = F.scaled_dot_product_attention(q0, k0, v0, is_causal=True)
    y0.sum().backward()
    checks["SDPA values"] = torch.allclose(y.full_tensor(), y0, atol=1e-6)
    checks["SDPA gradients"] = all(
        torch.allclose(a.grad.full_tensor(), b.grad, atol=1e-6) for a, b in ((q, q0), (k, k0), (v, v0))
    )
    rep = [distribute_tensor(t.detach(), mesh, [Replicate()]) for t in (q0, k0, v0)]
    checks["SDPA replicated"] = torch.allclose(F.scaled_dot_product_attention(*rep, is_causal=True).full_tensor(), y0)
    return checks


def test_sharding_rules_on_two_ranks():
    checks = run_distributed(_rules, 2)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"failed: {failed}"
    assert len(checks) == 11


def _rules_on_2d_mesh(rank, world_size):
    sharding_rules.register()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    checks = {}
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    fsdp_tp = [_StridedShard(1, split_factor=2), Shard(1)]
    out = torch.cat([distribute_tensor(a, mesh, fsdp_tp), distribute_tensor(b, mesh, fsdp_tp)], 1)
    checks["cat of an FSDP+TP layout is DTensor's, and right"] = torch.equal(out.full_tensor(), torch.cat([a, b], 1))

    packed = torch.randn(2, 3, 24)
    x = distribute_tensor(packed, mesh, [Replicate(), strided_shard(2, 3)])
    with CommDebugMode() as mode:
        parts = x.split(8, dim=2)
    checks["packed split on the tp dim of a 2-D mesh is local"] = mode.get_total_counts() == 0 and all(
        p.placements == (Replicate(), Shard(2)) for p in parts
    )
    checks["packed split on a 2-D mesh, values"] = all(
        torch.equal(p.full_tensor(), e) for p, e in zip(parts, packed.split(8, dim=2))
    )

    both = distribute_tensor(packed, mesh, [Shard(2), strided_shard(2, 3)])
    checks["a second shard on the packed dim falls back, right"] = all(
        torch.equal(p.full_tensor(), e) for p, e in zip(both.split(8, dim=2), packed.split(8, dim=2))
    )
    return checks


def test_sharding_rules_on_a_2d_mesh():
    checks = run_distributed(_rules_on_2d_mesh, 4)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"failed: {failed}"
    assert len(checks) == 4


def _optimizer_lists(rank, world_size):
    mesh = init_device_mesh("cpu", (world_size,))
    torch.manual_seed(0)
    values = [torch.randn(8, 4), torch.randn(4), torch.randn(4, 8), torch.randn(3), torch.randn(5), torch.randn(6, 4)]
    grads = [torch.randn_like(t) for t in values]
    # interleaved, as in a model's parameter order; None: a parameter the plan leaves plain
    placements = [[Shard(0)], None, [Replicate()], None, None, [Shard(1)]]

    def steps(mixed, **kind):
        def make(t, p):
            return distribute_tensor(t, mesh, p) if mixed and p else t.clone()

        params = [torch.nn.Parameter(make(t, p)) for t, p in zip(values, placements)]
        for param, g, p in zip(params, grads, placements):
            param.grad = make(g, p)
        groups = [{"params": params[:4], "weight_decay": 0.1}, {"params": params[4:], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=1e-2, **kind)
        for _ in range(2):
            optimizer.step()
        return params, optimizer

    checks = {}
    kinds = {"foreach": dict(foreach=True), "fused": dict(fused=True)}
    for name, kind in kinds.items():
        try:
            steps(True, **kind)
            checks[f"torch refuses mixed lists ({name}); if it no longer does, drop the handler"] = False
        except RuntimeError as e:
            checks[f"torch refuses mixed lists ({name}); if it no longer does, drop the handler"] = (
                "mixed torch.Tensor and DTensor" in str(e))
    sharding_rules.register()
    for name, kind in kinds.items():
        reference, _ = steps(False, **kind)
        params, optimizer = steps(True, **kind)
        checks[f"{name} AdamW on mixed lists equals plain tensors exactly"] = all(
            torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, r) for p, r in zip(params, reference))
        checks[f"{name} AdamW state is laid out like its parameter"] = all(
            isinstance(optimizer.state[p]["exp_avg"], DTensor) == isinstance(p, DTensor)
            and getattr(optimizer.state[p]["exp_avg_sq"], "placements", None) == getattr(p, "placements", None)
            for p in params)
    return checks


def test_foreach_and_fused_adamw_on_mixed_parameter_lists():
    checks = run_distributed(_optimizer_lists, 2)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"failed: {failed}"
    assert len(checks) == 6
def _random_rules(rank, world_size):
    from torch.distributed.tensor.experimental import implicit_replication

    sharding_rules.register()
    mesh = init_device_mesh("cpu", (world_size,))
    checks = {}

    def gather(t):
        every = [torch.empty_like(t) for _ in range(world_size)]
        torch.distributed.all_gather(every, t)
        return every

    def mask_and_step(x):
        """This rank's mask, and whether the default generator is in the same state on every rank after it."""
        torch.manual_seed(0)
        local = x.bernoulli_(0.5).to_local().clone()
        states = gather(torch.get_rng_state())
        return local, all(torch.equal(s, states[0]) for s in states)

    local, in_step = mask_and_step(distribute_tensor(torch.empty(4, 1000), mesh, [Shard(0)]))
    every = gather(local)
    checks["sharded: each shard its own mask"] = not torch.equal(every[0], every[1])
    checks["sharded: the default generator stays in step"] = in_step
    torch.manual_seed(0)
    seeds = torch.randint(2**63 - 1, (world_size,))
    checks["sharded: shard r from the r-th seed drawn"] = torch.equal(
        every[1], torch.empty(2, 1000).bernoulli_(0.5, generator=torch.Generator().manual_seed(seeds[1].item()))
    )
    local, in_step = mask_and_step(distribute_tensor(torch.empty(3, 1000), mesh, [Shard(0)]))
    checks["uneven shards: the default generator stays in step"] = in_step and local.shape[0] == 2 - rank
    local, in_step = mask_and_step(distribute_tensor(torch.empty(4, 1000), mesh, [Replicate()]))
    every = gather(local)
    checks["replicated: DTensor's rule, one mask on every rank"] = torch.equal(every[0], every[1]) and in_step

    x = distribute_tensor(torch.ones(2, 3), mesh, [Shard(0)])
    plain = torch.ones(2, 3)
    try:
        x + plain
        checks["mixing plain tensors is refused by default"] = False
    except RuntimeError:
        checks["mixing plain tensors is refused by default"] = True
    with sharding_rules.plain_tensors_replicated():
        checks["plain tensors count as replicated"] = torch.equal((x + plain).full_tensor(), torch.full((2, 3), 2.0))
    with implicit_replication():
        with sharding_rules.plain_tensors_replicated():
            pass
        checks["an enclosing implicit_replication() survives"] = torch.equal((x + plain).full_tensor(), 2 * plain)
    return checks


def test_dropout_rules_on_two_ranks():
    checks = run_distributed(_random_rules, 2)
    failed = [name for name, ok in checks.items() if not ok]
    assert not failed, f"failed: {failed}"
    assert len(checks) == 8
