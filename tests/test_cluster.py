"""
The emulated cluster (benchmarks/cluster.py): its namespaces are made and always removed, the
host's own network is never touched, a real 2-node torchrun job runs across it, and a capped
link is slower than an uncapped one by what its rate says.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cluster  # noqa: E402
from cluster import Cluster, JobFailed, missing_requirements, parse_rate  # noqa: E402
from dtensor_gpt.comm import comm_report  # noqa: E402
from dtensor_gpt.cost import measure_options  # noqa: E402

needs_cluster = pytest.mark.skipif(missing_requirements() is not None,
                                   reason=f"the emulated cluster {missing_requirements()}")


def host_network():
    """The host's interfaces, addresses, routes and queueing disciplines, as `ip` and `tc` print them."""
    run = lambda *cmd: subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return run("ip", "-br", "link") + run("ip", "-br", "addr") + run("ip", "route") + run("tc", "qdisc", "show")


def namespaces():
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split())


RECEIVER = """
import socket, time
s = socket.socket(); s.bind(("10.213.0.2", 5999)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); got, start = 0, None
while got < {n}:
    data = c.recv(1 << 16)
    if not data:
        break
    start = start or time.perf_counter()
    got += len(data)
print(got, time.perf_counter() - start)
"""
SENDER = """
import socket, time
for _ in range(100):
    try:
        c = socket.create_connection(("10.213.0.2", 5999), timeout=20); break
    except OSError:
        time.sleep(0.05)
c.sendall(b"x" * {n}); c.close()
"""


def transfer_seconds(c, n):
    """Seconds node 0 takes to send n bytes to node 1 over TCP (from the receiver's first byte to its last)."""
    outputs = c.run([[sys.executable, "-c", SENDER.format(n=n)], [sys.executable, "-c", RECEIVER.format(n=n)]], timeout=60)
    got, seconds = outputs[1].output.split()
    assert int(got) == n
    return float(seconds)


@needs_cluster
def test_a_capped_link_is_slower_by_its_rate_and_nothing_stays():
    before = host_network()
    with Cluster(2, rate=parse_rate("20mbit")) as c:
        made = {c.switch, *c.namespaces}
        assert made <= namespaces()
        assert host_network() == before  # both veth ends live in our namespaces
        shaped = transfer_seconds(c, 1_000_000)
        c.set_rate(None)
        unshaped = transfer_seconds(c, 1_000_000)
    assert not made & namespaces()
    assert host_network() == before
    assert shaped >= 0.9 * 1_000_000 * 8 / 20e6  # 0.4 s at 20 Mbit/s, less the bucket's first 4 KiB
    assert unshaped < shaped / 5


JOB = str(BENCHMARKS / "cluster_job.py")
TINY = ["--config", "tiny", "--context", "8", "--new", "3", "--train-seq", "8", "--repeats", "1"]


@needs_cluster
@pytest.mark.parametrize("rdzv, rates, rows, measures", [("c10d", ["unlimited", "20mbit"], 1, ["prefill", "decode", "train"]),
                                                        ("static", ["unlimited"], 2, ["prefill", "decode"])])
def test_two_node_torchrun_job(tmp_path, rdzv, rates, rows, measures):
    """
    torchrun on 2 nodes (c10d rendezvous, or --node-rank with a static one): the tiny model's
    prefill, decoding and training step (or a batch of 2 rows' prefill and decoding alone) run
    under megatron and issue exactly the collectives dtensor_gpt.comm counts; the job sets each
    rate in turn, and a 256 KiB all-reduce over a 20 Mbit/s link takes at least its bytes over
    the rate, an unlimited link does it 5 times faster than that.
    """
    out = tmp_path / "result.json"
    before = host_network()
    with Cluster(2) as c:
        c.torchrun([JOB, "--out", str(out), "--rates", ",".join(rates), "--collectives", "262144", "--plans", "megatron",
                    *TINY, "--decode-rows", str(rows), "--measures", ",".join(measures)],
                   nproc_per_node=1, timeout=150, rdzv=rdzv, rate_control=True)
        made = {c.switch, *c.namespaces}
    assert not made & namespaces() and host_network() == before
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and sorted(node for _, _, node in result["placement_of_ranks"]) == [0, 1]
    row = result["plans"][0]
    assert [m for m in ("prefill", "decode", "train") if m in row] == measures
    for measure in measures:
        assert sorted(row[measure]) == sorted(rates) and all(t > 0 for t in row[measure].values())

    for measure in measures:  # as the cost model counts them
        r = comm_report("megatron", tp=2, config="tiny", **measure_options(measure, 8, rows if measure != "train" else 1))
        counts = Counter()
        for c in r["collectives"]:
            counts[(c["kind"], c["message_bytes"])] += c["count"]
        assert row[f"{measure}_collectives"] == sorted([k, b, n] for (k, b), n in counts.items()), measure
    all_reduce = {rate: result["collectives"]["seconds"][rate]["all_reduce"]["262144"] for rate in rates}
    on_the_wire = 262144 * 8 / 20e6  # 2 ranks: each sends the whole message once (ring: 2(N-1)/N)
    assert all_reduce["unlimited"] < on_the_wire / 5
    if "20mbit" in rates:
        assert all_reduce["20mbit"] >= 0.9 * on_the_wire


ASKS_FOR_RATES = """
import os, subprocess, time
control, answer = os.environ["DTGC_RATE_CONTROL"], None
for rate in ("20mbit", "fast"):
    with open(os.path.join(control, "want.tmp"), "w") as f:
        f.write(rate)
    os.replace(os.path.join(control, "want.tmp"), os.path.join(control, "want"))  # whole, as the tool reads it
    while True:
        try:
            have = open(os.path.join(control, "have")).read()
        except FileNotFoundError:
            have = None
        if have not in (None, answer):
            break
        time.sleep(0.02)
    answer = have
    print(rate, "->", have)
    print(subprocess.run(["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True).stdout, flush=True)
"""


@needs_cluster
def test_a_job_sets_the_link_rate_itself():
    """A job writes a rate to $DTGC_RATE_CONTROL/want: the tool caps its links at it, or answers why not."""
    with Cluster(2) as c:
        node0 = c.run([[sys.executable, "-c", ASKS_FOR_RATES], ["true"]], timeout=30, rate_control=True)[0].output
    capped, refused = node0.split("fast ->")
    assert capped.startswith("20mbit -> 20mbit") and "tbf" in capped and "rate 20Mbit" in capped
    assert refused.startswith(" error: link rate 'fast' is not a rate such as 100mbit")


STOPPED_RUN = f"""
import sys
sys.path.insert(0, {str(BENCHMARKS)!r})
from cluster import Cluster, parse_rate
with Cluster(2, rate=parse_rate("10mbit")) as c:
    print(c.name, flush=True)
    c.run([[sys.executable, "-c", "import time; time.sleep(120)"]] * 2, timeout=100)
"""


def sleeping(pid):
    """The processes under `pid` that run the sleeping job (on each node)."""
    found = []
    for child in cluster._descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"time.sleep(120)" in f.read():
                    found.append(child)
        except FileNotFoundError:
            pass
    return found


@needs_cluster
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_run_removes_its_namespaces_and_processes(sig):
    before = host_network()
    run = subprocess.Popen([sys.executable, "-c", STOPPED_RUN], stdout=subprocess.PIPE, text=True)
    try:
        name = run.stdout.readline().strip()
        deadline = time.monotonic() + 20
        while len(sleeping(run.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        started = sleeping(run.pid)
        assert len(started) == 2
        assert name.startswith("dtgc-") and {f"{name}-n0", f"{name}-n1", f"{name}-sw"} <= namespaces()
        run.send_signal(sig)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
    assert not any(ns.startswith(name + "-") for ns in namespaces())
    assert all(not os.path.exists(f"/proc/{pid}") for pid in started)
    assert host_network() == before


@needs_cluster
def test_leftovers_of_a_killed_run_are_removed_at_the_next_start():
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead, alive = f"dtgc-{gone.pid}-1-n0", f"dtgc-{os.getpid()}-999-n0"
    for ns in (dead, alive):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with Cluster(1):
            pass
        assert dead not in namespaces()
        assert alive in namespaces()  # its owner (this process) still runs: not a leftover
    finally:
        for ns in (dead, alive):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_cluster
def test_a_job_past_its_timeout_is_stopped():
    with Cluster(1) as c:
        start = time.monotonic()
        with pytest.raises(JobFailed, match="ran past its timeout of 1 s"):
            c.run([[sys.executable, "-c", "import time; time.sleep(60)"]], timeout=1)
        assert time.monotonic() - start < 15


def test_without_root_or_iproute2_it_says_why_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert missing_requirements() == "needs root to create network namespaces and queueing disciplines (run as root)"
    assert cluster.main(["--nodes", "2", "--", "job.py"]) == 2
    assert capsys.readouterr().err == ("cluster.py: cannot run: it needs root to create network namespaces and "
                                       "queueing disciplines (run as root)\n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.shutil, "which", lambda tool: None if tool == "tc" else "/sbin/" + tool)
    assert missing_requirements() == "needs iproute2 (tc not found)"


def test_rates():
    assert parse_rate("100mbit") == 100e6 and parse_rate("2.5gbit") == 2.5e9 and parse_rate("unlimited") is None
    with pytest.raises(ValueError, match="'fast' is not a rate such as 100mbit, 1gbit or unlimited"):
        parse_rate("fast")
