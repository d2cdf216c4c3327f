"""
Training survives a dead or stalled rank: torchrun --max-restarts runs the same command again,
--resume auto continues from the run's last checkpoint, and the run ends as an uninterrupted one.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import write_text

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
        "--warmup-iters", "2", "--eval-interval", "1000", "--eval-iters", "1", "--log-interval", "1",
        "--dropout", "0.1", "--max-iters", "12", "--save-interval", "4", "--always-save-checkpoint"]


def torchrun(tmp_path, name, *argv, restarts=0, fault=""):
    """examples/train.py under torchrun on 2 processes, its output in tmp_path/name.out and .err."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DTENSOR_GPT_FAULT=fault)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={restarts}", str(ROOT / "examples" / "train.py"), *argv]
    return subprocess.Popen(cmd, stdout=open(tmp_path / f"{name}.out", "w"), stderr=open(tmp_path / f"{name}.err", "w"),
                            env=env, cwd=tmp_path)


def stopped_child(launcher):
    """The pid of torchrun's worker that is stopped (SIGSTOP), or None."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "T" and int(fields[1]) == launcher:
            return int(entry)
    return None


def tensors(directory):
    from safetensors.torch import load_file

    return {(f.name, k): v for f in sorted(directory.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_a_killed_or_stalled_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(tmp_path):
    """
    One job, TP=2, four attempts: rank 1 killed as iteration 6 begins; rank 0 killed while saving at
    iteration 8 (its file written, no index); rank 1 stopped (SIGSTOP) at iteration 10, which rank 0
    reports after --timeout 3 s; then the run ends. Against one uninterrupted run of the same command.
    Beside it, at the same time, the same for --dp 2 --tp 1 with rank 1 killed at iteration 6: the
    batch's rows and dropout masks of each data-parallel rank must follow it through the restart.
    """
    write_text(tmp_path / "text.txt", words=8)
    common = ["--data", "text.txt", *TINY, "--resume", "auto"]
    reference = torchrun(tmp_path, "reference", *common, "--timeout", "3", "--out", "reference")
    faults = "rank=1,iter=6,kill; rank=0,iter=8,save,kill; rank=1,iter=10,stop"
    job = torchrun(tmp_path, "job", *common, "--timeout", "3", "--out", "run", restarts=3, fault=faults)
    dp = ["--dp", "2", "--timeout", "30"]  # no stall here: a long timeout, against the load of 3 other jobs
    dp_reference = torchrun(tmp_path, "dp-reference", *common, *dp, "--out", "dp-reference")
    dp_job = torchrun(tmp_path, "dp-job", *common, *dp, "--out", "dp-run", restarts=1, fault="rank=1,iter=6,kill")
    named = {"job": job, "reference": reference, "dp-job": dp_job, "dp-reference": dp_reference}
    stalled = None
    try:
        deadline = time.time() + 400
        while stalled is None and job.poll() is None and time.time() < deadline:
            time.sleep(0.2)
            pid = stopped_child(job.pid)
            if pid and f"Sending process {pid} closing signal SIGTERM" in (tmp_path / "job.err").read_text():
                stalled = pid
                os.kill(pid, signal.SIGCONT)  # to its pending SIGTERM (torchrun would SIGKILL it after 30 s)
        for name, process in named.items():
            assert process.wait(timeout=max(1, deadline - time.time())) == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    finally:
        for process in named.values():
            process.kill()
            process.wait()
    out, err = (tmp_path / "job.out").read_text(), (tmp_path / "job.err").read_text()
    assert re.findall(r"^--resume auto: .*$", out, re.M) == [
        "--resume auto: run holds no checkpoint of this run; starting it at iteration 0",
        "--resume auto: continuing this run from run at iteration 4 (torchrun restart 1)",
        "--resume auto: continuing this run from run at iteration 4 (torchrun restart 2)",  # the save at 8 never was
        "--resume auto: continuing this run from run at iteration 8 (torchrun restart 3)",
    ]
    assert_ends_as_uninterrupted(tmp_path, "job", "run", "reference", printed=6 + 4 + 6 + 4)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert ("error: rank 0: a collective in iteration 10's training step did not complete within --timeout 3 s: rank(s) 1 "
            "do not answer (stalled or dead); raise --timeout if the job is merely slow (gloo: Timed out waiting 3000ms "
            "for recv operation to complete)") in errors, err[-3000:]
    assert_lost_a_peer(errors[:-1])  # the killed ones, if the survivor spoke before torchrun stopped it
    assert stalled is not None
    assert re.search(r"note: removed \S*\.run\.tmp-\d+\S*, left by a save or conversion that was killed", err), err[-3000:]

    assert re.findall(r"^--resume auto: .*$", (tmp_path / "dp-job.out").read_text(), re.M) == [
        "--resume auto: dp-run holds no checkpoint of this run; starting it at iteration 0",
        "--resume auto: continuing this run from dp-run at iteration 4 (torchrun restart 1)",
    ]
    assert_ends_as_uninterrupted(tmp_path, "dp-job", "dp-run", "dp-reference", printed=6 + 8)
    dp_err = (tmp_path / "dp-job.err").read_text()
    assert_lost_a_peer([line for line in dp_err.splitlines() if line.startswith("error:")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["text.txt", "run", "reference", "dp-run", "dp-reference"] +
        [f"{name}.{stream}" for name in ("job", "reference", "dp-job", "dp-reference") for stream in ("out", "err")]
    ), "no lock, no leftovers"


def assert_ends_as_uninterrupted(tmp_path, job, out, reference, printed):
    """Each loss `job` printed is the uninterrupted run's at that iteration; its last checkpoint is that run's, bit for bit."""
    straight = dict(re.findall(r"^iter (\d+): loss (\S+),", (tmp_path / f"{reference}.out").read_text(), re.M))
    losses = re.findall(r"^iter (\d+): loss (\S+),", (tmp_path / f"{job}.out").read_text(), re.M)
    assert len(straight) == 12 and len(losses) == printed
    assert [loss for it, loss in losses] == [straight[it] for it, _ in losses], "each step repeats the straight run's"
    final, straight_final = tensors(tmp_path / out), tensors(tmp_path / reference)
    assert final.keys() == straight_final.keys() and len(final) > 10
    assert all(torch.equal(final[k], straight_final[k]) for k in final), "bit-identical weights, AdamW, data order"


def assert_lost_a_peer(errors):
    for line in errors:
        assert re.fullmatch(r"error: rank (0|1): a collective in (iteration 6's training step|saving run at iteration 8) "
                            r"lost a peer's connection: rank\(s\) (?!\1)[01] do not answer \(stalled or dead\) "
                            r"\(gloo: Connection (reset|closed) by peer\)", line), line


WORKER = """
import os, torch, torch.distributed as dist
from launch import init_distributed  # from its file: the package would import the model as well
init_distributed(timeout=10)
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(total.item(), flush=True)
os._exit(0)
"""


def test_a_new_round_meets_although_the_nodes_count_restarts_differently():
    """
    torchrun's agents keep one store for all rounds, and after a cut link the nodes' restart counts
    differ: the node cut off rejoins the next round without counting a failure (benchmarks/link_cut.py
    shows it on the emulated cluster). Two workers of a second round, restart counts 1 and 0, over
    the first round's keys, still meet: 1 + 2 = 3 on both.
    """
    agents = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    env = dict(os.environ, TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(agents.port),
               WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "dtensor_gpt"))
    for counts in ((0, 0), (1, 0)):
        workers = [subprocess.Popen([sys.executable, "-c", WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r),
                                                        TORCHELASTIC_RESTART_COUNT=str(count)))
                   for r, count in enumerate(counts)]
        try:
            results = [w.communicate(timeout=60) for w in workers]
        finally:
            for w in workers:
                w.kill()
                w.wait()
        assert [w.returncode for w in workers] == [0, 0] and [out for out, _ in results] == ["3.0\n"] * 2, results
