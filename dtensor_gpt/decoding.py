"""
`compile_decoding(model)`: torch.compile the one-token decoding step of a GPT, parallelized or not.

The units are the Blocks and the head. The whole model does not compile under tensor
parallelism: DTensor's vocab-parallel embedding keeps its index mask in the placement, which
dynamo's and AOTAutograd's fake tensors then mix ("Mixing fake modes NYI", torch 2.13). The
blocks hold nearly every operation of a step, and every block runs the same code, so one graph
serves them all; the head holds the largest weight (GPT-2's vocabulary), so it compiles too,
as a function of ours (dynamo will not start a graph in torch.nn.Linear's own forward). The
embedding and the final LayerNorm stay a few eager calls. With the static KV cache a step has
fixed shapes: each graph compiles once per batch size and cache length, and `GPT.generate` sizes
its caches in powers of two (16 positions at least, block_size at most), so any number of
generation lengths compiles a few graphs: 3 for the shipped model's 64 positions, 7 for GPT-2's
1024. The graphs are not `fullgraph`: past dynamo's recompile limit (8 per function: more batch
sizes than that covers) a step runs eagerly, with dynamo's warning, instead of raising
mid-generation; the tests count the graphs, which a graph break would add to. Every other forward (a
prompt, even of one token, which allocates the cache; a window recomputed past block_size; a
forward without a cache) runs eagerly rather than compiling a graph for each length.

On CPU the compiled graphs compute one-row products as fused reductions
(`dtensor_gpt.one_row_products`): a step of one row runs at the speed weights stream from memory.
With int8 weights (`load_checkpoint(..., dtype="int8")`) the reductions read the int8 values and
convert them in registers: no float copy of a weight is made.
"""

import torch
import torch.nn.functional as F

from dtensor_gpt import int8


def _linear(x, weight, bias, scale):
    return F.linear(x, weight, bias) if scale is None else int8.linear(x, weight, scale, bias)


def _compile_head(head, settings):
    if settings["options"] is not None:
        settings = {**settings, "options": {**settings["options"], "fx_graph_cache": False}}
    linear = torch.compile(_linear, **settings)

    def forward(x):
        # A vocabulary split unevenly (GPT-2's 50257 over 2) gives the ranks head shards of
        # different sizes, which the on-disk caches of compiled graphs (torch 2.13) do not tell
        # apart: a rank loads another rank's graph and fails its size check (measured). The head
        # is compiled uncached.
        with torch._functorch.config.patch(enable_autograd_cache=False):
            return linear(x, head.weight, head.bias, getattr(head, "weight_scale", None))

    head.forward = forward


def compile_decoding(model, backend="inductor", mode=None):
    """
    Compile `model`'s blocks and head (in place; returns `model`) with `backend`, a torch.compile
    backend ("inductor" generates fused C++ on CPU; "aot_eager" traces the same graphs without
    code generation), and `mode`, Inductor's (None, or "reduce-overhead" to replay each block's
    step as a CUDA graph on a GPU; the head then stays eager). `model.generate(...,
    use_cache=True)` then decodes with the compiled step, compiled once per batch size and cache
    size (a power of two); past dynamo's recompile limit a step runs eagerly, with a warning.
    With CUDA graphs each block records its own graph for each new cache (its weights and cache
    are kept in place, not copied); past Inductor's limit of 128 recordings a function runs
    without graphs, with a warning.
    """
    if mode is not None and backend != "inductor":
        raise ValueError(f"mode={mode!r} is an Inductor mode, but backend={backend!r}; pass backend='inductor' or no mode")
    options, graphs = None, False
    if backend == "inductor":
        # imported here: the pass imports Inductor, 1.3 s for every process that imports the package
        from dtensor_gpt.one_row_products import OneRowProductsAsReductions

        options = {**torch._inductor.list_mode_options(mode or "default"),
                   "post_grad_custom_pre_pass": OneRowProductsAsReductions()}
        graphs = options.get("triton.cudagraphs", False)
    settings = dict(backend=backend, options=options, dynamic=False)
    for block in model.transformer.h:
        if graphs:
            # A graph's output lives in its memory pool, and each block's call starts a new
            # "generation" whose replay overwrites the last one's outputs: the next block must get
            # a copy, made outside the graph. So the forward alone is compiled and a hook copies.
            block.forward = torch.compile(block.forward, **settings)
            block.register_forward_hook(lambda module, args, output: output.clone())
        else:
            block.compile(**settings)
    if not graphs:  # on a GPU the head is one cuBLAS call, and a graph of it has not run on one
        _compile_head(model.lm_head, settings)
    stances = []

    def enter(module, args, kwargs):
        idx = args[0] if args else kwargs["idx"]
        cache = args[2] if len(args) > 2 else kwargs.get("cache")
        if idx.size(1) > 1 or not cache:  # a prompt (even of one token), a window, or no cache
            stances.append(torch.compiler.set_stance("force_eager"))

    def leave(module, args, kwargs, output):
        if stances:
            stances.pop().__exit__(None, None, None)
            cache = args[2] if len(args) > 2 else kwargs.get("cache")
            if graphs and cache:
                # the prompt has just allocated the cache; a CUDA graph may write in place only
                # into tensors whose address it can keep (a new cache is a new address: one
                # new recording, not a new compilation)
                for layer in cache.layers:
                    torch._dynamo.mark_static_address(layer.k)
                    torch._dynamo.mark_static_address(layer.v)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return model
