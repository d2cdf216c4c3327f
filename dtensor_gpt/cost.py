"""
The time cost model: what a plan's collectives cost on a link, and what a workload costs to
compute. One model, shared by the plan adviser (dtensor_gpt.advise) and the measurements
that fitted and checked it (benchmarks/comm_cost.py, comm_cost_report.py).

A collective of `kind` whose message is `bytes`, over n ranks of a link:

    t(kind, bytes) = alpha[kind] + wire(kind, bytes, n) / beta[kind]

wire is what each rank sends in a ring (dtensor_gpt.comm.WIRE_FRACTION). A link is
{kind: (alpha seconds, beta wire bytes per second)}: fitted to a microbenchmark on the link
(`fit_link`), or on paper from a bandwidth and NCCL's latency model (`paper_link`). A step
is its computation plus its collectives; two options change that sum, both as data a plan
plugs into by name: chunks whose communication overlaps computation (`OVERLAPPING_PLANS`: the
blocks' part becomes max(compute, comm) plus the pipeline's fill, not their sum), and
compressed all-reduces (`COMPRESSIONS`: fewer bytes, other collectives, a quantisation pass).
"""

import math
import re
from collections import Counter
from dataclasses import dataclass, replace

from dtensor_gpt.comm import WIRE_FRACTION

UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_rate(text):
    """Bits per second from '100mbit', '2.5gbit', ... (tc's decimal units); None for 'unlimited'."""
    if text in (None, "unlimited"):
        return None
    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", text.strip().lower())
    if not found or float(found.group(1)) <= 0:
        raise ValueError(f"link rate {text!r} is not a rate such as 100mbit, 1gbit or unlimited")
    return float(found.group(1)) * UNITS[found.group(2)]


# ---------------------------------------------------------------------------------- links

def fit_link(seconds, n):
    """
    {kind: (alpha seconds, beta bytes/s)} from {kind: {message bytes: seconds}} over n ranks:
    alpha + wire / beta, least squares on the relative error (every size counts alike),
    alpha >= 0; a kind whose time does not grow with size gets beta = inf.
    """
    links = {}
    for kind, points in seconds.items():
        w = [float(size) * WIRE_FRACTION[kind](n) for size in points]
        u = [1.0 / t for t in points.values()]
        suu = sum(x * x for x in u)
        swu = sum(a * x * x for a, x in zip(w, u))
        sww = sum(a * a * x * x for a, x in zip(w, u))
        su, sw = sum(u), sum(a * x for a, x in zip(w, u))
        det = suu * sww - swu * swu
        alpha, gamma = (su * sww - sw * swu) / det, (suu * sw - swu * su) / det
        if alpha < 0:
            alpha, gamma = 0.0, sw / sww
        if gamma <= 0:
            alpha, gamma = su / suu, 0.0
        links[kind] = (alpha, math.inf if gamma == 0 else 1.0 / gamma)
    return links


def fitted_link(result, rate):
    """The link at `rate` fitted to the microbenchmark of a measurement benchmarks/comm_cost.py wrote (its JSON, loaded)."""
    c = result["collectives"]
    return fit_link({k: {int(s): t for s, t in v.items()} for k, v in c["seconds"][rate].items()}, c["group_size"])


# per direction; alpha from NCCL's own tuning model (ring, LL protocol): 6.6 us + steps x hop
LINKS = {
    "nvlink4": ("NVLink 4", 450e9, 0.6e-6,
                "H100 SXM: 900 GB/s total over both directions (NVIDIA H100 datasheet), 450 GB/s each way"),
    "pcie4": ("PCIe 4.0 x16", 31.5e9, 1.0e-6, "16 GT/s per lane, 128b/130b encoding (PCI-SIG PCIe 4.0): 31.5 GB/s each way"),
    "ib400": ("InfiniBand NDR 400 Gb/s", 50e9, 2.7e-6,
              "400 Gb/s per port (NVIDIA ConnectX-7 / Quantum-2, IBTA NDR): 50 GB/s each way"),
    "100gbe": ("100 GbE", 12.5e9, 2.7e-6, "IEEE 802.3ba-2010: 12.5 GB/s each way"),
    "10gbe": ("10 GbE", 1.25e9, 2.7e-6, "IEEE 802.3ae-2002: 1.25 GB/s each way"),
}
NCCL_BASE_LATENCY = 6.6e-6  # NVIDIA/nccl src/graph/tuning.cc: baseLat, Ring/LL; hwLat Ring/LL 0.6 (NVLink), 1.0 (PCI), 2.7 us (NET)
NET_HOP = 2.7e-6  # a network link of a given rate: NCCL's NET hop latency


def paper_link(bandwidth, hop, n):
    """A link on paper at n ranks: NCCL's ring alpha (base + a hop per ring step), `bandwidth` bytes/s each way."""
    steps = {"all_reduce": 2 * (n - 1), "all_gather": n - 1, "reduce_scatter": n - 1}
    return {kind: (NCCL_BASE_LATENCY + s * hop, bandwidth) for kind, s in steps.items()}


def collective_seconds(kind, message_bytes, n, link):
    alpha, beta = link[kind]
    return alpha + message_bytes * WIRE_FRACTION[kind](n) / beta


def comm_seconds(counts, n, link):
    """Seconds of every collective in counts {(kind, message bytes): count} over n ranks on `link`."""
    return sum(count * collective_seconds(kind, size, n, link) for (kind, size), count in counts.items())


def scaled(counts, factor):
    """counts with every message `factor` times its bytes (0.5: fp32 counts sent in bf16)."""
    return Counter({(kind, size * factor): n for (kind, size), n in counts.items()})


def predict(unlimited_seconds, counts, n, link, unlimited_link):
    """The cell at another link: its unlimited time, less the unlimited link's communication, plus this link's."""
    return unlimited_seconds - comm_seconds(counts, n, unlimited_link) + comm_seconds(counts, n, link)


def predict_step(unlimited_seconds, edges, blocks, n, link, unlimited_link, share, chunks):
    """
    `predict` for a plan whose blocks run in `chunks` overlapped chunks: the unlimited time
    plus what `step_seconds` adds at this link over the unlimited one; the computation is the
    unlimited time less its communication, `share` of it in the blocks. One chunk: `predict`.
    """
    compute = unlimited_seconds - comm_seconds(edges + blocks, n, unlimited_link)

    def step(at):
        return step_seconds(compute, compute * share, comm_seconds(edges, n, at), comm_seconds(blocks, n, at), chunks)

    return unlimited_seconds + step(link) - step(unlimited_link)


# -------------------------------------------------------------------------------- compute

H100_BF16_FLOPS = 989e12  # dense BF16 tensor-core peak, H100 SXM (NVIDIA H100 datasheet)
H100_HBM_BYTES = 3.35e12  # HBM3 bandwidth, H100 SXM (same datasheet)
MFU = 0.4  # assumed fraction of peak FLOPs a prefill or training step reaches
DECODE_BANDWIDTH_FRACTION = 0.7  # assumed fraction of HBM bandwidth a decoding step (or a quantisation pass) reaches
PAPER_BYTES = 0.5  # on paper messages are bf16: half the fp32 bytes dtensor_gpt.comm counts
TRAIN_TOKENS = 1024  # one 1024-token sequence per step; communication and computation both grow with tokens
DECODE_CONTEXT = 512  # a prefill's tokens, and the context a decoded token reads
COMPUTE_SOURCE = (f"one H100 SXM: prefill and training at {MFU:.0%} of {H100_BF16_FLOPS / 1e12:g} TFLOP/s (bf16), a decoded "
                  f"token reading the weights and KV cache at {DECODE_BANDWIDTH_FRACTION:.0%} of {H100_HBM_BYTES / 1e12:g} TB/s; "
                  "divided by TP")


def parameters(config):
    return 12 * config.n_layer * config.n_embd ** 2 + config.vocab_size * config.n_embd + config.block_size * config.n_embd


def block_share(config, workload="train", tokens=1):
    """
    The blocks' part of a step's computation (the rest: embedding and head), by their share of
    the weights each token goes through; a prefill computes the head at its last position only.
    """
    blocks = 12 * config.n_layer * config.n_embd ** 2
    rest = parameters(config) - blocks
    return blocks / (blocks + (rest / tokens if workload == "prefill" else rest))


def compute_seconds(config, workload, tokens):
    """
    One GPU (H100 SXM, bf16): a training step's or a prefill's FLOPs at MFU (Kaplan et al. 2020:
    6N + 6 n_layer n_ctx d per token trained, a third of it forward), or a decoded token's
    bytes (weights and a `tokens`-position KV cache) at the HBM fraction.
    """
    if workload == "decode":
        kv = 2 * config.n_layer * tokens * config.n_embd * 2
        return (parameters(config) * 2 + kv) / (H100_HBM_BYTES * DECODE_BANDWIDTH_FRACTION)
    per_token = 6 * parameters(config) + 6 * config.n_layer * tokens * config.n_embd
    return tokens * per_token / (1 if workload == "train" else 3) / (H100_BF16_FLOPS * MFU)


# ------------------------------------------------------------------ overlap and compression

# plan -> its option naming how many chunks a block's work is split into; each chunk's
# all-reduces overlap the next chunk's computation
OVERLAPPING_PLANS = {"megatron-overlap": "chunks"}


@dataclass(frozen=True)
class Compression:
    """How a plan's `compress=` option sends the blocks' all-reduces."""

    element_bytes: float  # bytes per element on the wire (fp32: 4)
    kinds: tuple  # the collectives one compressed all-reduce becomes, each of the compressed message
    passes: float  # passes over the uncompressed message that quantising and dequantising read or write
    description: str


COMPRESSIONS = {
    # a reduce-scatter as an all_to_all of compressed chunks (its wire is a reduce-scatter's), the sums compressed and
    # gathered (dtensor_gpt.compress: bf16 and int8 alike)
    "bf16": Compression(2, ("reduce_scatter", "all_gather"), 0, "sent as bf16 (all_to_all + all-gather)"),
    "int8": Compression(1, ("reduce_scatter", "all_gather"), 4, "sent as int8 with scales (all_to_all + all-gather)"),
}


def compressed(block_counts, compression, message_scale):
    """
    The blocks' collectives with every all-reduce compressed, and the bytes its quantisation
    passes read or write. `message_scale`: the bytes an element takes uncompressed, over 4.
    """
    out, touched = Counter(), 0.0
    factor = min(1.0, compression.element_bytes / (4 * message_scale))
    for (kind, size), n in block_counts.items():
        if kind != "all_reduce":
            out[(kind, size)] += n
            continue
        for new_kind in compression.kinds:
            out[(new_kind, size * factor)] += n
        touched += n * size * compression.passes
    return out, touched


def option_parts(count, spec):
    """
    (edges, blocks) of plan `spec` ('megatron', or 'megatron+int8' with compress=) for the cost
    model: `count(spec)` gives plan_parts. A compressed plan is priced from its plain plan's
    fp32 blocks, less the block all-reduces it still issues in fp32 (the backward's:
    dtensor_gpt.compress), which move to the edges: `compressed` then compresses the rest.
    """
    plain = spec.partition("+")[0]
    if plain == spec:
        return count(spec)
    (edges, blocks), (_, issued_blocks) = count(plain), count(spec)
    kept = Counter({key: min(n, issued_blocks[key]) for key, n in blocks.items()
                    if key[0] == "all_reduce" and issued_blocks[key]})
    return edges + kept, blocks - kept


def step_seconds(compute, block_compute, edge_comm, block_comm, chunks=1, extra_compute=0.0):
    """
    A step's time: its computation and its collectives, where the blocks' part runs in
    `chunks` pipelined chunks (chunks > 1: each chunk's all-reduces overlap the next one's
    computation, so that part costs max(compute, comm) plus one chunk of the other).
    """
    rest = compute - block_compute + extra_compute + edge_comm
    if chunks == 1:
        return rest + block_compute + block_comm
    return rest + max(block_compute, block_comm) + min(block_compute, block_comm) / chunks


def chunks_run(blocks, whole_blocks):
    """
    How many chunks an overlapping plan's blocks ran in: their all-reduces over the same plan's
    with one chunk (each chunk issues its own); 1 where there was nothing to split (one row of one token).
    """
    count = lambda c: sum(n for (kind, _), n in c.items() if kind == "all_reduce")
    return count(blocks) // count(whole_blocks) if count(whole_blocks) else 1


# ------------------------------------------------------------ collectives, from dtensor_gpt.comm

def _closes_backward(c):
    """The one all-reduce of every LayerNorm's partial gradients after a megatron-sp backward (no module issues it)."""
    return c["phase"] == "backward" and c["module"] == ""


def _times(counts, k):
    return Counter({key: v * k for key, v in counts.items()})


def measure_options(measure, seq, batch=1):
    """
    comm_report's arguments for a measure of `batch` rows: one prefill, one decoded token of each
    row (each choosing its token greedily on the vocabulary shards, as the cluster job's generate
    does), one training step.
    """
    return {"prefill": dict(seq=seq, batch=batch, prefill=True, top_k=1),
            "decode": dict(seq=seq, batch=batch, decode=True, top_k=1),
            "train": dict(seq=seq, batch=batch, backward=True, optimizer_step=True)}[measure]


_reports = {}  # comm_report's counts by arguments, within one run


def dropped_blocks(blocks, n_layer):
    """How many blocks an spd spec's blocks ('last:6', 'all', 'auto:3', '0,2') drop; any K drop the same collectives."""
    from plans.spd import parse_spd_blocks, spd_blocks_from_text

    auto = re.fullmatch(r"auto:(\d+)", blocks)
    if auto:
        blocks = f"last:{auto.group(1)}"
    return len(parse_spd_blocks(spd_blocks_from_text(blocks), n_layer))


def plan_parts(spec, tp, config, plan_options=None, **options):
    """
    (edges, blocks): Counters {(kind, message bytes): count} of what `spec` ('megatron',
    'spd:last:6', ...; `plan_options` for its plan) issues at degree tp outside the blocks
    (embedding, head, loss, sampling, the closing reduction) and in all n_layer blocks, from
    dtensor_gpt.comm's reports of the same config with 1 and 2 blocks: every block of a plan
    issues the same collectives, so a model's are those of its embedding and head plus
    n_layer blocks' (SPD's dropped blocks counted from a 1-block model that drops it). The
    one collective whose message grows with the blocks, the all-reduce closing a megatron-sp
    backward (every LayerNorm's gradients in one buffer), is counted apart: its bytes grow by
    the same amount with each block. Exact (tested), and cheap for GPT-2-XL's 48 blocks.
    """
    from dtensor_gpt.comm import comm_report

    def report(plan, n_layer, **more):
        """(the counts but the closing reduction, the closing reduction's [(kind, bytes)])"""
        small = replace(config, n_layer=n_layer)
        key = repr((plan, tp, small, sorted({**options, **more}.items())))
        if key not in _reports:
            r = comm_report(plan, tp, small, **options, **more)
            counts = Counter()
            for c in r["collectives"]:
                if not _closes_backward(c):
                    counts[(c["kind"], c["message_bytes"])] += c["count"]
            _reports[key] = counts, [(c["kind"], c["message_bytes"]) for c in r["collectives"] if _closes_backward(c)]
        return _reports[key]

    spec, _, compress = spec.partition("+")  # 'megatron+int8': compress="int8"
    plan, _, blocks = spec.partition(":")
    n_layer = config.n_layer
    dropped = dropped_blocks(blocks or "all", n_layer) if plan == "spd" else 0
    kept_plan = "megatron" if plan == "spd" else plan
    more = {**(plan_options or {}), **(dict(compress=compress) if compress else {})}
    (one, closing_one), (two, closing_two) = report(kept_plan, 1, **more), report(kept_plan, 2, **more)
    block = two - one
    edges = one - block
    assert edges + block == one and one + block == two, "the blocks do not issue alike"
    blocks_total = _times(block, n_layer - dropped)
    if dropped:
        drop_one, _ = report("spd", 1, spd_blocks="all", **({"compress": compress} if compress else {}))
        dropped_block = drop_one - edges
        assert edges + dropped_block == drop_one
        blocks_total += _times(dropped_block, dropped)
    for (kind, first), (_, second) in zip(closing_one, closing_two, strict=True):
        edges[(kind, first + (n_layer - 1) * (second - first))] += 1
    return edges, blocks_total


def plan_collectives(spec, tp, config, **options):
    """Counter {(kind, message bytes): count} of every collective `spec` issues (plan_parts, together)."""
    edges, blocks = plan_parts(spec, tp, config, **options)
    return edges + blocks
