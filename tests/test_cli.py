"""
The command lines a user meets: every bad argument is one clear error (exit status 2, one
message per job, no traceback), and --help gives every option a help text and its default.
"""

import argparse
import os
import pickle
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtensor_gpt import GPT, advise, comm, reshard, save_checkpoint
from dtensor_gpt.data import TextData
from dtensor_gpt.format import CheckpointError
from dtensor_gpt.sources import open_source
from dtensor_gpt.tokenizers import META_BYTES, BPETokenizer, CharTokenizer, chars_from_meta
from helpers import exit_status, small_config, write_ranks, write_text
from plans import PLANS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import demo  # noqa: E402
import generate  # noqa: E402
import train  # noqa: E402

ENTRY_POINTS = {"examples/train.py": train.parse_args, "examples/generate.py": generate.parse_args,
                "examples/demo.py": demo.parse_args, "python -m dtensor_gpt.comm": comm.main,
                "python -m dtensor_gpt.reshard": reshard.main, "python -m dtensor_gpt.advise": advise.main}


class _Parser(Exception):
    """Carries the parser an entry point built, caught where it would parse."""


def parser_of(name, monkeypatch):
    def catch(self, args=None, namespace=None):
        raise _Parser(self)

    with monkeypatch.context() as patched:
        patched.setattr(argparse.ArgumentParser, "parse_args", catch)
        with pytest.raises(_Parser) as caught:
            ENTRY_POINTS[name]([])
    return caught.value.args[0]


def help_entries(parser, monkeypatch):
    """{first option string: its help} as --help prints them, on a terminal wide enough that nothing wraps."""
    monkeypatch.setenv("COLUMNS", "1000")
    options = parser.format_help().split("\noptions:\n", 1)[1]
    entries = {}
    for entry in re.split(r"\n(?=  -)", options.rstrip("\n")):
        invocation, *text = re.split(r"\s{2,}", entry.strip(), maxsplit=1)
        entries[invocation.split(",")[0].split()[0]] = text[0] if text else ""
    return entries


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_option_has_help_text_and_shows_its_default(name, monkeypatch):
    parser = parser_of(name, monkeypatch)
    entries = help_entries(parser, monkeypatch)
    actions = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert len(entries) == len(actions) + 1, "one --help entry per option, and -h"
    for action in actions:
        text = entries[action.option_strings[0]]
        assert text, f"{name} {action.option_strings[0]} has no help text"
        if action.nargs != 0 and not action.required:  # flags are off unless given
            assert "(default" in text and "(default: None)" not in text, f"{name} {action.option_strings[0]}: {text}"


@pytest.mark.parametrize("name", ["examples/train.py", "examples/generate.py", "examples/demo.py",
                                  "python -m dtensor_gpt.comm"])
def test_plan_choices_come_from_the_plan_registry(name, monkeypatch):
    monkeypatch.setitem(PLANS, "my-plan", PLANS["megatron"])
    parser = parser_of(name, monkeypatch)
    (plan,) = [a for a in parser._actions if "--plan" in a.option_strings]
    assert list(plan.choices) == list(PLANS) and "my-plan" in plan.choices


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    write_text(path, n=2000)
    return str(path)


TWENTY_DIGITS = "12345678901234567890"
TRAIN = [
    (["--max-iters", "-1"], "argument --max-iters: '-1' is not a whole number of at least 0"),
    (["--batch-size", "0"], "argument --batch-size: '0' is not a whole number of at least 1"),
    (["--batch-size", "-1"], "argument --batch-size: '-1' is not a whole number of at least 1"),
    (["--block-size", "0"], "argument --block-size: '0' is not a whole number of at least 1"),
    (["--n-head", "3"], "--n-embd 128 is not divisible by --n-head 3: every head takes n_embd / n_head channels; "
                        "use an --n-head in {1, 2, 4, 8, 16, 32, 64, 128}"),
    (["--n-embd", "0"], "argument --n-embd: '0' is not a whole number of at least 1"),
    (["--n-layer", "two"], "argument --n-layer: 'two' is not a whole number of at least 1"),
    (["--eval-iters", "0"], "argument --eval-iters: '0' is not a whole number of at least 1"),
    (["--eval-interval", "0"], "argument --eval-interval: '0' is not a whole number of at least 1"),
    (["--log-interval", "0"], "argument --log-interval: '0' is not a whole number of at least 1"),
    (["--save-interval", "0"], "argument --save-interval: '0' is not a whole number of at least 1"),
    (["--gradient-accumulation-steps", "0"], "argument --gradient-accumulation-steps: '0' is not a whole number of at least 1"),
    (["--dropout", "1"], "argument --dropout: '1' is not a finite number of at least 0 and below 1"),
    (["--dropout", "-0.1"], "argument --dropout: '-0.1' is not a finite number of at least 0 and below 1"),
    (["--dropout", "nan"], "argument --dropout: 'nan' is not a finite number of at least 0 and below 1"),
    (["--dp", "0"], "argument --dp: '0' is not a whole number of at least 1"),
    (["--dp", "3"], "--dp 3 does not divide the 1 processes; use a divisor of 1"),
    (["--timeout", "0"], "argument --timeout: '0' is not a finite number above 0"),
    (["--timeout", "inf"], "argument --timeout: 'inf' is not a finite number above 0"),
    (["--lr", "nan"], "argument --lr: 'nan' is not a finite number above 0"),
    (["--seed", TWENTY_DIGITS], f"argument --seed: '{TWENTY_DIGITS}' is not a whole number from 0 to 16777215"),
    (["--seed", str(2**24)], "argument --seed: '16777216' is not a whole number from 0 to 16777215"),
    (["--tokenizer", "missing.tiktoken"], "--tokenizer missing.tiktoken is not a file; give char, gpt2, a .tiktoken "
                                          "ranks file or a nanoGPT meta.pkl"),
    (["--tokenizer", "data/meta.pkl"], "--tokenizer data/meta.pkl is not a file"),
    (["--plan", "bogus"], "argument --plan: invalid choice: 'bogus'"),
    (["--resume", "missing-run"], "--resume missing-run does not exist"),
]
GENERATE = [
    (["--temperature", "nan"], "argument --temperature: 'nan' is not a finite number above 0"),
    (["--temperature", "0"], "argument --temperature: '0' is not a finite number above 0"),
    (["--seed", TWENTY_DIGITS], f"argument --seed: '{TWENTY_DIGITS}' is not a whole number from 0 to 9223372036854775807"),
    (["--seed", "-1"], "argument --seed: '-1' is not a whole number from 0 to 9223372036854775807"),
    (["--timeout", "-5"], "argument --timeout: '-5' is not a finite number above 0"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: '0' is not a whole number of at least 1"),
    (["--top-k", "-1"], "argument --top-k: '-1' is not a whole number of at least 0"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a whole number of at least 1"),
    (["--sampler", "gather"], "argument --sampler: invalid choice: 'gather'"),
    (["--tokenizer", "missing.tiktoken"], "--tokenizer missing.tiktoken is not a file; give a .tiktoken ranks file "
                                          "or a nanoGPT meta.pkl"),  # whatever the model: the default is a character model
    (["--checkpoint", "missing-run"], "--checkpoint missing-run does not exist"),
    (["--plan", "bogus"], "argument --plan: invalid choice: 'bogus'"),
]
DEMO = [
    (["--plan", "bogus"], "argument --plan: invalid choice: 'bogus'"),
    (["--seq", "0"], "argument --seq: '0' is not a whole number of at least 1"),
    (["--seq", "65"], "--seq 65 is longer than block_size 64 of config 'tiny'; give at most 64"),
    (["--batch", "0"], "argument --batch: '0' is not a whole number of at least 1"),
    (["--plan", "spd", "--spd-blocks", "5"], "--spd-blocks: spd_blocks [5] out of range for n_layer=2"),
]
COMM = [
    (["--seq", "0"], "argument --seq: '0' is not a whole number of at least 1"),  # it used to run with 64
    (["--tp", "0"], "argument --tp: '0' is not a whole number of at least 1"),
    (["--batch", "0"], "argument --batch: '0' is not a whole number of at least 1"),
    (["--n-layer", "0"], "argument --n-layer: '0' is not a whole number of at least 1"),
    (["--plan", "megatron", "bogus"], "argument --plan: invalid choice: 'bogus'"),
    (["--png", "no-such-folder/plans.png"], "--png no-such-folder/plans.png: the folder "),
]


@pytest.mark.parametrize("script, argv, message", [("train", *case) for case in TRAIN] + [
    ("generate", *case) for case in GENERATE] + [("demo", *case) for case in DEMO] + [("comm", *case) for case in COMM])
def test_a_bad_argument_is_one_error_line(script, argv, message, text, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    entry = {"train": lambda a: train.parse_args(["--data", text, *a]), "generate": generate.parse_args,
             "demo": demo.parse_args, "comm": comm.main}[script]
    with pytest.raises(SystemExit) as exit:
        entry(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert f"error: {message}" in err, err
    assert err.count("error:") == 1 and err.startswith("usage:") and "Traceback" not in err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small checkpoint (n_head=12) and, beside it, a folder of notes that is none."""
    root = tmp_path_factory.mktemp("reshard")
    torch.manual_seed(0)
    save_checkpoint(GPT(small_config()), str(root / "ckpt"))
    (root / "notes").mkdir()
    (root / "notes" / "precious.txt").write_text("keep me")
    return root


RESHARD = [
    (["ckpt", "out", "--tp", "0"], "argument --tp: '0' is not a whole number of at least 1"),
    (["ckpt", "out", "--tp", "-1"], "argument --tp: '-1' is not a whole number of at least 1"),
    (["ckpt", "out", "--tp", "1000000"], "ROOT/ckpt: n_head=12 is not divisible by tp=1000000; use tp in {1, 2, 3, 4, 6, 12}"),
    (["ckpt", "out", "--to", "hf", "--tp", "2"],
     "--tp 2 applies to --to native only: a --to hf export holds the whole model, as --tp 1 does; drop --tp"),
    (["ckpt", "out", "--to", "nanogpt", "--tp", "4"], "--tp 4 applies to --to native only: a --to nanogpt export"),
    (["missing", "out"], "ROOT/missing does not exist"),
    (["ckpt", "ckpt", "--overwrite"], "the destination ROOT/ckpt is the source ROOT/ckpt"),
    (["ckpt", "notes"], "ROOT/notes exists; pass --overwrite to replace it"),
    (["ckpt", "notes", "--overwrite"], "ROOT/notes is not a checkpoint of this project (no readable index.json"),
    (["ckpt", "notes", "--overwrite", "--to", "hf"], "ROOT/notes holds ['precious.txt'], which a --to hf export does not write"),
]


@pytest.mark.parametrize("argv, message", RESHARD)
def test_a_bad_reshard_argument_is_one_error_line(argv, message, checkpoint, capsys):
    """Values argparse refuses, and those the paths they name refuse, alike: exit status 2, nothing written."""
    argv = [str(checkpoint / a) if i < 2 else a for i, a in enumerate(argv)]
    assert exit_status(reshard.main, argv) == 2
    err = capsys.readouterr().err
    assert f"error: {message.replace('ROOT', str(checkpoint))}" in err, err
    assert err.count("error:") == 1 and err.startswith("usage:") and "Traceback" not in err
    assert sorted(os.listdir(checkpoint)) == ["ckpt", "notes"] and os.listdir(checkpoint / "notes") == ["precious.txt"]


@pytest.mark.parametrize("to", ["hf", "nanogpt"])
def test_an_export_takes_tp_1(to, checkpoint, tmp_path):
    """An export holds the whole model, which is what --tp 1 asks: the same tensors as without --tp."""
    src = str(checkpoint / "ckpt")
    assert reshard.main([src, str(tmp_path / "given"), "--to", to, "--tp", "1"]) == 0
    assert reshard.main([src, str(tmp_path / "default"), "--to", to]) == 0
    given, default, native = (open_source(str(tmp_path / "given")), open_source(str(tmp_path / "default")),
                              open_source(src))
    assert sorted(given.tensors) == sorted(default.tensors) == sorted(native.tensors)
    for name, entry in native.tensors.items():
        whole = native.read(name, 0, 0, entry["shape"][0])
        assert torch.equal(given.read(name, 0, 0, entry["shape"][0]), whole), name
        assert torch.equal(default.read(name, 0, 0, entry["shape"][0]), whole), name


def test_a_file_that_is_no_checkpoint_is_named(tmp_path, capsys, monkeypatch):
    """A text file where a checkpoint belongs: one sentence, not torch.load's advice on saving one."""
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "notes.txt").write_text("ROMEO: a line of text, not a checkpoint\n")
    notes = str(tmp_path / "notes.txt")
    sentence = (f"{notes} is not a checkpoint directory of this project, a Hugging Face GPT-2 directory or a nanoGPT "
                f"ckpt.pt (it is not a torch.save archive); give one of those")
    with pytest.raises(CheckpointError) as refused:
        generate.load_model(generate.parse_args(["--checkpoint", notes]), mesh=None)
    assert str(refused.value) == sentence
    assert reshard.main([notes, str(tmp_path / "out")]) == 1, "a source that cannot be read is a failed conversion"
    assert capsys.readouterr().err == f"error: {sentence}\n"


def test_a_tokenizer_file_that_is_no_ranks_file_is_named(text, tmp_path, monkeypatch):
    """Binary bytes given as --tokenizer: one sentence, not the bytes; an empty file is refused the same way."""
    monkeypatch.delenv("RANK", raising=False)
    (tmp_path / "random.bin").write_bytes(bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0))))
    (tmp_path / "empty.tiktoken").write_bytes(b"")
    for name, wrong in (("random.bin", r"line \d+ is not one"), ("empty.tiktoken", "it holds none")):
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as refused:
            train.tokenizer_for(train.parse_args(["--data", text, "--tokenizer", path]), None)
        assert re.fullmatch(rf"{re.escape(path)} is not a \.tiktoken ranks file \(lines of a base64 token and its "
                            rf"rank; {wrong}\) nor a nanoGPT meta\.pkl", str(refused.value)), str(refused.value)


def test_a_ranks_file_is_read_anew(tmp_path):
    """A ranks file rewritten at the same path gives its new ranks (tiktoken's loader caches by path)."""
    path = str(tmp_path / "bpe.tiktoken")
    assert write_ranks(path) == BPETokenizer(path).vocab_size == 262
    assert write_ranks(path, merges=("th",)) == BPETokenizer(path).vocab_size == 258


def test_only_rank_0_speaks(text, capsys, monkeypatch):
    """Under torchrun every rank parses the same arguments; only rank 0 prints the error or the help."""
    for rank, heard in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit:
            train.parse_args(["--data", text, "--batch-size", "0"])
        assert exit.value.code == 2
        assert ("error: argument --batch-size" in capsys.readouterr().err) is heard
        with pytest.raises(SystemExit) as exit:
            generate.parse_args(["--help"])
        assert exit.value.code == 0
        assert ("--max-new-tokens" in capsys.readouterr().out) is heard


def test_a_character_vocabulary_is_read_as_plain_data_of_bounded_size(tmp_path):
    with pytest.raises(ValueError, match=r"missing/meta.pkl cannot be read \(No such file or directory\)"):
        chars_from_meta(str(tmp_path / "missing" / "meta.pkl"))
    # a few bytes claiming a 2**40-byte string, text or bytes: refused, never allocated
    for opcode in (b"\x8d", b"\x8e"):
        (tmp_path / "claim.pkl").write_bytes(b"\x80\x04" + opcode + struct.pack("<Q", 2**40) + b"abc.")
        with pytest.raises(ValueError, match=r"is not a nanoGPT character meta.pkl \(expected 1099511627776 bytes"):
            chars_from_meta(str(tmp_path / "claim.pkl"))
    (tmp_path / "large.pkl").write_bytes(pickle.dumps({"itos": {0: "a"}, "pad": "x" * META_BYTES}))
    with pytest.raises(ValueError, match=r"is over 1,048,576 bytes, too large for a nanoGPT character meta.pkl"):
        chars_from_meta(str(tmp_path / "large.pkl"))
    (tmp_path / "numbers.pkl").write_bytes(pickle.dumps({"itos": {0: 7}}))
    with pytest.raises(ValueError, match="its itos entry 0 is 7, not a single character"):
        chars_from_meta(str(tmp_path / "numbers.pkl"))
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"itos": {0: "a", 1: "\n"}, "stoi": {"a": 0, "\n": 1}}))
    assert chars_from_meta(str(tmp_path / "meta.pkl")) == ["a", "\n"]


def _meta(path, itos):
    path.write_bytes(pickle.dumps({"itos": dict(enumerate(itos)), "stoi": {c: i for i, c in enumerate(itos)}}))
    return str(path)


def test_a_vocabulary_of_repeated_or_longer_entries_is_refused(tmp_path):
    """Two ids for one character decode alike; a two-character entry is never produced by splitting text."""
    with pytest.raises(ValueError, match=r"repeats.pkl is not a nanoGPT character meta.pkl \(its itos entry 2, 'a', "
                                         r"repeats entry 0\)"):
        chars_from_meta(_meta(tmp_path / "repeats.pkl", ["a", "b", "a", "b"]))
    with pytest.raises(ValueError, match=r"its itos entry 1 is 'bc', not a single character"):
        chars_from_meta(_meta(tmp_path / "pairs.pkl", ["a", "bc", "d"]))
    with pytest.raises(ValueError, match=r"the character vocabulary's entry 1, 'x', repeats entry 0"):
        CharTokenizer(["x", "x"])


def test_generate_refuses_a_meta_pkl_of_one_repeated_character(tmp_path):
    """It used to accept 65 'a's for the shipped 65-character model and print aaaa..."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "generate.py"), "--max-new-tokens", "4",
                        "--tokenizer", _meta(tmp_path / "meta.pkl", ["a"] * 65)],
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "error: " in r.stderr and "its itos entry 1, 'a', repeats entry 0" in r.stderr, r.stderr[-2000:]


def test_binary_data_is_named(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"ROMEO:\n" + bytes(range(256)))
    with pytest.raises(ValueError, match=r"data.bin is not UTF-8 text \(byte 135 is b'\\x80'\); give a text file"):
        TextData(str(tmp_path / "data.bin"))


def test_comm_report_refuses_seq_0():
    with pytest.raises(ValueError, match=r"seq=0 must be in 1..block_size=64"):
        comm.comm_report("megatron", tp=2, config="tiny", seq=0)


@pytest.mark.parametrize("bad", ["argparse", "data"])
def test_two_ranks_say_it_once(bad, text, tmp_path):
    """Found on every rank (by argparse, or in train()), said by rank 0 alone, before any traceback torchrun adds."""
    (tmp_path / "data.bin").write_bytes(b"ROMEO:\n" + bytes(range(256)))
    args, message = {
        "argparse": (["--data", text, "--batch-size", "0"], "error: argument --batch-size: '0' is not a whole number"),
        "data": (["--data", str(tmp_path / "data.bin")], f"error: {tmp_path / 'data.bin'} is not UTF-8 text (byte 135"),
    }[bad]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "examples" / "train.py"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode != 0
    assert r.stderr.count(message) == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr.split(message)[0]
