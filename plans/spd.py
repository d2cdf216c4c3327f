"""
Sync-Point Drop (Kim et al., ICML 2025, arXiv 2502.20727) on top of the megatron plan.

Chosen blocks do 1 all-reduce per forward instead of 2 (see `dtensor_gpt.spd`); the others
are exact Megatron blocks. `spd_blocks` is a list of block indices, "all", "last:K", or
"auto:K" (the K blocks whose dropped sync point raises the loss least on a calibration
batch, as in the paper's block-wise sensitivity, measured here).
"""

import copy
import re

import torch

from dtensor_gpt.apply_tp import apply_tp
from dtensor_gpt.compress import check_compress
from dtensor_gpt.spd import SyncPointDrop
from plans import megatron


def parse_spd_blocks(spd_blocks, n_layer):
    """Block indices from a list, "all" or "last:K"; ValueError names the valid range."""
    if spd_blocks == "all":
        return list(range(n_layer))
    if isinstance(spd_blocks, str) and spd_blocks.startswith("last:") and spd_blocks[5:].isdigit():
        k = int(spd_blocks[5:])
        if not 0 <= k <= n_layer:
            raise ValueError(f"spd_blocks={spd_blocks!r} asks for {k} blocks but the model has n_layer={n_layer}; use 0..{n_layer}")
        return list(range(n_layer - k, n_layer))
    if isinstance(spd_blocks, str) and spd_blocks.startswith("auto:"):
        raise ValueError(
            f"spd_blocks={spd_blocks!r} ranks blocks on calibration data, which only "
            f"parallelize(model, mesh, 'spd', spd_blocks=..., calibration=ids) takes; here use indices, 'all' or 'last:K'"
        )
    if isinstance(spd_blocks, str):
        raise ValueError(f"spd_blocks={spd_blocks!r} is not understood; use a list of block indices, 'all', 'last:K' or 'auto:K'")
    blocks = sorted(set(int(i) for i in spd_blocks))
    bad = [i for i in blocks if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"spd_blocks {bad} out of range for n_layer={n_layer}; use indices 0..{n_layer - 1}")
    return blocks


def spd_blocks_from_text(text):
    """A command line's --spd-blocks: "0,2,5" becomes [0, 2, 5]; "all", "last:K" stay as they are."""
    return [int(i) for i in text.split(",")] if re.fullmatch(r"\d+(,\d+)*", text) else text


def block_sensitivity(model, mesh, calibration):
    """
    The loss increase on `calibration` (token ids, (B, T + 1)) when block i alone drops its
    sync point, for each block: the paper's block-wise sensitivity. Measured on deep copies
    of the unparallelized `model`, sharded over `mesh`; every rank gets the same list.
    """
    idx, targets = calibration[:, :-1].contiguous(), calibration[:, 1:].contiguous()

    def loss_with(styles):
        candidate = apply_tp(copy.deepcopy(model), mesh, styles)
        with torch.no_grad():
            return candidate(idx, targets)[1].item()

    exact = loss_with(megatron.plan(model, mesh))
    return [loss_with(styles_dropping(model, [i], False)) - exact for i in range(model.config.n_layer)]


def styles_dropping(model, dropped, loss_parallel, compress=None):
    """The megatron plan with `SyncPointDrop` on the blocks in `dropped`; `compress` for every block's sums."""
    styles = megatron.embedding_and_head(loss_parallel)
    for i in range(model.config.n_layer):
        if i in dropped:
            styles[f"transformer.h.{i}"] = SyncPointDrop(compress=compress)
        else:
            styles.update({f"transformer.h.{i}.{path}": style for path, style in megatron.block(compress).items()})
    return styles


def plan(model, mesh, *, spd_blocks="all", calibration=None, loss_parallel=False, compress=None):
    """
    `calibration`: token ids (B, T + 1) to rank blocks by for spd_blocks="auto:K"; `compress`:
    the kept sums sent as bf16 or int8, as in the megatron plan.
    """
    check_compress(compress)
    config = model.config
    if config.dropout:
        raise ValueError(f"plan 'spd' needs dropout=0 (config.dropout={config.dropout}); the paper's formula has no dropout")
    if isinstance(spd_blocks, str) and spd_blocks.startswith("auto:"):
        k = spd_blocks[5:]
        if not k.isdigit() or int(k) > config.n_layer:
            raise ValueError(f"spd_blocks={spd_blocks!r}: K must be a whole number in 0..n_layer={config.n_layer}")
        if calibration is None:
            raise ValueError(f"spd_blocks={spd_blocks!r} ranks blocks on data: pass calibration=token ids of shape (B, T + 1)")
        sensitivity = block_sensitivity(model, mesh, calibration)
        dropped = sorted(sorted(range(config.n_layer), key=sensitivity.__getitem__)[: int(k)])
    else:
        dropped = parse_spd_blocks(spd_blocks, config.n_layer)
    return styles_dropping(model, dropped, loss_parallel, compress)
