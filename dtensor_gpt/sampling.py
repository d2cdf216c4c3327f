"""
The next token from vocabulary-sharded logits, without gathering the logits.

Under TP each rank holds the logits of its slice of the vocabulary (`lm_head`'s
column-parallel output, kept sharded). Gathering them costs V values per token, more than
all the blocks' all-reduces of a small model's decoding step together. Instead:

- Top-k (greedy is k = 1) keeps, as nanoGPT does, every logit >= the k-th largest, ties
  included. Each rank's k best (value, global id) pairs hold the global top k, so the k-th
  largest. A rank may hold more logits tied with its own k-th than its k best show; when the
  global k-th equals it, they all survive, and one stands for them all: the rank also sends its
  Gumbel-max winner (below) among all its logits >= its k-th. O((k + 1) * TP) values on the
  wire, and the token drawn is exactly nanoGPT's rule's at every degree.
- Sampling from the softmax uses the Gumbel-max trick: argmax_i (logit_i / T + g_i), with
  g_i independent Gumbel(0, 1) noise, is distributed as softmax(logit / T). Each rank takes
  the argmax over its own slice and only the TP winners are exchanged. The noise is a pure
  function of (seed, step, batch row, global token id), so every rank, every TP degree and
  every copy of the weights picks the same token from the same logits: a seed gives the same
  text at TP 1, 2 or 4, and from a converted checkpoint.

Candidates travel as bytes in one all-gather: a float32 value and a rank-local int16 id
(int32 past 32767 ids per rank), 6 bytes a candidate.
"""

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from dtensor_gpt import layout

_WORD = 0xFFFFFFFF


def _mul32(x, c):
    """x * c mod 2**32 for int64 tensors (or Python integers) below 2**32, without overflowing int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _WORD


def _mix32(x):
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed, step, ids, rows=None):
    """
    Gumbel(0, 1) noise for token `ids` (B, n), row b of the batch keyed by b: a pure
    function of (seed, step, b, id), the same on every rank and at every TP degree. `rows`,
    when given, are the batch rows of `ids` one by one (ids then any shape, as rows').
    """
    h = 0  # the key of (seed, step), hashed in Python's integers: the same arithmetic, without a tensor op each
    for part in (seed & _WORD, (seed >> 32) & _WORD, step & _WORD):
        h = _mix32((h + part) & _WORD)
    if rows is None:
        rows = torch.arange(ids.shape[0], dtype=torch.int64, device=ids.device).unsqueeze(1)
    h = _mix32((_mix32((h + rows) & _WORD) + (ids & _WORD)) & _WORD)
    uniform = (h.to(torch.float64) + 0.5) / 2**32
    return -torch.log(-torch.log(uniform))


def _shard(logits):
    """(this rank's logits (B, V_local), its first global id, the TP degree, mesh or None)."""
    if not isinstance(logits, DTensor):
        return logits, 0, 1, None
    if logits.placements != (Shard(logits.ndim - 1),):
        raise ValueError(f"vocabulary-parallel sampling needs logits sharded on the vocabulary, not {logits.placements}; "
                         f"parallelize the model with loss_parallel=True to keep lm_head's output sharded")
    mesh = logits.device_mesh
    start, _ = layout.piece(logits.shape[-1], mesh.size(), mesh.get_local_rank())
    return logits.to_local(), start, mesh.size(), mesh


class VocabParallelSampler:
    """
    `sampler(logits, top_k)` -> next ids (B, 1) for temperature-scaled logits (B, V), a
    DTensor sharded on the vocabulary or a plain tensor. One sampler per generation: it
    counts its steps, which key the noise.
    """

    def __init__(self, seed):
        self.seed, self.step = seed, 0

    def __call__(self, logits, top_k=None):
        local, start, tp, mesh = _shard(logits)
        vocab = logits.shape[-1]
        if top_k is not None:
            k = min(top_k, vocab)
            best = min(k, math.ceil(vocab / tp))  # every rank sends as many, padded past a short slice
            values, local_ids = local.float().topk(min(best, local.shape[-1]), dim=-1)
            pad = best - values.shape[-1]
            values = torch.nn.functional.pad(values, (0, pad), value=-math.inf)
            local_ids = torch.nn.functional.pad(local_ids, (0, pad), value=0)
            if candidates_per_rank(vocab, tp, top_k) > best:  # a slice longer than k: its ties with its k-th
                winner = self._tied_winner(local, start, local >= values[:, -1:])
                values = torch.cat([values, local.float().gather(-1, winner)], dim=-1)
                local_ids = torch.cat([local_ids, winner], dim=-1)
            values, ids = _exchange(values, local_ids, start, vocab, mesh)
            ranks_best = values.view(values.shape[0], tp, -1)[..., :best].reshape(values.shape[0], -1)
            threshold = ranks_best.topk(k, dim=-1).values[:, -1:]
            score = torch.where(values >= threshold, values.double() + gumbel_noise(self.seed, self.step, ids), -math.inf)
        else:
            # compared in float32 at every degree, so TP=1 and TP=4 order candidates alike
            noisy = self._noisy(local, start).float()
            best, local_ids = noisy.max(dim=-1, keepdim=True)
            score, ids = _exchange(best, local_ids, start, vocab, mesh)
        self.step += 1
        return ids.gather(-1, score.argmax(dim=-1, keepdim=True))

    def _tied_winner(self, local, start, tied):
        """
        The Gumbel-max winner (B, 1) among each row's `tied` logits. The noise is computed for
        those alone, a few per row, not the whole slice: for GPT-2's vocabulary on one rank that
        was 1.5 ms of a greedy decoding step (profiled, 2 AMD EPYC vCPUs). On a GPU finding them
        waits for the logits, as printing the token does anyway.
        """
        rows, cols = tied.nonzero(as_tuple=True)
        noisy = torch.full(local.shape, -math.inf, dtype=torch.float64, device=local.device)
        noisy[rows, cols] = local[rows, cols].double() + gumbel_noise(self.seed, self.step, start + cols, rows)
        return noisy.argmax(dim=-1, keepdim=True)

    def _noisy(self, local, start):
        """This rank's logits (its slice of the vocabulary from global id `start`) plus their Gumbel noise, in float64."""
        ids = start + torch.arange(local.shape[-1], device=local.device).expand_as(local)
        return local.double() + gumbel_noise(self.seed, self.step, ids)


def candidates_per_rank(vocab, tp, top_k):
    """
    How many candidates each rank sends for one row: its one Gumbel-max winner; or its best k
    and its winner among its logits tied with its k-th, or its whole slice if no longer than k.
    """
    if top_k is None:
        return 1
    slice_ids = math.ceil(vocab / tp)
    return top_k + 1 if top_k < slice_ids else slice_ids


def _id_type(vocab, tp):
    """A rank-local token id fits int16 up to 32767 ids per rank."""
    return torch.int16 if math.ceil(vocab / tp) <= torch.iinfo(torch.int16).max else torch.int32


def exchanged_bytes(vocab, tp, rows, top_k):
    """The bytes the one all-gather of a sampling step gathers: every rank's candidates for every row."""
    return tp * rows * candidates_per_rank(vocab, tp, top_k) * (4 + _id_type(vocab, tp).itemsize)


def _exchange(values, local_ids, start, vocab, mesh):
    """Every rank's candidates (values, global ids), (B, tp * n): one all-gather of their bytes."""
    if mesh is None:
        return values, local_ids + start
    tp, n, rows = mesh.size(), values.shape[-1], values.shape[0]
    id_type = _id_type(vocab, tp)
    words = torch.cat([values.contiguous().view(torch.uint8), local_ids.to(id_type).view(torch.uint8)], dim=-1)
    everyone = DTensor.from_local(words, mesh, [Shard(1)], run_check=False).full_tensor()
    everyone = everyone.view(rows, tp, words.shape[-1])
    values = everyone[..., :4 * n].contiguous().view(torch.float32).reshape(rows, tp * n)
    local_ids = everyone[..., 4 * n:].contiguous().view(id_type).to(torch.int64)
    firsts = torch.tensor([layout.piece(vocab, tp, r)[0] for r in range(tp)], device=values.device).view(1, tp, 1)
    return values, (local_ids + firsts).reshape(rows, tp * n)
