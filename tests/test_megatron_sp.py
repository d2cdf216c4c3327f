"""The megatron-sp plan: exact, 2 all-gathers + 2 reduce-scatters per block, 1/TP LayerNorm memory."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode

from distributed import run_distributed
from dtensor_gpt import GPT, parallelize
from dtensor_gpt.memory import saved_activation_bytes
from helpers import comm_counts, compare_with_single_device, fake_process_group, small_config

TOL = 1e-5


@pytest.mark.parametrize("tp, seq", [(1, 16), (2, 16), (4, 16), (2, 15), (4, 15), (4, 3)])
def test_sequence_parallel_matches_single_device(tp, seq):
    """Sequence lengths TP does not divide (even shorter than TP) are sharded unevenly, no padding."""
    r = run_distributed(compare_with_single_device, tp, small_config(), (2, seq), "megatron-sp")
    assert r["tied"] and r["plain"] == (tp == 1)
    assert r["logits"] < TOL and r["loss"] < TOL and r["last"] < TOL
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    if tp > 1 and seq % tp == 0:
        L = small_config().n_layer
        # blocks and wte reduce-scatter; blocks and lm_head's input all-gather; the loss: 3 all-reduces
        assert r["forward"] == {"reduce_scatter_tensor": 2 * L + 1, "all_gather_into_tensor": 2 * L + 1, "all_reduce": 3}


@pytest.mark.parametrize("n_layer", [1, 3])
def test_collectives_per_block(n_layer):
    with fake_process_group(4):
        model = parallelize(GPT(small_config(n_layer=n_layer)), init_device_mesh("cpu", (4,)), "megatron-sp")
        with torch.no_grad(), CommDebugMode() as mode:
            model(torch.randint(0, 96, (2, 16)))
    counts = comm_counts(mode)["forward"]
    for i in range(n_layer):
        assert counts[f"transformer.h.{i}"] == {"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2}
        assert counts[f"transformer.h.{i}.attn"] == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
        assert counts[f"transformer.h.{i}.mlp"] == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}
    assert counts["transformer.wte"] == {"reduce_scatter_tensor": 1}
    assert "all_reduce" not in counts["Global"]


def _saved_bytes(rank, world_size, plan):
    torch.manual_seed(0)
    model = parallelize(GPT(small_config(block_size=64)), init_device_mesh("cpu", (world_size,)), plan)
    return saved_activation_bytes(model, torch.randint(0, 96, (2, 64)), torch.randint(0, 96, (2, 64)))


def layernorm_dropout_residual(saved):
    """The part sequence parallelism shards: LayerNorms, dropouts and the blocks' own adds."""
    return sum(b for m, b in saved.items() if m.split(".")[-1] in ("ln_1", "ln_2", "ln_f", "drop")
               or m.endswith("dropout") or (m.startswith("transformer.h.") and m.count(".") == 2))


@pytest.mark.parametrize("tp", [2, 4])
def test_layernorm_activation_memory_drops_to_one_over_tp(tp):
    megatron = run_distributed(_saved_bytes, tp, "megatron")
    sequence = run_distributed(_saved_bytes, tp, "megatron-sp")
    config = small_config(block_size=64)
    # each LayerNorm saves its input (B, T, C) and its mean and rstd (B, T) in fp32
    per_layernorm = 4 * 2 * 64 * (config.n_embd + 2)
    assert layernorm_dropout_residual(megatron) == (2 * config.n_layer + 1) * per_layernorm
    assert layernorm_dropout_residual(sequence) == (2 * config.n_layer + 1) * per_layernorm // tp
