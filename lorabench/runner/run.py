"""Run a suite: every trial in its own process, records appended to JSONL, resumable.

A crash, OOM or NaN in one trial becomes a failed record with its reason and the suite goes on.
Trials already recorded (by trial id, ok or failed) are skipped, so a killed suite resumes.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from lorabench.errors import UserError
from lorabench.measure.provenance import cpu_description, environment, native_bf16
from lorabench.runner import worker
from lorabench.runner.records import RECORD_VERSION, append_record, read_records
from lorabench.runner.suite import Suite, trial_id


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# The machine's 1-minute load average is read every LOAD_EVERY_S while a trial runs (and at its start and end);
# the record keeps its mean and max over the trial with the machine's cores (`load`): a trial timed while other
# work shared the cores has times that compare only with trials run alike (the report says which).
LOAD_EVERY_S = 15.0

_CONTEXT = None
# Ctrl-C interrupts only the main thread, and trials ignore it (worker.py): with jobs > 1 the main
# thread sets this when it stops (Ctrl-C, or stdout closed under `| head`), and the threads waiting
# on trials kill them.
_INTERRUPTED = threading.Event()


def _context():
    """A forkserver context with torch and transformers preloaded (see worker.py)."""
    global _CONTEXT
    if _CONTEXT is None:
        for key, value in worker.TRIAL_ENV.items():
            os.environ.setdefault(key, value)  # inherited by the fork server when it starts
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(worker.PRELOAD)
    return _CONTEXT


def _stop_fork_server() -> None:
    """Kill the fork server this process started, if any, when the run stops (Ctrl-C, SIGTERM, a closed stdout).

    A trial is asked of the fork server before it exists: `proc.start()` sends the request and waits for the new
    process's pid, which the fork server sends only once it has imported torch, transformers and the trial code
    (worker.PRELOAD: seconds alone, minutes on a loaded core). Stopped meanwhile, the runner did not know that
    trial, so it could not kill it; with jobs > 1 it first waited for every thread blocked in that start; and
    the fork server imported on after the runner had gone. Killed, it forks nothing more, a thread waiting on it
    reads end-of-file at once, and the trials it forked die with it (worker._die_with_parent). multiprocessing
    starts a new one for the next trial (ForkServer.ensure_running), should this process run trials again."""
    from multiprocessing import forkserver
    server = getattr(forkserver, "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()  # reaps it and forgets it (closes its "alive" pipe and its address)


def _kill_trial(proc) -> None:
    """SIGKILL a trial and every process it started: the trial leads a process group of its own
    (worker._own_process_group), which a federated trial's private Ray instance (GCS, raylet, agents) inherits.
    Called on a stop or a timeout, and again once a trial has ended, for what it left behind (a trial killed by
    its parent's death, worker._die_with_parent, dies alone). No group of that id (a trial stopped before it
    made its group, or one that left nothing): the trial alone. A group's id is held while any of its processes
    lives, so it names no other process then."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.kill()


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _main_script_hidden():
    """multiprocessing runs the parent's main script again, as __mp_main__, in every process it starts, forked
    from a fork server too, when __main__ was run as a file rather than a module (`python -m`): so that functions
    defined there unpickle (multiprocessing/spawn.py, get_preparation_data and _fixup_main_from_path). On the Ray
    backend that file is Ray's worker script (ray/_private/workers/default_worker.py), and every trial process
    imported Ray before its trial began: 0.45 s of CPU each (docs/scale.md, "Overhead"). A trial's code lives in
    lorabench.runner.worker and needs nothing from the main script, so while a trial process starts, __main__
    shows no __file__ and multiprocessing leaves it alone."""
    main = sys.modules["__main__"]
    with _MAIN_LOCK:  # trials started from several threads at once (jobs > 1)
        path = main.__dict__.pop("__file__", None)
        try:
            yield
        finally:
            if path is not None:
                main.__file__ = path


def run_one(spec, timeout_s: float | None, progress: bool, jobs: int = 1, threads: int | None = None) -> dict:
    """Run one trial in its own process; returns its result, or a failure describing the crash.
    `jobs`: trials running at once, which share the cores (worker.default_threads), unless `threads` (the
    CPUs a cluster gave this trial: lorabench/runner/ray_backend.py) says how many to use."""
    with tempfile.TemporaryDirectory(prefix="lorabench-trial-") as d:
        result_path, log_path = os.path.join(d, "result.json"), os.path.join(d, "stderr.log")
        open(log_path, "wb").close()
        proc = _context().Process(target=worker.trial_main, args=(asdict(spec), result_path, log_path, progress,
                                                                   threads or worker.default_threads(jobs)),
                                  name=f"trial-{spec.label}-{spec.task}-{spec.seed}")
        tail = bytearray()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        timed_out = False
        loads, next_load = [os.getloadavg()[0]], time.monotonic() + LOAD_EVERY_S
        with open(log_path, "rb") as log:
            def pump() -> None:
                chunk = log.read()
                if chunk:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                    tail.extend(chunk)
                    del tail[:-8000]
            try:
                with _main_script_hidden():
                    if _INTERRUPTED.is_set():  # the run stopped while this thread was on its way here (jobs > 1)
                        raise KeyboardInterrupt
                    proc.start()  # inside the try: a Ctrl-C during the start must still stop the trial
                while proc.is_alive():
                    if _INTERRUPTED.is_set():  # Ctrl-C in the main thread while this one waits (jobs > 1)
                        _kill_trial(proc)
                    proc.join(0.2)
                    pump()
                    if time.monotonic() >= next_load:
                        loads.append(os.getloadavg()[0])
                        next_load += LOAD_EVERY_S
                    if deadline is not None and time.monotonic() > deadline:
                        _kill_trial(proc)
                        proc.join()
                        timed_out = True
                        break
            except BaseException:  # Ctrl-C here (jobs = 1); with jobs > 1 the end-of-file of a killed fork server
                if proc.pid is not None:
                    _kill_trial(proc)
                    proc.join()  # before its temporary folder goes
                raise
            _kill_trial(proc)  # ended: whatever it started and left running goes with it
            pump()
        loads.append(os.getloadavg()[0])
        load = {"mean": round(sum(loads) / len(loads), 2), "max": round(max(loads), 2), "cores": os.cpu_count()}
        if os.path.exists(result_path) and not timed_out:
            with open(result_path) as f:
                return json.load(f) | {"load": load}
        last = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        code = proc.exitcode
        if timed_out:
            reason = f"timed out after {timeout_s:.0f} s"
        elif code is not None and code < 0:
            sig = signal.Signals(-code).name
            reason = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        else:
            reason = f"exited with code {code} without a result"
        return {"status": "failed", "error": f"trial process {reason}", "traceback": "\n".join(last), "load": load}


_LOG_LOCK = threading.Lock()


def _log(message: str) -> None:
    with _LOG_LOCK:  # parallel trials log from several threads: one whole line at a time
        sys.stdout.write(message + "\n")
        sys.stdout.flush()  # progress must show when stdout is a pipe or a file


def check_splits(records: list[dict], specs: dict, records_path: Path) -> None:
    """Refuse to resume over records made on another split of a task than the code now builds (a
    task's data or split sizes changed, the suite's version did not): they would be skipped as done
    and reported beside trials on the new split. Their trial ids are equal, so only the recorded
    `split_hash` tells them apart."""
    from lorabench.tasks import get_task
    seen: dict[str, str] = {}
    for r in records:
        spec = specs.get(r.get("trial_id"))
        if spec is None or r.get("status") != "ok" or not r.get("split_hash"):
            continue
        key = json.dumps([spec.task, spec.task_options], sort_keys=True)
        if spec.continual is not None:  # a sequence: its tasks' split hashes in order
            key = json.dumps(spec.continual["tasks"], sort_keys=True)
        if getattr(spec, "mixture", None) is not None:  # protocol (b): its training, then held-out tasks' hashes
            key = json.dumps([spec.mixture["train"], spec.mixture["held_out"]], sort_keys=True)
            if key not in seen:
                from lorabench.harness.mixture import split_tasks
                from lorabench.harness.sequence import sequence_split_hash
                tasks = split_tasks(spec.mixture["train"], "mixture") + split_tasks(spec.mixture["held_out"], "mixture")
                seen[key] = sequence_split_hash([t.split().hash for t in tasks])   # as run_mixture records it
        if getattr(spec, "reuse", None) is not None:  # the reuse protocol: every pool task's hash, in order
            key = json.dumps(spec.reuse["tasks"], sort_keys=True)
            if key not in seen:
                from lorabench.harness.mixture import split_tasks
                from lorabench.harness.sequence import sequence_split_hash
                seen[key] = sequence_split_hash([t.split().hash for t in split_tasks(spec.reuse["tasks"], "reuse")])
        if key not in seen and spec.continual is not None:
            from lorabench.harness.sequence import order_tasks, sequence_split_hash
            seen[key] = sequence_split_hash([t.split().hash for t in order_tasks(spec)])
        elif key not in seen:
            seen[key] = get_task(spec.task).from_options(spec.task_options, where=f"task {spec.task}").split().hash
        if r["split_hash"] != seen[key]:
            raise UserError(
                f"{records_path}: trial {r['trial_id']} ({spec.label} on {spec.task}, seed {spec.seed}) was recorded "
                f"on another split of {spec.task} (hash {r['split_hash']}) than the code builds now "
                f"({seen[key]}): the task's data or split sizes changed since. Raise the suite's `version` "
                f"(its trials then get new ids) or write to another --records file; nothing was run or changed")


def emulated_bf16_warning(specs) -> str | None:
    """The warning for trials under bf16 autocast on a CPU that emulates bf16 (no AVX-512 BF16, no AMX-BF16),
    where they run 7-11x slower than in fp32; None where no trial uses it or the CPU has either feature."""
    n = sum(1 for spec in specs if (spec.train or {}).get("autocast", "off") != "off")
    if not n or native_bf16():
        return None
    return (f"warning: {n} trial(s) to run use bf16 autocast (train.autocast), and this CPU "
            f"({cpu_description()}) has neither AVX-512 BF16 nor AMX-BF16: its bf16 matmuls are emulated, "
            f"7-11x slower than fp32 (tools/bf16_vs_fp32.py). The records are the same protocol, only slower; "
            f"a machine with either feature runs them 1.5-3x faster than fp32")


def run_suite(suite: Suite, records_path: Path, overrides: list[str], timeout_s: float | None = None,
              progress: bool = True, log=_log, jobs: int | None = None, backend=None) -> list[str]:
    """Run every trial of `suite` not yet in `records_path`. Returns the trial ids of the suite.

    `jobs` trials run at once (default: each task's `jobs`, else the suite's, else 1), each in its own
    process; every record is appended as soon as its trial ends, so a killed run loses only the
    trials in flight. A trial without `train.threads` gets the available cores / jobs threads
    (worker.default_threads; small models gain from jobs > 1, large ones lose, memory bandwidth
    being shared). `backend`: None runs the trials here; a RayBackend (lorabench/runner/ray_backend.py)
    runs them as Ray tasks on a cluster, its nodes returning the results and this process alone
    writing the records, which are the same but for where and how long each trial ran.
    """
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs (trials run at once) must be at least 1, got {jobs}")
    _INTERRUPTED.clear()
    records = read_records(records_path)
    trials = suite.trials(records)  # with tune_seeds, the chosen rates come from the recorded tuning trials
    done = {r.get("trial_id") for r in records}
    env = environment()
    todo = [(trial_id(t), t) for t in trials]
    ids = [tid for tid, _ in todo]
    n_done = sum(1 for i, _ in todo if i in done)
    check_splits(records, dict(todo), records_path)
    log(f"suite {suite.name} v{suite.version}: {len(trials)} trials, {n_done} already recorded in {records_path}")
    pending = []
    for k, (tid, spec) in enumerate(todo, 1):
        name = f"[{k}/{len(todo)}] {spec.label} on {spec.task} (seed {spec.seed})"
        if tid in done:
            log(f"{name}: recorded, skipped")
            continue
        done.add(tid)  # a trial listed twice (same id) runs once
        pending.append((name, tid, spec))
    if backend is None and (warning := emulated_bf16_warning([spec for _, _, spec in pending])):
        log(warning)

    def record(tid: str, spec, result: dict, started: str, finished: str, wall_s: float, n_jobs: int | None,
               where: dict) -> dict:
        """A trial's record. `where`: the machine it ran on (provenance.environment() there, `node`,
        `backend`, and the cluster's fields); none of it is part of the trial's identity."""
        return {
            "record_version": RECORD_VERSION, "trial_id": tid, "suite": suite.name,
            "suite_version": suite.version, "label": spec.label, "method": spec.method,
            "method_options": spec.method_options, "task": spec.task, "task_options": spec.task_options,
            "model": spec.model or _default_model(spec.task), "seed": spec.seed, "overrides": overrides,
            "started_at": started, "finished_at": finished, "wall_s": wall_s,
            "jobs": n_jobs, **where, **result,
        }

    here = env | {"backend": "local", "node": platform.node()}

    def one(name: str, tid: str, spec, n_jobs: int) -> dict:
        log(f"{name}: running")
        started, t0 = _now(), time.perf_counter()
        result = run_one(spec, timeout_s, progress, n_jobs)
        return record(tid, spec, result, started, _now(), round(time.perf_counter() - t0, 3), n_jobs, here)

    def finish(name: str, record: dict) -> None:
        append_record(records_path, record)
        where = f" on {record['node']}" if record.get("backend") == "ray" else ""
        if record["status"] == "ok":
            log(f"{name}: {record['metric']} = {record['score']:.4f} ({record['wall_s']:.1f} s{where})")
        else:
            log(f"{name}: FAILED: {record['error']}")

    if backend is not None:  # the cluster schedules; this process writes every record (finish)
        backend.run(pending, timeout_s, record, finish, log)
        return _next_seeds(suite, records_path, overrides, timeout_s, progress, log, jobs, backend, ids)
    # Consecutive trials with the same number of jobs run together; a task's trials are consecutive.
    groups: list[tuple[int, list]] = []
    for p in pending:
        n = jobs or suite.jobs_for(p[2])
        if groups and groups[-1][0] == n:
            groups[-1][1].append(p)
        else:
            groups.append((n, [p]))
    try:
        for n_jobs, group in groups:
            if n_jobs == 1:
                for name, tid, spec in group:
                    finish(name, one(name, tid, spec, 1))
                continue
            # Threads only wait on trial processes; records are appended from this thread alone.
            with concurrent.futures.ThreadPoolExecutor(max_workers=n_jobs) as pool:
                futures = {pool.submit(one, *p, n_jobs): p[0] for p in group}
                try:
                    for fut in concurrent.futures.as_completed(futures):
                        finish(futures[fut], fut.result())
                except BaseException:  # Ctrl-C, or a closed stdout (`| head`): stop, do not wait for the trials
                    for fut in futures:
                        fut.cancel()
                    _INTERRUPTED.set()  # the threads kill their trials
                    _stop_fork_server()  # and those waiting on a fork server still starting stop waiting
                    raise  # (leaving the `with` waits for the threads)
    except BaseException:
        _INTERRUPTED.set()
        _stop_fork_server()  # again: one a thread started before it saw the stop
        raise
    return _next_seeds(suite, records_path, overrides, timeout_s, progress, log, jobs, backend, ids)


def _next_seeds(suite, records_path, overrides, timeout_s, progress, log, jobs, backend, ids) -> list[str]:
    """Tuning trials just recorded may have chosen the learning rate of the other seeds: run those next."""
    records = read_records(records_path, warn=False)
    if {trial_id(t) for t in suite.trials(records)} - set(ids):
        log("learning rates chosen on the tuning seeds' validation scores: running the other seeds"
            + (f" and the tasks that take the factor chosen on {suite.tune_task.name}" if suite.tune_task else ""))
        return run_suite(suite, records_path, overrides, timeout_s, progress, log, jobs, backend)
    for task, label, seeds in suite.pending(records):
        where = suite.tune_task.name if suite.tune_task is not None else task
        how = (f"run the grid on the tuning task: tasks={where}" if where != task else "run the tuning seeds")
        log(f"{label} on {task}: seed(s) {', '.join(map(str, seeds))} wait for a learning rate: its tuning trials "
            f"on {where} are not all recorded ok with a validation score (see the failures above, or {how})")
    return ids


def _default_model(task: str) -> str:
    from lorabench.tasks import get_task
    return get_task(task).default_model
