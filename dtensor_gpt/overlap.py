"""
`OverlappedBlock`: a Megatron block whose all-reduces run while the block computes.

A row-parallel `c_proj` issues its all-reduce as a functional collective: the call returns at
once, the process group (gloo's own threads, NCCL's stream) moves the data, and the result is
waited for only where it is first used. A block run whole uses each sum at once
(`x + attn(...)`), so nothing computes while it flies. Here the block's work is split into
chunks, rows of the batch, or positions of the sequence (for one row, or a prompt written
into a KV cache), and the block's own submodules run in the order

    attn(chunk 0), attn(chunk 1), ...      chunk i's sum flies during chunk i+1's attention
    mlp(chunk 0), mlp(chunk 1), ...        the last attention sum during mlp(chunk 0), chunk i's MLP sum during mlp(i+1)
    the chunks' outputs, concatenated      only the last MLP sum is waited for with nothing left to do

Each chunk is the block's own arithmetic on its rows or positions, so the result is the
model's; the same bytes cross the wire in `chunks` times as many all-reduces. A later
sequence chunk's attention reads the earlier chunks' keys and values through the attention's
own cache path. One row of one token has nothing to split and runs the block whole. The
backward issues the same chunked all-reduces (each chunk's input gradient is summed); the
order autograd runs them in is its own, not arranged here for overlap.
"""

import functools
import itertools
import types

import torch
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from dtensor_gpt.model import LayerCache


class OverlappedBlock(ParallelStyle):
    """
    A nanoGPT `Block` sharded by `block_styles` (a plan for its submodules, e.g. megatron's),
    its forward run in `chunks` chunks whose all-reduces overlap the next chunk's compute.

    Example::
        >>> parallelize_module(model, tp_mesh, {"transformer.h.*": OverlappedBlock(megatron.block(), chunks=2)})
    """

    def __init__(self, block_styles, chunks=2):
        super().__init__()
        self.block_styles, self.chunks = block_styles, chunks

    def _apply(self, block, device_mesh):
        parallelize_module(block, device_mesh, self.block_styles)
        block.forward = types.MethodType(functools.partial(_overlapped_forward, chunks=self.chunks), block)
        return block


def chunk_sizes(n, chunks):
    """`n` rows or positions in min(chunks, n) chunks, as even as they go (the first ones one longer)."""
    k = min(chunks, n)
    return [n // k + (i < n % k) for i in range(k)]


def _overlapped_forward(block, x, cache=None, *, chunks):
    split = _chunks(x, cache, chunks)
    if split is None:
        return type(block).forward(block, x, cache=cache)
    dim, parts = split
    attended = [(x_i, block.attn(block.ln_1(x_i), cache=layer)) for x_i, layer in parts]
    mixed = []
    for x_i, a_i in attended:
        h = x_i + a_i
        mixed.append((h, block.mlp(block.ln_2(h))))
    return torch.cat([h + m for h, m in mixed], dim)


def _chunks(x, layer, chunks):
    """
    (dim, [(chunk of x, the cache its attention goes through)]), or None to run the block
    whole. Rows when there are several and no prompt to cache (a prompt's first write makes
    the cache whole), else positions. A cache is written in place, which autograd cannot go
    through, so with one the block is split only without autograd (generation).
    """
    B, T, _ = x.shape
    rows = B > 1 and (layer is None or (T == 1 and layer.k is not None))
    sizes = chunk_sizes(B if rows else T, chunks)
    if len(sizes) < 2 or (layer is not None and torch.is_grad_enabled()):
        return None
    ends = list(itertools.accumulate(sizes))
    spans = list(zip([0] + ends[:-1], ends))
    if rows:
        return 0, [(x[s:e], None if layer is None else _rows(layer, s, e)) for s, e in spans]
    layer = layer or _Prefix(T, x.device)
    return 1, [(x[:, s:e], _Positions(layer, s, e)) for s, e in spans]


def _rows(layer, start, end):
    """The rows start..end of a written cache: views, so writing them writes the cache."""
    rows = LayerCache(layer.length)
    rows.k, rows.v, rows.pos, rows.mask = layer.k[start:end], layer.v[start:end], layer.pos, layer.mask
    return rows


class _Positions:
    """The cache path of positions start..end of this forward: the queries of those, the keys up to end."""

    def __init__(self, layer, start, end):
        self.layer, self.start, self.end = layer, start, end

    def update(self, k, v):
        layer = self.layer
        pos, mask = layer.pos, layer.mask
        layer.pos, layer.mask = pos[self.start:self.end], mask[self.start:self.end]
        try:
            return layer.update(k, v)
        finally:
            layer.pos, layer.mask = pos, mask


class _Prefix:
    """The keys and values of this forward's chunks so far, concatenated (autograd goes through)."""

    def __init__(self, t, device):
        self.k = self.v = None
        self.pos = torch.arange(t, device=device)
        self.mask = self.pos <= self.pos[:, None]

    def update(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], 2)
        self.v = v if self.v is None else torch.cat([self.v, v], 2)
        return self.k, self.v, self.mask[:, : self.k.size(2)]
