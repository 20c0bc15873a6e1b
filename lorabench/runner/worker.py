"""The body of a trial process: run one trial, write its result as JSON.

Trial processes are forked from a fork server that has already imported torch and transformers
(`multiprocessing` "forkserver" with preloading), so every trial gets a fresh process of its own
(own memory peak, a crash kills only it) without paying the ~3 s of imports each time, nor the ~2.4 s of
transformers' lazily imported model and tokenizer classes (lorabench/runner/preload.py).
The result file holds {"status": "ok", ...result} or {"status": "failed", "error", "traceback"};
when the process dies before writing it, the runner records the crash instead.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import traceback

PRELOAD = ["torch", "transformers", "lorabench.harness.trial", "lorabench.runner.preload"]

# Environment of the fork server, set before it starts (lorabench.runner.run._context), since
# libgomp (the OpenMP of torch's CPU wheels) reads it once, when torch's import loads it there.
# By default libgomp spins ~300,000 iterations at every barrier before it sleeps: on a shared
# machine a spinning thread burns the time slice that the thread it waits for needs, and a trial
# slows down far more than the load explains (issue 22: 10-20x under a ~3x load). 1,000 spins,
# then sleep: `python -m lorabench bench threads` measured a step with 2 threads beside 2 busy
# processes ~7x faster than the default, and no slower than sleeping at once (OMP_WAIT_POLICY=
# PASSIVE), which costs more on an idle machine (docs/architecture.md, "Threads on a shared
# machine"). A value the user has set wins.
TRIAL_ENV = {"GOMP_SPINCOUNT": "1000"}


def default_threads(jobs: int) -> int:
    """Intra-op threads of a trial that does not set `train.threads`: the cores this process may
    run on (its affinity mask, which taskset and cgroup cpusets narrow, unlike os.cpu_count), shared
    among the `jobs` trials that run at once, so parallel trials do not oversubscribe the cores."""
    return max(1, len(os.sched_getaffinity(0)) // jobs)


def _die_with_parent() -> None:
    """Die when the fork server, this process's parent, dies (SIGKILL from the kernel: PR_SET_PDEATHSIG): the
    runner kills the fork server when it stops (run.py, _stop_fork_server)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _own_process_group() -> None:
    """Make this trial the leader of a process group of its own, so that the runner's stop (run.py, _kill_trial)
    kills the trial and every process it started, in one call. A federated trial starts a private Ray instance
    (GCS, raylet, and the raylet's DashboardAgent and RuntimeEnvAgent), which inherits this group: killed alone,
    the trial left those agents running (and polling) minutes after the run had stopped. Only a trial started by
    the runner moves (a test calling trial_main itself stays in pytest's group)."""
    import multiprocessing
    if multiprocessing.parent_process() is None:
        return
    with contextlib.suppress(OSError):  # already a session leader (no setpgid allowed): keep the group it has
        os.setpgid(0, 0)


def _die_with_runner() -> None:
    """Die when the runner that started this trial (the process that called run_one: `python -m lorabench run`,
    or a Ray worker) dies or lets go of it, so that a killed suite leaves no orphan trial running.

    The fork server, this process's parent, does not die with the runner: it exits once every holder of its
    "alive" pipe has closed it (multiprocessing/forkserver.py), and every process it forks holds one, this trial
    too. So a trial whose runner was killed kept its fork server alive, and the fork server's death, which
    _die_with_parent waits for, never came: the trial trained on as an orphan. What does end with the runner is
    the pipe multiprocessing gives each process it starts to watch its starter by (the runner holds the write end
    while it holds the Process: popen_forkserver.py, `_parent_w`; here `parent_process().sentinel`, which reads
    end-of-file once the runner has exited, however it exited). A daemon thread waits on it and kills this
    process (at once if the runner died before the thread started: end-of-file stays readable)."""
    import multiprocessing
    import multiprocessing.connection
    import threading
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by multiprocessing (a test calling trial_main itself)
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        if os.getpgid(0) == os.getpid():  # its own group (_own_process_group): this trial and what it started
            os.killpg(0, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="die-with-runner", daemon=True).start()


def trial_main(spec_data: dict, result_path: str, log_path: str, progress: bool, threads: int | None = None) -> None:
    _own_process_group()
    _die_with_parent()
    _die_with_runner()
    # Ctrl-C reaches every process of the terminal's group, which a trial has left (_own_process_group) unless it
    # runs outside the runner: the runner owns it (it kills this trial and says what is recorded); a
    # KeyboardInterrupt here would only add a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm guards its bars with a multiprocessing lock, a named semaphore that a killed trial never
    # unlinks ("leaked semaphore objects" at exit); one process needs only a thread lock.
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    if threads:  # the trial's own train.threads, if set, still wins (lorabench.harness.trial)
        import torch
        torch.set_num_threads(threads)
    # The runner streams this file to its own stderr (progress bars, warnings) and keeps its tail
    # as the reason of a crash.
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except FileNotFoundError:  # the runner was interrupted while this process started: nobody waits for it
        return
    os.dup2(fd, 2)
    os.close(fd)
    try:
        from lorabench.harness.trial import TrialSpec, run_trial
        result = {"status": "ok"} | run_trial(TrialSpec(**spec_data), progress=progress)
    except Exception as e:  # recorded as a failed trial; the suite goes on
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=str)
    os.replace(tmp, result_path)
