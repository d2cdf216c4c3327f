"""Training: tensor-parallel runs follow the single-process loss curve."""

import sys
from pathlib import Path

import pytest

from distributed import run_distributed
from helpers import write_text

ROOT = Path(__file__).resolve().parents[1]


TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "32", "--batch-size", "4",
        "--warmup-iters", "5", "--lr-decay-iters", "20", "--eval-interval", "1000", "--eval-iters", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A text a tiny model learns from in 20 steps (its loss falls by about 1)."""
    path = tmp_path_factory.mktemp("text") / "text.txt"
    write_text(path, words=8)
    return str(path)


def _losses(rank, world_size, data, plan, *extra):
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    args = parse_args(["--data", data, "--plan", plan, "--max-iters", "20", "--always-save-checkpoint", *TINY, *extra])
    mesh = (init_device_mesh("cpu", (args.dp, world_size // args.dp), mesh_dim_names=("dp", "tp")) if args.dp > 1
            else init_device_mesh("cpu", (world_size,)))
    _, _, _, _, losses, evaluation = train(args, mesh, say=lambda *a: None)
    return losses, evaluation


@pytest.mark.parametrize("plan", ["megatron", "megatron-sp"])
def test_tp2_follows_tp1_for_20_steps(plan, data):
    single, _ = run_distributed(_losses, 1, data, "megatron")
    parallel, evaluation = run_distributed(_losses, 2, data, plan)
    assert len(single) == len(parallel) == 20
    assert single[-1] < single[0] - 0.5, "the loss must actually fall for the comparison to mean anything"
    worst = max(abs(a - b) for a, b in zip(single, parallel))
    assert worst < 1e-4, f"TP=2 ({plan}) departs from TP=1 by {worst}"


def test_resume_is_exact_and_works_at_another_degree(tmp_path, data):
    from dtensor_gpt.reshard import main as reshard

    straight, _ = run_distributed(_losses, 2, data, "megatron")
    first, _ = run_distributed(_losses, 2, data, "megatron", "--max-iters", "10", "--out", str(tmp_path / "at10"))
    assert first == straight[:10]
    resumed, _ = run_distributed(_losses, 2, data, "megatron", "--resume", str(tmp_path / "at10"))
    assert len(resumed) == 10
    assert max(abs(a - b) for a, b in zip(resumed, straight[10:])) < 1e-6, "resuming must continue exactly"
    assert reshard([str(tmp_path / "at10"), str(tmp_path / "at10-tp1"), "--tp", "1"]) == 0
    elsewhere, _ = run_distributed(_losses, 1, data, "megatron", "--resume", str(tmp_path / "at10-tp1"))
    assert max(abs(a - b) for a, b in zip(elsewhere, straight[10:])) < 1e-4, "resuming at TP=1 follows TP=2"


def test_dp_tp_run_follows_tp_saves_and_resumes(tmp_path, data):
    """dp=2 x tp=2 on 4 processes against dp=1 x tp=2 on the same global batches."""
    straight, _ = run_distributed(_losses, 4, data, "megatron", "--dp", "2")
    tp_only, _ = run_distributed(_losses, 2, data, "megatron")
    assert len(straight) == 20 and straight[-1] < straight[0] - 0.5
    assert max(abs(a - b) for a, b in zip(straight, tp_only)) < 1e-4, "dp=2 x tp=2 departs from dp=1 x tp=2"
    run_distributed(_losses, 4, data, "megatron", "--dp", "2", "--max-iters", "10", "--out", str(tmp_path / "at10"))
    resumed, _ = run_distributed(_losses, 4, data, "megatron", "--dp", "2", "--resume", str(tmp_path / "at10"))
    assert max(abs(a - b) for a, b in zip(resumed, straight[10:])) < 1e-6, "a dp x tp run resumes exactly"
    tp_only, _ = run_distributed(_losses, 2, data, "megatron", "--resume", str(tmp_path / "at10"))
    assert max(abs(a - b) for a, b in zip(tp_only, straight[10:])) < 1e-4, "and continues at dp=1"


def test_pure_data_parallel_follows_one_process(tmp_path, data):
    """dp=2 x tp=1: the plan converts nothing at tp=1 and FSDP2 shards the plain parameters."""
    single, _ = run_distributed(_losses, 1, data, "megatron")
    both, _ = run_distributed(_losses, 2, data, "megatron", "--dp", "2", "--max-iters", "10", "--out", str(tmp_path / "at10"))
    resumed, _ = run_distributed(_losses, 2, data, "megatron", "--dp", "2", "--resume", str(tmp_path / "at10"))
    assert max(abs(a - b) for a, b in zip(both + resumed, single)) < 1e-4


@pytest.mark.parametrize("flag, decayed", [([], {"transformer.wte.weight", "transformer.wpe.weight"}),
                                            (["--no-embedding-decay"], set())])
def test_weight_decay_groups(flag, decayed, data):
    """nanoGPT decays every matrix; --no-embedding-decay spares wte (= lm_head) and wpe, as nanoGPT did in early 2023."""
    from torch.distributed.device_mesh import init_device_mesh

    from dtensor_gpt.data import TextData
    from helpers import fake_process_group

    sys.path.insert(0, str(ROOT / "examples"))
    from train import build, model_config, parse_args

    args = parse_args(["--data", data, *TINY, *flag])
    with fake_process_group(2):
        model, optimizer = build(args, model_config(args, None, TextData(data)), init_device_mesh("cpu", (2,)))
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    blocks = {n for n in names.values() if n.startswith("transformer.h.")}
    assert groups[0.1] == {n for n in blocks if n.endswith("weight") and "ln_" not in n} | decayed
    assert groups[0.0] == set(names.values()) - groups[0.1]
    assert "transformer.wte.weight" in names.values() and "lm_head.weight" not in names.values()


def test_bad_settings_give_one_error_line(data):
    import os
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           str(ROOT / "examples" / "train.py"), "--data", data, "--max-iters", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode != 0
    assert r.stderr.count("error: n_head=4 is not divisible by tp=3; use tp in {1, 2, 4}") == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr.split("error: n_head")[0], "the script's own error comes without a traceback"


def _run(rank, world_size, *argv):
    """train.py's train() on `argv`; (losses, evaluation, model's config) from rank 0."""
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    args = parse_args(list(argv))
    model, _, _, _, losses, evaluation = train(args, init_device_mesh("cpu", (world_size,)), say=lambda *a: None)
    return losses, evaluation, vars(model.config)


def _source_loss(path, text, args):
    """The first evaluation train.py should print, computed on the unparallelized source model."""
    sys.path.insert(0, str(ROOT / "examples"))
    import torch

    from dtensor_gpt import GPT, GPTConfig, load_checkpoint
    from dtensor_gpt.data import TextData
    from dtensor_gpt.sources import open_source
    from dtensor_gpt.tokenizers import CharTokenizer

    source = open_source(path)
    model = GPT(GPTConfig(**{f: source.config[f] for f in GPTConfig.__dataclass_fields__}))
    load_checkpoint(model, path)
    model.eval()
    data = TextData(text, CharTokenizer(source.extra["chars"]))
    evals = torch.Generator().manual_seed(args["seed"] + 1)
    out = {}
    with torch.no_grad():
        for split in ("train", "val"):
            losses = [model(*data.batch(split, args["batch"], source.config["block_size"], evals))[1].item()
                      for _ in range(args["eval_iters"])]
            out[split] = sum(losses) / len(losses)
    return out


def test_init_from_a_nanogpt_run_starts_at_its_loss(tmp_path):
    """nanoGPT's init_from: the source's weights, a fresh optimizer, and its loss at the first evaluation."""
    from helpers import nanogpt_run, small_config, write_text

    chars = write_text(tmp_path / "text.txt")
    nanogpt_run(tmp_path / "run", small_config(vocab_size=65, bias=False), chars=chars)
    flags = ["--data", str(tmp_path / "text.txt"), "--init-from", str(tmp_path / "run"), "--max-iters", "0",
             "--eval-iters", "3", "--batch-size", "4", "--seed", "7"]
    _, evaluation, config = run_distributed(_run, 2, *flags)
    expected = _source_loss(str(tmp_path / "run"), str(tmp_path / "text.txt"), dict(seed=7, batch=4, eval_iters=3))
    assert config["n_head"] == 12 and config["vocab_size"] == 65 and not config["bias"], "the architecture is the source's"
    assert abs(evaluation["val"] - expected["val"]) < 1e-5 and abs(evaluation["train"] - expected["train"]) < 1e-5


def test_resume_a_nanogpt_run_under_tp(tmp_path):
    """A nanoGPT ckpt.pt continues at its iter_num with its AdamW state, alike at TP 1 and 2."""
    from helpers import nanogpt_run, small_config, write_text

    chars = write_text(tmp_path / "text.txt")
    nanogpt_run(tmp_path / "run", small_config(vocab_size=65), chars=chars, iter_num=3)
    flags = ["--data", str(tmp_path / "text.txt"), "--resume", str(tmp_path / "run"), "--max-iters", "8",
             "--eval-interval", "100", "--eval-iters", "1", "--batch-size", "4", "--lr-decay-iters", "2000"]
    single, _, _ = run_distributed(_run, 1, *flags)
    parallel, _, _ = run_distributed(_run, 2, *flags)
    assert len(single) == len(parallel) == 5, "iterations 3..7 remain"
    assert max(abs(a - b) for a, b in zip(single, parallel)) < 1e-4


def test_gradient_accumulation_is_one_larger_batch(tmp_path):
    from helpers import write_text

    write_text(tmp_path / "text.txt")
    common = ["--data", str(tmp_path / "text.txt"), "--max-iters", "6", *TINY[:10], "--warmup-iters", "2",
              "--eval-interval", "100", "--eval-iters", "1"]
    once, _, _ = run_distributed(_run, 2, *common, "--batch-size", "8")
    accumulated, _, _ = run_distributed(_run, 2, *common, "--batch-size", "4", "--gradient-accumulation-steps", "2")
    assert once[-1] < once[0]
    assert max(abs(a - b) for a, b in zip(once, accumulated)) < 1e-5


def _logged(rank, world_size, *argv):
    """train() on `argv`, returning what it said, or the error that stopped it."""
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, str(ROOT / "examples"))
    from train import Diverged, parse_args, train

    lines = []
    try:
        train(parse_args(list(argv)), init_device_mesh("cpu", (world_size,)), say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    except Diverged as e:
        lines.append(f"error: {e}")
    return lines


def test_checkpoints_only_when_validation_improves(tmp_path):
    """nanoGPT's rule: every --save-interval, the checkpoint is replaced only by a better model."""
    import json
    import re

    from helpers import write_text

    write_text(tmp_path / "text.txt")
    lines = run_distributed(_logged, 2, "--data", str(tmp_path / "text.txt"), *TINY, "--max-iters", "24",
                            "--save-interval", "4", "--eval-iters", "1", "--lr", "3e-3", "--out", str(tmp_path / "ckpt"))
    vals = {int(m[1]): float(m[2]) for m in (re.match(r"step (\d+): .* val loss ([\d.]+)", l) for l in lines) if m}
    saved = [int(m[1]) for m in (re.match(r"saved .* at iteration (\d+)", l) for l in lines) if m]
    assert sorted(vals) == [0, 4, 8, 12, 16, 20, 24]
    best, expected = vals[0], []
    for it in sorted(vals)[1:]:
        if vals[it] < best:
            best = vals[it]
            expected.append(it)
    assert saved == expected and len(saved) >= 2, (vals, saved)
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    assert index["extra"]["iter"] == saved[-1] and abs(index["extra"]["best_val_loss"] - best) <= 5e-5  # printed to 4 places


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    from helpers import write_text

    write_text(tmp_path / "text.txt")
    # a schedule --resume accepts: warm-up to 1e-3 by iteration 3, then "decaying" towards 1e30, ~2.5e24 at iteration 4
    common = ["--data", str(tmp_path / "text.txt"), *TINY, "--eval-iters", "1", "--out", str(tmp_path / "ckpt"),
              "--lr", "1e-3", "--min-lr", "1e30", "--warmup-iters", "3", "--lr-decay-iters", "1000"]
    run_distributed(_logged, 2, *common, "--max-iters", "4", "--always-save-checkpoint")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    lines = run_distributed(_logged, 2, *common, "--resume", str(tmp_path / "ckpt"), "--max-iters", "12",
                            "--save-interval", "1", "--always-save-checkpoint")
    assert "the run diverged and stops" in lines[-1] and "keeps the last good checkpoint" in lines[-1], lines[-3:]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before


def test_resume_with_dropout_is_exact(tmp_path):
    """The masks are a function of (seed, iteration, dp rank): a resumed dropout run draws what the straight one did."""
    from helpers import write_text

    write_text(tmp_path / "text.txt")
    common = ["--data", str(tmp_path / "text.txt"), *TINY, "--dropout", "0.2", "--eval-iters", "1"]
    straight, _, _ = run_distributed(_run, 2, *common, "--max-iters", "8")
    run_distributed(_run, 2, *common, "--max-iters", "4", "--out", str(tmp_path / "at4"), "--always-save-checkpoint")
    resumed, _, _ = run_distributed(_run, 2, *common, "--max-iters", "8", "--resume", str(tmp_path / "at4"))
    assert len(resumed) == 4 and max(abs(a - b) for a, b in zip(resumed, straight[4:])) < 1e-6


def _refused(rank, world_size, *argv):
    sys.path.insert(0, str(ROOT / "examples"))
    from torch.distributed.device_mesh import init_device_mesh

    from train import parse_args, train

    try:
        train(parse_args(list(argv)), init_device_mesh("cpu", (world_size,)), say=lambda *a, **k: None)
    except ValueError as e:
        return str(e)
    return None


def test_out_holding_a_users_file_is_refused_before_training(tmp_path):
    """The shipped model's retrain command once deleted its README: --out is checked first, and kept whole."""
    import shutil

    from helpers import write_text

    write_text(tmp_path / "text.txt")
    shutil.copytree(ROOT / "examples" / "models" / "shakespeare_char", tmp_path / "model")
    (tmp_path / "model" / "README.md").write_text("how this model was made")
    message = run_distributed(_refused, 1, "--data", str(tmp_path / "text.txt"), "--out", str(tmp_path / "model"),
                              "--max-iters", "100000")
    assert "--out: " in message and "holds ['README.md'], which its index.json does not name" in message
    assert (tmp_path / "model" / "README.md").read_text() == "how this model was made"


def _scripted(rank, world_size, vals, *argv):
    """train() with each evaluation's losses taken in turn from `vals`; what it said."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train as script
    from torch.distributed.device_mesh import init_device_mesh

    given = iter(vals)
    script.estimate_loss = lambda *a: dict.fromkeys(("train", "val"), next(given))
    lines = []
    script.train(script.parse_args(list(argv)), init_device_mesh("cpu", (world_size,)),
                 say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    return lines


def test_best_loss_changes_only_when_a_checkpoint_is_saved(tmp_path):
    """
    nanoGPT's best_val_loss is that of the saved checkpoint (iteration 0's, never saved, as the
    baseline): an evaluation between save points must not raise the bar for the next save.
    """
    import json
    import re

    from helpers import write_text

    write_text(tmp_path / "text.txt")
    out = tmp_path / "ckpt"
    vals = [3.0, 2.0, 2.5, 2.2, 2.4]  # iterations 0, 2 (no save), 4 (save point), 6 (no save), 8 (save point)
    lines = run_distributed(_scripted, 1, vals, "--data", str(tmp_path / "text.txt"), *TINY, "--max-iters", "8",
                            "--eval-interval", "2", "--save-interval", "4", "--out", str(out))
    saved = [int(m[1]) for m in (re.match(r"saved .* at iteration (\d+)", l) for l in lines) if m]
    assert saved == [4, 8], lines
    assert json.loads((out / "index.json").read_text())["extra"]["best_val_loss"] == 2.4
    assert lines[-1].endswith(f"; checkpoint {out} from iteration 8"), lines[-1]


def test_a_run_that_saves_nothing_says_so(tmp_path):
    from helpers import write_text

    write_text(tmp_path / "text.txt")
    out = tmp_path / "ckpt"
    lines = run_distributed(_scripted, 1, [3.0, 3.1, 3.2], "--data", str(tmp_path / "text.txt"), *TINY,
                            "--max-iters", "4", "--eval-interval", "2", "--out", str(out))
    assert not out.exists()
    assert lines[-1].endswith(f"; no checkpoint saved in {out}: no evaluation at a save point beat iteration 0's val "
                              f"loss 3.0000 (only an improvement is saved, as in nanoGPT); pass "
                              f"--always-save-checkpoint to save regardless"), lines[-1]


def test_a_new_run_does_not_replace_another_runs_checkpoint(tmp_path):
    import socket
    import subprocess

    from helpers import write_text

    write_text(tmp_path / "text.txt")
    out = tmp_path / "ckpt"
    common = ["--data", str(tmp_path / "text.txt"), *TINY, "--eval-iters", "1", "--max-iters", "2",
              "--always-save-checkpoint", "--out", str(out)]
    run_distributed(_logged, 1, *common)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = run_distributed(_refused, 2, *common, "--seed", "1")
    assert message == (f"--out {out} holds another run's checkpoint; pass --resume {out} to continue that run or "
                       f"--overwrite to replace it")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / ".ckpt.lock").exists(), "the refused run let go of --out"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    aside = tmp_path / f".ckpt.tmp-{gone.pid}@{socket.gethostname()}-0123abcd.old"
    out.rename(aside)  # as a save killed between its two renames leaves it: found and put back first
    assert run_distributed(_refusals, 1, common, ["--resume", "auto", "--seed", "1"], ["--resume", "auto"]) == [
        f"--resume auto: --out {out} holds another run's checkpoint (it ran with --seed 1337, this run with 1); pass "
        f"--resume {out} to continue that run, --overwrite to replace it, or give another --out",
        None,  # its own, finished: nothing left to do
    ]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not aside.exists()
    assert run_distributed(_refused, 1, *common, "--seed", "1", "--overwrite") is None
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_a_live_runs_out_is_refused_and_a_dead_ones_taken_over(tmp_path, capfd):
    """Two runs on one --out: the second is refused before iteration 0, on every rank alike."""
    import os
    import socket
    import subprocess

    from helpers import write_text

    write_text(tmp_path / "text.txt")
    lock = tmp_path / ".ckpt.lock"
    common = ["--data", str(tmp_path / "text.txt"), *TINY, "--eval-iters", "1", "--max-iters", "2",
              "--always-save-checkpoint", "--out", str(tmp_path / "ckpt")]
    host = socket.gethostname()
    lock.write_text(f"{os.getpid()}@{host}")  # this test's process: alive
    message = run_distributed(_refused, 2, *common)
    assert message.startswith(f"--out {tmp_path / 'ckpt'} is in use by another run (pid {os.getpid()} on {host}, "
                              f"per {lock}); wait for it to end"), message
    assert not (tmp_path / "ckpt").exists() and lock.read_text() == f"{os.getpid()}@{host}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(f"{gone.pid}@{host}")
    assert run_distributed(_refused, 2, *common) is None
    assert f"note: took over {lock} from pid {gone.pid}, which no longer runs" in capfd.readouterr().err
    assert (tmp_path / "ckpt" / "index.json").exists() and not lock.exists(), "saved, and the lock released at exit"


def _refusals(rank, world_size, common, *variants):
    """_refused's answer for each of `variants` (extra flags over `common`), in one process."""
    return [_refused(rank, world_size, *common, *variant) for variant in variants]


def test_resume_refuses_other_optimizer_settings(tmp_path):
    """The saved AdamW groups and schedule are the run's: another value would silently depart from it."""
    from helpers import nanogpt_run, small_config, write_text

    chars = write_text(tmp_path / "text.txt")
    ours = tmp_path / "ckpt"
    common = ["--data", str(tmp_path / "text.txt"), *TINY, "--eval-iters", "1", "--max-iters", "2"]
    run_distributed(_logged, 1, *common, "--always-save-checkpoint", "--out", str(ours))
    resume = [*common[:-1], "4", "--resume", str(ours)]
    assert run_distributed(_refusals, 1, resume, ["--beta2", "0.95"], ["--weight-decay", "0.2"],
                           ["--no-embedding-decay"], ["--lr", "2e-3"], ["--warmup-iters", "7"], []) == [
        f"--resume {ours} ran with --beta2 0.99, this run with --beta2 0.95; pass --beta2 0.99 to continue it",
        f"--resume {ours} ran with --weight-decay 0.1, this run with --weight-decay 0.2; pass --weight-decay 0.1 to continue it",
        f"--resume {ours} decays wte and wpe, this run (--no-embedding-decay) does not; leave out "
        f"--no-embedding-decay to continue it",
        f"--resume {ours} ran with --lr 0.001, this run with --lr 0.002; pass --lr 0.001 to continue it",
        f"--resume {ours} ran with --warmup-iters 5, this run with --warmup-iters 7; pass --warmup-iters 5 to continue it",
        None,
    ]
    # a nanoGPT ckpt.pt: its param_groups (nanoGPT's grouping, betas, weight decay) and its config's schedule
    nanogpt_run(tmp_path / "run", small_config(vocab_size=65), chars=chars, iter_num=3)
    resume = ["--data", str(tmp_path / "text.txt"), "--resume", str(tmp_path / "run"), "--max-iters", "4",
              "--eval-iters", "1", "--batch-size", "2"]
    assert run_distributed(_refusals, 1, resume, ["--lr-decay-iters", "2000", "--beta2", "0.95"], [],
                           ["--lr-decay-iters", "2000", "--no-embedding-decay"]) == [
        f"--resume {tmp_path / 'run'} ran with --beta2 0.99, this run with --beta2 0.95; pass --beta2 0.99 to continue it",
        f"--resume {tmp_path / 'run'} ran with --lr-decay-iters 2000, this run with --lr-decay-iters 4; pass "
        f"--lr-decay-iters 2000 to continue it",
        f"--resume {tmp_path / 'run'} decays wte and wpe, this run (--no-embedding-decay) does not; leave out "
        f"--no-embedding-decay to continue it",
    ]


def test_a_steps_memory_estimate_is_the_hand_count():
    """
    Against what the model's backward really saves (memory.saved_activation_bytes, through autograd's
    hooks) and the parameters each rank holds, unparallelized and under megatron at TP=2.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from dtensor_gpt import GPT, GPTConfig, parallelize
    from dtensor_gpt.memory import activation_bytes, parameter_count, saved_activation_bytes, training_step_bytes
    from helpers import fake_process_group, local_parameter_bytes

    config = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=12, bias=True, dropout=0.0)
    x = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(0))
    model = GPT(config)
    # per token, in 4-byte words: each block 17*32 + 4 heads + 4, then 32+2 (ln_f) + 32 (lm_head) + 2 (ids)
    # + 2*12 + 2 (log-softmax twice, targets); 8 int64 positions; the loss
    assert activation_bytes(config, 3) == 4 * 24 * (2 * 552 + 34 + 32 + 2 + 26) + 64 + 4
    assert activation_bytes(config, 3) == sum(saved_activation_bytes(model, x, x).values())
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    with fake_process_group(2):
        tp = parallelize(GPT(config), init_device_mesh("cpu", (2,)), "megatron", loss_parallel=True)
        with loss_parallel():
            assert activation_bytes(config, 3, tp=2) == sum(saved_activation_bytes(tp, x, x).values())
        assert 4 * parameter_count(config, tp=2) == local_parameter_bytes(tp)
    # weights, gradients, two AdamW moments; activations; logits and their gradient: at dp=2 half the rows
    assert training_step_bytes(config, 6, tp=2, dp=2) == (16 * parameter_count(config, 2, 2)
                                                         + activation_bytes(config, 3, 2) + 2 * 4 * 3 * 8 * 6)


def _memory_said(rank, world_size, available, *argv):
    """train() with `available` bytes free: (what it said, the error that stopped it or None)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import train as script
    from torch.distributed.device_mesh import init_device_mesh

    script.available_bytes = lambda device: available
    lines = []
    try:
        script.train(script.parse_args(list(argv)), init_device_mesh("cpu", (world_size,)),
                     say=lambda *a, **k: lines.append(" ".join(map(str, a))))
    except ValueError as e:
        return lines, str(e)
    return lines, None


def test_a_step_that_cannot_fit_is_refused_before_it_starts(tmp_path):
    from dtensor_gpt import GPTConfig
    from dtensor_gpt.memory import training_step_bytes
    from helpers import write_text

    write_text(tmp_path / "text.txt")
    config = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=65)
    flags = ["--data", str(tmp_path / "text.txt"), *TINY, "--max-iters", "1", "--eval-iters", "1"]
    need, room = training_step_bytes(config, 1000, tp=2), training_step_bytes(config, 100, tp=2)
    lines, error = run_distributed(_memory_said, 2, room, *flags, "--batch-size", "1000")
    assert lines == [] and error == (
        f"a training step of --batch-size 1000 needs about {need / 1e6:,.0f} MB per process but {room / 1e6:,.0f} MB "
        f"are available to each; use a smaller --batch-size with --gradient-accumulation-steps (e.g. --batch-size 100 "
        f"--gradient-accumulation-steps 10)"), error
    lines, error = run_distributed(_memory_said, 1, 10**12, *flags)
    assert error is None and lines[0].startswith("training iterations 0 to 1 (a step needs about "), lines[:2]
    assert lines[0].endswith("; first an evaluation of 1 batches per split") and lines[1].startswith("step 0:"), lines[:2]
