"""
Bytes each rank reads when loading a checkpoint, against what it holds.

    python benchmarks/load_bytes.py [--config gpt2] [--tp 1 2 4]

Saves a random model as a TP=1 checkpoint, then loads it into the model parallelized at each
TP degree in one process over torch's fake process group (loading is local reads, so the
byte counts are those of a real job).
"""

import argparse
import contextlib
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from dtensor_gpt import GPT, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt.configs import config_by_name
from machine import machine_line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="gpt2")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    print(machine_line(), flush=True)
    config = config_by_name(args.config)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(None):
        torch.manual_seed(0)
        save_checkpoint(GPT(config), f"{tmp}/ckpt")
        rows = []
        for tp in args.tp:
            dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
            with torch.device("meta"):
                model = parallelize(GPT(config), init_device_mesh("cpu", (tp,)))
            read = load_checkpoint(model, f"{tmp}/ckpt")["bytes_read"]
            held = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
            rows.append((tp, read, held))
            dist.destroy_process_group()
    print(f"| {args.config}: TP | bytes read per rank | parameter bytes held per rank |")
    print("|---|---|---|")
    for tp, read, held in rows:
        print(f"| {tp} | {read:,} | {held:,} |")


if __name__ == "__main__":
    main()
