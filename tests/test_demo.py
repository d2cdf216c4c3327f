"""
examples/demo.py: the exact plans match one device; spd's differences are labelled as its
approximation; the model's size is printed once per job and no DTensor note reaches the user.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOGITS = r"max \|logits - single device\| +([\d.e+-]+)"


@pytest.mark.parametrize("plan", ["megatron-sp", "spd"])
def test_demo(plan):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "examples" / "demo.py"), "--plan", plan, "--spd-blocks", "last:1", "--seq", "8"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("number of parameters:") == 1, "the model's size once per job, not per rank"
    assert r.stderr == "", "no warnings a user cannot act on (megatron-sp: DTensor's numel=1 note)"
    difference = float(re.search(LOGITS, r.stdout).group(1))
    if plan == "spd":
        assert "plan spd drops the sync point of blocks [1] by design (Sync-Point Drop)" in r.stdout
        assert re.search(LOGITS + r"  \(SPD's approximation, not an error\)", r.stdout) and difference > 1e-3
    else:
        assert "approximation" not in r.stdout and difference < 1e-5
