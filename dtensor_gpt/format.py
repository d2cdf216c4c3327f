"""
The checkpoint format: a directory of one safetensors file per TP rank, and `index.json`.

    model-rank00000-of-00002.safetensors   rank 0's shards, and every replicated tensor
    model-rank00001-of-00002.safetensors   rank 1's shards
    index.json                             format, id, config, TP degree, plan, and per tensor:
                                           global shape, dtype, split, files; per file: sha256

`config["vocab_size"]` is the model's vocabulary, every row real: TP degrees that do not
divide it shard it unevenly, as DTensor does. Format 1 (before this rule) padded the
vocabulary to a multiple of the TP degree and recorded the real size as
`vocab_size_unpadded`; such checkpoints are read with their padding rows left out.
"""

import hashlib
import json
import os

import torch
from safetensors import SafetensorError, safe_open

from dtensor_gpt import layout
from dtensor_gpt.publish import fsync_dir, not_a_real_directory, write_file

FORMAT = "dtensor_gpt/2"
PADDED_FORMAT = "dtensor_gpt/1"
INDEX = "index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and tensor."""


def rank_file(rank, parts):
    return f"model-rank{rank:05d}-of-{parts:05d}.safetensors"


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_index(directory, index):
    write_file(os.path.join(directory, INDEX), json.dumps(index, indent=1, sort_keys=True))
    fsync_dir(directory)


def not_a_checkpoint(path):
    """Why the directory `path` may not be replaced as a checkpoint, or None if it may."""
    if not_a_real_directory(path):
        return not_a_real_directory(path)
    try:
        with open(os.path.join(path, INDEX)) as f:
            index = json.load(f)
        ours = {INDEX, *index["files"]} if index.get("format") in (FORMAT, PADDED_FORMAT) else None
    except (OSError, ValueError, KeyError, TypeError):
        ours = None
    if ours is None:
        return f"{path} is not a checkpoint of this project (no readable {INDEX} of format {FORMAT}); refusing to replace it"
    foreign = sorted(set(os.listdir(path)) - ours)
    if foreign:
        return f"{path} holds {foreign}, which its {INDEX} does not name; refusing to replace it (move them out first)"
    return None


class Checkpoint:
    """
    A checkpoint directory of this format, validated on opening: index, files, ids, ranks,
    shapes and dtypes; with `verify`, every file's sha256. `read` counts the bytes it reads.
    """

    def __init__(self, path, verify=False):
        self.path = path
        index_path = os.path.join(path, INDEX)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is not a directory")
        if not os.path.exists(index_path):
            raise CheckpointError(f"{index_path} is missing: not a complete checkpoint (a save that did not finish leaves none)")
        try:
            with open(index_path) as f:
                self.index = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index_path} is not valid JSON: {e}") from None
        if self.index.get("format") not in (FORMAT, PADDED_FORMAT):
            raise CheckpointError(f"{index_path}: format {self.index.get('format')!r} is not {FORMAT!r}")
        required = ("id", "config", "tp", "tensors", "tied", "files")
        if self.index["format"] == PADDED_FORMAT:
            required += ("vocab_size_unpadded",)
        lacking = [k for k in required if k not in self.index]
        if lacking:
            raise CheckpointError(f"{index_path} lacks {lacking}")
        self.parts = self.index["tp"]
        self.tensors = self.index["tensors"]
        self.bytes_read = 0
        self._files = {}
        for rank in range(self.parts):
            self._open(rank, verify)
        for name, entry in self.tensors.items():
            for fname in entry["files"]:
                self._check_tensor(fname, name, entry)
        for fname, f in self._files.items():
            unexpected = sorted(set(f.keys()) - {n for n, e in self.tensors.items() if fname in e["files"]})
            if unexpected:
                raise CheckpointError(f"{os.path.join(path, fname)} holds {unexpected}, which {INDEX} does not list there")

    def _open(self, rank, verify):
        fname = rank_file(rank, self.parts)
        full = os.path.join(self.path, fname)
        if not os.path.exists(full):
            raise CheckpointError(f"{full} is missing: the checkpoint has tp={self.parts} and needs one file per rank")
        if verify:
            want = self.index["files"][fname]["sha256"]
            if sha256(full) != want:
                raise CheckpointError(f"{full}: sha256 differs from {INDEX} (corrupted or replaced)")
        try:
            handle = safe_open(full, "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{full} is truncated or corrupted: {e}") from None
        meta = handle.metadata() or {}
        if meta.get("id") != self.index["id"]:
            raise CheckpointError(
                f"{full} belongs to checkpoint {meta.get('id')!r}, not {self.index['id']!r} of {INDEX}: files from different checkpoints"
            )
        if meta.get("rank") != str(rank) or meta.get("tp") != str(self.parts):
            raise CheckpointError(f"{full} says rank {meta.get('rank')} of tp={meta.get('tp')}, but its name and {INDEX} say rank {rank} of {self.parts}")
        self._files[fname] = handle

    def _check_tensor(self, fname, name, entry):
        handle = self._files.get(fname)
        if handle is None or name not in handle.keys():
            raise CheckpointError(f"{os.path.join(self.path, fname)} lacks tensor {name} that {INDEX} places there")
        piece = handle.get_slice(name)
        parts = len(entry["files"])
        want = layout.local_shape(entry["shape"], entry["split"], parts, entry["files"].index(fname))
        if list(piece.get_shape()) != want or piece.get_dtype() != entry["dtype"]:
            raise CheckpointError(
                f"{os.path.join(self.path, fname)}: tensor {name} is {piece.get_dtype()} {piece.get_shape()}, "
                f"but {INDEX} says {entry['dtype']} {want}"
            )

    def _slice(self, fname, name, dim, start, stop):
        index = (slice(None),) * dim + (slice(start, stop),)
        t = self._files[fname].get_slice(name)[index]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_full(self, name):
        """The whole tensor `name` (0-dimensional ones included)."""
        entry = self.tensors[name]
        if len(entry["files"]) == 1:
            t = self._files[entry["files"][0]].get_tensor(name)
            self.bytes_read += t.numel() * t.element_size()
            return t
        return self.read(name, entry["split"]["dim"], 0, entry["shape"][entry["split"]["dim"]])

    def read(self, name, dim, start, stop):
        """The global range [start, stop) of tensor `name` along `dim`."""
        entry = self.tensors[name]
        split, files = entry["split"], entry["files"]
        if len(files) == 1:
            return self._slice(files[0], name, dim, start, stop)
        if split["dim"] == dim:
            size = entry["shape"][dim]
            return torch.cat([self._slice(files[r], name, dim, a, b) for r, a, b in layout.locate(size, split, self.parts, start, stop)], dim)
        whole = self.read(name, split["dim"], 0, entry["shape"][split["dim"]])
        return whole.narrow(dim, start, stop - start)
