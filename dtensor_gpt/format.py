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

Format 3 protects the index itself. A changed `n_head`, `n_layer` or split makes the files'
bytes mean something else, and nothing in the bytes says so: an index edited from 3 q|k|v
groups to 1 loads and generates garbage. So every rank file's safetensors metadata holds
`index_sha256`, the sha256 of the index without its `files` entry (canonical JSON: sorted
keys, no spaces). `files` holds each rank file's own sha256, which covers that metadata,
so it cannot itself be covered; everything else in the index (format, id, config, tp, plan,
shapes, dtypes, splits, tied names, optimizer groups, extra) is known before the first
tensor is written, although the index is written last, after the files are fsynced. Every
opening recomputes the hash (a few kilobytes of JSON) and compares it with each rank file's
header: a changed index is refused without reading a tensor. What `files` says is checked
too: its names on every opening, each file's size on every opening, its sha256 with `verify`
(which reads every byte; the converter does so by default). Formats 1 and 2 carry no index
hash: their indexes are checked field by field and against the tensors' shapes only.

Nothing is opened that is not a regular file (links followed): a FIFO would block its
reader forever and a link to /dev/zero would be hashed forever.
"""

import hashlib
import json
import os
import reprlib
import stat

import torch
from safetensors import SafetensorError, safe_open

from dtensor_gpt import layout
from dtensor_gpt.publish import fsync_dir, not_a_real_directory, write_file
from dtensor_gpt.safetensors_stream import TORCH_DTYPES

FORMAT = "dtensor_gpt/3"
UNHASHED_FORMAT = "dtensor_gpt/2"
PADDED_FORMAT = "dtensor_gpt/1"
FORMATS = (FORMAT, UNHASHED_FORMAT, PADDED_FORMAT)
INDEX = "index.json"
SIZES = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
DAMAGED = "the index is damaged: restore the checkpoint from a copy, or save it again"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and tensor."""


def rank_file(rank, parts):
    return f"model-rank{rank:05d}-of-{parts:05d}.safetensors"


def sha256(path):
    digest = hashlib.sha256()
    with open(regular_file(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def index_sha256(index):
    """The hash each rank file carries: the index without `files` (the files' own digests), as canonical JSON."""
    core = {k: v for k, v in index.items() if k != "files"}
    return hashlib.sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


def regular_file(path):
    """
    `path`, if it is a regular file (links followed); anything else is refused before it is
    opened: a FIFO blocks its reader until a writer comes, a device such as /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise CheckpointError(f"{path} is {kind}{link}, not a regular file; put the file itself there")
    return path


def write_index(directory, index):
    write_file(os.path.join(directory, INDEX), json.dumps(index, indent=1, sort_keys=True))
    fsync_dir(directory)


def read_json(path):
    """The JSON value in the regular file `path`, or one CheckpointError saying why not."""
    try:
        with open(regular_file(path), encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests its JSON too deeply to be read") from None


def not_a_checkpoint(path):
    """Why the directory `path` may not be replaced as a checkpoint, or None if it may."""
    if not_a_real_directory(path):
        return not_a_real_directory(path)
    try:
        index = read_json(os.path.join(path, INDEX))
        ours = {INDEX, *index["files"]} if index.get("format") in FORMATS and isinstance(index["files"], dict) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ours = None
    if ours is None:
        return f"{path} is not a checkpoint of this project (no readable {INDEX} of format {FORMAT}); refusing to replace it"
    foreign = sorted(set(os.listdir(path)) - ours)
    if foreign:
        return f"{path} holds {foreign}, which its {INDEX} does not name; refusing to replace it (move them out first)"
    return None


def count(value):
    """Whether `value` is an integer (JSON's true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(config, where, fix, names=None):
    """Each GPTConfig value by type and range; `names` gives the source's own field names (config.json's n_positions)."""
    name = {f: f for f in (*SIZES, "bias", "dropout")} | (names or {})
    for field in SIZES:
        value = config[field]
        if not count(value) or value < 1:
            raise CheckpointError(f"{where}: {name[field]} is {value!r}, but it must be a positive integer; {fix}")
    if not isinstance(config["bias"], bool):
        raise CheckpointError(f"{where}: {name['bias']} is {config['bias']!r}, but it must be true or false; {fix}")
    dropout = config["dropout"]
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise CheckpointError(f"{where}: {name['dropout']} is {dropout!r}, but it must be a number in [0, 1); {fix}")
    if config["n_embd"] % config["n_head"]:
        raise CheckpointError(f"{where}: {name['n_embd']}={config['n_embd']} is not divisible by {name['n_head']}="
                              f"{config['n_head']}, as attention heads need; {fix}")


def check_index(index, where):
    """
    Every field of a loaded index, by type and range, before anything uses it: one
    CheckpointError naming the field, never a TypeError or KeyError from deep inside a read.
    """
    def bad(field, value, want):
        return CheckpointError(f"{where}: {field} is {reprlib.repr(value)}, but it must be {want}; {DAMAGED}")

    if not isinstance(index, dict):
        raise CheckpointError(f"{where} holds a JSON {type(index).__name__}, not an object; {DAMAGED}")
    if index.get("format") not in FORMATS:
        raise CheckpointError(f"{where}: format {index.get('format')!r} is none of {list(FORMATS)}; "
                              f"it is not a checkpoint of this project, or one of a newer version")
    required = ("id", "config", "tp", "tensors", "tied", "files") + (("vocab_size_unpadded",) if index["format"] == PADDED_FORMAT else ())
    lacking = [k for k in required if k not in index]
    if lacking:
        raise CheckpointError(f"{where} lacks {lacking}; {DAMAGED}")
    if not isinstance(index["id"], str):
        raise bad("id", index["id"], "a string")
    tp = index["tp"]
    if not count(tp) or tp < 1:
        raise bad("tp", tp, "a positive integer (the TP degree the files were written at)")
    if not isinstance(index["config"], dict):
        raise bad("config", index["config"], "an object")
    lacking = [f for f in (*SIZES, "bias", "dropout") if f not in index["config"]]
    if lacking:
        raise CheckpointError(f"{where}: config lacks {lacking}; {DAMAGED}")
    check_config(index["config"], where, DAMAGED, {f: f"config.{f}" for f in index["config"]})
    if not (index.get("plan") is None or isinstance(index.get("plan"), str)):
        raise bad("plan", index["plan"], "a string or null")
    if "extra" in index and not isinstance(index["extra"], dict):
        raise bad("extra", index["extra"], "an object")
    if "vocab_size_unpadded" in index and (not count(index["vocab_size_unpadded"]) or index["vocab_size_unpadded"] < 1):
        raise bad("vocab_size_unpadded", index["vocab_size_unpadded"], "a positive integer")
    files = index["files"]
    ranks = [rank_file(r, tp) for r in range(tp)] if isinstance(files, dict) and len(files) == tp else None
    if ranks is None or sorted(files) != ranks:
        raise bad("files", files, f"an object naming exactly the tp={tp} rank files, {rank_file(0, tp)} and on")
    for fname, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) or not count(entry.get("bytes")):
            raise bad(f"files[{fname!r}]", entry, 'an object {"sha256": hex string, "bytes": integer}')
    tensors = index["tensors"]
    if not isinstance(tensors, dict) or not tensors:
        raise bad("tensors", tensors, "an object with an entry per tensor")
    for name, entry in tensors.items():
        field = f"tensors[{name!r}]"
        if not isinstance(entry, dict) or not {"shape", "dtype", "split", "files"} <= set(entry):
            raise bad(field, entry, "an object with shape, dtype, split and files")
        shape, split = entry["shape"], entry["split"]
        if not isinstance(shape, list) or not all(count(n) and n >= 0 for n in shape):
            raise bad(f"{field}.shape", shape, "a list of sizes")
        if not isinstance(entry["dtype"], str) or entry["dtype"] not in TORCH_DTYPES:
            raise bad(f"{field}.dtype", entry["dtype"], f"one of {sorted(TORCH_DTYPES)}")
        if split is not None:
            if not isinstance(split, dict) or set(split) != {"dim", "groups"} or not all(map(count, split.values())):
                raise bad(f"{field}.split", split, 'null or {"dim": integer, "groups": integer}')
            if not 0 <= split["dim"] < len(shape):
                raise bad(f"{field}.split.dim", split["dim"], f"a dimension of its shape {shape}")
            packed = layout.packed_parts(name, split["dim"])
            if split["groups"] != packed:
                raise bad(f"{field}.split.groups", split["groups"],
                          f"{packed}, the parts its dimension {split['dim']} packs" + (" (q|k|v)" if packed == 3 else ""))
        if entry["files"] not in (ranks[:1], ranks):
            raise bad(f"{field}.files", entry["files"], f"{ranks[:1]} (replicated) or {ranks} (sharded)")
        if len(entry["files"]) > 1 and (split is None or not layout.divides(shape[split["dim"]], split, tp)):
            raise bad(f"{field}.split", split, f"a split that {tp} ranks can hold of shape {shape}")
    tied = index["tied"]
    if not isinstance(tied, dict) or not all(isinstance(v, str) and v in tensors for v in tied.values()):
        raise bad("tied", tied, "an object mapping names to stored tensors")
    groups = index.get("optimizer_groups")
    if groups is not None and not (isinstance(groups, list) and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) and all(isinstance(p, str) and p in tensors for p in g["params"])
            for g in groups)):
        raise bad("optimizer_groups", groups, "a list of objects whose params name stored tensors")


class Checkpoint:
    """
    A checkpoint directory of this format, validated on opening: every index field, the
    index against the hash its files carry (format 3), files, sizes, ids, ranks, shapes and
    dtypes; with `verify`, every file's sha256. `read` counts the bytes it reads.
    """

    def __init__(self, path, verify=False):
        self.path = path
        index_path = os.path.join(path, INDEX)
        if not os.path.isdir(path):
            raise CheckpointError(f"{path} is not a directory")
        if not os.path.lexists(index_path):
            raise CheckpointError(f"{index_path} is missing: not a complete checkpoint (a save that did not finish leaves none)")
        self.index = read_json(index_path)
        check_index(self.index, index_path)
        self.parts = self.index["tp"]
        self.tensors = self.index["tensors"]
        self.bytes_read = 0
        self._files = {}
        digest = index_sha256(self.index)
        try:
            for rank in range(self.parts):
                self._open(rank, verify, digest)
            for name, entry in self.tensors.items():
                for fname in entry["files"]:
                    self._check_tensor(fname, name, entry)
            for fname, f in self._files.items():
                unexpected = sorted(set(f.keys()) - {n for n, e in self.tensors.items() if fname in e["files"]})
                if unexpected:
                    raise CheckpointError(f"{os.path.join(path, fname)} holds {unexpected}, which {INDEX} does not list there")
        except BaseException:
            self.close()
            raise

    def close(self):
        """Unmap the rank files now: a refused or loaded checkpoint holds nothing open until the garbage collector runs."""
        for handle in self._files.values():
            handle.__exit__(None, None, None)
        self._files = {}

    def _open(self, rank, verify, digest):
        fname = rank_file(rank, self.parts)
        full = os.path.join(self.path, fname)
        if not os.path.lexists(full):
            raise CheckpointError(f"{full} is missing: the checkpoint has tp={self.parts} and needs one file per rank")
        want = self.index["files"][fname]
        if verify and sha256(full) != want["sha256"]:
            raise CheckpointError(f"{full}: sha256 differs from {INDEX} (corrupted or replaced)")
        try:
            handle = safe_open(regular_file(full), "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{full} is truncated or corrupted: {e}") from None
        self._files[fname] = handle
        meta = handle.metadata() or {}
        if meta.get("id") != self.index["id"]:
            raise CheckpointError(
                f"{full} belongs to checkpoint {meta.get('id')!r}, not {self.index['id']!r} of {INDEX}: files from different checkpoints"
            )
        if meta.get("rank") != str(rank) or meta.get("tp") != str(self.parts):
            raise CheckpointError(f"{full} says rank {meta.get('rank')} of tp={meta.get('tp')}, but its name and {INDEX} say rank {rank} of {self.parts}")
        if os.path.getsize(full) != want["bytes"]:
            raise CheckpointError(f"{full} has {os.path.getsize(full)} bytes, but {INDEX} says {want['bytes']}: it was "
                                  f"truncated, extended or replaced")
        if ("index_sha256" in meta or FORMAT in (meta.get("format"), self.index["format"])) and meta.get("index_sha256") != digest:
            raise CheckpointError(
                f"{os.path.join(self.path, INDEX)} is not the index {fname} was written with (its hash is {digest[:12]}..., "
                f"the file records {str(meta.get('index_sha256'))[:12]}...): the index was edited or replaced after the "
                f"checkpoint was saved; restore it from a copy, or save the checkpoint again"
            )

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
