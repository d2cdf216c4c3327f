"""Small helpers shared by the tests: a tiny config, comparisons, collective counts."""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dtensor_gpt import GPTConfig

# n_head=12 and vocab 96 are divisible by every TP degree under test (1, 2, 3, 4)
SMALL = dict(block_size=32, vocab_size=96, n_layer=2, n_head=12, n_embd=96)


def small_config(**overrides):
    return GPTConfig(**{**SMALL, **overrides})


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_grad_errors(model, reference):
    """Largest |grad - reference grad| per parameter name."""
    ref = dict(reference.named_parameters())
    return {
        name: (full(p.grad) - ref[name].grad).abs().max().item()
        for name, p in model.named_parameters()
    }


def local_parameter_bytes(model):
    """Bytes this rank holds for the model's parameters (a tied parameter once)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        for p in model.parameters()
    )


def comm_counts(mode):
    """{module path: {collective: count}} for forward and backward from a CommDebugMode."""
    out = {}
    for fqn, phases in mode.comm_module_counts.items():
        name = fqn.split(".", 1)[1] if "." in fqn else fqn
        for phase, counts in phases.items():
            out.setdefault(phase, {})[name] = {str(k).split(".")[-1].strip("')"): v for k, v in counts.items() if v}
    return out


@contextlib.contextmanager
def fake_process_group(world_size):
    """One process that plays `world_size` ranks: exact collective counts, no real data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
