"""
Offline checkpoint converter: any TP degree to any other, and GPT-2 / nanoGPT in and out.

    python -m dtensor_gpt.reshard SRC DST --tp M [--dtype fp32|bf16|fp16] [--to native|hf]
                                  [--overwrite] [--verify]

SRC is a checkpoint of this project (any TP degree), a Hugging Face GPT-2 directory
(config.json + model.safetensors) or a nanoGPT ckpt.pt. DST is written tensor by tensor
through memory maps (peak memory about one tensor), into a temporary directory beside it
that is renamed into place only when complete. No process group or torchrun is needed.
"""

import argparse
import json
import os
import shutil
import sys
import uuid

import torch

from dtensor_gpt import layout
from dtensor_gpt.format import FORMAT, CheckpointError, not_a_checkpoint, rank_file, sha256, write_index
from dtensor_gpt.model import GPTConfig
from dtensor_gpt.parallelize import check_divisible
from dtensor_gpt.publish import clean_stale_temporaries, publish, temporary_beside
from dtensor_gpt.safetensors_stream import DTYPES, TORCH_DTYPES, StreamingWriter
from dtensor_gpt.sources import CONV1D, activation_note, gpt_names, open_source

DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    check_divisible(GPTConfig(**{f: source.config[f] for f in GPTConfig.__dataclass_fields__}), tp)
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
        with StreamingWriter(path, entries, dict(format=FORMAT, id=ident, rank=rank, tp=tp)) as writer:
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
    config = {f: source.config[f] for f in GPTConfig.__dataclass_fields__}
    index = dict(format=FORMAT, id=ident, config=config, tp=tp, plan=source.plan,
                 tensors=tensors, tied=source.tied, files=digests)
    if source.extra:
        index["extra"] = source.extra
    write_index(tmp, index)


def write_hf(source, tmp, dtype=None, progress_label="export"):
    """Write `source` into the new directory `tmp` as a Hugging Face GPT-2 directory."""
    c = source.config
    if not c.get("bias", True):
        raise CheckpointError("GPT-2 has biases everywhere; a model with bias=False cannot be exported to it")
    os.makedirs(tmp)
    names = gpt_names(c["n_layer"])
    shapes = {}
    for n in names:
        shape = list(source.tensors[n]["shape"])
        if n == "transformer.wte.weight":
            shape[0] = c["vocab_size"]
        shapes[n] = shape[::-1] if n.endswith(CONV1D) else shape
    dtypes = {n: dtype or TORCH_DTYPES[source.tensors[n]["dtype"]] for n in names}
    progress = Progress(len(names), progress_label)
    path = os.path.join(tmp, "model.safetensors")
    with StreamingWriter(path, [(n, dtypes[n], shapes[n]) for n in names], {"format": "pt"}) as writer:
        for n in names:
            t = source.read(n, 0, 0, c["vocab_size"] if n == "transformer.wte.weight" else source.tensors[n]["shape"][0])
            writer.write(n, (t.t() if n.endswith(CONV1D) else t).to(dtypes[n]))
            progress.step()
    hf_config = dict(
        model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=c["n_layer"], n_head=c["n_head"],
        n_embd=c["n_embd"], n_positions=c["block_size"], n_ctx=c["block_size"], vocab_size=c["vocab_size"],
        layer_norm_epsilon=1e-5, activation_function="gelu",  # nanoGPT's nn.GELU() is the exact GELU
        tie_word_embeddings=True, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def convert(src, dst, tp=1, dtype=None, to="native", overwrite=False, verify=False):
    """The converter as a function; returns the source (for reporting)."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointError("SRC and DST are the same path; write to a new directory")
    clean_stale_temporaries(dst)
    if os.path.exists(dst):
        refusal = f"{dst} exists; pass --overwrite to replace it" if not overwrite else not_a_checkpoint(dst)
        if refusal:
            raise CheckpointError(refusal)
    if not isinstance(tp, int) or tp < 1:
        raise CheckpointError(f"--tp {tp} must be a positive integer")
    source = open_source(src, verify)
    if activation_note(source, src):
        print(activation_note(source, src), file=sys.stderr)
    tmp = temporary_beside(dst)
    try:
        write_hf(source, tmp, dtype) if to == "hf" else write_native(source, tmp, tp, dtype)
        publish(tmp, dst, overwrite, not_a_checkpoint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return source


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m dtensor_gpt.reshard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--tp", type=int, default=1, help="TP degree of the output (native format)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="cast every tensor (default: keep)")
    parser.add_argument("--to", choices=["native", "hf"], default="native")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true", help="check each source file's sha256 against its index")
    args = parser.parse_args(argv)
    try:
        convert(args.src, args.dst, args.tp, DTYPE_NAMES.get(args.dtype), args.to, args.overwrite, args.verify)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
