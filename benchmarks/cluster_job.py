"""
The measured job of benchmarks/comm_cost.py: run by torchrun on every emulated node.

    torchrun ... benchmarks/cluster_job.py --out R.json --collectives 2048,65536 --groups world
    torchrun ... benchmarks/cluster_job.py --out R.json --plans megatron,spd:last:6 --config gpt2
    torchrun ... benchmarks/cluster_job.py --out R.json --placement tp-across --config gpt2

--collectives times torch.distributed's all_reduce, all_gather_into_tensor and
reduce_scatter_tensor (the ops DTensor's and FSDP2's collectives reach in gloo) at each message
size, over the whole world or, with --groups cross/inside, over every group of ranks that
share a local rank / a node, all groups at once (as a 2-D mesh runs them). --plans builds the
model under each plan on a 1-D TP mesh of the whole world and times the prefill of --context
tokens, decoding with a KV cache after it (per token), and one training step (forward,
backward, AdamW; loss_parallel) of --train-batch x --train-seq tokens. --placement times the
training step on a (dp, tp) mesh with FSDP2 over dp, TP inside the nodes or across them,
and records every collective of one step with the ranks of its group.

Every time is the slowest rank's; a figure is the median over --repeats, after a warm-up.
Rank 0 writes the results, with the ranks' placement on the nodes, as JSON to --out.
"""

import argparse
import contextlib
import datetime
import json
import os
import statistics
import time
import warnings
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from dtensor_gpt import GPT, parallelize
from dtensor_gpt.configs import config_by_name
from dtensor_gpt.launch import exit_distributed
from dtensor_gpt.model import KVCache

KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the results (rank 0 writes it)")
    p.add_argument("--collectives", help="message sizes in bytes, comma-separated")
    p.add_argument("--groups", default="world", choices=["world", "cross", "inside"])
    p.add_argument("--plans", help="comma-separated: megatron, megatron-sp, spd:all, spd:last:K")
    p.add_argument("--measure", default="prefill,decode,train", help="what --plans times")
    p.add_argument("--placement", choices=["tp-inside", "tp-across"])
    p.add_argument("--plan", default="megatron", help="the TP plan of --placement")
    p.add_argument("--config", default="gpt2", help="a named size of dtensor_gpt.configs")
    for field in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        p.add_argument("--" + field.replace("_", "-"), type=int, help=f"override the config's {field}")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new", type=int, default=16, help="tokens decoded after the prompt")
    p.add_argument("--train-batch", type=int, default=1, help="rows per step (per data-parallel rank)")
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=600, help="seconds any collective may wait")
    return p.parse_args(argv)


def placement():
    """[(node, local rank)] of every rank, checked against torchrun's numbering: rank = node * P + local."""
    me = (int(os.environ["GROUP_RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ.get("DTGC_NODE", -1)))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, me)
    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    for rank, (group, local, _) in enumerate(everyone):
        if rank != group * per_node + local:
            raise RuntimeError(f"rank {rank} is local rank {local} of node {group}: not torchrun's numbering")
    return everyone


def slowest(times):
    """Each entry's maximum over the ranks (every rank passes the same number of entries)."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


_FUNCOL = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter"}


def _collective(func, args):
    """(kind, message bytes, process group) of a collective op as DTensor or FSDP2 issue it; None for other ops."""
    namespace, name = func.namespace, func._overloadpacket.__name__
    nbytes = lambda t: t.numel() * t.element_size()
    if namespace == "_c10d_functional" and name in _FUNCOL:  # DTensor: (input, ..., group name)
        group = _resolve_process_group(args[-1])
        return _FUNCOL[name], nbytes(args[0]) * (dist.get_world_size(group) if name == "all_gather_into_tensor" else 1), group
    if namespace == "c10d" and name == "allreduce_":  # ([tensor], group, ...)
        return "all_reduce", nbytes(args[0][0]), dist.ProcessGroup.unbox(args[1])
    if namespace == "c10d" and name == "_allgather_base_":  # FSDP2: (output, input, group, ...)
        return "all_gather", nbytes(args[0]), dist.ProcessGroup.unbox(args[2])
    if namespace == "c10d" and name == "_reduce_scatter_base_":  # FSDP2: (output, input, group, ...)
        return "reduce_scatter", nbytes(args[1]), dist.ProcessGroup.unbox(args[2])
    return None


class CollectiveLog(TorchDispatchMode):
    """Every collective issued while active: (kind, message bytes, ranks of its group)."""

    def __init__(self):
        super().__init__()
        self.entries = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if DTensor in types:
            return NotImplemented  # let DTensor turn the op into plain ops and collectives first (as CommDebugMode does)
        found = _collective(func, args)
        if found is not None:
            kind, size, group = found
            self.entries.append((kind, size, dist.get_process_group_ranks(group)))
        return func(*args, **(kwargs or {}))

    def counts(self):
        """[[kind, message bytes, count]], sorted."""
        return [[kind, size, n] for (kind, size), n in sorted(Counter((k, s) for k, s, _ in self.entries).items())]


def node_groups(kind, nodes, per_node):
    """Rank lists: the whole world, ranks sharing a local rank across nodes, or ranks of one node."""
    if kind == "world":
        return [list(range(nodes * per_node))]
    if kind == "cross":
        return [[n * per_node + local for n in range(nodes)] for local in range(per_node)]
    return [[n * per_node + local for local in range(per_node)] for n in range(nodes)]


def time_collectives(sizes, groups_kind, repeats):
    """{kind: {size: seconds per collective}}: `repeats` trials of back-to-back collectives, median."""
    nodes, per_node = dist.get_world_size() // int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    mine = None
    for ranks in node_groups(groups_kind, nodes, per_node):  # every rank creates every group, in order
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    g = dist.get_world_size(mine)
    out = {}
    for kind in KINDS:
        out[kind] = {}
        for size in sizes:
            full = torch.ones(size // 4)
            part = torch.ones(size // 4 // g)
            op = {"all_reduce": lambda: dist.all_reduce(full, group=mine),
                  "all_gather": lambda: dist.all_gather_into_tensor(full, part, group=mine),
                  "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full, group=mine)}[kind]
            back_to_back = max(1, min(20, 2 ** 21 // size))
            op()
            trials = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(back_to_back):
                    op()
                trials.append((time.perf_counter() - start) / back_to_back)
            out[kind][size] = statistics.median(slowest(trials))
    return dict(group_size=g, groups=groups_kind, seconds=out)


def parse_plan(spec):
    """'spd:last:6' -> ('spd', {'spd_blocks': 'last:6'})."""
    plan, _, blocks = spec.partition(":")
    return plan, (dict(spd_blocks=blocks or "all") if plan == "spd" else {})


def build(config, spec, mesh, train):
    torch.manual_seed(0)
    with contextlib.redirect_stdout(None):
        model = GPT(config)
    plan, options = parse_plan(spec)
    return parallelize(model, mesh, plan, loss_parallel=train, **options)


def batch(config, rows, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (rows, seq + 1), generator=g)


def time_prefill(model, prompt, repeats):
    """Median prefill time, and the collectives of the warm-up prefill."""
    times, log = [], CollectiveLog()
    with torch.no_grad():
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            with log if i == 0 else contextlib.nullcontext():
                model(prompt, cache=KVCache(len(model.transformer.h)))
            times.append(time.perf_counter() - start)
    return statistics.median(slowest(times[1:])), log.counts()


def time_decode(model, prompt, new):
    """Median time between consecutive generated tokens (the prompt's forward not counted), and one token's collectives."""
    stamps = []
    dist.barrier()
    model.generate(prompt, new, top_k=1, use_cache=True, on_token=lambda _: stamps.append(time.perf_counter()))
    per_token = statistics.median(slowest([b - a for a, b in zip(stamps, stamps[1:])]))
    cache, log = KVCache(len(model.transformer.h)), CollectiveLog()
    with torch.no_grad():
        model(prompt, cache=cache)
        with log:
            model(prompt[:, -1:], cache=cache)
    return per_token, log.counts()


def train_steps(model, tokens, repeats, rows=None):
    """
    Median time of `repeats` training steps (forward, backward, AdamW, zero_grad) after a
    warm-up one, the collectives of the warm-up step, and the optimizer.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if rows is not None:
        x, y = x[rows], y[rows]
    times, log = [], CollectiveLog()
    for i in range(repeats + 1):
        dist.barrier()
        start = time.perf_counter()
        with log if i == 0 else contextlib.nullcontext():
            with loss_parallel():
                _, loss = model(x, y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(slowest(times[1:])), log, optimizer


def measure_plans(args, config, mesh):
    rows = []
    for spec in args.plans.split(","):
        row = dict(plan=spec)
        prompt = batch(config, 1, args.context)[:, :-1]
        if "prefill" in args.measure or "decode" in args.measure:
            model = build(config, spec, mesh, train=False).eval()
            if "prefill" in args.measure:
                row["prefill"], row["prefill_collectives"] = time_prefill(model, prompt, args.repeats)
            if "decode" in args.measure:
                row["decode"], row["decode_collectives"] = time_decode(model, prompt, args.new)
            del model
        if "train" in args.measure:
            model = build(config, spec, mesh, train=True)
            row["train"], log, _ = train_steps(model, batch(config, args.train_batch, args.train_seq), args.repeats)
            row["train_collectives"] = log.counts()
            del model
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("collectives")}), flush=True)
    return rows


def measure_placement(args, config, where):
    """One (dp=2, tp=2)-style step per repeat with TP inside the nodes or across them; its collectives."""
    nodes = len({node for node, _, _ in where})
    per_node = dist.get_world_size() // nodes
    grid = torch.arange(dist.get_world_size()).view(nodes, per_node)  # grid[node, local rank]
    # rows are TP groups: a node's ranks (tp-inside), or one local rank on every node (tp-across)
    ranks = grid if args.placement == "tp-inside" else grid.t()
    mesh = DeviceMesh("cpu", ranks.contiguous(), mesh_dim_names=("dp", "tp"))
    model = build(config, args.plan, mesh, train=True)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    tokens = batch(config, args.train_batch * dp, args.train_seq)
    rows = slice(dp_rank * args.train_batch, (dp_rank + 1) * args.train_batch)
    seconds, _, optimizer = train_steps(model, tokens, args.repeats, rows)
    log = CollectiveLog()
    with log:  # one more step, recorded
        x, y = tokens[rows, :-1].contiguous(), tokens[rows, 1:].contiguous()
        with loss_parallel():
            model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, log.entries)
    return dict(placement=args.placement, plan=args.plan, train=seconds, tp_groups=ranks.tolist(),
                train_batch_per_dp_rank=args.train_batch, train_seq=args.train_seq, collectives=every)


def main():
    args = parse_args()
    warnings.filterwarnings("ignore", "Found a non-scalar tensor with numel=1")  # generation's last position
    warnings.filterwarnings("ignore", ".*is deprecated. Please use .*_single")  # the names DTensor and FSDP2 call
    warnings.filterwarnings("ignore", "Full backward hook is firing")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    where = placement()
    overrides = {f: getattr(args, f) for f in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
                 if getattr(args, f) is not None}
    config = config_by_name(args.config, **overrides)
    result = dict(world_size=dist.get_world_size(), nodes=len({w[0] for w in where}), placement_of_ranks=where,
                  config=args.config, overrides=overrides)
    if args.collectives:
        sizes = [int(s) for s in args.collectives.split(",")]
        result["collectives"] = time_collectives(sizes, args.groups, args.repeats)
    if args.plans:
        mesh = DeviceMesh("cpu", torch.arange(dist.get_world_size()))
        result["plans"] = measure_plans(args, config, mesh)
        result.update(context=args.context, new=args.new, train_batch=args.train_batch, train_seq=args.train_seq)
    if args.placement:
        result["placement"] = measure_placement(args, config, where)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    exit_distributed()


if __name__ == "__main__":
    main()
