"""Entry point of a trial subprocess: `python -m lorabench.runner.worker SPEC.json RESULT.json`.

Writes {"status": "ok", ...result} or {"status": "failed", "error": ..., "traceback": ...} to
RESULT.json; the parent turns that (or the absence of it, after a crash) into a record.
"""
from __future__ import annotations

import json
import sys
import traceback


def main(argv: list[str]) -> int:
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec_data = json.load(f)
    progress = spec_data.pop("_progress", True)
    try:
        from lorabench.harness.trial import TrialSpec, run_trial
        result = {"status": "ok"} | run_trial(TrialSpec(**spec_data), progress=progress)
        code = 0
    except Exception as e:  # recorded as a failed trial; the suite goes on
        result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
        code = 1
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, default=str)
    import os
    os.replace(tmp, result_path)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
