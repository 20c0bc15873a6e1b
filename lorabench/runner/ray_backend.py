"""Trials as Ray tasks on a cluster: `python -m lorabench run SUITE --backend ray [--address ADDR]` (docs/scale.md).

Ray schedules: each trial is one Ray task asking for the CPUs its suite gives it (`train.threads`, else one),
placed by Ray on any node that has them. The task runs the trial exactly as the local backend does, in a
fresh process forked on that node (lorabench.runner.run.run_one: its own memory peak, the timeout, a crash or
an out-of-memory kill becoming a failed result with its reason), and sends the result back; this process (the
driver) alone writes the records, appending each as its trial ends (lorabench/runner/run.py). A task lost with
its worker process or its node (Ray raises WorkerCrashedError, NodeDiedError, ...) is submitted again, at most
`retries` times; the record says how many attempts it took and what became of the earlier ones.

The task is a Ray generator: it first yields where it runs, so that the driver's one progress line counts the
trials running (Ray queues the others until a node has the CPUs), then the result.
"""
from __future__ import annotations

import logging
import socket
import time
import warnings

import ray

from lorabench.errors import UserError
from lorabench.runner.ray_cluster import same_niceness_config

RETRIES = 2  # a trial lost with its worker or node runs at most 1 + RETRIES times


def trial_cpus(spec) -> int:
    """The CPUs a trial asks the cluster for, and the torch threads it then uses: its `train.threads`,
    else one (a node with C CPUs runs C such trials at once)."""
    return int(spec.train.get("threads") or 1)


def _trial_task(spec_data: dict, timeout_s: float | None, threads: int):
    """Runs on a node: yields where it runs, then {result, started, finished, wall_s, where}."""
    where = {"backend": "ray", "node": socket.gethostname(), "node_ip": ray.util.get_node_ip_address(),
             "ray_node_id": ray.get_runtime_context().get_node_id()}
    yield where
    from lorabench.harness.trial import TrialSpec
    from lorabench.measure.provenance import environment
    from lorabench.runner.run import _now, run_one
    started, t0 = _now(), time.perf_counter()
    result = run_one(TrialSpec(**spec_data), timeout_s, progress=False, threads=threads)
    yield {"result": result, "started": started, "finished": _now(), "wall_s": round(time.perf_counter() - t0, 3),
           "where": environment() | where}


def _check_reachable(address: str | None) -> None:
    """A HOST:PORT that nothing answers gets an error at once: ray.init would retry for minutes."""
    if address is None or address == "auto" or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--address {address!r} is not HOST:PORT (the address `ray start --head` prints, "
                        f"e.g. 10.0.0.5:6379), 'auto', or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise UserError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                        f"`ray start --head` on that machine, or leave --address out to start Ray on this one") from None


class RayBackend:
    """`with RayBackend(address) as backend: run_suite(..., backend=backend)`. `address`: a running cluster's
    (`ray start --head` prints it; "auto" finds the one this machine belongs to); None starts a Ray instance
    on this machine for this run, stopped at the end."""

    def __init__(self, address: str | None = None, retries: int = RETRIES):
        if retries < 0:
            raise UserError(f"--retries must be at least 0, got {retries}")
        self.address, self.retries = address, retries

    def __enter__(self) -> RayBackend:
        # Without an address, Ray started here for this run ("local": never a cluster that `ray start` left on
        # this machine, which ray.init(address=None) would join), its workers, and so the trials they fork, at this
        # process's niceness (ray.init refuses a _system_config when it joins a cluster)
        kwargs = ({"address": "local", "include_dashboard": False, "_system_config": same_niceness_config()}
                  if self.address is None else {"address": self.address})
        _check_reachable(self.address)
        try:
            # log_to_driver=False: the trials' output stays in the nodes' logs; the driver prints one line per
            # event. Ray's own INFO lines and its tip about GPU variables (trials ask for no GPU) would interleave.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
                ray.init(log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        except ConnectionError as e:  # "auto" without a cluster on this machine, a ray:// without a server
            raise UserError(f"--address {self.address}: no Ray cluster answers there ({e}); start one with "
                            f"`ray start --head` (it prints the address), or leave --address out to start Ray "
                            f"on this machine") from None
        self.task = ray.remote(num_returns="streaming", max_retries=0)(_trial_task)  # retries: run() counts them
        return self

    def __exit__(self, *exc) -> None:
        ray.shutdown()  # a cluster joined by --address goes on; one started by __enter__ stops

    def run(self, pending: list, timeout_s: float | None, record, finish, log) -> None:
        """Run `pending` [(name, trial id, TrialSpec)] as Ray tasks; `finish(name, record)` each as it ends.
        `record(...)` builds a record (lorabench.runner.run.run_suite)."""
        from dataclasses import asdict
        cpus = ray.cluster_resources().get("CPU", 0)
        log(f"ray: {len(ray.nodes())} node(s), {cpus:g} CPUs; {len(pending)} trials to run, each on its "
            f"train.threads CPUs (else 1), lost ones retried up to {self.retries} times")
        flight: dict = {}  # generator -> [name, tid, spec, attempt, lost attempts, where]

        def submit(name, tid, spec, attempt: int, lost: list) -> None:
            n = trial_cpus(spec)
            gen = self.task.options(num_cpus=n, name=f"trial {spec.label} {spec.task} seed {spec.seed}").remote(
                asdict(spec), timeout_s, n)
            flight[gen] = [name, tid, spec, attempt, lost, None]

        for name, tid, spec in pending:
            submit(name, tid, spec, 1, [])
        total, done, failed, t0 = len(pending), 0, 0, time.monotonic()
        # Ctrl-C or a killed driver: leaving `with RayBackend` (ray.shutdown) or the driver's death ends this
        # Ray job, and Ray kills its tasks, whose trial processes die with them (worker._die_with_runner).
        while flight:
            ready, _ = ray.wait(list(flight), num_returns=1, timeout=60)
            for gen in ready:
                name, tid, spec, attempt, lost, where = flight.pop(gen)
                try:
                    value = ray.get(next(gen))
                except StopIteration:  # cannot happen: the task yields twice and the second yield ends it here
                    raise AssertionError(f"{name}: the Ray task ended without a result") from None
                except ray.exceptions.RayTaskError as e:  # raised by lorabench's own task code: not a lost node
                    rec = self._failed(record, tid, spec, where, attempt, lost, f"ray task error: {e}"[:2000])
                except ray.exceptions.RayError as e:  # the worker process or its node was lost
                    reason = (type(e).__name__ + (f" on node {where['ray_node_id'][:12]}" if where else "")
                              + f": {str(e).strip().splitlines()[0][:300]}")
                    if attempt <= self.retries:
                        log(f"{name}: attempt {attempt} lost ({reason}); submitted again")
                        submit(name, tid, spec, attempt + 1, lost + [reason])
                        continue
                    rec = self._failed(record, tid, spec, where, attempt, lost + [reason],
                                       f"lost {attempt} time(s), the last as {reason}")
                else:
                    if "result" not in value:  # the first yield: it runs, there
                        flight[gen] = [name, tid, spec, attempt, lost, value]
                        log(f"{name}: running on node {value['ray_node_id'][:12]} ({value['node_ip']})")
                        continue
                    rec = record(tid, spec, value["result"], value["started"], value["finished"], value["wall_s"],
                                 1, value["where"] | {"attempts": attempt, "lost_attempts": lost})
                finish(name, rec)
                done += 1
                failed += rec["status"] != "ok"
                running = sum(1 for v in flight.values() if v[5] is not None)
                elapsed = time.monotonic() - t0
                log(f"progress: {done}/{total} done, {running} running, {failed} failed; "
                    f"{elapsed / 60:.1f} min so far, ETA {elapsed / done * (total - done) / 60:.1f} min")

    @staticmethod
    def _failed(record, tid, spec, where, attempt, lost, error) -> dict:
        from lorabench.measure.provenance import environment
        from lorabench.runner.run import _now
        here = environment() | (where or {"backend": "ray", "node": None})
        return record(tid, spec, {"status": "failed", "error": error, "traceback": "\n".join(lost)}, _now(), _now(),
                      None, 1, here | {"attempts": attempt, "lost_attempts": lost})
