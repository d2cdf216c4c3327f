"""
Int8 weight-only decoding: the same int8 model at TP 1, 2 and 4 (its scales sharded with
their weights), logits within a stated bound of fp32's, the converter's N->M round trip and
refusals, and the compiled one-row product reading int8 weights.
"""

import json

import pytest
import torch

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, compile_decoding, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt.checkpoint import CheckpointError
from dtensor_gpt.reshard import convert, main
from test_generate import PROMPT, SHIPPED

CONFIG = GPTConfig(**json.loads((SHIPPED / "index.json").read_text())["config"])
# The shipped model's int8 logits (every position of PROMPT) against fp32's: at most 1.1% of the
# largest |logit| measured (0.152 of 13.4) at TP 1, 2 and 4; bounded at 2%
LOGIT_BOUND = 0.02


def _shipped(world, path, dtype, activations=torch.float32):
    """The shipped model (or `path`) built on meta, parallelized over `world` ranks when TP > 1, loaded in `dtype`."""
    from torch.distributed.device_mesh import init_device_mesh

    with torch.device("meta"):
        model = GPT(CONFIG).to(activations)
    if world > 1:
        parallelize(model, init_device_mesh("cpu", (world,)))
    load_checkpoint(model, str(path), dtype=dtype)
    return model.eval()


def _int8_job(rank, world, converted, saved):
    """
    Everything one TP degree is asked, in one job: the int8 parameters against the whole TP=1
    int8 model cut as the layout cuts it (scales included), the same values from the converter's
    checkpoint of another degree and from this degree's own save, the collectives of a forward,
    logits, greedy tokens; at TP=2 also compiled (graphs counted) and generate.py's int8 model's.
    """
    import sys

    from torch._dynamo.testing import CompileCounterWithBackend
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from dtensor_gpt import layout
    from dtensor_gpt.materialize import _Whole, local_values
    from dtensor_gpt.tokenizers import CharTokenizer
    from test_generate import ROOT

    whole = dict(_shipped(1, SHIPPED, "int8").named_parameters())
    model = _shipped(world, SHIPPED, "int8")
    params = dict(model.named_parameters())
    cut = {n: torch.equal(local_values(p), layout.shard_values(_Whole(whole[n]), n, p)) for n, p in params.items()}
    splits = {n: layout.split_of(p) for n, p in params.items() if n.endswith("weight_scale")}
    from_converter = dict(_shipped(world, converted, "int8").named_parameters())
    save_checkpoint(model, saved)
    from_save = dict(_shipped(world, saved, "int8").named_parameters())
    same = all(torch.equal(local_values(p), local_values(other[n])) for other in (from_converter, from_save)
               for n, p in params.items())
    chars = json.loads((SHIPPED / "index.json").read_text())["extra"]["chars"]
    prompt = torch.tensor([CharTokenizer(chars).encode(PROMPT)])
    with torch.no_grad(), CommDebugMode() as comm:
        logits, _ = model(prompt, prompt)
    collectives = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items() if n}
    eager = model.generate(prompt, 20, top_k=1)[0].tolist()
    out = dict(cut=cut, splits=splits, same=same, collectives=collectives, eager=eager, logits=logits)
    if world != 2:
        return out
    counter = CompileCounterWithBackend("aot_eager")
    compile_decoding(model, backend=counter)
    compiled = model.generate(prompt, 20, top_k=1)[0].tolist()
    sys.path.insert(0, str(ROOT / "examples"))
    from generate import load_model, parse_args, sampler_for

    args = parse_args(["--dtype", "int8", "--top-k", "1"])
    bf16, _ = load_model(args, init_device_mesh("cpu", (world,)))
    bf16_tokens = bf16.generate(prompt, 20, top_k=1, sample=sampler_for(args))[0].tolist()
    dtypes = {str(p.dtype) for p in bf16.parameters()}
    return dict(out, compiled=compiled, frames=counter.frame_count, bf16=bf16_tokens, bf16_dtypes=dtypes)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The shipped model converted to int8 at TP=2; the fp32 model's logits and greedy tokens."""
    path = tmp_path_factory.mktemp("int8") / "tp2"
    convert(str(SHIPPED), str(path), tp=2, dtype=torch.int8)
    return path


@pytest.mark.parametrize("world", [1, 2, 4])
def test_int8_decoding_at_tp_1_2_4(world, converted, tmp_path):
    from dtensor_gpt.tokenizers import CharTokenizer

    args = (str(converted), str(tmp_path / "saved"))
    r = _int8_job(0, 1, *args) if world == 1 else run_distributed(_int8_job, world, *args)
    assert all(r["cut"].values()), [n for n, ok in r["cut"].items() if not ok]
    qkv, column, whole = {"dim": 0, "groups": 3}, {"dim": 0, "groups": 1}, None
    want = {0: qkv, 1: whole, 2: column, 3: whole} if world > 1 else {}
    for i, split in want.items():
        names = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
        assert r["splits"][f"transformer.h.0.{names[i]}.weight_scale"] == split
    assert r["splits"]["transformer.wte.weight_scale"] == (column if world > 1 else None)
    assert r["same"], "the converter's TP=2 checkpoint and this degree's own save load to the same values"
    assert r["collectives"] == ({} if world == 1 else {"all_reduce": 2 * CONFIG.n_layer + 1, "all_gather_into_tensor": 1})

    reference = GPT(CONFIG).eval()
    load_checkpoint(reference, str(SHIPPED))
    chars = json.loads((SHIPPED / "index.json").read_text())["extra"]["chars"]
    prompt = torch.tensor([CharTokenizer(chars).encode(PROMPT)])
    with torch.no_grad():
        logits, _ = reference(prompt, prompt)
    error = (r["logits"] - logits).abs().max() / logits.abs().max()
    assert 0.001 < error < LOGIT_BOUND, "int8, so not fp32's exactly, but within the bound"
    fp32 = reference.generate(prompt, 20, top_k=1)[0].tolist()
    assert r["eager"] == fp32 and len(fp32) == len(PROMPT) + 20
    if world == 2:
        assert r["compiled"] == fp32 and r["frames"] == 2, "one graph of the blocks, one of the head, as in fp32 and bf16"
        assert r["bf16"][:len(PROMPT) + 10] == fp32[:len(PROMPT) + 10]
        assert r["bf16_dtypes"] == {"torch.bfloat16", "torch.int8"}


def test_converter_reshards_int8_bit_for_bit_and_refuses_exports(tmp_path, capsys):
    """
    A float checkpoint of 6 heads quantised at TP=1, then 1 -> 2 -> 3 -> 1: the same bytes; the
    same values as quantising while loading. Exports and float casts of int8 are refused.
    """
    from dtensor_gpt.sources import open_source

    torch.manual_seed(0)
    config = GPTConfig(n_layer=1, n_head=6, n_embd=24, block_size=8, vocab_size=13)
    save_checkpoint(GPT(config), str(tmp_path / "fp32"))
    convert(str(tmp_path / "fp32"), str(tmp_path / "1"), dtype=torch.int8)
    for src, dst, tp in (("1", "2", 2), ("2", "3", 3), ("3", "back", 1)):
        convert(str(tmp_path / src), str(tmp_path / dst), tp=tp)
    with open_source(str(tmp_path / "1")) as a, open_source(str(tmp_path / "back")) as b:
        assert a.tensors.keys() == b.tensors.keys() and a.tied == b.tied
        for name, entry in a.tensors.items():
            rows = entry["shape"][0] if entry["shape"] else None
            x, y = (s.read(name, 0, 0, rows) if rows else s.read_full(name) for s in (a, b))
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert a.tensors["transformer.h.0.mlp.c_fc.weight"]["dtype"] == "I8"
        assert a.tensors["transformer.wte.weight_scale"]["shape"] == [13]
    with open_source(str(tmp_path / "3")) as three:
        assert three.tensors["transformer.h.0.attn.c_attn.weight_scale"]["split"] == {"dim": 0, "groups": 3}
        assert three.tensors["transformer.h.0.attn.c_proj.weight_scale"]["split"] is None
    quantised, loaded = GPT(config), GPT(config)
    load_checkpoint(quantised, str(tmp_path / "fp32"), dtype="int8")
    load_checkpoint(loaded, str(tmp_path / "back"), dtype="int8")
    other = dict(loaded.named_parameters())
    assert all(torch.equal(p, other[n]) for n, p in quantised.named_parameters())
    assert quantised.transformer.wte.weight is quantised.lm_head.weight and quantised.lm_head.weight.dtype == torch.int8

    refusals = [
        (["--to", "hf"], "holds int8 weights with per-channel scales, which a --to hf export cannot hold"),
        (["--to", "nanogpt"], "which a --to nanogpt export cannot hold (it holds float weights); export the fp32 or "
                              "bf16 checkpoint it was quantised from"),
        (["--dtype", "bf16"], "holds int8 weights: --dtype bf16 would not give back the values they were quantised from"),
    ]
    for flags, message in refusals:
        with pytest.raises(SystemExit) as exit:
            main([str(tmp_path / "1"), str(tmp_path / "out"), *flags])
        assert exit.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path / "fp32"), str(tmp_path / "out"), "--dtype", "int8", "--to", "hf"])
    assert exit.value.code == 2 and "--dtype int8 writes this project's checkpoints only" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match=r"holds int8 weights \(transformer.h.0.attn.c_attn.weight and 4 more\) "
                                              r"with per-channel scales; load it with dtype='int8'"):
        load_checkpoint(GPT(config), str(tmp_path / "1"))
    with torch.no_grad():
        quantised.transformer.ln_f.weight[0] = float("nan")
    save_checkpoint(quantised, str(tmp_path / "nan"))
    model = GPT(config)
    head, forward = model.lm_head.weight.clone(), model.lm_head.forward
    with pytest.raises(CheckpointError, match="transformer.ln_f.weight holds 1 NaN"):
        load_checkpoint(model, str(tmp_path / "nan"), dtype="int8")
    assert model.transformer.wte.weight is model.lm_head.weight and torch.equal(model.lm_head.weight, head)
    assert model.lm_head.forward == forward and not hasattr(model.lm_head, "weight_scale"), "the float model, as before"


def test_scales_are_placed_as_the_layout_table_says_under_every_plan():
    """Each scale is split with its weight's output channels, whole beside a row-parallel weight, in every plan."""
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt import layout
    from dtensor_gpt.int8 import quantize_linears
    from helpers import fake_process_group, small_config

    with fake_process_group(2):
        for plan in ("megatron", "megatron-sp", "spd"):
            with torch.device("meta"):
                model = GPT(small_config())
            quantize_linears(parallelize(model, init_device_mesh("cpu", (2,)), plan))
            scales = {n: p for n, p in model.named_parameters() if n.endswith("_scale")}
            assert len(scales) == 4 * model.config.n_layer + 1 and model.lm_head.weight_scale is model.transformer.wte.weight_scale
            for name, p in scales.items():
                assert layout.split_of(p) == layout.canonical_split(name), (plan, name)


def test_the_compiled_one_row_product_reads_int8_weights():
    """
    Inductor's kernel loads the int8 weight and converts it in registers: no buffer of the
    weight's size is made (left alone, Inductor converts the whole weight into one first). The
    bf16 row is converted to float32 once, into a buffer of its own, not beside every weight row.
    A decoding step's row is (batch 1, one position, features): Inductor's own int8 pattern, which
    calls `_weight_int8pack_mm` (on these CPUs slower than the reduction), must not take it first.
    """
    from torch._inductor.utils import run_and_get_code

    from dtensor_gpt import int8
    from dtensor_gpt.one_row_products import OneRowProductsAsReductions

    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(1, 1, 48, generator=g).bfloat16(), torch.randn(40, 48, generator=g), torch.randn(40, generator=g).bfloat16()
    scale = int8.scales_of(int8.row_absmax(weight), torch.bfloat16)
    q = int8.quantize(weight, scale)
    compiled = torch.compile(int8.linear, fullgraph=True, dynamic=False,
                             options={"post_grad_custom_pre_pass": OneRowProductsAsReductions(), "fx_graph_cache": False})
    with torch._functorch.config.patch(enable_autograd_cache=False):
        out, (code,) = run_and_get_code(compiled, x, q, scale, bias)
    torch._dynamo.reset()
    assert "Vectorized<int8_t>::loadu" in code and "extern_kernels.mm(" not in code
    assert "empty_strided_cpu((40, 48)" not in code, "no buffer of the weight's shape"
    assert "empty_strided_cpu((1, 48), (48, 1), torch.float32)" in code, "the row in float32, once"
    eager = int8.linear(x, q, scale, bias)
    assert (out.float() - eager.float()).abs().max() <= 0.125  # one bf16 rounding of sums of about 10
