"""
The measured job of benchmarks/comm_cost.py: run by torchrun on every emulated node.

    torchrun ... benchmarks/cluster_job.py --out R.json --rates unlimited,100mbit --collectives 2048,65536
    torchrun ... benchmarks/cluster_job.py --out R.json --rates unlimited,100mbit --plans megatron,spd:last:6
    torchrun ... benchmarks/cluster_job.py --out R.json --rates unlimited,100mbit --placement

--collectives times torch.distributed's all_reduce, all_gather_into_tensor,
reduce_scatter_tensor and all_to_all_single (the ops DTensor's and FSDP2's collectives reach in gloo) at each message
size, over the whole world or, with --groups cross/inside, over every group of ranks that
share a local rank / a node, all groups at once (as a 2-D mesh runs them); with --idle S, one
collective per trial after S seconds of idle link instead of back to back. --plans builds the
model under each plan on a 1-D TP mesh of the whole world and times the prefill of
--decode-rows x --context tokens, decoding with a KV cache after it (per token of every row),
and one training step (forward, backward, AdamW; loss_parallel) of --train-batch x --train-seq
tokens; --measures prefill,decode leaves the training step out. --placement builds the
(dp, tp) mesh twice, with TP inside the nodes and across them, FSDP2 over dp, and times the
training step of each, recording every collective of one step with the ranks of its group.

--rates: the job asks benchmarks/cluster.py for each link rate in turn ($DTGC_RATE_CONTROL) and
interleaves them: every repeat measures every rate, so a machine whose load drifts (a shared
one) slows every rate alike instead of whichever ran during the busy minutes.

Every time is the slowest rank's; a figure is the fastest of --repeats, after a warm-up: on a
shared machine other work only ever adds time, so the fastest repeat is the least disturbed
(every repeat is kept in the results too).
Rank 0 writes the results, with the ranks' placement on the nodes, as JSON to --out.
"""

import argparse
import contextlib
import datetime
import json
import os
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

from dtensor_gpt import GPT, init_weights, parallelize
from dtensor_gpt.configs import config_by_name
from dtensor_gpt.launch import exit_distributed
from dtensor_gpt.model import KVCache
from dtensor_gpt.sampling import VocabParallelSampler
from machine import describe

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the results (rank 0 writes it)")
    p.add_argument("--rates", required=True, help="link rates to measure at, comma-separated (unlimited, 100mbit, ...)")
    p.add_argument("--collectives", help="message sizes in bytes, comma-separated")
    p.add_argument("--groups", default="world", choices=["world", "cross", "inside"])
    p.add_argument("--idle", type=float, default=0.0, help="seconds the link idles before each timed collective (0: back to back)")
    p.add_argument("--plans", help="comma-separated: megatron, megatron-sp, spd:all, spd:last:K")
    p.add_argument("--placement", action="store_true")
    p.add_argument("--plan", default="megatron", help="the TP plan of --placement")
    p.add_argument("--config", default="gpt2", help="a named size of dtensor_gpt.configs")
    for field in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        p.add_argument("--" + field.replace("_", "-"), type=int, help=f"override the config's {field}")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--new", type=int, default=16, help="tokens decoded after the prompt")
    p.add_argument("--decode-rows", type=int, default=1, help="rows of the prompt, each decoded at once")
    p.add_argument("--measures", default=["prefill", "decode", "train"], type=lambda s: s.split(","), help="comma-separated: prefill,decode (always both), train")
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


_FUNCOL = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
           "all_to_all_single": "all_to_all"}


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


def use_rate(rate):
    """Rank 0 asks the cluster tool for this link rate and waits until it is set; then every rank goes on."""
    control = os.environ.get("DTGC_RATE_CONTROL")
    if control is None:
        raise RuntimeError("--rates needs benchmarks/cluster.py to run this job (it sets $DTGC_RATE_CONTROL)")
    if dist.get_rank() == 0:
        with open(os.path.join(control, "want.tmp"), "w") as f:
            f.write(rate)
        os.replace(os.path.join(control, "want.tmp"), os.path.join(control, "want"))
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(FileNotFoundError), open(os.path.join(control, "have")) as f:
                have = f.read()
                if have == rate:
                    break
                if have.startswith("error"):
                    raise RuntimeError(f"the cluster tool could not set rate {rate!r}: {have}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster tool did not set rate {rate!r} within 60 s")
            time.sleep(0.01)
    dist.barrier()


def interleaved(rates, repeats):
    """(repeat, rate) pairs: every repeat visits every rate, in alternating order."""
    for i in range(repeats):
        for rate in (rates if i % 2 == 0 else rates[::-1]):
            yield i, rate


def time_collectives(sizes, groups_kind, rates, repeats, idle=0.0):
    """
    {rate: {kind: {size: seconds per collective}}}: back-to-back collectives, the fastest of
    `repeats` trials; with `idle` > 0, one collective per trial after the link has been idle
    that many seconds, as a model's collectives come between stretches of computation.
    """
    nodes, per_node = dist.get_world_size() // int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["LOCAL_WORLD_SIZE"])
    mine = None
    for ranks in node_groups(groups_kind, nodes, per_node):  # every rank creates every group, in order
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    g = dist.get_world_size(mine)
    trials = {rate: {kind: {size: [] for size in sizes} for kind in KINDS} for rate in rates}
    for _, rate in interleaved(rates, repeats):
        use_rate(rate)
        for kind in KINDS:
            for size in sizes:
                full = torch.ones(size // 4)
                part = torch.ones(size // 4 // g)
                op = {"all_reduce": lambda: dist.all_reduce(full, group=mine),
                      "all_gather": lambda: dist.all_gather_into_tensor(full, part, group=mine),
                      "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full, group=mine),
                      "all_to_all": lambda: dist.all_to_all_single(torch.empty_like(full), full, group=mine)}[kind]
                back_to_back = 1 if idle else max(1, min(20, 2 ** 21 // size))
                op()
                dist.barrier()
                time.sleep(idle)
                start = time.perf_counter()
                for _ in range(back_to_back):
                    op()
                trials[rate][kind][size].append((time.perf_counter() - start) / back_to_back)
    samples = {rate: {kind: {size: slowest(t) for size, t in by_size.items()} for kind, by_size in by_kind.items()}
               for rate, by_kind in trials.items()}
    seconds = {rate: {kind: {size: min(t) for size, t in by_size.items()} for kind, by_size in by_kind.items()}
               for rate, by_kind in samples.items()}
    return dict(group_size=g, groups=groups_kind, idle=idle, seconds=seconds, samples=samples)


def parse_plan(spec):
    """'spd:last:6' -> ('spd', {'spd_blocks': 'last:6'}); 'megatron+int8' -> ('megatron', {'compress': 'int8'})."""
    spec, _, compress = spec.partition("+")
    plan, _, blocks = spec.partition(":")
    options = dict(spd_blocks=blocks or "all") if plan == "spd" else {}
    return plan, {**options, **(dict(compress=compress) if compress else {})}


def build(config, spec, mesh):
    """The model under plan `spec`, its logits kept vocab-sharded: the loss and the sampler work on the shards."""
    with contextlib.redirect_stdout(None), torch.device("meta"):
        model = GPT(config)
    plan, options = parse_plan(spec)
    parallelize(model, mesh, plan, loss_parallel=True, **options)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(None):
        return init_weights(model)


def batch(config, rows, seq, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (rows, seq + 1), generator=g)


def generate_timed(model, prompt, new):
    """
    One greedy generate() of `new` tokens after `prompt` (KV cache), as examples/generate.py
    runs it (vocabulary-parallel sampling: no logits gathered): the prefill (from the start to
    the first token) and each later token's interval (decoding).
    """
    stamps = []
    dist.barrier()
    start = time.perf_counter()
    model.generate(prompt, new, top_k=1, use_cache=True, on_token=lambda _: stamps.append(time.perf_counter()),
                   sample=VocabParallelSampler(seed=0))
    return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]


def prefill_collectives(model, prompt):
    log = CollectiveLog()
    with log, torch.no_grad():
        logits, _ = model(prompt, cache=KVCache(len(model.transformer.h), model.config.block_size))
        VocabParallelSampler(seed=0)(logits[:, -1], 1)  # the first token, as generate picks it
    return log


def decode_collectives(model, prompt):
    cache, log = KVCache(len(model.transformer.h), model.config.block_size), CollectiveLog()
    with torch.no_grad():
        sample = VocabParallelSampler(seed=0)
        sample(model(prompt, cache=cache)[0][:, -1], 1)
        with log:
            sample(model(prompt[:, -1:], cache=cache)[0][:, -1], 1)
    return log


class Trainer:
    """One training step at a time: forward, backward (loss_parallel), AdamW (for-loop, as examples/train.py), zero_grad."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)

    def step(self):
        with loss_parallel():
            _, loss = self.model(self.x, self.y)
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def timed(fn):
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Samples:
    """
    Times per link rate, each with the machine's 1-minute load average when it was taken, so
    a result carries the load it was measured under.
    """

    def __init__(self, rates):
        self.seconds = {rate: [] for rate in rates}
        self.load1 = {rate: [] for rate in rates}

    def add(self, rate, *seconds):
        self.seconds[rate] += seconds
        self.load1[rate].append(round(os.getloadavg()[0], 2))

    def into(self, row, name):
        """row[name]: the fastest per rate of the slowest rank's times; row[name + '_samples'], row[name + '_load1']: all of them."""
        slow = {rate: slowest(times) for rate, times in self.seconds.items()}
        row[name] = {rate: min(times) for rate, times in slow.items()}
        row[f"{name}_samples"] = slow
        row[f"{name}_load1"] = self.load1


def measure_training(row, trainer, rates, repeats):
    log = CollectiveLog()
    with log:  # the warm-up step, recorded
        trainer.step()
    row["train_collectives"] = log.counts()
    steps = Samples(rates)
    for _, rate in interleaved(rates, repeats):
        use_rate(rate)
        steps.add(rate, timed(trainer.step))
    steps.into(row, "train")


def measure_plans(args, config, mesh, rates):
    rows = []
    prompt = batch(config, args.decode_rows, args.context)[:, :-1]
    tokens = batch(config, args.train_batch, args.train_seq)
    for spec in args.plans.split(","):
        row = dict(plan=spec)
        model = build(config, spec, mesh).eval()
        generate_timed(model, prompt, 2)  # warm-up
        row["prefill_collectives"] = prefill_collectives(model, prompt).counts()
        row["decode_collectives"] = decode_collectives(model, prompt).counts()
        prefills, tokens_after = Samples(rates), Samples(rates)
        for _, rate in interleaved(rates, args.repeats):
            use_rate(rate)
            first, later = generate_timed(model, prompt, args.new)
            prefills.add(rate, first)
            tokens_after.add(rate, *later)
        prefills.into(row, "prefill")
        tokens_after.into(row, "decode")
        del model
        if "train" in args.measures:
            measure_training(row, Trainer(build(config, spec, mesh), tokens[:, :-1].contiguous(),
                                          tokens[:, 1:].contiguous()), rates, args.repeats)
        rows.append(row)
        if dist.get_rank() == 0:
            print(json.dumps({k: row[k] for k in ("plan", "prefill", "decode", "train") if k in row}), flush=True)
    return rows


def measure_placement(args, config, where, rates):
    """
    The training step of a (dp, tp) mesh with FSDP2 over dp, with TP inside the nodes and with TP
    across them (both built, steps interleaved), and every collective of one step of each.
    """
    nodes = len({node for node, _, _ in where})
    per_node = dist.get_world_size() // nodes
    grid = torch.arange(dist.get_world_size()).view(nodes, per_node)  # grid[node, local rank]
    trainers, out = {}, {}
    # mesh rows are TP groups: a node's ranks (tp-inside), or one local rank of every node (tp-across)
    for placed, ranks in (("tp-inside", grid), ("tp-across", grid.t())):
        mesh = DeviceMesh("cpu", ranks.contiguous(), mesh_dim_names=("dp", "tp"))
        model = build(config, args.plan, mesh)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
        tokens = batch(config, args.train_batch * dp, args.train_seq)[dp_rank * args.train_batch:(dp_rank + 1) * args.train_batch]
        trainers[placed] = Trainer(model, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        log = CollectiveLog()
        with log:  # the warm-up step, recorded
            trainers[placed].step()
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, log.entries)
        out[placed] = dict(tp_groups=ranks.tolist(), collectives=every)
    steps = {placed: Samples(rates) for placed in trainers}
    for _, rate in interleaved(rates, args.repeats):
        use_rate(rate)
        for placed, trainer in trainers.items():
            steps[placed].add(rate, timed(trainer.step))
    for placed in trainers:
        steps[placed].into(out[placed], "train")
    return dict(plan=args.plan, train_batch_per_dp_rank=args.train_batch, train_seq=args.train_seq, **out)


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
    result = dict(machine=describe(), world_size=dist.get_world_size(), nodes=len({w[0] for w in where}),
                  placement_of_ranks=where, config=args.config, overrides=overrides)
    rates = args.rates.split(",")
    result.update(rates=rates, repeats=args.repeats)
    if args.collectives:
        sizes = [int(s) for s in args.collectives.split(",")]
        result["collectives"] = time_collectives(sizes, args.groups, rates, args.repeats, args.idle)
    if args.plans:
        mesh = DeviceMesh("cpu", torch.arange(dist.get_world_size()))
        result["plans"] = measure_plans(args, config, mesh, rates)
        result.update(context=args.context, new=args.new, decode_rows=args.decode_rows, measures=args.measures,
                      train_batch=args.train_batch, train_seq=args.train_seq)
    if args.placement:
        result["placement"] = measure_placement(args, config, where, rates)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    exit_distributed()


if __name__ == "__main__":
    main()
