"""
The README's test command is the one CI runs, and every command line that README.md and
docs/*.md show for one of the project's tools parses.

A command line is any line of a code block (indented 4 spaces, or fenced and not Python),
joined over trailing backslashes, and any inline code span that starts with `python` or
`torchrun` (or with environment assignments before them). In it, each `examples/*.py`,
`benchmarks/*.py` or `python -m dtensor_gpt.*` run by `python` or `torchrun` is a tool
invocation (torchrun's own options and anything after a shell operator or redirection are not
the tool's; a tool after `--`, as `benchmarks/cluster.py ... -- examples/train.py ...` starts
one, is checked too). Each is parsed in this process, nothing is run:

- `examples/*.py`: the script's own `parse_args(argv)`, with the checks it makes after
  argparse (a file that must exist, `--dp` against the world size, ...). `WORLD_SIZE` is what
  the command's `--nnodes` x `--nproc-per-node` starts. Paths these scripts check
  (`--data`, `--tokenizer`, `--resume`, `--init-from`, `--checkpoint`) that do not exist here,
  such as `../shared/data/tinyshakespeare.txt` or a checkpoint a previous command would have
  written, are replaced by an empty temporary file: the test checks the command line, not
  the data beside the checkout.
- `python -m dtensor_gpt.*` and `benchmarks/*.py`: their `main()` with `sys.argv` set, and
  argparse's `parse_args` made to stop the program once it has parsed, so nothing after
  argparse runs (no cluster, no training, no checks of files).

So a doc that shows `--plan megatron|spd`, `[--compile]`, `--tp M` or an option a tool no
longer has fails here: show concrete commands and describe the alternatives in prose.
"""

import argparse
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPT = re.compile(r"(examples|benchmarks)/\w+\.py")
RUNNERS = ("python", "python3", "torchrun")
OPERATORS = ("&&", "||", ";", "|", "&")
CHECKED_PATHS = ("--data", "--tokenizer", "--resume", "--init-from", "--checkpoint")
# the tools the README must show a command line for
README_TOOLS = {"examples/generate.py", "examples/train.py", "examples/demo.py", "dtensor_gpt.reshard", "dtensor_gpt.comm",
                "dtensor_gpt.advise"}


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command.startswith("python3 -m venv .venv")
    assert f"    {ci_command}\n" in (ROOT / "README.md").read_text()


def test_the_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    files = [f for folder in ("dtensor_gpt", "plans", "examples", "benchmarks", "tests") for f in (ROOT / folder).glob("*.*")
             if f.suffix in (".py", ".sh")]
    assert not [f.name for f in files if f"{f.name}`" not in readme], "README.md's Layout misses these files"


def shown_commands(path):
    """(line number, command text) of every code line and `python`/`torchrun` code span in a Markdown file."""
    lines = path.read_text().splitlines()
    found, prose, fence, i = [], [], None, 0
    while i < len(lines):
        line, start = lines[i], i + 1
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip().lower()
            prose.append("")
        elif (fence is not None and fence != "python") or (fence is None and line.startswith("    ")):
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            found.append((start, line.strip()))
            prose.extend([""] * (i + 2 - start))
            i += 1
            continue
        else:
            prose.append("" if fence is not None else line)
        i += 1
    text = "\n".join(prose)
    for m in re.finditer(r"`([^`]+)`", text):
        span = m.group(1).replace("\n", " ").strip()
        words = [w for w in span.split() if not re.fullmatch(r"[A-Z_]+=\S*", w)]
        if words and words[0] in RUNNERS:
            found.append((text.count("\n", 0, m.start()) + 1, span))
    return found


def invocations(command):
    """(tool, its arguments, world size) of every project tool the command line runs."""
    if not re.search(r"(examples|benchmarks)/\w+\.py|-m dtensor_gpt\.", command):
        return []
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    segments, current = [], []
    for token in lexer:
        if token in OPERATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    result = []
    for tokens in segments:
        tokens = next((tokens[:i] for i, t in enumerate(tokens) if t[0] in "<>"), tokens)
        world = 1
        for option in ("--nnodes", "--nproc-per-node"):
            if option in tokens and tokens.index(option) + 1 < len(tokens) and tokens[tokens.index(option) + 1].isdigit():
                world *= int(tokens[tokens.index(option) + 1])
        run = False
        for i, token in enumerate(tokens):
            run = run or token in RUNNERS
            if not run:
                continue
            if SCRIPT.fullmatch(token):
                result.append((token, tokens[i + 1:], world))
            elif token == "-m" and i + 1 < len(tokens) and tokens[i + 1].startswith("dtensor_gpt."):
                result.append((tokens[i + 1], tokens[i + 2:], world))
    return result


COMMANDS = [(f"{path.name}:{line}", command) for path in DOCS for line, command in shown_commands(path)]
INVOCATIONS = [(where, command, *call) for where, command in COMMANDS for call in invocations(command)]


class Parsed(Exception):
    """Raised by argparse's parse_args once parsing succeeded, so that nothing after it runs."""


def load(tool):
    if tool.startswith("dtensor_gpt."):
        return importlib.import_module(tool)
    name = "shown_" + tool.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / tool)
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def with_checked_paths_present(args, tmp_path):
    args = list(args)
    for i, arg in enumerate(args[:-1]):
        if arg in CHECKED_PATHS and args[i + 1] not in ("char", "gpt2", "auto") and not os.path.exists(args[i + 1]):
            stand_in = tmp_path / f"stand-in-{i}"
            stand_in.write_text("")
            args[i + 1] = str(stand_in)
    return args


def test_the_docs_show_the_tools():
    shown = {tool for _, _, tool, _, _ in INVOCATIONS}
    readme = {tool for where, _, tool, _, _ in INVOCATIONS if where.startswith("README.md:")}
    assert README_TOOLS <= readme, f"README.md shows no command line for {sorted(README_TOOLS - readme)}"
    assert any(tool.startswith("benchmarks/") for tool in shown)


@pytest.mark.parametrize("where, command, tool, args, world", INVOCATIONS, ids=[f"{w} {t}" for w, _, t, _, _ in INVOCATIONS])
def test_shown_command_parses(where, command, tool, args, world, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = load(tool)
    try:
        if tool.startswith("examples/"):
            module.parse_args(with_checked_paths_present(args, tmp_path))
            return
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, *a, **k):
            raise Parsed(original(self, *a, **k))

        monkeypatch.setattr(sys, "argv", [tool, *args])
        with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop), pytest.raises(Parsed):
            module.main()
    except SystemExit as e:
        pytest.fail(f"{where}: `{command}`: {tool} refused {args} (exit {e.code}): {capsys.readouterr().err.strip()}")
