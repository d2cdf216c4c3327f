"""The cost model (dtensor_gpt.cost): its fit, its prediction, and its collectives against dtensor_gpt.comm."""

import math
from collections import Counter

import pytest

from dtensor_gpt.comm import comm_report
from dtensor_gpt.cost import (COMPRESSIONS, compressed, fit_link, measure_options, plan_collectives, plan_parts, predict,
                              predict_step)
from helpers import collective_kinds, small_config


@pytest.mark.parametrize("n", [2, 4])
def test_fit_recovers_latency_and_bandwidth(n):
    alpha, beta = 1e-3, 12.5e6  # 1 ms, 100 Mbit/s
    ring = {"all_reduce": 2 * (n - 1) / n, "all_gather": (n - 1) / n, "reduce_scatter": (n - 1) / n}
    sizes = [2048, 32768, 524288, 2097152]
    seconds = {kind: {s: alpha + s * f / beta for s in sizes} for kind, f in ring.items()}
    for kind, (a, b) in fit_link(seconds, n).items():
        assert a == pytest.approx(alpha, rel=1e-9) and b == pytest.approx(beta, rel=1e-9)
    flat = fit_link({"all_reduce": {s: 2e-4 for s in sizes}}, n)["all_reduce"]
    assert flat[0] == pytest.approx(2e-4) and math.isinf(flat[1])


def test_prediction_swaps_the_unlimited_links_communication_for_the_capped_ones():
    unlimited = {k: (1e-4, math.inf) for k in ("all_reduce", "all_gather", "reduce_scatter")}
    capped = {k: (1e-3, 1e6) for k in ("all_reduce", "all_gather", "reduce_scatter")}
    counts = Counter({("all_reduce", 1_000_000): 2, ("all_gather", 400_000): 1})
    # at n=2 an all-reduce sends its message once, an all-gather half of it
    by_hand = 1.0 - (3 * 1e-4) + 2 * (1e-3 + 1_000_000 / 1e6) + (1e-3 + 200_000 / 1e6)
    assert predict(1.0, counts, 2, capped, unlimited) == pytest.approx(by_hand)


def _direct(spec, tp, config, **options):
    spec, _, compress = spec.partition("+")
    plan, _, blocks = spec.partition(":")
    options.update({"compress": compress} if compress else {})
    r = comm_report(plan, tp, config, **options, **({"spd_blocks": blocks} if blocks else {}))
    counts = Counter()
    for c in r["collectives"]:
        counts[(c["kind"], c["message_bytes"])] += c["count"]
    return counts


@pytest.mark.parametrize("spec, n_layer, measure", [
    ("megatron", 3, "decode"), ("megatron-sp", 3, "train"), ("spd:last:2", 4, "train"), ("spd:all", 3, "prefill"),
    ("spd:last:2+int8", 4, "prefill")])
def test_collectives_from_one_and_two_blocks_equal_the_whole_models(spec, n_layer, measure):
    config = small_config(n_layer=n_layer)
    options = measure_options(measure, 8, batch=2)
    assert plan_collectives(spec, 2, config, **options) == _direct(spec, 2, config, **options)


def test_the_blocks_collectives_apart_from_the_rest():
    """What overlap and compression act on: 2 all-reduces of the activations per kept block, 1 per dropped one."""
    edges, blocks = plan_parts("spd:last:1", 2, small_config(n_layer=3), **measure_options("prefill", 8))
    activations = 8 * 96 * 4  # one row of 8 positions, fp32
    assert blocks == Counter({("all_reduce", activations): 2 * 2 + 1})
    assert edges[("all_reduce", activations)] == 1  # the vocabulary-parallel embedding's


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_compressed_sums_are_priced_as_the_collectives_the_plan_issues(mode):
    """Each block all-reduce becomes an all-to-all (priced as the reduce-scatter whose wire it has) and an all-gather."""
    config, options = small_config(n_layer=2), measure_options("prefill", 8)
    _, plain = plan_parts("megatron", 2, config, **options)
    _, issued = plan_parts(f"megatron+{mode}", 2, config, **options)
    model, _ = compressed(plain, COMPRESSIONS[mode], 1.0)
    assert collective_kinds(model) == collective_kinds(issued) == Counter({"reduce_scatter": 4, "all_gather": 4})


def test_overlapped_blocks_cost_the_longer_of_compute_and_communication():
    unlimited = {k: (1e-4, math.inf) for k in ("all_reduce", "all_gather")}
    capped = {k: (1e-3, 1e6) for k in ("all_reduce", "all_gather")}
    edges, blocks = Counter({("all_gather", 400_000): 1}), Counter({("all_reduce", 250_000): 4})
    assert predict_step(1.0, edges, blocks, 2, capped, unlimited, 0.5, 1) == pytest.approx(
        predict(1.0, edges + blocks, 2, capped, unlimited))
    # computation 1 s less 5 collectives' 0.1 ms, half of it in the blocks; 2 chunks: the blocks cost the longer of their
    # computation and their communication, plus half the shorter (unlimited: 0.4 ms of it; capped: 4 x 251 ms)
    compute = 1.0 - 5e-4
    rest = compute / 2
    at_unlimited = rest + 1e-4 + compute / 2 + 4e-4 / 2
    at_capped = rest + (1e-3 + 0.2) + 4 * 0.251 + compute / 2 / 2
    assert predict_step(1.0, edges, blocks, 2, capped, unlimited, 0.5, 2) == pytest.approx(1.0 + at_capped - at_unlimited)
