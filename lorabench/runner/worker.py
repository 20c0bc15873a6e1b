"""The body of a trial process: run one trial, write its result as JSON.

Trial processes are forked from a fork server that has already imported torch and transformers
(`multiprocessing` "forkserver" with preloading), so every trial gets a fresh process of its own
(own memory peak, a crash kills only it) without paying the ~3 s of imports each time.
The result file holds {"status": "ok", ...result} or {"status": "failed", "error", "traceback"};
when the process dies before writing it, the runner records the crash instead.
"""
from __future__ import annotations

import json
import os
import signal
import traceback

PRELOAD = ["torch", "transformers", "lorabench.harness.trial"]


def _die_with_parent() -> None:
    """Get SIGKILL when the parent dies, so a killed suite leaves no orphan trial running."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def trial_main(spec_data: dict, result_path: str, log_path: str, progress: bool) -> None:
    _die_with_parent()
    # The runner streams this file to its own stderr (progress bars, warnings) and keeps its tail
    # as the reason of a crash.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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
