"""Export both ways: Hugging Face GPT-2 (any model, characters kept) and nanoGPT's out_dir, bit for bit."""

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtensor_gpt import GPT, load_checkpoint, save_checkpoint
from dtensor_gpt.reshard import main as reshard
from dtensor_gpt.sources import open_source
from helpers import exit_status, nanogpt_run, small_config

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = ROOT.parent / "shared" / "nanogpt"
CHARS = [chr(32 + i) for i in range(65)]
TOL = 1e-5


def test_hf_export_of_a_bias_free_character_model(tmp_path):
    """nanoGPT trains without biases by default: zero biases represent such a model exactly."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(small_config(bias=False, vocab_size=65)).eval()
    save_checkpoint(model, str(tmp_path / "native"), extra={"chars": CHARS})
    assert reshard([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["characters.json", "config.json", "model.safetensors"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None, "a character model has no <|endoftext|>"
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx, idx)[0]).abs().max().item() < TOL
    assert open_source(str(tmp_path / "hf")).extra["chars"] == CHARS, "the export reads back with its characters"
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "--checkpoint", str(tmp_path / "hf"),
                        "--prompt", "ROMEO", "--top-k", "1", "--max-new-tokens", "8"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = model.generate(torch.tensor([[CHARS.index(c) for c in "ROMEO"]]), 8, top_k=1)[0].tolist()
    assert r.stdout.split("\n--- ")[0] == "".join(CHARS[i] for i in expected)


def test_hf_export_of_a_gpt2_vocabulary_names_end_of_text(tmp_path):
    torch.manual_seed(0)
    save_checkpoint(GPT(small_config(n_layer=1, n_embd=12, vocab_size=50257)), str(tmp_path / "native"))
    assert reshard([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256 < config["vocab_size"]


def test_nanogpt_round_trip_through_any_degree_is_bit_identical(tmp_path):
    config = small_config(bias=False, vocab_size=65)
    nanogpt_run(tmp_path / "run", config, chars=CHARS)
    original = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    for tp in (1, 3, 4):
        native, back = tmp_path / f"tp{tp}", tmp_path / f"back{tp}"
        assert reshard([str(tmp_path / "run"), str(native), "--tp", str(tp)]) == 0
        assert reshard([str(native), str(back), "--to", "nanogpt"]) == 0
        assert sorted(os.listdir(back)) == ["ckpt.pt", "meta.pkl"]
        again = torch.load(back / "ckpt.pt", weights_only=True)
        assert again["model"].keys() == original["model"].keys()
        for name, t in original["model"].items():
            assert t.dtype == again["model"][name].dtype and torch.equal(t, again["model"][name]), name
        for key in ("model_args", "iter_num", "config"):
            assert again[key] == original[key], key
        assert torch.equal(again["best_val_loss"], original["best_val_loss"])
        state, back_state = original["optimizer"]["state"], again["optimizer"]["state"]
        assert state.keys() == back_state.keys()
        assert all(torch.equal(state[i][k], back_state[i][k]) for i in state for k in state[i])
        assert again["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
        assert pickle.loads((back / "meta.pkl").read_bytes()) == pickle.loads((tmp_path / "run" / "meta.pkl").read_bytes())


@pytest.mark.skipif(not NANOGPT.exists(), reason="needs nanoGPT's own model.py and sample.py in ../shared/nanogpt (the oracle)")
def test_nanogpts_own_scripts_read_the_export(tmp_path):
    """Our own trained checkpoint, exported, loads in nanoGPT's model.py (strict) and samples with its sample.py."""
    torch.manual_seed(0)
    model = GPT(small_config(vocab_size=65)).eval()
    save_checkpoint(model, str(tmp_path / "native"), extra={"chars": CHARS, "dataset": "mine", "iter": 7})
    out = tmp_path / "nanogpt" / "out"
    out.parent.mkdir()  # the converter writes beside DST, into a folder that exists
    assert reshard([str(tmp_path / "native"), str(out), "--to", "nanogpt"]) == 0
    sys.path.insert(0, str(NANOGPT))
    try:
        import model as nanogpt
    finally:
        sys.path.remove(str(NANOGPT))
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 7 and ckpt["config"]["dataset"] == "mine"
    theirs = nanogpt.GPT(nanogpt.GPTConfig(**ckpt["model_args"])).eval()
    theirs.load_state_dict(ckpt["model"])
    idx = torch.randint(0, 65, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (theirs(idx, idx)[0] - model(idx, idx)[0]).abs().max().item() < TOL
    work = tmp_path / "nanogpt"
    for name in ("sample.py", "configurator.py", "model.py"):
        shutil.copy(NANOGPT / name, work / name)
    (work / "data" / "mine").mkdir(parents=True)
    shutil.copy(out / "meta.pkl", work / "data" / "mine" / "meta.pkl")  # where sample.py looks for it
    r = subprocess.run([sys.executable, "sample.py", "--out_dir=out", "--device=cpu", "--compile=False",
                        "--num_samples=1", "--max_new_tokens=20", "--start=ROMEO"],
                       capture_output=True, text=True, cwd=work, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Loading meta from data/mine/meta.pkl" in r.stdout and "ROMEO" in r.stdout


def test_export_refuses_tp_and_foreign_destinations(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(GPT(small_config()), str(tmp_path / "native"))
    assert exit_status(reshard, [str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf", "--tp", "4"]) == 2
    assert "--tp 4 applies to --to native only" in capsys.readouterr().err
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "config.json").write_text("{}")
    (tmp_path / "site" / "index.html").write_text("<p>keep me</p>")
    assert exit_status(reshard, [str(tmp_path / "native"), str(tmp_path / "site"), "--to", "hf", "--overwrite"]) == 2
    assert "holds ['index.html'], which a --to hf export does not write" in capsys.readouterr().err
    assert (tmp_path / "site" / "index.html").read_text() == "<p>keep me</p>"
    assert reshard([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert reshard([str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf", "--overwrite"]) == 0


def test_loaded_nanogpt_optimizer_state_is_the_runs(tmp_path):
    """AdamW's moments from a nanoGPT ckpt.pt land on the parameters nanoGPT's grouping gives them."""
    config = small_config(vocab_size=65)
    model, optimizer = nanogpt_run(tmp_path / "run", config)
    torch.manual_seed(1)
    fresh = GPT(config)
    params = dict(fresh.named_parameters())
    mine = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2]},
                              {"params": [p for p in params.values() if p.dim() < 2]}])
    load_checkpoint(fresh, str(tmp_path / "run"), optimizer=mine)
    theirs = {n: optimizer.state[p] for n, p in model.named_parameters()}
    for name, p in params.items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine.state[p][key], theirs[name][key]), (name, key)


def test_destination_apart_from_the_source(tmp_path, capsys):
    """The source itself, a folder holding it, or one inside it, links resolved, are never a destination."""
    torch.manual_seed(0)
    save_checkpoint(GPT(small_config()), str(tmp_path / "ckpt"))
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")
    for dst, relation in ((tmp_path / "alias", "is the source"), (tmp_path, "holds the source"),
                          (tmp_path / "ckpt" / "inner", "lies inside the source")):
        assert exit_status(reshard, [str(tmp_path / "ckpt"), str(dst), "--overwrite"]) == 2
        assert relation in capsys.readouterr().err
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    assert exit_status(reshard, [str(tmp_path / "ckpt"), str(tmp_path / "link"), "--overwrite"]) == 2
    assert "is a symbolic link; refusing to replace it" in capsys.readouterr().err
    load_checkpoint(GPT(small_config()), str(tmp_path / "ckpt"))  # untouched


def test_a_full_disk_is_one_error_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Too little room is refused before writing; a device that fills up while writing leaves no temporary."""
    import errno
    import shutil as shutil_module
    from collections import namedtuple

    from dtensor_gpt import publish, safetensors_stream
    from dtensor_gpt.format import CheckpointError

    torch.manual_seed(0)
    model = GPT(small_config())
    save_checkpoint(model, str(tmp_path / "ckpt"))
    real = shutil_module.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(publish.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    assert reshard([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--tp", "2"]) == 1
    err = capsys.readouterr().err
    assert "no space for" in err and "0.0 MB free; free some space or write elsewhere" in err, err
    with pytest.raises(CheckpointError, match=r"no space for .*again: it needs 0.9 MB"):
        save_checkpoint(model, str(tmp_path / "again"))
    monkeypatch.setattr(publish.shutil, "disk_usage", real)

    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_stream.StreamingWriter, "write", full)
    assert reshard([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--tp", "2"]) == 1
    assert "the device ran out of space while writing" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="the device ran out of space while writing .*again: it needs 0.9 MB"):
        save_checkpoint(model, str(tmp_path / "again"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary is left behind"
