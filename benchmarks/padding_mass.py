"""
What padding the vocabulary (so TP degrees divide it) costs a trained character model.

    python benchmarks/padding_mass.py --data ../shared/data/tinyshakespeare.txt CHECKPOINT [CHECKPOINT ...]

The padding ids never occur in the data, so training pushes their probability down but never
to zero: the mass the model still gives them, averaged over every window of the validation
split, is what the padded model loses against one with exactly the corpus's characters.
"""

import argparse
import json
import os

import torch

from dtensor_gpt import GPT, GPTConfig, load_checkpoint
from dtensor_gpt.data import TextData


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    for path in args.checkpoints:
        with open(os.path.join(path, "index.json")) as f:
            index = json.load(f)
        model = GPT(GPTConfig(**index["config"])).eval()
        load_checkpoint(model, path)
        real = index["vocab_size_unpadded"]
        x, y = TextData(args.data, pad_to=model.config.vocab_size).windows("val", model.config.block_size)
        mass = 0.0
        with torch.no_grad():
            for i in range(0, len(x), 64):
                mass += model(x[i:i + 64], y[i:i + 64])[0].softmax(-1)[..., real:].sum().item()
        mass /= x.numel()
        print(f"{path}: {model.config.vocab_size - real} padding ids hold {mass:.2e} of the probability, "
              f"a loss of {-torch.log1p(torch.tensor(-mass)).item():.2e} nats per character")


if __name__ == "__main__":
    main()
