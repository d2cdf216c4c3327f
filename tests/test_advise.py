"""The plan adviser (dtensor_gpt.advise): its output, its ranking against hand sums, its refusals, the measured cells replayed."""

import json
import os
from collections import Counter

import pytest

from dtensor_gpt import advise, cost
from dtensor_gpt.advise import Option, Setting, candidates, main, predict_option, rank, validate
from dtensor_gpt.configs import config_by_name
from dtensor_gpt.cost import H100_BF16_FLOPS, MFU, NCCL_BASE_LATENCY, measure_options, plan_collectives
from helpers import collective_kinds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALIBRATION = os.path.join(ROOT, "benchmarks", "calibration", "spd-zero-shot-tp2.json")
MB = 1e6


def hand_setting(alpha, beta, compute, memory_bandwidth=1e9):
    """Every collective alpha + wire / beta; `compute` seconds on one device, as on paper."""
    link = {k: (alpha, beta) for k in ("all_reduce", "all_gather", "reduce_scatter")}
    return Setting(link=link, link_text="by hand", message_scale=1.0, memory_bandwidth=memory_bandwidth, compute=compute,
                   compute_text="by hand", measured={})


# each block's collectives as the plans issue them, by hand: 2 blocks of 1 MB activations
HAND = {"megatron": Counter({("all_reduce", MB): 4}),
        "megatron-sp": Counter({("all_gather", MB): 4, ("reduce_scatter", MB): 4}),
        "spd:all": Counter({("all_reduce", MB): 2})}


def test_ranking_on_a_hand_made_link():
    # TP=2 on a link of 1 ms + wire / 1 GB/s: an all-reduce of 1 MB sends 1 MB (2 ms), a gather or scatter 0.5 MB (1.5 ms);
    # 20 ms of computation on one device, 10 ms per rank
    where, config = hand_setting(1e-3, 1e9, 20e-3), config_by_name("tiny")
    options = [Option("megatron"), Option("megatron-sp"), Option("spd", "all")]
    parts = lambda o: (Counter(), HAND[o.label])
    rows, use = rank(options, parts, where, 2, config)
    assert [(r["option"], r["seconds"]) for r in rows] == [
        ("spd:all", pytest.approx(10e-3 + 2 * 2e-3)), ("megatron", pytest.approx(10e-3 + 4 * 2e-3)),
        ("megatron-sp", pytest.approx(10e-3 + 8 * 1.5e-3))]
    assert use == "megatron"
    assert rank(options, parts, where, 2, config, {"spd:all": 0.01}, 0.02)[1] == "spd:all"
    assert rank(options, parts, where, 2, config, {"spd:all": 0.01}, 0.005)[1] == "megatron"
    assert rank(options, parts, where, 2, config, None, 1.0)[1] == "megatron"  # not calibrated: never within a budget


def test_overlap_and_compression_by_hand():
    """The options the other branches add, priced before their plans exist here."""
    config = config_by_name("tiny")
    share = 12 * 2 * 96 ** 2 / (12 * 2 * 96 ** 2 + 96 * 96 + 64 * 96)  # the blocks' share of tiny's weights
    where = hand_setting(1e-3, 1e9, 20e-3)
    # 4 chunks: each 1 MB all-reduce is 4 of 0.25 MB (1.25 ms), 16 in all (20 ms), overlapping 10 ms x share of compute
    chunked = Counter({("all_reduce", MB / 4): 16})
    row = predict_option(Option("megatron-overlap", chunks=4), Counter(), chunked, 10e-3, where, 2, config)
    block_compute = 10e-3 * share
    assert row["seconds"] == pytest.approx(10e-3 - block_compute + 20e-3 + block_compute / 4)
    # int8 on a bandwidth-bound link: a 1 MB fp32 all-reduce becomes a reduce-scatter and an all-gather of 0.25 MB
    # (each 0.125 MB on the wire at 1 MB/s), and 4 passes over 1 MB at 1 GB/s of quantisation
    slow = hand_setting(0.0, 1e6, 0.0)
    row = predict_option(Option("megatron", compress="int8"), Counter(), HAND["megatron"], 0.0, slow, 2, config)
    assert row["seconds"] == pytest.approx(4 * (2 * 0.125 + 4 * MB / 1e9))
    assert row["collectives"] == Counter({("reduce_scatter", MB / 4): 4, ("all_gather", MB / 4): 4})
    # bf16 halves an fp32 message, and is nothing on messages already in bf16
    row = predict_option(Option("megatron", compress="bf16"), Counter(), HAND["megatron"], 0.0, slow, 2, config)
    assert row["seconds"] == pytest.approx(4 * 0.5)
    bf16 = Setting(**{**vars(slow), "message_scale": 0.5})
    assert predict_option(Option("megatron", compress="bf16"), Counter(), HAND["megatron"], 0.0, bf16, 2, config)[
        "seconds"] == pytest.approx(4 * 0.5)


def test_options_unregistered_here_are_left_out(monkeypatch):
    config = config_by_name("tiny")

    def plain(model, mesh, *, loss_parallel=False):
        """a plan without options"""

    def spd(model, mesh, *, spd_blocks="all", loss_parallel=False):
        """spd without compress="""

    # the registry as it was before megatron-overlap and compress=, whatever this checkout registers
    monkeypatch.delitem(advise.PLANS, "megatron-overlap", raising=False)
    for name, plan in (("megatron", plain), ("megatron-sp", plain), ("spd", spd)):
        monkeypatch.setitem(advise.PLANS, name, plan)
    assert [o.label for o in candidates(config, ["spd:auto:1"])] == ["megatron", "megatron-sp", "spd:last:1", "spd:all",
                                                                    "spd:auto:1"]

    def overlap(model, mesh, *, chunks=2, loss_parallel=False):
        """megatron-overlap, as another branch registers it"""

    def compressing(model, mesh, *, compress=None, loss_parallel=False):
        """megatron with compress="""

    monkeypatch.setitem(advise.PLANS, "megatron-overlap", overlap)
    monkeypatch.setitem(advise.PLANS, "megatron", compressing)
    labels = [o.label for o in candidates(config)]
    assert labels == ["megatron", "megatron-sp", "spd:last:1", "spd:all", "megatron-overlap:2", "megatron-overlap:4",
                      "megatron+bf16", "megatron+int8"]


def test_cli_ranks_every_option_with_its_collectives(capsys):
    # tiny at TP=2 on NVLink 4, a prefill of 16 tokens (and its greedy first token); computation on paper
    assert main(["--config", "tiny", "--tp", "2", "--link", "nvlink4", "--workload", "prefill", "--seq", "16",
                 "--calibration", CALIBRATION, "--max-loss-increase", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "tiny at TP=2, a prefill of 16 tokens"
    assert lines[1].startswith("link: NVLink 4, 450 GB/s each way") and lines[2].startswith("compute: one H100 SXM")
    assert lines[3].startswith("calibration: model: nanoGPT's CPU shakespeare_char")
    assert lines[4].split() == ["rank", "option", "time", "compute", "comm", "exactness", "collectives"]
    rows = {line.split()[1]: line for line in lines[5:-1]}
    # spd:auto:3, calibrated on 4 blocks, is left out: tiny has 2; overlap and compression rows as registered
    rest = {o.label for o in candidates(config_by_name("tiny")) if o.chunks > 1 or o.compress}
    assert sorted(rows) == sorted(["megatron", "megatron-sp", "spd:last:1", "spd:all", "spd:auto:1", "spd:auto:2", *rest])
    assert all(" exact " in rows[label] for label in rest if "+" not in label)
    assert "exact" in rows["megatron"] and "approximate, loss +0.0084" in rows["spd:auto:1"]
    assert "approximate, not calibrated" in rows["spd:last:1"]
    # megatron: 4 block all-reduces of 16 x 96 x 4 B, the embedding's, and the first token's all-gather
    assert rows["megatron"].endswith("1 all-gather, 5 all-reduce; " + advise.fmt_bytes(5 * 16 * 96 * 2 + 12 / 2 / 2)
                                     + " on each rank's wire")
    assert lines[-1] == "use: spd:auto:1 (the fastest option whose loss increase is at most 0.01)"
    # the time by hand: computation (2 passes of 6N + 6 L T C FLOPs per token, forward a third) plus 6 collectives
    n = 12 * 2 * 96 ** 2 + 96 * 96 + 64 * 96
    compute = 16 * (6 * n + 6 * 2 * 16 * 96) / 3 / (H100_BF16_FLOPS * MFU) / 2
    comm = 5 * (NCCL_BASE_LATENCY + 2 * 0.6e-6 + 16 * 96 * 2 / 450e9) + (NCCL_BASE_LATENCY + 0.6e-6 + 6 / 2 / 450e9)
    rows = advise.advise("tiny", 2, "nvlink4", "prefill", seq=16)["rows"]
    assert next(r["seconds"] for r in rows if r["option"] == "megatron") == pytest.approx(compute + comm)


@pytest.mark.parametrize("argv, sentence", [
    (["--link", "warp9"], "--link 'warp9' is not a link name (nvlink4, pcie4, ib400, 100gbe, 10gbe), a rate such as 25gbit, "
                          "or a measurement file (FILE or FILE:RATE) that exists"),
    (["--config", "gpt3"], "argument --config: invalid choice: 'gpt3'"),
    (["--tp", "5"], "n_head=12 is not divisible by tp=5; use tp in {1, 2, 3, 4, 6, 12}"),
    (["--link", "docs/comm_cost/tp2.json:100mbit", "--tp", "4"], "--link docs/comm_cost/tp2.json was measured over 2 ranks "
                                                                  "and --tp is 4"),
    (["--link", "docs/comm_cost/tp2.json"], "--link docs/comm_cost/tp2.json measured the rates unlimited, 1gbit, 300mbit, "
                                            "100mbit; name one as docs/comm_cost/tp2.json:RATE"),
    (["--link", "docs/comm_cost/tp2.json:10mbit"], "has no rate '10mbit'"),
    (["--config", "tiny", "--workload", "decode", "--seq", "64"], "seq=64 does not fit tiny's block_size 64: a decode takes 1 to 63"),
])
def test_bad_arguments_are_one_sentence(argv, sentence, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and err[-1].startswith("python -m dtensor_gpt.advise: error: ") and sentence in err[-1]


def test_calibration_file_is_checked(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"loss_increase": {"spd:all": "small"}}))
    with pytest.raises(ValueError, match="spd:all's loss increase 'small' is not a finite number"):
        advise.load_calibration(str(bad))
    bad.write_text(json.dumps({"spd:all": 0.1}))
    with pytest.raises(ValueError, match='it is JSON with "loss_increase"'):
        advise.load_calibration(str(bad))


def test_the_measured_cells_pick_the_fastest_plan():
    """The count the README gives: `python -m dtensor_gpt.advise --validate`."""
    v = validate()
    assert v["exact"][1] == 24 and v["budget"][1] == 72  # TP 2 and 4 x 4 rates x 3 workloads; x 3 admitted sets
    assert v["exact"][0] >= 0.9 * 24 and v["budget"][0] >= 0.9 * 72
    strict = validate(own_compute=False)
    assert strict["exact"][0] >= 0.9 * 24 and strict["budget"][0] >= 0.9 * 72


def test_a_plan_refusing_the_workload_is_left_out_with_its_reason(monkeypatch):
    def overlap(model, mesh, *, chunks=2, loss_parallel=False):
        raise ValueError(f"cannot split this step into {chunks} chunks")

    monkeypatch.setitem(advise.PLANS, "megatron-overlap", overlap)
    for module, cache in ((cost, "_reports"), (advise, "_parts")):  # counts made earlier here are of the registered plan
        monkeypatch.setattr(module, cache, {})
    advice = advise.advise("tiny", 2, "nvlink4", "prefill", seq=16)
    assert advice["left_out"] == {"megatron-overlap:2": "cannot split this step into 2 chunks",
                                  "megatron-overlap:4": "cannot split this step into 4 chunks"}
    assert [r["option"] for r in advice["rows"]][-1] == "megatron-sp" and advice["use"] == "megatron"
    assert "left out: megatron-overlap:4: cannot split this step into 4 chunks" in advise.format_advice(advice)


def test_overlap_prices_only_what_the_step_splits():
    """megatron-overlap runs one row of one token whole, as megatron: a decoded token costs megatron's time, a prefill does not."""
    config = config_by_name("tiny")
    options = [Option("megatron"), Option("megatron-overlap", chunks=2), Option("megatron-overlap", chunks=4)]
    for workload, same in (("decode", True), ("prefill", False)):
        where, _ = advise.setting("100gbe", "tiny", config, 2, workload, 16)
        rows, _ = rank(options, lambda o: advise.collectives(o, 2, config, workload, 16), where, 2, config)
        seconds = {r["option"]: r["seconds"] for r in rows}
        assert (seconds["megatron-overlap:2"] == pytest.approx(seconds["megatron"])) is same
        assert (seconds["megatron-overlap:4"] == pytest.approx(seconds["megatron"])) is same


def test_compressed_training_keeps_the_backwards_all_reduces_in_fp32():
    """compress= sends the forward's sums compressed; the backward's all-reduces stay fp32, as the plan issues them."""
    config = config_by_name("tiny")
    edges, blocks = advise.collectives(Option("megatron", compress="int8"), 2, config, "train", 16)
    priced, _ = cost.compressed(blocks, cost.COMPRESSIONS["int8"], 1.0)
    issued = plan_collectives("megatron+int8", 2, config, **measure_options("train", 16))
    assert collective_kinds(edges + priced) == collective_kinds(issued)
    exact = plan_collectives("megatron", 2, config, **measure_options("train", 16))
    assert collective_kinds(issued)["all_reduce"] == collective_kinds(exact)["all_reduce"] - 4  # the forward's 2 per block
