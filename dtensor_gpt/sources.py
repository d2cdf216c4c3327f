"""
Checkpoint sources, all read tensor by tensor as global ranges: this project's checkpoints
(any TP degree), Hugging Face GPT-2 directories and nanoGPT ckpt.pt files.

Every source offers the same: `config` (GPTConfig fields), `tensors` (global entries by
name, AdamW's per-parameter state as `optimizer.<key>.<name>` where the source has it),
`optimizer_groups` (hyperparameters and parameter names per group, or None), `extra`
(JSON values: `chars` of a character model, `nanogpt` run state, a run's step), `read`.

A source is checked whole when it opens, before anything is built from it: every config
value by type and range, and against the tensors it describes (n_layer against the blocks
present, n_embd and n_head against c_attn and the rest, vocab_size against wte, block_size
against wpe), with no tensor missing and none left over. A config that disagrees with its
weights would otherwise build a model that silently drops blocks, or reads bytes as the
wrong shapes, or allocates for a million layers.
"""

import json
import os
import re
import zipfile

import torch
from safetensors import SafetensorError, safe_open

from dtensor_gpt import int8, layout
from dtensor_gpt.format import (
    DAMAGED,
    INDEX,
    PADDED_FORMAT,
    SIZES,
    Checkpoint,
    CheckpointError,
    check_config,
    count,
    read_json,
    regular_file,
)
from dtensor_gpt.safetensors_stream import DTYPES
from dtensor_gpt.tokenizers import chars_from_meta

CHARACTERS = "characters.json"  # a character model's vocabulary beside a Hugging Face export

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_FIELDS = dict(n_layer="n_layer", n_head="n_head", n_embd="n_embd", block_size="n_positions", vocab_size="vocab_size")
NANOGPT_FIELDS = (*SIZES, "bias")
FLOATS = ("F32", "F16", "BF16")
# What GPT-2's config.json may say that this GPT cannot compute otherwise; its own defaults.
GPT2_FIXED = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, layer_norm_epsilon=1e-5)
GPT2_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh")  # the exact GELU, and its tanh approximation
BLOCK = re.compile(r"transformer\.h\.(\d+)\.")
# Buffers, not parameters: the causal masks of nanoGPT (without flash attention) and of older GPT-2 files.
MASKS = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def gpt_names(n_layer, bias=True):
    """Every parameter of the GPT in `named_parameters` order, lm_head left out (tied to wte)."""
    layers = ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"]
    kinds = ["weight", "bias"] if bias else ["weight"]
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(n_layer):
        names += [f"transformer.h.{i}.{layer}.{kind}" for layer in layers for kind in kinds]
    return names + [f"transformer.ln_f.{kind}" for kind in kinds]


def gpt_shapes(config):
    """{parameter name: shape} of the GPT `config` describes."""
    C = config["n_embd"]
    inner = {"attn.c_attn": [3 * C, C], "mlp.c_fc": [4 * C, C], "attn.c_proj": [C, C], "mlp.c_proj": [C, 4 * C]}
    shapes = {"transformer.wte.weight": [config["vocab_size"], C], "transformer.wpe.weight": [config["block_size"], C]}
    for name in gpt_names(config["n_layer"], config["bias"]):
        module, kind = name.rsplit(".", 1)
        matrix = inner.get(module.split(".", 3)[-1], [C])
        shapes.setdefault(name, matrix if kind == "weight" else matrix[:1])
    return shapes


def _few(names):
    return f"{names[:4]}{f' and {len(names) - 4} more' if len(names) > 4 else ''}"


def check_weights(config, shapes, where, fix, names=None, masks=False):
    """
    The model tensors a source holds ({name: shape}) are exactly those of the GPT its config
    describes, shape by shape; with `masks`, causal-mask buffers are allowed (and dropped) in
    the blocks the config has. Blocks are counted before anything of size n_layer is made,
    so an n_layer of 10^6 costs nothing.
    """
    names = names or {}
    blocks = sorted({int(m[1]) for n in shapes if (m := BLOCK.match(n))})
    n_layer = config["n_layer"]
    if len(blocks) != n_layer or blocks[-1] != n_layer - 1:
        if blocks == [0]:
            held = "1 block, transformer.h.0"
        elif blocks == list(range(len(blocks))):
            held = f"{len(blocks)} blocks, transformer.h.0 to transformer.h.{blocks[-1]}"
        else:
            held = f"blocks {_few(blocks)}" if blocks else "no blocks"
        raise CheckpointError(f"{where}: {names.get('n_layer', 'n_layer')} is {n_layer}, but the weights hold {held}; {fix}")
    expected = gpt_shapes(config)
    shapes = {n: s for n, s in shapes.items() if not (masks and MASKS.fullmatch(n))}
    missing = [n for n in expected if n not in shapes]
    unexpected = [n for n in shapes if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors missing from the checkpoint {_few(missing)}, unexpected in it "
                              f"{_few(unexpected)}, for a GPT with n_layer={n_layer} and bias={config['bias']}; {fix}")
    for name, want in expected.items():
        if list(shapes[name]) != want:
            fields = {"transformer.wte.weight": ("vocab_size", "n_embd"), "transformer.wpe.weight": ("block_size", "n_embd")}
            given = " and ".join(f"{names.get(f, f)}={config[f]}" for f in fields.get(name, ("n_embd",)))
            raise CheckpointError(f"{where}: {name} has shape {list(shapes[name])}, but {given} make it {want}; {fix}")


def check_optimizer_state(tensors, where, fix):
    """Each `optimizer.<key>.<parameter>` belongs to a parameter, as a scalar or in the parameter's shape."""
    for name, entry in tensors.items():
        if name.startswith("optimizer."):
            param = name.split(".", 2)[-1]
            if param not in tensors or entry["shape"] not in ([], tensors[param]["shape"]):
                raise CheckpointError(f"{where}: {name} has shape {entry['shape']}, but it must be the optimizer state "
                                      f"of a parameter, a scalar or in the parameter's shape; {fix}")


class _Source:
    """What writers and loaders read: config, tensors (global entries), read()."""

    id = None
    bytes_read = 0
    extra = {}
    plan = None
    optimizer_groups = None
    tied = dict(int8.NANOGPT_TIED)

    def close(self):
        """Release the files read from now, not whenever the garbage collector gets to them."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _entries(self, shapes, dtypes, where):
        unusable = {n: dtypes[n] for n in shapes if dtypes[n] not in FLOATS}
        if unusable:
            name, dtype = next(iter(unusable.items()))
            raise CheckpointError(f"{where}: {name} is {dtype}, but weights must be one of {list(FLOATS)}; "
                                  f"convert the file to float32 first")
        return {n: dict(shape=list(s), dtype=dtypes[n], split=layout.canonical_split(n)) for n, s in shapes.items()}


class HFSource(_Source):
    """
    A Hugging Face GPT-2 directory; Conv1D weights are read transposed, slice by slice. Such
    a directory carries no checksum, so its bytes can be checked for finite values only.
    """

    def __init__(self, path):
        self.path = path
        where = os.path.join(path, "config.json")
        fix = "correct config.json, or use the weights it was written for"
        hf = read_json(where)
        if not isinstance(hf, dict):
            raise CheckpointError(f"{where} holds a JSON {type(hf).__name__}, not an object; {fix}")
        lacking = [theirs for theirs in GPT2_FIELDS.values() if theirs not in hf]
        if lacking:
            raise CheckpointError(f"{where} lacks {lacking}, which a GPT-2 config.json holds; {fix}")
        self.config = {ours: hf[theirs] for ours, theirs in GPT2_FIELDS.items()}
        self.config.update(dropout=0.0, bias=True)
        check_config(self.config, where, fix, GPT2_FIELDS)
        fixed = dict(GPT2_FIXED, tie_word_embeddings=True)
        if hf.get("n_inner") is not None:
            fixed["n_inner"] = 4 * self.config["n_embd"]  # GPT-2's MLP width, what null means
        for field, value in fixed.items():
            if hf.get(field, value) != value:
                raise CheckpointError(f"{where}: {field} is {hf[field]!r}, but this GPT computes only {field}={value!r} "
                                      f"(as GPT-2 and nanoGPT do), so it cannot run this model")
        self.activation = hf.get("activation_function", "gelu_new")
        if self.activation not in GPT2_ACTIVATIONS:
            raise CheckpointError(f"{where}: activation_function is {self.activation!r}, but this GPT computes GELU "
                                  f"({', '.join(GPT2_ACTIVATIONS)}), so it cannot run this model")
        file = os.path.join(path, "model.safetensors")
        if not os.path.lexists(file):
            raise CheckpointError(f"{file} is missing: a Hugging Face GPT-2 directory holds its weights there")
        try:
            self.file = safe_open(regular_file(file), "pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} cannot be read: {e}") from None
        try:
            keys = set(self.file.keys())
            self.prefix = "transformer." if "transformer.wte.weight" in keys else ""
            shapes, dtypes = {}, {}
            for key in keys:
                name = key if key.startswith("transformer.") or key == "lm_head.weight" else "transformer." + key
                piece = self.file.get_slice(key)
                shape = list(piece.get_shape())
                shapes[name] = shape[::-1] if name.endswith(CONV1D) else shape
                dtypes[name] = piece.get_dtype()
            if "lm_head.weight" in shapes and shapes["lm_head.weight"] != shapes.get("transformer.wte.weight"):
                raise CheckpointError(f"{file}: lm_head.weight has shape {shapes['lm_head.weight']}, not wte's; this GPT ties them")
            shapes.pop("lm_head.weight", None)  # tied to wte, as transformers ties it: GPT2LMHeadModel never reads it
            check_weights(self.config, shapes, where, fix, GPT2_FIELDS, masks=True)
            self.tensors = self._entries({n: shapes[n] for n in gpt_names(self.config["n_layer"])}, dtypes, file)
            if os.path.lexists(os.path.join(path, CHARACTERS)):
                chars = read_json(os.path.join(path, CHARACTERS))
                if not isinstance(chars, list) or not all(isinstance(c, str) for c in chars):
                    raise CheckpointError(f"{os.path.join(path, CHARACTERS)} must be a JSON list of the model's characters in id order")
                self.extra = {"chars": chars}
        except BaseException:
            self.close()
            raise

    def close(self):
        self.file.__exit__(None, None, None)

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


def check_archive(path):
    """
    Refuse a file that is not a torch.save archive (a zip, as every nanoGPT ckpt.pt is) before
    torch.load sees it: torch answers a text file with advice on saving one.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read: {e.strerror}") from None
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a checkpoint directory of this project, a Hugging Face GPT-2 directory "
                              f"or a nanoGPT ckpt.pt (it is not a torch.save archive); give one of those")


def check_crc32(path):
    """
    Every record of a torch.save archive against its CRC-32 (torch.load checks none, so a
    flipped byte loads silently). An archive written with torch's compute_crc32 off has
    0 for every record: it carries nothing to check.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(info.CRC for info in archive.infolist()):
                return
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(f"{path} is not a torch.save archive that can be read whole: {e}") from None
    if damaged:
        raise CheckpointError(f"{path}: its record {damaged} fails its CRC-32 check: the file is corrupted; "
                              f"use an intact copy")


class NanoGPTSource(_Source):
    """
    A nanoGPT ckpt.pt, memory-mapped and loaded with weights_only=True (no code runs), with
    its run state (iter_num, best_val_loss, config), its AdamW state, and the characters of
    a `meta.pkl` beside it. With `verify`, every record's CRC-32 is checked first.
    """

    def __init__(self, path, verify=False):
        self.path = path
        check_archive(regular_file(path))
        if verify:
            check_crc32(path)
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a loadable nanoGPT checkpoint: {e}") from None
        if not isinstance(ckpt, dict) or "model_args" not in ckpt or "model" not in ckpt:
            raise CheckpointError(f"{path} has no 'model_args' and 'model': not a nanoGPT ckpt.pt")
        fix = "the checkpoint is damaged, or was not written by nanoGPT's train.py"
        args, model = ckpt["model_args"], ckpt["model"]
        if not isinstance(args, dict):
            raise CheckpointError(f"{path}: model_args is a {type(args).__name__}, not a dict; {fix}")
        lacking = [f for f in NANOGPT_FIELDS if f not in args]
        if lacking:
            raise CheckpointError(f"{path}: model_args lacks {lacking}; {fix}")
        self.config = {f: args[f] for f in NANOGPT_FIELDS}
        self.config["dropout"] = 0.0
        names = {f: f"model_args[{f!r}]" for f in NANOGPT_FIELDS}
        check_config(self.config, path, fix, names)
        if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
            raise CheckpointError(f"{path}: model must map parameter names to tensors; {fix}")
        state = {k.removeprefix("_orig_mod."): v for k, v in model.items()}
        lm_head, wte = state.get("lm_head.weight"), state.get("transformer.wte.weight")
        if lm_head is not None and not (wte is not None and lm_head.shape == wte.shape and
                                        (lm_head.data_ptr() == wte.data_ptr() or torch.equal(lm_head, wte))):
            raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, but this GPT ties them; {fix}")
        check_weights(self.config, {n: list(t.shape) for n, t in state.items() if n != "lm_head.weight"}, path, fix, names,
                      masks=True)
        names = gpt_names(self.config["n_layer"], self.config["bias"])
        self.state = state
        self.tensors = self._entries({n: state[n].shape for n in names}, {n: DTYPES.get(state[n].dtype, str(state[n].dtype)) for n in names}, path)
        self.extra = {}
        run = {k: ckpt[k] for k in ("iter_num", "best_val_loss", "config") if k in ckpt}
        if "iter_num" in run and not count(run["iter_num"]):
            raise CheckpointError(f"{path}: iter_num is {run['iter_num']!r}, but it must be an integer; {fix}")
        if "best_val_loss" in run:
            loss = run["best_val_loss"]
            if not (isinstance(loss, (int, float)) or torch.is_tensor(loss) and loss.numel() == 1):
                raise CheckpointError(f"{path}: best_val_loss is {loss!r}, but it must be a number; {fix}")
            run["best_val_loss"] = float(loss)
        if "config" in run:
            try:
                json.dumps(run["config"])
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: config must hold plain values (numbers, strings, lists); {fix}") from None
        if run:
            self.extra["nanogpt"] = run
        meta = os.path.join(os.path.dirname(path), "meta.pkl")
        if os.path.lexists(meta):
            self.extra["chars"] = chars_from_meta(regular_file(meta))
        self.optimizer_note = ""
        if "optimizer" in ckpt:
            self._adamw_state(ckpt["optimizer"], names, path, fix)

    def _adamw_state(self, saved, names, path, fix):
        """
        nanoGPT's `configure_optimizers` numbers parameters in two groups: those of 2 or more
        dimensions (decayed), then the rest, each in `named_parameters` order.
        """
        groups = saved.get("param_groups") if isinstance(saved, dict) else None
        if not (isinstance(groups, list) and isinstance(saved.get("state"), dict) and all(
                isinstance(g, dict) and isinstance(g.get("params"), list) and all(map(count, g["params"])) for g in groups)):
            raise CheckpointError(f"{path}: optimizer must be an optimizer state_dict (state, and param_groups "
                                  f"listing parameter numbers); {fix}")
        order = [n for n in names if len(self.state[n].shape) >= 2] + [n for n in names if len(self.state[n].shape) < 2]
        ids = [i for g in groups for i in g["params"]]
        if [len(g["params"]) for g in groups] != [sum(len(self.state[n].shape) >= 2 for n in names),
                                                  sum(len(self.state[n].shape) < 2 for n in names)]:
            self.optimizer_note = ("; its optimizer groups are not nanoGPT's configure_optimizers grouping, "
                                   "so its state cannot be matched to parameters")
            return
        by_name = dict(zip(order, ids))
        for name, i in by_name.items():
            per_param = saved["state"].get(i, {})
            if not isinstance(per_param, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in per_param.items()):
                raise CheckpointError(f"{path}: optimizer state {i} ({name}) must map names to tensors; {fix}")
            for key, value in per_param.items():
                self.state[f"optimizer.{key}.{name}"] = value
                self.tensors[f"optimizer.{key}.{name}"] = dict(
                    shape=list(value.shape), dtype=DTYPES.get(value.dtype, str(value.dtype)),
                    split=layout.canonical_split(name) if value.shape == self.state[name].shape else None)
        check_optimizer_state(self.tensors, path, fix)
        try:
            self.optimizer_groups = [
                {**{k: list(v) if isinstance(v, tuple) else v.item() if torch.is_tensor(v) else v
                    for k, v in g.items() if k != "params"},
                 "params": [order[ids.index(i)] for i in g["params"]]}
                for g in groups
            ]
            json.dumps(self.optimizer_groups)
        except (TypeError, ValueError, RuntimeError):
            raise CheckpointError(f"{path}: optimizer param_groups must hold plain hyperparameters (numbers, "
                                  f"strings, lists); {fix}") from None

    def read_full(self, name):
        t = self.state[name]
        self.bytes_read += t.nbytes
        return t

    def read(self, name, dim, start, stop):
        t = self.state[name].narrow(dim, start, stop - start)
        self.bytes_read += t.nbytes
        return t


class NativeSource(_Source):
    """
    A checkpoint of this project. One of format 1 shows its real vocabulary only: the rows
    it padded for TP are left out of the config and the shapes, and so never read.
    """

    def __init__(self, path, verify):
        self.path = path
        self.ckpt = Checkpoint(path, verify)
        try:
            self._check()
        except BaseException:
            self.close()
            raise

    def _check(self):
        index = self.ckpt.index
        where = os.path.join(self.path, INDEX)
        self.config, self.id, self.plan, self.tied = index["config"], index["id"], index.get("plan"), index["tied"]
        self.tensors = self.ckpt.tensors
        self.optimizer_groups = index.get("optimizer_groups")
        if index["format"] == PADDED_FORMAT:
            vocab = index["vocab_size_unpadded"]
            if vocab > self.config["vocab_size"]:
                raise CheckpointError(f"{where}: vocab_size_unpadded={vocab} exceeds the padded vocab_size="
                                      f"{self.config['vocab_size']}; {DAMAGED}")
            self.config = dict(self.config, vocab_size=vocab)
            self.tensors = {n: dict(e, shape=[vocab, *e["shape"][1:]]) if n.endswith("transformer.wte.weight") and e["shape"] else e
                            for n, e in self.tensors.items()}
        tensors = self.tensors
        if int8.holds_int8(self):
            tensors = int8.without_scales(tensors, self.tied, where, DAMAGED)
        elif self.tied != _Source.tied:
            raise CheckpointError(f"{where}: tied is {self.tied!r}, but this GPT ties exactly "
                                  f"{_Source.tied!r}; {DAMAGED}")
        check_weights(self.config, {n: e["shape"] for n, e in tensors.items() if not n.startswith(("optimizer.", "extra."))},
                      where, DAMAGED, {f: f"config.{f}" for f in self.config})
        check_optimizer_state(self.tensors, where, DAMAGED)

    def close(self):
        self.ckpt.close()

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
    """
    The source at `path`: a checkpoint directory, a Hugging Face directory, a ckpt.pt or a
    directory holding one. `verify` checks every byte against the source's own checksums
    first (sha256 per rank file; CRC-32 per record of a ckpt.pt; a Hugging Face directory has none).
    """
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, INDEX)):
        return NativeSource(path, verify)
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, "config.json")):
        return HFSource(path)
    if os.path.isdir(path) and os.path.lexists(os.path.join(path, "ckpt.pt")):
        return NanoGPTSource(os.path.join(path, "ckpt.pt"), verify)
    if os.path.lexists(path) and not os.path.isdir(path):
        return NanoGPTSource(path, verify)
    raise CheckpointError(
        f"{path} is neither a checkpoint of this project (index.json), a Hugging Face GPT-2 directory "
        f"(config.json + model.safetensors) nor a nanoGPT ckpt.pt (or a directory holding one)"
    )


def non_finite(t):
    """(NaNs, infinities) in a tensor; (0, 0) for integers and for the common all-finite case in one pass."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return 0, 0
    return int(t.isnan().sum()), int(t.isinf().sum())


def refuse_non_finite(path, counts):
    """Raise for the tensors of {name: (NaNs, infinities)} that hold any, naming the first ones."""
    bad = [(name, nan, inf) for name, (nan, inf) in counts.items() if nan or inf]
    if not bad:
        return
    name, nan, inf = bad[0]
    held = " and ".join(text for n, text in ((nan, f"{nan} NaN"), (inf, f"{inf} infinite")) if n)
    more = f" (and {len(bad) - 1} more tensors, {_few([b[0] for b in bad[1:]])})" if len(bad) > 1 else ""
    raise CheckpointError(f"{path}: {name} holds {held} value{'s' if nan + inf > 1 else ''}{more}, but weights must be "
                          f"finite: the run that saved it diverged or the file is damaged; use an earlier checkpoint")


def activation_note(source, path):
    """What a user should know when weights were trained with another GELU than this model's exact one."""
    activation = getattr(source, "activation", "gelu")
    if activation == "gelu":
        return None
    return (f"note: {path} uses {activation} (tanh-approximated GELU); this GPT uses the exact GELU, "
            f"as nanoGPT does, so its logits differ slightly from the original's")
