"""Text data for training, as nanoGPT's shakespeare_char and openwebtext prepare it."""

import torch

from dtensor_gpt.tokenizers import CharTokenizer


class TextData:
    """
    A text file as token ids: first 90% for training, last 10% for validation. Without a
    tokenizer, the vocabulary is the file's sorted characters.
    """

    def __init__(self, path, tokenizer=None):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text (byte {e.start:,} is {e.object[e.start:e.start + 1]!r}); "
                             f"give a text file to train on") from None
        except OSError as e:
            raise ValueError(f"{path} cannot be read ({e.strerror})") from None
        if not text:
            raise ValueError(f"{path} is empty; give a text file to train on")
        self.tokenizer = tokenizer or CharTokenizer(sorted(set(text)))
        self.vocab_size = self.tokenizer.vocab_size
        ids = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]

    def batch(self, split, batch_size, block_size, generator):
        """Random (inputs, targets) windows of `block_size`, shifted by one."""
        data = self.train if split == "train" else self.val
        if len(data) <= block_size:
            raise ValueError(f"the {split} split has {len(data)} tokens, too few for block_size={block_size}")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + block_size] for i in starts])
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in starts])
        return x, y

    def windows(self, split, block_size):
        """
        Every consecutive `block_size` window of a split, in order, as (inputs, targets): the
        positions random batches sample, each once, so a loss over them has no sampling noise.
        """
        data = self.train if split == "train" else self.val
        n = (len(data) - 1) // block_size
        return data[:n * block_size].view(n, block_size), data[1:n * block_size + 1].view(n, block_size)


@torch.no_grad()
def mean_loss(model, inputs, targets, rows=64):
    """The model's mean loss over (inputs, targets) windows, `rows` windows per forward."""
    total = sum(model(x, y)[1].item() * len(x) for x, y in zip(inputs.split(rows), targets.split(rows)))
    return total / len(inputs)
