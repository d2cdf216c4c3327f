"""
Generate text with the tensor-parallel GPT, a KV cache, and tokens streamed as they come.

    torchrun --standalone --nproc-per-node 2 examples/generate.py [--prompt "ROMEO:"]

With no --checkpoint it uses the small Shakespeare model shipped in examples/models (trained
by examples/train.py; see its README). --checkpoint also takes a checkpoint of this project
at any TP degree, a Hugging Face GPT-2 directory or a nanoGPT ckpt.pt; GPT-2 weights use the
GPT-2 BPE through tiktoken (--tokenizer PATH: a .tiktoken ranks file, for offline use, or a
nanoGPT character checkpoint's meta.pkl).
"""

import contextlib
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_gpt import GPT, GPTConfig, compile_decoding, load_checkpoint, parallelize
from dtensor_gpt.checkpoint import CheckpointError
from dtensor_gpt.cli import ArgumentParser, add_compress_argument, integer, number, plan_options, quiet_dtensor_notes
from dtensor_gpt.launch import doing, exit_distributed, init_distributed, stalls_reported
from dtensor_gpt.model import KVCache
from dtensor_gpt.safetensors_stream import DTYPE_NAMES
from dtensor_gpt.sampling import VocabParallelSampler
from dtensor_gpt.sources import activation_note, open_source
from dtensor_gpt.tokenizers import BPETokenizer, CharTokenizer, chars_from_meta
from plans import PLANS

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(HERE, "models", "shakespeare_char")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", default=DEFAULT_MODEL,
                   help="this project's checkpoint (any TP degree), a Hugging Face GPT-2 directory or a nanoGPT "
                        "ckpt.pt (default: the shipped model, examples/models/shakespeare_char)")
    p.add_argument("--plan", default="megatron", choices=list(PLANS), help="the tensor-parallel plan")
    p.add_argument("--spd-blocks", default="all", help="with --plan spd: 'all', 'last:K' or indices '0,2'")
    add_compress_argument(p)
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=integer(1), default=300, help="tokens to generate")
    p.add_argument("--temperature", type=number(above=0), default=0.8,
                   help="divides the logits before sampling: lower is more conservative")
    p.add_argument("--top-k", type=integer(0), default=200,
                   help="sample among the k likeliest tokens; 1 is greedy, 0 the whole softmax")
    p.add_argument("--sampler", default="vocab-parallel", choices=["vocab-parallel", "multinomial"],
                   help="vocab-parallel: each rank samples its own slice of the vocabulary and only the best candidates "
                        "travel, never the logits; a seed gives the same text at every TP degree. multinomial: the "
                        "logits are gathered and torch.multinomial draws, as nanoGPT's sample.py does")
    p.add_argument("--num-samples", type=integer(1), default=1,
                   help="samples to draw, generated together as the rows of one batch")
    p.add_argument("--seed", type=integer(0, 2**63 - 1), default=1337,  # within torch.manual_seed's 64 bits
                   help="seeds the sampling: the same seed gives the same text")
    p.add_argument("--tokenizer", help="a .tiktoken ranks file for GPT-2 checkpoints (offline use), or the "
                                       "meta.pkl of a nanoGPT character checkpoint (default: the characters saved "
                                       "with the checkpoint, or tiktoken's gpt2 encoding)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix for every token")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step (dtensor_gpt.compile_decoding); its first step "
                        "compiles, and the summary gives that time apart from the tokens/s after it")
    p.add_argument("--dtype", choices=[*DTYPE_NAMES, "int8"], default="fp32",
                   help="the weights' dtype: the checkpoint is cast on loading; int8: the Linear weights as int8 "
                        "with a scale per output channel (quantised on loading, or an int8 checkpoint read as it is), "
                        "the activations in bf16")
    p.add_argument("--timeout", type=number(above=0), default=120,
                   help="seconds any collective may wait for a peer before the job ends naming the ranks that "
                        "stopped answering")
    args = p.parse_args(argv)
    if args.compile and args.no_cache:
        p.error("--compile compiles the KV-cache decoding step, so it cannot be combined with --no-cache")
    if not os.path.exists(args.checkpoint):
        p.error(f"--checkpoint {args.checkpoint} does not exist")
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        p.error(f"--tokenizer {args.tokenizer} is not a file; give a .tiktoken ranks file or a nanoGPT meta.pkl")
    return args


def load_model(args, mesh):
    """(model, tokenizer) from --checkpoint, parallelized over `mesh`."""
    source = open_source(args.checkpoint)
    if activation_note(source, args.checkpoint) and dist.get_rank() == 0:
        print(activation_note(source, args.checkpoint), file=sys.stderr)
    config = {f: source.config[f] for f in GPTConfig.__dataclass_fields__ if f in source.config}
    config["dropout"] = 0.0
    tokenizer = tokenizer_for(args, source, config["vocab_size"])
    with torch.device("meta"), contextlib.redirect_stdout(None):  # no memory until each rank reads its shards
        model = GPT(GPTConfig(**config))
    if args.dtype == "int8":
        model.to(torch.bfloat16)  # the activations' dtype, and the scales'
    parallelize(model, mesh, args.plan, loss_parallel=args.sampler == "vocab-parallel",
                **plan_options(args.plan, args.spd_blocks, args.compress))
    with source:
        load_checkpoint(model, source, dtype=args.dtype)
    if args.compile:
        compile_decoding(model)
    return model.eval(), tokenizer


def tokenizer_for(args, source, vocab):
    """--tokenizer, else the characters saved with the checkpoint, else GPT-2's BPE; each checked against `vocab`."""
    if args.tokenizer and not args.tokenizer.endswith(".pkl"):  # a .tiktoken file wins, as a meta.pkl does
        tokenizer = BPETokenizer(args.tokenizer)
        if tokenizer.vocab_size > vocab:
            raise ValueError(f"--tokenizer {args.tokenizer} has {tokenizer.vocab_size} tokens but --checkpoint "
                             f"{args.checkpoint} only {vocab}; give the tokenizer the model was trained with")
        return tokenizer
    chars = chars_from_meta(args.tokenizer) if args.tokenizer else source.extra.get("chars")
    if chars and len(chars) != vocab:
        raise ValueError(f"the vocabulary has {len(chars)} characters but --checkpoint {args.checkpoint} "
                         f"has {vocab} tokens; give the meta.pkl of the run that trained it")
    if not chars and vocab < 50257:
        raise ValueError(f"--checkpoint {args.checkpoint} has a vocabulary of {vocab} tokens and no "
                         f"characters saved with it, so it is not GPT-2's BPE; for a nanoGPT shakespeare_char "
                         f"ckpt.pt pass its characters with --tokenizer data/shakespeare_char/meta.pkl")
    return CharTokenizer(chars) if chars else BPETokenizer()


def sampler_for(args):
    """`sample` for GPT.generate: a fresh vocabulary-parallel sampler, or None for torch.multinomial."""
    return VocabParallelSampler(args.seed) if args.sampler == "vocab-parallel" else None


def collectives_per_token(model, prompt, args):
    """The collectives of one decoding step (after a prompt) and the choice of its token, counted by CommDebugMode."""
    # the prompt and one step, no more: a block_size cache was GPT-2-XL's largest allocation after its weights
    cache = KVCache(len(model.transformer.h), prompt.size(1) + 1)
    sample = sampler_for(args)
    # eagerly: a compiled model would compile again for this cache's length; the collectives are the same
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        model(prompt, cache=cache)
        with CommDebugMode() as mode:
            logits, _ = model(prompt[:, -1:], cache=cache)
            if sample is None:
                logits.sum().item()
            else:
                sample(logits[:, -1, :], args.top_k or None)
    return Counter({str(op).split(".")[-1].rstrip("')"): n for op, n in mode.get_comm_counts().items() if n})


def main():
    args = parse_args()
    quiet_dtensor_notes()
    mesh, device = init_distributed(timeout=args.timeout)
    with stalls_reported(args.timeout):
        generate(args, mesh, device)
    exit_distributed()


def generate(args, mesh, device):
    """Load, stream the tokens, and print the summary line (rank 0)."""
    rank = dist.get_rank()
    loading = time.time()
    try:
        model, tokenizer = load_model(args, mesh)
        ids = tokenizer.encode(args.prompt)
        if len(ids) + 1 > model.config.block_size:
            raise ValueError(f"--prompt is {len(ids)} tokens, but the model reads at most block_size="
                             f"{model.config.block_size}, one of them the first new token; give at most "
                             f"{model.config.block_size - 1}")
        if not ids:
            raise ValueError("--prompt is empty; give at least one character")
    except (ValueError, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        exit_distributed(2)
    loading = time.time() - loading
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    decode = tokenizer.stream_decoder()
    streaming = rank == 0 and args.num_samples == 1  # several samples are printed whole, one after another

    def show(tokens):
        if streaming:
            sys.stdout.write(decode(int(tokens[0, 0])))
            sys.stdout.flush()

    if streaming:
        sys.stdout.write(args.prompt)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    lengths = []  # tokens each forward ran: 1 from the cache, more for the prompt or a recomputed window
    counting = model.register_forward_pre_hook(lambda _, inputs: lengths.append(inputs[0].size(1)))
    stamps = []  # when each token came

    def on_token(tokens):
        stamps.append(time.time())
        doing(f"generating token {len(stamps) + 1}")
        show(tokens)

    doing("generating token 1")
    start = time.time()
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                         use_cache=not args.no_cache, generator=generator, on_token=on_token, sample=sampler_for(args))
    seconds = time.time() - start
    counting.remove()
    comm = collectives_per_token(model, prompt, args)
    if rank == 0 and not streaming:
        for row in out.tolist():
            print(tokenizer.decode(row))
            print("---------------")
    if rank == 0:
        per_token = ", ".join(f"{n} {kind}" for kind, n in sorted(comm.items())) or "none"
        mode = "no cache"
        if not args.no_cache:
            recomputed = sum(n > 1 for n in lengths[1:])
            mode = "KV cache" if not recomputed else (
                f"KV cache for {len(lengths) - recomputed} tokens, then {recomputed} each recomputed the last "
                f"{model.config.block_size} (past block_size the learned positions shift, as in nanoGPT)")
        tokens = args.num_samples * args.max_new_tokens
        rate = f"{tokens / seconds:.1f} tokens/s"
        if args.compile and len(stamps) > 2:  # the first one-token step compiles it
            rate = (f"compiling the decoding step {stamps[1] - stamps[0]:.2f}s (its first step), then "
                    f"{args.num_samples * (len(stamps) - 2) / (stamps[-1] - stamps[1]):.1f} tokens/s")
        batch = f"{args.num_samples} samples x {args.max_new_tokens}" if args.num_samples > 1 else f"{tokens}"
        weights = {"fp32": "", "int8": ", int8 weights, bf16 activations"}.get(args.dtype, f", {args.dtype}")
        weights += f", sums sent as {args.compress}" if args.compress else ""
        print(f"\n--- {batch} tokens in {seconds:.2f}s: {rate} (checkpoint loaded in {loading:.2f}s); tp={mesh.size()}, plan {args.plan}{weights}, "
              f"{args.sampler} sampling, {mode}; collectives per generated token: {per_token}")


if __name__ == "__main__":
    main()
