"""
One-row matrix products (and one-query attention) as fused multiply-and-sum reductions: an
Inductor graph pass for decoding on CPU.

A decoding step of one row reads each weight once for 2 flops per element, so it runs at the
speed weights stream from memory. On CPU, Inductor hands such a product (`mm`/`addmm` with one
row) to oneDNN/MKL's matrix-vector kernel, which streams weights at half the rate a plain
reduction reaches (`python benchmarks/one_row_bandwidth.py`: GPT-2's head weight on 2 threads,
12.0 GB/s against 24.1 GB/s for the same product as this pass's fused multiply-and-sum). Written as
`(x[:, :, None] * w[None]).sum(1)`, Inductor generates one vectorized reduction per product
that reads each weight row once, contiguously, and never stores the products. Inductor's own
`decompose_mm_pass` does the same only up to 2048 features on CPU (read once, when it is
imported), which leaves out GPT-2's 2304- and 3072-wide weights and its head; this pass takes
every one-row product on CPU. Wider batches stay matrix products: there the matrix kernels
reuse each weight row across rows.

A decoding step's attention is the same kind of work: one query against every cached key,
then its weights against every cached value, per head. CPU's fused attention kernel reads a
bf16 cache slowly (same command, 544 positions: 4.5 GB/s, against 21.4 GB/s as reductions),
so one-query attention becomes the same reductions too.

An int8 weight (`dtensor_gpt.int8`) reaches the product as `w.to(x.dtype)`: left so, Inductor
writes the converted weight to a buffer and reduces over that, reading and writing every weight
twice more. The pass reduces over the int8 weight itself, converting each value in registers
(int8 to float32 is exact, as int8 to bf16 is); the per-channel scale then multiplies the sums.
"""

import operator

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch._inductor.pattern_matcher import Arg, CallFunction, PatternMatcherPass, register_graph_pattern

aten = torch.ops.aten
prims = torch.ops.prims

_patterns = PatternMatcherPass(pass_name="one_row_products_as_reductions")


def _one_row_on_cpu(x, w):
    x, w = x.meta.get("val"), w.meta.get("val")
    return x is not None and w is not None and x.device.type == "cpu" and x.dim() == 2 and x.shape[0] == 1


def _keep_strides(*nodes):
    """
    Lower each input with the strides it has: otherwise Inductor may lay the weight's transposed
    view out anew and the reduction no longer reads weight rows contiguously (GPT-2 decoding on 2
    threads, measured while writing this pass: 37.5 against 29.4 ms per token).
    """
    for node in nodes:
        node.meta["inductor_realize_to_strides"] = True


def _float_row_once(x):
    """
    Convert the row to float32 once, into a buffer, instead of in every weight row's loop: left
    inlined, Inductor converts the same row again beside each weight row, which leaves the
    reduction bound by arithmetic, not by memory (one thread, GPT-2's head: int8 weights 9.9
    against 13.2 billion values a second, bf16 weights 9.8 against 10.8, measured while writing this).
    Where the row is a bf16 result fused into the same kernel (a LayerNorm's), Inductor may keep
    its float32 value rather than round it, as it does between any two fused operations unless
    `emulate_precision_casts` is set (which slowed bf16 decoding here and is left off).
    """
    for node in list(x.users):
        if node.target is prims.convert_element_type.default and node.args[1] == torch.float32:
            node.meta["inductor_realize_to_strides"] = True


def _sums(x, w):
    # in float32, as the matrix kernels accumulate, the bias too (added to these sums, so that
    # the result is rounded once, as addmm's); written out, the upcast lets Inductor vectorize the
    # conversion of bf16 weights (without it the bf16 head weight read at 18.4 GB/s, measured
    # while writing this pass)
    return (x.float()[:, :, None] * w[None, :, :].float()).sum(1)


def _int8_source(w):
    """(the int8 weight, its permutation) when `w` is an int8 weight converted then permuted (`F.linear(x, q.to(x.dtype))`), else (w, None)."""
    if w.target is aten.permute.default:
        converted, dims = w.args
        if converted.target is prims.convert_element_type.default and converted.args[0].meta["val"].dtype == torch.int8:
            return converted.args[0], list(dims)
    return w, None


@register_graph_pattern(CallFunction(aten.mm, Arg(), Arg()), pass_dict=_patterns)
def _mm(match, x, w):
    if _one_row_on_cpu(x, w):
        w, dims = _int8_source(w)
        weight = (lambda w: w) if dims is None else (lambda q: q.permute(dims))
        match.replace_by_example(lambda x, w: _sums(x, weight(w)).to(x.dtype), [x, w])
        _keep_strides(x, w)
        _float_row_once(x)


@register_graph_pattern(CallFunction(aten.addmm, Arg(), Arg(), Arg()), pass_dict=_patterns)
def _addmm(match, bias, x, w):
    if _one_row_on_cpu(x, w):
        match.replace_by_example(lambda bias, x, w: (_sums(x, w) + bias.float()).to(x.dtype), [bias, x, w])
        _keep_strides(bias, x, w)
        _float_row_once(x)


def _one_query(q, k, v, mask):
    q, k, v, mask = (t.meta.get("val") for t in (q, k, v, mask))
    return None not in (q, k, v, mask) and q.device.type == "cpu" and q.dim() == 4 and q.shape[2] == 1


def _one_query_attention(q, k, v, mask):
    # the scores are one-row products of q with the cached keys, the output one of the weights
    # with the cached values, each head on its own; float32, as the fused kernel accumulates
    scores = (q.float() * k.float()).sum(-1) * q.size(-1) ** -0.5  # (B, nh, L)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return (scores.softmax(-1)[..., None] * v.float()).sum(-2, keepdim=True).to(q.dtype)


@register_graph_pattern(
    CallFunction(
        operator.getitem,
        CallFunction(aten._scaled_dot_product_flash_attention_for_cpu.default, Arg(), Arg(), Arg(), attn_mask=Arg()),
        0,
    ),
    pass_dict=_patterns,
)
def _attention(match, q, k, v, mask):
    if _one_query(q, k, v, mask):
        match.replace_by_example(_one_query_attention, [q, k, v, mask])
        _keep_strides(q, k, v, mask)


class OneRowProductsAsReductions(CustomGraphPass):
    """
    Inductor's `post_grad_custom_pre_pass` for a decoding step (`compile_decoding` passes it):
    before Inductor's own patterns, one of which otherwise takes an int8 product of a (batch,
    position, features) row to `_weight_int8pack_mm`, which read GPT-2's int8 head weight at 5.7
    against this pass's 12.7 billion values a second on one thread (measured while moving the pass).
    """

    def __call__(self, graph):
        _patterns.apply(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))
