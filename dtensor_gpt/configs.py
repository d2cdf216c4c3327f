"""Named model sizes, so tests, examples and tools ask for a model by name."""

from dtensor_gpt.model import GPTConfig

CONFIGS = {
    # 12 heads and a vocabulary of 96 split over every TP degree in {1, 2, 3, 4, 6, 12}
    "tiny": GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=12, n_embd=96),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    # 25 heads: TP in {1, 5, 25}; vocab padded to 50400 (divisible by 5 and 25, not 50304's 64)
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, vocab_size=50400),  # 1558M
}


def config_by_name(name, **overrides):
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known configs: {', '.join(CONFIGS)}")
    return GPTConfig(**{**vars(CONFIGS[name]), **overrides})
