"""Small helpers shared by the tests: a tiny config, comparisons, collective counts."""

import contextlib
import copy
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import loss_parallel

from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize, save_checkpoint

# n_head=12 and vocab 96 are divisible by every TP degree under test (1, 2, 3, 4)
SMALL = dict(block_size=32, vocab_size=96, n_layer=2, n_head=12, n_embd=96)


def small_config(**overrides):
    return GPTConfig(**{**SMALL, **overrides})


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def max_grad_errors(model, reference):
    """Largest |grad - reference grad| per parameter name."""
    ref = dict(reference.named_parameters())
    return {
        name: (full(p.grad) - ref[name].grad).abs().max().item()
        for name, p in model.named_parameters()
    }


def local_parameter_bytes(model):
    """Bytes this rank holds for the model's parameters (a tied parameter once)."""
    return sum(
        (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
        for p in model.parameters()
    )


def comm_counts(mode):
    """{module path: {collective: count}} for forward and backward from a CommDebugMode."""
    out = {}
    for fqn, phases in mode.comm_module_counts.items():
        name = fqn.split(".", 1)[1] if "." in fqn else fqn
        for phase, counts in phases.items():
            out.setdefault(phase, {})[name] = {str(k).split(".")[-1].strip("')"): v for k, v in counts.items() if v}
    return out


@contextlib.contextmanager
def fake_process_group(world_size):
    """One process that plays `world_size` ranks: exact collective counts, no real data."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def compare_with_single_device(rank, world_size, config, shape, plan="megatron", options=None):
    """Reference and TP model from one seed; logits, loss and every gradient, both head modes."""
    options = options or {}
    torch.manual_seed(0)
    reference = GPT(config)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(0, config.vocab_size, shape, generator=generator)
    targets = torch.randint(0, config.vocab_size, shape, generator=generator)
    ref_logits, ref_loss = reference(idx, targets)
    ref_loss.backward()
    ref_last, _ = reference(idx)
    mesh = init_device_mesh("cpu", (world_size,))

    train = parallelize(copy.deepcopy(reference), mesh, plan, loss_parallel=True, **options)
    with CommDebugMode() as forward_mode, loss_parallel():
        logits, loss = train(idx, targets)
    with CommDebugMode() as backward_mode, loss_parallel():
        loss.backward()

    generate = parallelize(copy.deepcopy(reference), mesh, plan, **options)
    with torch.no_grad(), CommDebugMode() as generate_mode:
        last, no_loss = generate(idx)

    return dict(
        logits=(full(logits) - ref_logits).abs().max().item(),
        logits_placements=tuple(getattr(logits, "placements", ())),
        plain=not any(isinstance(p, DTensor) for p in train.parameters()),
        collectives=sum(m.get_total_counts() for m in (forward_mode, backward_mode, generate_mode)),
        loss=(full(loss) - ref_loss).abs().item(),
        grads=max_grad_errors(train, reference),
        last=(last - ref_last).abs().max().item(),
        last_is_plain=type(last) is torch.Tensor and no_loss is None,
        tied=train.lm_head.weight is train.transformer.wte.weight,
        forward=comm_counts(forward_mode)["forward"]["Global"],
        backward=comm_counts(backward_mode)["backward"]["Global"],
        generate=comm_counts(generate_mode)["forward"]["Global"],
        local_bytes=local_parameter_bytes(train),
    )


def nanogpt_run(path, config, chars=None, steps=3, iter_num=3):
    """
    A nanoGPT out_dir at `path`: ckpt.pt as nanoGPT's train.py writes it (model_args, model,
    AdamW state grouped as its configure_optimizers groups, iter_num, best_val_loss, config)
    after `steps` AdamW steps on random tokens, and meta.pkl for `chars`. Returns the model.
    """
    import os
    import pickle
    from dataclasses import asdict

    torch.manual_seed(0)
    model = GPT(config)
    params = [p for _, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99))
    tokens = torch.randint(0, config.vocab_size, (steps, 4, config.block_size + 1), generator=torch.Generator().manual_seed(5))
    for batch in tokens:
        model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    os.makedirs(path, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": asdict(config),
                "iter_num": iter_num, "best_val_loss": torch.tensor(2.5),
                "config": {"dataset": "shakespeare_char", "learning_rate": 1e-3, "lr_decay_iters": 2000}},
               os.path.join(path, "ckpt.pt"))
    if chars:
        meta = dict(vocab_size=len(chars), itos=dict(enumerate(chars)), stoi={c: i for i, c in enumerate(chars)})
        with open(os.path.join(path, "meta.pkl"), "wb") as f:
            pickle.dump(meta, f)
    return model, optimizer


def write_text(path, n=20000, words=40):
    """
    A deterministic text of `n` characters over 65 distinct ones (nanoGPT's shakespeare_char has 65):
    the 65 characters, then `words` random words repeated at random. With words=8 a tiny model's loss
    falls by about 1 in 20 steps (by 0.4 with 40).
    """
    alphabet = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    g = torch.Generator().manual_seed(0)
    vocabulary = ["".join(alphabet[i] for i in torch.randint(2, 65, (int(k),), generator=g))
                  for k in torch.randint(2, 7, (words,), generator=g)]
    picks = torch.randint(0, words, (n,), generator=g).tolist()
    text = (alphabet + " ".join(vocabulary[i] for i in picks))[:n]
    with open(path, "w") as f:
        f.write(text)
    return sorted(set(text))


def as_written_before_index_hashes(path, fmt="dtensor_gpt/2", **index_changes):
    """
    Rewrite the checkpoint at `path` (a pathlib.Path) as versions before format 3 wrote it:
    rank files without `index_sha256`, labelled `fmt`, and the index with `index_changes`.
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from dtensor_gpt.format import sha256

    index = json.loads((path / "index.json").read_text())
    for fname in index["files"]:
        with safe_open(path / fname, "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if k != "index_sha256"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, path / fname, metadata={**meta, "format": fmt})
        index["files"][fname] = dict(sha256=sha256(path / fname), bytes=(path / fname).stat().st_size)
    index.update(format=fmt, **index_changes)
    (path / "index.json").write_text(json.dumps(index))


def write_ranks(path, merges=("th", "he", "the", " t", "e ")):
    """
    A tiny GPT-2-style BPE ranks file, as tiktoken's load_tiktoken_bpe reads one (a base64 token
    and its rank per line): the 256 single bytes, then `merges`. Returns the vocabulary size a
    tokenizer built on it has: every rank, and <|endoftext|> after them.
    """
    import base64

    tokens = [bytes([b]) for b in range(256)] + [m.encode() for m in merges]
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))
    return len(tokens) + 1


def exit_status(main, argv):
    """What a command line's `main(argv)` exits with: its return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _adamw_steps(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator).to(model.lm_head.weight.device)
        model(idx, idx)[1].backward()
        optimizer.step()
        optimizer.zero_grad()


def resumed_adamw(path, device="cpu", **options):
    """
    A small GPT on `device` trained 4 steps with AdamW(**options), and one resumed from its
    checkpoint after 2: (whether their weights are equal, {state key: (device, dtype)} as
    load_checkpoint places the state, the same as Optimizer.load_state_dict places it).
    """
    torch.manual_seed(0)
    model = GPT(small_config()).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, **options)
    _adamw_steps(model, optimizer, 2, seed=1)
    save_checkpoint(model, path, optimizer=optimizer)
    by_torch = torch.optim.AdamW(GPT(small_config()).to(device).parameters(), lr=1e-2, **options)
    by_torch.load_state_dict(optimizer.state_dict())
    _adamw_steps(model, optimizer, 2, seed=2)
    resumed = GPT(small_config()).to(device)
    resumed_optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-2, **options)
    load_checkpoint(resumed, path, optimizer=resumed_optimizer)
    placed = {k: (v.device, v.dtype) for s in resumed_optimizer.state.values() for k, v in s.items()}
    _adamw_steps(resumed, resumed_optimizer, 2, seed=2)
    equal = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    return equal, placed, {k: (v.device, v.dtype) for s in by_torch.state.values() for k, v in s.items()}


def collective_kinds(counts):
    """{kind: count} of {(kind, bytes): count}, an all-to-all counted as the reduce-scatter the cost model prices it as."""
    out = Counter()
    for (kind, _), n in counts.items():
        out["reduce_scatter" if kind == "all_to_all" else kind] += n
    return out
