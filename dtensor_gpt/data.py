"""Character-level text data, as nanoGPT's shakespeare_char prepares it."""

import torch


class CharData:
    """
    A text file as character ids: vocabulary from the file (sorted characters), first 90%
    for training, last 10% for validation. `pad_to` rounds the vocabulary size up so a TP
    degree divides it; the padding ids never occur in the data.
    """

    def __init__(self, path, pad_to=1):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text:
            raise ValueError(f"{path} is empty; give a text file to train on")
        self.chars = sorted(set(text))
        self.vocab_size = -(-len(self.chars) // pad_to) * pad_to
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        ids = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(ids))
        self.train, self.val = ids[:n], ids[n:]

    def encode(self, s):
        unknown = sorted(set(s) - set(self.stoi))
        if unknown:
            raise ValueError(f"characters {unknown} are not in the vocabulary of the training text")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))

    def batch(self, split, batch_size, block_size, generator):
        """Random (inputs, targets) windows of `block_size`, shifted by one."""
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + block_size] for i in starts])
        y = torch.stack([data[i + 1:i + 1 + block_size] for i in starts])
        return x, y
