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


def compile_decoding(model, backend="inductor"):
    """
    Compile `model`'s blocks (in place; returns `model`) with `backend`, a torch.compile backend
    ("inductor" generates fused C++ on CPU; "aot_eager" traces the same graph without code
    generation). `model.generate(..., use_cache=True)` then decodes with the compiled step.
    Each total length (prompt plus new tokens, below block_size) sizes its own cache and so
    compiles once; past torch's recompile limit, dynamo decodes eagerly with a warning.
    """
    for block in model.transformer.h:
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

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
    return model
