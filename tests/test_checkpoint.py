"""Checkpoints: any TP degree in, any out, byte-identical round trips, 1/TP reads, clear failures."""

import errno
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt import layout
from dtensor_gpt.checkpoint import CheckpointError
from dtensor_gpt.reshard import main as reshard
from helpers import exit_status, fake_process_group, resumed_adamw, small_config

TOL = 1e-5


def _save(rank, world_size, path, plan):
    torch.manual_seed(0)
    model = GPT(small_config())
    if world_size > 1:
        parallelize(model, init_device_mesh("cpu", (world_size,)), plan)
    save_checkpoint(model, path)
    return sorted(os.listdir(path))


def _load_and_compare(rank, world_size, path, plan):
    torch.manual_seed(0)
    reference = GPT(small_config())
    torch.manual_seed(1)  # different weights until the checkpoint is loaded
    model = parallelize(GPT(small_config()), init_device_mesh("cpu", (world_size,)), plan)
    stats = load_checkpoint(model, path)
    idx = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (model(idx)[0] - reference(idx)[0]).abs().max().item()
    return diff, stats["bytes_read"], model.lm_head.weight is model.transformer.wte.weight


def expected_bytes_read(config, tp):
    """Each rank reads its 1/TP of the sharded tensors and all of the replicated ones, once."""
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    sharded = V * C + L * (3 * C * C + 3 * C + C * C + 4 * C * C + 4 * C + 4 * C * C)
    replicated = config.block_size * C + L * 6 * C + 2 * C
    return 4 * (sharded // tp + replicated)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Checkpoints of one model saved at TP 1, 2, 3 and 4 (megatron, megatron, megatron-sp, spd)."""
    root = tmp_path_factory.mktemp("ckpt")
    plans = {1: "megatron", 2: "megatron", 3: "megatron-sp", 4: "spd"}
    for n, plan in plans.items():
        files = run_distributed(_save, n, str(root / f"tp{n}"), plan)
        assert files == ["index.json"] + [f"model-rank{r:05d}-of-{n:05d}.safetensors" for r in range(n)]
    return root


def test_layout_table_matches_every_plan():
    with fake_process_group(2):
        for plan in ("megatron", "megatron-sp", "spd"):
            model = parallelize(GPT(small_config()), init_device_mesh("cpu", (2,)), plan)
            for name, p in model.named_parameters():
                assert layout.split_of(p) == layout.canonical_split(name), (plan, name)


@pytest.mark.parametrize("n, m", [(1, 2), (2, 3), (3, 4), (4, 1), (2, 2)])
def test_load_any_degree_into_any_degree(saved, n, m):
    diff, bytes_read, tied = run_distributed(_load_and_compare, m, str(saved / f"tp{n}"), "megatron")
    assert diff < TOL and tied
    assert bytes_read == expected_bytes_read(small_config(), m)


def test_converted_checkpoint_loads_at_its_degree(saved, tmp_path):
    assert reshard([str(saved / "tp2"), str(tmp_path / "tp3"), "--tp", "3"]) == 0
    diff, bytes_read, _ = run_distributed(_load_and_compare, 3, str(tmp_path / "tp3"), "megatron-sp")
    assert diff < TOL and bytes_read == expected_bytes_read(small_config(), 3)


def test_round_trip_is_byte_identical(saved, tmp_path):
    for n in (1, 2, 3, 4):
        for m in (1, 2, 3, 4, 6):
            there, back = tmp_path / f"{n}-{m}", tmp_path / f"{n}-{m}-{n}"
            assert reshard([str(saved / f"tp{n}"), str(there), "--tp", str(m)]) == 0
            assert reshard([str(there), str(back), "--tp", str(n), "--verify"]) == 0
            files = sorted(os.listdir(saved / f"tp{n}"))
            assert sorted(os.listdir(back)) == files
            _, mismatch, errors = filecmp.cmpfiles(saved / f"tp{n}", back, files, shallow=False)
            assert not mismatch and not errors, (n, m, mismatch)


def test_huggingface_gpt2_import_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=101,
                                     activation_function="gelu", resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert reshard([str(tmp_path / "hf"), str(tmp_path / "tp2"), "--tp", "2"]) == 0
    index = json.loads((tmp_path / "tp2" / "index.json").read_text())
    assert index["config"]["vocab_size"] == 101  # no padding: 51 and 50 rows
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
    ours = GPT(GPTConfig(**index["config"]))
    load_checkpoint(ours, str(tmp_path / "tp2"))
    with torch.no_grad():
        assert (ours(idx, idx)[0] - expected).abs().max().item() < TOL
    r = run_distributed(_hf_at_tp2, 2, str(tmp_path / "tp2"), index["config"], idx)
    assert (r - expected[:, -1:]).abs().max().item() < TOL
    assert reshard([str(tmp_path / "tp2"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert back.config.vocab_size == 101
        assert (back(idx).logits - expected).abs().max().item() < TOL


def _hf_at_tp2(rank, world_size, path, config, idx):
    model = parallelize(GPT(GPTConfig(**config)), init_device_mesh("cpu", (world_size,)))
    load_checkpoint(model, path)
    with torch.no_grad():
        return model(idx)[0].clone()


def test_nanogpt_import(tmp_path):
    torch.manual_seed(0)
    config = small_config(bias=False)
    model = GPT(config)
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    torch.save({"model_args": dict(n_layer=2, n_head=12, n_embd=96, block_size=32, bias=False, vocab_size=96, dropout=0.0),
                "model": state, "iter_num": 5000, "best_val_loss": torch.tensor(1.47)}, tmp_path / "ckpt.pt")
    assert reshard([str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--tp", "3"]) == 0
    loaded = GPT(config)
    load_checkpoint(loaded, str(tmp_path / "out"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_nanogpt_loading_runs_no_code(tmp_path, capsys):
    torch.save({"model_args": {}, "model": {}, "x": Payload()}, tmp_path / "evil.pt")
    assert reshard([str(tmp_path / "evil.pt"), str(tmp_path / "out")]) == 1
    assert "is not a loadable nanoGPT checkpoint" in capsys.readouterr().err
    assert not os.path.exists("PWNED") and not (tmp_path / "out").exists()


def _spoil(path, how):
    rank1 = path / "model-rank00001-of-00002.safetensors"
    if how == "missing":
        rank1.unlink()
    elif how == "truncated":
        rank1.write_bytes(rank1.read_bytes()[:-100])
    elif how == "flipped":
        data = bytearray(rank1.read_bytes())
        data[-5] ^= 0xFF
        rank1.write_bytes(bytes(data))
    elif how == "index-shape":
        index = json.loads((path / "index.json").read_text())
        index["tensors"]["transformer.h.0.mlp.c_fc.weight"]["shape"] = [388, 96]
        (path / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("how, message, verify", [
    ("missing", r"model-rank00001-of-00002.safetensors is missing: the checkpoint has tp=2", False),
    ("truncated", r"model-rank00001-of-00002.safetensors is truncated or corrupted", False),
    ("flipped", r"model-rank00001-of-00002.safetensors: sha256 differs from index.json", True),
    ("index-shape", r"index.json is not the index model-rank00000-of-00002.safetensors was written with", False),
])
def test_damaged_checkpoints_are_refused(saved, tmp_path, capsys, how, message, verify):
    shutil.copytree(saved / "tp2", tmp_path / "ck")
    _spoil(tmp_path / "ck", how)
    assert reshard([str(tmp_path / "ck"), str(tmp_path / "out")] + (["--verify"] if verify else [])) == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(GPT(small_config()), str(tmp_path / "ck"), verify=verify)
    assert not (tmp_path / "out").exists()


def test_files_from_another_checkpoint(saved, tmp_path):
    shutil.copytree(saved / "tp2", tmp_path / "a")
    assert reshard([str(saved / "tp1"), str(tmp_path / "b"), "--tp", "2"]) == 0
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    index["id"] = "f" * 32  # same weights, another checkpoint
    (tmp_path / "b" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"belongs to checkpoint '.*', not 'f{32}' of index.json"):
        load_checkpoint(GPT(small_config()), str(tmp_path / "b"))


def test_rank_file_of_another_degree(saved, tmp_path):
    shutil.copytree(saved / "tp2", tmp_path / "ck")
    assert reshard([str(saved / "tp2"), str(tmp_path / "tp4"), "--tp", "4"]) == 0
    shutil.copy(tmp_path / "tp4" / "model-rank00001-of-00004.safetensors", tmp_path / "ck" / "model-rank00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match=r"model-rank00001-of-00002.safetensors says rank 1 of tp=4"):
        load_checkpoint(GPT(small_config()), str(tmp_path / "ck"))


def test_model_mismatches_are_refused(saved):
    with pytest.raises(CheckpointError, match=r"a model with n_layer=2, but this model has n_layer=3"):
        load_checkpoint(GPT(small_config(n_layer=3)), str(saved / "tp1"))
    with pytest.raises(CheckpointError, match=r"a model with bias=False, but this model has bias=True"):
        load_checkpoint(GPT(small_config(bias=True)), str(_no_bias(saved)))
    with pytest.raises(CheckpointError, match=r"tensors missing from the checkpoint \['transformer.ln_f.bias'\]"):
        load_checkpoint(GPT(small_config()), str(_without_ln_f_bias(saved)))
    with pytest.raises(CheckpointError, match=r"is F32 in the checkpoint but torch.bfloat16 in the model"):
        load_checkpoint(GPT(small_config()).to(torch.bfloat16), str(saved / "tp1"))


def _no_bias(saved):
    path = saved / "nobias"
    if not path.exists():
        torch.manual_seed(0)
        save_checkpoint(GPT(small_config(bias=False)), str(path))
    return path


def _without_ln_f_bias(saved):
    path = saved / "no_ln_f_bias"
    if not path.exists():
        model = GPT(small_config())
        model.transformer.ln_f.bias = None
        save_checkpoint(model, str(path))
    return path


def test_overwrite_replaces_only_a_checkpoint(saved, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "precious.txt").write_text("keep me")
    assert exit_status(reshard, [str(saved / "tp1"), str(tmp_path / "notes"), "--overwrite"]) == 2
    assert "is not a checkpoint of this project (no readable index.json" in capsys.readouterr().err
    assert (tmp_path / "notes" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"], "the unfinished save is cleaned up"


def test_cli_refusals(saved, tmp_path, capsys):
    assert exit_status(reshard, [str(saved / "tp1"), str(saved / "tp2")]) == 2
    assert "tp2 exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert exit_status(reshard, [str(saved / "tp1"), str(tmp_path / "x"), "--tp", "5"]) == 2
    assert "n_head=12 is not divisible by tp=5; use tp in {1, 2, 3, 4, 6, 12}" in capsys.readouterr().err
    assert exit_status(reshard, [str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err
    shutil.copytree(saved / "tp1", tmp_path / "z")
    assert reshard([str(saved / "tp2"), str(tmp_path / "z"), "--tp", "2", "--overwrite"]) == 0
    assert json.loads((tmp_path / "z" / "index.json").read_text())["tp"] == 2


def test_bf16_conversion(saved, tmp_path):
    assert reshard([str(saved / "tp2"), str(tmp_path / "bf16"), "--tp", "1", "--dtype", "bf16"]) == 0
    model = GPT(small_config()).to(torch.bfloat16)
    load_checkpoint(model, str(tmp_path / "bf16"))
    torch.manual_seed(0)
    reference = GPT(small_config())
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, reference.transformer.h[1].mlp.c_fc.weight.to(torch.bfloat16))


def test_killed_conversion_leaves_no_destination(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(GPT(GPTConfig(n_layer=24, n_head=8, n_embd=512, vocab_size=256, block_size=64)), str(tmp_path / "big"))
    proc = subprocess.Popen([sys.executable, "-m", "dtensor_gpt.reshard", str(tmp_path / "big"), str(tmp_path / "out"), "--tp", "4"])
    deadline = time.time() + 60
    while not any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir()) and time.time() < deadline:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "out").exists(), "a killed conversion must not leave a destination"
    assert reshard([str(tmp_path / "big"), str(tmp_path / "out"), "--tp", "4"]) == 0  # a rerun succeeds
    assert f"left by a save or conversion that was killed (pid {proc.pid})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "out"], "the rerun removes the killed one's files"


def test_save_killed_while_replacing_is_restored(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(small_config())
    save_checkpoint(model, str(tmp_path / "ckpt"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".ckpt.tmp-{dead.pid}@{socket.gethostname()}-0123abcd.old"
    (tmp_path / "ckpt").rename(aside)  # where a save killed between its two renames leaves the old checkpoint
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        save_checkpoint(GPT(small_config()), str(tmp_path / "ckpt"))
    assert f"restored {tmp_path / 'ckpt'}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    restored = GPT(small_config())
    load_checkpoint(restored, str(tmp_path / "ckpt"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_a_failed_replacement_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """The second rename (new into place) fails after the first moved the old one aside: it goes back to `path`."""
    torch.manual_seed(0)
    model = GPT(small_config())
    save_checkpoint(model, str(tmp_path / "ckpt"))
    renames, rename = [], os.rename

    def second_fails(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    torch.manual_seed(1)
    with pytest.raises(CheckpointError, match=f"saving {tmp_path / 'ckpt'} failed on rank 0: OSError: .*cross-device"):
        save_checkpoint(GPT(small_config()), str(tmp_path / "ckpt"), overwrite=True)
    assert len(renames) == 3 and renames[2] == renames[0][::-1], "the old checkpoint is renamed back"
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "no temporary directory, nothing moved aside"
    restored = GPT(small_config())
    load_checkpoint(restored, str(tmp_path / "ckpt"), verify=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def _save_over_non_checkpoint(rank, world_size, path):
    torch.manual_seed(0)
    model = parallelize(GPT(small_config()), init_device_mesh("cpu", (world_size,)))
    try:
        save_checkpoint(model, path, overwrite=True)
    except CheckpointError as e:
        return str(e)
    return None


def test_failed_save_fails_on_every_rank(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "precious.txt").write_text("keep me")
    message = run_distributed(_save_over_non_checkpoint, 2, str(tmp_path / "notes"))
    assert "is not a checkpoint of this project (no readable index.json" in message
    assert (tmp_path / "notes" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"], "the unfinished save is cleaned up"


def test_tanh_gelu_weights_are_announced(tmp_path, capsys):
    """GPT-2's own weights use gelu_new; the converter and generate.py both say so (one message)."""
    transformers = pytest.importorskip("transformers")
    from dtensor_gpt.sources import activation_note, open_source

    for activation in ("gelu_new", "gelu"):
        config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=64,
                                         activation_function=activation)
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / activation)
    assert "uses gelu_new (tanh-approximated GELU)" in activation_note(open_source(str(tmp_path / "gelu_new")), "x")
    assert activation_note(open_source(str(tmp_path / "gelu")), "x") is None
    assert reshard([str(tmp_path / "gelu_new"), str(tmp_path / "native")]) == 0
    assert "uses gelu_new (tanh-approximated GELU)" in capsys.readouterr().err


def _save_with_a_full_disk_on_rank_1(rank, world_size, path):
    import errno

    from dtensor_gpt import safetensors_stream

    if rank == 1:
        def full(self, name, tensor):
            raise OSError(errno.ENOSPC, "No space left on device")
        safetensors_stream.StreamingWriter.write = full
    torch.manual_seed(0)
    model = parallelize(GPT(small_config()), init_device_mesh("cpu", (world_size,)))
    try:
        save_checkpoint(model, path)
    except CheckpointError as e:
        return str(e)
    return None


def test_a_full_disk_on_one_rank_fails_every_rank(tmp_path):
    message = run_distributed(_save_with_a_full_disk_on_rank_1, 2, str(tmp_path / "ckpt"))
    assert message and "the device ran out of space while writing" in message, "rank 0 learns of rank 1's failure"
    assert list(tmp_path.iterdir()) == [], "nothing partial remains"


FAILURES = [("clean_stale_temporaries", 0, PermissionError), ("makedirs", 0, PermissionError),
            ("write", 0, ValueError), ("write", 1, RuntimeError)]


def _save_failing_on_one_rank(rank, world_size, root):
    """
    save_checkpoint under each of FAILURES: its step raising its error on its rank only. Each
    rank's CheckpointError, per case, is written to root/messages.
    """
    from dtensor_gpt import checkpoint, safetensors_stream

    def fail(error):
        def raising(*args, **kwargs):
            raise error("injected")
        return raising

    torch.manual_seed(0)
    model = parallelize(GPT(small_config()), init_device_mesh("cpu", (world_size,)))
    places = {"clean_stale_temporaries": (checkpoint, "clean_stale_temporaries"), "makedirs": (os, "makedirs"),
              "write": (safetensors_stream.StreamingWriter, "write")}
    for case, (step, failing_rank, error) in enumerate(FAILURES):
        owner, attribute = places[step]
        original = getattr(owner, attribute)
        if rank == failing_rank:
            setattr(owner, attribute, fail(error))
        try:
            save_checkpoint(model, os.path.join(root, f"out{case}", "ckpt"))
            message = "saved"
        except CheckpointError as e:
            message = str(e)
        finally:
            setattr(owner, attribute, original)
        with open(os.path.join(root, "messages", f"case{case}-rank{rank}"), "w") as f:
            f.write(message)


def test_a_failure_on_one_rank_fails_every_rank_alike(tmp_path):
    """
    Every rank raises the failing rank's one line, none left waiting at a collective (a
    60 s process-group timeout would fail the test), and nothing of the save remains: for a
    failure in rank 0's clean-up, in its making of the directory, and in either rank's writing.
    """
    (tmp_path / "messages").mkdir()
    for case in range(len(FAILURES)):
        (tmp_path / f"out{case}").mkdir()
    run_distributed(_save_failing_on_one_rank, 2, str(tmp_path), timeout=60)
    for case, (step, failing_rank, error) in enumerate(FAILURES):
        path = str(tmp_path / f"out{case}" / "ckpt")
        messages = [(tmp_path / "messages" / f"case{case}-rank{r}").read_text() for r in range(2)]
        assert messages == [f"saving {path} failed on rank {failing_rank}: {error.__name__}: injected"] * 2, step
        assert list((tmp_path / f"out{case}").iterdir()) == [], f"{step}: no checkpoint and no temporary directory remain"


def _open_files(path):
    """Descriptors this process holds, and memory maps of files under `path`."""
    with open("/proc/self/maps") as maps:
        return len(os.listdir("/proc/self/fd")), sum(str(path) in line for line in maps)


def test_loads_leave_no_file_open(tmp_path):
    """100 loads and reads hold nothing open after them; a closed or refused source holds no map of its files."""
    from dtensor_gpt.sources import open_source

    model = GPT(small_config())
    save_checkpoint(model, str(tmp_path / "ckpt"))
    before = _open_files(tmp_path)
    for _ in range(100):
        load_checkpoint(model, str(tmp_path / "ckpt"))
        with open_source(str(tmp_path / "ckpt")) as source:
            source.read_full("transformer.wte.weight")
    assert _open_files(tmp_path) == before == (before[0], 0)
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    (tmp_path / "ckpt" / "index.json").write_text(json.dumps(dict(index, id="0" * 32)))
    with pytest.raises(CheckpointError, match="files from different checkpoints") as refused:
        load_checkpoint(model, str(tmp_path / "ckpt"))
    assert refused.value and _open_files(tmp_path) == before, "the error held, its files are closed"


def test_a_writer_whose_header_fails_closes_its_file():
    """A header larger than the write buffer reaches /dev/full at once: the error is raised, the file closed."""
    from dtensor_gpt.safetensors_stream import StreamingWriter

    before = _open_files("/dev/full")
    with pytest.raises(OSError, match="No space left on device") as failed:
        StreamingWriter("/dev/full", [(f"tensor{i}", torch.float32, (1,)) for i in range(1000)])
    assert failed.value and _open_files("/dev/full") == before, "the error held, its file is closed"


@pytest.mark.parametrize("fused", [True, False])
def test_adamw_resumes_exactly_with_its_state_where_torch_puts_it(tmp_path, fused):
    equal, placed, by_torch = resumed_adamw(str(tmp_path / "ckpt"), fused=fused)
    assert placed == by_torch and placed["step"] == (torch.device("cpu"), torch.float32)
    assert equal, "resumed for 2 steps, the weights of 4 uninterrupted steps"


def test_an_opened_source_is_validated_once(tmp_path, monkeypatch):
    """generate.py opens the checkpoint to build the model and loads that same source: one validation, not two."""
    from dtensor_gpt.format import Checkpoint
    from helpers import fake_process_group

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    from generate import load_model, parse_args

    torch.manual_seed(0)
    reference = GPT(small_config())
    save_checkpoint(reference, str(tmp_path / "ckpt"), extra={"chars": [chr(32 + i) for i in range(96)]})
    opened, validate = [], Checkpoint.__init__

    def counted(self, *args, **kwargs):
        opened.append(args)
        validate(self, *args, **kwargs)

    monkeypatch.setattr(Checkpoint, "__init__", counted)
    with fake_process_group(1):
        model, _ = load_model(parse_args(["--checkpoint", str(tmp_path / "ckpt")]), init_device_mesh("cpu", (1,)))
    assert len(opened) == 1
    local = [layout.tp_local(t) for t in model.state_dict().values()]  # TP=1: the whole tensors
    assert all(torch.equal(a, b) for a, b in zip(local, reference.state_dict().values()))
