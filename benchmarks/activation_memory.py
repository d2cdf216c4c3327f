"""
Activation bytes each rank saves for backward, megatron against megatron-sp.

    python benchmarks/activation_memory.py [--config gpt2] [--seq TOKENS] [--tp 2 4]

One process plays every rank over torch's fake process group: saved tensors have the
shapes of a real job (their values are not computed), so the bytes are exact.
"""

import argparse
import contextlib
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from dtensor_gpt import GPT, init_weights, parallelize
from dtensor_gpt.configs import config_by_name
from dtensor_gpt.memory import saved_activation_bytes
from machine import machine_line


def part(module):
    last = module.split(".")[-1]
    if last in ("ln_1", "ln_2", "ln_f", "drop") or last.endswith("dropout"):
        return "LayerNorm/dropout/residual"
    if module.startswith("transformer.h."):
        return "attention and MLP"
    return "embedding, head, loss"


def measure(config, plan, tp, seq):
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        with contextlib.redirect_stdout(None), torch.device("meta"):
            model = GPT(config)
        parallelize(model, init_device_mesh("cpu", (tp,)), plan, loss_parallel=True)
        init_weights(model)
        idx = torch.randint(0, config.vocab_size, (1, seq))
        with loss_parallel():
            saved = saved_activation_bytes(model, idx, idx)
    finally:
        dist.destroy_process_group()
    totals = {}
    for module, size in saved.items():
        totals[part(module)] = totals.get(part(module), 0) + size
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--seq", type=int, help="tokens in the row (default: the config's block_size)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print(machine_line(), flush=True)
    warnings.filterwarnings("ignore")
    config = config_by_name(args.config)
    if args.seq is None:
        args.seq = config.block_size
    if not 1 <= args.seq <= config.block_size:
        parser.error(f"--seq {args.seq} is outside 1..{config.block_size}, the block_size of config {args.config!r}")
    print(f"| part (MiB per rank, {args.config}, batch 1, seq {args.seq}) | "
          + " | ".join(f"{p} TP={tp}" for tp in args.tp for p in ("megatron", "megatron-sp")) + " |")
    columns = [measure(config, plan, tp, args.seq) for tp in args.tp for plan in ("megatron", "megatron-sp")]
    print("|---|" + "---|" * len(columns))
    for name in ("LayerNorm/dropout/residual", "attention and MLP", "embedding, head, loss"):
        print(f"| {name} | " + " | ".join(f"{c.get(name, 0) / 2**20:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
