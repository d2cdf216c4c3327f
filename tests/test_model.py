"""The single-device model is nanoGPT: sizes, initialization, tying, and no parallelism."""

import math
import re
from pathlib import Path

import pytest
import torch

from dtensor_gpt import GPT, GPTConfig

MODEL_SOURCE = Path(__file__).resolve().parents[1] / "dtensor_gpt" / "model.py"


def test_gpt2_small_size_and_initial_loss(capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig())
    assert "number of parameters: 123.69M" in capsys.readouterr().out
    # 124,439,808 parameters of HF GPT-2 minus 1024x768 position embeddings, plus 47 padded vocab rows
    assert model.get_num_params() == 124_439_808 - 1024 * 768 + 47 * 768
    idx = torch.randint(0, 50304, (1, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = model(idx, targets=idx)
    assert logits.shape == (1, 1024, 50304)
    assert 9.7 < loss.item() < 10.1


def test_initialization_follows_nanogpt():
    torch.manual_seed(0)
    config = GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=512, block_size=64)
    model = GPT(config)
    std = dict(model.named_parameters())
    assert std["transformer.h.0.attn.c_attn.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert std["transformer.h.0.mlp.c_proj.weight"].std().item() == pytest.approx(
        0.02 / math.sqrt(2 * config.n_layer), rel=0.02
    )
    assert std["transformer.h.0.attn.c_attn.bias"].abs().max().item() == 0.0
    assert model.lm_head.weight is model.transformer.wte.weight


def test_inference_returns_last_position_only():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8))
    idx = torch.randint(0, 32, (3, 8))
    logits, loss = model(idx)
    full, _ = model(idx, targets=idx)
    assert loss is None and logits.shape == (3, 1, 32)
    torch.testing.assert_close(logits[:, 0], full[:, -1])


def test_model_source_knows_nothing_of_parallelism():
    source = MODEL_SOURCE.read_text()
    forbidden = r"torch\.distributed|DTensor|device_mesh|get_rank|tp_size|world_size|local_heads|n_local"
    assert not re.search(forbidden, source)
    assert "self.c_attn(x).split(self.n_embd, dim=2)" in source
    assert "view(B, T, self.n_head, C // self.n_head)" in source
