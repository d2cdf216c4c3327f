"""
Offline checkpoint converter: any TP degree to any other, and GPT-2 / nanoGPT in and out.

    python -m dtensor_gpt.reshard SRC DST [--tp M] [--dtype fp32|bf16|fp16|int8] [--to native|hf|nanogpt]
                                  [--overwrite] [--no-verify]

SRC is a checkpoint of this project (any TP degree), a Hugging Face GPT-2 directory
(config.json + model.safetensors) or a nanoGPT ckpt.pt (or its out_dir). DST is written tensor by tensor
through memory maps (peak memory about one tensor), into a temporary directory beside it
that is renamed into place only when complete. No process group or torchrun is needed.

--dtype int8 writes the blocks' and the head's Linear weights as int8 with a scale per output
channel (`dtensor_gpt.int8`; the rest keeps its dtype, optimizer state is dropped), which
`load_checkpoint(..., dtype="int8")` reads; an int8 checkpoint reshards to any TP degree
unchanged, bit for bit. It cannot be exported (--to hf or nanogpt hold float weights) nor cast
back to floats (the values it was quantised from are gone): both are refused.

The converter writes fresh checksums for what it writes, so it must never be handed corrupted
bytes: by default every source byte is checked against the source's own checksums first
(each rank file's sha256, each ckpt.pt record's CRC-32; a Hugging Face directory carries
none), and every tensor it reads for NaN and infinity. --no-verify skips the checksums only.

Exit status 2 is a bad argument, refused before anything is written, with its usage: a value
argparse refuses, --tp other than 1 with an export, SRC missing, DST existing without
--overwrite (or, with it, not a checkpoint or export it may replace), DST overlapping SRC,
--tp not dividing SRC's n_head, an int8 SRC exported or cast, --dtype int8 with an export. Exit status 1 is a failed conversion: SRC cannot be read as a
checkpoint (not one, damaged, failing its checksums, holding NaN or infinity) or writing DST
failed (no room, an I/O error).
"""

import argparse
import json
import math
import os
import pickle
import shutil
import sys
import uuid

import torch

from dtensor_gpt import layout
from dtensor_gpt.cli import integer
from dtensor_gpt.int8 import QuantizedSource, holds_int8
from dtensor_gpt.format import FORMAT, CheckpointError, index_sha256, not_a_checkpoint, rank_file, sha256, write_index
from dtensor_gpt.model import GPTConfig
from dtensor_gpt.parallelize import check_divisible
from dtensor_gpt.publish import (
    check_apart,
    clean_stale_temporaries,
    no_room,
    not_a_real_directory,
    out_of_room,
    publish,
    temporary_beside,
    write_file,
)
from dtensor_gpt.safetensors_stream import DTYPE_NAMES, DTYPES, TORCH_DTYPES, StreamingWriter
from dtensor_gpt.sources import CHARACTERS, CONV1D, activation_note, gpt_names, non_finite, open_source, refuse_non_finite


class BadArgument(CheckpointError):
    """An argument the paths it names refuse; `main` reports it as argparse does a bad value (exit status 2)."""


class Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total, label):
        self.total, self.done, self.label, self.on = total, 0, label, sys.stderr.isatty()

    def step(self, n=1):
        self.done += n
        if self.on:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def write_native(source, tmp, tp, dtype=None, progress_label="reshard"):
    """Write `source` into the new directory `tmp` as a checkpoint at degree `tp`, rank file by rank file."""
    ident = source.id or uuid.uuid4().hex
    os.makedirs(tmp)
    tensors = {}
    for name, entry in sorted(source.tensors.items()):
        shape = list(entry["shape"])
        split = entry["split"]
        if tp > 1 and not layout.divides(shape[split["dim"]] if split else 0, split, tp):
            raise CheckpointError(f"tensor {name} of shape {shape} cannot be split {split} over tp={tp}")
        files = [rank_file(r, tp) for r in range(tp)] if tp > 1 and split else [rank_file(0, tp)]
        cast = dtype and entry["dtype"] in ("F32", "F16", "BF16") and not name.startswith(("extra.", "optimizer.step."))
        tensors[name] = dict(shape=shape, dtype=DTYPES[dtype] if cast else entry["dtype"], split=split, files=files)
    config = {f: source.config[f] for f in GPTConfig.__dataclass_fields__}
    index = dict(format=FORMAT, id=ident, config=config, tp=tp, plan=source.plan, tensors=tensors, tied=source.tied)
    if source.extra:
        index["extra"] = source.extra
    if source.optimizer_groups:
        index["optimizer_groups"] = source.optimizer_groups
    digest = index_sha256(index)
    progress = Progress(sum(len(e["files"]) for e in tensors.values()), progress_label)
    digests = {}
    for rank in range(tp):
        fname = rank_file(rank, tp)
        mine = [n for n, e in tensors.items() if fname in e["files"]]
        parts = {n: (tp if len(tensors[n]["files"]) > 1 else 1) for n in mine}
        entries = [(n, TORCH_DTYPES[tensors[n]["dtype"]],
                    layout.local_shape(tensors[n]["shape"], tensors[n]["split"], parts[n], rank if parts[n] > 1 else 0))
                   for n in mine]
        path = os.path.join(tmp, fname)
        with StreamingWriter(path, entries, dict(format=FORMAT, id=ident, rank=rank, tp=tp, index_sha256=digest)) as writer:
            for n in mine:
                split, shape = tensors[n]["split"], tensors[n]["shape"]
                if not shape:
                    t = source.read_full(n)
                else:
                    if parts[n] > 1:
                        dim, ranges = split["dim"], layout.intervals(shape[split["dim"]], split, tp, rank)
                    else:
                        dim, ranges = 0, [(0, shape[0])]
                    t = torch.cat([source.read(n, dim, a, b) for a, b in ranges], dim)
                writer.write(n, t.to(TORCH_DTYPES[tensors[n]["dtype"]]))
                progress.step()
        digests[fname] = dict(sha256=sha256(path), bytes=os.path.getsize(path))
    write_index(tmp, dict(index, files=digests))


def write_hf(source, tmp, dtype=None, progress_label="export"):
    """
    Write `source` into the new directory `tmp` as a Hugging Face GPT-2 directory. A model
    without biases gets zero biases (GPT-2 has them everywhere; zeros change nothing), and a
    character model's characters go to characters.json.
    """
    c = source.config
    os.makedirs(tmp)
    names = gpt_names(c["n_layer"])
    shapes = {n: list(source.tensors[n.replace(".bias", ".weight")]["shape"][:1 if n.endswith(".bias") else None])
              for n in names}
    dtypes = {n: dtype or TORCH_DTYPES[source.tensors[n.replace(".bias", ".weight")]["dtype"]] for n in names}
    progress = Progress(len(names), progress_label)
    path = os.path.join(tmp, "model.safetensors")
    entries = [(n, dtypes[n], shapes[n][::-1] if n.endswith(CONV1D) else shapes[n]) for n in names]
    with StreamingWriter(path, entries, {"format": "pt"}) as writer:
        for n in names:
            if n in source.tensors:
                t = source.read(n, 0, 0, shapes[n][0])
            else:
                t = torch.zeros(shapes[n])
            writer.write(n, (t.t() if n.endswith(CONV1D) else t).to(dtypes[n]))
            progress.step()
    end_of_text = 50256 if c["vocab_size"] > 50256 else None  # GPT-2's <|endoftext|>; a character model has none
    hf_config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=c["n_layer"], n_head=c["n_head"],
        n_embd=c["n_embd"], n_positions=c["block_size"], n_ctx=c["block_size"], vocab_size=c["vocab_size"],
        layer_norm_epsilon=1e-5, activation_function="gelu",  # nanoGPT's nn.GELU() is the exact GELU
        tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=end_of_text, eos_token_id=end_of_text,
    )
    write_file(os.path.join(tmp, "config.json"), json.dumps(hf_config, indent=1))
    if source.extra.get("chars"):
        write_file(os.path.join(tmp, CHARACTERS), json.dumps(source.extra["chars"]))


def nanogpt_optimizer(source, names, dtype):
    """
    AdamW's state dict as nanoGPT's `configure_optimizers` numbers it (parameters of 2 or
    more dimensions first, then the rest), or None if `source` lacks any parameter's state.
    """
    keys = [n.split(".")[1] for n in source.tensors if n.startswith("optimizer.") and n.endswith("." + names[0])]
    if not keys or any(f"optimizer.{k}.{n}" not in source.tensors for k in keys for n in names):
        return None
    groups = [[n for n in names if len(source.tensors[n]["shape"]) >= 2],
              [n for n in names if len(source.tensors[n]["shape"]) < 2]]
    order = groups[0] + groups[1]
    recorded = {n: g for g in source.optimizer_groups or [] for n in g["params"]}
    state = {}
    for i, n in enumerate(order):
        state[i] = {}
        for k in keys:
            entry = source.tensors[f"optimizer.{k}.{n}"]
            t = source.read_full(f"optimizer.{k}.{n}") if not entry["shape"] else source.read(f"optimizer.{k}.{n}", 0, 0, entry["shape"][0])
            state[i][k] = t.to(dtype) if dtype and entry["shape"] else t.clone()
    param_groups, first = [], 0
    for group in groups:
        hyper = {k: tuple(v) if k == "betas" else v for k, v in recorded.get(group[0], {}).items() if k != "params"}
        param_groups.append({**hyper, "params": list(range(first, first + len(group)))})
        first += len(group)
    return {"state": state, "param_groups": param_groups}


def write_nanogpt(source, tmp, dtype=None, progress_label="export"):
    """
    Write `source` into the new directory `tmp` as nanoGPT's `out_dir`: ckpt.pt (model_args,
    model, optimizer where the source has its state, iter_num, best_val_loss, config) that
    nanoGPT's own train.py and sample.py load, and meta.pkl for a character model.
    """
    c = source.config
    os.makedirs(tmp)
    names = gpt_names(c["n_layer"], c["bias"])
    progress = Progress(len(names), progress_label)
    model = {}
    for n in names:
        t = source.read(n, 0, 0, source.tensors[n]["shape"][0])
        model[n] = t.to(dtype) if dtype else t.clone()
        progress.step()
    model["lm_head.weight"] = model["transformer.wte.weight"]
    run = source.extra.get("nanogpt", {})
    config = dict(run.get("config", {}))
    if source.extra.get("dataset"):
        config.setdefault("dataset", source.extra["dataset"])
    ckpt = dict(
        model=model,
        model_args={f: c[f] for f in ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")},
        iter_num=run.get("iter_num", source.extra.get("iter", 0)),
        best_val_loss=torch.tensor(run.get("best_val_loss", source.extra.get("best_val_loss", 1e9))),
        config=config,
    )
    optimizer = nanogpt_optimizer(source, names, dtype)
    if optimizer is not None:
        ckpt["optimizer"] = optimizer
    with open(os.path.join(tmp, "ckpt.pt"), "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    chars = source.extra.get("chars")
    if chars:
        meta = dict(vocab_size=len(chars), itos=dict(enumerate(chars)), stoi={ch: i for i, ch in enumerate(chars)})
        with open(os.path.join(tmp, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())


EXPORTS = {"hf": (write_hf, ("config.json", "model.safetensors", CHARACTERS)), "nanogpt": (write_nanogpt, ("ckpt.pt", "meta.pkl"))}


def replaceable(to):
    """Whether a destination may be replaced: a checkpoint of this format, or an earlier export of the same kind."""
    if to == "native":
        return not_a_checkpoint

    def check(path):
        if not_a_real_directory(path):
            return not_a_real_directory(path)
        foreign = sorted(set(os.listdir(path)) - set(EXPORTS[to][1]))
        if foreign:
            return f"{path} holds {foreign}, which a --to {to} export does not write; refusing to replace it"
        return None

    return check


class FiniteReads:
    """A source whose every read is refused if it holds NaN or infinity, naming the tensor."""

    def __init__(self, source, path):
        self.source, self.path = source, path

    def __getattr__(self, name):
        return getattr(self.source, name)

    def read_full(self, name):
        return self._finite(name, self.source.read_full(name))

    def read(self, name, dim, start, stop):
        return self._finite(name, self.source.read(name, dim, start, stop))

    def _finite(self, name, t):
        refuse_non_finite(self.path, {name: non_finite(t)})
        return t


def check_arguments(src, dst, tp, to, overwrite):
    """Refuse, as a BadArgument, what the arguments ask of the paths they name, before anything is read."""
    if not isinstance(tp, int) or tp < 1:
        raise BadArgument(f"--tp {tp} must be a positive integer")
    if to != "native" and tp != 1:
        raise BadArgument(f"--tp {tp} applies to --to native only: a --to {to} export holds the whole model, "
                          f"as --tp 1 does; drop --tp")
    if not os.path.exists(src):
        raise BadArgument(f"{src} does not exist")
    try:
        check_apart(src, dst)
    except ValueError as e:
        raise BadArgument(str(e)) from None
    clean_stale_temporaries(dst)
    if os.path.exists(dst):
        refusal = f"{dst} exists; pass --overwrite to replace it" if not overwrite else replaceable(to)(dst)
        if refusal:
            raise BadArgument(refusal)


def convert(src, dst, tp=None, dtype=None, to="native", overwrite=False, verify=True):
    """The converter as a function; returns the source (for reporting)."""
    tp = 1 if tp is None else tp
    check_arguments(src, dst, tp, to, overwrite)
    source = FiniteReads(open_source(src, verify), src)
    try:
        check_divisible(GPTConfig(**{f: source.config[f] for f in GPTConfig.__dataclass_fields__}), tp)
    except ValueError as e:
        raise BadArgument(f"{src}: {e}") from None
    refusal = int8_refusal(source, src, dtype, to)
    if refusal:
        raise BadArgument(refusal)
    if dtype == torch.int8:
        source, dtype = source if holds_int8(source) else QuantizedSource(source), None
    if activation_note(source, src):
        print(activation_note(source, src), file=sys.stderr)
    needed = output_bytes(source, dtype, to)
    if no_room(dst, needed):
        raise CheckpointError(no_room(dst, needed))
    tmp = temporary_beside(dst)
    try:
        if to == "native":
            write_native(source, tmp, tp, dtype)
        else:
            EXPORTS[to][0](source, tmp, dtype)
        publish(tmp, dst, overwrite, replaceable(to))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(out_of_room(e, dst, needed)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return source


def int8_refusal(source, src, dtype, to):
    """Why int8 cannot go where asked: into an export, which holds float weights, or cast back to floats; or None."""
    if dtype == torch.int8 and to != "native":
        return f"--dtype int8 writes this project's checkpoints only (--to native): a --to {to} export holds float weights"
    if holds_int8(source) and to != "native":
        return (f"{src} holds int8 weights with per-channel scales, which a --to {to} export cannot hold (it holds "
                f"float weights); export the fp32 or bf16 checkpoint it was quantised from")
    if holds_int8(source) and dtype not in (None, torch.int8):
        return (f"{src} holds int8 weights: --dtype {next(k for k, v in DTYPE_NAMES.items() if v == dtype)} would not give back the values they were "
                f"quantised from; reshard it without --dtype, or convert the checkpoint it was quantised from")
    return None


def output_bytes(source, dtype, to):
    """About what the output takes on disk: every tensor written (a Hugging Face export keeps only the model)."""
    names = [n for n in source.tensors if to != "hf" or not n.startswith(("optimizer.", "extra."))]
    return sum(math.prod(source.tensors[n]["shape"]) * (dtype or TORCH_DTYPES[source.tensors[n]["dtype"]]).itemsize
               for n in names)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dtensor_gpt.reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--tp", type=integer(1), help="TP degree of the output; an export (--to hf or nanogpt) "
                                                      "holds the whole model, --tp 1 (default: 1)")
    parser.add_argument("--dtype", choices=[*sorted(DTYPE_NAMES), "int8"],
                        help="cast every tensor; int8: the Linear weights as int8 with per-channel scales, the rest "
                             "kept (default: keep)")
    parser.add_argument("--to", choices=["native", *EXPORTS], default="native",
                        help="native: this project's checkpoint at --tp; hf: a Hugging Face GPT-2 directory; "
                             "nanogpt: nanoGPT's out_dir (ckpt.pt, meta.pkl) (default: native)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="check every source byte against the source's checksums before converting: each rank "
                             "file's sha256, each ckpt.pt record's CRC-32 (default; --no-verify skips it)")
    args = parser.parse_args(argv)
    try:
        dtype = torch.int8 if args.dtype == "int8" else DTYPE_NAMES.get(args.dtype)
        convert(args.src, args.dst, args.tp, dtype, args.to, args.overwrite, args.verify)
    except BadArgument as e:
        parser.error(str(e))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
