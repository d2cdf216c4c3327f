"""
Never launder corruption: a damaged source is refused with one error naming what is wrong,
by the converter (which would otherwise write fresh checksums over it), by load_checkpoint,
generate.py and train.py; nothing ever blocks on a file that is not a regular file.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch.distributed.device_mesh import init_device_mesh

from distributed import run_distributed
from dtensor_gpt import GPT, GPTConfig, load_checkpoint, parallelize, save_checkpoint
from dtensor_gpt.format import CheckpointError
from dtensor_gpt.reshard import main as reshard
from dtensor_gpt.sources import open_source
from helpers import as_written_before_index_hashes, full, nanogpt_run, small_config, write_text

ROOT = Path(__file__).resolve().parents[1]
FORMAT_2 = ROOT / "tests" / "data" / "format2-tp2"  # written by the code before format 3 (tests/data/README.md)
FORMAT_2_EXPECTED = ROOT / "tests" / "data" / "format2-tp2-expected.safetensors"  # its tensors whole
CONFIG = small_config(n_head=4, n_embd=32)  # 2 blocks; n_head can be doubled without breaking divisibility


def _saved(path, config=CONFIG, spoil=None, **kwargs):
    """A checkpoint of a seeded model at `path`; `spoil(model)` changes its weights first."""
    torch.manual_seed(0)
    model = GPT(config)
    if spoil:
        with torch.no_grad():
            spoil(model)
    save_checkpoint(model, str(path), **kwargs)
    return model


def _edit_index(path, edit):
    index = json.loads((path / "index.json").read_text())
    edit(index)
    (path / "index.json").write_text(json.dumps(index))


def _refused(capsys, src, dst, *flags, match):
    """The converter exits 1 with one `error:` line matching `match`, no traceback, and writes nothing."""
    assert reshard([str(src), str(dst), *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not Path(dst).exists()


def _data_offset(path, name):
    """Where tensor `name`'s bytes start in a safetensors file (8-byte header length, header, data)."""
    raw = Path(path).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return 8 + length + json.loads(raw[8:8 + length])[name]["data_offsets"][0]


def _flip(path, offset):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0x01  # the lowest mantissa bit of a float32: the value stays finite and plausible
    Path(path).write_bytes(bytes(data))


# --- Source bytes are verified by default -------------------------------------------------------------------


def test_a_flipped_byte_in_a_rank_file_is_refused_by_default(tmp_path, capsys):
    _saved(tmp_path / "ckpt")
    rank0 = tmp_path / "ckpt" / "model-rank00000-of-00001.safetensors"
    _flip(rank0, _data_offset(rank0, "transformer.h.1.mlp.c_fc.weight") + 40)
    _refused(capsys, tmp_path / "ckpt", tmp_path / "out", "--tp", "2",
             match=r"model-rank00000-of-00001.safetensors: sha256 differs from index.json")
    with pytest.raises(CheckpointError, match="sha256 differs"):
        load_checkpoint(GPT(CONFIG), str(tmp_path / "ckpt"), verify=True)
    assert reshard([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--no-verify"]) == 0, "--no-verify skips the check"


def test_a_flipped_byte_in_a_nanogpt_ckpt_is_refused_by_default(tmp_path, capsys):
    nanogpt_run(tmp_path / "run", CONFIG)
    ckpt = tmp_path / "run" / "ckpt.pt"
    with zipfile.ZipFile(ckpt) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # the largest storage: wte
        start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)  # past its local header
    _flip(ckpt, start + 100)
    _refused(capsys, ckpt, tmp_path / "out", match=rf"ckpt.pt: its record {record.filename} fails its CRC-32 check")
    with pytest.raises(CheckpointError, match="fails its CRC-32 check"):
        load_checkpoint(GPT(CONFIG), str(ckpt), verify=True)


# --- The index is protected (format 3), and checked field by field (every format) -----------------------------


def test_every_rank_file_carries_the_hash_of_the_index_without_files(tmp_path):
    _saved(tmp_path / "tp1")
    ckpt = tmp_path / "tp2"
    assert reshard([str(tmp_path / "tp1"), str(ckpt), "--tp", "2"]) == 0
    index = json.loads((ckpt / "index.json").read_text())
    core = json.dumps({k: v for k, v in index.items() if k != "files"}, sort_keys=True, separators=(",", ":"))
    assert index["format"] == "dtensor_gpt/3"
    for fname in index["files"]:
        with safe_open(ckpt / fname, "pt") as f:
            assert f.metadata()["index_sha256"] == hashlib.sha256(core.encode()).hexdigest(), fname


def _groups_to_1(index):
    index["tensors"]["transformer.h.0.attn.c_attn.weight"]["split"]["groups"] = 1


def _n_head_8(index):
    index["config"]["n_head"] *= 2


def _n_layer_huge(index):
    index["config"]["n_layer"] = 10**6


def _other_characters(index):
    index.setdefault("extra", {})["chars"] = list("abc")


@pytest.mark.parametrize("edit, message", [
    (_groups_to_1, r"index.json: tensors\['transformer.h.0.attn.c_attn.weight'\].split.groups is 1, but it must be 3, "
                   r"the parts its dimension 0 packs \(q\|k\|v\)"),
    (_n_head_8, r"index.json is not the index model-rank00000-of-00002.safetensors was written with"),
    (_n_layer_huge, r"index.json is not the index model-rank00000-of-00002.safetensors was written with"),
    (_other_characters, r"index.json is not the index model-rank00000-of-00002.safetensors was written with"),
])
def test_an_edited_index_is_refused_on_every_open(tmp_path, capsys, edit, message):
    _saved(tmp_path / "tp1")
    assert reshard([str(tmp_path / "tp1"), str(tmp_path / "tp2"), "--tp", "2"]) == 0
    _edit_index(tmp_path / "tp2", edit)
    _refused(capsys, tmp_path / "tp2", tmp_path / "out", match=message)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(GPT(CONFIG), str(tmp_path / "tp2"))
    with pytest.raises(CheckpointError, match=message):
        open_source(str(tmp_path / "tp2"))  # what generate.py opens before it builds a model


def _format_2_copy(tmp_path, edit=None):
    path = tmp_path / "format2"
    shutil.copytree(FORMAT_2, path)
    if edit:
        _edit_index(path, edit)
    return path


@pytest.mark.parametrize("edit, message", [
    (_groups_to_1, r"split.groups is 1, but it must be 3, the parts its dimension 0 packs"),
    (_n_layer_huge, r"index.json: config.n_layer is 1000000, but the weights hold 1 block, transformer.h.0;"),
    (lambda i: i["config"].update(n_head=3), r"index.json: config.n_embd=8 is not divisible by config.n_head=3"),
    (lambda i: i["config"].update(vocab_size=12), r"transformer.wte.weight has shape \[11, 8\], but config.vocab_size=12 "
                                                  r"and config.n_embd=8 make it \[12, 8\]"),
    (lambda i: i["config"].update(block_size=16), r"transformer.wpe.weight has shape \[8, 8\], but config.block_size=16"),
])
def test_an_edited_index_of_an_older_format_is_checked_against_its_tensors(tmp_path, capsys, edit, message):
    """Formats 1 and 2 have no index hash: each config value is checked against the tensors' shapes instead."""
    path = _format_2_copy(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        open_source(str(path))
    _refused(capsys, path, tmp_path / "out", match=message)


def test_checkpoints_of_formats_1_and_2_still_load(tmp_path):
    """
    The format 2 checkpoint was written by the code before format 3, on another CPU (format 1 is
    made in tests/test_vocabulary.py). It must load bit for bit as what it stores:
    format2-tp2-expected.safetensors beside it holds its tensors whole, assembled from its rank
    files with safetensors alone. Recomputing its recipe on this CPU checks that they are that
    recipe's model, within what differs across CPUs: matrix kernels sum in another order, so the
    gradient moves by about 1e-7 of its scale (1e-4 allowed), and a first AdamW step moves each
    weight by lr * g / (|g| + eps), at most lr whatever g's rounding (2 lr allowed). A misplaced
    shard moves its optimizer state by the gradient's own scale.
    """
    torch.manual_seed(0)
    reference = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=8, block_size=8, vocab_size=11, bias=True, dropout=0.0))
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    idx = torch.arange(16).reshape(2, 8) % 11
    reference(idx, idx)[1].backward()
    optimizer.step()  # as tests/data/README.md made it
    model = GPT(reference.config)
    loaded = torch.optim.AdamW(model.parameters(), lr=1e-3)
    result = load_checkpoint(model, str(FORMAT_2), verify=True, optimizer=loaded)
    assert result["extra"]["chars"] == list("abcdefghijk")
    with safe_open(str(FORMAT_2_EXPECTED), "pt") as f:
        stored = {name: f.get_tensor(name) for name in f.keys()}
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        name = "transformer.wte.weight" if name == "lm_head.weight" else name
        assert torch.equal(b, stored[name]), name
        assert (a - b).abs().max().item() <= 2e-3, name
        for key in ("exp_avg", "exp_avg_sq", "step"):
            value = loaded.state[b][key]
            assert torch.equal(value, stored[f"optimizer.{key}.{name}"]), (name, key)
            recomputed = optimizer.state[a][key]
            assert (recomputed - value).abs().max() <= 1e-4 * recomputed.abs().max(), (name, key)
    assert reshard([str(FORMAT_2), str(tmp_path / "f3"), "--tp", "2"]) == 0
    assert json.loads((tmp_path / "f3" / "index.json").read_text())["format"] == "dtensor_gpt/3"
    again = GPT(reference.config)
    load_checkpoint(again, str(tmp_path / "f3"), verify=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_an_index_relabelled_as_an_older_format_is_still_checked(tmp_path):
    """Each rank file carries its index hash whatever the index claims: calling the index format 2 changes nothing."""
    _saved(tmp_path / "ckpt")
    _edit_index(tmp_path / "ckpt", lambda i: i.update(format="dtensor_gpt/2") or i["config"].update(n_head=8))
    with pytest.raises(CheckpointError, match="is not the index model-rank00000-of-00001.safetensors was written with"):
        open_source(str(tmp_path / "ckpt"))
    as_written_before_index_hashes(tmp_path / "ckpt")  # files as format 2 wrote them: only the shapes can be checked
    assert open_source(str(tmp_path / "ckpt")).config["n_head"] == 8


@pytest.mark.parametrize("edit, message", [
    (lambda i: i.update(tp="1"), r"index.json: tp is '1', but it must be a positive integer"),
    (lambda i: i.update(tp=0), r"index.json: tp is 0, but it must be a positive integer"),
    (lambda i: i.update(tp=10**9), r"index.json: files is .*, but it must be an object naming exactly the tp=1000000000 rank"),
    (lambda i: i.pop("files"), r"index.json lacks \['files'\]"),
    (lambda i: i["tensors"]["transformer.h.0.mlp.c_fc.weight"]["split"].update(dim=5),
     r"tensors\['transformer.h.0.mlp.c_fc.weight'\].split.dim is 5, but it must be a dimension of its shape \[128, 32\]"),
    (lambda i: i["tensors"]["transformer.h.0.mlp.c_fc.weight"].update(shape="128x32"),
     r"tensors\['transformer.h.0.mlp.c_fc.weight'\].shape is '128x32', but it must be a list of sizes"),
    (lambda i: i["tensors"]["transformer.wpe.weight"].update(dtype="F64"), r"\.dtype is 'F64', but it must be one of"),
    (lambda i: i["tensors"]["transformer.wpe.weight"].update(dtype=["F32"]), r"\.dtype is \['F32'\], but it must be one of"),
    (lambda i: i["tensors"]["transformer.wpe.weight"].update(files="all"), r"\.files is 'all', but it must be"),
    (lambda i: i["tensors"]["transformer.wpe.weight"].update(split={"dim": 0}), r"\.split is \{'dim': 0\}, but it must be"),
    (lambda i: i["config"].update(n_head="4"), r"index.json: config.n_head is '4', but it must be a positive integer"),
    (lambda i: i["config"].update(bias="yes"), r"index.json: config.bias is 'yes', but it must be true or false"),
    (lambda i: i["config"].pop("n_embd"), r"index.json: config lacks \['n_embd'\]"),
    (lambda i: i.update(config=[]), r"index.json: config is \[\], but it must be an object"),
    (lambda i: i.update(tied=["lm_head.weight"]), r"index.json: tied is \['lm_head.weight'\], but it must be an object"),
    (lambda i: i.update(extra="chars"), r"index.json: extra is 'chars', but it must be an object"),
    (lambda i: i["files"]["model-rank00000-of-00001.safetensors"].update(bytes="many"), r"files\['model-rank00000-of-00001"),
    (lambda i: i.update(optimizer_groups=[{"params": [3]}]), r"optimizer_groups is .*, but it must be a list of objects"),
])
def test_malformed_index_fields_are_named(tmp_path, capsys, edit, message):
    _saved(tmp_path / "ckpt")
    _edit_index(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(GPT(CONFIG), str(tmp_path / "ckpt"))
    _refused(capsys, tmp_path / "ckpt", tmp_path / "out", match=message)


def test_an_index_that_is_not_a_json_object_is_named(tmp_path, capsys):
    _saved(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "index.json").write_text('["not", "an", "object"]')
    _refused(capsys, tmp_path / "ckpt", tmp_path / "out", match=r"index.json holds a JSON list, not an object")
    (tmp_path / "ckpt" / "index.json").write_bytes(b"\xff\xfe{")
    _refused(capsys, tmp_path / "ckpt", tmp_path / "out", match=r"index.json is not valid JSON")


# --- Hugging Face config.json and nanoGPT model_args against their tensors ---------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A 4-block GPT-2 directory as transformers writes it."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_head=2, n_embd=16, n_positions=16, vocab_size=64, activation_function="gelu")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _hf_with(tmp_path, hf_dir, edit):
    path = tmp_path / "hf"
    shutil.copytree(hf_dir, path)
    config = json.loads((path / "config.json").read_text())
    replaced = edit(config)
    config = replaced if isinstance(replaced, list) else config  # an edit returns a list to stand for the whole file
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(n_layer=2), r"config.json: n_layer is 2, but the weights hold 4 blocks, transformer.h.0 to transformer.h.3"),
    (lambda c: c.update(n_layer=6), r"config.json: n_layer is 6, but the weights hold 4 blocks"),
    (lambda c: c.update(n_positions=32), r"transformer.wpe.weight has shape \[16, 16\], but n_positions=32 and n_embd=16 make it \[32, 16\]"),
    (lambda c: c.update(vocab_size=50257), r"transformer.wte.weight has shape \[64, 16\], but vocab_size=50257"),
    (lambda c: c.update(n_embd=32, n_head=4), r"transformer.wte.weight has shape \[64, 16\], but vocab_size=64 and n_embd=32"),
    (lambda c: c.update(n_head=3), r"config.json: n_embd=16 is not divisible by n_head=3"),
    (lambda c: c.update(n_inner=32), r"config.json: n_inner is 32, but this GPT computes only n_inner=64"),
    (lambda c: c.update(n_layer="4"), r"config.json: n_layer is '4', but it must be a positive integer"),
    (lambda c: c.pop("n_embd"), r"config.json lacks \['n_embd'\]"),
    (lambda c: [c], r"config.json holds a JSON list, not an object"),
    (lambda c: c.update(tie_word_embeddings=False), r"tie_word_embeddings is False, but this GPT computes only"),
    (lambda c: c.update(activation_function="relu"), r"activation_function is 'relu', but this GPT computes GELU"),
    (lambda c: c.update(scale_attn_by_inverse_layer_idx=True), r"scale_attn_by_inverse_layer_idx is True"),
])
def test_hugging_face_config_against_its_weights(tmp_path, capsys, hf_dir, edit, message):
    path = _hf_with(tmp_path, hf_dir, edit)
    with pytest.raises(CheckpointError, match=message):
        open_source(str(path))
    _refused(capsys, path, tmp_path / "out", match=message)


def test_hugging_face_extra_tensors_are_refused(tmp_path, capsys, hf_dir):
    """A tensor nothing reads (here a classifier head) must not vanish in a conversion."""
    from safetensors.torch import load_file, save_file

    path = _hf_with(tmp_path, hf_dir, lambda c: None)
    tensors = load_file(path / "model.safetensors")
    save_file({**tensors, "score.weight": torch.zeros(2, 16)}, path / "model.safetensors", metadata={"format": "pt"})
    _refused(capsys, path, tmp_path / "out", match=r"unexpected in it \['transformer.score.weight'\]")


def _nanogpt_with(tmp_path, edit):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    ckpt = {"model": model.state_dict(), "model_args": {**vars(CONFIG)}}
    edit(ckpt)
    torch.save(ckpt, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model_args"].update(n_layer=1), r"ckpt.pt: model_args\['n_layer'\] is 1, but the weights hold 2 blocks"),
    (lambda c: c["model_args"].update(n_layer=10**6), r"model_args\['n_layer'\] is 1000000, but the weights hold 2 blocks"),
    (lambda c: c["model_args"].update(block_size=64), r"transformer.wpe.weight has shape \[32, 32\], but model_args\['block_size'\]=64"),
    (lambda c: c["model_args"].update(n_head="4"), r"ckpt.pt: model_args\['n_head'\] is '4', but it must be a positive integer"),
    (lambda c: c["model_args"].pop("bias"), r"ckpt.pt: model_args lacks \['bias'\]"),
    (lambda c: c.update(model_args=[1, 2]), r"ckpt.pt: model_args is a list, not a dict"),
    (lambda c: c["model"].update({"transformer.h.2.attn.c_attn.weight": torch.zeros(96, 32)}), r"the weights hold 3 blocks"),
    (lambda c: c["model"].update({"lm_head.weight": torch.zeros(96, 32)}), r"lm_head.weight differs from transformer.wte.weight"),
    (lambda c: c.update(optimizer={"state": {}, "param_groups": "all"}), r"optimizer must be an optimizer state_dict"),
])
def test_nanogpt_model_args_against_its_weights(tmp_path, capsys, edit, message):
    path = _nanogpt_with(tmp_path, edit)
    with pytest.raises(CheckpointError, match=message):
        open_source(str(path))
    _refused(capsys, path, tmp_path / "out", match=message)


# --- NaN and infinity ---------------------------------------------------------------------------------------------


def _nan_in_c_fc(model):
    model.transformer.h[1].mlp.c_fc.weight[-1, 0] = float("nan")  # the last row: rank 1's shard at TP=2


def test_the_converter_refuses_non_finite_weights(tmp_path, capsys):
    _saved(tmp_path / "ckpt", spoil=_nan_in_c_fc)
    _refused(capsys, tmp_path / "ckpt", tmp_path / "out", "--tp", "2",
             match=r"ckpt: transformer.h.1.mlp.c_fc.weight holds 1 NaN value, but weights must be finite")
    torch.manual_seed(0)
    model = GPT(CONFIG)
    with torch.no_grad():
        model.transformer.wpe.weight[3, :2] = float("inf")
    torch.save({"model": model.state_dict(), "model_args": vars(CONFIG)}, tmp_path / "ckpt.pt")
    _refused(capsys, tmp_path / "ckpt.pt", tmp_path / "out", "--to", "hf",
             match=r"transformer.wpe.weight holds 2 infinite values")


def _load_at_tp(rank, world_size, path):
    torch.manual_seed(1)
    model = parallelize(GPT(CONFIG), init_device_mesh("cpu", (world_size,)))
    before = {n: full(p).clone() for n, p in model.named_parameters()}
    try:
        load_checkpoint(model, path)
    except CheckpointError as e:
        unchanged = all(torch.equal(full(p), before[n]) for n, p in model.named_parameters())
        return str(e), unchanged
    return None, None


def test_load_checkpoint_refuses_non_finite_weights_on_every_rank(tmp_path):
    """At TP=2 only rank 1 reads the NaN; both ranks refuse (none goes on to hang), and no parameter changes."""
    _saved(tmp_path / "ckpt", spoil=_nan_in_c_fc)
    message, unchanged = run_distributed(_load_at_tp, 2, str(tmp_path / "ckpt"))
    assert message and "transformer.h.1.mlp.c_fc.weight holds 1 NaN value" in message, "rank 0 names rank 1's NaN"
    assert unchanged


def _resume(rank, world_size, data, path):
    sys.path.insert(0, str(ROOT / "examples"))
    from train import parse_args, train

    args = parse_args(["--data", data, "--resume", path, "--max-iters", "4", "--batch-size", "2", "--eval-iters", "1"])
    try:
        train(args, init_device_mesh("cpu", (world_size,)), say=lambda *a, **k: None)
    except CheckpointError as e:
        return str(e)
    return None


def test_train_resume_refuses_non_finite_weights(tmp_path):
    chars = write_text(tmp_path / "text.txt")
    config = small_config(n_head=4, n_embd=32, vocab_size=len(chars))
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW([  # grouped as examples/train.py groups them, with its defaults
        {"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    with torch.no_grad():
        _nan_in_c_fc(model)
    save_checkpoint(model, str(tmp_path / "ckpt"), optimizer=optimizer, extra={"chars": chars, "iter": 1})
    message = run_distributed(_resume, 2, str(tmp_path / "text.txt"), str(tmp_path / "ckpt"))
    assert message and "transformer.h.1.mlp.c_fc.weight holds 1 NaN value, but weights must be finite" in message


def test_generate_refuses_non_finite_weights_up_front(tmp_path):
    """Instead of dying in torch.multinomial ('probability tensor contains inf, nan') with no hint of the cause."""
    chars = write_text(tmp_path / "text.txt")
    config = small_config(n_head=4, n_embd=32, vocab_size=len(chars))

    def infinite_row(model):
        model.transformer.wte.weight[len(chars) - 1] = float("inf")  # rank 1's vocabulary shard at TP=2

    _saved(tmp_path / "ckpt", config, spoil=infinite_row, extra={"chars": chars})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(ROOT / "examples" / "generate.py"), "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "A",
                        "--max-new-tokens", "5"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "error: " in r.stderr and "transformer.wte.weight holds 32 infinite values" in r.stderr, r.stderr[-2000:]
    assert "probability tensor" not in r.stderr


# --- Nothing blocks on a file that is not a regular file -----------------------------------------------------------

CONVERT_EACH = """
import contextlib, io, json, sys
from dtensor_gpt.reshard import main
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:
            code = e.code
    print(json.dumps([code, err.getvalue()]), flush=True)
"""


def _fifo(path):
    path.unlink()
    os.mkfifo(path)


def _dev_zero(path):
    path.unlink()
    path.symlink_to("/dev/zero")


def test_special_files_are_refused_without_blocking(tmp_path, hf_dir):
    """
    A FIFO or a device where a file belongs is one error, never a read that blocks or never
    ends. The conversions run in a child process with a deadline: before this rule, each of
    them blocked or hashed forever.
    """
    ckpts = []
    for where, replace in (("model-rank00000-of-00001.safetensors", _fifo), ("index.json", _fifo),
                           ("model-rank00000-of-00001.safetensors", _dev_zero)):
        ckpts.append(tmp_path / f"{replace.__name__}-{where}")
        _saved(ckpts[-1])
        replace(ckpts[-1] / where)
    _saved(tmp_path / "ckpt")
    (tmp_path / "dst").mkdir()
    os.mkfifo(tmp_path / "dst" / "index.json")
    os.mkfifo(tmp_path / "ckpt.pt")
    shutil.copytree(hf_dir, tmp_path / "hf")
    _fifo(tmp_path / "hf" / "config.json")
    fifo = "is a FIFO (named pipe), not a regular file"
    out = str(tmp_path / "out")
    cases = [[str(p), out] for p in ckpts] + [[str(tmp_path / "ckpt"), str(tmp_path / "dst"), "--overwrite"],
                                              [str(tmp_path / "ckpt.pt"), out], [str(tmp_path / "hf"), out]]
    messages = [f"model-rank00000-of-00001.safetensors {fifo}", f"index.json {fifo}",
                "model-rank00000-of-00001.safetensors is a character device (a link to /dev/zero), not a regular file",
                "dst is not a checkpoint of this project", f"ckpt.pt {fifo}", f"config.json {fifo}"]
    r = subprocess.run([sys.executable, "-c", CONVERT_EACH, json.dumps(cases)],
                       capture_output=True, text=True, timeout=120)
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(results) == len(messages), r.stderr[-2000:]
    codes = [1, 1, 1, 2, 1, 1]  # a destination it may not replace is a bad argument, exit status 2
    for (code, err), message, expected in zip(results, messages, codes):
        assert code == expected and err.count("error: ") == 1 and message in err, (message, err)
    for path in ckpts:
        with pytest.raises(CheckpointError, match="not a regular file"):
            load_checkpoint(GPT(CONFIG), str(path), verify=True)
