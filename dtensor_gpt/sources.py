"""
Checkpoint sources, all read tensor by tensor as global ranges: this project's checkpoints
(any TP degree), Hugging Face GPT-2 directories and nanoGPT ckpt.pt files.

Every source offers the same: `config` (GPTConfig fields), `tensors` (global entries by
name, AdamW's per-parameter state as `optimizer.<key>.<name>` where the source has it),
`optimizer_groups` (hyperparameters and parameter names per group, or None), `extra`
(JSON values: `chars` of a character model, `nanogpt` run state, a run's step), `read`.
"""

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from dtensor_gpt import layout
from dtensor_gpt.format import PADDED_FORMAT, Checkpoint, CheckpointError
from dtensor_gpt.safetensors_stream import DTYPES
from dtensor_gpt.tokenizers import chars_from_meta

CHARACTERS = "characters.json"  # a character model's vocabulary beside a Hugging Face export

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_FIELDS = dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="n_positions", vocab_size="vocab_size")


class _Source:
    """What writers and loaders read: config, tensors (global entries), read()."""

    id = None
    bytes_read = 0
    extra = {}
    plan = None
    optimizer_groups = None
    tied = {"lm_head.weight": "transformer.wte.weight"}

    def _entries(self, shapes, dtype):
        return {n: dict(shape=list(s), dtype=dtype, split=layout.canonical_split(n)) for n, s in shapes.items()}


class HFSource(_Source):
    """A Hugging Face GPT-2 directory; Conv1D weights are read transposed, slice by slice."""

    def __init__(self, path):
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        try:
            self.file = safe_open(os.path.join(path, "model.safetensors"), "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{os.path.join(path, 'model.safetensors')} cannot be read: {e}") from None
        self.config = {ours: hf[theirs] for ours, theirs in GPT2_FIELDS.items()}
        self.config.update(dropout=0.0, bias=True)
        self.activation = hf.get("activation_function", "gelu_new")
        keys = set(self.file.keys())
        self.prefix = "transformer." if "transformer.wte.weight" in keys else ""
        shapes, dtype = {}, None
        for name in gpt_names(self.config["n_layer"]):
            key = self.hf_key(name)
            if key not in keys:
                raise CheckpointError(f"{path}/model.safetensors lacks {key}; is this a GPT-2 checkpoint?")
            piece = self.file.get_slice(key)
            shape = list(piece.get_shape())
            shapes[name] = shape[::-1] if name.endswith(CONV1D) else shape
            dtype = piece.get_dtype()
        self.tensors = self._entries(shapes, dtype)
        if os.path.exists(os.path.join(path, CHARACTERS)):
            with open(os.path.join(path, CHARACTERS)) as f:
                self.extra = {"chars": json.load(f)}

    def hf_key(self, name):
        return self.prefix + name[len("transformer."):]

    def read(self, name, dim, start, stop):
        piece = self.file.get_slice(self.hf_key(name))
        if name.endswith(CONV1D):
            t = piece[(slice(None),) * (1 - dim) + (slice(start, stop),)].t().contiguous()
        else:
            t = piece[(slice(None),) * dim + (slice(start, stop),)]
        self.bytes_read += t.nbytes
        return t


class NanoGPTSource(_Source):
    """
    A nanoGPT ckpt.pt, memory-mapped and loaded with weights_only=True (no code runs), with
    its run state (iter_num, best_val_loss, config), its AdamW state, and the characters of
    a `meta.pkl` beside it.
    """

    def __init__(self, path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a loadable nanoGPT checkpoint: {e}") from None
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{path} has no 'model_args' and 'model': not a nanoGPT ckpt.pt")
        args = ckpt["model_args"]
        self.config = {f: args[f] for f in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")}
        self.config["dropout"] = 0.0
        state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
        names = gpt_names(self.config["n_layer"], self.config["bias"])
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"{path}: the model state lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
        self.state = state
        self.tensors = self._entries({n: state[n].shape for n in names}, DTYPES[state[names[0]].dtype])
        run = {k: ckpt[k] for k in ("iter_num", "best_val_loss", "config") if k in ckpt}
        if "best_val_loss" in run:
            run["best_val_loss"] = float(run["best_val_loss"])
        self.extra = {"nanogpt": run} if run else {}
        meta = os.path.join(os.path.dirname(path), "meta.pkl")
        if os.path.exists(meta):
            self.extra["chars"] = chars_from_meta(meta)
        self.optimizer_note = ""
        if "optimizer" in ckpt:
            self._adamw_state(ckpt["optimizer"], names)

    def _adamw_state(self, saved, names):
        """
        nanoGPT's `configure_optimizers` numbers parameters in two groups: those of 2 or more
        dimensions (decayed), then the rest, each in `named_parameters` order.
        """
        order = [n for n in names if len(self.state[n].shape) >= 2] + [n for n in names if len(self.state[n].shape) < 2]
        groups = saved.get("param_groups", [])
        ids = [i for g in groups for i in g["params"]]
        if [len(g["params"]) for g in groups] != [sum(len(self.state[n].shape) >= 2 for n in names),
                                                  sum(len(self.state[n].shape) < 2 for n in names)]:
            self.optimizer_note = ("; its optimizer groups are not nanoGPT's configure_optimizers grouping, "
                                   "so its state cannot be matched to parameters")
            return
        by_name = dict(zip(order, ids))
        for name, i in by_name.items():
            for key, value in saved["state"].get(i, {}).items():
                self.state[f"optimizer.{key}.{name}"] = value
                self.tensors[f"optimizer.{key}.{name}"] = dict(
                    shape=list(value.shape), dtype=DTYPES[value.dtype],
                    split=layout.canonical_split(name) if value.shape == self.state[name].shape else None)
        self.optimizer_groups = [
            {**{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k != "params"},
             "params": [order[ids.index(i)] for i in g["params"]]}
            for g in groups
        ]

    def read_full(self, name):
        t = self.state[name]
        self.bytes_read += t.nbytes
        return t

    def read(self, name, dim, start, stop):
        t = self.state[name].narrow(dim, start, stop - start)
        self.bytes_read += t.nbytes
        return t


def gpt_names(n_layer, bias=True):
    """Every parameter of the GPT in `named_parameters` order, lm_head left out (tied to wte)."""
    layers = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    kinds = ["weight", "bias"] if bias else ["weight"]
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.{layer}.{kind}" for layer in layers for kind in kinds]
    return names + [f"transformer.ln_f.{kind}" for kind in kinds]


class NativeSource(_Source):
    """
    A checkpoint of this project. One of format 1 shows its real vocabulary only: the rows
    it padded for TP are left out of the config and the shapes, and so never read.
    """

    def __init__(self, path, verify):
        self.ckpt = Checkpoint(path, verify)
        index = self.ckpt.index
        self.config, self.id, self.plan, self.tied = index["config"], index["id"], index["plan"], index["tied"]
        self.tensors = self.ckpt.tensors
        self.optimizer_groups = index.get("optimizer_groups")
        if index["format"] == PADDED_FORMAT:
            vocab = index["vocab_size_unpadded"]
            self.config = dict(self.config, vocab_size=vocab)
            self.tensors = {n: dict(e, shape=[vocab, *e["shape"][1:]]) if n.endswith("transformer.wte.weight") and e["shape"] else e
                            for n, e in self.tensors.items()}

    @property
    def bytes_read(self):
        return self.ckpt.bytes_read

    @property
    def extra(self):
        return self.ckpt.index.get("extra", {})

    def read_full(self, name):
        return self.ckpt.read_full(name)

    def read(self, name, dim, start, stop):
        return self.ckpt.read(name, dim, start, stop)


def open_source(path, verify=False):
    """The source at `path`: a checkpoint directory, a Hugging Face directory, a ckpt.pt or a directory holding one."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "index.json")):
        return NativeSource(path, verify)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        return HFSource(path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "ckpt.pt")):
        return NanoGPTSource(os.path.join(path, "ckpt.pt"))
    if os.path.isfile(path):
        return NanoGPTSource(path)
    raise CheckpointError(
        f"{path} is neither a checkpoint of this project (index.json), a Hugging Face GPT-2 directory "
        f"(config.json + model.safetensors) nor a nanoGPT ckpt.pt (or a directory holding one)"
    )


def activation_note(source, path):
    """What a user should know when weights were trained with another GELU than this model's exact one."""
    activation = getattr(source, "activation", "gelu")
    if activation == "gelu":
        return None
    return (f"note: {path} uses {activation} (tanh-approximated GELU); this GPT uses the exact GELU, "
            f"as nanoGPT does, so its logits differ slightly from the original's")
