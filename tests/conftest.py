import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.hookimpl(tryfirst=True)   # before pytest-xdist's own count, however the plugins were loaded
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pytest.ini) starts one worker per core this run may use (its affinity: `taskset -c 0 pytest`
    runs one), not per physical core of the machine, which is what pytest-xdist counts by default. 0 workers when
    timing benchmarks (`--benchmark-only`, docs/kernels.md): pytest-benchmark times nothing under xdist."""
    if config.getoption("benchmark_only", False):
        return 0
    return len(os.sched_getaffinity(0))


def pytest_configure(config):
    """Under pytest-xdist (README's test command runs `-n auto`), each worker gets a core of its own: its affinity
    is narrowed to one of the cores this run may use, and the trials, runners and builds it starts inherit that
    mask (lorabench sizes its threads from the affinity, lorabench/runner/worker.py). Two workers then never
    oversubscribe two cores, which would slow every trial 10-20x and push the subprocess tests past timeouts."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker or not count:
        return
    cores = sorted(os.sched_getaffinity(0))
    os.environ["LORABENCH_TEST_RUN_CORES"] = str(len(cores))   # the run's own mask, for tests/test_xdist_pinning.py
    if int(count) <= len(cores):
        index = int(worker.removeprefix("gw"))
        share = len(cores) // int(count)
        mine = set(cores[index * share:(index + 1) * share])
        os.sched_setaffinity(0, mine)
        os.environ["OMP_NUM_THREADS"] = str(len(mine))
        import torch
        torch.set_num_threads(len(mine))


def run_cli(*args: str, timeout: float = 900, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lorabench ARGS` as a user would; returns the completed process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "lorabench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or REPO, env=env)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def smoke_local(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The smoke suite on the local backend, run once per session: tests/test_runner.py checks it end to end and
    tests/test_ray_backend.py compares the Ray backend's records with it. One thread per trial (--jobs = the
    cores this process may use), as each trial gets on the Ray backend (one CPU): the same arithmetic."""
    records = tmp_path_factory.mktemp("smoke-local") / "smoke.jsonl"
    jobs = len(os.sched_getaffinity(0))
    proc = run_cli("run", "smoke", "--records", str(records), "--no-progress", "--jobs", str(jobs), timeout=1800)
    return proc, records


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc's parent links): the stop tests of the runner and of the federated
    scenario check that none outlives a run."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
