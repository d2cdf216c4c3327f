"""TextData: nanoGPT's 90/10 split, the file's own vocabulary, random batches and in-order windows."""

import torch

from dtensor_gpt.data import TextData


def test_split_vocabulary_and_windows(tmp_path):
    text = "".join(chr(ord("a") + (i * 7) % 5) for i in range(1000))  # 5 characters, 900 train / 100 val
    (tmp_path / "t.txt").write_text(text)
    data = TextData(str(tmp_path / "t.txt"))
    assert data.vocab_size == data.tokenizer.vocab_size == 5
    assert data.tokenizer.decode(data.train.tolist()) == text[:900]
    assert data.tokenizer.decode(data.val.tolist()) == text[900:]
    x, y = data.windows("val", 8)
    assert x.shape == y.shape == (12, 8)  # (100 - 1) // 8 windows; the last target is position 96
    assert data.tokenizer.decode(x.flatten().tolist()) == text[900:996]
    assert data.tokenizer.decode(y.flatten().tolist()) == text[901:997]
    x, y = data.batch("train", 3, 8, torch.Generator().manual_seed(0))
    assert x.shape == (3, 8) and torch.equal(x[:, 1:], y[:, :-1])


def test_mean_loss_weights_every_window_alike():
    from dtensor_gpt import GPT, GPTConfig
    from dtensor_gpt.data import mean_loss

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11)).eval()
    x = torch.randint(0, 11, (70, 8), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 11, (70, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(x, y)[1].item()
    assert abs(mean_loss(model, x, y, rows=64) - whole) < 1e-6  # one full chunk and one of 6 windows
