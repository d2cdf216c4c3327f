"""
A nanoGPT run's own validation loss, and the plugin's on the same ckpt.pt at TP 1, 2 and 4.

    python benchmarks/nanogpt_import.py --data ../shared/data/tinyshakespeare.txt --nanogpt ../shared/nanogpt [--max-iters 2000]

Trains nanoGPT's CPU shakespeare_char model with nanoGPT's own train.py and model.py (copied
into --dir with its prepare.py, which encodes the text), then evaluates the ckpt.pt it saves
on the whole validation split (every consecutive 64-character window): with nanoGPT's
model.py, the source, and with this project's GPT read straight from the ckpt.pt, `megatron`
at TP 1, 2 and 4, the loss computed on gathered logits and with `loss_parallel`.
"""

import argparse
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402
from machine import machine_line  # noqa: E402


def train_with_nanogpt(nanogpt, data, work, max_iters):
    """nanoGPT's README command for its CPU shakespeare_char run, in a copy of nanoGPT."""
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(os.path.join(nanogpt, name), os.path.join(work, name))
    shutil.copytree(os.path.join(nanogpt, "config"), os.path.join(work, "config"), dirs_exist_ok=True)
    prepared = os.path.join(work, "data", "shakespeare_char")
    os.makedirs(prepared, exist_ok=True)
    shutil.copy(os.path.join(nanogpt, "data", "shakespeare_char", "prepare.py"), prepared)
    shutil.copy(data, os.path.join(prepared, "input.txt"))
    subprocess.run([sys.executable, "prepare.py"], cwd=prepared, check=True, capture_output=True)
    command = [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=20", "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4",
               "--n_head=4", "--n_embd=128", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
               f"--eval_interval={min(250, max_iters)}", "--dropout=0.0", "--out_dir=out"]
    log = subprocess.run(command, cwd=work, check=True, capture_output=True, text=True).stdout
    print("nanoGPT:", [line for line in log.splitlines() if line.startswith("step ")][-1], flush=True)
    return os.path.join(work, "out", "ckpt.pt")


def nanogpt_loss(nanogpt, ckpt, data):
    sys.path.insert(0, nanogpt)
    import model as theirs

    from dtensor_gpt.data import TextData, mean_loss

    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = theirs.GPT(theirs.GPTConfig(**saved["model_args"]))
    model.load_state_dict(saved["model"])
    return mean_loss(model.eval(), *TextData(data).windows("val", saved["model_args"]["block_size"]))


def _plugin_loss(rank, world_size, ckpt, data, loss_parallel):
    import contextlib

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel as sharded_loss

    from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize
    from dtensor_gpt.data import TextData, mean_loss
    from dtensor_gpt.sources import open_source

    config = GPTConfig(**{f: open_source(ckpt).config[f] for f in GPTConfig.__dataclass_fields__})
    with torch.device("meta"):
        model = parallelize(GPT(config), init_device_mesh("cpu", (world_size,)), "megatron", loss_parallel=loss_parallel)
    load_checkpoint(model, ckpt)
    with sharded_loss() if loss_parallel else contextlib.nullcontext():
        return mean_loss(model.eval(), *TextData(data).windows("val", config.block_size))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--nanogpt", required=True, help="a directory holding nanoGPT's train.py, model.py, ...")
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--dir", default=os.path.join(HERE, "out", "nanogpt_import"))
    args = parser.parse_args()
    print(machine_line(), flush=True)
    os.makedirs(args.dir, exist_ok=True)
    ckpt = train_with_nanogpt(os.path.abspath(args.nanogpt), os.path.abspath(args.data), args.dir, args.max_iters)
    source = nanogpt_loss(os.path.abspath(args.nanogpt), ckpt, args.data)
    print(f"\nwhole validation split, {args.max_iters}-iteration nanoGPT model (65 characters)\n")
    print("| evaluated by | val loss | difference from nanoGPT |")
    print("|---|---|---|")
    print(f"| nanoGPT's model.py | {source:.6f} | |")
    for tp in (1, 2, 4):
        for loss_parallel in (False, True):
            loss = run_distributed(_plugin_loss, tp, ckpt, args.data, loss_parallel)
            how = "loss_parallel" if loss_parallel else "gathered logits"
            print(f"| dtensor_gpt, megatron, TP={tp}, {how} | {loss:.6f} | {loss - source:+.1e} |", flush=True)


if __name__ == "__main__":
    main()
