"""
Communication report: every collective of one forward (and backward) of a parallelized GPT,
per module, with bytes, against the plan's theoretical minimum.

    python -m dtensor_gpt.comm --plan megatron --tp 4 --config gpt2 --seq 1024
    python -m dtensor_gpt.comm --plan spd --spd-blocks last:6 --tp 2 --backward
    python -m dtensor_gpt.comm --plan megatron megatron-sp spd --tp 4 --png plans.png   # a chart of the plans

It runs in one process over torch's fake process group, which plays all TP ranks: the
collectives DTensor issues, and their sizes, are exactly those of a real job; their
results are not computed, so nothing here checks numbers. Wire bytes are per rank for
ring algorithms: all-reduce moves 2(N-1)/N of the message, all-gather and reduce-scatter
(N-1)/N of the full (gathered) tensor, all-to-all (N-1)/N of what each rank sends.
`--compress bf16|int8` shows the blocks' sums sent compressed (`dtensor_gpt.compress`): an
all-to-all and an all-gather of bytes in place of each all-reduce.
"""

import contextlib
import functools
import importlib.util
import os
import re
import sys
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode as TorchCommDebugMode
from torch.distributed.tensor.debug._comm_mode import _CommModeModuleTracker
from torch.distributed.tensor.parallel import loss_parallel

from dtensor_gpt import partial_grads
from dtensor_gpt.cli import ArgumentParser, add_compress_argument, integer, plan_options, quiet_dtensor_notes
from dtensor_gpt.compress import check_compress, payload_bytes
from dtensor_gpt.configs import CONFIGS, config_by_name
from dtensor_gpt.model import GPT, GPTConfig, KVCache
from dtensor_gpt.overlap import chunk_sizes
from dtensor_gpt.parallelize import check_divisible, parallelize
from dtensor_gpt.sampling import VocabParallelSampler, exchanged_bytes
from plans import PLANS, megatron_overlap
from plans.spd import parse_spd_blocks

_funcol = torch.ops._c10d_functional
KINDS = {
    _funcol.all_reduce: "all_reduce",
    _funcol.all_gather_into_tensor: "all_gather",
    _funcol.reduce_scatter_tensor: "reduce_scatter",
    _funcol.all_to_all_single: "all_to_all",
}
TOP_K = 200  # examples/generate.py's and nanoGPT's sample.py's default
SAMPLERS = ("vocab-parallel", "multinomial")  # examples/generate.py's --sampler
WIRE_FRACTION = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
                 "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}
PHASES = ("forward", "backward", "optimizer")  # the order a training step issues them in


@dataclass(frozen=True)
class Collective:
    module: str  # innermost module running when it was issued ("" for the model itself)
    phase: str  # one of PHASES
    kind: str  # all_reduce, all_gather, reduce_scatter, all_to_all
    message_bytes: int  # the full tensor reduced or gathered, or what each rank sends in an all-to-all


class _ModuleTracker(_CommModeModuleTracker):
    """
    CommDebugMode's module tracker for a module that runs more than once in one forward (a
    megatron-overlap block runs its attention and MLP once per chunk): torch 2.13's adds one
    more forward hook at every call, keeps them all, and each pops the module stack, which then
    runs dry. Here a call first removes the hook its module's last call added.
    """

    def _fw_pre_hook(self, mod, input):
        stale = self.register_forward_hook_handles.pop(self._get_mod_name(mod), None)
        if stale is not None:
            stale.remove()
        super()._fw_pre_hook(mod, input)


class CommDebugMode(TorchCommDebugMode):
    """torch's CommDebugMode, counting per module also when a module runs several times in a forward."""

    def __init__(self):
        super().__init__()
        self.advanced_module_tracker = _ModuleTracker()


class _Recorder(CommDebugMode):
    """CommDebugMode, plus the module, phase and size of each collective."""

    def __init__(self):
        super().__init__()
        self.collectives = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        kind = KINDS.get(getattr(func, "_overloadpacket", None))
        if kind is not None and out is not NotImplemented:
            size = args[0].numel() * args[0].element_size()
            if kind == "all_gather":
                size *= args[1]
            module = self.advanced_module_tracker.name
            module = "" if module == "Global" or "." not in module or partial_grads.reducing() else module.split(".", 1)[1]
            phase = "backward" if self.advanced_module_tracker.is_bw else "forward"
            self.collectives.append(Collective(module, phase, kind, size))
        return out


def record_collectives(model, idx, targets=None, backward=False, cache=None, sample=None, optimizer=None):
    """
    The collectives of model(idx[, targets][, cache]) (and its backward, or `sample` of the
    last position's logits, as generation picks the next token; and then `optimizer.step()`,
    phase "optimizer") in issue order.
    """
    warnings.filterwarnings("ignore", "Full backward hook is firing")
    recorder = _Recorder()
    lp = loss_parallel() if targets is not None else contextlib.nullcontext()
    grad = contextlib.nullcontext() if backward else torch.no_grad()
    with recorder, lp, grad:
        logits, loss = model(idx, targets, cache=cache)
        if backward:
            loss.backward()
        if sample is not None:
            sample(logits[:, -1, :])
    if isinstance(logits, AsyncCollectiveTensor):
        logits.wait()  # the gather was issued; finish it before the process group goes
    if optimizer is None:
        return recorder.collectives
    stepping = _Recorder()
    with stepping:
        optimizer.step()
    return recorder.collectives + [replace(c, phase="optimizer") for c in stepping.collectives]


def part_of_model(module):
    """
    Which part a module belongs to: "block i", "embedding", "head", or "model" for what the
    model's own forward does outside submodules (the loss, the last-position index).
    """
    block = re.match(r"transformer\.h\.(\d+)", module)
    if block:
        return f"block {block.group(1)}"
    if module.startswith(("transformer.wte", "transformer.wpe", "transformer.drop")):
        return "embedding"
    if module.startswith(("transformer.ln_f", "lm_head")):
        return "head"
    return "model"


def minimum(plan, config, batch, seq, tp, backward, dropped, top_k=TOP_K, vocab_parallel=False, chunks=1, compress=None):
    """
    The fewest collectives each part of the model needs under `plan`: (phase, kind, bytes).

    Megatron: 2 all-reduces of the (B, T, C) activations per block (megatron-overlap: 2 per
    chunk of `chunks`, each of its chunk's rows, or positions of one row); sequence parallel: the
    same bytes as 2 all-gathers + 2 reduce-scatters; a dropped sync point: 1 all-reduce (and
    in backward one all-reduce of the 3C replicated-parameter gradients its rank-local MLP
    input feeds: ln_2's weight and bias and attn.c_proj's bias). Generation gathers only the
    last position's logits; training (with `backward`) keeps them vocab-sharded and its
    cross entropy needs 2 all-reduces of (B, T) floats: the max, then the sum of
    exponentials together with the target logit; under sequence parallelism the gradients of
    the LayerNorms' replicated parameters need one all-reduce, all of them together
    (dtensor_gpt.partial_grads). With `vocab_parallel` sampling
    (dtensor_gpt.sampling) a generated token needs no logits at all: each rank's `top_k` best
    candidates and its winner among its ties with its k-th are gathered, or its one winner of
    the full softmax. With `compress`, a block's forward sum is an all-to-all and an all-gather
    of the compressed activations (dtensor_gpt.compress).
    """
    s = 4  # fp32
    act = batch * seq * config.n_embd * s
    sp = plan == "megatron-sp"
    need = {}
    summed = [("all_reduce", act)]
    if compress is not None:
        summed = [(kind, payload_bytes(act // s, tp, compress)) for kind in ("all_to_all", "all_gather")]
    for i in range(config.n_layer):
        if i in dropped:
            fwd = summed
            bwd = [("all_reduce", act)] * 2 + [("all_reduce", 3 * config.n_embd * s)]
        elif sp:
            fwd = bwd = [("all_gather", act), ("reduce_scatter", act)] * 2
        elif plan == "megatron-overlap":
            n = batch if batch > 1 else seq
            fwd = bwd = [("all_reduce", act // n * size) for size in chunk_sizes(n, chunks)] * 2
        else:
            fwd, bwd = summed * 2, [("all_reduce", act)] * 2
        need[f"block {i}"] = [("forward",) + c for c in fwd] + ([("backward",) + c for c in bwd] if backward else [])
    need["embedding"] = [("forward", "reduce_scatter" if sp else "all_reduce", act)]
    if backward:
        need["embedding"] += [("backward", "all_gather", act)] if sp else []
        need["head"] = [("forward", "all_gather", act), ("backward", "reduce_scatter", act)] if sp else [
            ("backward", "all_reduce", act)]
        need["model"] = [("forward", "all_reduce", batch * seq * s), ("forward", "all_reduce", 2 * batch * seq * s)]
        if sp:  # the LayerNorms' replicated weights and biases: their partial gradients, in one buffer
            need["model"] += [("backward", "all_reduce", (2 * 2 * config.n_layer + 2) * config.n_embd * s)]
    elif vocab_parallel:
        need["head"] = [("forward", "all_gather", batch * config.n_embd * s)] if sp else []
        need["model"] = [("forward", "all_gather", exchanged_bytes(config.vocab_size, tp, batch, top_k))]
    else:
        last = batch * config.n_embd * s
        need["head"] = ([("forward", "all_gather", last)] if sp else []) + [
            ("forward", "all_gather", batch * config.vocab_size * s)]
    return need


def _excess(measured, needed):
    """
    What `measured` does beyond `needed`, per phase and kind: the extra collectives (the
    smallest ones, when there are more than needed) and any bytes over the needed total.
    """
    extra = []
    for key in sorted({c[:2] for c in measured}):
        sizes = sorted(c[2] for c in measured if c[:2] == key)
        allowed = sorted(n[2] for n in needed if n[:2] == key)
        surplus = len(sizes) - len(allowed)
        extra += [key + (size,) for size in sizes[:max(surplus, 0)]]
        kept = sizes[max(surplus, 0):]
        if sum(kept) > sum(allowed):
            extra.append(key + (sum(kept) - sum(allowed),))
    return extra


def comm_report(plan="megatron", tp=2, config="tiny", batch=1, seq=None, backward=False, decode=False, top_k=TOP_K,
                sampler="vocab-parallel", optimizer_step=False, prefill=False, **plan_options):
    """
    Run one forward (and backward) of `config` under `plan` at degree `tp` over a fake
    process group and return what it communicated, per module and per part of the model,
    next to the plan's minimum. `config` is a GPTConfig or a name from `configs.CONFIGS`.
    With `decode`, the forward measured is one generated token after a `seq`-token prompt
    held in a KV cache, and the choice of the next token from its logits by vocabulary-parallel
    sampling among the `top_k` best (None: the full softmax), as examples/generate.py does
    (`sampler` "multinomial": the last logits gathered instead, as its --sampler multinomial):
    the collectives per generated token. With `prefill`, the forward measured is the `seq`-token
    prompt's, and the first token is chosen from its last position in the same way. With `optimizer_step` (needs `backward`), an AdamW
    step (foreach=False, as examples/train.py) follows the backward: a whole training step.
    The plans' minimum needs no collective there, and the plans issue none.
    """
    config = config_by_name(config) if isinstance(config, str) else config
    if plan not in PLANS:
        raise ValueError(f"unknown plan {plan!r}; known plans: {', '.join(sorted(PLANS))}")
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive integer")
    seq = config.block_size if seq is None else seq
    if not 1 <= seq <= config.block_size:
        raise ValueError(f"seq={seq} must be in 1..block_size={config.block_size}")
    if dist.is_initialized():
        raise ValueError("comm_report runs its own fake process group; call it outside a distributed job")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer, or None for the full softmax")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {', '.join(SAMPLERS)}")
    if decode and (backward or seq >= config.block_size):
        raise ValueError("decode measures one generated token: no backward, and seq must leave room in block_size")
    if prefill and (backward or decode):
        raise ValueError("prefill measures a prompt's forward and its first token: not with backward or decode")
    if optimizer_step and not backward:
        raise ValueError("optimizer_step follows a backward: pass backward=True with it")
    check_divisible(config, tp)
    check_compress(plan_options.get("compress"))
    dropped = parse_spd_blocks(plan_options.get("spd_blocks", "all"), config.n_layer) if plan == "spd" else []
    chunks = plan_options.get("chunks", megatron_overlap.CHUNKS) if plan == "megatron-overlap" else 1

    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)
    try:
        torch.manual_seed(0)
        with contextlib.redirect_stdout(None):
            model = GPT(config)
        vocab_parallel = (decode or prefill) and sampler == "vocab-parallel"
        parallelize(model, init_device_mesh("cpu", (tp,)), plan, loss_parallel=backward or vocab_parallel, **plan_options)
        idx = torch.randint(0, config.vocab_size, (batch, seq))
        cache = None
        if decode:
            cache = KVCache(config.n_layer, config.block_size)
            with torch.no_grad():
                logits, _ = model(idx, cache=cache)
            if isinstance(logits, AsyncCollectiveTensor):
                logits.wait()
            idx = idx[:, -1:]
        sample = functools.partial(VocabParallelSampler(seed=0), top_k=top_k) if vocab_parallel else None
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False) if optimizer_step else None
        collectives = record_collectives(model, idx, idx if backward else None, backward, cache, sample, optimizer)
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # the model's own order
    finally:
        dist.destroy_process_group()

    tokens = batch * (1 if decode else seq)
    rows = Counter(collectives)
    per_module = [
        dict(asdict(c), count=n, wire_bytes=round(n * c.message_bytes * WIRE_FRACTION[c.kind](tp)))
        for c, n in sorted(rows.items(), key=lambda row: (PHASES.index(row[0].phase), row[0].module == "", order[row[0].module]))
    ]
    needed = minimum(plan, config, batch, 1 if decode else seq, tp, backward, dropped, top_k, vocab_parallel, chunks,
                     plan_options.get("compress"))
    measured = {}
    for c in collectives:
        measured.setdefault(part_of_model(c.module), []).append((c.phase, c.kind, c.message_bytes))
    above = {part: _excess(measured.get(part, []), needed.get(part, [])) for part in set(measured) | set(needed)}
    wire = lambda cs: sum(b * WIRE_FRACTION[k](tp) for _, k, b in cs)
    block_wire = sum(wire(cs) for part, cs in measured.items() if part.startswith("block"))

    def per_token(costs, part):
        """The wire bytes per token of `part` in `costs` ("blocks": every "block i")."""
        names = [n for n in costs if n == part or (part == "blocks" and n.startswith("block "))]
        return sum(wire(costs[n]) for n in names) / tokens

    parts = {part: dict(wire_bytes_per_token=per_token(measured, part), minimum_wire_bytes_per_token=per_token(needed, part))
             for part in ("embedding", "blocks", "head", "model")}
    return dict(
        plan=plan, tp=tp, config=asdict(config), batch=batch, seq=seq, backward=backward, decode=decode,
        sampler=sampler if decode or prefill else None, top_k=top_k if vocab_parallel else None,
        optimizer_step=optimizer_step, prefill=prefill, compress=plan_options.get("compress"),
        spd_blocks=dropped, chunks=chunks, collectives=per_module,
        wire_bytes_per_token=sum(r["wire_bytes"] for r in per_module) / tokens,
        minimum_wire_bytes_per_token=sum(wire(cs) for cs in needed.values()) / tokens,
        block_wire_bytes_per_token=block_wire / tokens / config.n_layer,
        parts=parts,
        counts=dict(Counter(c.kind for c in collectives if c.phase == "forward")),
        above_minimum={part: extra for part, extra in sorted(above.items()) if extra},
    )


def format_report(report):
    tp, lines = report["tp"], []
    c = report["config"]
    lines.append(f"plan {report['plan']}, tp={tp}, n_layer={c['n_layer']} n_head={c['n_head']} n_embd={c['n_embd']} "
                 f"vocab={c['vocab_size']}, batch={report['batch']} seq={report['seq']}"
                 + (", forward + backward + AdamW step" if report.get("optimizer_step") else
                    ", forward + backward" if report["backward"] else
                    f", one generated token (KV cache, {sampled(report)})" if report["decode"] else
                    f", a prompt and its first token ({sampled(report)})" if report.get("prefill") else ", forward")
                 + (f", sync dropped in blocks {report['spd_blocks']}" if report["spd_blocks"] else "")
                 + (f", blocks in {report['chunks']} chunks" if report["plan"] == "megatron-overlap" else "")
                 + (f", blocks' sums sent as {report['compress']}" if report["compress"] else ""))
    lines.append(f"{'module':34} {'phase':9} {'collective':15} {'count':>5} {'message bytes':>14} {'wire bytes/rank':>16}")
    sampling = report["decode"] or (report.get("prefill") and report["sampler"] == "vocab-parallel")
    model = "(model: loss)" if report["backward"] else "(model: sampling)" if sampling else "(model: last position)"
    for r in report["collectives"]:
        where = r["module"] or {"optimizer": "(optimizer)", "backward": "(model: end of backward)"}.get(r["phase"], model)
        lines.append(f"{where:34} {r['phase']:9} {r['kind']:15} {r['count']:>5} "
                     f"{r['message_bytes']:>14,} {r['wire_bytes']:>16,}")
    lines.append(f"wire bytes per token per rank: {report['wire_bytes_per_token']:,.0f} "
                 f"(theoretical minimum {report['minimum_wire_bytes_per_token']:,.0f}); "
                 f"per block {report['block_wire_bytes_per_token']:,.0f}")
    if report["above_minimum"]:
        for part, extra in report["above_minimum"].items():
            for (phase, kind, size), n in Counter(extra).items():
                lines.append(f"ABOVE MINIMUM  {part}: {phase} {kind} of {size:,} bytes" + (f" (x{n})" if n > 1 else ""))
    else:
        lines.append("every collective is at the plan's minimum")
    return "\n".join(lines)


def sampled(report):
    """How a decode report picks its token."""
    if report["sampler"] == "multinomial":
        return "last logits gathered"
    k = report["top_k"]
    return "vocab-parallel full-softmax sampling" if k is None else f"vocab-parallel top-{k} sampling"


def plan_label(report):
    """A plan's name, with how many blocks dropped their sync point for spd."""
    if report["plan"] != "spd":
        return report["plan"]
    return f"spd, {len(report['spd_blocks'])} of {report['config']['n_layer']} blocks dropped"


def plot_plans(reports, path):
    """
    A bar chart of `reports` (one per plan, same model and run): wire bytes per token per rank
    of the embedding, one block, the head and the model's own collectives, and in a second
    panel the total, each bar with the plan's theoretical minimum drawn across it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    r, colors = reports[0], ["#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd"]
    c = r["config"]
    model = "model (loss)" if r["backward"] else "model (sampling)" if r["decode"] else "model (last position)"
    groups = {"embedding": "embedding", "blocks": f"a block (mean of {c['n_layer']})", "head": "head", "model": model}
    fig, (ax, total_ax) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw=dict(width_ratios=[3.2, 1]))
    width = 0.8 / len(reports)

    def bars(axis, x, measured, minimum, color, label=None, minimum_label=None):
        drawn = axis.bar(x, measured, width, color=color, label=label)
        axis.bar_label(drawn, fmt="{:,.0f}", fontsize=8, padding=2)
        axis.hlines(minimum, [xi - width / 2 for xi in x], [xi + width / 2 for xi in x], colors="black", linewidth=2,
                    label=minimum_label)

    share = [1 / c["n_layer"] if part == "blocks" else 1 for part in groups]
    for i, report in enumerate(reports):
        parts = [report["parts"][part] for part in groups]
        offset, color = (i - (len(reports) - 1) / 2) * width, colors[i % len(colors)]
        bars(ax, [g + offset for g in range(len(groups))],
             [p["wire_bytes_per_token"] * k for p, k in zip(parts, share)],
             [p["minimum_wire_bytes_per_token"] * k for p, k in zip(parts, share)], color,
             label=plan_label(report), minimum_label="theoretical minimum" if i == 0 else None)
        bars(total_ax, [offset], [report["wire_bytes_per_token"]], [report["minimum_wire_bytes_per_token"]], color)
    ax.set_xticks(range(len(groups)), list(groups.values()), fontsize=10)
    total_ax.set_xticks([0], ["total"], fontsize=10)
    ax.set_ylabel("wire bytes per token per rank", fontsize=10)
    for axis in (ax, total_ax):
        axis.margins(y=0.15)
        axis.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
        axis.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=9, frameon=False, loc="upper right")
    run = ("forward + backward" if r["backward"] else f"one generated token (KV cache, {sampled(r)})" if r["decode"]
           else "forward")
    fig.suptitle(f"Collective wire bytes per token per rank, {run}\nGPT n_layer={c['n_layer']} n_head={c['n_head']} "
                 f"n_embd={c['n_embd']} vocab={c['vocab_size']}, TP={r['tp']}, batch {r['batch']}, seq {r['seq']}",
                 fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = ArgumentParser(prog="python -m dtensor_gpt.comm", description=__doc__)
    parser.add_argument("--plan", nargs="+", default=["megatron"], choices=list(PLANS),
                        help="one or more plans to report, and to draw with --png (default: megatron)")
    parser.add_argument("--tp", type=integer(1), default=2, help="TP degree, played by one process")
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS), help="a named model size")
    for field in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        parser.add_argument("--" + field.replace("_", "-"), type=integer(1),
                            help=f"override the config's {field} (default: the config's)")
    parser.add_argument("--batch", type=integer(1), default=1, help="rows of tokens")
    parser.add_argument("--seq", type=integer(1), help="sequence length (default: block_size)")
    parser.add_argument("--backward", action="store_true", help="also run a backward (training step, loss_parallel)")
    parser.add_argument("--decode", action="store_true", help="measure one generated token after a --seq prompt in a KV cache")
    parser.add_argument("--top-k", type=integer(0), default=TOP_K,
                        help="with --decode: the candidates sampling keeps, 0 for the full softmax (default: %(default)s, "
                             "as examples/generate.py)")
    parser.add_argument("--sampler", default="vocab-parallel", choices=SAMPLERS,
                        help="with --decode: how the next token is chosen, as examples/generate.py's --sampler")
    parser.add_argument("--optimizer-step", action="store_true", help="with --backward: also an AdamW step (a whole training step)")
    parser.add_argument("--spd-blocks", default="all", help="for --plan spd: indices '0,3,5', 'all' or 'last:K'")
    parser.add_argument("--chunks", type=integer(1), default=megatron_overlap.CHUNKS,
                        help="for --plan megatron-overlap: the chunks each block's work is split into (default: %(default)s)")
    add_compress_argument(parser)
    parser.add_argument("--png", help="draw the plans' bytes per part of the model and in total, against their "
                                      "theoretical minimum, into this PNG file (default: no chart)")
    args = parser.parse_args(argv)
    if args.png:
        folder = os.path.dirname(os.path.abspath(args.png))
        if not os.path.isdir(folder):
            parser.error(f"--png {args.png}: the folder {folder} does not exist; create it or write elsewhere")
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--png needs matplotlib: pip install matplotlib")
    quiet_dtensor_notes()  # the report shows what DTensor does instead
    try:
        overrides = {f: getattr(args, f) for f in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
                     if getattr(args, f) is not None}
        config = config_by_name(args.config, **overrides)
        common = dict(tp=args.tp, config=config, batch=args.batch, seq=args.seq, backward=args.backward, decode=args.decode,
                      top_k=args.top_k or None, sampler=args.sampler, optimizer_step=args.optimizer_step)
        reports = []
        for plan in dict.fromkeys(args.plan):
            reports.append(comm_report(plan, **common, **plan_options(plan, args.spd_blocks, args.compress, args.chunks)))
        print("\n\n".join(format_report(r) for r in reports))
        if args.png:
            plot_plans(reports, args.png)
            print(f"wrote {args.png}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
