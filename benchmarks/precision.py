"""
The shipped model in fp32, bf16, fp16 and int8: validation loss, and greedy tokens against fp32's.

    python benchmarks/precision.py --data ../shared/data/tinyshakespeare.txt [--prompts 16] [--tokens 200]
        [--checkpoint DIR]

One process (TP=1) loads examples/models/shakespeare_char (or --checkpoint, a character model
of this project trained on the same text) cast on load (`load_checkpoint(model, path,
dtype=...)`) and measures, in each dtype (int8: weight-only, `dtensor_gpt.int8`, with fp32
activations, and "int8, bf16 act." with bf16 ones, as examples/generate.py --dtype int8 runs):
- the loss over the whole validation split (the last 10%, every consecutive 64-character
  window), from the dtype's logits, the cross-entropy itself taken in float32 so that only
  the model's precision shows;
- greedy decoding (KV cache, then recomputed windows past block_size) of `--tokens` tokens
  from `--prompts` prompts (16 characters of validation text at evenly spaced places), as
  one batch: how many rows match fp32's all the way, how many tokens each row keeps before
  its first difference (the median over rows), and the tokens equal to fp32's at the same
  place (after a difference a row continues from another text, so this counts chance too).
"""

import argparse
import json
import os

import torch
import torch.nn.functional as F

from dtensor_gpt import GPT, GPTConfig, load_checkpoint
from dtensor_gpt.data import TextData
from dtensor_gpt.tokenizers import CharTokenizer
from machine import machine_line

DTYPES = ["fp32", "bf16", "fp16", "int8", "int8, bf16 act."]
MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "models", "shakespeare_char")


@torch.no_grad()
def validation_loss(model, inputs, targets, rows=64):
    total = 0.0
    for x, y in zip(inputs.split(rows), targets.split(rows)):
        logits, _ = model(x, y)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / targets.numel()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES[1:], choices=DTYPES[1:], help="measured beside fp32")
    parser.add_argument("--checkpoint", default=MODEL, help="a character model of this project (default: the shipped one)")
    args = parser.parse_args()
    print(machine_line(), flush=True)
    torch.set_num_threads(1)  # losses and tokens, not times: one thread holds up best on shared cores
    with open(os.path.join(args.checkpoint, "index.json")) as f:
        index = json.load(f)
    data = TextData(args.data, CharTokenizer(index["extra"]["chars"]))
    inputs, targets = data.windows("val", index["config"]["block_size"])
    starts = torch.linspace(0, len(data.val) - 16, args.prompts).long()
    prompts = torch.stack([data.val[s:s + 16] for s in starts])
    rows, reference = [], None
    for dtype in ["fp32", *args.dtypes]:
        model = GPT(GPTConfig(**index["config"])).eval()
        if dtype == "int8, bf16 act.":
            model.to(torch.bfloat16)
        load_checkpoint(model, args.checkpoint, dtype=dtype.split(",")[0])
        loss = validation_loss(model, inputs, targets)
        greedy = model.generate(prompts, args.tokens, top_k=1)[:, 16:]
        reference = greedy if reference is None else reference
        equal = greedy == reference
        whole = equal.all(dim=1).sum().item()
        first = torch.where(equal.all(dim=1), args.tokens, (~equal).int().argmax(dim=1)).median().item()
        same = equal.sum().item()
        rows.append((dtype, loss, whole, first, same))
        print(f"{dtype}: val loss {loss:.4f}; greedy: {whole}/{len(greedy)} rows as fp32's all the way, median "
              f"{first} tokens before the first difference, {same}/{greedy.numel()} tokens equal", flush=True)
    total = args.prompts * args.tokens
    print(f"\n| dtype | val loss (whole split) | greedy rows equal to fp32's ({args.prompts} x {args.tokens} tokens) "
          f"| median tokens before the first difference | tokens equal at the same place |")
    print("|---|---|---|---|---|")
    for dtype, loss, whole, first, same in rows:
        print(f"| {dtype} | {loss:.4f} | {whole}/{args.prompts} | {first} | {same}/{total} ({100 * same / total:.1f}%) |")


if __name__ == "__main__":
    main()
