"""
Parallelize the unchanged GPT and check it against the single-device model.

    torchrun --standalone --nproc-per-node 2 examples/demo.py [--config tiny|gpt2] [--plan megatron]

Every rank builds the same single-device reference from one seed; rank 0 prints the largest
differences of logits, loss and gradients, the collectives of one forward and the bytes of
parameters each rank holds.
"""

import argparse
import copy
import warnings
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from dtensor_gpt import GPT, parallelize
from dtensor_gpt.configs import CONFIGS, config_by_name
from dtensor_gpt.launch import exit_distributed, init_distributed

# CommDebugMode's module tracker warns when a module's inputs need no gradient (token ids)
warnings.filterwarnings("ignore", "Full backward hook is firing")


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--plan", default="megatron")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()

    mesh, device = init_distributed()
    rank, tp = dist.get_rank(), mesh.size()
    say = print if rank == 0 else (lambda *a, **k: None)
    config = config_by_name(args.config)
    if args.seq > config.block_size:
        parser.error(f"--seq {args.seq} is longer than block_size {config.block_size} of config {args.config!r}")

    torch.manual_seed(0)
    with torch.device(device):
        reference = GPT(config)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    targets = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device)
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()

    model = parallelize(copy.deepcopy(reference), mesh, args.plan, loss_parallel=True)
    with CommDebugMode() as comm, loss_parallel():
        logits, loss = model(idx, targets)
        loss.backward()
    ref_params = dict(reference.named_parameters())
    grad_error = max((full(p.grad) - ref_params[n].grad).abs().max().item() for n, p in model.named_parameters())
    local_bytes = sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
    ref_bytes = sum(p.nbytes for p in reference.parameters())

    generator = parallelize(copy.deepcopy(reference), mesh, args.plan)
    with torch.no_grad(), CommDebugMode() as forward_comm:
        last, _ = generator(idx)
    last_error = (last - reference(idx)[0]).abs().max().item()
    collectives = Counter({str(op).split(".")[-1].rstrip("')"): n for op, n in forward_comm.get_comm_counts().items()})

    say(f"config {args.config}: n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"vocab={config.vocab_size}; plan {args.plan}; tp={tp} on {device.type} ({dist.get_backend()})")
    say(f"max |logits - single device|   {(full(logits) - ref_logits).abs().max().item():.2e}")
    say(f"|loss - single device|         {(full(loss) - ref_loss).abs().item():.2e}  (loss {ref_loss.item():.4f})")
    say(f"max |grad - single device|     {grad_error:.2e}  over {len(ref_params)} parameters")
    say(f"max |last logits - single|     {last_error:.2e}  (generation: replicated last-position logits)")
    say(f"collectives in one forward     {dict(collectives)}  ({config.n_layer} blocks)")
    say(f"parameter bytes per rank       {local_bytes:,} of {ref_bytes:,} ({local_bytes / ref_bytes:.1%})")
    exit_distributed()


if __name__ == "__main__":
    main()
