"""Training: tensor-parallel runs follow the single-process loss curve."""

import sys
from pathlib import Path

import pytest

from distributed import run_distributed

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _losses(rank, world_size, plan):
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    args = parse_args(["--data", str(DATA), "--plan", plan, "--n-layer", "2", "--n-head", "4", "--n-embd", "64",
                       "--block-size", "32", "--batch-size", "4", "--max-iters", "20", "--warmup-iters", "5",
                       "--eval-interval", "1000", "--eval-iters", "2"])
    _, _, losses, evaluation = train(args, init_device_mesh("cpu", (world_size,)), say=lambda *a: None)
    return losses, evaluation


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data/tinyshakespeare.txt")
@pytest.mark.parametrize("plan", ["megatron", "megatron-sp"])
def test_tp2_follows_tp1_for_20_steps(plan):
    single, _ = run_distributed(_losses, 1, "megatron")
    parallel, evaluation = run_distributed(_losses, 2, plan)
    assert len(single) == len(parallel) == 20
    assert single[-1] < single[0] - 0.5, "the loss must actually fall for the comparison to mean anything"
    worst = max(abs(a - b) for a, b in zip(single, parallel))
    assert worst < 1e-4, f"TP=2 ({plan}) departs from TP=1 by {worst}"
