"""A newcomer's edges (issue 22): each one used to print a traceback or mislead; each is run here as a
user runs it, in a subprocess, and must give a clear answer without a traceback."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lorabench.errors import UserError
from lorabench.runner.records import read_records
from tests.conftest import REPO, alive as _alive, cmdline as _cmdline, descendants as _descendants, run_cli

ONE_TRIAL = """suite: {name}
version: 1
seeds: [0]
train: {{steps: 2, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 0}}
tasks:
  - {{name: rt-sentiment, model: tiny-bert, options: {{n_train: 16, n_eval: 16}}}}
methods:
  - head
"""


def _sigint_as_at_a_terminal() -> None:
    """preexec_fn of the runs these tests stop with Ctrl-C: SIGINT at its default and unblocked, as a shell in a
    terminal starts a command. An ignored or blocked SIGINT is inherited through exec and Python then installs no
    KeyboardInterrupt handler: in one full run of the suite (7 Dec 2026, launched in the background) the SIGINT
    tests here waited out their timeouts while the SIGTERM one passed, and all passed run alone."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _sigint_state(pid: int) -> str:
    """SIGINT's bit in the process's ignored and blocked masks (/proc/PID/status), for the failure message."""
    bit = 1 << (signal.SIGINT - 1)
    with open(f"/proc/{pid}/status") as f:
        masks = {k: int(v, 16) for k, v in (line.split(":\t") for line in f if line.startswith(("SigIgn", "SigBlk")))}
    return ", ".join(f"{k} {'set' if m & bit else 'clear'}" for k, m in masks.items())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["run", "report"])
def test_records_pointing_at_a_folder(tmp_path, command):
    args = ["run", "smoke", "methods=head", "--records", str(tmp_path)] if command == "run" else ["report", str(tmp_path)]
    line = one_line_error(run_cli(*args, timeout=120))
    assert f"{tmp_path} is a folder" in line and "records.jsonl" in line


def test_output_piped_into_head_ends_quietly(tmp_path):
    suite = tmp_path / "piped.yaml"
    suite.write_text(ONE_TRIAL.format(name="piped"))
    # The run's third line comes after its trial: by then `head -2` has gone and the write fails.
    proc = subprocess.run(f"{sys.executable} -m lorabench run {suite} --records {tmp_path / 'r.jsonl'} --no-progress"
                          f" | head -2", shell=True, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.stdout.splitlines()[0].startswith("suite piped v1")
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("jobs,sig", [(1, signal.SIGINT), (2, signal.SIGINT), (2, signal.SIGTERM)])
def test_ctrl_c_says_what_is_recorded_and_how_to_resume(tmp_path, jobs, sig):
    """Ctrl-C (SIGINT), `kill` (SIGTERM) or a closed terminal (SIGHUP) stop the run, say what is
    recorded, and leave no trial process training on as an orphan (SIGTERM used to)."""
    suite = tmp_path / "stopped.yaml"
    suite.write_text(ONE_TRIAL.format(name="stopped"))
    records, out_path, err_path = tmp_path / "r.jsonl", tmp_path / "out", tmp_path / "err"
    # trials that would run for hours: only the interrupt ends them (with 2 jobs, in two threads).
    # Output goes to files, not pipes: the fork server may hold them open a while after the run exits.
    with open(out_path, "w") as out, open(err_path, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "lorabench", "run", str(suite), "--records", str(records),
                                 "--no-progress", "train.steps=100000", f"seeds={','.join(map(str, range(jobs)))}",
                                 "--jobs", str(jobs)], cwd=REPO, text=True, stdout=out, stderr=errf,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=_sigint_as_at_a_terminal)
    try:
        while "running" not in out_path.read_text():  # the trial has started
            assert proc.poll() is None, err_path.read_text()
            time.sleep(0.2)
        time.sleep(1.0)
        below = _descendants(proc.pid)
        assert below, "the trial runs in processes below the runner"
        sigint = _sigint_state(proc.pid)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the runner did not stop within 120 s of {sig.name} (its SIGINT: {sigint})")
    finally:
        proc.kill()
    err = err_path.read_text()
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig)
    assert "Traceback" not in err and "leaked" not in err, err
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
    assert re.search(rf"{how}: 0 of {jobs} trials of suite stopped are recorded in \S*r\.jsonl", err), err
    assert "run the same command again to resume" in err
    deadline = time.monotonic() + 60
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in below if _alive(p)], "trial processes outlived the run"


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _wait(condition, timeout_s: float, what: str, proc: subprocess.Popen, err_path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, err_path.read_text()
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_stop_while_the_fork_server_starts_ends_the_run_and_every_process_at_once(tmp_path, jobs):
    """Ctrl-C landing while the fork server still imports (worker.PRELOAD: minutes on a loaded core), after the
    trials were asked of it: the runner used to wait for that start (with jobs > 1, threads blocked on it) and
    then for its trials, and with jobs = 1 it exited but left the fork server importing on, to fork nothing or a
    trial. tests/slow_fork_server.py makes the start last 600 s, every time: the runner must exit at once and
    take every process it started with it."""
    suite = tmp_path / "stopped.yaml"
    suite.write_text(ONE_TRIAL.format(name="stopped"))
    records, out_path, err_path = tmp_path / "r.jsonl", tmp_path / "out", tmp_path / "err"
    code = ("import sys; from lorabench.runner import worker; "
            "worker.PRELOAD = ['tests.slow_fork_server'] + worker.PRELOAD; "
            "from lorabench.cli import main; sys.exit(main(sys.argv[1:]))")
    with open(out_path, "w") as out, open(err_path, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-c", code, "run", str(suite), "--records", str(records),
                                 "--no-progress", "train.steps=100000", f"seeds={','.join(map(str, range(jobs)))}",
                                 "--jobs", str(jobs)], cwd=REPO, text=True, stdout=out, stderr=errf,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", LORABENCH_TEST_FORK_SERVER_SLEEP_S="600"),
                                preexec_fn=_sigint_as_at_a_terminal)
    try:
        _wait(lambda: out_path.read_text().count(": running") == jobs, 120, "the trials to start", proc, err_path)
        _wait(lambda: any(b"multiprocessing.forkserver" in _cmdline(p) for p in _descendants(proc.pid)), 60,
              "the fork server", proc, err_path)
        time.sleep(1.0)  # the trials' requests are on their way to it (proc.start(), waiting for their pids)
        below = _descendants(proc.pid)
        sigint = _sigint_state(proc.pid)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)  # not the fork server's 600 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"the runner did not stop within 30 s of SIGINT (its SIGINT: {sigint})")
    finally:
        proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "leaked" not in err, err
    assert re.search(rf"interrupted: 0 of {jobs} trials of suite stopped are recorded", err), err
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [_cmdline(p)[:200] for p in below if _alive(p)], "processes of the run outlived it"


def test_a_killed_runner_leaves_no_trial_running(tmp_path):
    """`kill -9` of the runner (or its machine's OOM killer): nothing of the runner runs any more to stop its
    trials, which must die by themselves (worker._die_with_runner). They used to train on: a trial dies with its
    fork server (PR_SET_PDEATHSIG), and the fork server lives while any process holds its "alive" pipe, the
    trial included."""
    suite = tmp_path / "killed.yaml"
    suite.write_text(ONE_TRIAL.format(name="killed"))
    records, out_path, err_path = tmp_path / "r.jsonl", tmp_path / "out", tmp_path / "err"
    with open(out_path, "w") as out, open(err_path, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "lorabench", "run", str(suite), "--records", str(records),
                                 "--no-progress", "train.steps=100000"], cwd=REPO, text=True, stdout=out,
                                stderr=errf, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        def trials() -> list[int]:  # forked by the fork server: its command line, and a parent with it too
            return [p for p in _descendants(proc.pid) if b"multiprocessing.forkserver" in _cmdline(p)
                    and b"multiprocessing.forkserver" in _cmdline(_parent(p))]
        _wait(trials, 600, "a trial process", proc, err_path)
        time.sleep(2.0)  # the trial runs its trial_main
        below = _descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [_cmdline(p)[:200] for p in below if _alive(p)], "processes of the killed run train on"
    assert not records.exists()


def test_a_stopped_tuned_run_counts_the_trials_its_tuning_trials_define(tmp_path, monkeypatch, capsys):
    """With tune_seeds the other seeds' trials exist once the grid is recorded: the stop message counts them (it
    counted only the grid's trials, "2 of 2", while the suite runs 4)."""
    from lorabench import cli
    from lorabench.runner import run as run_module
    from lorabench.runner.records import append_record
    from lorabench.runner.suite import load_suite, trial_id
    path = tmp_path / "tunedstop.yaml"
    path.write_text(ONE_TRIAL.format(name="tunedstop").replace("seeds: [0]", "seeds: [0, 1, 2]")
                    + "lr_grid: [0.5, 2]\ntune_seeds: [0]\n")
    records = tmp_path / "r.jsonl"

    def run_suite(suite, records_path, *args, **kwargs):   # the grid is recorded, then Ctrl-C
        for k, spec in enumerate(suite.trials()):
            append_record(records_path, {"trial_id": trial_id(spec), "status": "ok", "val_score": 0.5 + k / 10,
                                         "task": spec.task, "label": spec.label, "seed": spec.seed})
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_suite", run_suite)
    assert load_suite(str(path)).size() == 4
    assert cli.main(["run", str(path), "--records", str(records), "--no-progress"]) == 130
    assert "interrupted: 2 of 4 trials of suite tunedstop are recorded" in capsys.readouterr().err


@pytest.mark.parametrize("override,message", [
    ("train.stesp=5", "error: command line: train.stesp=5: train: unknown key 'stesp'. Did you mean: steps?"),
    ("train.steps=abc", "error: command line: train.steps=abc: train.steps: expected an integer, got 'abc'"),
    ("lora.rank=0", "error: command line: lora.rank=0: method lora (lora).rank: 0 is below the minimum 1"),
    ("task.n_eval=x", "error: command line: task.n_eval=x: task (rt-sentiment).n_eval: expected"),
    ("methods=lorra", "Did you mean: lora"),
])
def test_a_bad_override_is_blamed_on_the_command_line(override, message):
    line = one_line_error(run_cli("run", "smoke", override, timeout=120))
    assert line.startswith(message) or message in line, line
    assert "smoke.yaml" not in line  # the suite file is not where the mistake is


def test_a_copied_suite_gets_the_reason_its_name_must_match(tmp_path):
    copy = tmp_path / "mine.yaml"
    copy.write_text((REPO / "suites" / "quick.yaml").read_text())
    line = one_line_error(run_cli("run", str(copy), timeout=120))
    assert "suite name 'quick' must equal the file name 'mine'" in line
    assert "runs/quick/records.jsonl" in line and "Write `suite: mine`" in line


def test_bench_help():
    proc = run_cli("bench", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kernels" in proc.stdout and "serving" in proc.stdout and "threads" in proc.stdout


def test_a_torn_record_line_is_in_the_reports_notes(tmp_path):
    good = json.loads((REPO / "results" / "standard" / "records.jsonl").open().readline())
    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps(good) + "\n" + '{"trial_id": "torn", "x":')  # a writer killed mid-line
    proc = run_cli("report", str(records), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{records}:2: skipping a torn" in proc.stderr
    assert "every record was complete" not in proc.stdout
    assert f"1 torn or malformed record line(s) skipped ({records}:2)" in proc.stdout
    assert len(read_records(records, warn=False)) == 1


@pytest.mark.parametrize("what", ["methods", "tasks", "suites", "assets"])
def test_list_answers_without_importing_torch(what):
    # `list methods` took 13 s on a busy machine: it imported every method, hence torch
    code = ("import sys; from lorabench.cli import main; rc = main(['list', %r]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)" % what)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "NO-TORCH"
    assert len(proc.stdout.splitlines()) > 3


def test_list_shows_what_the_registries_and_suites_hold():
    from lorabench.cli import SUITES_DIR
    from lorabench.methods import METHODS
    from lorabench.runner.suite import SUITES_DIR as RUNNER_SUITES_DIR
    from lorabench.runner.suite import list_suites, load_suite
    from lorabench.tasks import TASKS
    assert SUITES_DIR == RUNNER_SUITES_DIR
    # every method's and task's call-site facts are its class's own
    for name in METHODS:
        cls = METHODS.get(name)
        assert METHODS.meta(name) == {"family": cls.family, "paper": cls.paper, "title": cls.title}, name
    for name in TASKS:
        cls = TASKS.get(name)
        assert TASKS.meta(name) == {"kind": cls.kind, "metric": cls.metric.name, "default_model": cls.default_model,
                                    "higher_is_better": cls.metric.higher_is_better, "sizes": cls.sizes}, name
    listed = run_cli("list", "suites", timeout=60).stdout.splitlines()
    expected = [f"{load_suite(str(p)).name:12s} v{load_suite(str(p)).version}  {load_suite(str(p)).size():4d} "
                f"trials" for p in list_suites()]
    assert [line[:len(e)] for line, e in zip(listed, expected)] == expected and len(listed) == len(expected)


def test_registry_entries_must_carry_their_facts():
    from lorabench.registry import Registry
    reg = Registry("method", meta_keys=("family", "paper", "title"))
    with pytest.raises(ValueError, match="needs exactly the facts family, paper, title, got family"):
        reg.register_lazy("x", "m:X", family="lora")


@pytest.mark.parametrize("argv", [["run", "quik"], ["run", "smoke", "methods=lorra"], ["run", "smoke", "trian.steps=3"],
                                  ["report", "no/such/records.jsonl"], ["run", "smoke", "--records", "."]])
def test_input_errors_answer_without_importing_torch(argv):
    # an error after seconds of imports (torch, pandas) is an error a newcomer waits for
    code = ("import sys; from lorabench.cli import main; rc = main(%r); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH'); sys.exit(rc)" % argv)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: "), proc.stderr
    assert proc.stdout.splitlines()[-1] == "NO-TORCH"


def test_lr_grid_override_runs_part_of_a_grid(tmp_path):
    from lorabench.runner.suite import load_suite
    path = tmp_path / "g.yaml"
    path.write_text("suite: g\nversion: 1\nseeds: [0]\nlr_grid: [0.3, 1, 3]\ntrain: {steps: 2, lr: 1.0e-3}\n"
                    "tasks: [{name: rt-sentiment, model: minilm-l6}]\nmethods: [lora]\n")
    full = load_suite(str(path)).trials()
    part = load_suite(str(path), ["lr_grid=1"]).trials()
    assert len(full) == 3 and len(part) == 1
    assert part[0] in full and part[0].train["lr"] == 1.0e-3
    path.write_text(path.read_text().replace("seeds: [0]", "seeds: [0, 1]\ntune_seeds: [0]"))
    with pytest.raises(UserError, match="tune_seeds"):
        load_suite(str(path), ["lr_grid=1"])


def test_env_says_how_busy_the_machine_is():
    """Timings compare only when the machine was as busy: `env` prints the load now against the cores."""
    proc = run_cli("env", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("load: ")]
    assert re.fullmatch(rf"load: [\d.]+ [\d.]+ [\d.]+ \(1, 5, 15-minute averages\) on {os.cpu_count()} cores; "
                        r"(busy: timings taken now carry other work's contention|idle enough to time)", line), line
