"""
Dropout under tensor parallelism on CPU: training runs, every shard draws its own mask,
replicated activations draw the same mask on every rank, and eval mode stays exact.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils._python_dispatch import TorchDispatchMode

from distributed import run_distributed
from dtensor_gpt import GPT, parallelize
from helpers import comm_counts, fake_process_group, full, max_grad_errors, small_config, write_text

ROOT = Path(__file__).resolve().parents[1]
P = 0.2
PLANS = ("megatron", "megatron-sp")
TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "32", "--batch-size", "4",
        "--warmup-iters", "5", "--lr-decay-iters", "20", "--eval-interval", "1000", "--eval-iters", "2"]
# attention masks are read through one-hot values: T <= head size (128 / 8 = 16)
ATTENTION = dict(n_layer=1, n_head=8, n_embd=128, block_size=16, dropout=P)


def gather(t):
    """Every rank's copy of the plain tensor `t`, as a list (rank order)."""
    copies = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, t.contiguous())
    return copies


def correlation(a, b):
    """Pearson correlation of two 0/1 masks of the same shape."""
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


def _train(rank, world_size, data, steps):
    """
    Per plan: the losses of `steps` training steps with dropout P, the replicated parameters,
    and those that are not bit-identical on every rank afterwards.
    """
    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    out = {}
    for plan in PLANS:
        args = parse_args(["--data", data, "--plan", plan, "--max-iters", str(steps), "--dropout", str(P), *TINY])
        model, _, _, _, losses, _ = train(args, init_device_mesh("cpu", (world_size,)), say=lambda *a: None)
        replicated = {name: p.to_local() if isinstance(p, DTensor) else p.detach()
                      for name, p in model.named_parameters()
                      if not isinstance(p, DTensor) or all(isinstance(q, Replicate) for q in p.placements)}
        differing = sorted(name for name, p in replicated.items() if any(not torch.equal(c, p) for c in gather(p)))
        out[plan] = losses, sorted(replicated), differing
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_training_with_dropout(tp, tmp_path):
    """The loss falls, and replicated parameters stay bit-identical on every rank (their activations agree)."""
    write_text(tmp_path / "text.txt", words=8)  # a tiny model's loss falls by about 1 in 20 steps
    for plan, (losses, replicated, differing) in run_distributed(_train, tp, str(tmp_path / "text.txt"), 20).items():
        assert len(losses) == 20 and all(l == l for l in losses)
        assert losses[-1] < losses[0] - 0.5, f"{plan}: the loss must fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
        # LayerNorms (2 per block + ln_f, weight and bias), wpe, the row-parallel biases (2 per block)
        assert len(replicated) == 2 * (2 * 2 + 1) + 1 + 2 * 2
        assert not differing, f"{plan}: replicated parameters differ between ranks after training: {differing}"


def _attention_masks(rank, world_size):
    """
    Per plan, the attention dropout masks (B, nh, T, T) of two forwards, read exactly from
    SDPA's output: q = k = 0 makes attention uniform over the causal window (1 / (i + 1)),
    and v = one-hot of the key position makes output (i, j) mask_ij / ((1 - p)(i + 1)), j <= i.
    """
    mesh = init_device_mesh("cpu", (world_size,))
    config = small_config(**ATTENTION)
    C, H, T, B = config.n_embd, config.n_head, config.block_size, 32
    hs = C // H
    x = torch.eye(T, C).expand(B, T, C).contiguous()  # position t is the one-hot e_t
    out = {}
    for plan in PLANS:
        torch.manual_seed(0)
        model = GPT(config)
        attn = model.transformer.h[0].attn
        with torch.no_grad():
            attn.c_attn.weight.zero_()
            attn.c_attn.bias.zero_()
            for h in range(H):
                attn.c_attn.weight[2 * C + h * hs: 2 * C + (h + 1) * hs, :hs] = torch.eye(hs)
        seen = []
        attn.c_proj.register_forward_pre_hook(lambda module, args: seen.append(full(args[0])))
        parallelize(model, mesh, plan)
        attn(distribute_tensor(x, mesh, [Shard(1) if plan == "megatron-sp" else Replicate()]))
        attn(distribute_tensor(x, mesh, [Shard(1) if plan == "megatron-sp" else Replicate()]))
        window = torch.arange(1, T + 1, dtype=torch.float).view(T, 1)  # i + 1
        out[plan] = [y.view(B, T, H, hs).transpose(1, 2) * (1 - P) * window for y in seen]  # (B, nh, T, T)
    return out


@pytest.mark.parametrize("tp", [2, 4])
def test_attention_dropout_masks_are_independent_across_heads_and_ranks(tp):
    H, T = ATTENTION["n_head"], ATTENTION["block_size"]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for plan, masks in run_distributed(_attention_masks, tp).items():
        for m in masks:
            assert (m - m.round()).abs().max() < 1e-4, f"{plan}: the crafted attention must reveal a 0/1 mask"
            assert (m[..., ~causal] == 0).all(), f"{plan}: nothing attends to the future"
        first, second = (m.round()[..., causal] for m in masks)  # (B, nh, T(T+1)/2): kept 1, dropped 0
        for m in (first, second):
            dropped = 1 - m.mean().item()
            assert abs(dropped - P) < 0.01, f"{plan}: dropped fraction {dropped:.4f}, expected {P}"
            per_rank = m.view(m.size(0), tp, H // tp, -1).transpose(0, 1)  # (tp, B, heads per rank, positions)
            for r in range(tp):
                dropped = 1 - per_rank[r].mean().item()
                assert abs(dropped - P) < 0.02, f"{plan}: rank {r} drops {dropped:.4f}, expected {P}"
                for s in range(r):
                    c = correlation(per_rank[r], per_rank[s])
                    assert abs(c) < 0.05, f"{plan}: ranks {s} and {r} draw correlated masks (correlation {c:.3f})"
            c = correlation(per_rank[0][:, 0], per_rank[0][:, 1])
            assert abs(c) < 0.05, f"{plan}: rank 0's two heads draw correlated masks (correlation {c:.3f})"
        c = correlation(first, second)
        assert abs(c) < 0.05, f"{plan}: two forwards draw correlated masks (correlation {c:.3f})"


def _residual_masks(rank, world_size):
    return {plan: _residual_masks_of(plan, world_size) for plan in PLANS}


def _residual_masks_of(plan, world_size):
    """Each residual-stream dropout's mask in one training forward: global if sharded, else every rank's copy."""
    torch.manual_seed(0)
    config = small_config(block_size=16, n_head=8, n_embd=128, dropout=P)
    model = GPT(config)
    masks = {}

    def record(name):
        def hook(module, args, output):
            x, y = full(args[0]), full(output)
            assert (x != 0).all() and torch.allclose(y, x * (y != 0) / (1 - P), atol=1e-6, rtol=0)
            masks[name] = (y != 0).float() if isinstance(output, DTensor) else torch.stack(gather((y != 0).float()))
        return hook

    for name, module in model.named_modules():
        if name == "transformer.drop" or name.endswith("resid_dropout") or name.endswith("mlp.dropout"):
            module.register_forward_hook(record(name))
    parallelize(model, init_device_mesh("cpu", (world_size,)), plan)
    model(torch.randint(0, config.vocab_size, (32, 16), generator=torch.Generator().manual_seed(1)))
    return masks


@pytest.mark.parametrize("tp", [2, 4])
def test_residual_stream_dropouts(tp):
    """
    megatron-sp: the residual stream's dropouts act on Shard(1) DTensors, one independent mask
    per sequence shard. megatron: the residual stream is replicated, so each of its dropouts
    must drop the same elements on every rank.
    """
    masks = run_distributed(_residual_masks, tp)
    assert len(masks["megatron-sp"]) == len(masks["megatron"]) == 1 + 2 * 2
    for name, m in masks["megatron-sp"].items():
        assert m.dim() == 3, f"megatron-sp {name} must act on a sequence-sharded DTensor, (B, T, C)"
        dropped = 1 - m.mean().item()
        assert abs(dropped - P) < 0.01, f"megatron-sp {name} drops {dropped:.4f}, expected {P}"
        shards = m.chunk(tp, dim=1)
        for r in range(1, tp):
            c = correlation(shards[0], shards[r])
            assert abs(c) < 0.05, f"{name}: sequence shards 0 and {r} draw correlated masks (correlation {c:.3f})"
    for name, copies in masks["megatron"].items():  # (tp, B, T, C)
        dropped = 1 - copies[0].mean().item()
        assert abs(dropped - P) < 0.01, f"megatron {name} drops {dropped:.4f}, expected {P}"
        assert all(torch.equal(c, copies[0]) for c in copies), f"{name} drops different elements on different ranks"


class AttentionKernels(TorchDispatchMode):
    """Records which attention kernel and random ops run."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _eval_against_single_device(rank, world_size):
    return {plan: _eval_of(plan, world_size) for plan in PLANS}


def _eval_of(plan, world_size):
    config = small_config(dropout=P)
    torch.manual_seed(0)
    reference = GPT(config).eval()
    generator = torch.Generator().manual_seed(1)
    idx, targets = (torch.randint(0, config.vocab_size, (2, 16), generator=generator) for _ in range(2))
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()
    model = parallelize(copy.deepcopy(reference), init_device_mesh("cpu", (world_size,)), plan, loss_parallel=True)
    with AttentionKernels() as kernels, loss_parallel():
        logits, loss = model(idx, targets)
        loss.backward()
    return dict(
        logits=(full(logits) - ref_logits).abs().max().item(),
        loss=(full(loss) - ref_loss).abs().item(),
        grads=max(max_grad_errors(model, reference).values()),
        kernels=kernels.ops,
    )


def test_eval_mode_is_exact_with_dropout_configured():
    for plan, r in run_distributed(_eval_against_single_device, 2).items():
        assert r["logits"] < 1e-5 and r["loss"] < 1e-5 and r["grads"] < 1e-5, (plan, r)
        assert "_scaled_dot_product_flash_attention_for_cpu" in r["kernels"], "eval must keep the fused CPU kernel"
        assert "bernoulli_" not in r["kernels"] and "_safe_softmax" not in r["kernels"], "eval must not drop anything"


@pytest.mark.parametrize("plan", PLANS)
def test_dropout_adds_no_collective(plan):
    """Training with dropout (the CPU math attention, per-shard masks) communicates exactly as without it."""
    counts = {}
    with fake_process_group(2):
        mesh = init_device_mesh("cpu", (2,))
        for p in (0.0, P):
            torch.manual_seed(0)
            model = parallelize(GPT(small_config(dropout=p)), mesh, plan, loss_parallel=True)
            idx = torch.randint(0, 96, (2, 16))
            with CommDebugMode() as mode, loss_parallel():
                _, loss = model(idx, idx)
                loss.backward()
            counts[p] = comm_counts(mode)
    assert counts[P] == counts[0.0]
    assert sum(counts[P]["forward"]["Global"].values()) > 0


def test_a_forward_that_raises_in_attention_leaves_no_implicit_replication():
    """Training mode enters implicit replication for attention's forward; an exception inside it closes it too."""
    with fake_process_group(2):
        model = parallelize(GPT(small_config(dropout=P)), init_device_mesh("cpu", (2,))).train()

        def fail(module, args):
            raise RuntimeError("inside attention")

        model.transformer.h[0].attn.c_proj.register_forward_pre_hook(fail)
        with pytest.raises(RuntimeError, match="inside attention"):
            model(torch.zeros(1, 8, dtype=torch.long))
        assert DTensor._op_dispatcher._allow_implicit_replication is False
