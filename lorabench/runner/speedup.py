"""The wall time a suite would take on N machines, computed from the per-trial times in its records
(docs/scale.md): `python -m lorabench.runner.speedup RECORDS [--slots 1,2,4,8]`.

A slot is what one trial holds: one CPU with the Ray backend (a trial's `train.threads` CPUs), so a cluster
of N machines with C free CPUs each has N x C slots. Trials are independent (apart from tune_seeds, which
waits for its grid), so the estimate is the longest-processing-time-first schedule of the recorded trial
times over the slots (Graham 1969: within 4/3 of the best schedule), which is also what a queue served in
that order gives; it assumes a trial takes as long on every machine as where it was recorded.
"""
from __future__ import annotations

import argparse
import heapq


def makespan(times: list[float], slots: int) -> float:
    """Wall time of `times` scheduled longest first, each on the slot that frees first."""
    assert slots >= 1, "at least one slot"
    free = [0.0] * slots
    for t in sorted(times, reverse=True):
        heapq.heapreplace(free, free[0] + t)  # free is a heap: free[0] is the slot that frees first
    return max(free)


def table(times: list[float], slots: list[int]) -> list[tuple[int, float, float]]:
    """[(slots, wall_s, speed-up against one slot)]."""
    one = makespan(times, 1)
    return [(n, makespan(times, n), one / makespan(times, n)) for n in slots]


def main(argv: list[str] | None = None) -> int:
    from lorabench.runner.records import read_records
    p = argparse.ArgumentParser(prog="python -m lorabench.runner.speedup", description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="records files (JSONL)")
    p.add_argument("--slots", default="1,2,4,8,16", help="comma-separated slot counts (default 1,2,4,8,16)")
    p.add_argument("--field", default="wall_s", help="the per-trial time field (default wall_s)")
    args = p.parse_args(argv)
    times = [float(r[args.field]) for path in args.records for r in read_records(path)
             if isinstance(r.get(args.field), (int, float))]
    if not times:
        p.error(f"no record in {', '.join(args.records)} has a number in {args.field}")
    print(f"{len(times)} trials, {sum(times):.0f} s of trial time, longest {max(times):.0f} s")
    print(f"{'slots':>5s} {'wall s':>8s} {'speed-up':>8s}")
    for n, wall, speedup in table(times, [int(x) for x in args.slots.split(",")]):
        print(f"{n:5d} {wall:8.0f} {speedup:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
