"""
Checkpoints: a directory of one safetensors file per TP rank, and `index.json` written last.

    model-rank00000-of-00002.safetensors   rank 0's shards, and every replicated tensor
    model-rank00001-of-00002.safetensors   rank 1's shards
    index.json                             format, id, config, TP degree, plan, and per tensor:
                                           global shape, dtype, split, files; per file: sha256

Every rank writes its own file (no gather to rank 0) into a temporary directory beside the
destination; once all are fsynced, rank 0 writes the index and renames the directory into
place, so an interrupted save leaves no checkpoint. Loading validates everything before
using anything, and each rank reads only the byte ranges of its own shards
(`safe_open(...).get_slice`), whatever the TP degree the checkpoint was written at.
"""

import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from dataclasses import asdict

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dtensor_gpt import layout
from dtensor_gpt.safetensors_stream import DTYPES, TORCH_DTYPES, StreamingWriter

FORMAT = "dtensor_gpt/1"
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


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(path):
    """A fresh directory name beside `path`, naming the process that writes it (see `clean_stale_temporaries`)."""
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{name}.tmp-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}")


def _alive(pid):
    """Whether a process with this id runs here (one of another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def clean_stale_temporaries(path):
    """
    Remove what a killed save or conversion to `path` left beside it. Only directories of
    processes on this host that no longer run are touched; a previous checkpoint moved aside
    (`.old`) by a save killed in the middle of replacing it is put back if `path` is missing.
    Each action is reported on stderr.
    """
    parent, name = os.path.split(os.path.abspath(path))
    pattern = re.compile(re.escape(f".{name}.tmp-") + r"(\d+)@(.+)-[0-9a-f]{8}(\.old)?$")
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        match = pattern.match(entry)
        if not match or match.group(2) != socket.gethostname() or _alive(int(match.group(1))):
            continue
        stale = os.path.join(parent, entry)
        if match.group(3) and not os.path.exists(path):
            os.rename(stale, path)
            print(f"note: restored {path} from {stale}, moved aside by a save that was killed (pid {match.group(1)})",
                  file=sys.stderr)
        else:
            shutil.rmtree(stale)
            print(f"note: removed {stale}, left by a save or conversion that was killed (pid {match.group(1)})",
                  file=sys.stderr)


def publish(tmp, path, overwrite):
    """Rename the finished directory `tmp` to `path`, replacing only a checkpoint (with `overwrite`)."""
    if os.path.exists(path):
        if not overwrite:
            raise CheckpointError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        if not os.path.isdir(path) or (os.listdir(path) and not os.path.exists(os.path.join(path, INDEX))):
            raise CheckpointError(f"{path} is not a checkpoint (no {INDEX}); refusing to replace it")
        old = tmp + ".old"
        os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old)
    else:
        os.rename(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_index(directory, index):
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


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
        if self.index.get("format") != FORMAT:
            raise CheckpointError(f"{index_path}: format {self.index.get('format')!r} is not {FORMAT!r}")
        lacking = [k for k in ("id", "config", "tp", "tensors", "tied", "files", "vocab_size_unpadded") if k not in self.index]
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
        want = layout.local_shape(entry["shape"], entry["split"], self.parts if len(entry["files"]) > 1 else 1)
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


def read_ranges(ckpt, name, dim, ranges, available):
    """
    The global `ranges` of tensor `name` along `dim`, concatenated; positions at or past
    `available` (vocabulary padding the checkpoint does not have) are zeros.
    """
    entry, pieces = ckpt.tensors[name], []
    for a, b in ranges:
        if a < min(b, available):
            pieces.append(ckpt.read(name, dim, a, min(b, available)))
        if b > available:
            shape = list(entry["shape"])
            shape[dim] = b - max(a, available)
            pieces.append(torch.zeros(shape, dtype=TORCH_DTYPES[entry["dtype"]]))
    return torch.cat(pieces, dim)


def _resharded(model):
    """FSDP2 leaves the root's parameters gathered after a forward; checkpoints need the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def _tp_rank(model):
    """(TP rank, TP degree, whether this rank writes) from the model's DTensor parameters."""
    dtensors = [p for p in model.parameters() if isinstance(p, DTensor)]
    if not dtensors:
        return 0, 1, not dist.is_initialized() or dist.get_rank() == 0
    sharded = [p for p in dtensors if layout.split_of(p) is not None] or dtensors
    rank, parts = layout.tp_rank(sharded[0])
    dims = layout.mesh_dims(dtensors[0])
    first_replica = "dp" not in dims or dtensors[0].device_mesh.get_local_rank(dims["dp"][0]) == 0
    return rank, parts, first_replica  # data-parallel replicas of a TP shard: the first one writes


def unique_parameters(model):
    """Parameters by name, a tied parameter once (under its first name), and the aliases."""
    from dtensor_gpt.parallelize import tied_parameters

    params = dict(model.named_parameters())
    tied = {}
    for group in tied_parameters(model):
        names = [f"{m}.{p}" if m else p for m, p in group]
        keep = next(n for n in params if n in names)
        tied.update({n: keep for n in names if n != keep})
    return params, tied


def _named_tensors(model, optimizer, extra_tensors, parts):
    """Everything a checkpoint stores, by name: (tensor, split) with the tied ones once."""
    params, tied = unique_parameters(model)
    named = {}
    for name, p in params.items():
        split = layout.split_of(p) if parts > 1 else layout.canonical_split(name)
        named[name] = (p, split)
        for key, value in (optimizer.state.get(p, {}) if optimizer is not None else {}).items():
            if torch.is_tensor(value):
                same = tuple(value.shape) == tuple(p.shape)
                named[f"optimizer.{key}.{name}"] = (value, split if same else None)
    for key, value in (extra_tensors or {}).items():
        named[f"extra.{key}"] = (value, None)
    return named, tied


def save_checkpoint(model, path, overwrite=False, plan=None, optimizer=None, extra=None, extra_tensors=None,
                    vocab_size_unpadded=None):
    """
    Save `model` (parallelized or not) to the directory `path`; every TP rank calls this.

    Each rank writes only its own shards, in parallel; `index.json` comes last, after every
    file is fsynced, and the directory appears at `path` only when complete. With
    `optimizer`, its per-parameter state is saved too, sharded like the parameters (so it
    reshards with them); `extra` (JSON values) and `extra_tensors` (replicated tensors, e.g.
    random generator states) carry whatever else a run needs to resume exactly;
    `vocab_size_unpadded` is how many vocabulary rows are real (the rest is TP padding).
    """
    rank, parts, writer = _tp_rank(_resharded(model))
    first = writer and rank == 0  # one process cleans up, creates, indexes and publishes
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if first:
        clean_stale_temporaries(path)
    if distributed:
        dist.barrier()
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True to replace it")
    named, tied = _named_tensors(model, optimizer, extra_tensors, parts)
    names = [uuid.uuid4().hex, temporary_beside(path)]
    if distributed:
        dist.broadcast_object_list(names, src=0)
    ident, tmp = names
    if first:
        os.makedirs(tmp)
    if distributed:
        dist.barrier()

    tensors, mine = {}, []
    for name, (t, split) in sorted(named.items()):
        sharded = parts > 1 and split is not None
        local = layout.tp_local(t)  # every rank takes part: gathering FSDP shards is collective
        files = [rank_file(r, parts) for r in range(parts)] if sharded else [rank_file(0, parts)]
        tensors[name] = dict(shape=list(t.shape), dtype=DTYPES[t.dtype], split=split, files=files)
        if writer and (sharded or rank == 0):
            mine.append((name, local))
    digest = {}
    if writer:
        fname = rank_file(rank, parts)
        meta = dict(format=FORMAT, id=ident, rank=rank, tp=parts)
        with StreamingWriter(os.path.join(tmp, fname), [(n, t.dtype, t.shape) for n, t in mine], meta) as out:
            for n, t in mine:
                out.write(n, t)
        digest = {fname: dict(sha256=sha256(os.path.join(tmp, fname)), bytes=os.path.getsize(os.path.join(tmp, fname)))}
    digests = [digest]
    if distributed:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
    if first:
        config = asdict(model.config)
        index = dict(
            format=FORMAT, id=ident, config=config, tp=parts, plan=plan or _plan_of(model),
            vocab_size_unpadded=vocab_size_unpadded or config["vocab_size"],
            tensors=tensors, tied=tied, files={k: v for d in digests for k, v in d.items()},
        )
        if extra:
            index["extra"] = extra
    failure = [None]
    if first:
        try:
            write_index(tmp, index)
            publish(tmp, path, overwrite)
        except (OSError, CheckpointError) as e:
            failure = [f"{type(e).__name__}: {e}"]
            shutil.rmtree(tmp, ignore_errors=True)
    if distributed:
        dist.broadcast_object_list(failure, src=0)  # every rank learns the outcome; none waits forever
    if failure[0]:
        raise CheckpointError(f"saving {path} failed on rank 0: {failure[0]}")


def _plan_of(model):
    from dtensor_gpt.parallelize import plan_name

    return plan_name(model)


def _read_into(ckpt, name, target, available=None):
    """Fill `target` from checkpoint tensor `name`: a DTensor gets only this rank's shard."""
    local = target.to_local() if isinstance(target, DTensor) else target
    if target.dim() == 0:
        local.copy_(ckpt.read_full(name))
        return
    split = layout.split_of(target)
    if split is None:
        dim, ranges = 0, [(0, target.shape[0])]
    else:
        rank, parts = layout.tp_rank(target)
        dim, ranges = split["dim"], layout.intervals(target.shape[split["dim"]], split, parts, rank)
    if available is None or dim != 0:
        available = target.shape[dim]
    values = read_ranges(ckpt, name, dim, ranges, available)
    dp = layout.dp_shard(target)
    if dp is not None:  # FSDP2 keeps chunk `rank` of dim 0 of the TP shard
        values = values.chunk(dp[1], dim=0)[dp[0]]
    local.copy_(values)


def load_checkpoint(model, path, verify=False, optimizer=None):
    """
    Load a checkpoint of any TP degree (or a Hugging Face GPT-2 directory, or a nanoGPT
    ckpt.pt) into `model`, parallelized at any TP degree or not, and with `optimizer` its
    saved optimizer state. Everything is checked before a parameter changes. Returns
    {"bytes_read": bytes this rank read (about 1/TP of the sharded tensors plus the
    replicated ones), "extra": the saved JSON values, "extra_tensors": the saved tensors}.
    """
    from dtensor_gpt.sources import open_source

    ckpt = open_source(path, verify)
    params, tied = unique_parameters(_resharded(model))
    for field in ("n_layer", "n_head", "n_embd", "block_size", "bias"):
        have, want = getattr(model.config, field), ckpt.config[field]
        if have != want:
            raise CheckpointError(f"{path} is a model with {field}={want}, but this model has {field}={have}")
    saved = {n for n in ckpt.tensors if not n.startswith(("optimizer.", "extra."))}
    missing = sorted(set(params) - saved)
    unexpected = sorted(saved - set(params) - set(tied))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint {missing}, unexpected in it {unexpected}")
    states = {}
    if optimizer is not None:
        for pname, p in params.items():
            keys = [n[len("optimizer."):-len(pname) - 1] for n in ckpt.tensors
                    if n.startswith("optimizer.") and n.endswith("." + pname)]
            if not keys:
                raise CheckpointError(f"{path} has no optimizer state for {pname}; it was saved without an optimizer")
            for key in keys:
                entry = ckpt.tensors[f"optimizer.{key}.{pname}"]
                if entry["shape"] not in ([], ckpt.tensors[pname]["shape"]):
                    raise CheckpointError(f"{path}: optimizer.{key}.{pname} has shape {entry['shape']}, neither a scalar "
                                          f"nor the parameter's {ckpt.tensors[pname]['shape']}")
            states[pname] = keys
    rows = {}
    for name, p in params.items():
        entry = ckpt.tensors[name]
        if TORCH_DTYPES[entry["dtype"]] != p.dtype:
            raise CheckpointError(
                f"{path}: tensor {name} is {entry['dtype']} in the checkpoint but {p.dtype} in the model; "
                f"convert it with python -m dtensor_gpt.reshard --dtype, or cast the model"
            )
        shape, want = list(p.shape), list(entry["shape"])
        if name == "transformer.wte.weight" and shape[1:] == want[1:] and shape[0] >= ckpt.vocab_unpadded:
            rows[name] = min(shape[0], want[0])  # vocabulary padding may differ; real rows must fit
        elif shape != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {want} in the checkpoint but {shape} in the model")
    with torch.no_grad():
        for name, p in params.items():
            _read_into(ckpt, name, p, rows.get(name))
            for key in states.get(name, []):
                entry = ckpt.tensors[f"optimizer.{key}.{name}"]
                like = torch.zeros_like(p) if entry["shape"] else torch.zeros((), dtype=TORCH_DTYPES[entry["dtype"]])
                _read_into(ckpt, f"optimizer.{key}.{name}", like, rows.get(name))
                optimizer.state[p][key] = like
    extra_tensors = {n[len("extra."):]: ckpt.read_full(n) for n in ckpt.tensors if n.startswith("extra.")}
    return dict(bytes_read=ckpt.bytes_read, extra=ckpt.extra, extra_tensors=extra_tensors)
