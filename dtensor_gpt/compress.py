"""
Compressed sums of row-parallel partial outputs: the all-reduce after attention and after the
MLP sends bf16, or int8 with one float32 scale per BLOCK values, instead of float32.

A compressed all-reduce is two of torch.distributed's own collectives over bytes (so gloo and
NCCL move them whatever the dtype): an all-to-all gives each rank every rank's compressed copy
of one chunk of the tensor, which it decodes and sums in float32 (a reduce-scatter); it
compresses that sum and an all-gather hands every chunk to every rank, which decodes them all.
Every rank decodes the same gathered bytes, the owner of a chunk included, so the result is
bit-identical on every rank. Per rank the wire carries 2(N-1)/N of the compressed tensor: for
int8 (1 + 4/BLOCK)/4 = 0.28 of the float32 all-reduce at any TP degree N (a chunk of L values
sends L bytes and a scale per started block, under a third of 4L bytes from L = 12 on), for
bf16 1/2. gloo and NCCL would all-reduce bf16 and int8 themselves, but summing in those types
rounds at every step (bf16) or overflows (int8); here every sum is float32.

The backward is the exact sum's: each partial's gradient is the output's, which needs no
communication. The backward's own collectives (the input gradients of the column-parallel
layers) stay float32.
"""

import torch
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import RowwiseParallel

MODES = ("bf16", "int8")
BLOCK = 32  # int8 values per float32 scale: (1 + 4/32)/4 = 0.28 of float32's bytes (benchmarks/compress_accuracy.py)


def check_compress(compress):
    if compress is not None and compress not in MODES:
        raise ValueError(f"compress={compress!r} is not one of {', '.join(map(repr, MODES))}; "
                         f"pass one of them, or None for exact float32 all-reduces")


def chunk_bytes(values, mode):
    """Bytes one rank's compressed chunk of `values` takes."""
    return 2 * values if mode == "bf16" else values + 4 * -(-values // BLOCK)


def payload_bytes(numel, n, mode):
    """The bytes each of the all-to-all and the all-gather moves for a tensor of `numel` values over `n` ranks."""
    return n * chunk_bytes(-(-numel // n), mode)


def _encode(rows, mode):
    """(n, L) floats -> (n, chunk_bytes(L)) bytes: bf16, or int8 values then their scales."""
    if mode == "bf16":
        return rows.to(torch.bfloat16).view(torch.uint8)
    n, length = rows.shape
    blocks = F.pad(rows, (0, -length % BLOCK)).view(n, -1, BLOCK)
    scales = blocks.abs().amax(-1) / 127
    q = torch.round(blocks / torch.where(scales > 0, scales, 1)[..., None]).to(torch.int8)
    return torch.cat([q.view(n, -1)[:, :length].view(torch.uint8), scales.view(torch.uint8)], 1)


def _decode(data, length, mode):
    """The inverse of `_encode`: (n, chunk_bytes(length)) bytes -> (n, length) float32."""
    if mode == "bf16":
        return data.view(torch.bfloat16).float()
    n = data.size(0)
    scales = data[:, length:].contiguous().view(torch.float32)
    q = F.pad(data[:, :length].contiguous().view(torch.int8).float(), (0, -length % BLOCK))
    return (q.view(n, -1, BLOCK) * scales[..., None]).view(n, -1)[:, :length]


def compressed_all_reduce(x, mode, mesh):
    """The sum of `x` over the ranks of the 1-D `mesh`, sent compressed; the same bits on every rank."""
    n = mesh.size()
    flat = x.reshape(-1).float()
    length = -(-flat.numel() // n)
    chunks = F.pad(flat, (0, n * length - flat.numel())).view(n, length)
    received = funcol.all_to_all_single(_encode(chunks, mode).flatten(), None, None, mesh)
    own = _decode(funcol.wait_tensor(received).view(n, -1), length, mode).sum(0, keepdim=True)
    gathered = funcol.all_gather_single(_encode(own, mode).flatten(), 0, mesh)
    out = _decode(funcol.wait_tensor(gathered).view(n, -1), length, mode).flatten()[:flat.numel()]
    return out.view(x.shape).to(x.dtype)


class _CompressedSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mode, mesh):
        return compressed_all_reduce(x, mode, mesh)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def compressed_sum(partial, mode, mesh):
    """A Partial DTensor's sum as a plain (replicated) tensor, sent compressed; gradients as the exact sum's."""
    return _CompressedSum.apply(partial.to_local(grad_placements=[Replicate()]), mode, mesh)


class CompressedRowwiseParallel(RowwiseParallel):
    """
    `RowwiseParallel` whose partial outputs are summed by `compressed_all_reduce` into a
    replicated plain tensor, as `RowwiseParallel()`'s all-reduce would.

    Keyword Args:
        compress (str): "bf16" or "int8".

    Example::
        >>> parallelize_module(model, tp_mesh, {"transformer.h.*.mlp.c_proj": CompressedRowwiseParallel(compress="int8")})
    """

    def __init__(self, *, compress):
        check_compress(compress)
        super().__init__()
        self.compress = compress

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        return compressed_sum(outputs, self.compress, device_mesh)

    def __repr__(self):
        return f"{type(self).__name__}(compress={self.compress!r})"


def row_parallel(compress):
    """The style of a row-parallel projection whose output is summed: exact, or compressed."""
    return RowwiseParallel() if compress is None else CompressedRowwiseParallel(compress=compress)

