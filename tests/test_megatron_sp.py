"""The megatron-sp plan: exact, 2 all-gathers + 2 reduce-scatters per block, 1/TP LayerNorm memory."""

import copy

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, parallelize
from dtensor_gpt.memory import saved_activation_bytes
from helpers import comm_counts, compare_with_single_device, fake_process_group, max_grad_errors, small_config

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


def _accumulated_steps(rank, world_size, config):
    """Two backwards accumulated, then an AdamW step: the gradients' errors and the collectives."""
    torch.manual_seed(0)
    reference = GPT(config)
    model = parallelize(copy.deepcopy(reference), init_device_mesh("cpu", (world_size,)), "megatron-sp", loss_parallel=True)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.vocab_size, (2, 9), generator=generator) for _ in range(2)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in batches]
    closing = []
    for x, y in batches:
        _, loss = reference(x, y)
        loss.backward()
        with CommDebugMode() as mode, loss_parallel():
            _, loss = model(x, y)
            loss.backward()
        closing.append(comm_counts(mode)["backward"]["Global"].get("all_reduce", 0))
    layer_norms = {n: p.grad.placements for n, p in model.named_parameters() if ".ln_" in n or "ln_f" in n}
    grads = max_grad_errors(model, reference)
    with CommDebugMode() as stepping:
        torch.optim.AdamW(model.parameters(), foreach=False).step()
    return dict(grads=grads, closing=closing, layer_norms=layer_norms, step=stepping.get_total_counts())


@pytest.mark.parametrize("tp", [2, 3])
def test_layer_norm_gradients_reduced_once_per_backward(tp):
    """
    The LayerNorms' replicated parameters get Partial gradients; each backward ends with one
    all-reduce of all of them (the backward's only all-reduce; its size: test_comm), a second backward accumulates onto them without communicating (exactly, also at TP=3, where
    DTensor's own Replicate -> Partial would divide by 3), and AdamW then communicates nothing.
    """
    config = small_config(n_head=6)
    r = run_distributed(_accumulated_steps, tp, config)
    worst = max(r["grads"], key=r["grads"].get)
    assert r["grads"][worst] < TOL, f"gradient of {worst} differs by {r['grads'][worst]}"
    assert len(r["layer_norms"]) == 2 * 2 * config.n_layer + 2
    assert all(placements == (Replicate(),) for placements in r["layer_norms"].values())
    assert r["closing"] == [1, 1] and r["step"] == 0
