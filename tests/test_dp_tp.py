"""dp=2 x tp=2 (FSDP2 over the tensor-parallel model) against dp=1 x tp=2: one step, and its collectives."""

import sys
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from distributed import run_distributed
from dtensor_gpt import GPTConfig
from dtensor_gpt.layout import tp_local
from plans import PLANS

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=40, bias=True, dropout=0.0)
BATCH = 4  # global rows: 2 per data-parallel rank at dp=2
MICRO_BATCHES = 2  # the LayerNorms' partial gradients must also accumulate exactly


class Collectives(TorchDispatchMode):
    """
    The collectives issued, by issuer: FSDP2 calls c10d ops ("fsdp"), DTensor functional
    collectives ("dtensor"). CommDebugMode sees the same ops, but its module tracker fails
    under FSDP2's hooks.
    """

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0].strip("_")
        if func.namespace == "c10d":
            self.counts["fsdp " + name] += 1
        elif func.namespace == "_c10d_functional" and name not in ("wait_tensor", "wrap_tensor_autograd"):
            self.counts["dtensor " + name] += 1
        return func(*args, **(kwargs or {}))


def _step(model, optimizer, dp, batches):
    """
    One step of examples/train.py's loop, clipping aside: each parameter's TP shard (gathered
    over dp) of its gradient and of its value after AdamW, and the step's collectives.
    """
    with Collectives() as step:
        for x, y in batches:
            with loss_parallel():
                _, loss = model(*dp.rows(x, y))
                (loss / len(batches)).backward()
    grads = {n: tp_local(p.grad) for n, p in model.named_parameters()}
    with Collectives() as adamw:
        optimizer.step()
    return grads, {n: tp_local(p) for n, p in model.named_parameters()}, step.counts, sum(adamw.counts.values())


def _worst(ours, reference):
    """The largest difference on any rank (a collective: every rank calls it)."""
    worst = torch.tensor(max((ours[n] - t).abs().max().item() for n, t in reference.items()))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return worst.item()


def _dp_against_tp(rank, world_size):
    """
    On a (dp=2, tp=2) mesh each "tp" row first runs dp=1 x tp=2 on the whole batch, then all
    4 ranks run dp=2 x tp=2. FSDP2 keeps chunk d of dim 0 of the TP shard on dp rank d;
    comparing TP shards, rank by rank, compares the full tensors (DTensor's full_tensor()
    misassembles the nested strided placement of c_attn under FSDP2 in torch 2.13).
    """
    sys.path.insert(0, str(ROOT / "examples"))
    from train import DataParallel, build, parse_args

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, CONFIG.vocab_size, (BATCH, CONFIG.block_size + 1), generator=generator)
              for _ in range(MICRO_BATCHES)]
    batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    out = {}
    for plan in PLANS:
        runs = []
        for dp, run_mesh in ((1, mesh["tp"]), (2, mesh)):
            args = parse_args(["--data", __file__, "--plan", plan, "--dp", str(dp), "--batch-size", str(BATCH)])
            model, optimizer = build(args, CONFIG, run_mesh)
            runs.append(_step(model, optimizer, DataParallel(run_mesh), batches))
        (grads, params, counts, _), (dp_grads, dp_params, dp_counts, adamw) = runs
        out[plan] = dict(grads=_worst(dp_grads, grads), params=_worst(dp_params, params),
                         counts=counts, dp_counts=dp_counts, adamw=adamw)
    return out


def test_dp2_tp2_matches_dp1_tp2_for_every_plan():
    """
    FSDP2 adds its own collectives over dp: per micro-batch an all-gather of each block in
    forward and again in backward, and of the root (wte, wpe, ln_f) once, kept for backward;
    a reduce-scatter of each block's and the root's gradients. DTensor's collectives over tp
    stay those of dp=1, but for megatron-sp's LayerNorm gradients: FSDP2 reduces each
    `Partial` one itself, an all-reduce per parameter, where dp=1 reduces them all in one
    (dtensor_gpt.partial_grads). AdamW communicates nothing.
    """
    r = run_distributed(_dp_against_tp, 4)
    L = CONFIG.n_layer
    layer_norm_parameters = 2 * (2 * L + 1)  # ln_1, ln_2 per block and ln_f; weight and bias
    for plan, result in r.items():
        assert result["grads"] < TOL, f"{plan}: dp=2 gradients differ from dp=1 by {result['grads']}"
        assert result["params"] < TOL, f"{plan}: dp=2 parameters after AdamW differ from dp=1 by {result['params']}"
        expected = dict(result["counts"])
        expected.update({"fsdp allgather_base": MICRO_BATCHES * (2 * L + 1), "fsdp reduce_scatter_base": MICRO_BATCHES * (L + 1)})
        if plan == "megatron-sp":
            assert result["counts"]["dtensor all_reduce"] == MICRO_BATCHES  # one per backward at dp=1
            expected["dtensor all_reduce"] = MICRO_BATCHES * layer_norm_parameters
        assert result["dp_counts"] == expected, plan
        assert result["adamw"] == 0
