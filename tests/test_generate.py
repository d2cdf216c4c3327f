"""Generation: the KV cache changes nothing, TP degree changes nothing, bad arguments are refused."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize
from helpers import small_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "models" / "shakespeare_char"
PROMPT = "ROMEO:\nWhat"




def _greedy(rank, world_size, runs):
    """The greedy tokens of examples/generate.py's model for each (plan, use_cache) of `runs`, in one job."""
    sys.path.insert(0, str(ROOT / "examples"))
    from generate import load_model, parse_args, sampler_for

    out = []
    for plan, use_cache in runs:
        args = parse_args(["--plan", plan, "--top-k", "1"])
        model, tokenizer = load_model(args, init_device_mesh("cpu", (world_size,)))
        prompt = torch.tensor([tokenizer.encode(PROMPT)])
        out.append(model.generate(prompt, 40, top_k=1, use_cache=use_cache, sample=sampler_for(args))[0].tolist())
    return out


def test_greedy_tokens_identical_at_tp_1_2_4_and_with_or_without_cache():
    reference, cached = run_distributed(_greedy, 1, [("megatron", False), ("megatron", True)])
    assert len(reference) == len(PROMPT) + 40
    assert cached == reference
    assert run_distributed(_greedy, 2, [("megatron", True), ("megatron-sp", True)]) == [reference] * 2
    assert run_distributed(_greedy, 4, [("megatron", True)]) == [reference]


def test_cache_matches_recompute_past_block_size():
    """Sampled (not greedy) decoding from one seed, past the context length, at TP=1."""
    torch.manual_seed(0)
    model = GPT(small_config(block_size=16)).eval()
    prompt = torch.randint(0, 96, (2, 5))
    calls = []
    model.transformer.wte.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    cached = model.generate(prompt, 30, top_k=5, generator=torch.Generator().manual_seed(3))
    assert calls[:12] == [5] + [1] * 11, "within the context, each step runs one token"
    calls.clear()
    plain = model.generate(prompt, 30, top_k=5, use_cache=False, generator=torch.Generator().manual_seed(3))
    assert calls[:3] == [5, 6, 7]
    assert cached.shape == (2, 35) and torch.equal(cached, plain)


def run_generate(nproc, *args, cwd=None):
    """examples/generate.py under torchrun on `nproc` processes; one process is run directly, as a user may (2 s less)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(ROOT / "examples" / "generate.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def test_generate_runs_with_no_arguments():
    """Seeded vocab-parallel sampling (temperature 0.8, top-k 200): the same text at TP 2 and 1."""
    r = run_generate(2, "--max-new-tokens", "80", "--prompt", "KING HENRY:")
    assert r.returncode == 0, r.stderr[-2000:]
    text, summary = r.stdout.rsplit("\n--- ", 1)
    assert text.startswith("KING HENRY:") and len(text) == len("KING HENRY:") + 80
    # 11 + 80 tokens pass block_size 64: the prompt's forward and 53 cached steps, then whole windows
    assert re.search(r" tokens/s \(checkpoint loaded in \d+\.\d\ds\); tp=2, ", summary)
    assert ("s); tp=2, plan megatron, vocab-parallel sampling, KV cache for 54 tokens, then 26 each "
            "recomputed the last 64 ") in summary
    # no logits gathered: 2 all-reduces per block, the embedding's, and one all-gather of candidates
    assert summary.endswith("collectives per generated token: 1 all_gather_into_tensor, 9 all_reduce\n")
    alone = run_generate(1, "--max-new-tokens", "80", "--prompt", "KING HENRY:")
    assert alone.stdout.rsplit("\n--- ", 1)[0] == text
    assert "s); tp=1, plan megatron, vocab-parallel sampling, KV cache for 54 tokens" in alone.stdout
    assert alone.stdout.endswith("collectives per generated token: none\n")


def test_samples_are_the_rows_of_one_batch_and_multinomial_draws_as_nanogpt():
    """
    --num-samples 3: one batch, whose row b is keyed by b in the sampling noise, so its first row is
    the single sample's text. --sampler multinomial: nanoGPT's draws from the gathered logits, the
    unparallelized model's with the same seed.
    """
    single = run_generate(1, "--max-new-tokens", "30", "--prompt", "ROMEO:")
    batch = run_generate(2, "--max-new-tokens", "30", "--prompt", "ROMEO:", "--num-samples", "3")
    assert batch.returncode == 0, batch.stderr[-2000:]
    samples, summary = batch.stdout.rsplit("\n--- ", 1)
    rows = samples.split("\n---------------\n")
    assert rows[-1] == "" and len(rows) == 4
    assert rows[0] == single.stdout.rsplit("\n--- ", 1)[0] and len(set(rows[:3])) == 3
    assert all(row.startswith("ROMEO:") and len(row) == 36 for row in rows[:3])
    assert summary.startswith("3 samples x 30 tokens in ")

    r = run_generate(2, "--max-new-tokens", "30", "--prompt", "ROMEO:", "--sampler", "multinomial")
    assert r.returncode == 0, r.stderr[-2000:]
    text, summary = r.stdout.rsplit("\n--- ", 1)
    assert "multinomial sampling" in summary and "1 all_gather_into_tensor, 9 all_reduce" in summary
    index = json.loads((SHIPPED / "index.json").read_text())
    model = GPT(GPTConfig(**index["config"]))
    load_checkpoint(model, str(SHIPPED))
    chars = index["extra"]["chars"]
    prompt = torch.tensor([[chars.index(c) for c in "ROMEO:"]])
    expected = model.eval().generate(prompt, 30, temperature=0.8, top_k=200, generator=torch.Generator().manual_seed(1337))
    assert text == "".join(chars[i] for i in expected[0].tolist())


@pytest.mark.parametrize("nproc, args, message", [
    (1, ["--checkpoint", "/nonexistent/ckpt"], "error: --checkpoint /nonexistent/ckpt does not exist"),
    (1, ["--compile", "--no-cache"], "error: --compile compiles the KV-cache decoding step, so it cannot be combined "
                                     "with --no-cache"),
    (3, [], "error: n_head=4 is not divisible by tp=3; use tp in {1, 2, 4}"),
    (1, ["--prompt", "x" * 64], "error: --prompt is 64 tokens, but the model reads at most block_size=64, one of "
                                "them the first new token; give at most 63"),
    (1, ["--prompt", "ROMEO: \u00e9"], "error: characters ['\u00e9'] are not in the model's vocabulary"),
])
def test_bad_arguments(nproc, args, message):
    r = run_generate(nproc, *args)
    assert r.returncode != 0
    assert message in r.stderr


class _Evil:
    def __reduce__(self):
        import os

        return os.system, ("touch evil-ran",)


def test_nanogpt_character_checkpoint_with_its_meta_pkl(tmp_path):
    """A nanoGPT shakespeare_char ckpt.pt keeps its characters in meta.pkl, read without running code."""
    import pickle

    import torch

    from dtensor_gpt import GPT, GPTConfig

    chars = [chr(32 + i) for i in range(65)]
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, bias=False, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args)).eval()
    torch.save({"model": model.state_dict(), "model_args": args}, tmp_path / "ckpt.pt")
    refused = run_generate(1, "--checkpoint", str(tmp_path / "ckpt.pt"))
    assert refused.returncode != 0
    assert "has a vocabulary of 65 tokens and no characters saved with it" in refused.stderr, refused.stderr[-1000:]

    meta = dict(vocab_size=65, itos=dict(enumerate(chars)), stoi={c: i for i, c in enumerate(chars)})
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps(meta))
    r = run_generate(2, "--checkpoint", str(tmp_path / "ckpt.pt"), "--tokenizer", str(tmp_path / "meta.pkl"),
                     "--prompt", "ROMEO", "--top-k", "1", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr[-2000:]
    expected = model.generate(torch.tensor([[chars.index(c) for c in "ROMEO"]]), 8, top_k=1)[0].tolist()
    assert r.stdout.split("\n--- ")[0] == "".join(chars[i] for i in expected)

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil()))
    evil = run_generate(1, "--checkpoint", str(tmp_path / "ckpt.pt"), "--tokenizer", str(tmp_path / "evil.pkl"),
                        cwd=tmp_path)
    assert evil.returncode != 0 and "is not a nanoGPT character meta.pkl (it refers to" in evil.stderr
    assert not (tmp_path / "evil-ran").exists()


def test_bpe_train_then_generate_offline(tmp_path):
    """A .tiktoken ranks file through train.py and generate.py: the model's vocabulary is the tokenizer's, unpadded."""
    from helpers import write_ranks, write_text

    write_text(tmp_path / "text.txt")
    vocab = write_ranks(tmp_path / "tiny.tiktoken")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
             str(ROOT / "examples" / "train.py"), "--data", str(tmp_path / "text.txt"),
             "--tokenizer", str(tmp_path / "tiny.tiktoken"), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
             "--block-size", "32", "--max-iters", "4", "--warmup-iters", "1", "--eval-interval", "4",
             "--eval-iters", "1", "--always-save-checkpoint", "--out", str(tmp_path / "bpe")]
    r = subprocess.run(train, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("number of parameters:") == 1, "the model's size is printed once per job, not per rank"
    index = (tmp_path / "bpe" / "index.json").read_text()
    assert f'"vocab_size": {vocab}' in index and "unpadded" not in index
    g = run_generate(2, "--checkpoint", str(tmp_path / "bpe"), "--tokenizer", str(tmp_path / "tiny.tiktoken"),
                     "--prompt", "To be, or not", "--max-new-tokens", "5")
    assert g.returncode == 0, g.stderr[-2000:]
    assert g.stdout.startswith("To be, or not") and "5 tokens in" in g.stdout
    # the same ranks file given to the character model: refused, not ignored
    refused = run_generate(1, "--tokenizer", str(tmp_path / "tiny.tiktoken"))
    assert refused.returncode != 0
    assert f"has {vocab} tokens but --checkpoint {SHIPPED} only 65; give the tokenizer the model was trained with" \
        in refused.stderr, refused.stderr[-2000:]


def _workers(launcher):
    """{local rank: pid} of the processes torchrun (pid `launcher`) started."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            environ = open(f"/proc/{entry}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        ranks = [v[len(b"LOCAL_RANK="):] for v in environ if v.startswith(b"LOCAL_RANK=")]
        if parent == launcher and ranks:
            found[int(ranks[0])] = int(entry)
    return found


def test_a_killed_and_a_stalled_rank_end_the_job_naming_them(tmp_path):
    """
    TP=4: mid-generation rank 3 is killed and rank 2 stopped (SIGSTOP). Ranks 0 and 1 each end
    with one line naming both, within --timeout (3 s) and the 2 s heartbeat look. torchrun's
    --monitor-interval is widened so that it does not stop them first, as no agent stops the
    ranks on another machine: on one machine it stops them within 0.1 s and names the dead rank.
    """
    import re
    import signal
    import time

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "--monitor-interval=120",
           str(ROOT / "examples" / "generate.py"), "--max-new-tokens", "20000", "--timeout", "3"]
    out, err = open(tmp_path / "out", "w+"), open(tmp_path / "err", "w+")
    job = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    workers = {}
    try:
        deadline = time.time() + 300
        while os.path.getsize(tmp_path / "out") < 20 and time.time() < deadline:  # generating
            time.sleep(0.2)
        workers = _workers(job.pid)
        assert sorted(workers) == [0, 1, 2, 3], "torchrun's four ranks must be found"
        os.kill(workers[3], signal.SIGKILL)
        os.kill(workers[2], signal.SIGSTOP)
        deadline = time.time() + 60
        while open(tmp_path / "err").read().count("error:") < 2 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1)
        lines = sorted(line for line in open(tmp_path / "err").read().splitlines() if line.startswith("error:"))
        assert len(lines) == 2, lines
        for rank, line in enumerate(lines):
            assert re.match(rf"error: rank {rank}: a collective in generating token \d+ (lost a peer's connection|did "
                            rf"not complete within --timeout 3 s): rank\(s\) 2, 3 do not answer \(stalled or dead\)",
                            line), line
        assert all(open(f"/proc/{workers[r]}/stat").read().rsplit(")", 1)[1].split()[0] == "Z" for r in (0, 1)), \
            "both have exited"
    finally:
        for pid in [job.pid, *workers.values()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        job.wait()
