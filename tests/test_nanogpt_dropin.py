"""
dtensor_gpt/model.py is a drop-in for nanoGPT's model.py: nanoGPT's own train.py and sample.py
run unchanged with it and print what they print with nanoGPT's model.py; its methods agree with
nanoGPT's and, after `parallelize`, configure_optimizers steps like the single-device model.
"""

import copy
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, parallelize
from helpers import write_text

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = ROOT.parent / "shared" / "nanogpt"
needs_nanogpt = pytest.mark.skipif(not NANOGPT.is_dir(), reason=f"needs nanoGPT's files in {NANOGPT}")

# nanoGPT's shakespeare_char config, shrunk to a few seconds on CPU
TRAIN = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--dtype=float32",
         "--block_size=32", "--batch_size=4", "--n_layer=2", "--n_head=2", "--n_embd=32", "--dropout=0.0",
         "--max_iters=20", "--lr_decay_iters=20", "--warmup_iters=5", "--eval_interval=10", "--eval_iters=5",
         "--log_interval=1", "--always_save_checkpoint=True", "--out_dir=out"]
SAMPLE = ["--out_dir=out", "--device=cpu", "--compile=False", "--dtype=float32", "--num_samples=2",
          "--max_new_tokens=50", "--start=ROMEO:", "--seed=7"]  # 6 + 50 characters: past block_size 32


def nanogpt_directory(path, model_source, data):
    """nanoGPT's scripts, configs and prepared data in `path`, with `model_source` as model.py."""
    path.mkdir()
    for name in ("train.py", "sample.py", "configurator.py"):
        shutil.copy(NANOGPT / name, path / name)
    shutil.copytree(NANOGPT / "config", path / "config")
    shutil.copytree(data, path / "data" / "shakespeare_char")
    shutil.copy(model_source, path / "model.py")
    return path


def run(directory, script, *args, env=None):
    """A nanoGPT script, unchanged, run in `directory` on one thread with the Hugging Face hub offline."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, script, *args], cwd=directory, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def losses(stdout):
    """The losses train.py prints: 'step N: train loss X, val loss Y' and 'iter N: loss X'."""
    return (re.findall(r"^step \d+: train loss [\d.]+, val loss [\d.]+$", stdout, re.M),
            re.findall(r"^iter \d+: loss [\d.]+", stdout, re.M))


def max_difference(a, b):
    """Largest |a - b| over two nested dicts/lists of tensors with the same structure."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max((max_difference(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max((max_difference(x, y) for x, y in zip(a, b)), default=0.0)
    assert a == b
    return 0.0


def checkpoint(directory):
    return torch.load(directory / "out" / "ckpt.pt", weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """nanoGPT's train.py run with our model.py and with nanoGPT's own, from one prepared dataset."""
    tmp = tmp_path_factory.mktemp("nanogpt")
    data = tmp / "data"
    data.mkdir()
    shutil.copy(NANOGPT / "data" / "shakespeare_char" / "prepare.py", data / "prepare.py")
    write_text(data / "input.txt")  # 65 characters, as the corpus; prepare.py downloads only when input.txt is missing
    assert "vocab size: 65" in ok(run(data, "prepare.py"))
    ours = nanogpt_directory(tmp / "ours", ROOT / "dtensor_gpt" / "model.py", data)
    oracle = nanogpt_directory(tmp / "oracle", NANOGPT / "model.py", data)
    ours_out, oracle_out = ok(run(ours, "train.py", *TRAIN)), ok(run(oracle, "train.py", *TRAIN))
    return dict(ours=ours, oracle=oracle, data=data, ours_out=ours_out, oracle_out=oracle_out,
                ours_ckpt=checkpoint(ours), oracle_ckpt=checkpoint(oracle))


@needs_nanogpt
def test_train_py_unchanged_gives_nanogpts_losses_and_weights(trained):
    steps, iters = losses(trained["ours_out"])
    assert len(steps) == 3 and len(iters) == 21, trained["ours_out"][-2000:]
    assert (steps, iters) == losses(trained["oracle_out"])
    assert steps[0] != steps[-1], "the model must actually train for the comparison to mean anything"
    for line in ("num decayed parameter tensors: 10, with 27,680 parameters",
                 "num non-decayed parameter tensors: 5, with 160 parameters", "using fused AdamW: False"):
        assert line in trained["ours_out"] and line in trained["oracle_out"]
    ours, oracle = trained["ours_ckpt"], trained["oracle_ckpt"]
    assert ours["model_args"] == oracle["model_args"] and ours["iter_num"] == oracle["iter_num"] == 20
    assert max_difference(ours["model"], oracle["model"]) <= 1e-6
    assert max_difference(ours["optimizer"], oracle["optimizer"]) <= 1e-6


@needs_nanogpt
def test_sample_py_unchanged_gives_nanogpts_text(trained):
    ours = ok(run(trained["ours"], "sample.py", *SAMPLE))
    oracle = ok(run(trained["oracle"], "sample.py", *SAMPLE))
    meta = "Loading meta from data/shakespeare_char/meta.pkl...\n"
    samples = ours.split(meta)[1]
    assert samples.count("---------------") == 2 and samples.startswith("ROMEO:") and len(samples) > 2 * 56
    assert samples == oracle.split(meta)[1]


@needs_nanogpt
def test_train_py_resumes_from_its_checkpoint_like_nanogpt(trained):
    resume = [*TRAIN, "--init_from=resume", "--max_iters=30"]
    ours = ok(run(trained["ours"], "train.py", *resume))
    oracle = ok(run(trained["oracle"], "train.py", *resume))
    assert "Resuming training from out" in ours
    steps, iters = losses(ours)
    assert [s.split(":")[0] for s in steps] == ["step 20", "step 30"] and len(iters) == 11
    assert (steps, iters) == losses(oracle)
    ours, oracle = checkpoint(trained["ours"]), checkpoint(trained["oracle"])
    assert ours["iter_num"] == oracle["iter_num"] == 30
    assert max_difference(ours["model"], oracle["model"]) <= 1e-6


@needs_nanogpt
def test_train_py_init_from_gpt2_offline_says_how_to_get_the_weights(trained, tmp_path):
    directory = nanogpt_directory(tmp_path / "run", ROOT / "dtensor_gpt" / "model.py", trained["data"])
    result = run(directory, "train.py", *TRAIN, "--init_from=gpt2", env={"HF_HOME": str(tmp_path / "hf-home")})
    assert result.returncode != 0
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("OSError: cannot load GPT-2 weights from 'gpt2'"), result.stderr[-2000:]
    assert "`hf download gpt2 --local-dir gpt2`" in error and "pass its path" in error


def tiny_gpt2(directory, safetensors=True, **config):
    """A random Hugging Face GPT-2 saved in `directory`; exact GELU, as this model computes."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**{**dict(n_layer=2, n_head=2, n_embd=32, vocab_size=96, n_positions=64,
                                              activation_function="gelu"), **config})).eval()
    if safetensors:
        hf.save_pretrained(directory)
    else:
        hf.config.save_pretrained(directory)
        torch.save(hf.state_dict(), Path(directory) / "pytorch_model.bin")
    assert (Path(directory) / ("model.safetensors" if safetensors else "pytorch_model.bin")).exists()
    return hf


@needs_nanogpt
def test_train_py_init_from_a_local_gpt2_directory_crops_it(trained, tmp_path):
    directory = nanogpt_directory(tmp_path / "run", ROOT / "dtensor_gpt" / "model.py", trained["data"])
    hf = tiny_gpt2(directory / "gpt2")  # a directory named gpt2 is what init_from='gpt2' finds
    frozen = ["--init_from=gpt2", "--learning_rate=0.0", "--min_lr=0.0", "--max_iters=1", "--eval_interval=1"]
    out = ok(run(directory, "train.py", *TRAIN, *frozen))
    assert "from its config.json: n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=96, bias=True" in out
    saved = checkpoint(directory)
    assert saved["model_args"] == dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=True,
                                       vocab_size=96, dropout=0.0)
    sd_hf = hf.state_dict()
    for name, value in saved["model"].items():
        expected = sd_hf[name].t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else sd_hf[name]
        expected = expected[:32] if name == "transformer.wpe.weight" else expected
        assert torch.equal(value, expected), name


@pytest.mark.parametrize("safetensors", [True, False], ids=["model.safetensors", "pytorch_model.bin"])
def test_from_pretrained_local_directory_matches_transformers(tmp_path, capsys, safetensors):
    hf = tiny_gpt2(tmp_path / "gpt2-tiny", safetensors)
    model = GPT.from_pretrained(str(tmp_path / "gpt2-tiny"), dict(dropout=0.1))
    assert "overriding dropout rate to 0.1" in capsys.readouterr().out
    assert (model.config.n_layer, model.config.block_size, model.config.vocab_size, model.config.bias,
            model.config.dropout) == (2, 64, 96, True, 0.1)
    idx = torch.randint(0, 96, (2, 64), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        logits, _ = model(idx, idx)
        expected = hf(idx)
    assert (logits - expected.logits).abs().max().item() < 1e-5
    with torch.no_grad():
        last, _ = model(idx)
    assert (last[:, -1] - expected.logits[:, -1]).abs().max().item() < 1e-5


def test_from_pretrained_notes_gpt2s_tanh_gelu_and_refuses_other_overrides(tmp_path, capsys):
    tiny_gpt2(tmp_path / "gpt2-tiny", activation_function="gelu_new")
    GPT.from_pretrained(str(tmp_path / "gpt2-tiny"))
    assert "activation_function='gelu_new'; this model uses the exact GELU" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="only dropout can be overridden"):
        GPT.from_pretrained(str(tmp_path / "gpt2-tiny"), dict(n_layer=1))


def test_from_pretrained_without_transformers_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match="with Hugging Face transformers, which is not installed: pip install"):
        GPT.from_pretrained("gpt2")


@pytest.fixture(scope="module")
def nanogpt_model(tmp_path_factory):
    """nanoGPT's own model.py, imported from a copy."""
    path = tmp_path_factory.mktemp("oracle") / "model.py"
    shutil.copy(NANOGPT / "model.py", path)
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def both_models(nanogpt_model, **config):
    """Our GPT and nanoGPT's from one seed: the same initial weights."""
    config = {**dict(block_size=32, vocab_size=65, n_layer=2, n_head=2, n_embd=32, bias=False), **config}
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**config))
    torch.manual_seed(0)
    theirs = nanogpt_model.GPT(nanogpt_model.GPTConfig(**config))
    assert max_difference(ours.state_dict(), theirs.state_dict()) == 0
    return ours, theirs


@needs_nanogpt
def test_crop_block_size_matches_nanogpt(nanogpt_model):
    ours, theirs = both_models(nanogpt_model)
    ours.crop_block_size(12)
    theirs.crop_block_size(12)
    assert ours.config.block_size == 12 and ours.transformer.wpe.weight.shape == (12, 32)
    assert max_difference(ours.state_dict(), theirs.state_dict()) == 0
    idx = torch.randint(0, 65, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours(idx, idx)[1], theirs(idx, idx)[1])
    with pytest.raises(AssertionError):
        ours(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(AssertionError):
        ours.crop_block_size(13)


@needs_nanogpt
def test_estimate_mfu_and_num_params_match_nanogpt(nanogpt_model):
    ours, theirs = both_models(nanogpt_model)
    for non_embedding in (True, False):
        assert ours.get_num_params(non_embedding) == theirs.get_num_params(non_embedding)
    assert ours.estimate_mfu(fwdbwd_per_iter=4, dt=0.25) == theirs.estimate_mfu(4, 0.25)
    # by hand: N = 27,840 parameters less 32 x 32 position ones; 4 passes of 32 tokens in 0.25 s, 312 TFLOPS
    n = 27_840 - 32 * 32
    assert ours.estimate_mfu(4, 0.25) == pytest.approx((6 * n + 12 * 2 * 2 * 16 * 32) * 32 * 4 / 0.25 / 312e12)


@needs_nanogpt
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_configure_optimizers_matches_nanogpt(nanogpt_model, capsys, device_type):
    """device_type 'cuda' chooses the fused kernel, which torch also has on CPU."""
    ours, theirs = both_models(nanogpt_model, bias=True)
    capsys.readouterr()
    mine = ours.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    printed = capsys.readouterr().out
    reference = theirs.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    assert printed == capsys.readouterr().out
    assert f"using fused AdamW: {device_type == 'cuda'}" in printed
    for group, expected in zip(mine.param_groups, reference.param_groups, strict=True):
        assert [p.shape for p in group["params"]] == [p.shape for p in expected["params"]]
        assert {k: v for k, v in group.items() if k != "params"} == {k: v for k, v in expected.items() if k != "params"}
    idx = torch.randint(0, 65, (4, 32), generator=torch.Generator().manual_seed(1))
    for model, optimizer in ((ours, mine), (theirs, reference)):
        for _ in range(3):
            model(idx, idx)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    assert max_difference(ours.state_dict(), theirs.state_dict()) == 0


def _optimizer_steps_at_tp(rank, world_size):
    """
    One model, single-device and parallelized (megatron: matrices DTensors, LayerNorm weights
    and row-parallel biases plain), two AdamW steps each from configure_optimizers (for-loop
    or fused) or foreach, in float64. In float32 the parallel gradients differ by rounding
    (about 4e-9), and Adam divides each by its own magnitude plus eps = 1e-8, so elements
    whose gradient is near 1e-8 step differently by up to about 1e-6 at this learning rate
    (measured: 0.8e-6 to 1.1e-6), whichever optimizer; float64 leaves only the optimizer.
    """
    torch.manual_seed(0)
    reference = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)).double()
    mesh = init_device_mesh("cpu", (world_size,))
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))

    def foreach(model):
        groups = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu").param_groups
        return torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                 lr=6e-4, betas=(0.9, 0.95), foreach=True)

    makers = {"for-loop": lambda m: m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu"),
              "fused": lambda m: m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cuda"),
              "foreach": foreach}
    result = {}
    for name, make in makers.items():
        single, parallel = copy.deepcopy(reference), parallelize(copy.deepcopy(reference), mesh, "megatron")
        kinds = {isinstance(p, DTensor) for p in parallel.parameters()}
        for model in (single, parallel):
            optimizer = make(model)
            assert bool(optimizer.defaults["fused"]) == (name == "fused")
            for _ in range(2):
                model(idx, targets)[1].backward()
                optimizer.step()
                optimizer.zero_grad()
        ref = dict(single.named_parameters())
        result[name] = dict(
            mixed=kinds == {True, False},
            error=max((p.full_tensor() if isinstance(p, DTensor) else p).sub(ref[n]).abs().max().item()
                      for n, p in parallel.named_parameters()),
            moved=max((p - r).abs().max().item() for p, r in zip(single.parameters(), reference.parameters())))
    return result


def test_configure_optimizers_on_a_parallelized_model_steps_like_one_device():
    result = run_distributed(_optimizer_steps_at_tp, 2)
    assert set(result) == {"for-loop", "fused", "foreach"}
    for name, r in result.items():
        assert r["mixed"], "the plan must leave some parameters plain for this test to mean anything"
        assert r["moved"] > 1e-4, f"{name}: the step must move the parameters"
        assert r["error"] <= 1e-12, f"{name} AdamW at TP=2 departs from one device by {r['error']}"
