"""A Ray cluster of several nodes on this machine's loopback interface: the tests of the Ray backend and
the measurement in docs/scale.md run on it (a real cluster is started with `ray start` on each machine).

Each node is its own `ray start --block` process, in its own session and process group, so that stopping the
cluster kills exactly its processes (GCS, raylet, agents, workers and the trials they forked: a trial leads a
process group of its own, lorabench/runner/worker.py, inside its node's session) and nothing else: `ray
stop` would kill every Ray process on the machine, other users' included. Every port is given (free ones,
none of Ray's defaults), the temporary folder is the cluster's own, the object store is small (trials return
a few kilobytes of JSON), and the nodes use 127.0.0.2: Ray replaces 127.0.0.1 with the machine's address
(ray._private.services.resolve_ip_for_localhost), any other loopback address it keeps.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.2"
OBJECT_STORE_BYTES = 80 * 2**20  # Ray's minimum is 75 MiB


def same_niceness_config() -> dict:
    """The `_system_config` of a Ray instance that `ray.init` starts on this machine, so that its workers run at
    this process's niceness: a Ray worker makes itself `worker_niceness` nicer than its raylet when it starts
    (core_worker.cc calls nice(RayConfig::instance().worker_niceness()), default 15), so a trial or a client actor
    in it would yield to every other process on a shared machine (issues 19 and 21: a federated trial took 3,653 s
    beside the tests, 589 s alone); the raylet that `ray.init` starts, and so each worker before it adjusts, has
    this process's niceness. The worker reads the setting from the system config the raylet hands it, over its
    own RAY_worker_niceness. A RAY_worker_niceness set in the environment wins: then this is empty, and the raylet
    and its workers read that variable. (A cluster joined with `--address` keeps its nodes' setting: ray.init
    refuses a `_system_config` there; the loopback cluster below sets RAY_worker_niceness=0 in its nodes.)"""
    return {} if "RAY_worker_niceness" in os.environ else {"worker_niceness": 0}


def session_processes(sid: int) -> list[int]:
    """The processes of session `sid` (from /proc): a node's, whatever process group they moved to."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[3]) == sid:
                    out.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return out


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in session `sid` (a node's trials lead process groups of their own there)."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LoopbackCluster:
    """`with LoopbackCluster(nodes=2, cpus_per_node=1) as c:` a head and `nodes - 1` worker nodes, each a separate
    `ray start` process; `c.address` is what `--address` takes. Leaving the block stops every node."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, env: dict | None = None, start_timeout_s: float = 180):
        self.nodes, self.cpus, self.timeout = nodes, cpus_per_node, start_timeout_s
        # RAY_worker_niceness=0: Ray starts its workers, and so the trials they fork, 15 nicer than the node
        # (its default), which on a shared machine gives them a smaller share of a core than the local backend's
        # trials get; at 0 they run at the node's own niceness, as the local backend's run at the runner's. A value
        # set in `env` wins.
        self.env = {"RAY_worker_niceness": "0", **(os.environ if env is None else env), "RAY_USAGE_STATS_ENABLED": "0"}
        self.procs: list[subprocess.Popen] = []
        self.temp_dir = ""
        self.address = ""

    def _start(self, head: bool) -> subprocess.Popen:
        p = _free_ports(16)
        # --include-log-monitor=false: it only forwards worker output to drivers, which the Ray backend turns off
        args = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--block", "--disable-usage-stats",
                "--include-log-monitor=false",
                f"--node-ip-address={HOST}", f"--num-cpus={self.cpus}", "--num-gpus=0",
                f"--object-store-memory={OBJECT_STORE_BYTES}", f"--node-manager-port={p[0]}",
                f"--object-manager-port={p[1]}", f"--dashboard-agent-listen-port={p[2]}",
                f"--dashboard-agent-grpc-port={p[3]}", f"--runtime-env-agent-port={p[4]}",
                f"--metrics-export-port={p[5]}", f"--worker-port-list={','.join(map(str, p[6:14]))}"]
        if head:
            self.address = f"{HOST}:{p[14]}"
            args += ["--head", f"--port={p[14]}", f"--temp-dir={self.temp_dir}", "--include-dashboard=false",
                     f"--dashboard-port={p[15]}", f"--ray-client-server-port={_free_ports(1)[0]}"]
        else:
            args += [f"--address={self.address}"]  # a worker node uses the head's temporary folder
        log = open(Path(self.temp_dir) / f"node-{len(self.procs)}.log", "wb")  # (a retried node's overwrites)
        proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: stop() kills exactly this node
        log.close()
        self.procs.append(proc)
        return proc

    def _start_node(self, head: bool, tries: int = 3) -> None:
        """Start a node and wait until `ray start` says it runs. On a loaded machine a raylet can miss the 30 s
        that `ray start` gives it to register with the GCS ("The current node timed out during startup"): that
        node's process exits, and it is started again (on new ports), up to `tries` times."""
        for attempt in range(1, tries + 1):
            proc = self._start(head)
            log = Path(self.temp_dir) / f"node-{len(self.procs) - 1}.log"
            deadline = time.monotonic() + self.timeout
            while proc.poll() is None and time.monotonic() < deadline:
                if b"Ray runtime started" in log.read_bytes():
                    return
                time.sleep(0.5)
            if proc.poll() is None:
                raise RuntimeError(f"a Ray node did not start within {self.timeout:.0f} s: {self.logs()}")
            if attempt == tries:
                raise RuntimeError(f"a Ray node exited with code {proc.returncode} as it started, {tries} times: "
                                   f"{self.logs()}")
            try:  # what the failed start left running (a head's GCS)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.procs.remove(proc)

    def wait_for_nodes(self, n: int, timeout_s: float) -> int:
        """Wait until the head's GCS reports `n` nodes alive (asked from a short-lived process, so that this
        one never joins the cluster); returns how many are."""
        code = ("import sys, time, ray\n"
                "ray.init(address=sys.argv[1], log_to_driver=False)\n"
                "deadline = time.monotonic() + float(sys.argv[3])\n"
                "alive = lambda: sum(1 for node in ray.nodes() if node['Alive'])\n"
                "while alive() < int(sys.argv[2]) and time.monotonic() < deadline:\n"
                "    time.sleep(0.5)\n"
                "print('alive', alive())\n")
        out = subprocess.run([sys.executable, "-c", code, self.address, str(n), str(timeout_s)], env=self.env,
                             capture_output=True, text=True, timeout=timeout_s + 120)
        counts = [line.split()[1] for line in out.stdout.splitlines() if line.startswith("alive ")]
        return int(counts[-1]) if counts else 0  # the other lines are Ray's

    def __enter__(self) -> LoopbackCluster:
        # short: unix socket paths under it must stay within 107 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="lbray-", dir="/tmp")
        try:
            for n in range(1, self.nodes + 1):  # one after the other: a worker node needs a head that answers
                self._start_node(head=n == 1)
            alive = self.wait_for_nodes(self.nodes, self.timeout)
            if alive < self.nodes:
                raise RuntimeError(f"{alive} of the {self.nodes} Ray nodes are alive: {self.logs()}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def logs(self) -> str:
        return " | ".join(p.read_text(errors="replace")[-600:] for p in sorted(Path(self.temp_dir).glob("node-*.log")))

    def node_group(self, i: int) -> int:
        """The process group of node i (0 = the head): every process of that node is in it."""
        return self.procs[i].pid

    def stop_node(self, i: int) -> None:
        """Kill node i and everything it started (SIGKILL: a node lost, not shut down)."""
        try:
            os.killpg(self.procs[i].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_session(self.procs[i].pid)
        self.procs[i].wait()

    def stop(self) -> None:
        for proc in reversed(self.procs):  # workers first, then the head
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its node's processes on SIGTERM
            except ProcessLookupError:
                continue
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:  # whatever is left of the group (a worker that ignored SIGTERM)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _kill_session(proc.pid)  # and of the session: trials in their own groups, what they started
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
