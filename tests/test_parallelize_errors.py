"""Bad input gives one clear ValueError before any parameter is moved."""

import re

import pytest
import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel

from dtensor_gpt import GPT, parallelize
from dtensor_gpt.sharding_rules import check_torch_version
from dtensor_gpt.styles import PackedColwiseParallel
from helpers import fake_process_group, small_config


@pytest.fixture
def four_ranks():
    with fake_process_group(4):
        yield


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_untouched(model, before):
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])


@pytest.mark.parametrize(
    "tp, overrides, message",
    [
        (4, dict(n_head=6, n_embd=96), r"n_head=6 is not divisible by tp=4; use tp in \{1, 2, 3, 6\}"),
        (5, dict(), r"n_head=12 is not divisible by tp=5; use tp in \{1, 2, 3, 4, 6, 12\}"),
    ],
)
def test_dimensions_not_divisible(tp, overrides, message):
    model = GPT(small_config(**overrides))
    before = snapshot(model)
    with fake_process_group(tp), pytest.raises(ValueError, match=message):
        parallelize(model, init_device_mesh("cpu", (tp,)))
    assert_untouched(model, before)


@pytest.mark.parametrize("version", ["2.11.0+cu130", "2.12.1"])
def test_torch_older_than_2_13_is_refused(four_ranks, monkeypatch, version):
    """torch 2.11's DTensor raises deep inside c_attn's first forward (measured); this says why, up front."""
    model = GPT(small_config())
    before = snapshot(model)
    monkeypatch.setattr(torch, "__version__", version)
    message = rf"torch {re.escape(version)} is too old for dtensor_gpt.parallelize: .* torch>=2.13; pip install torch==2.13.0"
    with pytest.raises(RuntimeError, match=message):
        parallelize(model, init_device_mesh("cpu", (4,)))
    assert_untouched(model, before)


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0a0+git1234", "2.14.1+cpu", "3.0.0"])
def test_torch_2_13_and_newer_pass_the_version_check(version):
    check_torch_version(version)


@pytest.mark.parametrize(
    "plan, options, message",
    [
        ("megatorn", {}, r"unknown plan 'megatorn'; known plans: megatron, megatron-overlap, megatron-sp, spd"),
        ("megatron", dict(spd_blocks=[0]), r"plan 'megatron' has no option 'spd_blocks'; its options are: loss_parallel, compress"),
        ("spd", dict(spd_blocks=[0, 2]), r"spd_blocks \[2\] out of range for n_layer=2; use indices 0..1"),
        ("spd", dict(spd_blocks="auto:1"), r"spd_blocks='auto:1' ranks blocks on data: pass calibration="),
        ("megatron-overlap", dict(chunks=0), r"chunks=0 must be a whole number >= 1"),
        ({"lm_head": "colwise"}, {}, r"plan entry 'lm_head' maps to str, not a ParallelStyle"),
        ({}, dict(loss_parallel=True), r"options \['loss_parallel'\] only apply to a named plan"),
        ({"transformer.wte": PackedColwiseParallel()}, {}, r"PackedColwiseParallel shards Linear modules, but transformer.wte is a Embedding"),
        ({"transformer.h.0.ln_1": ColwiseParallel()}, {}, r"ColwiseParallel shards Linear or Embedding modules, but transformer.h.0.ln_1 is a LayerNorm"),
        ({"lm_head": ColwiseParallel()}, {}, r"shards some but not all uses of the tied parameter lm_head.weight, transformer.wte.weight"),
    ],
)
def test_bad_plan(four_ranks, plan, options, message):
    model = GPT(small_config())
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        parallelize(model, init_device_mesh("cpu", (4,)), plan, **options)
    assert_untouched(model, before)


def test_mesh_without_tp_dimension(four_ranks):
    model = GPT(small_config())
    before = snapshot(model)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    with pytest.raises(ValueError, match=r"needs a dimension named 'tp'.*\('dp', 'cp'\)"):
        parallelize(model, mesh)
    with pytest.raises(ValueError, match=r"mesh must be a torch.distributed.DeviceMesh, not int"):
        parallelize(model, 4)
    assert_untouched(model, before)


def test_two_dimensional_mesh_shards_over_tp(four_ranks):
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = parallelize(GPT(small_config()), mesh)
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert weight.device_mesh.mesh_dim_names == ("tp",) and weight.to_local().shape == (192, 96)


def test_model_missing_planned_modules(four_ranks):
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"plan entry 'transformer.wte' matches no module of Sequential"):
        parallelize(model, init_device_mesh("cpu", (4,)))
    assert not isinstance(model[0].weight, DTensor)


def test_users_own_plan(four_ranks):
    model = GPT(small_config())
    parallelize(model, init_device_mesh("cpu", (4,)), plan={"transformer.h.*.mlp.c_fc": ColwiseParallel()})
    assert isinstance(model.transformer.h[1].mlp.c_fc.weight, DTensor)
    assert not isinstance(model.transformer.h[1].mlp.c_proj.weight, DTensor)


@pytest.mark.parametrize("first", ["plans", "plans.spd", "dtensor_gpt.styles"])
def test_any_module_imports_first(first):
    """A user's own plan starts with `from plans import ...` or the styles; neither may hit an import cycle."""
    import subprocess
    import sys

    code = f"import {first}; import dtensor_gpt, plans; print(sorted(plans.PLANS))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['megatron', 'megatron-overlap', 'megatron-sp', 'spd']"
