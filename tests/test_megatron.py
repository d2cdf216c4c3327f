"""The megatron plan against the unparallelized model: exact, minimal collectives, 1/TP memory."""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, parallelize
from helpers import (
    comm_counts,
    fake_process_group,
    full,
    local_parameter_bytes,
    max_grad_errors,
    small_config,
)

TOL = 1e-5


def _compare(rank, world_size, config, shape):
    """Reference and TP model from one seed; logits, loss and every gradient, both head modes."""
    torch.manual_seed(0)
    reference = GPT(config)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, shape, generator=generator)
    targets = torch.randint(0, config.vocab_size, shape, generator=generator)
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()
    ref_last, _ = reference(idx)
    mesh = init_device_mesh("cpu", (world_size,))

    train = parallelize(copy.deepcopy(reference), mesh, "megatron", loss_parallel=True)
    train.zero_grad()
    with CommDebugMode() as forward_mode, loss_parallel():
        logits, loss = train(idx, targets)
    with CommDebugMode() as backward_mode, loss_parallel():
        loss.backward()

    generate = parallelize(copy.deepcopy(reference), mesh, "megatron")
    with torch.no_grad(), CommDebugMode() as generate_mode:
        last, no_loss = generate(idx)

    return dict(
        logits=(full(logits) - ref_logits).abs().max().item(),
        logits_sharded=tuple(logits.placements) != (),
        loss=(full(loss) - ref_loss).abs().item(),
        grads=max_grad_errors(train, reference),
        last=(last - ref_last).abs().max().item(),
        last_is_plain=type(last) is torch.Tensor and no_loss is None,
        tied=train.lm_head.weight is train.transformer.wte.weight,
        forward=comm_counts(forward_mode)["forward"]["Global"],
        backward=comm_counts(backward_mode)["backward"]["Global"],
        generate=comm_counts(generate_mode)["forward"]["Global"],
        local_bytes=local_parameter_bytes(train),
    )


def expected_local_bytes(config, tp):
    """Parameter bytes per rank, by hand: Megatron shards the big matrices, replicates the rest."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    sharded = V * C + L * (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C)
    replicated = config.block_size * C + L * (4 * C + C + C) + 2 * C  # wpe, ln_1/ln_2, c_proj biases, ln_f
    return 4 * (sharded // tp + replicated)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_megatron_matches_single_device(tp):
    config = small_config()
    r = run_distributed(_compare, tp, config, (2, 16))
    assert r["tied"], "lm_head and wte must stay one parameter"
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    assert len(r["grads"]) == len(list(GPT(config).parameters()))
    assert r["last_is_plain"], "without loss_parallel the logits come back as a plain replicated tensor"
    assert r["local_bytes"] == expected_local_bytes(config, tp)
    if tp > 1:
        L = config.n_layer
        # 2 per block + wte; loss_parallel's cross entropy: max, sum of exp, target logit
        assert r["forward"] == {"all_reduce": 2 * L + 1 + 3}
        # backward: 2 per block (the "f" operators) + ln_f's input into the column-parallel lm_head
        assert r["backward"] == {"all_reduce": 2 * L + 1}
        assert r["generate"] == {"all_reduce": 2 * L + 1, "all_gather_into_tensor": 1}


def test_gpt2_small_config_at_tp2():
    r = run_distributed(_compare, 2, GPTConfig(), (1, 64))
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    assert r["local_bytes"] == expected_local_bytes(GPTConfig(), 2)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("n_layer", [1, 3])
def test_collectives_per_block(tp, n_layer):
    """2 all-reduces per block and nothing else inside blocks; 1 all-reduce in wte; 1 all-gather in lm_head."""
    with fake_process_group(tp):
        model = parallelize(GPT(small_config(n_layer=n_layer)), init_device_mesh("cpu", (tp,)))
        with torch.no_grad(), CommDebugMode() as mode:
            model(torch.randint(0, 96, (2, 16)))
    counts = comm_counts(mode)["forward"]
    for i in range(n_layer):
        assert counts[f"transformer.h.{i}"] == {"all_reduce": 2}
        assert counts[f"transformer.h.{i}.attn"] == {"all_reduce": 1}
        assert counts[f"transformer.h.{i}.mlp"] == {"all_reduce": 1}
    assert counts["transformer.wte"] == {"all_reduce": 1}
    assert counts["lm_head"] == {"all_gather_into_tensor": 1}
    assert counts["Global"] == {"all_reduce": 2 * n_layer + 1, "all_gather_into_tensor": 1}
