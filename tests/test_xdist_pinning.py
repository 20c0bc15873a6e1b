"""README's test command runs on pytest-xdist with one worker per core, each pinned to its own core
(tests/conftest.py): the trials and builds a test starts inherit the worker's affinity and size their threads from
it, so two workers never oversubscribe the machine."""
from __future__ import annotations

import os

import pytest
import torch


def test_a_worker_runs_on_its_own_share_of_the_cores():
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker:
        pytest.skip("not under pytest-xdist (-n 0 or -p no:xdist): nothing is pinned")
    run_cores, workers, mine = int(os.environ["LORABENCH_TEST_RUN_CORES"]), int(count), os.sched_getaffinity(0)
    if workers > run_cores:
        pytest.skip(f"{workers} workers on {run_cores} cores (-n above the cores): none is pinned")
    assert len(mine) == run_cores // workers, (mine, run_cores, workers)
    assert os.environ["OMP_NUM_THREADS"] == str(len(mine)) and torch.get_num_threads() == len(mine)


def test_the_worker_count_follows_the_affinity_not_the_machine(tmp_path):
    """`taskset -c 0 pytest` starts one worker: pytest-xdist's own count (psutil's physical cores) would start
    two on one core."""
    import subprocess
    import sys
    probe = tmp_path / "test_probe.py"
    seen = tmp_path / "seen.txt"
    probe.write_text(f"import os\ndef test_probe():\n    open({str(seen)!r}, 'w').write("
                     f"os.environ.get('PYTEST_XDIST_WORKER_COUNT', '') + ' ' + str(len(os.sched_getaffinity(0))))\n")
    core = min(os.sched_getaffinity(0))
    out = subprocess.run(["taskset", "-c", str(core), sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                          "--rootdir", str(tmp_path), "-c", os.devnull, "-n", "auto",
                          "--confcutdir", str(tmp_path), "-p", "tests.conftest", str(probe)],
                         capture_output=True, text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert seen.read_text() == "1 1", seen.read_text()   # one worker, on the one core
