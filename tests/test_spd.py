"""The spd plan against a hand-written single-process Sync-Point Drop (tests/spd_reference.py)."""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, parallelize
from helpers import comm_counts, fake_process_group, full, max_grad_errors, small_config
from spd_reference import spd_forward

TOL = 1e-5


def perturbed_model(**overrides):
    """nanoGPT's init has zero biases; perturb every weight so biases take part."""
    torch.manual_seed(0)
    model = GPT(small_config(n_layer=3, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _compare_with_formula(rank, world_size, dropped, bias):
    reference = perturbed_model(bias=bias)
    model = parallelize(copy.deepcopy(reference), init_device_mesh("cpu", (world_size,)), "spd",
                        spd_blocks=dropped, loss_parallel=True)
    generator = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, 96, (2, 16), generator=generator) for _ in range(2))
    ref_logits, ref_loss = spd_forward(reference, idx, targets, world_size, dropped)
    ref_loss.backward()
    exact_logits, _ = reference(idx)
    with CommDebugMode() as mode, loss_parallel():
        logits, loss = model(idx, targets)
        loss.backward()
    counts = comm_counts(mode)["forward"]
    return dict(
        logits=(full(logits) - ref_logits).abs().max().item(),
        loss=(full(loss) - ref_loss).abs().item(),
        grads=max_grad_errors(model, reference),
        from_exact=(full(logits)[:, -1] - exact_logits[:, -1]).abs().max().item(),
        blocks=[counts.get(f"transformer.h.{i}", {}) for i in range(3)],
    )


@pytest.mark.parametrize("tp, dropped, bias", [(1, [0, 1, 2], True), (2, [1], True), (2, [0, 1, 2], False),
                                               (4, [0, 2], True)])
def test_spd_equals_the_formula(tp, dropped, bias):
    r = run_distributed(_compare_with_formula, tp, dropped, bias)
    assert r["logits"] < TOL and r["loss"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs from the formula's by {r['grads'][worst]}"
    if tp == 1:
        assert r["from_exact"] < TOL, "at TP=1 there is no sync point to drop: SPD is the exact model"
    else:
        assert r["from_exact"] > 1e-3, "with TP > 1 a dropped sync point changes the result"
        assert r["blocks"] == [{"all_reduce": 1 if i in dropped else 2} for i in range(3)]


@pytest.mark.parametrize("n_layer, dropped", [(1, [0]), (3, [0, 2])])
def test_collectives_per_block(n_layer, dropped):
    with fake_process_group(2):
        model = parallelize(GPT(small_config(n_layer=n_layer)), init_device_mesh("cpu", (2,)), "spd",
                            spd_blocks=dropped)
        with torch.no_grad(), CommDebugMode() as mode:
            model(torch.randint(0, 96, (2, 16)))
    counts = comm_counts(mode)["forward"]
    for i in range(n_layer):
        assert counts[f"transformer.h.{i}"] == {"all_reduce": 1 if i in dropped else 2}
    assert counts["Global"] == {"all_reduce": 2 * n_layer - len(dropped) + 1, "all_gather_into_tensor": 1}


def _auto_choice(rank, world_size, k):
    model = perturbed_model()
    calibration = torch.randint(0, 96, (2, 17), generator=torch.Generator().manual_seed(2))
    parallelize(model, init_device_mesh("cpu", (world_size,)), "spd", spd_blocks=f"auto:{k}", calibration=calibration)
    chosen = [i for i, block in enumerate(model.transformer.h) if block._forward_hooks]  # only SyncPointDrop hooks a whole block
    reference = perturbed_model()
    idx, targets = calibration[:, :-1].contiguous(), calibration[:, 1:].contiguous()
    with torch.no_grad():
        exact = reference(idx, targets)[1].item()
        increase = [spd_forward(reference, idx, targets, world_size, [i])[1].item() - exact for i in range(3)]
    return chosen, increase


def test_auto_picks_the_least_sensitive_blocks():
    chosen, increase = run_distributed(_auto_choice, 2, 2)
    assert chosen == sorted(sorted(range(3), key=increase.__getitem__)[:2])
    assert len(set(round(x, 6) for x in increase)) == 3, "blocks must differ for the ranking to mean anything"


def test_last_k_and_errors():
    from plans.spd import parse_spd_blocks

    assert parse_spd_blocks("last:2", 5) == [3, 4] and parse_spd_blocks("all", 3) == [0, 1, 2]
    assert parse_spd_blocks([2, 0, 2], 3) == [0, 2]
    with pytest.raises(ValueError, match=r"spd_blocks='last:7' asks for 7 blocks but the model has n_layer=5"):
        parse_spd_blocks("last:7", 5)
    with pytest.raises(ValueError, match=r"spd_blocks='first:2' is not understood"):
        parse_spd_blocks("first:2", 5)
    with pytest.raises(ValueError, match=r"plan 'spd' needs dropout=0 \(config.dropout=0.1\)"), fake_process_group(2):
        parallelize(GPT(small_config(dropout=0.1)), init_device_mesh("cpu", (2,)), "spd")
