"""
What compressed sums cost in accuracy: validation loss and greedy tokens of `compress="bf16"`
and `"int8"` against the exact `megatron` plan, beside `spd`, on two trained character models.

    python benchmarks/compress_accuracy.py --data ../shared/data/tinyshakespeare.txt [--tp 2] [--windows 256]

The models: the shipped one (examples/models/shakespeare_char, 4 layers, n_embd 128, 0.8M
parameters) and a larger one (6 layers, 6 heads, n_embd 192, 2.7M parameters), which
examples/train.py trains first if --large does not hold it (one process, nanoGPT's CPU
settings otherwise, 2000 iterations):

    python examples/train.py --data ../shared/data/tinyshakespeare.txt --n-layer 6 --n-head 6 --n-embd 192 \\
        --out benchmarks/out/shakespeare_char_6x192 --always-save-checkpoint

Each variant runs at --tp over spawned gloo processes and is measured on the same data:
- the mean loss over --windows validation windows of block_size characters, evenly spaced
  over the split (0: every window of the split);
- greedy decoding (KV cache) of --tokens tokens from --prompts prompts (16 characters of
  validation text at evenly spaced places), against the exact plan's: rows equal all the way,
  the median tokens before a row's first difference, and tokens equal at the same place.
int8 is measured with one scale per 32 values (dtensor_gpt.compress.BLOCK) and, to show why
that block, per 128 values (a row of the shipped model).
"""

import argparse
import json
import os
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from distributed import run_distributed  # noqa: E402
from machine import machine_line  # noqa: E402

SHIPPED = os.path.join(HERE, "..", "examples", "models", "shakespeare_char")
LARGE = os.path.join(HERE, "out", "shakespeare_char_6x192")
LARGE_FLAGS = ["--n-layer", "6", "--n-head", "6", "--n-embd", "192"]
# label, plan, plan options, int8 block size
VARIANTS = [
    ("megatron (exact)", "megatron", {}, None),
    ("megatron, bf16 sums", "megatron", dict(compress="bf16"), None),
    ("megatron, int8 sums (32 a scale)", "megatron", dict(compress="int8"), 32),
    ("megatron, int8 sums (128 a scale)", "megatron", dict(compress="int8"), 128),
    ("spd, last half of the blocks", "spd", dict(spd_blocks="last-half"), None),
    ("spd, all blocks", "spd", dict(spd_blocks="all"), None),
]


def _measure(rank, world_size, path, inputs, targets, prompts, tokens):
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import GPT, GPTConfig, compress, load_checkpoint, parallelize
    from dtensor_gpt.data import mean_loss

    with open(os.path.join(path, "index.json")) as f:
        config = GPTConfig(**json.load(f)["config"])
    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for label, plan, options, block in VARIANTS:
        if options.get("spd_blocks") == "last-half":
            options = dict(spd_blocks=f"last:{config.n_layer // 2}")
        compress.BLOCK = block or 32
        model = parallelize(GPT(config), mesh, plan, **options).eval()
        load_checkpoint(model, path)
        results[label] = dict(loss=mean_loss(model, inputs, targets),
                              greedy=model.generate(prompts, tokens, top_k=1)[:, prompts.size(1):])
    return config, results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--large", default=LARGE, help="the larger model; trained there first if missing")
    parser.add_argument("--models", default="shipped,large", help="which of the two models to measure")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--windows", type=int, default=256, help="validation windows (0: all)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=100)
    args = parser.parse_args()
    print(machine_line(), flush=True)
    models = {"shipped": ("shipped, 0.8M", SHIPPED), "large": ("6x192, 2.7M", args.large)}
    models = [models[m] for m in args.models.split(",")]
    if "large" in args.models and not os.path.exists(args.large):
        subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "train.py"), "--data", args.data,
                        *LARGE_FLAGS, "--out", args.large, "--always-save-checkpoint"], check=True)
    from dtensor_gpt.data import TextData
    from dtensor_gpt.tokenizers import CharTokenizer

    print(f"TP={args.tp}; loss over {args.windows or 'all'} validation windows; greedy: {args.prompts} prompts x "
          f"{args.tokens} tokens against megatron's (exact)\n")
    print("| model | variant | val loss | minus exact | greedy rows equal all the way | median tokens before a "
          "difference | tokens equal at the same place |")
    print("|---|---|---|---|---|---|---|")
    for name, path in models:
        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        data = TextData(args.data, CharTokenizer(index["extra"]["chars"]))
        inputs, targets = data.windows("val", index["config"]["block_size"])
        if args.windows:
            keep = torch.linspace(0, len(inputs) - 1, args.windows).long()
            inputs, targets = inputs[keep], targets[keep]
        starts = torch.linspace(0, len(data.val) - 16, args.prompts).long()
        prompts = torch.stack([data.val[s:s + 16] for s in starts])
        config, results = run_distributed(_measure, args.tp, path, inputs, targets, prompts, args.tokens)
        exact = results["megatron (exact)"]
        for label, r in results.items():
            equal = r["greedy"] == exact["greedy"]
            first = torch.where(equal.all(1), args.tokens, (~equal).int().argmax(1)).median().item()
            print(f"| {name} | {label} | {r['loss']:.4f} | {r['loss'] - exact['loss']:+.5f} | "
                  f"{equal.all(1).sum().item()}/{args.prompts} | {first} | {100 * equal.float().mean().item():.1f}% |",
                  flush=True)


if __name__ == "__main__":
    main()
