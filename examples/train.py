"""
Train the GPT with tensor parallelism on a text file, nanoGPT's shakespeare_char way.

    torchrun --standalone --nproc-per-node 2 examples/train.py --data input.txt --out out/shakespeare

(input.txt: tinyshakespeare, karpathy/char-rnn's data/tinyshakespeare/input.txt, the text
nanoGPT's data/shakespeare_char/prepare.py downloads.)

A run that survives a dead or stalled rank: the same command on every restart, continuing
from its own last checkpoint in --out (tests/test_restart.py; DTENSOR_GPT_FAULT in
dtensor_gpt/faults.py injects the failures):

    torchrun --standalone --nproc-per-node 2 --max-restarts 3 examples/train.py --data input.txt --out out/run --resume auto

Defaults are nanoGPT's CPU shakespeare_char run: n_layer=4, n_head=4, n_embd=128,
block_size=64, batch_size=12, 2000 iterations, lr 1e-3 with 100 warm-up steps, cosine decay
to 1e-4, AdamW (beta2 0.99, weight decay 0.1 on matrices), gradient clipping at 1.0,
dropout 0, evaluation on 20 batches. One difference: biases, as in GPT-2, which nanoGPT's
train.py turns off (`--no-bias`); here they lower the validation loss by 0.009 on average
(README). Every rank draws the same batches; the loss is computed on vocab-sharded logits
(`loss_parallel`), and gradient clipping sees DTensor gradients. nanoGPT's speed settings
apply under every plan: `--dtype bf16` (or fp16, with loss scaling) autocasts the forward and
the loss, and `--compile` compiles the Blocks (benchmarks/train_speed.py measures both).
"""

import argparse
import contextlib
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dtensor_gpt import GPT, GPTConfig, init_weights, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt.checkpoint import optimizer_groups, params_by_id
from dtensor_gpt.cli import ArgumentParser, add_compress_argument, integer, number, plan_options, quiet_dtensor_notes
from dtensor_gpt.data import TextData
from dtensor_gpt.grad import LossScaler
from dtensor_gpt.memory import available_bytes, training_step_bytes
from dtensor_gpt.format import not_a_checkpoint, sha256
from dtensor_gpt.safetensors_stream import DTYPE_NAMES
from dtensor_gpt.sources import open_source
from dtensor_gpt.tokenizers import BPETokenizer, CharTokenizer, chars_from_meta
from dtensor_gpt.launch import doing, exit_distributed, init_distributed, stalls_reported
from dtensor_gpt.faults import fault_point, planned
from dtensor_gpt.publish import clean_stale_temporaries, release_lock, take_lock
from plans import PLANS


NEW_MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=True)  # nanoGPT's CPU shakespeare_char model


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data", required=True, help="a UTF-8 text file; first 90%% train, last 10%% validation")
    p.add_argument("--tokenizer", default="char",
                   help="char (vocabulary from the file, or the characters saved with --resume/--init-from), "
                        "gpt2 (GPT-2 BPE via tiktoken), a .tiktoken ranks file, or a nanoGPT meta.pkl")
    p.add_argument("--out", help="save checkpoints (model, optimizer, step, data order, vocabulary) here, every "
                                 "--save-interval iterations and at the end when the validation loss improved "
                                 "(default: nothing is saved)")
    p.add_argument("--overwrite", action="store_true",
                   help="let a new run replace the checkpoint another run left in --out (without it, or --resume "
                        "from that same --out, the run is refused before it starts)")
    p.add_argument("--save-interval", type=integer(1), help="iterations between checkpoints (default: --eval-interval)")
    p.add_argument("--always-save-checkpoint", action="store_true",
                   help="save at every --save-interval even if the validation loss did not improve (nanoGPT's "
                        "always_save_checkpoint; otherwise only an improvement replaces the checkpoint)")
    p.add_argument("--resume", help="continue a run: a checkpoint --out wrote (at any TP degree) or a nanoGPT "
                                    "ckpt.pt (its out_dir): model, optimizer state, step (and data order, ours); "
                                    "'auto': continue from --out if it holds this run's checkpoint (same data and "
                                    "settings), else start the run, so that one command serves every restart of "
                                    "torchrun --max-restarts (default: a new run)")
    p.add_argument("--init-from", help="start from a model's weights with a fresh optimizer, as nanoGPT's init_from: "
                                       "a checkpoint of this project, a Hugging Face GPT-2 directory or a nanoGPT "
                                       "ckpt.pt (default: random weights from --seed)")
    p.add_argument("--plan", default="megatron", choices=list(PLANS), help="the tensor-parallel plan")
    p.add_argument("--dp", type=integer(1), default=1,
                   help="data-parallel degree: a (dp, tp) mesh, FSDP2 over dp; tp is the rest of the world")
    p.add_argument("--spd-blocks", default="all", help="with --plan spd: 'all', 'last:K' or indices '0,2'")
    add_compress_argument(p)
    architecture = "(default: %s; with --resume or --init-from: the checkpoint's)"
    p.add_argument("--n-layer", type=integer(1), help="transformer blocks " + architecture % NEW_MODEL["n_layer"])
    p.add_argument("--n-head", type=integer(1), help="attention heads " + architecture % NEW_MODEL["n_head"])
    p.add_argument("--n-embd", type=integer(1), help="embedding width " + architecture % NEW_MODEL["n_embd"])
    p.add_argument("--block-size", type=integer(1), help="context length " + architecture % NEW_MODEL["block_size"])
    p.add_argument("--bias", action=argparse.BooleanOptionalAction,
                   help="biases in Linears and LayerNorms, as in GPT-2 (nanoGPT's train.py: --no-bias; "
                        "val loss 0.009 higher over 5 seeds of the anchor run, README) " + architecture % "on")
    p.add_argument("--batch-size", type=integer(1), default=12,
                   help="rows per micro-batch (all data-parallel ranks together)")
    p.add_argument("--gradient-accumulation-steps", type=integer(1), default=1,
                   help="micro-batches per optimizer step, as nanoGPT's gradient_accumulation_steps")
    p.add_argument("--dropout", type=number(at_least=0, below=1), default=0.0,
                   help="dropout probability (nanoGPT's CPU run: 0.0; its shakespeare_char config: 0.2); under TP "
                        "each shard draws its own mask, replicated activations the same mask on every rank")
    p.add_argument("--max-iters", type=integer(0), default=2000, help="optimizer steps to train to")
    p.add_argument("--lr", type=number(above=0), default=1e-3, help="peak learning rate, reached after the warm-up")
    p.add_argument("--min-lr", type=number(at_least=0), default=1e-4, help="learning rate at the end of the cosine decay")
    p.add_argument("--warmup-iters", type=integer(0), default=100, help="steps of linear warm-up")
    p.add_argument("--lr-decay-iters", type=integer(1), help="steps until the learning rate reaches --min-lr "
                                                            "(default: --max-iters)")
    p.add_argument("--weight-decay", type=number(at_least=0), default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--no-embedding-decay", dest="embedding_decay", action="store_false",
                   help="no weight decay on wte (tied to lm_head) and wpe, as nanoGPT's earlier optimizer grouping "
                        "(Linear weights only) did; otherwise every matrix decays, as nanoGPT does now")
    p.add_argument("--beta2", type=number(at_least=0, below=1), default=0.99, help="AdamW's beta2 (beta1 is 0.9)")
    p.add_argument("--grad-clip", type=number(at_least=0), default=1.0,
                   help="clip the gradients' global norm to this; 0: no clipping")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32",
                   help="autocast the forward and the loss to this dtype, as nanoGPT's dtype; weights, gradients, "
                        "AdamW's state and checkpoints stay fp32; fp16 scales the loss (a gradient scaler)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each Block, forward and backward, as nanoGPT's compile (the first step "
                        "compiles); the embedding, final LayerNorm, head and loss stay eager")
    p.add_argument("--eval-interval", type=integer(1), default=250, help="iterations between evaluations")
    p.add_argument("--eval-iters", type=integer(1), default=20, help="batches per split in each evaluation")
    p.add_argument("--log-interval", type=integer(1), default=50, help="iterations between progress lines")
    # each step's dropout seed, (seed << 40) ^ (it << 16) ^ rank, must fit torch.manual_seed's 64 bits
    p.add_argument("--seed", type=integer(0, 2**24 - 1), default=1337,
                   help="seeds the initial weights, the batches and the dropout masks")
    p.add_argument("--timeout", type=number(above=0), default=600,
                   help="seconds any collective may wait for a peer (an evaluation or a save included) before the "
                        "job ends naming the ranks that stopped answering")
    args = p.parse_args(argv)
    args.lr_decay_iters = args.max_iters if args.lr_decay_iters is None else args.lr_decay_iters
    args.save_interval = args.eval_interval if args.save_interval is None else args.save_interval
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data} is not a file")
    if args.tokenizer not in ("char", "gpt2") and not os.path.isfile(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer} is not a file; give char, gpt2, a .tiktoken ranks file or a nanoGPT meta.pkl")
    if args.resume and args.init_from:
        p.error("--resume continues a run and --init-from starts a new one from its weights; give one of them")
    if args.resume == "auto" and not args.out:
        p.error("--resume auto continues from --out's checkpoint; give --out")
    try:
        planned()
    except ValueError as e:
        p.error(str(e))
    for flag, path in (("--resume", args.resume if args.resume != "auto" else None), ("--init-from", args.init_from)):
        if path and not os.path.exists(path):
            p.error(f"{flag} {path} does not exist")
    if args.resume in (None, "auto") and not args.init_from:
        n_embd, n_head = args.n_embd or NEW_MODEL["n_embd"], args.n_head or NEW_MODEL["n_head"]
        if n_embd % n_head:
            heads = ", ".join(str(h) for h in range(1, n_embd + 1) if n_embd % h == 0)
            p.error(f"--n-embd {n_embd} is not divisible by --n-head {n_head}: every head takes n_embd / n_head "
                    f"channels; use an --n-head in {{{heads}}}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % args.dp:
        p.error(f"--dp {args.dp} does not divide the {world} processes; use a divisor of {world}")
    if args.batch_size % args.dp:
        p.error(f"--batch-size {args.batch_size} must split evenly over --dp {args.dp}")
    if args.compile and args.dropout and world // args.dp > 1:
        p.error(f"--compile cannot compile attention with --dropout {args.dropout} at tp={world // args.dp}: its "
                f"causal mask meets DTensors through DTensor's implicit replication, which torch.compile cannot "
                f"trace (torch 2.13); pass --dropout 0 or leave out --compile")
    return args


class Diverged(RuntimeError):
    """A non-finite loss: the run stops before it could save over a good checkpoint."""

    def __init__(self, what, args):
        kept = f"{args.out} keeps the last good checkpoint" if args.out and os.path.exists(args.out) else "nothing was saved"
        super().__init__(f"{what}: the run diverged and stops; {kept}. Lower --lr, or check the data")


def learning_rate(it, args):
    """nanoGPT's schedule: linear warm-up, cosine decay to min_lr, then flat."""
    if it < args.warmup_iters:
        return args.lr * (it + 1) / (args.warmup_iters + 1)
    if it >= args.lr_decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / (args.lr_decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.lr - args.min_lr)


def model_config(args, source, data):
    """
    The checkpoint's architecture with --resume or --init-from (a flag that contradicts it is
    an error), else the flags over nanoGPT's CPU shakespeare_char model.
    """
    given = {f: getattr(args, f) for f in NEW_MODEL if getattr(args, f) is not None}
    if source is None:
        return GPTConfig(**{**NEW_MODEL, **given, "vocab_size": data.vocab_size, "dropout": args.dropout})
    saved = {f: source.config[f] for f in (*NEW_MODEL, "vocab_size")}
    clash = {f: v for f, v in given.items() if v != saved[f]}
    if clash:
        flags = ", ".join(f"--{f.replace('_', '-')} {v}" for f, v in clash.items())
        raise ValueError(f"{flags} contradicts the checkpoint's {', '.join(f'{f}={saved[f]}' for f in clash)}; "
                         f"leave the architecture to the checkpoint")
    if data.vocab_size > saved["vocab_size"]:
        raise ValueError(f"the tokenizer has {data.vocab_size} tokens but the checkpoint's model only "
                         f"{saved['vocab_size']}; use the tokenizer it was trained with")
    return GPTConfig(**saved, dropout=args.dropout)


# the learning-rate schedule's settings: flag, and the name in a nanoGPT ckpt.pt's config
SCHEDULE = dict(lr=("--lr", "learning_rate"), min_lr=("--min-lr", "min_lr"), warmup_iters=("--warmup-iters", "warmup_iters"),
                lr_decay_iters=("--lr-decay-iters", "lr_decay_iters"))
EMBEDDINGS = {"transformer.wte.weight", "transformer.wpe.weight"}


# flags that do not change what a run computes: a restart may give them otherwise
NOT_THE_RUN = {"data", "out", "overwrite", "resume", "max_iters", "log_interval", "timeout"}


def run_identity(args):
    """
    What makes a run this run: the data's bytes and every setting that changes its weights,
    as given (before a checkpoint fills in the architecture). Saved with each checkpoint,
    so that --resume auto continues only its own run.
    """
    return {"data_sha256": sha256(args.data), **{k: v for k, v in sorted(vars(args).items()) if k not in NOT_THE_RUN}}


def own_checkpoint(args, identity):
    """
    --resume auto: --out when it holds this run's checkpoint, None when it holds none; another
    run's (other data or settings, or none recorded) is refused unless --overwrite replaces it.
    """
    if not os.path.exists(args.out):
        return None
    with open_source(args.out) as source:
        saved = source.extra.get("run")
    if saved == identity:
        return args.out
    if args.overwrite:
        return None
    if saved is None:
        why = "it records no run settings"
    elif saved.get("data_sha256") != identity["data_sha256"]:
        why = f"it was trained on other data than --data {args.data}"
    else:
        key = next(k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k))
        why = f"it ran with --{key.replace('_', '-')} {saved.get(key)}, this run with {identity.get(key)}"
    raise ValueError(f"--resume auto: --out {args.out} holds another run's checkpoint ({why}); pass --resume "
                     f"{args.out} to continue that run, --overwrite to replace it, or give another --out")


def refuse_another_run(args, source, model, optimizer):
    """
    --resume continues its run only with that run's optimizer: the schedule's settings (saved
    in `extra`, or a nanoGPT ckpt.pt's config) and each AdamW group's hyperparameters and
    parameters (the index's optimizer_groups, or the ckpt.pt's param_groups). The current lr
    is the schedule's, so it is not compared; a setting the checkpoint lacks is not either.
    """
    def differs(flag, saved, given):
        return ValueError(f"--resume {args.resume} ran with {flag} {saved}, this run with {flag} {given}; "
                          f"pass {flag} {saved} to continue it")

    nanogpt = source.extra.get("nanogpt", {}).get("config", {})
    for field, (flag, theirs) in SCHEDULE.items():
        saved = source.extra.get(field, nanogpt.get(theirs))
        if saved is not None and saved != getattr(args, field):
            raise differs(flag, saved, getattr(args, field))
    saved, ours = source.optimizer_groups, optimizer_groups(optimizer, params_by_id(model))
    if saved is None:
        return
    if [set(g["params"]) for g in saved] != [set(g["params"]) for g in ours]:
        if len(saved) == 2 and set(saved[0]["params"]) ^ set(ours[0]["params"]) == EMBEDDINGS:
            if args.embedding_decay:
                raise ValueError(f"--resume {args.resume} does not decay wte and wpe, this run does; pass "
                                 f"--no-embedding-decay to continue it")
            raise ValueError(f"--resume {args.resume} decays wte and wpe, this run (--no-embedding-decay) does not; "
                             f"leave out --no-embedding-decay to continue it")
        raise ValueError(f"--resume {args.resume} groups its parameters for AdamW otherwise than this train.py "
                         f"(decayed, then not); it cannot be continued here")
    for i, (theirs, mine) in enumerate(zip(saved, ours)):
        for name, flag, pick in (("weight_decay", "--weight-decay" if i == 0 else None, lambda g: g["weight_decay"]),
                                 ("beta1", None, lambda g: g["betas"][0]), ("beta2", "--beta2", lambda g: g["betas"][1]),
                                 ("eps", None, lambda g: g["eps"])):
            if pick(theirs) != pick(mine):
                if flag:
                    raise differs(flag, pick(theirs), pick(mine))
                raise ValueError(f"--resume {args.resume} ran AdamW's group {i} with {name} {pick(theirs)}, which "
                                 f"this train.py does not set (it uses {pick(mine)}); it cannot be continued here")


def memory_note(args, config, mesh):
    """
    Refuse a step that cannot fit (`training_step_bytes` per process, the processes of this
    machine together, against its available memory; the least any rank sees), else say what it takes.
    """
    tp = mesh["tp"].size() if mesh.ndim == 2 else mesh.size()
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else torch.device("cpu")
    sharing = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = training_step_bytes(config, args.batch_size, tp, args.dp)
    have = torch.tensor([available_bytes(device) or math.inf], dtype=torch.float64, device=device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    have = have.item() / sharing
    if need > have:
        fixed, per_row = training_step_bytes(config, 0, tp, args.dp), training_step_bytes(config, args.dp, tp, args.dp)
        rows = int((have - fixed) // (per_row - fixed)) * args.dp
        fix = (f"use a smaller --batch-size with --gradient-accumulation-steps (e.g. --batch-size {rows} "
               f"--gradient-accumulation-steps {math.ceil(args.batch_size / rows)})" if rows > 0 else
               "the model alone does not fit: use a smaller one, or more processes")
        raise ValueError(f"a training step of --batch-size {args.batch_size} needs about {need / 1e6:,.0f} MB per "
                         f"process but {have / 1e6:,.0f} MB are available to each; {fix}")
    return f"a step needs about {need / 1e6:,.0f} MB per process, " + (
        f"of {have / 1e6:,.0f} MB available to each" if math.isfinite(have) else "available memory unknown")


def tokenizer_for(args, source):
    """--tokenizer, or a checkpoint's own characters."""
    if args.tokenizer.endswith(".pkl"):
        return CharTokenizer(chars_from_meta(args.tokenizer))
    if args.tokenizer != "char":
        return BPETokenizer(None if args.tokenizer == "gpt2" else args.tokenizer)
    if source is None:
        return None  # the file's own characters
    if source.extra.get("chars"):
        return CharTokenizer(source.extra["chars"])
    raise ValueError(f"{args.resume or args.init_from} saved no characters: pass --tokenizer gpt2, a .tiktoken "
                     f"file or the run's meta.pkl")


def build(args, config, mesh):
    """
    The model, tensor-parallel over the mesh's "tp" dimension and, with a "dp" one, FSDP2 over
    it, built on meta: a rank allocates only its shards, random from --seed here (exactly the
    single-device model's weights), or when --resume or --init-from loads them.
    """
    with torch.device("meta"), contextlib.redirect_stdout(sys.stdout if dist.get_rank() == 0 else None):  # its size, once
        model = GPT(config)
    parallelize(model, mesh, args.plan, loss_parallel=True, **plan_options(args.plan, args.spd_blocks, args.compress))
    if mesh.ndim == 2:
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    if not (args.resume or args.init_from):
        torch.manual_seed(args.seed)
        init_weights(model)
    if args.compile:
        for block in model.transformer.h:
            block.compile(dynamic=False)
    embeddings = set() if args.embedding_decay else {model.transformer.wte.weight, model.transformer.wpe.weight}
    decay = [p for p in model.parameters() if p.dim() >= 2 and p not in embeddings]
    no_decay = [p for p in model.parameters() if p.dim() < 2 or p in embeddings]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, args.beta2), foreach=False,
    )
    return model, optimizer


class DataParallel:
    """This rank's rows of a global batch, and means over the data-parallel ranks (none at dp=1)."""

    def __init__(self, mesh):
        self.group = mesh["dp"].get_group() if mesh.ndim == 2 else None
        self.size = mesh["dp"].size() if mesh.ndim == 2 else 1
        self.rank = mesh["dp"].get_local_rank() if mesh.ndim == 2 else 0

    def rows(self, *tensors):
        return [t.chunk(self.size)[self.rank] for t in tensors]

    def mean(self, loss):
        value = (loss.full_tensor() if isinstance(loss, DTensor) else loss).detach().clone()
        if self.group is not None:
            dist.all_reduce(value, group=self.group)
        return value.item() / self.size


def train_step(model, optimizer, scaler, micro_batches, args, dp):
    """One optimizer step on the mean gradient of `micro_batches` ([(x, y)]); their mean loss."""
    losses = []
    for x, y in micro_batches:
        with loss_parallel():
            with autocast(args, model):
                _, loss = model(x, y)
            scaler.scaled(loss / len(micro_batches)).backward()
        losses.append(dp.mean(loss))
    if scaler.unscale_and_clip_(model.parameters(), args.grad_clip):  # fp16: False after an overflow
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return sum(losses) / len(micro_batches)


def autocast(args, model):
    """nanoGPT's ctx: the forward and the loss in --dtype, from fp32 weights (on CPU too, where nanoGPT stays fp32)."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=DTYPE_NAMES[args.dtype], enabled=args.dtype != "fp32")


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # under --compile: eval mode would compile every block again
def estimate_loss(model, data, args, generator, dp):
    model.eval()
    out = {}
    for split in ("train", "val"):
        losses = []
        for _ in range(args.eval_iters):
            x, y = dp.rows(*data.batch(split, args.batch_size, args.block_size, generator))
            with loss_parallel(), autocast(args, model):
                losses.append(dp.mean(model(x, y)[1]))
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


@contextlib.contextmanager
def owning(out):
    """
    --out for this run alone while it lives, so that two runs never replace each other's
    checkpoints: rank 0 takes the lock beside it, every rank learns whether it did and refuses alike.
    """
    lock, refusal = None, [None]
    if out and dist.get_rank() == 0:
        try:
            lock = take_lock(out)
            clean_stale_temporaries(out)  # an interrupted save's files go; a checkpoint it moved aside returns
        except (ValueError, OSError) as e:
            refusal = [str(e)]
    if out:
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0]:
        raise ValueError(f"--out {refusal[0]}")
    try:
        yield
    finally:
        if lock:
            release_lock(lock)


def saved_note(args, first, saved_at, best):
    """Where the run's checkpoint is, and from which iteration, or why there is none."""
    if not args.out:
        return "nothing saved (no --out)"
    if saved_at is not None:
        return f"checkpoint {args.out} from iteration {saved_at}"
    if args.max_iters == 0:
        return "no checkpoint saved: iteration 0 is never saved (as in nanoGPT); give --max-iters above 0"
    if args.resume and os.path.realpath(args.resume) == os.path.realpath(args.out):
        return (f"checkpoint {args.out} still from iteration {first}: no evaluation beat its best val loss "
                f"{best:.4f}; pass --always-save-checkpoint to save regardless")
    baseline = "iteration 0's" if first == 0 else f"the best of --resume {args.resume},"
    return (f"no checkpoint saved in {args.out}: no evaluation at a save point beat {baseline} val loss {best:.4f} "
            f"(only an improvement is saved, as in nanoGPT); pass --always-save-checkpoint to save regardless")


def train(args, mesh, say=print):
    """Train; return (model, optimizer, data, state to resume from, [loss per step], last evaluation)."""
    with owning(args.out):
        return _train(args, mesh, say)


def _train(args, mesh, say):
    tp = mesh["tp"].size() if mesh.ndim == 2 else mesh.size()
    refusal = args.out and os.path.exists(args.out) and not_a_checkpoint(args.out)
    if refusal:  # found now, not after the run
        raise ValueError(f"--out: {refusal}")
    identity = run_identity(args)
    auto = args.resume == "auto"
    if auto:
        args.resume = own_checkpoint(args, identity)
    continuing = args.resume and args.out and os.path.realpath(args.resume) == os.path.realpath(args.out)
    if args.out and os.path.exists(args.out) and not (continuing or args.overwrite):
        raise ValueError(f"--out {args.out} holds another run's checkpoint; pass --resume {args.out} to continue "
                         f"that run or --overwrite to replace it")
    source = open_source(args.resume or args.init_from) if args.resume or args.init_from else None
    data = TextData(args.data, tokenizer_for(args, source))
    config = model_config(args, source, data)
    vars(args).update({f: getattr(config, f) for f in NEW_MODEL})  # batches and the saved run use these
    memory = memory_note(args, config, mesh)
    model, optimizer = build(args, config, mesh)
    if args.resume:
        refuse_another_run(args, source, model, optimizer)
    dp = DataParallel(mesh)
    batches = torch.Generator().manual_seed(args.seed)
    evals = torch.Generator().manual_seed(args.seed + 1)
    first = 0
    if args.init_from:
        with source:
            load_checkpoint(model, source)
        say(f"initialized from {args.init_from}")
    if args.resume:
        with source:
            saved = load_checkpoint(model, source, optimizer=optimizer)
        first = saved["extra"].get("iter", saved["extra"].get("nanogpt", {}).get("iter_num", 0))
        if first >= args.max_iters and not auto:
            raise ValueError(f"--resume {args.resume} is at iteration {first}; pass --max-iters above it")
        if "batch_rng" in saved["extra_tensors"]:  # a nanoGPT run keeps no data order: batches start afresh
            batches.set_state(saved["extra_tensors"]["batch_rng"])
            evals.set_state(saved["extra_tensors"]["eval_rng"])
        if not auto:
            say(f"resumed {args.resume} at iteration {first}")
    if auto:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        attempt = f" (torchrun restart {restart})" if restart else ""
        say(f"--resume auto: continuing this run from {args.out} at iteration {first}{attempt}" if args.resume else
            f"--resume auto: {args.out} holds no checkpoint of this run; starting it at iteration 0{attempt}")
    best = saved["extra"].get("best_val_loss", saved["extra"].get("nanogpt", {}).get("best_val_loss")) if args.resume else None
    best = math.inf if best is None else best
    scaling = {k: saved["extra"][k] for k in ("loss_scale", "clean_steps") if k in saved["extra"]} if args.resume else {}
    scaler = LossScaler(args.dtype == "fp16", **scaling)

    def run_state(it):
        """What --resume needs to continue from iteration `it` exactly."""
        extra = {"iter": it, **{f: getattr(args, f) for f in SCHEDULE}, "best_val_loss": best,
                 "dataset": os.path.splitext(os.path.basename(args.data))[0], "run": identity}
        if isinstance(data.tokenizer, CharTokenizer):
            extra["chars"] = data.tokenizer.chars
        if scaler.enabled:
            extra.update(scaler.state())
        return dict(extra=extra, extra_tensors={"batch_rng": batches.get_state(), "eval_rng": evals.get_state()})

    if args.resume and first >= args.max_iters:  # --resume auto after the run's last save: nothing left to do
        say(f"--resume auto: {args.out} holds this run's last iteration ({first}); nothing left to train")
        return model, optimizer, data, run_state(first), [], None
    say(f"training iterations {first} to {args.max_iters} ({memory})"
        f"{f'; first an evaluation of {args.eval_iters} batches per split' if first == 0 else ''}")
    losses, evaluation, start, saved_at = [], None, time.time(), None
    steps = args.gradient_accumulation_steps
    tokens_per_step = steps * args.batch_size * args.block_size
    for it in range(first, args.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, args)
        save_point = args.out and it > first and (it % args.save_interval == 0 or it == args.max_iters)
        if (it % args.eval_interval == 0 and it > first) or it == 0 or it == args.max_iters or save_point:
            doing(f"the evaluation at iteration {it}")
            evaluation = estimate_loss(model, data, args, evals, dp)
            say(f"step {it}: train loss {evaluation['train']:.4f}, val loss {evaluation['val']:.4f} "
                f"({time.time() - start:.0f}s)")
            if not all(math.isfinite(v) for v in evaluation.values()):
                raise Diverged(f"the evaluation at iteration {it} gave {evaluation}", args)
            if save_point and (evaluation["val"] < best or args.always_save_checkpoint):
                best, saved_at = min(best, evaluation["val"]), it  # nanoGPT's best: among saved checkpoints
                doing(f"saving {args.out} at iteration {it}")
                save_checkpoint(model, args.out, overwrite=True, plan=args.plan, optimizer=optimizer, **run_state(it))
                say(f"saved {args.out} at iteration {it}")
            elif it == 0:  # nanoGPT's baseline: a checkpoint must beat the untrained model, which is never saved
                best = evaluation["val"]
        if it == args.max_iters:
            break
        # dropout masks: a pure function of (seed, iteration, data-parallel rank), so a resumed run
        # draws what the uninterrupted one did, TP ranks alike (their replicated activations
        # must drop the same elements) and data-parallel replicas apart (their rows differ)
        torch.manual_seed((args.seed << 40) ^ (it << 16) ^ dp.rank)
        doing(f"iteration {it}'s training step")
        fault_point("step", it)
        micro_batches = [dp.rows(*data.batch("train", args.batch_size, args.block_size, batches)) for _ in range(steps)]
        losses.append(train_step(model, optimizer, scaler, micro_batches, args, dp))
        if not math.isfinite(losses[-1]):  # every rank sees the same loss, so all stop here together
            raise Diverged(f"the training loss at iteration {it} is {losses[-1]}", args)
        if it % args.log_interval == 0:
            elapsed = time.time() - start
            say(f"iter {it}: loss {losses[-1]:.4f}, lr {learning_rate(it, args):.2e}, "
                f"{tokens_per_step * (it + 1 - first) / max(elapsed, 1e-9):,.0f} tokens/s")
    say(f"trained to iteration {args.max_iters} in {time.time() - start:.0f}s; "
        f"final val loss {evaluation['val']:.4f}, plan {args.plan}, dp={dp.size}, tp={tp}; "
        f"{saved_note(args, first, saved_at, best)}")
    return model, optimizer, data, run_state(args.max_iters), losses, evaluation


def main():
    args = parse_args()
    quiet_dtensor_notes()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    shape = (args.dp, world // args.dp) if args.dp > 1 else None
    mesh, _ = init_distributed(shape, ("dp", "tp") if shape else None, timeout=args.timeout)
    say = print if dist.get_rank() == 0 else (lambda *a, **k: None)
    try:
        with stalls_reported(args.timeout):
            train(args, mesh, say)
    except (ValueError, Diverged) as e:  # bad settings, or a diverged run: found alike on every rank
        say(f"error: {e}", file=sys.stderr)
        exit_distributed(2)
    exit_distributed()


if __name__ == "__main__":
    main()
