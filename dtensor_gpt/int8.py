"""
Int8 weight-only inference: every `nn.Linear` weight of the blocks and the head held as int8,
with one scale per output channel (symmetric: w = q * scale, q in [-127, 127], scale = the row's
largest |w| / 127), the activations in the model's floating dtype (fp32 or bf16).

A decoding step reads every weight once per token, so its speed is the weights' bytes over
memory bandwidth: int8 halves bf16's bytes. The model's code does not change: a quantised
Linear keeps its module, holds an int8 `weight` (a DTensor placed as the float one was) and a
`weight_scale` Parameter, and computes `F.linear(x, weight.to(x.dtype)) * scale + bias`, as
gpt-fast does; compiled, Inductor fuses the cast into the product's reads
(`dtensor_gpt.one_row_products`), so no float copy of a weight is ever made.

The scale is a Parameter (without gradient) rather than a buffer so that it travels with its
weight wherever parameters go: checkpoints, resharding, meta allocation, tying. Under tensor
parallelism it is split as its weight's output channels are (with a column-parallel weight,
c_attn's packed q|k|v per rank included) and whole beside a row-parallel one, whose ranks all
produce every output channel. The embedding is tied to the head: `wte` then holds the same
int8 weight and scale, and a lookup dequantises only the rows it reads. Scales are kept in the
activations' dtype; q is rounded against the scale as stored, so q * scale is the value used.
"""

import re
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from dtensor_gpt.format import CheckpointError
from dtensor_gpt.materialize import local_values

_LINEARS = r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)|lm_head"
SCALE = "_scale"  # a weight `X.weight`'s scale is `X.weight_scale`
NANOGPT_TIED = {"lm_head.weight": "transformer.wte.weight"}
TIED_SCALES = {"lm_head.weight_scale": "transformer.wte.weight_scale"}  # tied with their weights


def linear_names(model):
    """The quantised Linear modules: the blocks' four and the head."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(_LINEARS, name)]


def quantized_weights(names, tied):
    """The weights int8 holds among tensor `names` (a checkpoint's, or a model's with `tied` {alias: name kept})."""
    aliases = {}
    for alias, kept in tied.items():
        aliases.setdefault(kept, []).append(alias)
    return {n for n in names if any(re.fullmatch(rf"({_LINEARS})\.weight", a) for a in [n, *aliases.get(n, [])])}


def row_absmax(weight):
    return weight.float().abs().amax(dim=1)


def scales_of(absmax, dtype):
    """One scale per row (output channel) from the rows' largest |w|, in `dtype`, the activations'."""
    return torch.where(absmax > 0, absmax / 127, 1.0).to(dtype)


def quantize(weight, scale):
    """Round each row against its scale as stored, so that q * scale is exactly what the model computes with."""
    return (weight.float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)


def scale_split(split):
    """A scale's split, from its weight's: with the output channels (dim 0), else whole."""
    return split if split is not None and split["dim"] == 0 else None


def _times(y, scale):
    """
    `y * scale` in the scale's dtype; on DTensors, of the local values, which hold the same
    channels (see module), or the same rows of an embedding (both lookups masked alike).
    """
    if isinstance(y, DTensor):
        local = y.to_local().to(scale.dtype) * local_values(scale)
        return DTensor.from_local(local, y.device_mesh, y.placements, shape=y.shape, stride=y.stride())
    return y.to(scale.dtype) * scale


def linear(x, weight, scale, bias):
    """`F.linear` of an int8 weight: the product in x's dtype, scaled per output channel, then the bias."""
    y = _times(F.linear(x, weight.to(x.dtype)), scale)
    return y if bias is None else y + bias


def _linear_forward(module, x):
    return linear(x, module.weight, module.weight_scale, module.bias)


def _embedding_forward(module, idx):
    """Only the rows looked up are dequantised."""
    return _times(F.embedding(idx, module.weight), F.embedding(idx, module.weight_scale[:, None]))


def _empty_scale(weight):
    """An uninitialised scale placed as `weight`'s output channels are (see module), where `weight` is (meta too)."""
    rows = weight.shape[0]
    if not isinstance(weight, DTensor):
        return torch.empty(rows, dtype=weight.dtype, device=weight.device)
    placements = [p if isinstance(p, (Shard, _StridedShard)) and p.dim == 0 else Replicate() for p in weight.placements]
    local = weight.to_local()
    return DTensor.from_local(torch.empty(local.shape[0], dtype=weight.dtype, device=local.device), weight.device_mesh,
                              placements, shape=(rows,), stride=(1,))


def quantize_linears(model):
    """
    Give each quantised Linear (and a `wte` tied to the head) an int8 weight placed as its float
    one and an empty scale, both unset (a checkpoint fills them), and the int8 forward; in place,
    once (a model already quantised is left as it is). Returns a function that puts back the
    float weights and forwards, for a load refused after this.
    """
    tied = model.transformer.wte.weight is model.lm_head.weight
    linears = [model.get_submodule(name) for name in linear_names(model)]
    linears = [m for m in linears if getattr(m, "weight_scale", None) is None]
    embedding = [model.transformer.wte] if tied and linears else []
    before = [(m, dict(m._parameters), m.__dict__.get("forward")) for m in linears + embedding]

    def restore():
        for module, params, forward in before:
            module._parameters = params
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward

    for module in linears:
        weight = module.weight
        module.weight_scale = nn.Parameter(_empty_scale(weight), requires_grad=False)
        module.weight = nn.Parameter(torch.empty_like(weight, dtype=torch.int8), requires_grad=False)
        module.forward = types.MethodType(_linear_forward, module)
    if embedding:
        wte = model.transformer.wte
        wte.weight, wte.weight_scale = model.lm_head.weight, model.lm_head.weight_scale
        wte.forward = types.MethodType(_embedding_forward, wte)
    return restore


@torch.no_grad()
def quantize_model(model):
    """
    Quantise a float model's weights in place, before `parallelize` (whose styles then place the
    scales as `load_checkpoint(..., dtype="int8")` does): the values that load would give from a
    checkpoint of this model; for benchmarks of random weights. Returns `model`.
    """
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("quantize_model quantises an unparallelized model; call it before parallelize, "
                         "or load a checkpoint with load_checkpoint(model, path, dtype='int8')")
    floats = {name: model.get_submodule(name).weight for name in linear_names(model)}
    quantize_linears(model)
    for name, weight in floats.items():
        module = model.get_submodule(name)
        module.weight_scale.copy_(scales_of(row_absmax(weight), weight.dtype))
        module.weight.copy_(quantize(weight, module.weight_scale))
    return model


class QuantizedSource:
    """
    A float checkpoint source read as its int8 form: each Linear weight as int8 plus its scale,
    computed from the whole weight (one tensor in memory at a time), for the offline converter.
    Optimizer state is left out: an int8 checkpoint is for inference.
    """

    def __init__(self, source):
        self.source, self._cached = source, (None, None, None)
        tensors = {n: e for n, e in source.tensors.items() if not n.startswith("optimizer.")}
        self.quantized = quantized_weights(tensors, source.tied)
        for name in self.quantized:
            entry = tensors[name]
            tensors[name] = dict(entry, dtype="I8")
            tensors[name + SCALE] = dict(shape=entry["shape"][:1], dtype=entry["dtype"], split=scale_split(entry["split"]))
        self.tensors = tensors
        self.tied = {**source.tied, **TIED_SCALES}
        self.optimizer_groups, self.id = None, None  # another model: a checkpoint of its own

    def __getattr__(self, name):
        return getattr(self.source, name)

    def _int8(self, name):
        if self._cached[0] != name:
            weight = self.source.read(name, 0, 0, self.source.tensors[name]["shape"][0])
            scale = scales_of(row_absmax(weight), weight.dtype)
            self._cached = (name, quantize(weight, scale), scale)
        return self._cached[1:]

    def read(self, name, dim, start, stop):
        if name in self.quantized:
            return self._int8(name)[0].narrow(dim, start, stop - start)
        if name.endswith(SCALE) and name[:-len(SCALE)] in self.quantized:
            return self._int8(name[:-len(SCALE)])[1].narrow(dim, start, stop - start)
        return self.source.read(name, dim, start, stop)


def holds_int8(source):
    """Whether a checkpoint source holds int8 weights."""
    return any(e["dtype"] == "I8" for e in source.tensors.values())


def without_scales(tensors, tied, where, fix):
    """
    An int8 checkpoint's tensors ({name: entry}) less the scales, once each int8 tensor is
    checked to be a weight int8 holds, with a scale of one value per row, and the tie to be
    nanoGPT's and its scales'.
    """
    held = {n for n, e in tensors.items() if e["dtype"] == "I8"}
    weights = quantized_weights(tensors, NANOGPT_TIED)
    if held != weights or tied != {**NANOGPT_TIED, **TIED_SCALES}:
        raise CheckpointError(f"{where}: int8 weights {sorted(held)} with ties {tied}, but an int8 GPT holds "
                              f"{sorted(weights)} with ties {({**NANOGPT_TIED, **TIED_SCALES})}; {fix}")
    for name in weights:
        if tensors.get(name + SCALE, {}).get("shape") != tensors[name]["shape"][:1]:
            raise CheckpointError(f"{where}: {name} is int8 but {name + SCALE} is not one scale per row, of shape "
                                  f"{tensors[name]['shape'][:1]}; {fix}")
    return {n: e for n, e in tensors.items() if n not in {w + SCALE for w in weights}}
