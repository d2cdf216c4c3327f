"""The megatron plan against the unparallelized model: exact, minimal collectives, 1/TP memory."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, parallelize
from helpers import comm_counts, compare_with_single_device, fake_process_group, small_config

TOL = 1e-5


def expected_local_bytes(config, tp):
    """Parameter bytes per rank, by hand: Megatron shards the big matrices, replicates the rest."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    sharded = V * C + L * (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C)
    replicated = config.block_size * C + L * (4 * C + C + C) + 2 * C  # wpe, ln_1/ln_2, c_proj biases, ln_f
    return 4 * (sharded // tp + replicated)


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_megatron_matches_single_device(tp):
    config = small_config()
    r = run_distributed(compare_with_single_device, tp, config, (2, 16))
    assert r["tied"], "lm_head and wte must stay one parameter"
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    assert len(r["grads"]) == len(list(GPT(config).parameters()))
    assert r["last_is_plain"], "without loss_parallel the logits come back as a plain replicated tensor"
    if tp == 1:
        assert r["plain"] and r["logits_placements"] == () and r["collectives"] == 0, "TP=1 converts nothing"
    else:
        assert r["logits_placements"] == (Shard(2),), "with loss_parallel the logits stay vocab-sharded"
    assert r["local_bytes"] == expected_local_bytes(config, tp)
    if tp > 1:
        L = config.n_layer
        # 2 per block + wte; loss_parallel's cross entropy: max, sum of exp, target logit
        assert r["forward"] == {"all_reduce": 2 * L + 1 + 3}
        # backward: 2 per block (the "f" operators) + ln_f's input into the column-parallel lm_head
        assert r["backward"] == {"all_reduce": 2 * L + 1}
        assert r["generate"] == {"all_reduce": 2 * L + 1, "all_gather_into_tensor": 1}


def test_gpt2_small_shapes_at_tp2():
    """GPT-2 124M's widths, heads, vocabulary and context, in 2 of its 12 blocks (every block is the same)."""
    config = GPTConfig(n_layer=2)
    r = run_distributed(compare_with_single_device, 2, config, (1, 64))
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    assert r["local_bytes"] == expected_local_bytes(config, 2)


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


@pytest.mark.parametrize("n_layer", [1, 3])
def test_training_collectives_per_block(n_layer):
    """With loss_parallel: forward 2 per block + wte + 3 in the loss; backward 2 per block + ln_f."""
    with fake_process_group(2):
        model = parallelize(GPT(small_config(n_layer=n_layer)), init_device_mesh("cpu", (2,)), loss_parallel=True)
        idx = torch.randint(0, 96, (2, 16))
        with CommDebugMode() as mode, loss_parallel():
            _, loss = model(idx, idx)
            loss.backward()
    fwd, bwd = comm_counts(mode)["forward"], comm_counts(mode)["backward"]
    assert fwd["Global"] == {"all_reduce": 2 * n_layer + 1 + 3}
    assert bwd["Global"] == {"all_reduce": 2 * n_layer + 1}
    for i in range(n_layer):
        assert fwd[f"transformer.h.{i}"] == bwd[f"transformer.h.{i}"] == {"all_reduce": 2}
    assert bwd["lm_head"] == {"all_reduce": 1}
