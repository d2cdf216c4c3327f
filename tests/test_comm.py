"""The communication report: exact counts and bytes, by hand, and flags above each plan's minimum."""

import pytest

from dtensor_gpt.comm import comm_report, format_report, main
from helpers import small_config

B, T = 2, 16
ACT = B * T * 96 * 4  # one (B, T, C) fp32 activation


def test_megatron_forward_is_at_its_minimum():
    r = comm_report("megatron", tp=4, config=small_config(n_layer=3), batch=B, seq=T)
    assert r["counts"] == {"all_reduce": 7, "all_gather": 1}  # 2 x 3 blocks + wte; the logits
    assert r["above_minimum"] == {}
    ring = 2 * 3 / 4 * ACT * 7 + 3 / 4 * (B * 96 * 4)  # all-reduces, then the last-position logits
    assert r["wire_bytes_per_token"] == pytest.approx(ring / (B * T))
    assert r["block_wire_bytes_per_token"] == pytest.approx(2 * 2 * 3 / 4 * ACT / (B * T))
    assert {(c["module"], c["kind"], c["count"]) for c in r["collectives"]} >= {
        ("transformer.h.2.attn.c_proj", "all_reduce", 1), ("lm_head", "all_gather", 1)}


def test_sequence_parallel_moves_the_same_bytes_per_block():
    megatron = comm_report("megatron", tp=2, config=small_config(), batch=B, seq=T)
    sequence = comm_report("megatron-sp", tp=2, config=small_config(), batch=B, seq=T)
    assert sequence["counts"]["reduce_scatter"] == 2 * 2 + 1
    assert sequence["block_wire_bytes_per_token"] == pytest.approx(megatron["block_wire_bytes_per_token"])
    # generation indexes the last position of sequence shards: the model gathers all T of them
    assert sequence["above_minimum"] == {"model": [("forward", "all_gather", ACT)]}


def test_spd_halves_forward_syncs_and_flags_its_backward_extras():
    r = comm_report("spd", tp=2, config=small_config(n_layer=4), batch=B, seq=T, spd_blocks="last:2", backward=True)
    assert r["spd_blocks"] == [2, 3] and r["counts"]["all_reduce"] == 2 * 2 + 1 * 2 + 1 + 3
    # in backward the ln_2 weight, ln_2 bias and attn.c_proj bias gradients go in 3 all-reduces where 1 would do
    assert r["above_minimum"] == {
        "block 2": [("backward", "all_reduce", 384)] * 2,
        "block 3": [("backward", "all_reduce", 384)] * 2,
        "model": [("forward", "all_reduce", B * T * 4)],  # loss_parallel's third all-reduce
    }


def test_cli_report_and_errors(capsys):
    assert main(["--plan", "megatron", "--tp", "2", "--seq", "8", "--n-layer", "1"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.0.mlp.c_proj" in out and "every collective is at the plan's minimum" in out
    assert main(["--tp", "5"]) == 2
    assert "n_head=12 is not divisible by tp=5" in capsys.readouterr().err
    assert main(["--plan", "spd", "--spd-blocks", "0,5"]) == 2
    assert "spd_blocks [5] out of range for n_layer=2" in capsys.readouterr().err


def test_modules_in_the_models_order_and_the_models_own_collectives_named(capsys):
    """h.2 before h.10, embedding first, head after the blocks; the loss only where there is one."""
    assert main(["--plan", "megatron-sp", "--tp", "2", "--seq", "8", "--n-layer", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    rows = [line[:34].strip() for line in lines if line[35:44].strip() == "forward"]
    blocks = [int(r.split(".")[2]) for r in rows if r.startswith("transformer.h.")]
    assert blocks == sorted(blocks) and blocks[-1] == 11
    assert rows[0] == "transformer.wte" and rows.index("lm_head") > rows.index("transformer.h.11.mlp.c_proj")
    assert rows[-1] == "(model: last position)"  # the last-position index of sequence shards
    r = comm_report("megatron-sp", tp=2, config=small_config(), batch=B, seq=T, backward=True)
    assert "(model: loss)" in format_report(r) and "(model: last position)" not in format_report(r)


def test_parts_add_up_to_the_total():
    r = comm_report("megatron-sp", tp=4, config=small_config(n_layer=3), batch=B, seq=T)
    parts = r["parts"]
    assert sum(p["wire_bytes_per_token"] for p in parts.values()) == pytest.approx(r["wire_bytes_per_token"])
    assert sum(p["minimum_wire_bytes_per_token"] for p in parts.values()) == pytest.approx(r["minimum_wire_bytes_per_token"])
    assert parts["embedding"]["wire_bytes_per_token"] == pytest.approx(3 / 4 * ACT / (B * T))  # wte's reduce-scatter
    assert parts["blocks"]["wire_bytes_per_token"] == pytest.approx(3 * 4 * 3 / 4 * ACT / (B * T))
    assert parts["model"] == dict(wire_bytes_per_token=pytest.approx(3 / 4 * ACT / (B * T)), minimum_wire_bytes_per_token=0)


def test_cli_png_draws_the_plans_asked_for(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import dtensor_gpt.comm as comm

    drawn = []
    monkeypatch.setattr(comm, "plot_plans", lambda reports, path: drawn.append(reports))
    assert main(["--tp", "2", "--seq", "8", "--plan", "megatron-sp", "spd", "--spd-blocks", "last:1",
                 "--png", str(tmp_path / "unused.png")]) == 0
    assert [(r["plan"], r["spd_blocks"]) for r in drawn[0]] == [("megatron-sp", []), ("spd", [1])]
    monkeypatch.undo()
    png = tmp_path / "plans.png"
    assert main(["--tp", "2", "--seq", "8", "--backward", "--plan", "megatron", "spd", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_decode_measures_one_generated_token():
    config = small_config(n_layer=3)
    r = comm_report("megatron", tp=4, config=config, batch=2, seq=8, decode=True, top_k=10)
    assert r["decode"] and r["counts"] == {"all_reduce": 7, "all_gather": 1}
    # per generated token: 7 all-reduces of one (2, 1, C) position, then no logits: each rank's 10 best
    # candidates of each row and its winner among its ties with its 10th, a float32 value and an int16 id each
    blocks = 7 * 2 * 3 / 4 * (2 * config.n_embd * 4)
    assert r["wire_bytes_per_token"] * 2 == pytest.approx(blocks + 3 / 4 * (4 * 2 * 11 * 6))
    assert r["above_minimum"] == {}
    full = comm_report("megatron", tp=4, config=config, batch=2, seq=8, decode=True, top_k=None)
    assert full["wire_bytes_per_token"] * 2 == pytest.approx(blocks + 3 / 4 * (4 * 2 * 1 * 6)), "one winner per rank"
    wide = comm_report("megatron", tp=4, config=config, batch=2, seq=8, decode=True, top_k=500)
    assert wide["wire_bytes_per_token"] * 2 == pytest.approx(blocks + 3 / 4 * (4 * 2 * 24 * 6)), "k above a rank's 24 ids"
    gathered = comm_report("megatron", tp=4, config=config, batch=2, seq=8, decode=True, sampler="multinomial")
    assert gathered["wire_bytes_per_token"] * 2 == pytest.approx(blocks + 3 / 4 * (2 * 96 * 4)), "the (2, V) logits"
    assert gathered["above_minimum"] == {}
    with pytest.raises(ValueError, match="decode measures one generated token"):
        comm_report("megatron", tp=2, config=small_config(), decode=True, backward=True, seq=8)


def test_optimizer_step_collectives():
    """
    No plan's AdamW step communicates. megatron-sp's replicated LayerNorm weights and biases
    come out of backward with Partial gradients, which the for-loop AdamW would reduce every
    time it reads one (3 all-reduces each); they are reduced at the end of backward instead,
    all in one all-reduce.
    """
    config = small_config(n_layer=2)
    layer_norm_parameters = 2 * 2 * config.n_layer + 2  # ln_1, ln_2 of every block, ln_f: weight and bias
    for plan in ("megatron", "spd", "megatron-sp"):
        r = comm_report(plan, tp=2, config=config, batch=1, seq=8, backward=True, optimizer_step=True)
        assert [c for c in r["collectives"] if c["phase"] == "optimizer"] == []
        at_the_end = [(c["kind"], c["message_bytes"], c["count"]) for c in r["collectives"]
                      if c["phase"] == "backward" and c["module"] == ""]
        assert at_the_end == ([("all_reduce", layer_norm_parameters * 96 * 4, 1)] if plan == "megatron-sp" else [])
        assert ("(model: end of backward)" in format_report(r)) == (plan == "megatron-sp")
        assert not any(phase == "backward" and size == layer_norm_parameters * 96 * 4
                       for extra in r["above_minimum"].values() for phase, _, size in extra)
    with pytest.raises(ValueError, match="optimizer_step follows a backward"):
        comm_report("megatron", tp=2, config=config, seq=8, optimizer_step=True)


def test_prefill_measures_a_prompt_and_its_first_token():
    """
    A prompt's forward, then its first token chosen on the vocabulary shards as generate does:
    the blocks' all-reduces of the whole prompt, and in place of the last logits' gather
    (V floats a row) each rank's k best candidates and its winner among its ties with its k-th.
    """
    config = small_config(n_layer=2)
    r = comm_report("megatron", tp=2, config=config, batch=2, seq=8, prefill=True, top_k=1)
    assert r["counts"] == {"all_reduce": 5, "all_gather": 1} and r["above_minimum"] == {}
    act = 2 * 8 * config.n_embd * 4
    assert r["wire_bytes_per_token"] * 2 * 8 == pytest.approx(5 * act + 1 / 2 * (2 * 2 * 2 * 6))
    assert "(model: sampling)" in format_report(r) and "a prompt and its first token" in format_report(r)
    gathered = comm_report("megatron", tp=2, config=config, batch=2, seq=8, prefill=True, sampler="multinomial")
    assert gathered["wire_bytes_per_token"] * 2 * 8 == pytest.approx(5 * act + 1 / 2 * (2 * config.vocab_size * 4))
    with pytest.raises(ValueError, match="prefill measures a prompt's forward"):
        comm_report("megatron", tp=2, config=config, seq=8, prefill=True, decode=True)
