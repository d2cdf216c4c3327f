"""Tensor-parallel nanoGPT on DTensor: an unchanged model, declarative plans."""

from dtensor_gpt.checkpoint import load_checkpoint, save_checkpoint
from dtensor_gpt.decoding import compile_decoding
from dtensor_gpt.materialize import init_weights
from dtensor_gpt.model import GPT, GPTConfig
from dtensor_gpt.parallelize import parallelize

__all__ = ["GPT", "GPTConfig", "parallelize", "compile_decoding", "init_weights", "save_checkpoint",
           "load_checkpoint"]
