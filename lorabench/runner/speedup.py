"""The wall time a suite would take on N machines, computed from the per-trial times in its records
(docs/scale.md): `python -m lorabench.runner.speedup RECORDS [--slots 1,2,4,8]`.

A slot is what one trial holds: one CPU with the Ray backend (a trial's `train.threads` CPUs), so a cluster
of N machines with C free CPUs each has N x C slots. The estimate is the longest-processing-time-first
schedule of the recorded trial times over the slots (Graham 1969: within 4/3 of the best schedule for independent
trials), which is also what a queue served in that order gives; it assumes a trial takes as long on every machine
as where it was recorded. Trials are independent except in a suite with `tune_seeds`: a method's other seeds on a
task run at the rate its learning-rate grid chose, so they wait until every grid trial of that method and task has
ended. The records show which trials those are: the seeds of a (task, label) group recorded at more than one rate
ran the grid; the group's other seeds wait for them.
"""
from __future__ import annotations

import argparse
import heapq


def makespan(times: list[float], slots: int) -> float:
    """Wall time of independent `times` scheduled longest first, each on the slot that frees first."""
    return schedule([(t, None, False) for t in times], slots)


def schedule(trials: list[tuple[float, object, bool]], slots: int) -> float:
    """Wall time of `trials`, each (time, group, grid), on `slots` slots, longest ready trial first: a trial of a group
    that has grid trials, itself not one, is ready once every grid trial of its group has ended; the others at 0.
    Without grid trials this is `makespan`."""
    assert slots >= 1, "at least one slot"
    grid_left: dict = {}
    for t, group, grid in trials:
        if grid:
            grid_left[group] = grid_left.get(group, 0) + 1
    released: dict = {}   # group -> the time its last grid trial ends, once every one of them is scheduled
    waiting = {}          # group -> the times of its trials that wait for the grid
    ready = []            # max-heap of (-time, ...) over trials ready at 0 or released
    for t, group, grid in trials:
        if group in grid_left and not grid:
            waiting.setdefault(group, []).append(t)
        else:
            ready.append((-t, group, grid))
    heapq.heapify(ready)
    pending = []          # min-heap of (release time, group): groups whose grid is scheduled, trials not yet ready
    grid_end: dict = {}
    free = [0.0] * slots  # heap of the times the slots free up
    while ready or pending:
        now = free[0]
        while pending and pending[0][0] <= now:
            _, group = heapq.heappop(pending)
            for t in waiting.pop(group, []):
                heapq.heappush(ready, (-t, group, False))
        if not ready:  # every trial left waits for a grid still running: the slot idles until the first release
            heapq.heapreplace(free, pending[0][0])
            continue
        neg_t, group, grid = heapq.heappop(ready)
        end = now - neg_t
        heapq.heapreplace(free, end)
        if grid and group in grid_left:
            grid_end[group] = max(grid_end.get(group, 0.0), end)
            grid_left[group] -= 1
            if grid_left[group] == 0 and group in waiting:
                heapq.heappush(pending, (grid_end[group], group))
    return max(free)


def trials_of(records: list[dict], field: str = "wall_s") -> list[tuple[float, object, bool]]:
    """(time, group, grid) of each record with a number in `field`: the group is (suite, task, label); a record is a
    grid trial when its group's records at its seed carry more than one learning rate."""
    def lr(r):
        return (r.get("train") or {}).get("lr") if isinstance(r.get("train"), dict) else None
    rates: dict = {}
    for r in records:
        group = (r.get("suite"), r.get("task"), r.get("label") or r.get("method"))
        rates.setdefault((group, r.get("seed")), set()).add(lr(r))
    out = []
    for r in records:
        if isinstance(r.get(field), (int, float)) and not isinstance(r.get(field), bool):
            group = (r.get("suite"), r.get("task"), r.get("label") or r.get("method"))
            out.append((float(r[field]), group, len(rates[(group, r.get("seed"))]) > 1))
    return out


def table(times, slots: list[int]) -> list[tuple[int, float, float]]:
    """[(slots, wall_s, speed-up against one slot)]; `times` are trial times (independent trials) or
    (time, group, grid) triples (`trials_of`)."""
    trials = [(t, None, False) if isinstance(t, (int, float)) else t for t in times]
    one = schedule(trials, 1)
    return [(n, schedule(trials, n), one / schedule(trials, n)) for n in slots]


def main(argv: list[str] | None = None) -> int:
    from lorabench.runner.records import read_records
    p = argparse.ArgumentParser(prog="python -m lorabench.runner.speedup", description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="records files (JSONL)")
    p.add_argument("--slots", default="1,2,4,8,16", help="comma-separated slot counts (default 1,2,4,8,16)")
    p.add_argument("--field", default="wall_s", help="the per-trial time field (default wall_s)")
    args = p.parse_args(argv)
    trials = trials_of([r for path in args.records for r in read_records(path)], args.field)
    if not trials:
        p.error(f"no record in {', '.join(args.records)} has a number in {args.field}")
    times = [t for t, _, _ in trials]
    grid = sum(1 for _, _, g in trials if g)
    tuned = {group for _, group, g in trials if g}
    waits = sum(1 for _, group, g in trials if not g and group in tuned)
    print(f"{len(trials)} trials, {sum(times):.0f} s of trial time, longest {max(times):.0f} s"
          + (f"; {grid} ran a learning-rate grid, {waits} waited for theirs" if grid else ""))
    print(f"{'slots':>5s} {'wall s':>8s} {'speed-up':>8s}")
    for n, wall, speedup in table(trials, [int(x) for x in args.slots.split(",")]):
        print(f"{n:5d} {wall:8.0f} {speedup:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
