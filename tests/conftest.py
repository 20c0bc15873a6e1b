import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
