"""
Compiled decoding: one compilation for every step, the same tokens as eager at TP 1, 2 and 4.

Inductor (C++ code generation) runs at TP 2 only: compiling the shipped model's step took
13-16 s at TP 2 on these 2 shared cores (examples/generate.py --compile), and the graph differs
between degrees only in its shard sizes. TP 1 and 4 compile with "aot_eager", which traces the
same DTensor-free graph (local shards and functional collectives) and runs it without code
generation: the TP 4 case, 4 processes on 2 cores, is already the slowest test here.
"""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, compile_decoding, load_checkpoint, parallelize
from test_generate import PROMPT, SHIPPED, run_generate


def _eager_and_compiled(rank, world_size, backend, texts):
    """Greedy tokens, eager then compiled, 20 from each prompt in `texts`; the compilations counted after each."""
    import json

    from torch._dynamo.testing import CompileCounterWithBackend

    from dtensor_gpt.tokenizers import CharTokenizer

    index = json.loads((SHIPPED / "index.json").read_text())
    model = parallelize(GPT(GPTConfig(**index["config"])), init_device_mesh("cpu", (world_size,))).eval()
    load_checkpoint(model, str(SHIPPED))
    prompts = [torch.tensor([CharTokenizer(index["extra"]["chars"]).encode(p)]) for p in texts]
    eager = [model.generate(p, 20, top_k=1)[0].tolist() for p in prompts]
    counter = CompileCounterWithBackend(backend)
    compile_decoding(model, backend=counter)
    compiled, frames = [], []
    for p in prompts:
        compiled.append(model.generate(p, 20, top_k=1)[0].tolist())
        frames.append(counter.frame_count)
    return eager, compiled, frames


def test_the_decoding_step_compiles_once_per_cache_length():
    """
    TP=1: one graph for all blocks and all 19 one-token steps of a generation and one for the
    head (prompts run eagerly, a one-token prompt too). Caches come in powers of two: "J" (21
    positions) shares the 32-position cache of PROMPT (31) and compiles nothing; PROMPT twice (42)
    makes a cache of 64: the blocks compile once more, the head, which has no cache, not.
    """
    texts = [PROMPT, "J", PROMPT * 2]
    eager, compiled, frames = run_distributed(_eager_and_compiled, 1, "aot_eager", texts)
    assert compiled == eager
    assert [len(t) for t in eager] == [len(p) + 20 for p in texts]
    assert frames == [2, 2, 3]


@pytest.mark.parametrize("world_size, backend", [(2, "inductor"), (4, "aot_eager")])
def test_compiled_greedy_tokens_equal_eager(world_size, backend):
    eager, compiled, frames = run_distributed(_eager_and_compiled, world_size, backend, [PROMPT])
    assert compiled == eager and len(eager[0]) == len(PROMPT) + 20
    assert frames == [2]


def test_compiled_sampling_past_block_size_equals_eager():
    """TP=1, a block_size of 16: the cache's 15 steps compiled, then the recomputed windows eager, as without compile."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    eager = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(3))
    compile_decoding(model, backend="aot_eager")
    compiled = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(3))
    assert compiled.shape == (2, 35) and torch.equal(compiled, eager)


def test_any_number_of_lengths_compiles_a_few_graphs_and_never_fails():
    """
    20 generation lengths (3 to 60 positions, block_size 64) make caches of 16, 32 and 64
    positions: 3 graphs of the blocks and 1 of the head, and the greedy tokens of eager decoding,
    which are nanoGPT's (recomputed without a cache). Then a batch of 2 rows asks for a 4th graph
    of the blocks with dynamo's recompile limit (8) lowered to the 3 it has: that generation
    decodes eagerly (its head compiles), to the same tokens, rather than failing.
    """
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # other tests' graphs of Block.forward would count towards the limit
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=32, n_layer=2, n_head=2, n_embd=16)).eval()
    tokens = torch.randint(0, 32, (2, 58), generator=torch.Generator().manual_seed(1))
    prompts = [tokens[:1, :1 + 3 * i] for i in range(20)] + [tokens[:, :5]]
    eager = [model.generate(p, 2, top_k=1) for p in prompts]
    assert all(torch.equal(e, model.generate(p, 2, top_k=1, use_cache=False)) for e, p in zip(eager, prompts))
    counter = CompileCounterWithBackend("aot_eager")
    compile_decoding(model, backend=counter)
    compiled, frames = [], []
    for i, p in enumerate(prompts):
        with torch._dynamo.config.patch(recompile_limit=3 if i == 20 else 8):
            compiled.append(model.generate(p, 2, top_k=1))
        frames.append(counter.frame_count)
    torch._dynamo.reset()
    assert all(torch.equal(c, e) for c, e in zip(compiled, eager))
    assert frames == [2] * 5 + [3] * 5 + [4] * 10 + [5]  # up to 16 positions, to 32, to 64; then the head's


def test_generate_py_compiles_in_bf16():
    """The summary gives the first decoding step (the compilation) apart from the tokens/s after it."""
    r = run_generate(1, "--compile", "--dtype", "bf16", "--max-new-tokens", "12", "--prompt", "ROMEO:")
    assert r.returncode == 0, r.stderr[-2000:]
    text, summary = r.stdout.rsplit("\n--- ", 1)
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 12
    assert summary.startswith("12 tokens in ") and "s: compiling the decoding step " in summary
    assert "s (its first step), then " in summary
    assert "tokens/s (checkpoint loaded in " in summary
    assert "s); tp=1, plan megatron, bf16, vocab-parallel sampling, KV cache; collectives per generated token: none" \
        in summary


@pytest.mark.parametrize("rows, matrix_kernel", [(1, False), (3, True)])
def test_one_row_products_become_fused_reductions(rows, matrix_kernel):
    """
    The decoding pass turns a one-row product (with and without bias) into Inductor's own
    reduction, the same numbers within rounding; products of several rows keep the matrix kernel.
    """
    from torch._inductor.utils import run_and_get_code

    from dtensor_gpt.one_row_products import OneRowProductsAsReductions

    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(rows, 48, generator=g), torch.randn(40, 48, generator=g), torch.randn(40, generator=g)
    for b in (bias, None):
        compiled = torch.compile(torch.nn.functional.linear, fullgraph=True, dynamic=False,
                                 options={"post_grad_custom_pre_pass": OneRowProductsAsReductions(), "fx_graph_cache": False})
        with torch._functorch.config.patch(enable_autograd_cache=False):
            out, (code,) = run_and_get_code(compiled, x, weight, b)
        assert ("extern_kernels.addmm(" in code or "extern_kernels.mm(" in code) == matrix_kernel
        assert torch.allclose(out, torch.nn.functional.linear(x, weight, b), atol=1e-5)
        torch._dynamo.reset()


def test_a_one_row_product_in_bf16_rounds_once_as_addmm():
    """
    With a bias, bf16 addmm adds it to the float32 sums and rounds once; rounding the product
    to bf16 first and then its sum with the bias differed in 64 of these 256 outputs. Inductor
    rounds where the graph says only with `emulate_precision_casts` (otherwise a fused kernel may
    keep float32 between the two, which hid the second rounding here, but not in every fusion).
    Rounded once, they equal F.linear's here; another CPU's matrix kernel sums in another order,
    which moves a float32 sum of 64 exact products by a few of its ulps and so may flip a bf16
    rounding about once in 10^4 outputs: at most 2 of 256 may differ, against 64 rounded twice.
    """
    from dtensor_gpt.one_row_products import OneRowProductsAsReductions

    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(1, 64, generator=g).bfloat16(), torch.randn(256, 64, generator=g).bfloat16()
    bias = torch.randn(256, generator=g).bfloat16()
    compiled = torch.compile(torch.nn.functional.linear, fullgraph=True, dynamic=False,
                             options={"post_grad_custom_pre_pass": OneRowProductsAsReductions(), "fx_graph_cache": False})
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(emulate_precision_casts=True):
        out = compiled(x, weight, bias)
    torch._dynamo.reset()
    assert (out != torch.nn.functional.linear(x, weight, bias)).sum().item() <= 2


@pytest.mark.parametrize("queries, fused_kernel", [(1, False), (2, True)])
def test_one_query_attention_becomes_fused_reductions(queries, fused_kernel):
    """A decoding step's attention (one query over the cache, masked) is two one-row products per head."""
    from torch._inductor.utils import run_and_get_code

    from dtensor_gpt.one_row_products import OneRowProductsAsReductions

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 3, queries, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    mask = torch.arange(10) <= torch.arange(6, 6 + queries)[:, None]  # the cache's (T, L) mask: 3 positions unwritten
    attention = lambda q, k, v, mask: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    compiled = torch.compile(attention, fullgraph=True, dynamic=False,
                             options={"post_grad_custom_pre_pass": OneRowProductsAsReductions(), "fx_graph_cache": False})
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out, (code,) = run_and_get_code(compiled, q, k, v, mask)
    assert ("aten._scaled_dot_product_flash_attention_for_cpu.default(" in code) == fused_kernel
    assert torch.allclose(out, attention(q, k, v, mask), atol=1e-6)
