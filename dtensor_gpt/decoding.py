"""
`compile_decoding(model)`: torch.compile the one-token decoding step of a GPT, parallelized or not.

The unit is the Block. The whole model does not compile under tensor parallelism: DTensor's
vocab-parallel embedding keeps its index mask in the placement, which dynamo's and
AOTAutograd's fake tensors then mix ("Mixing fake modes NYI", torch 2.13). The blocks hold
nearly every operation of a step (the embedding, the final LayerNorm and the head are a few
DTensor calls), and every block runs the same code, so one graph serves them all. With the
static KV cache a step has fixed shapes: the graph compiles once per batch size and cache
length. Every other forward (a prompt, even of one token, which allocates the cache; a window
recomputed past block_size; a forward without a cache) runs eagerly rather than compiling a
graph for each length.
"""

import torch


def compile_decoding(model, backend="inductor", mode=None):
    """
    Compile `model`'s blocks (in place; returns `model`) with `backend`, a torch.compile backend
    ("inductor" generates fused C++ on CPU; "aot_eager" traces the same graph without code
    generation), and `mode`, Inductor's (None, or "reduce-overhead" to replay each block's step
    as a CUDA graph on a GPU). `model.generate(..., use_cache=True)` then decodes with the
    compiled step. Each total length (prompt plus new tokens, below block_size) sizes its own
    cache and so compiles once; past torch's recompile limit, dynamo decodes eagerly with a
    warning. With CUDA graphs each block records its own graph for each new cache (its
    weights and cache are kept in place, not copied), so a process records n_layer graphs per
    generation; past Inductor's limit of 128 recordings it runs the compiled code without graphs,
    with a warning.
    """
    graphs = backend == "inductor" and torch._inductor.list_mode_options(mode).get("triton.cudagraphs", False)
    for block in model.transformer.h:
        if graphs:
            # A graph's output lives in its memory pool, and each block's call starts a new
            # "generation" whose replay overwrites the last one's outputs: the next block must get
            # a copy, made outside the graph. So the forward alone is compiled and a hook copies.
            block.forward = torch.compile(block.forward, backend=backend, mode=mode, fullgraph=True, dynamic=False)
            block.register_forward_hook(lambda module, args, output: output.clone())
        else:
            block.compile(backend=backend, fullgraph=True, dynamic=False)
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
