"""Training at nanoGPT's speed settings: --compile and --dtype, at TP 1 and 2."""

import sys
from pathlib import Path

import pytest

from distributed import run_distributed
from helpers import write_text
from test_train import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    write_text(path, words=8)
    return str(path)


def _eager_and_compiled(rank, world_size, data):
    """
    20 steps eager and compiled, at TP=1 (each rank alone, on its own 1-rank mesh) and TP=2,
    in one job so that the processes start once.
    """
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    meshes = {1: init_device_mesh("cpu", (2, 1), mesh_dim_names=("rank", "tp"))["tp"], 2: init_device_mesh("cpu", (2,))}
    out = {}
    for tp, mesh in meshes.items():
        for flags in ([], ["--compile"]):
            args = parse_args(["--data", data, "--max-iters", "20", *TINY, *flags])
            out[tp, bool(flags)] = train(args, mesh, say=lambda *a: None)[4]
    return out


def test_compiled_blocks_train_as_eager_ones(data):
    losses = run_distributed(_eager_and_compiled, 2, data)
    for tp in (1, 2):
        eager, compiled = losses[tp, False], losses[tp, True]
        assert len(eager) == 20 and eager[-1] < eager[0] - 0.5
        worst = max(abs(a - b) for a, b in zip(eager, compiled))
        assert worst < 1e-5, f"compiled blocks at TP={tp} depart from eager ones by {worst}"
