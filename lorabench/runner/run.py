"""Run a suite: every trial in its own subprocess, records appended to JSONL, resumable.

A crash, OOM or NaN in one trial becomes a failed record with its reason and the suite goes on.
Trials already recorded (by trial id, ok or failed) are skipped, so a killed suite resumes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from lorabench.measure.provenance import environment
from lorabench.runner.records import RECORD_VERSION, append_record, read_records
from lorabench.runner.suite import Suite, trial_id


def _die_with_parent() -> None:
    """Child side: get SIGKILL when the runner dies, so a killed suite leaves no orphan trial."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_one(spec, timeout_s: float | None, progress: bool) -> dict:
    """Run one trial in a subprocess; returns the worker's result (or a failure describing the crash)."""
    with tempfile.TemporaryDirectory(prefix="lorabench-trial-") as d:
        spec_path, result_path = os.path.join(d, "spec.json"), os.path.join(d, "result.json")
        with open(spec_path, "w") as f:
            json.dump(asdict(spec) | {"_progress": progress}, f)
        cmd = [sys.executable, "-m", "lorabench.runner.worker", spec_path, result_path]
        tail = bytearray()
        proc = subprocess.Popen(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        timed_out = False
        try:
            while True:
                chunk = proc.stderr.read1(4096) if proc.stderr else b""
                if chunk:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                    tail.extend(chunk)
                    del tail[:-8000]
                elif proc.poll() is not None:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    proc.kill()
                    timed_out = True
                    break
        except KeyboardInterrupt:
            proc.kill()
            raise
        proc.wait()
        if os.path.exists(result_path):
            with open(result_path) as f:
                return json.load(f)
        last = tail.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-15:]
        if timed_out:
            reason = f"timed out after {timeout_s:.0f} s"
        elif proc.returncode < 0:
            sig = signal.Signals(-proc.returncode).name
            reason = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        else:
            reason = f"exited with code {proc.returncode}"
        return {"status": "failed", "error": f"trial process {reason}", "traceback": "\n".join(last)}


def run_suite(suite: Suite, records_path: Path, overrides: list[str], timeout_s: float | None = None,
              progress: bool = True, log=print) -> list[str]:
    """Run every trial of `suite` not yet in `records_path`. Returns the trial ids of the suite."""
    trials = suite.trials()
    done = {r.get("trial_id") for r in read_records(records_path)}
    env = environment()
    ids = []
    todo = [(trial_id(t), t) for t in trials]
    n_done = sum(1 for i, _ in todo if i in done)
    log(f"suite {suite.name} v{suite.version}: {len(trials)} trials, {n_done} already recorded in {records_path}")
    for k, (tid, spec) in enumerate(todo, 1):
        ids.append(tid)
        name = f"[{k}/{len(todo)}] {spec.label} on {spec.task} (seed {spec.seed})"
        if tid in done:
            log(f"{name}: recorded, skipped")
            continue
        log(f"{name}: running")
        started, t0 = _now(), time.perf_counter()
        result = run_one(spec, timeout_s, progress)
        record = {
            "record_version": RECORD_VERSION, "trial_id": tid, "suite": suite.name,
            "suite_version": suite.version, "label": spec.label, "method": spec.method,
            "method_options": spec.method_options, "task": spec.task, "task_options": spec.task_options,
            "model": spec.model or _default_model(spec.task), "seed": spec.seed, "overrides": overrides,
            "started_at": started, "finished_at": _now(), "wall_s": round(time.perf_counter() - t0, 3),
            **env, **result,
        }
        append_record(records_path, record)
        status = record["status"]
        if status == "ok":
            log(f"{name}: {record['metric']} = {record['score']:.4f} ({record['wall_s']:.1f} s)")
        else:
            log(f"{name}: FAILED: {record['error']}")
        done.add(tid)
    return ids


def _default_model(task: str) -> str:
    from lorabench.tasks import get_task
    return get_task(task).default_model
