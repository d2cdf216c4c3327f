"""
An emulated multi-node cluster on one Linux machine, to measure what communication costs.

    python benchmarks/cluster.py --nodes 2 --nproc-per-node 2 --rate 100mbit -- \\
        examples/train.py --data ../shared/data/tinyshakespeare.txt --dp 2 --max-iters 20

(as root, with iproute2). Each node is a network namespace; the nodes are joined through a
switch by veth links whose rate `tc` caps, and the job is started on every node by torch's
own launcher, exactly as on real machines.

Topology. Namespace `dtgc-<pid>-<n>-sw` holds a bridge; node i is namespace
`dtgc-<pid>-<n>-n<i>`, whose one interface, eth0 (10.213.0.<i+1>/24), is one end of a veth
pair, the other end a port of that bridge. A packet between nodes crosses two queues: the
sending node's eth0 and the switch port towards the receiving node, each a token bucket
(`tbf`) at --rate, so every node has a full-duplex port of that rate. Ranks of one node reach
each other through the node's own loopback (the kernel routes a namespace's own address
over its `lo`), unshaped: the fast link inside a node. Nothing is added to the host's own
network: no interface, address, route or queueing discipline. `netem` is absent on the
machines this was written on, so no delay is added: a link here is a rate plus the latency
of the kernel's software path (tens of microseconds), not a real wire's.

The job. On node i: `torchrun --nnodes K --nproc-per-node P --rdzv-backend c10d
--rdzv-endpoint 10.213.0.1:29400 --rdzv-id ID --local-addr 10.213.0.<i+1> SCRIPT ...`
with GLOO_SOCKET_IFNAME=eth0, so gloo carries the job over that node's link. The c10d
rendezvous gives out node ranks itself (torchrun ignores --node-rank under it); `--rdzv
static` runs `torchrun --nnodes K --node-rank i --master-addr 10.213.0.1` instead. On real
machines, the same command on every machine, with the first machine's address as the
endpoint and GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) naming the network card, is the job.

A job may change the link rate while it runs (benchmarks/cluster_job.py --rates does, to
interleave rates): run(..., rate_control=True) gives it a folder in $DTGC_RATE_CONTROL; the job
writes a rate ('100mbit', 'unlimited') to the file `want` there, the tool sets it on every link
and writes the same text to `have` (or 'error: ...' when it cannot), and the job goes on.

Every namespace this tool creates is deleted when it ends: normally, on an error, on Ctrl-C,
SIGTERM or SIGHUP; namespaces left by a killed earlier run (their process gone) are deleted
when the next one starts. Every job runs under a timeout, after which it is killed.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from dtensor_gpt.cost import UNITS, parse_rate
from dtensor_gpt.publish import process_alive
from machine import machine_line

PREFIX = "dtgc"
SUBNET = "10.213.0"
RDZV_PORT = 29400


def missing_requirements():
    """One line saying why the cluster cannot run here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return "needs root to create network namespaces and queueing disciplines (run as root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs iproute2 ({' and '.join(missing)} not found)"
    return None


def rate_label(bits_per_second):
    if bits_per_second is None:
        return "unlimited"
    for unit in ("gbit", "mbit", "kbit"):
        if bits_per_second >= UNITS[unit]:
            return f"{bits_per_second / UNITS[unit]:g}{unit}"
    return f"{bits_per_second:g}bit"


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _tc(namespace, *args, check=True):
    return subprocess.run(["tc", "-n", namespace, *args], capture_output=True, text=True, check=check, timeout=30)


def our_namespaces():
    """Names of the namespaces this tool made (any run), from `ip netns list`."""
    listed = _ip("netns", "list").stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(PREFIX + "-")]


def remove_leftovers():
    """Delete namespaces of earlier runs of this tool whose process is gone (killed with SIGKILL, say)."""
    for name in our_namespaces():
        owner = re.match(rf"{PREFIX}-(\d+)-", name)
        if owner and not process_alive(int(owner.group(1))):
            _ip("netns", "del", name, check=False)


def _descendants(pid):
    """Every process started, directly or not, by `pid` (read from /proc), deepest last."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            found += children
            todo += children
    return found


def _stop(processes):
    """SIGTERM the processes we started and everything they started, then SIGKILL what is left after 5 s."""
    pids = []
    for p in processes:
        if p.poll() is None:
            pids += [p.pid] + _descendants(p.pid)
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(p.poll() is None for p in processes):
            time.sleep(0.1)
    for p in processes:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class JobFailed(RuntimeError):
    """A job on the emulated nodes exited with an error or ran past its timeout."""


@dataclass
class NodeOutput:
    node: int
    returncode: int
    output: str


class _Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every namespace is deleted on the way out."""


def _terminate(signum, frame):
    raise _Terminated(f"stopped by signal {signum}")


class Cluster:
    """
    `nodes` emulated machines whose links to the switch run at `rate` (bits/s; None: unshaped).

        with Cluster(2, rate=parse_rate("100mbit")) as cluster:
            outputs = cluster.torchrun(["job.py", "--flag"], nproc_per_node=2, timeout=300)
            cluster.set_rate(parse_rate("1gbit"))

    `burst_seconds` sizes each token bucket: rate x burst_seconds bytes (at least 4 KiB) may
    leave at the software path's speed after an idle moment. Small is faithful to a wire, which
    serializes every byte at its rate; too small and the kernel's timers cannot keep the rate:
    with 200 us, 1 Gbit/s links gave gloo 0.36 Gbit/s on this (loaded) 2-core machine, with
    1 ms (tc's rule of thumb, rate / HZ at HZ=1000) 1.1 Gbit/s, and 100 Mbit/s ones 0.09 and 0.10.
    """

    _serial = 0

    def __init__(self, nodes, rate=None, burst_seconds=1e-3):
        if not 1 <= nodes <= 16:
            raise ValueError(f"nodes={nodes} must be in 1..16")
        reason = missing_requirements()
        if reason:
            raise RuntimeError(f"the emulated cluster {reason}")
        Cluster._serial += 1
        self.name = f"{PREFIX}-{os.getpid()}-{Cluster._serial}"
        self.nodes = nodes
        self.rate = rate
        self.burst_seconds = burst_seconds
        self.switch = f"{self.name}-sw"
        self.namespaces = [f"{self.name}-n{i}" for i in range(nodes)]
        self._handlers = {}
        self._created = []

    def address(self, node):
        return f"{SUBNET}.{node + 1}"

    def __enter__(self):
        if sys.platform.startswith("linux") and _is_main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, _terminate)
        try:
            remove_leftovers()
            self._create()
            self.set_rate(self.rate)
        except BaseException:
            self._delete()
            raise
        return self

    def __exit__(self, *exc):
        self._delete()
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)
        return False

    def _create(self):
        for ns in [self.switch, *self.namespaces]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, ns in enumerate(self.namespaces):
            # both ends are created inside our namespaces: the host never holds either
            _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _delete(self):
        for ns in reversed(self._created):
            _ip("netns", "del", ns, check=False)
        self._created = []

    def links(self):
        """(namespace, interface) of every shaped queue: each node's eth0 and each switch port."""
        return [(ns, "eth0") for ns in self.namespaces] + [(self.switch, f"p{i}") for i in range(self.nodes)]

    def set_rate(self, rate):
        """Cap every node's link at `rate` bits/s in both directions (None: remove the caps)."""
        for ns, dev in self.links():
            if rate is None:
                if "tbf" in _tc(ns, "qdisc", "show", "dev", dev).stdout:
                    _tc(ns, "qdisc", "del", "dev", dev, "root")
            else:
                burst = max(4096, int(rate / 8 * self.burst_seconds))
                _tc(ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(rate)}bit",
                    "burst", str(burst), "latency", "1s")
        self.rate = rate

    def set_link(self, node, up):
        """Plug node's cable into the switch (up) or pull it (down): its switch port; its eth0 loses the carrier."""
        _ip("-n", self.switch, "link", "set", f"p{node}", "up" if up else "down")

    def run(self, commands, timeout, env=None, live=False, rate_control=False, watch=None):
        """
        Run commands[i] inside node i, all at once, and wait for all; stop them all at the
        first failure or at `timeout` seconds. Returns [NodeOutput]; raises JobFailed.
        With `live`, node 0's output also goes to this process's stdout as it comes. With
        `rate_control`, the job sets the link rate itself ($DTGC_RATE_CONTROL, see the module).
        With `watch`, watch([new output of node i]) is called every 50 ms while the job runs,
        and once at its end, from this thread: it may act on the links (set_link, set_rate).
        """
        if len(commands) != self.nodes:
            raise ValueError(f"{len(commands)} commands for {self.nodes} nodes")
        processes, logs = [], []
        with tempfile.TemporaryDirectory(prefix=f"{self.name}-") as tmp:
            control = os.path.join(tmp, "rate")
            if rate_control:
                os.mkdir(control)
                env = {**(env or {}), "DTGC_RATE_CONTROL": control}
            try:
                for i, command in enumerate(commands):
                    log = open(os.path.join(tmp, f"node{i}.log"), "w+")
                    logs.append(log)
                    # no reverse DNS for 10.213.0.x: c10d's warning about it on every connection is noise
                    node_env = {"TORCH_CPP_LOG_LEVEL": "ERROR", **os.environ, **(env or {}), "GLOO_SOCKET_IFNAME": "eth0",
                                "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "DTGC_NODE": str(i)}
                    processes.append(subprocess.Popen(["ip", "netns", "exec", self.namespaces[i], *command],
                                                      stdout=log, stderr=subprocess.STDOUT, env=node_env,
                                                      stdin=subprocess.DEVNULL, start_new_session=True))
                deadline, shown, served = time.monotonic() + timeout, [0] * self.nodes, None
                while any(p.poll() is None for p in processes):
                    _pass_on(logs, shown, live, watch)
                    if rate_control:
                        served = self._serve_rate(control, served)
                    failed = any(p.poll() not in (None, 0) for p in processes)
                    if failed or time.monotonic() > deadline:
                        break
                    time.sleep(0.05 if rate_control or watch else 0.2)
                timed_out = any(p.poll() is None for p in processes) and time.monotonic() > deadline
            finally:
                _stop(processes)
            _pass_on(logs, shown, live, watch)
            outputs = []
            for i, (p, log) in enumerate(zip(processes, logs)):
                log.seek(0)
                outputs.append(NodeOutput(i, p.returncode, log.read()))
                log.close()
        if timed_out or any(o.returncode != 0 for o in outputs):
            why = f"ran past its timeout of {timeout:g} s" if timed_out else "failed"
            tails = "\n".join(f"--- node {o.node} (exit {o.returncode}):\n{o.output[-3000:]}" for o in outputs)
            raise JobFailed(f"the job on {self.nodes} emulated nodes {why}\n{tails}")
        return outputs

    def _serve_rate(self, control, served):
        """Set the rate the job wrote to `want` if it is new, then answer in `have`; returns the text served."""
        try:
            with open(os.path.join(control, "want")) as f:
                wanted = f.read()
        except FileNotFoundError:
            return served
        if wanted == served:
            return served
        try:
            self.set_rate(parse_rate(wanted))
            answer = wanted
        except (ValueError, subprocess.CalledProcessError) as e:
            answer = f"error: {e}"
        with open(os.path.join(control, "have.tmp"), "w") as f:
            f.write(answer)
        os.replace(os.path.join(control, "have.tmp"), os.path.join(control, "have"))
        return wanted

    def torchrun(self, script_and_args, nproc_per_node, timeout, env=None, live=False, rdzv="c10d", rate_control=False,
                 watch=None, max_restarts=0):
        """Start `script_and_args` on every node with torchrun; see the module's docstring."""
        commands = []
        for i in range(self.nodes):
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes),
                       "--nproc-per-node", str(nproc_per_node), "--max-restarts", str(max_restarts),
                       "--local-addr", self.address(i)]
            if rdzv == "c10d":
                command += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.address(0)}:{RDZV_PORT}",
                            "--rdzv-id", self.name, "--rdzv-conf", f"is_host={int(i == 0)}"]
            elif rdzv == "static":
                command += ["--node-rank", str(i), "--master-addr", self.address(0), "--master-port", str(RDZV_PORT)]
            else:
                raise ValueError(f"rdzv={rdzv!r} must be 'c10d' or 'static'")
            commands.append(command + list(script_and_args))
        return self.run(commands, timeout, env=env, live=live, rate_control=rate_control, watch=watch)


def _is_main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


def _pass_on(logs, shown, live, watch):
    """Each node's output since `shown` (its offsets, moved on here): node 0's to stdout with `live`, all to `watch`."""
    if not live and not watch:
        return
    new = []
    for i, log in enumerate(logs):
        with open(log.name) as f:
            f.seek(shown[i])
            new.append(f.read())
        shown[i] += len(new[-1])
    if live:
        sys.stdout.write(new[0])
        sys.stdout.flush()
    if watch:
        watch(new)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python benchmarks/cluster.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--rate", default="unlimited", help="link rate per node, e.g. 100mbit, 1gbit (default: unlimited)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed (default: 600)")
    parser.add_argument("--rdzv", default="c10d", choices=["c10d", "static"])
    parser.add_argument("--rate-control", action="store_true",
                        help="let the job change the rate itself ($DTGC_RATE_CONTROL; cluster_job.py --rates)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS]: what torchrun starts on each node")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the script to run after --")
    reason = missing_requirements()
    if reason:
        print(f"cluster.py: cannot run: it {reason}", file=sys.stderr)
        return 2
    print(machine_line(), flush=True)
    try:
        rate = parse_rate(args.rate)
        with Cluster(args.nodes, rate) as cluster:
            outputs = cluster.torchrun(command, args.nproc_per_node, args.timeout, live=True, rdzv=args.rdzv,
                                       rate_control=args.rate_control)
    except (ValueError, JobFailed, _Terminated, KeyboardInterrupt) as e:
        print(f"cluster.py: {e or 'interrupted'}", file=sys.stderr)
        return 1
    for o in outputs[1:]:
        if o.output.strip():
            print(f"--- node {o.node}:\n{o.output}", end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
