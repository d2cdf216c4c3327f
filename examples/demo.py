"""
Parallelize the unchanged GPT and check it against the single-device model.

    torchrun --standalone --nproc-per-node 2 examples/demo.py [--config tiny|gpt2] [--plan megatron]

Every rank builds the same single-device reference from one seed, and the parallel model on
the meta device, holding only its shards initialised from the same seed (init_weights); rank 0
prints the largest differences of logits, loss and gradients, the collectives of one forward and the bytes of
parameters each rank holds. megatron and megatron-sp compute the single-device model exactly
(differences are float rounding, about 1e-7); spd drops sync points by design, so its
differences are Sync-Point Drop's approximation, not an error.
"""

import contextlib
import sys
import warnings
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from dtensor_gpt import GPT, init_weights, parallelize
from dtensor_gpt.cli import ArgumentParser, integer, plan_options, quiet_dtensor_notes
from dtensor_gpt.configs import CONFIGS, config_by_name
from dtensor_gpt.launch import exit_distributed, init_distributed
from plans import PLANS
from plans.spd import parse_spd_blocks, spd_blocks_from_text

# CommDebugMode's module tracker warns when a module's inputs need no gradient (token ids)
warnings.filterwarnings("ignore", "Full backward hook is firing")

def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--config", default="tiny", choices=list(CONFIGS), help="a named model size (dtensor_gpt/configs.py)")
    p.add_argument("--plan", default="megatron", choices=list(PLANS), help="the tensor-parallel plan")
    p.add_argument("--spd-blocks", default="all", help="with --plan spd: 'all', 'last:K' or indices '0,2'")
    p.add_argument("--batch", type=integer(1), default=2, help="rows of random tokens")
    p.add_argument("--seq", type=integer(1), default=32, help="tokens per row, at most the config's block_size")
    args = p.parse_args(argv)
    config = config_by_name(args.config)
    if args.seq > config.block_size:
        p.error(f"--seq {args.seq} is longer than block_size {config.block_size} of config {args.config!r}; "
                f"give at most {config.block_size}")
    if args.plan == "spd":
        try:
            parse_spd_blocks(spd_blocks_from_text(args.spd_blocks), config.n_layer)
        except ValueError as e:
            p.error(f"--spd-blocks: {e}")
    return args


def main():
    args = parse_args()
    quiet_dtensor_notes()
    mesh, device = init_distributed()
    try:
        compare(args, mesh, device)
    except ValueError as e:  # a plan the TP degree does not fit, found alike on every rank
        if dist.get_rank() == 0:
            print(f"error: {e}", file=sys.stderr)
        exit_distributed(2)
    exit_distributed()


def compare(args, mesh, device):
    """Build, parallelize, compare; rank 0 prints."""
    rank, tp = dist.get_rank(), mesh.size()
    say = print if rank == 0 else (lambda *a, **k: None)
    config = config_by_name(args.config)
    options = plan_options(args.plan, args.spd_blocks, None)

    def sharded(**more):
        """The model under the plan, built on meta: this rank allocates its shards only, from seed 0."""
        with torch.device("meta"), contextlib.redirect_stdout(None):
            model = parallelize(GPT(config), mesh, args.plan, **options, **more)
        torch.manual_seed(0)
        return init_weights(model)

    torch.manual_seed(0)  # the CPU generator, as init_weights replays it, then moved to the device
    with contextlib.redirect_stdout(sys.stdout if rank == 0 else None):  # its size, once
        reference = GPT(config).to(device)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()

    model = sharded(loss_parallel=True)
    with CommDebugMode() as comm, loss_parallel():
        logits, loss = model(idx, targets)
        loss.backward()
    ref_params = dict(reference.named_parameters())
    grad_error = max((full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in model.named_parameters())
    local_bytes = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
    ref_bytes = sum(p.nbytes for p in reference.parameters())

    generator = sharded()
    with torch.no_grad(), CommDebugMode() as forward_comm:
        last, _ = generator(idx)
    last_error = (last - reference(idx)[0]).abs().max().item()
    collectives = Counter({str(op).split(".")[-1].rstrip("')"): n for op, n in forward_comm.get_comm_counts().items()})

    dropped = parse_spd_blocks(options["spd_blocks"], config.n_layer) if options and tp > 1 else []
    note = "  (SPD's approximation, not an error)" if dropped else ""
    say(f"config {args.config}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"vocab={config.vocab_size}; plan {args.plan}; tp={tp} on {device.type} ({dist.get_backend()})")
    if dropped:
        say(f"plan spd drops the sync point of blocks {dropped} by design (Sync-Point Drop): each rank's MLP reads\n"
            f"its own heads' attention output only, so the model computes the SPD formula, not the single-device\n"
            f"model (tests/test_spd.py checks it against the formula within 1e-5)")
    say(f"max |logits - single device|   {(full(logits) - ref_logits).abs().max().item():.2e}{note}")
    say(f"|loss - single device|         {(full(loss) - ref_loss).abs().item():.2e}  (loss {ref_loss.item():.4f}){note}")
    say(f"max |grad - single device|     {grad_error:.2e}  over {len(ref_params)} parameters{note}")
    say(f"max |last logits - single|     {last_error:.2e}  (generation: replicated last-position logits){note}")
    say(f"collectives in one forward     {dict(collectives)}  ({config.n_layer} blocks)")
    say(f"parameter bytes per rank       {local_bytes:,} of {ref_bytes:,} ({local_bytes / ref_bytes:.1%})")


if __name__ == "__main__":
    main()
