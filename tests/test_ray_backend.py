"""The Ray backend (issue 21, docs/scale.md) on a real two-node Ray cluster on the loopback interface: a head
and a worker node, each its own `ray start` process with one CPU (lorabench/runner/ray_cluster.py), the
driver being `python -m lorabench run SUITE --backend ray --address ...` as a user runs it.

- the smoke suite gives the same records as the local backend, apart from where and how long each trial ran;
- a trial whose worker process is killed mid-trial is run again, and its record says so (WorkerCrashedError);
  then the worker node is killed while another trial runs on it: that trial is run again on the head
  (NodeDiedError), and the suite finishes with every trial recorded once;
- a small deterministic suite gives the same report on both backends (the report of the Ray records given the
  local records' timing and place fields is the local report, byte for byte);
- a driver killed mid-run leaves no trial running, and the same command resumes it, every trial recorded once.

Starting a cluster takes 20-70 s on a 2-core machine, so the tests that start one are slow (.ci/run runs them).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorabench.runner.records import read_records
from lorabench.runner.suite import load_suite, trial_id
from tests.conftest import REPO, run_cli

# What may differ between two runs of the same trial: when, how long, how much memory (per-process
# measurements), and where and how it was scheduled. Everything else (scores, per-example outcomes, losses,
# curves, parameters, configs, provenance) must be equal.
TIMING = {"started_at", "finished_at", "wall_s", "trial_seconds", "trial_cpu_seconds", "train_seconds", "eval_seconds",
          "train_tokens_per_s", "eval_tokens_per_s", "peak_rss_mb", "rss_after_load_mb", "load"}
WHERE = {"node", "backend", "node_ip", "ray_node_id", "attempts", "lost_attempts", "jobs"}
# How the run was invoked, not what a trial computed: the Ray run selects its methods with `methods=...`,
# the local run it is compared with ran the whole smoke suite (the trial ids, which hash the trial's
# config, must still be equal).
INVOCATION = {"overrides"}

TINY = """suite: {name}
version: 1
seeds: {seeds}
train: {{steps: {steps}, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 0}}
tasks:
  - {{name: rt-sentiment, model: tiny-bert, options: {{n_train: 16, n_eval: 16}}}}
methods:
  - head
"""

# One pytest-xdist worker runs this module (its Ray cluster is module-scoped) and test_runner's smoke test, so the
# session's smoke_local records (tests/conftest.py) are computed once.
pytestmark = pytest.mark.xdist_group("smoke")


def comparable(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k not in TIMING | WHERE | INVOCATION}
    if isinstance(out.get("method_metrics"), dict):  # a method's own timings (star's scoring_seconds, ...)
        out["method_metrics"] = {k: v for k, v in out["method_metrics"].items() if not k.endswith("_seconds")}
    return out


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install -e '.[ray]'")
    from lorabench.runner.ray_cluster import LoopbackCluster
    with LoopbackCluster(nodes=2, cpus_per_node=1) as c:
        yield c


def tiny_suite(tmp_path: Path, name: str, steps: int = 2, seeds: int = 4) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY.format(name=name, steps=steps, seeds=list(range(seeds))))
    return p


def trial_processes(group: int, other_than: int | None = None) -> list[int]:
    """The trial processes running on a node (its session, whose id is the node's process group's: each trial leads
    a process group of its own inside it, worker._own_process_group): children of a fork server (worker.py), other
    than those of the fork server `other_than`."""
    out = []
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ppid, sid = int(stat[1]), int(stat[3])
            if sid == group and ppid != other_than and b"multiprocessing.forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
                    b"multiprocessing.forkserver" in Path(f"/proc/{ppid}/cmdline").read_bytes():
                out.append(pid)
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return out


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def ray_run(suite, records: Path, address: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "lorabench", "run", str(suite), "--records", str(records), "--backend", "ray",
            "--address", address, *args]


@pytest.mark.parametrize("address,message", [
    ("127.0.0.2:9", "--address 127.0.0.2:9: no Ray cluster answers there"),
    ("nowhere", "--address 'nowhere' is not HOST:PORT"),
])
def test_an_address_without_a_cluster_gets_one_clear_error_at_once(tmp_path, address, message):
    pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install -e '.[ray]'")
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", str(tiny_suite(tmp_path, "nowhere")), "--records", str(records), "--backend", "ray",
                   "--address", address, timeout=300)  # ray.init alone would retry for minutes
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: " + message), proc.stderr[-2000:]
    assert not records.exists()


def test_ray_started_here_runs_the_trials_at_the_runners_niceness(monkeypatch):
    """Without --address the Ray backend starts Ray on this machine (ray.init); Ray's workers, which fork the
    trials, make themselves 15 nicer than the node by default (RAY_worker_niceness), and so yielded to every
    other process on a shared core (issues 19 and 21). They must run at the runner's niceness, as the local
    backend's trials do."""
    ray = pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install -e '.[ray]'")
    from lorabench.runner.ray_backend import RayBackend
    if os.nice(0) >= 19:
        pytest.skip("at niceness 19 a worker cannot be nicer: the check cannot fail")
    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # the setting's default (a value set there wins)

    def niceness() -> int:
        import os
        return os.nice(0)
    with RayBackend():
        worker = ray.get(ray.remote(niceness).options(num_cpus=1).remote(), timeout=300)
    assert worker == os.nice(0), f"a Ray worker runs at niceness {worker}, the runner at {os.nice(0)}"


# The smoke suite's methods whose trials the Ray backend runs in the comparison below: one of each kind of
# trial (plain adapters, full and head, quantized bases, a custom training loop with its own stages, a rank
# schedule, a Laplace predictive after training, training-time attention, prompt selection by RL, a federated
# method in its clients scenario) rather than all 58, which took ~1,000 s of CI's time for no other path.
RAY_SMOKE_METHODS = "full,head,lora,dora,qlora,loftq,adalora,relora,laplace-lora,longlora,pillow,fedit"


@pytest.mark.slow
def test_smoke_suite_on_two_nodes_records_what_the_local_backend_records(cluster, smoke_local, tmp_path):
    local_proc, local_path = smoke_local
    assert local_proc.returncode == 0, local_proc.stderr[-2000:]
    records = tmp_path / "smoke-ray.jsonl"
    proc = run_cli("run", "smoke", f"methods={RAY_SMOKE_METHODS}", "--records", str(records), "--backend", "ray",
                   "--address", cluster.address, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ray_recs, local_recs = read_records(records), read_records(local_path)
    expected = sorted(trial_id(t) for t in load_suite("smoke", [f"methods={RAY_SMOKE_METHODS}"]).trials())
    assert len(expected) == 2 * len(RAY_SMOKE_METHODS.split(","))
    assert sorted(r["trial_id"] for r in ray_recs) == expected, "every trial recorded once"
    local = {r["trial_id"]: r for r in local_recs}
    for r in ray_recs:
        assert comparable(r) == comparable(local[r["trial_id"]]), r["label"] + " on " + r["task"]
        assert r["overrides"] == [f"methods={RAY_SMOKE_METHODS}"], r["overrides"]
        assert r["backend"] == "ray" and r["attempts"] == 1 and r["threads"] == 1 and r["node"] and r["node_ip"]
    assert all(r["outcomes"] for r in ray_recs if r["status"] == "ok"), "per-example outcomes travel back"
    assert len({r["ray_node_id"] for r in ray_recs}) == 2, "both nodes ran trials"
    n = len(expected)
    assert f"progress: {n}/{n} done, 0 running, 0 failed" in proc.stdout


SAME = """suite: same
version: 1
seeds: [0, 1]
train: {steps: 3, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 0}
tasks:
  - {name: rt-sentiment, model: tiny-bert, options: {n_train: 16, n_eval: 16}}
methods:
  - head
  - lora
"""


def with_timing_and_place_of(record: dict, other: dict) -> dict:
    """`record` with `other`'s timing and place fields (TIMING, WHERE, a method's own *_seconds) in place of its
    own: what is left is what the trial computed."""
    out = {k: v for k, v in record.items() if k not in TIMING | WHERE}
    out |= {k: other[k] for k in TIMING | WHERE if k in other}
    if isinstance(out.get("method_metrics"), dict):
        out["method_metrics"] = {k: other["method_metrics"][k] if k.endswith("_seconds") else v
                                 for k, v in out["method_metrics"].items()}
    return out


@pytest.mark.slow
def test_a_deterministic_suite_gives_the_same_report_on_both_backends(cluster, tmp_path):
    """Issue 21's "byte for byte the same report": a report also shows what each run measured (memory peaks,
    tokens/s, machine time), which differ between any two runs of a trial, on one backend or two. So the same
    report here is the report, every file of it, of the Ray records given the local records' timing and place
    fields: equal bytes mean that everything else the report reads (scores, intervals, ranks, paired tests,
    losses, parameter counts, adapter sizes, findings) came out the same, whatever order the records arrived in."""
    from lorabench.report.build import write_report
    suite = tmp_path / "same.yaml"
    suite.write_text(SAME)
    local_path, ray_path = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    # one torch thread per trial, as on the Ray backend's one-CPU trials: the same arithmetic
    proc = run_cli("run", str(suite), "--records", str(local_path), "--no-progress", "--jobs",
                   str(len(os.sched_getaffinity(0))), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    proc = subprocess.run(ray_run(suite, ray_path, cluster.address), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    local = {r["trial_id"]: r for r in read_records(local_path)}
    ray_recs = read_records(ray_path)
    assert sorted(local) == sorted(r["trial_id"] for r in ray_recs) and len(local) == 4
    assert all(r["status"] == "ok" and r["backend"] == "ray" for r in ray_recs)
    files = {}
    for name, recs in (("local", list(local.values())),
                       ("ray", [with_timing_and_place_of(r, local[r["trial_id"]]) for r in ray_recs])):
        out = tmp_path / f"report-{name}"
        files[name] = {p.relative_to(out).as_posix(): p.read_bytes() for p in write_report(recs, out, ["md", "csv"])}
    assert sorted(files["ray"]) == sorted(files["local"]) and "leaderboard.csv" in files["local"]
    for f in files["local"]:
        assert files["ray"][f] == files["local"][f], f
    assert b"head" in files["local"]["leaderboard.csv"] and b"lora" in files["local"]["leaderboard.csv"]


@pytest.mark.slow
def test_driver_killed_mid_run_leaves_no_trial_running_and_resumes(cluster, tmp_path):
    suite = tiny_suite(tmp_path, "resume")
    records = tmp_path / "r.jsonl"
    log = tmp_path / "driver.log"
    with open(log, "w") as out:
        driver = subprocess.Popen(ray_run(suite, records, cluster.address), cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: read_records(records, warn=False) or driver.poll() is not None, 600, "a first record")
    finally:
        driver.kill()
        driver.wait()
    n_before = len(read_records(records, warn=False))
    assert 1 <= n_before < 4, "the kill should land mid-suite: " + log.read_text()[-2000:]
    # Ray ends the dead driver's job and kills its tasks; their trial processes die with them
    wait_for(lambda: not any(trial_processes(cluster.node_group(i)) for i in range(2)), 120,
             "the killed driver's trials to stop")
    again = subprocess.run(ray_run(suite, records, cluster.address), cwd=REPO, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{n_before} already recorded" in again.stdout
    ids = [r["trial_id"] for r in read_records(records)]
    assert sorted(ids) == sorted(trial_id(t) for t in load_suite(str(suite)).trials()), "every trial once"


@pytest.mark.slow
def test_trial_lost_with_its_worker_then_its_node_is_run_again(tmp_path):
    pytest.importorskip("ray", reason="the Ray backend's tests need Ray: pip install -e '.[ray]'")
    from lorabench.runner.ray_cluster import LoopbackCluster
    # Each trial must outlast the test's look for it (a /proc scan every 0.3 s) and trials must still wait in Ray's
    # queue when the worker node frees its CPU after the first kill, so that Ray places one there. With 4 trials of
    # 40 steps (~1 s each once a node is warm) the window was missed on an idle machine: CI, 7 Dec 2026, timed out
    # waiting for the second trial on the worker node. 400 steps: ~8 s each; 6 trials.
    suite = tiny_suite(tmp_path, "faults", steps=400, seeds=6)
    records = tmp_path / "r.jsonl"
    log = tmp_path / "driver.log"
    with LoopbackCluster(nodes=2, cpus_per_node=1) as cluster:  # its own: this test kills its worker node
        worker_node = cluster.node_group(1)
        with open(log, "w") as out:
            driver = subprocess.Popen(ray_run(suite, records, cluster.address, "--retries", "2"), cwd=REPO,
                                      stdout=out, stderr=subprocess.STDOUT)
        try:
            # 1. the Ray worker process running a trial on the worker node dies (the trial process's grandparent:
            # Ray worker -> fork server -> trial)
            trial = wait_for(lambda: trial_processes(worker_node), 600, "a trial on the worker node")[0]
            fork_server = parent(trial)
            os.kill(parent(fork_server), signal.SIGKILL)
            wait_for(lambda: "attempt 1 lost" in log.read_text(), 300, "the driver to see the lost attempt")
            # 2. the whole worker node dies while a trial runs on it: the node is idle after the kill and trials
            # are queued, so Ray places one there (a new Ray worker, its fork server, then the trial process).
            # Not the killed worker's trial: it outlives its Ray worker for a moment (it dies with its fork server,
            # which exits when it sees its parent gone), and killing the node then would kill it before Ray
            # placed anything there: Ray then reports the node dead (heartbeats missed) with no task on it.
            try:
                wait_for(lambda: trial_processes(worker_node, other_than=fork_server) or driver.poll() is not None,
                         300, "a new trial on the worker node")
            except AssertionError as e:
                raise AssertionError(f"{e}; the driver's log:\n{log.read_text()[-3000:]}") from None
            assert driver.poll() is None, "the driver ended before a second trial ran on the worker node:\n" + \
                log.read_text()[-3000:]
            cluster.stop_node(1)
            driver.wait(timeout=1200)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    text = log.read_text()
    assert driver.returncode == 0, text[-3000:]
    recs = read_records(records)
    assert sorted(r["trial_id"] for r in recs) == sorted(trial_id(t) for t in load_suite(str(suite)).trials()), \
        "every trial recorded once, none lost"
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    lost = [reason for r in recs for reason in r["lost_attempts"]]
    assert 1 <= len(lost) == sum(r["attempts"] - 1 for r in recs) == text.count("submitted again"), text[-3000:]
    # two attempts lost, both on the worker node: one with the killed Ray worker, one with the killed node
    crashed = [x for x in lost if x.startswith("WorkerCrashedError on node ")]
    assert len(crashed) == 1, lost
    node = crashed[0].split()[3].rstrip(":")
    assert sorted(lost) == sorted(crashed + [x for x in lost if x.startswith(f"NodeDiedError on node {node}:")]), lost
    assert len(lost) == 2, lost
    assert all(r["ray_node_id"][:12] != node for r in recs if r["lost_attempts"]), "retried on the head"
    assert all(r["attempts"] <= 3 for r in recs), "--retries 2: three attempts at most"
