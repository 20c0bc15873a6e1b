"""The runner end to end, as a user runs it: the smoke suite, resume after SIGKILL, failures, bad input."""
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
from tests.conftest import REPO, alive, run_cli

TINY = """suite: {name}
version: 1
seeds: [0, 1]
train: {{steps: 2, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 0}}
tasks:
  - {{name: rt-sentiment, model: tiny-bert, options: {{n_train: 16, n_eval: 16}}}}
methods:
{methods}
"""


def tiny_suite(tmp_path: Path, methods: str = "  - head\n  - lora\n  - full", name: str = "tiny") -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY.format(name=name, methods=methods))
    return p


@pytest.mark.slow  # 194 trials: every method on two tiny models (~7 minutes on one core)
@pytest.mark.xdist_group("smoke")  # one worker computes smoke_local (tests/conftest.py) for this and the Ray tests
def test_smoke_suite_runs_every_method_end_to_end(smoke_local):
    proc, records = smoke_local  # tests/conftest.py: run once, also compared with the Ray backend's records
    recs = read_records(records)
    failed = [(r["label"], r["task"], r.get("error")) for r in recs if r["status"] != "ok"]
    assert not failed, failed
    assert proc.returncode == 0, proc.stderr[-2000:]
    suite = load_suite("smoke")
    assert sorted(r["trial_id"] for r in recs) == sorted(trial_id(t) for t in suite.trials())
    from lorabench.methods import METHODS
    assert {m.name for m in suite.methods} == set(METHODS.names()), "smoke must run every registered method"
    for r in recs:
        assert r["adapter_bytes"] > 0 and r["trainable_params"] >= 0 and len(r["split_hash"]) == 16
        assert r["peak_rss_mb"] > 0 and r["git_commit"] and r["versions"]["torch"]
    assert "Leaderboard: suite smoke" in proc.stdout


def test_suite_killed_mid_run_resumes_with_every_trial_once(tmp_path):
    suite = tiny_suite(tmp_path)
    records = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "lorabench", "run", str(suite), "--records", str(records), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 900
    while len(read_records(records, warn=False)) < 1 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(read_records(records, warn=False))
    assert 1 <= n_before < 6, "the kill should land mid-suite"
    again = run_cli("run", str(suite), "--records", str(records), "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    ids = [r["trial_id"] for r in read_records(records)]
    expected = sorted(trial_id(t) for t in load_suite(str(suite)).trials())
    assert sorted(ids) == expected, "every trial recorded exactly once"
    assert f"{n_before} already recorded" in again.stdout


def test_failed_trial_is_recorded_and_the_suite_goes_on(tmp_path):
    suite = tiny_suite(tmp_path, "  - {name: lora, label: broken, options: {target_modules: [no_such_layer]}}\n  - head",
                       name="fails")
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", str(suite), "--records", str(records), "--no-progress", "seeds=0")
    assert proc.returncode == 1  # not every trial succeeded
    by_label = {r["label"]: r for r in read_records(records)}
    assert by_label["broken"]["status"] == "failed"
    assert "no_such_layer" in by_label["broken"]["error"] and "matches no module" in by_label["broken"]["error"]
    assert by_label["head"]["status"] == "ok"
    assert "FAILED broken" in proc.stdout


def test_a_trial_that_dies_is_recorded_with_the_reason(tmp_path):
    suite = tiny_suite(tmp_path, "  - head", name="slow")
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", str(suite), "--records", str(records), "--no-progress", "seeds=0",
                   "train.steps=100000", "--timeout", "3")
    (rec,) = read_records(records)
    assert rec["status"] == "failed" and "timed out after 3 s" in rec["error"]
    assert proc.returncode == 1


def test_parallel_jobs_record_every_trial_once(tmp_path):
    # head and lora in two processes at a time; the suite's task sets jobs: 2, one thread per trial
    suite = tmp_path / "par.yaml"
    suite.write_text(TINY.format(name="par", methods="  - head\n  - lora").replace(
        "n_eval: 16}}", "n_eval: 16}, jobs: 2, train: {threads: 1}}"))
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", str(suite), "--records", str(records), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    recs = read_records(records)
    assert sorted(r["trial_id"] for r in recs) == sorted(trial_id(t) for t in load_suite(str(suite)).trials())
    assert all(r["status"] == "ok" and r["jobs"] == 2 and r["threads"] == 1 for r in recs)
    # the machine's load through each trial (its times compare only with trials run alike: the report's note)
    for r in recs:
        assert r["load"]["cores"] == os.cpu_count() and 0 <= r["load"]["mean"] <= r["load"]["max"], r["load"]
    # --jobs overrides the suite without changing trial ids: everything is already recorded
    again = run_cli("run", str(suite), "--records", str(records), "--no-progress", "--jobs", "1")
    assert again.returncode == 0 and "4 already recorded" in again.stdout
    assert len(read_records(records)) == 4


@pytest.mark.parametrize("args,message", [
    (["run", "{suite}", "--jobs", "0"], "--jobs (trials run at once) must be at least 1, got 0"),
    (["run", "{badjobs}"], "jobs (trials run at once) must be an integer >= 1, got 'two'"),
    (["run", "{suite}", "methods=haed"], "haed not in suite"),
    (["run", "{suite}", "lora.rnak=4"], "unknown key 'rnak'. Did you mean: rank?"),
    (["run", "{suite}", "train.steps=lots"], "expected an integer, got 'lots'"),
    (["run", "{suite}", "trian.steps=3"], "unknown override key 'trian.steps'"),
    (["run", "{bad}"], "Unknown method 'lroa'. Did you mean: lora"),
    (["run", "{malformed}"], "malformed YAML"),
    (["run", "quik"], "Unknown suite 'quik'. Did you mean: quick?"),
    (["run", "{suite}", "--address", "10.0.0.5:6379"], "--address is an option of --backend ray"),
    (["run", "{suite}", "--backend", "ray", "--jobs", "2"], "--jobs sets the trials run at once on this machine"),
])
def test_bad_input_gets_one_clear_error_and_loses_no_record(tmp_path, args, message):
    suite = tiny_suite(tmp_path)
    bad = tiny_suite(tmp_path, "  - lroa", name="bad")
    badjobs = tmp_path / "badjobs.yaml"
    badjobs.write_text("jobs: two\n" + TINY.format(name="badjobs", methods="  - head"))
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text(TINY.format(name="malformed", methods="  - {name: lora").replace("seeds: [0, 1]", "seeds: [0, 1"))
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"trial_id": "kept", "status": "ok"}) + "\n")
    argv = [a.format(suite=suite, bad=bad, badjobs=badjobs, malformed=malformed) for a in args]
    proc = run_cli(*argv, "--records", str(records))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert records.read_text() == json.dumps({"trial_id": "kept", "status": "ok"}) + "\n"


def _write_trial_environment(path: str) -> None:
    import torch
    Path(path).write_text(json.dumps({"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                                      "threads": torch.get_num_threads()}))


def test_trials_share_the_available_cores_and_do_not_spin(tmp_path):
    # issue 22: trials slowed down 10-20x on a shared machine, libgomp's threads spinning at barriers
    from lorabench.runner import run, worker
    probe = tmp_path / "env.json"
    proc = run._context().Process(target=_write_trial_environment, args=(str(probe),))
    proc.start()
    proc.join(120)
    assert json.loads(probe.read_text())["GOMP_SPINCOUNT"] == os.environ.get("GOMP_SPINCOUNT", "1000")
    cores = len(os.sched_getaffinity(0))
    assert worker.default_threads(1) == cores and worker.default_threads(2) == max(1, cores // 2)
    assert worker.default_threads(cores + 1) == 1
    # two trials at once without train.threads: each gets half the cores, not all of them
    suite = tmp_path / "halves.yaml"
    suite.write_text(TINY.format(name="halves", methods="  - head").replace("n_eval: 16}}", "n_eval: 16}, jobs: 2}"))
    records = tmp_path / "r.jsonl"
    done = run_cli("run", str(suite), "--records", str(records), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["threads"] for r in read_records(records)] == [max(1, cores // 2)] * 2


def test_bench_threads_prints_one_row_per_configuration(capsys):
    from lorabench.bench import threads
    # two configurations (each a process importing torch): the smallest run that shows the table
    assert threads.main(["--threads", "1", "--busy", "0", "--policies", "default,spin1k", "--rounds", "1",
                         "--seconds", "0.05", "--tokens", "16"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [("default", "1", "0", "1.00x"), ("spin1k", "1", "0", "1.00x")]
    assert all(float(r[3]) > 0 for r in rows)


def test_records_made_on_another_split_are_not_resumed_over(tmp_path):
    """A record whose split hash differs from the split the code builds now (a task's sizes changed,
    the suite's version did not) stops the run with a clear error; the records file is untouched."""
    suite = tiny_suite(tmp_path, "  - head", name="moved")
    records = tmp_path / "r.jsonl"
    assert run_cli("run", str(suite), "--records", str(records), "--no-progress", "seeds=0").returncode == 0
    (rec,) = read_records(records)
    rec["split_hash"] = "0" * len(rec["split_hash"])  # as if recorded before the split changed
    records.write_text(json.dumps(rec) + "\n")
    before = records.read_bytes()
    proc = run_cli("run", str(suite), "--records", str(records), "--no-progress", "seeds=0,1")
    assert proc.returncode == 2
    assert "was recorded on another split of rt-sentiment" in proc.stderr and "Raise the suite's `version`" in proc.stderr
    assert records.read_bytes() == before


def test_the_local_backend_imports_no_ray():
    # `--backend ray` is an extra (pip install -e '.[ray]'); the default runner must work without it
    code = ("import sys, lorabench.cli, lorabench.runner.run, lorabench.runner.worker; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_speedup_schedules_recorded_trial_times_longest_first():
    from lorabench.runner.speedup import makespan, table
    assert makespan([3, 3, 2, 2, 2], 2) == 7  # LPT: {3, 2, 2} and {3, 2}; the best is 6 ({3, 3}, {2, 2, 2})
    assert makespan([5, 1, 1], 4) == 5  # never below the longest trial
    assert makespan([1.0] * 8, 1) == 8 and makespan([1.0] * 8, 3) == 3
    assert [round(s, 2) for _, _, s in table([1.0] * 8, [1, 2, 8])] == [1.0, 2.0, 8.0]


def test_speedup_makes_tuned_seeds_wait_for_their_grid():
    """With tune_seeds the other seeds run at the rate the grid chose: on many slots the estimate is the grid's
    longest trial plus the longest trial waiting for it, not the longest trial alone (which made the claims board's
    64-slot estimate 697 s instead of 1,052 s)."""
    from lorabench.runner.speedup import schedule, table, trials_of
    recs = [{"suite": "s", "task": "t", "label": "lora", "seed": 0, "train": {"lr": lr}, "wall_s": 10.0}
            for lr in (1e-4, 3e-4, 1e-3)]
    recs += [{"suite": "s", "task": "t", "label": "lora", "seed": seed, "train": {"lr": 3e-4}, "wall_s": 10.0}
             for seed in (1, 2, 3, 4)]
    recs += [{"suite": "s", "task": "t", "label": "head", "seed": seed, "train": {"lr": 1e-3}, "wall_s": 5.0}
             for seed in (0, 1)]  # no grid: independent
    trials = trials_of(recs)
    assert sorted(g for _, _, g in trials) == [False] * 6 + [True] * 3
    assert schedule(trials, 100) == 20.0   # grid (10 s) then the other seeds (10 s)
    assert schedule(trials, 1) == 80.0     # one slot: the sum
    assert schedule(trials, 3) == 30.0     # the grid on 3 slots while nothing else may run but head; then 4 seeds
    assert schedule([(t, None, False) for t, _, _ in trials], 100) == 10.0  # the dependency is what costs the 10 s
    assert table(trials, [1])[0][1] == 80.0


SCRIPT = """import multiprocessing, os, sys
sys.path.insert(0, {repo!r})
with open({marker!r}, "a") as f:  # each process that runs this file as its main script adds a line
    f.write("run\\n")
if __name__ == "__main__":
    from lorabench.runner.run import _main_script_hidden
    ctx = multiprocessing.get_context("forkserver")
    for hidden in (True, False):
        before = open({marker!r}).read().count("run")
        p = ctx.Process(target=os.getpid)
        if hidden:
            with _main_script_hidden():
                p.start()
        else:
            p.start()
        p.join()
        print("hidden" if hidden else "shown", open({marker!r}).read().count("run") - before, p.exitcode)
    print("file", __file__ == {script!r})
"""


def test_a_trial_process_does_not_run_its_parents_main_script_again(tmp_path):
    """A parent run as a script (a Ray worker runs ray/_private/workers/default_worker.py): multiprocessing runs
    that script again in each process it starts, unless run_one hides it while the trial process starts (on the
    Ray backend that import of Ray cost each trial 0.45 s of CPU: docs/scale.md, "Overhead")."""
    marker, script = tmp_path / "marker", tmp_path / "main_script.py"
    marker.write_text("")
    script.write_text(SCRIPT.format(repo=str(REPO), marker=str(marker), script=str(script)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    # hidden: the child did not run the script; shown (multiprocessing's own way): it did; __file__ restored after
    assert out.stdout.split("\n")[:3] == ["hidden 0 0", "shown 1 0", "file True"], out.stdout + out.stderr[-2000:]


def _trial_that_starts_a_process(pid_file: str) -> None:
    """A trial as the runner starts it (its own process group) that starts a process, as a federated trial starts
    its private Ray instance, and then trains 'forever'."""
    from lorabench.runner import worker
    worker._own_process_group()
    child = subprocess.Popen(["sleep", "600"])
    Path(pid_file).write_text(str(child.pid))
    time.sleep(600)


def test_a_stopped_trial_takes_the_processes_it_started_with_it(tmp_path):
    """A stop (Ctrl-C, SIGTERM, a timeout) used to SIGKILL the trial process alone: a federated trial's Ray agents
    (children of its raylet) ran on for minutes after. The trial leads its own process group and the runner kills
    the group (run._kill_trial)."""
    import multiprocessing

    from lorabench.runner.run import _kill_trial
    pid_file = tmp_path / "child.pid"
    proc = multiprocessing.get_context("spawn").Process(target=_trial_that_starts_a_process, args=(str(pid_file),))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()):
            assert proc.is_alive() and time.monotonic() < deadline, "the trial did not start its process"
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert os.getpgid(proc.pid) == proc.pid and os.getpgid(child) == proc.pid  # one group, the trial's
        _kill_trial(proc)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        deadline = time.monotonic() + 30
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the process the trial started outlived its stop"
    finally:
        proc.kill()
