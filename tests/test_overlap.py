"""megatron-overlap against the unparallelized model: exact, megatron's bytes in chunks times its all-reduces."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel

from distributed import run_distributed
from dtensor_gpt import GPT, parallelize
from dtensor_gpt.comm import CommDebugMode, comm_report, main
from dtensor_gpt.model import KVCache
from helpers import comm_counts, full, max_grad_errors, small_config

TOL = 1e-5
CHUNKS = 2


def spread_over_ranks(t):
    """The largest difference between this rank's `t` and any other rank's."""
    copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, t.contiguous())
    return max((c - t).abs().max().item() for c in copies)


def overlap_against_single_device(rank, world_size, config):
    torch.manual_seed(0)
    reference = GPT(config)
    mesh = init_device_mesh("cpu", (world_size,))
    generator = torch.Generator().manual_seed(1)
    out = {}

    # training: 2 rows (a chunk each), then one row (2 chunks of its 8 positions)
    train = parallelize(copy.deepcopy(reference), mesh, "megatron-overlap", chunks=CHUNKS, loss_parallel=True)
    for name, shape in (("rows", (2, 8)), ("positions", (1, 8))):
        idx = torch.randint(0, config.vocab_size, shape, generator=generator)
        targets = torch.randint(0, config.vocab_size, shape, generator=generator)
        reference.zero_grad(), train.zero_grad()
        ref_logits, ref_loss = reference(idx, targets)
        ref_loss.backward()
        with CommDebugMode() as forward_mode, loss_parallel():
            logits, loss = train(idx, targets)
        with CommDebugMode() as backward_mode, loss_parallel():
            loss.backward()
        out[name] = dict(
            logits=(full(logits) - ref_logits).abs().max().item(), loss=(full(loss) - ref_loss).abs().item(),
            grads=max_grad_errors(train, reference), spread=spread_over_ranks(full(loss).detach()),
            forward=comm_counts(forward_mode)["forward"]["Global"],
            backward=comm_counts(backward_mode)["backward"]["Global"],
        )

    # generation with a KV cache: a prompt, then one token of each row, for 2 rows and for 1
    generate = parallelize(copy.deepcopy(reference), mesh, "megatron-overlap", chunks=CHUNKS)
    for name, rows in (("decode rows", 2), ("decode one row", 1)):
        idx = torch.randint(0, config.vocab_size, (rows, 9), generator=generator)
        cache = KVCache(config.n_layer, config.block_size)
        with torch.no_grad():
            prompt_logits, _ = generate(idx[:, :8], cache=cache)
            with CommDebugMode() as step_mode:
                step_logits, _ = generate(idx[:, 8:], cache=cache)
            ref_prompt, _ = reference(idx[:, :8])
            ref_step, _ = reference(idx)
        out[name] = dict(
            prompt=(prompt_logits - ref_prompt).abs().max().item(), step=(step_logits - ref_step).abs().max().item(),
            spread=spread_over_ranks(step_logits), step_counts=comm_counts(step_mode)["forward"]["Global"],
        )
    return out


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_overlap_matches_single_device(tp):
    config = small_config()
    L = config.n_layer
    r = run_distributed(overlap_against_single_device, tp, config)
    for name in ("rows", "positions"):
        run = r[name]
        assert run["logits"] < TOL and run["loss"] < TOL, name
        worst = max(run["grads"], key=run["grads"].get)
        assert run["grads"][worst] < TOL, f"{name}: gradient of {worst} differs by {run['grads'][worst]}"
        assert len(run["grads"]) == len(list(GPT(config).parameters()))
        assert run["spread"] == 0, "every rank has the same loss"
        # megatron's 2 per block, once per chunk; wte's; loss_parallel's 3. Backward: 2 per block per chunk, ln_f's
        assert run["forward"] == {"all_reduce": 2 * L * CHUNKS + 1 + 3}, name
        assert run["backward"] == {"all_reduce": 2 * L * CHUNKS + 1}, name
    for name in ("decode rows", "decode one row"):
        run = r[name]
        assert run["prompt"] < TOL and run["step"] < TOL, name
        assert run["spread"] == 0, "every rank has the same logits"
    # 2 rows: 2 chunks of one row each; one row of one token: megatron's collectives exactly
    assert r["decode rows"]["step_counts"] == {"all_reduce": 2 * L * CHUNKS + 1, "all_gather_into_tensor": 1}
    assert r["decode one row"]["step_counts"] == {"all_reduce": 2 * L + 1, "all_gather_into_tensor": 1}


@pytest.mark.parametrize("kind", [dict(batch=4, seq=8, backward=True), dict(batch=2, seq=8, decode=True)])
def test_overlap_moves_megatrons_bytes_in_chunks_times_its_block_all_reduces(kind):
    """Training on rows split 2, 1, 1; a decoding step of 2 rows, one each."""
    config = small_config(n_layer=1)
    megatron = comm_report("megatron", tp=4, config=config, **kind)
    overlap = comm_report("megatron-overlap", tp=4, config=config, chunks=3, **kind)
    chunks = min(3, kind["batch"])
    block_all_reduces = 2 * config.n_layer * (2 if kind.get("backward") else 1)
    total = lambda report: sum(c["count"] for c in report["collectives"] if c["kind"] == "all_reduce")
    assert total(overlap) == total(megatron) + block_all_reduces * (chunks - 1)
    assert overlap["wire_bytes_per_token"] == pytest.approx(megatron["wire_bytes_per_token"])
    assert overlap["block_wire_bytes_per_token"] == pytest.approx(megatron["block_wire_bytes_per_token"])
    assert overlap["above_minimum"] == megatron["above_minimum"]


def test_cli_reports_both_plans(capsys):
    """One row of 7 positions in 4 chunks: 2, 2, 2 and 1 positions."""
    assert main(["--plan", "megatron", "megatron-overlap", "--chunks", "4", "--tp", "2", "--seq", "7", "--n-layer", "1"]) == 0
    megatron, overlap = capsys.readouterr().out.split("\n\n")
    assert overlap.startswith("plan megatron-overlap") and "blocks in 4 chunks" in overlap
    assert "every collective is at the plan's minimum" in megatron and "every collective is at the plan's minimum" in overlap
    rows = lambda report: sorted((int(line.split()[3]), int(line.split()[4].replace(",", "")))
                                 for line in report.splitlines() if line.startswith("transformer.h.0.attn.c_proj"))
    position = 96 * 4  # one position's fp32 activation in the tiny config
    assert rows(megatron) == [(1, 7 * position)] and rows(overlap) == [(1, position), (3, 2 * position)]
    total = lambda report: next(line for line in report.splitlines() if line.startswith("wire bytes per token"))
    assert total(megatron) == total(overlap)
