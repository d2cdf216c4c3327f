"""TextData: nanoGPT's 90/10 split, padded vocabulary, random batches and in-order windows."""

import torch

from dtensor_gpt.data import TextData


def test_split_vocabulary_and_windows(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 5) for i in range(1000))  # 5 characters, 900 train / 100 val
    (tmp_path / "t.txt").write_text(text)
    data = TextData(str(tmp_path / "t.txt"), pad_to=4)
    assert data.vocab_size == 8 and data.tokenizer.vocab_size == 5
    assert data.tokenizer.decode(data.train.tolist()) == text[:900]
    assert data.tokenizer.decode(data.val.tolist()) == text[900:]
    x, y = data.windows("val", 8)
    assert x.shape == y.shape == (12, 8)  # (100 - 1) // 8 windows; the last target is position 96
    assert data.tokenizer.decode(x.flatten().tolist()) == text[900:996]
    assert data.tokenizer.decode(y.flatten().tolist()) == text[901:997]
    x, y = data.batch("train", 3, 8, torch.Generator().manual_seed(0))
    assert x.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])
