"""
Tables, figure and on-paper estimates from what `python benchmarks/comm_cost.py measure` and
`placement` saved: `python benchmarks/comm_cost.py report [--png docs/comm_cost.png]`.
Prints markdown. The collectives of each cell come from dtensor_gpt.comm (cached beside the
results in collectives.json); the jobs' own logs of what they issued are checked against them.
"""

import glob
import hashlib
import json
import math
import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from comm_cost import MEASURES, PLACEMENT, PLANS, RESULTS, ROOT

from dtensor_gpt.configs import config_by_name
from dtensor_gpt.cost import (COMPUTE_SOURCE, DECODE_CONTEXT, LINKS, NCCL_BASE_LATENCY, OVERLAPPING_PLANS, TRAIN_TOKENS,
                              block_share, chunks_run, comm_seconds, compute_seconds, fitted_link,
                              measure_options, option_parts, parse_rate, plan_parts, predict, predict_step)


def load_results(directory):
    results = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        if os.path.basename(path) != "collectives.json":
            with open(path) as f:
                r = json.load(f)
            results[r["name"]] = r
    return results


def source_fingerprint():
    """A hash of the code that decides what a plan communicates: dtensor_gpt/ and plans/."""
    digest = hashlib.sha256()
    for folder in ("dtensor_gpt", "plans"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder))):
            if name.endswith(".py"):
                with open(os.path.join(ROOT, folder, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def _count(spec, tp, config_name, overrides, plan_options, options):
    config = config_by_name(config_name, **overrides)
    return [sorted([k, b, n] for (k, b), n in part.items()) for part in plan_parts(spec, tp, config, plan_options, **options)]


class CollectiveCounts:
    """
    plan_parts, remembered in a JSON file (each takes seconds to minutes of CPU), with the
    fingerprint of the code that counted them: counts from other code are counted anew.
    They are counted in a worker process replaced every few counts: torch 2.13's CommDebugMode
    keeps every model whose backward it recorded alive (its module tracker's backward hooks
    form a cycle through autograd's C++ nodes that Python's collector cannot see), about 0.2 GB
    per GPT-2 count, which took a whole recount to 24 GB in one process.
    """

    def __init__(self, path):
        self.path, self.code = path, source_fingerprint()
        known = json.load(open(path)) if os.path.exists(path) else {}
        self.known = known.get("parts", {}) if known.get("code") == self.code else {}
        self.workers = None

    def parts(self, spec, tp, config_name, overrides=None, plan_options=None, **options):
        """(edges, blocks): Counters {(kind, message bytes): count} outside the blocks and in them."""
        key = json.dumps([spec, tp, config_name, overrides or {}, plan_options or {}, options], sort_keys=True)
        if key not in self.known:
            if self.workers is None:
                self.workers = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=6)
            self.known[key] = self.workers.submit(_count, spec, tp, config_name, overrides or {}, plan_options, options).result()
            with open(self.path, "w") as f:
                json.dump(dict(code=self.code, parts=self.known), f, indent=0)
        return tuple(Counter({(k, b): n for k, b, n in part}) for part in self.known[key])

    def __call__(self, spec, tp, config_name, overrides=None, **options):
        edges, blocks = self.parts(spec, tp, config_name, overrides, **options)
        return edges + blocks

    def chunks(self, spec, tp, config_name, overrides=None, **options):
        """How many overlapped chunks `spec`'s blocks run in (1: a plan that does not overlap, or nothing to split)."""
        plan = spec.partition("+")[0]
        if plan not in OVERLAPPING_PLANS:
            return 1
        _, blocks = self.parts(spec, tp, config_name, overrides, **options)
        _, whole = self.parts(spec, tp, config_name, overrides, {OVERLAPPING_PLANS[plan]: 1}, **options)
        return chunks_run(blocks, whole)


def fmt_time(seconds):
    return f"{seconds:.2f} s" if seconds >= 10 else f"{seconds * 1000:.0f} ms" if seconds >= 0.1 else f"{seconds * 1000:.1f} ms"


def fmt_rate(label):
    bits = parse_rate(label)
    if bits is None:
        return "unlimited"
    return f"{bits / 1e9:g} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:g} Mbit/s"


def fastest_first(rates):
    return sorted(rates, key=lambda r: -math.inf if parse_rate(r) is None else -parse_rate(r))


# --------------------------------------------------------------------- measured vs predicted

def cells(results, counts, source=RESULTS):
    """
    Every measured cell of one results directory (`source`) with its prediction: dicts source,
    tp, plan, measure, rate, measured (the fastest repeat), samples (each repeat's), load1 (the
    1-minute load at each), predicted, serial (the prediction were nothing overlapped), chunks.
    """
    out = []
    for tp in (2, 4):
        r = results.get(f"tp{tp}")
        if r is None:
            continue
        config = config_by_name(r["config"], **r.get("overrides", {}))
        unlimited_link = fitted_link(r, "unlimited")
        for rate in fastest_first(r["rates"]):
            link = fitted_link(r, rate)
            for row in r["plans"]:
                for measure in r.get("measures", MEASURES):
                    tokens = r["context"] if measure != "train" else r["train_seq"]
                    rows = r.get("decode_rows", 1) if measure != "train" else r["train_batch"]
                    options = measure_options(measure, tokens, rows)
                    edges, blocks = counts.parts(row["plan"], tp, r["config"], **options)
                    c, unlimited = edges + blocks, row[measure]["unlimited"]
                    chunks = counts.chunks(row["plan"], tp, r["config"], **options)
                    logged = Counter({(k, b): n for k, b, n in row[f"{measure}_collectives"]})
                    out.append(dict(source=source, tp=tp, plan=row["plan"], measure=measure, rate=rate,
                                    label=measure_label(measure, rows, tokens),
                                    measured=row[measure][rate], samples=row[f"{measure}_samples"][rate],
                                    load1=row[f"{measure}_load1"][rate], config=r["config"], chunks=chunks,
                                    predicted=predict_step(unlimited, edges, blocks, tp, link, unlimited_link,
                                                           block_share(config, measure, tokens), chunks),
                                    serial=predict(unlimited, c, tp, link, unlimited_link),
                                    comm=comm_seconds(c, tp, link), logged_matches=logged == c))
    return out


def measure_label(measure, rows, tokens):
    """'prefill, 512 tokens', 'decode, 8 rows, per step' (a token of each row): what a cell times."""
    many = f"{rows} rows, " if rows > 1 else ""
    return {"decode": f"decode, {many}per {'step' if rows > 1 else 'token'}", "prefill": f"prefill, {many}{tokens} tokens",
            "train": f"training step, {many}{tokens} tokens"}[measure]


def spread(cell):
    """(slowest - fastest) / fastest of a cell's repeats: how much the shared machine moved it."""
    return (max(cell["samples"]) - min(cell["samples"])) / cell["measured"]


def error(cell):
    return cell["predicted"] / cell["measured"] - 1


def measured_table(all_cells, tp):
    rates = fastest_first({c["rate"] for c in all_cells if c["tp"] == tp})
    lines = [f"| TP={tp} plan | measure | " + " | ".join(fmt_rate(r) for r in rates) + " |",
             "|---|---|" + "---|" * len(rates)]
    for plan in PLANS:
        for measure in MEASURES:
            row = {c["rate"]: c for c in all_cells if c["tp"] == tp and c["plan"] == plan and c["measure"] == measure}
            if not row:
                continue
            texts = []
            for r in rates:
                c = row[r]
                texts.append(fmt_time(c["measured"]) if r == "unlimited" else
                             f"{fmt_time(c['measured'])} ({fmt_time(c['predicted'])}, {error(c):+.0%})")
            lines.append(f"| {plan} | {row[rates[0]]['label']} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def links_table(results):
    lines = ["| job | link rate | all-reduce: alpha, beta | all-gather: alpha, beta | reduce-scatter: alpha, beta |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        if "collectives" not in r:
            continue
        for rate in fastest_first(r["rates"]):
            fit = fitted_link(r, rate)
            cols = []
            for kind in ("all_reduce", "all_gather", "reduce_scatter"):
                alpha, beta = fit[kind]
                cols.append(f"{alpha * 1e6:.0f} us, " + ("inf" if math.isinf(beta) else f"{beta * 8 / 1e6:,.0f} Mbit/s"))
            lines.append(f"| {name} | {fmt_rate(rate)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def jobs_table(results):
    """What each job took, and the machine's load while it ran (its own processes included)."""
    lines = ["| job | machine | repeats | wall time | 1-min load: at start / mean / max | others' runnable threads, mean |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        load = r["load"]
        machine = r.get("machine", f"a {r['cpus']}-vCPU VM, CPU model not recorded")
        lines.append(f"| {name} | {machine} | {r['repeats']} | {r['seconds'] / 60:.1f} min | {load['load1_at_start']} / "
                     f"{load['load1_mean']} / {load['load1_max']:.2f} | {load['other_runnable_mean']} |")
    return "\n".join(lines)


def savings_table(all_cells):
    """Time of each plan against megatron's, per TP, rate and measure."""
    others = [plan for plan in PLANS if plan != "megatron" and any(c["plan"] == plan for c in all_cells)]
    lines = ["| TP | link | measure | megatron | " + " | ".join(p.replace("spd:", "spd ") for p in others) + " |",
             "|---|---|---|---|" + "---|" * len(others)]
    index = {(c["tp"], c["rate"], c["measure"], c["plan"]): c["measured"] for c in all_cells}
    for tp in (2, 4):
        for rate in fastest_first({c["rate"] for c in all_cells}):
            for measure in MEASURES:
                m = index.get((tp, rate, measure, "megatron"))
                if m is None:
                    continue
                times = [index.get((tp, rate, measure, p)) for p in others]
                texts = [f"{fmt_time(t)} ({t / m - 1:+.0%})" if t else "" for t in times]
                lines.append(f"| {tp} | {fmt_rate(rate)} | {measure} | {fmt_time(m)} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def plot(all_cells, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = fastest_first({c["rate"] for c in all_cells})
    x_of = {r: parse_rate(r) or 4 * max(parse_rate(q) or 0 for q in rates) for r in rates}
    colors = {"megatron": "#4c72b0", "megatron-sp": "#55a868", "spd:last:6": "#c44e52", "spd:all": "#8172b2",
              "megatron-overlap": "#ccb974", "megatron+bf16": "#937860", "megatron+int8": "#64b5cd"}
    sources = list(dict.fromkeys(c["source"] for c in all_cells))
    rows = sorted({(sources.index(c["source"]), c["tp"]) for c in all_cells})
    fig, axes = plt.subplots(len(rows), 3, figsize=(13, 3.6 * len(rows)), squeeze=False)
    for i, (source, tp) in enumerate(rows):
        for j, measure in enumerate(MEASURES):
            ax = axes[i][j]
            panel = [c for c in all_cells if c["source"] == sources[source] and c["tp"] == tp and c["measure"] == measure]
            if not panel:  # a job that left this measure out
                ax.axis("off")
                continue
            for plan in PLANS:
                pts = sorted((x_of[c["rate"]], c["measured"], c["predicted"]) for c in panel if c["plan"] == plan)
                if not pts:
                    continue
                scale = 1 if measure == "train" else 1000
                xs = [p[0] for p in pts]
                ax.plot(xs, [p[1] * scale for p in pts], "o-", color=colors[plan], label=f"{plan} measured")
                ax.plot(xs, [p[2] * scale for p in pts], "--", color=colors[plan], alpha=0.7, label=f"{plan} model")
            ax.set_xscale("log")
            ax.set_xticks([x_of[r] for r in rates], [fmt_rate(r).replace("unlimited", "unlim.") for r in rates], fontsize=8)
            ax.minorticks_off()
            ax.invert_xaxis()
            ax.set_ylabel("s" if measure == "train" else "ms")
            config = panel[0]["config"]
            run = f", {os.path.basename(sources[source])}" if source else ""  # the later results directories, named
            ax.set_title(f"{'GPT-2 124M' if config == 'gpt2' else config}, TP={tp}{run}: {panel[0]['label']}",
                         fontsize=8 if source else 9)
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
    for i in range(len(rows)):
        axes[i][0].legend(fontsize=6)
    fig.suptitle("time against link rate (solid: measured on emulated nodes; dashed: cost model)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title above the first row
    fig.savefig(path, dpi=110)


# -------------------------------------------------------------------------------- placement

def placement_table(results):
    """Training step with TP inside the nodes (FSDP2 across) or TP across: measured, predicted, ratio."""
    lines = ["| model, tokens per dp rank | link between the nodes | TP inside nodes, FSDP2 across (a) | "
             "TP across nodes (b) | (b) / (a) measured | (b) / (a) model | over the link per step per node, (a) / (b) |",
             "|---|---|---|---|---|---|---|"]
    for workload in PLACEMENT:
        r = results.get(f"placement-{workload['name']}")
        if r is None:
            continue
        p, per_node = r["placement"], r["world_size"] // r["nodes"]
        base_link = fitted_link(r, "unlimited")
        crossing_counts = {}
        for where in ("tp-inside", "tp-across"):
            counts = Counter()
            for kind, size, ranks in p[where]["collectives"][0]:  # rank 0's: every rank's have the same shape
                if len({rank // per_node for rank in ranks}) > 1:
                    counts[(kind, size)] += 1
            crossing_counts[where] = counts
        for rate in fastest_first(r["rates"]):
            link = fitted_link(r, rate)
            measured, predicted, crossing = {}, {}, {}
            for where, counts in crossing_counts.items():
                measured[where] = p[where]["train"][rate]
                predicted[where] = predict(p[where]["train"]["unlimited"], counts, 2, link, base_link)
                # 2-rank groups: an all-reduce sends its whole message, the others half; every rank of a node uses its link
                crossing[where] = per_node * sum(n * size * (1 if k == "all_reduce" else 0.5) for (k, size), n in counts.items())
            a, b = measured["tp-inside"], measured["tp-across"]
            label = f"{workload['label']}, {p['train_batch_per_dp_rank']} x {p['train_seq']}"
            lines.append(f"| {label} | {fmt_rate(rate)} | {fmt_time(a)} (model {fmt_time(predicted['tp-inside'])}) | "
                         f"{fmt_time(b)} (model {fmt_time(predicted['tp-across'])}) | {b / a:.2f} | "
                         f"{predicted['tp-across'] / predicted['tp-inside']:.2f} | "
                         f"{crossing['tp-inside'] / 1e6:,.1f} MB / {crossing['tp-across'] / 1e6:,.1f} MB |")
    return "\n".join(lines) if len(lines) > 2 else None


# ----------------------------------------------------------------------------- on paper

# head counts that TP 8 divides (16 of 48, 32 of 50): neither the bytes nor the FLOPs depend on them
PAPER_MODELS = [("GPT-2 124M", "gpt2", dict(n_head=16)),
                ("GPT-2-XL size 1.5B", "gpt2-xl", dict(n_head=32))]
PAPER_PLANS = ["megatron", "megatron-sp", "spd:half", "spd:all"]
PAPER_NEW_PLANS = ["megatron", "megatron-overlap", "megatron+bf16", "megatron+int8"]


def paper_tables(counts):
    """
    The plans on real links, as the adviser prices them (dtensor_gpt.advise.predict_option):
    megatron's time and speed-up over one GPU, then the speed-ups of the older plans and of the
    new ones (overlap in the plan's chunks where the step splits, compressed sums).
    """
    from dtensor_gpt.advise import parse_option, predict_option, setting

    head = "| model | workload | TP | " + " | ".join(name for name, *_ in LINKS.values()) + " |"
    rule = "|---|---|---|" + "---|" * len(LINKS)
    t1, t2, t3 = [head, rule], [head, rule], [head, rule]
    for label, name, overrides in PAPER_MODELS:
        config = config_by_name(name, **overrides)
        for workload in ("decode", "train"):
            tokens = DECODE_CONTEXT if workload == "decode" else TRAIN_TOKENS
            one_gpu = compute_seconds(config, workload, tokens)
            options = measure_options(workload, tokens, 1)
            wname = "decode, per token" if workload == "decode" else f"training step, {TRAIN_TOKENS} tokens"
            for tp in (2, 4, 8):
                priced = {}
                for plan in dict.fromkeys(PAPER_PLANS + PAPER_NEW_PLANS):
                    spec = f"spd:last:{config.n_layer // 2}" if plan == "spd:half" else plan
                    parts = option_parts(lambda s: counts.parts(s, tp, name, overrides, **options), spec)
                    priced[plan] = (parse_option(spec), *parts,
                                    counts.chunks(spec.partition("+")[0], tp, name, overrides, **options))
                row1, row2, row3 = [], [], []
                for link in LINKS:
                    where, _ = setting(link, name, config, tp, workload, tokens)
                    times = {p: predict_option(option, edges, blocks, one_gpu / tp, where, tp, config, chunks)["seconds"]
                             for p, (option, edges, blocks, chunks) in priced.items()}
                    m = times["megatron"]
                    row1.append(f"{fmt_us(m)} ({one_gpu / m:.2f}x)")
                    row2.append(" / ".join(f"{one_gpu / times[p]:.2f}" for p in PAPER_PLANS))
                    row3.append(" / ".join(f"{one_gpu / times[p]:.2f}" for p in PAPER_NEW_PLANS))
                t1.append(f"| {label} | {wname} (1 GPU: {fmt_us(one_gpu)}) | {tp} | " + " | ".join(row1) + " |")
                t2.append(f"| {label} | {wname} | {tp} | " + " | ".join(row2) + " |")
                t3.append(f"| {label} | {wname} | {tp} | " + " | ".join(row3) + " |")
    return "\n".join(t1), "\n".join(t2), "\n".join(t3)


def fmt_us(seconds):
    return f"{seconds * 1e6:.0f} us" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def model_summary(all_cells):
    """The cost model against the cells measured on capped links: the count within ±20%, and each cell outside."""
    unlimited = {(c["tp"], c["plan"], c["measure"]): c for c in all_cells if c["rate"] == "unlimited"}
    errors = [abs(error(c)) for c in all_cells if c["rate"] != "unlimited"]
    outside = [c for c in all_cells if c["rate"] != "unlimited" and abs(error(c)) > 0.2]
    print(f"cost model: {len(errors)} predicted cells, median |error| {sorted(errors)[len(errors) // 2]:.1%}, "
          f"max {max(errors):.1%}, {len(errors) - len(outside)} within ±20%")
    overlapped = [c for c in all_cells if c["rate"] != "unlimited" and c["chunks"] > 1]
    if overlapped:
        serial = sum(abs(c["serial"] / c["measured"] - 1) <= 0.2 for c in overlapped)
        print(f"overlapped cells: {len(overlapped)}, {len(overlapped) - sum(c in outside for c in overlapped)} within ±20% "
              f"with the max-type term, {serial} if nothing overlapped")
    spreads = sorted(spread(c) for c in all_cells)
    print(f"noise: a cell's repeats spread (slowest - fastest) / fastest {spreads[len(spreads) // 2]:.0%} in the median cell, "
          f"{spreads[-1]:.0%} at most")
    within = [c for c in outside if min(c["samples"]) <= c["predicted"] <= max(c["samples"])]
    print(f"of the {len(outside)} outside, {len(within)} predict a time inside the range of the cell's own repeats "
          f"(the shared machine's noise is larger than the error)")
    for c in outside:
        base = unlimited[c["tp"], c["plan"], c["measure"]]
        print(f"  outside ±20%: TP={c['tp']} {c['plan']} {c['measure']} at {fmt_rate(c['rate'])}: measured "
              f"{fmt_time(c['measured'])} (repeats {fmt_time(min(c['samples']))} to {fmt_time(max(c['samples']))}; "
              f"unlimited {fmt_time(base['measured'])}, repeats {fmt_time(min(base['samples']))} to "
              f"{fmt_time(max(base['samples']))}), model {fmt_time(c['predicted'])} ({error(c):+.0%}), of which "
              f"communication {fmt_time(c['comm'])}" + ("; inside the repeats' range" if c in within else "")
              + (f"; were nothing overlapped {fmt_time(c['serial'])} ({c['serial'] / c['measured'] - 1:+.0%})"
                 if c["chunks"] > 1 else ""))
    mismatched = [c for c in all_cells if not c["logged_matches"]]
    which = dict.fromkeys(f"TP={c['tp']} {c['plan']} {c['measure']}" for c in mismatched)
    print(f"collectives the jobs issued = dtensor_gpt.comm's count in {len(all_cells) - len(mismatched)} of "
          f"{len(all_cells)} cells" + (f"; not in: {', '.join(which)}" if which else ""), "\n")


def report_cells(results, all_cells):
    """The jobs, the links fitted, each cell measured and predicted, and each plan against megatron."""
    if results:
        print("## The jobs, and the shared machine's load while they ran\n")
        print(jobs_table(results), "\n")
    if not all_cells:
        return
    print("## Links fitted from the microbenchmark (alpha: latency per collective; beta: wire bytes per second)\n")
    print(links_table(results), "\n")
    for tp in sorted({c["tp"] for c in all_cells}):
        print(f"## TP={tp}: measured (model, error)\n")
        print(measured_table(all_cells, tp), "\n")
    model_summary(all_cells)
    print("## Each plan against megatron (measured)\n")
    print(savings_table(all_cells), "\n")


def report(args):
    """Every results directory's cells, the first's as the validated set, then the on-paper tables."""
    every = []
    for i, directory in enumerate(args.results):
        results = load_results(directory)
        counts = CollectiveCounts(os.path.join(directory, "collectives.json"))
        all_cells = cells(results, counts, directory)
        if i:
            print(f"# The cells in {os.path.relpath(directory, ROOT)}\n")
        report_cells(results, all_cells)
        every += all_cells
        table = placement_table(results)
        if table:
            print("## Placement: dp=2 x tp=2 on 2 nodes of 2 ranks, training step\n")
            print(table, "\n")
        if not i:
            paper_counts = counts
    if args.png and every:
        plot(every, args.png)
        print(f"wrote {args.png}\n")
    t1, t2, t3 = paper_tables(paper_counts)
    print("## On paper: the links\n")
    print("| link | bandwidth each way | alpha per ring step (NCCL, ring/LL) | source |\n|---|---|---|---|")
    for name, bandwidth, hop, source in LINKS.values():
        print(f"| {name} | {bandwidth / 1e9:g} GB/s | {NCCL_BASE_LATENCY * 1e6:g} us + {hop * 1e6:g} us per step | {source} |")
    print(f"\ncompute on {COMPUTE_SOURCE}; messages in bf16 (half the fp32 bytes counted)\n")
    print("## On paper: real links (megatron: time per step and speed-up over one GPU)\n")
    print(t1, "\n")
    print("## On paper: speed-up over one GPU, megatron / megatron-sp / spd half the blocks / spd all blocks\n")
    print(t2, "\n")
    print("## On paper: speed-up over one GPU, megatron / megatron-overlap / megatron+bf16 / megatron+int8\n")
    print(t3)
    return 0
