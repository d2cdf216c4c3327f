"""
`save_checkpoint` and `load_checkpoint`: a model at any TP degree to and from the directory
format of `dtensor_gpt.format`.

Every rank writes its own file (no gather to rank 0) into a temporary directory beside the
destination; once all are fsynced, rank 0 writes the index and publishes the directory
(`dtensor_gpt.publish`), so an interrupted save leaves no checkpoint. Loading validates
everything before using anything, and each rank reads only the byte ranges of its own
shards (`safe_open(...).get_slice`), whatever the TP degree the checkpoint was written at.
"""

import os
import shutil
import uuid
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dtensor_gpt import int8 as q8, layout
from dtensor_gpt.apply_tp import tied_parameters
from dtensor_gpt.faults import fault_point
from dtensor_gpt.materialize import allocate, local_values, on_meta
from dtensor_gpt.format import FORMAT, CheckpointError, index_sha256, not_a_checkpoint, rank_file, sha256, write_index
from dtensor_gpt.parallelize import plan_name
from dtensor_gpt.publish import clean_stale_temporaries, no_room, out_of_room, publish, temporary_beside
from dtensor_gpt.safetensors_stream import DTYPE_NAMES, DTYPES, TORCH_DTYPES, StreamingWriter
from dtensor_gpt.sources import non_finite, open_source, refuse_non_finite


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
    params = dict(model.named_parameters())
    tied = {}
    for group in tied_parameters(model):
        names = [f"{m}.{p}" if m else p for m, p in group]
        keep = next(n for n in params if n in names)
        tied.update({n: keep for n in names if n != keep})
    return params, tied


def params_by_id(model):
    params, _ = unique_parameters(model)
    return {id(p): name for name, p in params.items()}


def optimizer_groups(optimizer, names):
    """Each parameter group's JSON hyperparameters and its parameters by name (names: {id(param): name})."""
    def plain(value):
        return list(value) if isinstance(value, tuple) else value.item() if torch.is_tensor(value) else value

    return [{**{k: plain(v) for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


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


def save_checkpoint(model, path, overwrite=False, plan=None, optimizer=None, extra=None, extra_tensors=None):
    """
    Save `model` (parallelized or not) to the directory `path`; every TP rank calls this.

    Each rank writes only its own shards, in parallel; `index.json` comes last, after every
    file is fsynced, and the directory appears at `path` only when complete. With
    `optimizer`, its per-parameter state is saved too, sharded like the parameters (so it
    reshards with them); `extra` (JSON values) and `extra_tensors` (replicated tensors, e.g.
    random generator states) carry whatever else a run needs to resume exactly.
    `overwrite` replaces only a checkpoint of this format holding nothing else.
    """
    rank, parts, writer = _tp_rank(_resharded(model))
    first = writer and rank == 0  # one process cleans up, creates, indexes and publishes
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    where = dist.get_rank() if distributed else 0
    _agree(_attempt(first, path, where, clean_stale_temporaries, path), distributed)
    if os.path.exists(path):
        refusal = f"{path} exists; pass overwrite=True to replace it" if not overwrite else not_a_checkpoint(path)
        if refusal:
            raise CheckpointError(refusal)
    named, tied = _named_tensors(model, optimizer, extra_tensors, parts)
    tensors, mine = {}, []
    for name, (t, split) in sorted(named.items()):
        sharded = parts > 1 and split is not None
        local = layout.tp_local(t)  # every rank takes part: gathering FSDP shards is collective
        files = [rank_file(r, parts) for r in range(parts)] if sharded else [rank_file(0, parts)]
        tensors[name] = dict(shape=list(t.shape), dtype=DTYPES[t.dtype], split=split, files=files)
        if writer and (sharded or rank == 0):
            mine.append((name, local))
    sizes = [sum(t.numel() * t.element_size() for _, t in mine)]
    if distributed:
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, sum(t.numel() * t.element_size() for _, t in mine))
    needed = sum(sizes)
    if no_room(path, needed):  # every rank sees the same folder, so all refuse alike, before writing
        raise CheckpointError(no_room(path, needed))
    index = dict(format=FORMAT, id=uuid.uuid4().hex, config=asdict(model.config), tp=parts,
                 plan=plan or plan_name(model), tensors=tensors, tied=tied)
    if extra:
        index["extra"] = extra
    if optimizer is not None:
        index["optimizer_groups"] = optimizer_groups(optimizer, params_by_id(model))
    names = [index["id"], temporary_beside(path), index_sha256(index)]
    if distributed:
        dist.broadcast_object_list(names, src=0)  # rank 0's index is the one written; every file carries its hash
    ident, tmp, index_digest = names
    _agree(_attempt(first, path, where, os.makedirs, tmp), distributed)

    meta = dict(format=FORMAT, id=ident, rank=rank, tp=parts, index_sha256=index_digest)
    unfinished = tmp if first else None  # removed by rank 0 when any rank fails
    digest = _attempt(writer, path, where, _write_rank_file, os.path.join(tmp, rank_file(rank, parts)), mine, meta,
                      needed=needed)
    fault_point("save", (extra or {}).get("iter"))  # the tests' kill during a save: files written, no index
    digests = _agree(digest, distributed, remove=unfinished)
    files = {fname: d for digest in digests if digest for fname, d in digest.items()}
    failure = _attempt(first, path, where, _write_and_publish, tmp, path, dict(index, files=files), overwrite)
    _agree(failure, distributed, src=0, remove=unfinished)


def _attempt(runs, path, rank, step, *args, needed=None):
    """
    `step(*args)` where `runs`: its result, or, if it raised, the one line every rank is to
    raise (an OSError while writing `needed` bytes names the space). A step that only some
    ranks run must not raise there: the others would wait at the next collective until the
    process group's timeout.
    """
    if not runs:
        return None
    try:
        return step(*args)
    except Exception as e:
        reason = out_of_room(e, path, needed) if needed and isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        return f"saving {path} failed on rank {rank}: {reason}"


def _agree(outcome, distributed, src=None, remove=None):
    """
    Every rank's `_attempt` outcome (or rank `src`'s alone), exchanged: the first failure is
    raised on every rank alike, once `remove` (an unfinished directory) is deleted.
    """
    outcomes = [outcome]
    if distributed and src is None:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
    elif distributed:
        dist.broadcast_object_list(outcomes, src=src)
    failed = [o for o in outcomes if isinstance(o, str)]
    if failed:
        if remove:
            shutil.rmtree(remove, ignore_errors=True)
        raise CheckpointError(failed[0])
    return outcomes


def _write_rank_file(file, tensors, meta):
    """Write one rank's tensors, fsynced; its entries of the index's `files`."""
    with StreamingWriter(file, [(n, t.dtype, t.shape) for n, t in tensors], meta) as out:
        for n, t in tensors:
            out.write(n, t)
    return {os.path.basename(file): dict(sha256=sha256(file), bytes=os.path.getsize(file))}


def _write_and_publish(tmp, path, index, overwrite):
    write_index(tmp, index)
    publish(tmp, path, overwrite, not_a_checkpoint)


def _tp_group(params):
    """(process group, rank) of the model's TP mesh dimension, or (None, 0) when no parameter is sharded over one."""
    for p in params.values():
        if isinstance(p, DTensor) and "tp" in layout.mesh_dims(p):
            i = layout.mesh_dims(p)["tp"][0]
            return p.device_mesh.get_group(i), p.device_mesh.get_local_rank(i)
    return None, 0


def _non_finite_everywhere(counts, replicated, params):
    """
    {name: (NaNs, infinities)} over the whole tensors, from the counts of this rank's TP
    shards: summed over the TP group, so that every rank refuses alike when only one of them
    read the bad value (a replicated tensor, which every rank reads whole, counts on TP rank 0).
    """
    group, tp_rank = _tp_group(params)
    if group is None:
        return counts
    names = list(counts)
    device = next(p for p in params.values() if isinstance(p, DTensor)).to_local().device
    table = torch.tensor([(0, 0) if n in replicated and tp_rank else counts[n] for n in names],
                         dtype=torch.int64, device=device).reshape(len(names), 2)
    dist.all_reduce(table, group=group)
    return {n: tuple(row) for n, row in zip(names, table.tolist())}


def _refuse_overflow(path, dtype, overflows, replicated, params):
    """Refuse, on every rank alike, finite values `dtype` cannot hold ({name: (0, count)}): they would load as infinity."""
    cast = DTYPE_NAMES[dtype]
    beyond = [(name, n) for name, (_, n) in _non_finite_everywhere(overflows, replicated, params).items() if n]
    if beyond:
        name, n = beyond[0]
        raise CheckpointError(f"{path}: {name} holds {n} value{'s' if n > 1 else ''} beyond {dtype}'s range "
                              f"(±{torch.finfo(cast).max:g}), which would load as infinity; load it in fp32 or bf16")


def _scalar_state(optimizer, p, key, saved):
    """
    A scalar of optimizer state, where `Optimizer.load_state_dict` puts it
    (`_process_value_according_to_param_policy`): a fused or capturable optimizer's `step`
    as float32 on the parameter's device, whose kernels read it there; another's on the CPU
    as saved; any other scalar in the parameter's dtype and device.
    """
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    if key != "step":
        return torch.zeros((), dtype=p.dtype if p.is_floating_point() else saved, device=p.device)
    if group.get("fused") or group.get("capturable"):
        return torch.zeros((), dtype=torch.float32, device=p.device)
    return torch.zeros((), dtype=saved)


def load_checkpoint(model, path, verify=False, optimizer=None, dtype=None):
    """
    Load a checkpoint of any TP degree (or a Hugging Face GPT-2 directory, or a nanoGPT
    ckpt.pt) into `model`, parallelized at any TP degree or not, and with `optimizer` its
    saved optimizer state, placed where `optimizer.load_state_dict` would place it. `path`
    may be a source `open_source` returned, already validated (and verified if asked then):
    a caller that read its config to build the model loads it without opening it again,
    and closes it itself (`with source:`). `dtype` ("fp32", "bf16" or "fp16") casts the model's floating
    parameters and the values read into them; without it the checkpoint's dtypes must be the
    model's. `dtype="int8"` holds the blocks' and the head's Linear weights as int8 with a scale
    per output channel (`dtensor_gpt.int8`), quantised from a float checkpoint's values as they
    are read (a row-parallel weight's rows span ranks: their largest |w| is all-reduced) or read
    as they are from an int8 checkpoint; every other tensor, the scales too, takes the model's
    floating dtype (fp32 or bf16: the activations'). Everything is checked before a parameter
    changes (a refused int8 load gives the model back its float weights): the index
    against the hash its files carry, always (`verify` also hashes every file, which makes
    each rank read every byte), and every value this rank reads for NaN and infinity, which
    are refused naming the tensor on every rank alike. Returns
    {"bytes_read": bytes this rank read (about 1/TP of the sharded tensors plus the
    replicated ones), "extra": the saved JSON values, "extra_tensors": the saved tensors}.
    """
    if dtype is not None and dtype not in (*DTYPE_NAMES, "int8"):
        raise ValueError(f"dtype={dtype!r} is not a dtype to load into; give one of {', '.join(DTYPE_NAMES)}, int8")
    if dtype == "int8" and {p.dtype for p in model.parameters() if p.is_floating_point()} - {torch.float32, torch.bfloat16}:
        raise ValueError("dtype='int8' keeps the activations in the model's dtype, fp32 or bf16; "
                         "cast the model to one of them first")
    if dtype is not None and optimizer is not None:
        raise ValueError(f"dtype={dtype!r} casts a model for inference; load an optimizer's state without it")
    if isinstance(path, (str, os.PathLike)):
        with open_source(path, verify) as source:
            return load_checkpoint(model, source, optimizer=optimizer, dtype=dtype)
    if verify:
        raise ValueError(f"verify=True hashes the files as they are opened, but {path.path} is open already; "
                         f"open it with open_source({path.path!r}, verify=True)")
    ckpt, path = path, path.path
    params, tied = unique_parameters(_resharded(model))
    for field in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias"):
        have, want = getattr(model.config, field), ckpt.config[field]
        if have != want:
            raise CheckpointError(f"{path} is a model with {field}={want}, but this model has {field}={have}; "
                                  f"build it with GPTConfig({field}={want!r})")
    saved = {n for n in ckpt.tensors if not n.startswith(("optimizer.", "extra."))}
    int8_saved = sorted(n for n in saved if ckpt.tensors[n]["dtype"] == "I8")
    if int8_saved and dtype != "int8":
        raise CheckpointError(f"{path} holds int8 weights ({int8_saved[0]} and {len(int8_saved) - 1} more) with "
                              f"per-channel scales; load it with dtype='int8'")
    weights = q8.quantized_weights(params, tied) if dtype == "int8" else set()
    computed = {w + q8.SCALE for w in weights} if not int8_saved else set()  # from a float checkpoint's values
    expected = (set(params) | {w + q8.SCALE for w in weights}) - computed
    missing = sorted(expected - saved)
    unexpected = sorted(saved - expected - set(tied))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors missing from the checkpoint {missing}, unexpected in it {unexpected}")
    states = {}
    if optimizer is not None:
        for pname, p in params.items():
            keys = [n[len("optimizer."):-len(pname) - 1] for n in ckpt.tensors
                    if n.startswith("optimizer.") and n.endswith("." + pname)]
            if not keys:
                raise CheckpointError(f"{path} has no optimizer state for {pname}"
                                      f"{getattr(ckpt, 'optimizer_note', '') or '; it was saved without an optimizer'}")
            for key in keys:
                entry = ckpt.tensors[f"optimizer.{key}.{pname}"]
                if entry["shape"] not in ([], ckpt.tensors[pname]["shape"]):
                    raise CheckpointError(f"{path}: optimizer.{key}.{pname} has shape {entry['shape']}, neither a scalar "
                                          f"nor the parameter's {ckpt.tensors[pname]['shape']}")
            states[pname] = keys
    for name, p in params.items():
        if name in computed:
            continue
        entry = ckpt.tensors[name]
        if name in weights and entry["dtype"] not in ("I8", "F32", "BF16", "F16"):
            raise CheckpointError(f"{path}: tensor {name} is {entry['dtype']}, neither int8 nor a float to quantise")
        if dtype is None and TORCH_DTYPES[entry["dtype"]] != p.dtype:
            raise CheckpointError(
                f"{path}: tensor {name} is {entry['dtype']} in the checkpoint but {p.dtype} in the model; "
                f"convert it with python -m dtensor_gpt.reshard --dtype, or cast it on load with dtype="
            )
        shape, want = list(p.shape), list(entry["shape"])
        if shape != want:
            raise CheckpointError(f"{path}: tensor {name} has shape {want} in the checkpoint but {shape} in the model")
    restore = q8.quantize_linears(model) if dtype == "int8" else None  # int8 weights and scales, unset
    params, tied = unique_parameters(model)
    fresh = bool(on_meta(model))  # built on meta: nothing to keep, so its shards are allocated and read into directly
    if fresh:
        if dtype in DTYPE_NAMES:
            model.to(DTYPE_NAMES[dtype])
        allocate(model)  # the same parameter objects, now holding memory
    try:
        return _read_into(model, params, ckpt, path, states, dtype, optimizer, fresh, weights if computed else set())
    except CheckpointError:
        if restore:
            restore()  # the float weights the model had
        if fresh:
            allocate(model, "meta")  # refused: the model holds nothing again, as before the call
        raise


def _quantized(values, target, scale_target, params):
    """A float weight's values as int8, and its scale: whole rows' largest |w| (all-reduced where TP splits the rows)."""
    absmax = q8.row_absmax(values)
    split = layout.split_of(target)
    if split is not None and split["dim"] == 1:
        group, _ = _tp_group(params)
        absmax = absmax.to(local_values(target).device)
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=group)
        absmax = absmax.cpu()
    scale = q8.scales_of(absmax, scale_target.dtype)
    return q8.quantize(values, scale), scale


def _read_into(model, params, ckpt, path, states, dtype, optimizer, fresh, quantize=()):
    """
    Read this rank's values of every tensor, refuse NaN, infinity and overflow on every rank
    alike, then set them; the weights in `quantize` are read as floats and set as int8 with
    their scales.
    """
    staged, counts, overflows, replicated = {}, {}, {}, set()  # this rank's values, all read before any is used
    computed = {w + q8.SCALE for w in quantize}

    def stage(tname, target, values):
        values = layout.dp_chunk(values, target)
        if fresh:  # nothing to keep: read straight into the shard, never a second copy
            local_values(target).copy_(values)
        staged[tname] = (target, None if fresh else values)

    with torch.no_grad():
        for name, p in params.items():
            if name in computed:
                continue  # set with its weight
            targets = {name: p}
            for key in states.get(name, []):
                entry = ckpt.tensors[f"optimizer.{key}.{name}"]
                targets[f"optimizer.{key}.{name}"] = (torch.zeros_like(p) if entry["shape"]
                                                      else _scalar_state(optimizer, p, key, TORCH_DTYPES[entry["dtype"]]))
            for tname, target in targets.items():
                values = layout.shard_values(ckpt, tname, target)
                counts[tname] = non_finite(values)
                if dtype in DTYPE_NAMES:  # cast once, here; the finite values it turns infinite are counted
                    values = values.to(DTYPE_NAMES[dtype])
                    overflows[tname] = (0, non_finite(values)[1] - counts[tname][1])
                if layout.split_of(target) is None:
                    replicated.add(tname)
                if tname in quantize:
                    values, scale = _quantized(values, target, params[tname + q8.SCALE], params)
                    stage(tname + q8.SCALE, params[tname + q8.SCALE], scale)
                stage(tname, target, values.to(target.dtype))
        refuse_non_finite(path, _non_finite_everywhere(counts, replicated, params))
        if dtype in DTYPE_NAMES:
            _refuse_overflow(path, dtype, overflows, replicated, params)
            model.to(DTYPE_NAMES[dtype])  # in place: every parameter, tied or sharded, stays the same object
        for target, values in staged.values():
            if values is not None:
                local_values(target).copy_(values)
    for name, p in params.items():
        for key in states.get(name, []):
            optimizer.state[p][key] = staged[f"optimizer.{key}.{name}"][0]
    extra_tensors = {n[len("extra."):]: ckpt.read_full(n) for n in ckpt.tensors if n.startswith("extra.")}
    return dict(bytes_read=ckpt.bytes_read, extra=ckpt.extra, extra_tensors=extra_tensors)
