"""
Which plan to run: every registered plan and option, ranked by the time the cost model
(dtensor_gpt.cost) predicts for one workload of a named model at a TP degree on a link, each
with its exactness (or its measured loss increase, from a calibration file) and the
collectives it issues (dtensor_gpt.comm), and the one to use: the fastest exact option, or
with --max-loss-increase the fastest whose calibrated loss increase is within it.

    python -m dtensor_gpt.advise --config gpt2-medium --tp 8 --link nvlink4 --workload train
    python -m dtensor_gpt.advise --config gpt2 --tp 2 --link docs/comm_cost/tp2.json:100mbit --workload decode
    python -m dtensor_gpt.advise --config gpt2-medium --tp 8 --link 10gbe --workload decode \\
        --max-loss-increase 0.05 --calibration benchmarks/calibration/spd-zero-shot-tp2.json

--link is a link by name (nvlink4, pcie4, ib400, 100gbe, 10gbe: bandwidth from its standard,
latency from NCCL's tuning model), a network rate (25gbit, 100mbit: NCCL's network latency),
or FILE[:RATE], a measurement benchmarks/comm_cost.py wrote (docs/comm_cost/tp2.json): alpha
and beta fitted to its microbenchmark at RATE, over its own number of ranks, which --tp must
equal. The computation is the on-paper estimate (one H100 SXM, divided by TP), except where
FILE measured this workload of this config on its unlimited link: then that time less the
unlimited link's own communication. Messages are bf16 on paper, fp32 on a measured link (as
its CPU jobs ran).

The options: megatron, megatron-sp, spd:last:<half the blocks>, spd:all, what the
calibration names (spd:last:K, spd:auto:K (any K blocks drop the same collectives), ...),
megatron-overlap:C (C chunks, 2 and 4) and PLAN+bf16 / PLAN+int8 (compress=); an option whose
plan is not registered (plans.PLANS), or does not take the option, or that the model cannot
take (spd:last:3 on 2 blocks), is left out.

The calibration file: JSON, {"loss_increase": {option: measured increase of the loss over the
exact model, ...}, "model": what it was measured on, "source": how}; other keys are kept as
notes. Exact options have 0; an approximate option the file does not name is "not calibrated"
and never within a budget.
"""

import glob
import inspect
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, replace

from dtensor_gpt.cli import ArgumentParser, integer, number, quiet_dtensor_notes
from dtensor_gpt.comm import WIRE_FRACTION
from dtensor_gpt.configs import CONFIGS, config_by_name
from dtensor_gpt.cost import (COMPRESSIONS, COMPUTE_SOURCE, DECODE_BANDWIDTH_FRACTION, DECODE_CONTEXT, H100_HBM_BYTES,
                              LINKS, NET_HOP, OVERLAPPING_PLANS, PAPER_BYTES, TRAIN_TOKENS, block_share, chunks_run,
                              comm_seconds, compressed, compute_seconds, dropped_blocks, fitted_link,
                              measure_options, option_parts, paper_link, parse_rate, plan_parts, scaled, step_seconds)
from dtensor_gpt.parallelize import check_divisible
from plans import PLANS

WORKLOADS = ("prefill", "decode", "train")
EXACT_PLANS = ("megatron", "megatron-sp", "megatron-overlap")
CHUNKS = (2, 4)
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "comm_cost")


# --------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class Option:
    plan: str
    blocks: str = ""  # spd's spd_blocks
    chunks: int = 1  # an overlapping plan's chunks
    compress: str = ""  # a key of COMPRESSIONS

    @property
    def label(self):
        return (self.plan + (f":{self.blocks}" if self.blocks else "") + (f":{self.chunks}" if self.chunks > 1 else "")
                + (f"+{self.compress}" if self.compress else ""))

    @property
    def exact(self):
        return self.plan in EXACT_PLANS and not self.compress

    def registered(self):
        """Whether this branch's plans.PLANS has the plan, and the plan takes the option."""
        if self.plan not in PLANS:
            return False
        accepted = inspect.signature(PLANS[self.plan]).parameters
        return (not self.compress or "compress" in accepted) and (
            self.chunks == 1 or OVERLAPPING_PLANS.get(self.plan) in accepted)


def parse_option(label):
    """An Option from its label ('spd:last:6', 'megatron-overlap:4', 'megatron+int8'); ValueError says the forms."""
    found = re.fullmatch(r"([a-z0-9-]+)(?::([a-z0-9:,]+))?(?:\+([a-z0-9]+))?", label)
    if not found or (found.group(3) and found.group(3) not in COMPRESSIONS):
        raise ValueError(f"option {label!r} is not PLAN, spd:BLOCKS, PLAN:CHUNKS or one of those +"
                         f"{'/+'.join(COMPRESSIONS)} (such as spd:last:6, megatron-overlap:4, megatron+int8)")
    plan, detail, compress = found.group(1), found.group(2) or "", found.group(3) or ""
    if plan in OVERLAPPING_PLANS and detail:
        if not detail.isdigit() or int(detail) < 1:
            raise ValueError(f"option {label!r}: {plan}'s chunks must be a whole number of at least 1")
        return Option(plan, chunks=int(detail), compress=compress)
    return Option(plan, blocks=detail if plan == "spd" else "", compress=compress)


def candidates(config, calibrated=()):
    """Every option to rank for `config`, in a fixed order; those not registered, or that the model cannot take, left out."""
    n = config.n_layer
    bases = [Option("megatron"), Option("megatron-sp")]
    bases += [Option("spd", f"last:{n // 2}")] if 0 < n // 2 < n else []
    bases += [Option("spd", "all")] + [Option(plan, chunks=c) for plan in OVERLAPPING_PLANS for c in CHUNKS]
    every = bases + [replace(o, compress=c) for o in bases for c in COMPRESSIONS] + [parse_option(x) for x in calibrated]
    return [o for o in dict.fromkeys(every) if o.registered() and _fits(o, n)]


def _fits(option, n_layer):
    """Whether a model of n_layer blocks can take the option (a calibration's spd:last:3 needs 3 blocks)."""
    if option.plan != "spd":
        return True
    try:
        dropped_blocks(option.blocks, n_layer)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------- the setting

@dataclass(frozen=True)
class Setting:
    """A link at tp ranks, and how a step's computation is had, as the cost model needs them."""

    link: dict  # {kind: (alpha, beta)}
    link_text: str
    message_scale: float  # bytes per element of a message over 4 (fp32)
    memory_bandwidth: float  # bytes/s a quantisation pass reaches (an H100's, on paper)
    compute: float  # seconds of a step's computation on one device, on paper
    compute_text: str
    measured: dict  # option label -> (measured unlimited-link seconds, unlimited link): computation from a measurement


def _load_measurement(path):
    try:
        with open(path) as f:
            result = json.load(f)
        result["collectives"]["seconds"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--link {path}: not a measurement benchmarks/comm_cost.py wrote ({e}); "
                         f"pass one of its JSON files, such as {os.path.join(RESULTS, 'tp2.json')}") from None
    return result


def setting(link, config_name, config, tp, workload, tokens=None):
    """(Setting, tokens) for `link` (a name, a rate, or FILE[:RATE]): see the module's docstring."""
    if link in LINKS:
        name, bandwidth, hop, source = LINKS[link]
        text = f"{name}, {bandwidth / 1e9:g} GB/s each way ({source}); latency: NCCL's ring model"
        return _paper(paper_link(bandwidth, hop, tp), text, config, workload, tokens)
    try:
        bits = parse_rate(link)
    except ValueError:
        bits = None
    if bits is not None:
        text = f"a {link} network link, {bits / 8e9:g} GB/s each way; latency: NCCL's ring model (network)"
        return _paper(paper_link(bits / 8, NET_HOP, tp), text, config, workload, tokens)
    path, rate = link, None
    if not os.path.isfile(path) and ":" in link:
        path, rate = link.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ValueError(f"--link {link!r} is not a link name ({', '.join(LINKS)}), a rate such as 25gbit, or a measurement "
                         "file (FILE or FILE:RATE) that exists")
    result = _load_measurement(path)
    rates = list(result["collectives"]["seconds"])
    if rate is None and len(rates) > 1:
        raise ValueError(f"--link {path} measured the rates {', '.join(rates)}; name one as {path}:RATE")
    rate = rate or rates[0]
    if rate not in rates:
        raise ValueError(f"--link {link}: {path} has no rate {rate!r}; it measured {', '.join(rates)}")
    n = result["collectives"]["group_size"]
    if n != tp:
        raise ValueError(f"--link {path} was measured over {n} ranks and --tp is {tp}; its fit holds for {n} ranks only: "
                         f"pass --tp {n} or a link by name or rate")
    fitted = fitted_link(result, rate)
    text = f"{rate} as measured in {path} (alpha, beta fitted to its microbenchmark over {n} ranks)"
    if tokens is None and "plans" in result:
        tokens = result["context"] if workload != "train" else result["train_seq"]
    paper, tokens = _paper(fitted, text, config, workload, tokens, message_scale=1.0)
    same = (result.get("config") == config_name and not result.get("overrides") and "plans" in result
            and tokens == (result["context"] if workload != "train" else result["train_seq"])
            and (workload != "train" or result["train_batch"] == 1))
    if not same:
        return paper, tokens
    unlimited = fitted_link(result, "unlimited")
    measured = {row["plan"]: (row[workload]["unlimited"], unlimited) for row in result["plans"]}
    return replace(paper, measured=measured, compute_text=f"measured on {path}'s unlimited link, less its communication"), tokens


def _paper(link, text, config, workload, tokens, message_scale=PAPER_BYTES):
    tokens = tokens or (TRAIN_TOKENS if workload == "train" else DECODE_CONTEXT)
    return Setting(link=link, link_text=text, message_scale=message_scale,
                   memory_bandwidth=H100_HBM_BYTES * DECODE_BANDWIDTH_FRACTION,
                   compute=compute_seconds(config, workload, tokens), compute_text=COMPUTE_SOURCE, measured={}), tokens


# ----------------------------------------------------------------------------- prediction

def computation(option, parts, where, tp):
    """
    Seconds of a step's computation per rank: on paper, or a measured unlimited-link step (the
    option's own, else megatron's: the same model) less that step's collectives on that link.
    """
    base = option.label if option.label in where.measured else "megatron"
    if base not in where.measured:
        return where.compute / tp
    seconds, unlimited = where.measured[base]
    edges, blocks = parts(parse_option(base))
    return seconds - comm_seconds(edges + blocks, tp, unlimited)


def predict_option(option, edges, blocks, compute, where, tp, config, chunks=None):
    """
    {seconds, compute, communication, collectives}: `option`'s step in `where` from its
    computation and its collectives outside and inside the blocks (fp32 bytes, as
    dtensor_gpt.comm counts them), the blocks in `chunks` overlapped chunks (default: the option's).
    """
    scale = where.message_scale
    edges, blocks = scaled(edges, scale), scaled(blocks, scale)
    extra = 0.0
    if option.compress:
        blocks, touched = compressed(blocks, COMPRESSIONS[option.compress], scale)
        extra = touched / where.memory_bandwidth
    edge_comm, block_comm = comm_seconds(edges, tp, where.link), comm_seconds(blocks, tp, where.link)
    chunks = option.chunks if chunks is None else chunks
    seconds = step_seconds(compute, compute * block_share(config), edge_comm, block_comm, chunks, extra)
    return dict(seconds=seconds, compute=compute + extra, communication=edge_comm + block_comm, collectives=edges + blocks)


_parts = {}  # (spec, tp, config, plan options, workload, tokens) -> (edges, blocks), within one run


def collectives(option, tp, config, workload, tokens):
    """
    (edges, blocks) the option's plan issues without compress=, the block all-reduces that
    compress= leaves in fp32 (the backward's) counted with the edges: the cost model compresses
    the blocks' other all-reduces itself, from their fp32 bytes.
    """
    plain = replace(option, compress="")
    spec = f"spd:{plain.blocks}" if plain.plan == "spd" else plain.plan
    chunks = {OVERLAPPING_PLANS[plain.plan]: plain.chunks} if plain.plan in OVERLAPPING_PLANS else None

    def counted(s):
        key = (s, tp, repr(config), repr(chunks), workload, tokens)
        if key not in _parts:
            _parts[key] = plan_parts(s, tp, config, chunks, **measure_options(workload, tokens))
        return _parts[key]

    return option_parts(counted, f"{spec}+{option.compress}" if option.compress else spec)


def rank(options, parts, where, tp, config, loss_increase=None, max_loss_increase=None):
    """
    Rows, fastest first, and the one to use: the fastest exact option, or with
    `max_loss_increase` the fastest exact or calibrated within it. `parts(option)` gives its
    (edges, blocks) collectives.
    """
    loss_increase = loss_increase or {}
    rows = []
    for option in options:
        edges, blocks = parts(option)
        # what was split: one row of one token runs whole
        chunks = chunks_run(blocks, parts(replace(option, chunks=1))[1]) if option.chunks > 1 else 1
        rows.append(dict(option=option.label, exact=option.exact,
                         loss_increase=0.0 if option.exact else loss_increase.get(option.label),
                         **predict_option(option, edges, blocks, computation(option, parts, where, tp), where, tp, config,
                                          chunks)))
    rows.sort(key=lambda r: r["seconds"])
    budget = 0.0 if max_loss_increase is None else max_loss_increase
    allowed = [r for r in rows if r["exact"] or (r["loss_increase"] is not None and r["loss_increase"] <= budget)]
    return rows, (allowed[0]["option"] if allowed else None)


def load_calibration(path):
    """{option label: loss increase} and the file's notes, from a calibration file (see the module's docstring)."""
    try:
        with open(path) as f:
            data = json.load(f)
        increases = data["loss_increase"]
        assert isinstance(increases, dict) and increases
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ValueError(f"--calibration {path}: not a calibration file ({type(e).__name__}: {e}); it is JSON with "
                         '"loss_increase": {option: increase, ...}') from None
    for label, value in increases.items():
        parse_option(label)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"--calibration {path}: {label}'s loss increase {value!r} is not a finite number")
    return increases, {k: v for k, v in data.items() if k != "loss_increase"}


def advise(config="gpt2", tp=2, link="nvlink4", workload="train", *, seq=None, calibration=None, max_loss_increase=None):
    """
    Every option ranked for `workload` of `config` (a name) at degree `tp` on `link`
    (see the module's docstring); `calibration` a file's path or {option: loss increase}.
    Returns {config, tp, workload, tokens, link, compute, calibration (the file's notes),
    max_loss_increase, rows (fastest first: option, seconds, compute, communication, exact,
    loss_increase, collectives), use, left_out {option: why}}. ValueError, in one sentence, for
    a bad argument.
    """
    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r}; known configs: {', '.join(CONFIGS)}")
    if workload not in WORKLOADS:
        raise ValueError(f"workload {workload!r} is not one of {', '.join(WORKLOADS)}")
    model = config_by_name(config)
    check_divisible(model, tp)
    notes = {}
    if isinstance(calibration, str):
        calibration, notes = load_calibration(calibration)
    calibration = calibration or {}
    for label in calibration:
        parse_option(label)
    where, tokens = setting(link, config, model, tp, workload, seq)
    most = model.block_size - (workload == "decode")  # a decoded token needs a position after its context
    if not 1 <= tokens <= most:
        raise ValueError(f"seq={tokens} does not fit {config}'s block_size {model.block_size}: a {workload} takes 1 to {most}")
    parts = lambda option: collectives(option, tp, model, workload, tokens)  # each plan counted once: _parts keeps it
    counted, left_out = [], {}
    for option in candidates(model, calibration):
        try:
            parts(option)
            counted.append(option)
        except ValueError as e:  # a plan that refuses this workload (its message says why)
            left_out[option.label] = str(e)
    rows, use = rank(counted, parts, where, tp, model, calibration, max_loss_increase)
    return dict(config=config, tp=tp, workload=workload, tokens=tokens, link=where.link_text, compute=where.compute_text,
                calibration=notes, max_loss_increase=max_loss_increase, rows=rows, use=use, left_out=left_out)


# ------------------------------------------------------------------------------- printing

def fmt_seconds(s):
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms" if s >= 1e-3 else f"{s * 1e6:.3g} us"


def fmt_bytes(b):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def collectives_text(counts, tp):
    """'98 all-reduce, 2 all-gather; 412 MB on each rank's wire'."""
    kinds = Counter()
    for (kind, _), n in counts.items():
        kinds[kind] += n
    wire = sum(n * size * WIRE_FRACTION[kind](tp) for (kind, size), n in counts.items())
    return ", ".join(f"{n} {k.replace('_', '-')}" for k, n in sorted(kinds.items())) + f"; {fmt_bytes(wire)} on each rank's wire"


def format_advice(advice):
    what = {"train": f"a training step of {advice['tokens']} tokens", "prefill": f"a prefill of {advice['tokens']} tokens",
            "decode": f"a decoded token after {advice['tokens']} tokens"}[advice["workload"]]
    lines = [f"{advice['config']} at TP={advice['tp']}, {what}",
             f"link: {advice['link']}", f"compute: {advice['compute']}"]
    if advice["calibration"]:
        lines.append("calibration: " + "; ".join(f"{k}: {v}" for k, v in advice["calibration"].items()))
    lines.append(f"{'rank':>4}  {'option':24} {'time':>10} {'compute':>10} {'comm':>10}  {'exactness':28} collectives")
    for i, r in enumerate(advice["rows"], 1):
        exactness = ("exact" if r["exact"] else "approximate, not calibrated" if r["loss_increase"] is None
                     else f"approximate, loss {r['loss_increase']:+.4f}")
        lines.append(f"{i:>4}  {r['option']:24} {fmt_seconds(r['seconds']):>10} {fmt_seconds(r['compute']):>10} "
                     f"{fmt_seconds(r['communication']):>10}  {exactness:28} {collectives_text(r['collectives'], advice['tp'])}")
    lines += [f"left out: {label}: {why}" for label, why in advice["left_out"].items()]
    budget = advice["max_loss_increase"]
    reason = ("the fastest exact option" if budget is None else
              f"the fastest option whose loss increase is at most {budget:g}")
    lines.append(f"use: {advice['use']} ({reason})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- validation

def validate(results=RESULTS, own_compute=True):
    """
    Replays the emulated cells of `results` (benchmarks/comm_cost.py measure's tp*.json):
    in every (TP, link rate, workload) cell, the adviser ranks the measured plans from their
    collectives (as the jobs logged them, equal to dtensor_gpt.comm's count) and the cell's
    setting, and its pick is compared with the measured fastest: among the exact plans, and
    among the plans admitted by every loss budget (every set of approximate plans a
    calibration and budget can admit, beside the exact ones). Without `own_compute`, every
    plan's computation is megatron's, so that only the collectives tell the plans apart (on the
    unlimited link too, where with it the prediction is the measurement).
    Returns {exact: [hits, cells], budget: [hits, cells], capped_exact, capped_budget, misses}.
    """
    out = dict(exact=[0, 0], budget=[0, 0], capped_exact=[0, 0], capped_budget=[0, 0], misses=[])
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        if "plans" not in result:
            continue
        tp, config = result["collectives"]["group_size"], config_by_name(result["config"], **result["overrides"])
        options = [parse_option(row["plan"]) for row in result["plans"]]
        approximate = [o.label for o in options if not o.exact]
        for workload in WORKLOADS:
            logged = {row["plan"]: Counter({(k, b): n for k, b, n in row[f"{workload}_collectives"]}) for row in result["plans"]}
            for rate in result["rates"]:
                where, _ = setting(f"{path}:{rate}", result["config"], config, tp, workload)
                if not own_compute:
                    where = replace(where, measured={"megatron": where.measured["megatron"]})
                measured = {row["plan"]: row[workload][rate] for row in result["plans"]}
                for subset in range(2 ** len(approximate)):
                    admitted = {x: 0.0 for i, x in enumerate(approximate) if subset >> i & 1}
                    rows, pick = rank(options, lambda o: (logged[o.label], Counter()), where, tp, config, admitted,
                                      0.0 if admitted else None)
                    fastest = min((p for p in measured if parse_option(p).exact or p in admitted), key=measured.get)
                    for key in ("exact" if not admitted else "budget",) + (
                            ("capped_exact" if not admitted else "capped_budget",) if rate != "unlimited" else ()):
                        out[key][0] += pick == fastest
                        out[key][1] += 1
                    if pick != fastest:
                        out["misses"].append(f"TP={tp} {workload} at {rate} among {', '.join(['exact', *admitted])}: "
                                             f"picked {pick} ({fmt_seconds(measured[pick])} measured), fastest {fastest} "
                                             f"({fmt_seconds(measured[fastest])})")
    return out


def main(argv=None):
    parser = ArgumentParser(prog="python -m dtensor_gpt.advise", description=__doc__)
    parser.add_argument("--config", default="gpt2", choices=list(CONFIGS), help="a named model size")
    parser.add_argument("--tp", type=integer(1), default=2, help="TP degree")
    parser.add_argument("--link", default="nvlink4",
                        help=f"{', '.join(LINKS)}, a rate such as 25gbit, or FILE[:RATE] measured by benchmarks/comm_cost.py")
    parser.add_argument("--workload", default="train", choices=WORKLOADS,
                        help="a training step, a prefill, or one decoded token after a context")
    parser.add_argument("--seq", type=integer(1),
                        help="tokens of a training step or prefill, a decoded token's context "
                             "(default: the measurement's with FILE; else 1024 to train, 512 otherwise)")
    parser.add_argument("--calibration", help="a calibration file: JSON {\"loss_increase\": {option: increase}} "
                                              "(default: none; approximate options are not calibrated)")
    parser.add_argument("--max-loss-increase", type=number(at_least=0),
                        help="use the fastest option whose calibrated loss increase is at most this (default: exact only)")
    parser.add_argument("--validate", action="store_true",
                        help="instead: replay the emulated cells in docs/comm_cost/ and count the picks that were the fastest")
    args = parser.parse_args(argv)
    quiet_dtensor_notes()
    if args.validate:
        for own, how in ((True, "each plan's computation from its own unlimited-link cell"),
                         (False, "every plan's computation from megatron's cell")):
            v = validate(own_compute=own)
            print(f"{how}:\n  top exact pick = measured fastest exact plan: {v['exact'][0]} of {v['exact'][1]} cells "
                  f"({v['capped_exact'][0]} of {v['capped_exact'][1]} on capped links)\n  top pick within a loss budget = "
                  f"measured fastest admitted: {v['budget'][0]} of {v['budget'][1]} (cell, admitted set) pairs "
                  f"({v['capped_budget'][0]} of {v['capped_budget'][1]} on capped links)")
            print("\n".join(f"  missed: {m}" for m in v["misses"]))
        return 0
    try:
        advice = advise(args.config, args.tp, args.link, args.workload, seq=args.seq, calibration=args.calibration,
                        max_loss_increase=args.max_loss_increase)
    except ValueError as e:
        parser.error(str(e))
    print(format_advice(advice))
    return 0


if __name__ == "__main__":
    sys.exit(main())
