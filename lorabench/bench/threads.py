"""`python -m lorabench bench threads`: how a trial's threads behave when the machine is shared.

A controlled experiment behind the runner's thread policy (lorabench/runner/worker.py). One fixed
workload, a training step of a MiniLM-sized MLP block (--tokens tokens x hidden 384, MLP 1,536, 4
blocks, forward + backward), is timed in fresh processes, one per configuration:
  policy   how OpenMP's threads wait at a barrier: `default` (libgomp spins ~300,000 iterations
           before it sleeps), `PASSIVE` (OMP_WAIT_POLICY: sleeps at once) or `spin1k`
           (GOMP_SPINCOUNT=1000: spins briefly, then sleeps). It is read when libgomp starts, hence
           one process per configuration.
  threads  torch's intra-op threads.
  busy     CPU-bound processes (`while True: pass`) running beside it: 0 = idle machine, and as many
           as the cores = the machine shared with that many other jobs.
Every configuration runs once per round, rounds interleaved in one run (ratios, not absolute
times: the machine is shared and noisy); the result is each configuration's median step time over
rounds, and its slowdown against the same configuration on the idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

_WORKLOAD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
blocks = [torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
          for _ in range(4)]
x = torch.randn(int(sys.argv[3]), 384)
def step():
    h = x
    for b in blocks:
        h = h + b(h)
    h.square().mean().backward()
for _ in range(3):
    step()
times = []
t_end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < t_end or len(times) < 5:
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"step_ms": 1000 * times[len(times) // 2], "steps": len(times)}))
"""


POLICIES = {"default": {}, "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"}, "spin1k": {"GOMP_SPINCOUNT": "1000"}}


def _time_one(policy: str, threads: int, busy: int, seconds: float, tokens: int) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(POLICIES[policy])
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        out = subprocess.run([sys.executable, "-c", _WORKLOAD, str(threads), str(seconds), str(tokens)], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    return json.loads(out)["step_ms"]


def main(argv: list[str]) -> int:
    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(prog="python -m lorabench bench threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default=f"1,{cores}", help="comma-separated intra-op thread counts")
    p.add_argument("--busy", default=f"0,{cores}", help="comma-separated numbers of CPU-bound processes beside it")
    p.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {','.join(POLICIES)}")
    p.add_argument("--rounds", type=int, default=2, help="rounds; every configuration runs once per round")
    p.add_argument("--tokens", type=int, default=1024,
                   help="tokens per step (1,024 = quick's batch of 16 reviews x 64 tokens; fewer: smaller ops, "
                        "more of the step spent at OpenMP barriers)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per configuration and round")
    args = p.parse_args(argv)
    configs = [(pol, int(t), int(b)) for b in args.busy.split(",") for pol in args.policies.split(",")
               for t in args.threads.split(",")]
    runs: dict[tuple, list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate: no config always first
        for c in order:
            runs[c].append(_time_one(*c, args.seconds, args.tokens))
    print(f"{cores} cores; load average {os.getloadavg()[0]:.1f} at the end; median step over {args.rounds} rounds")
    print(f"{'policy':8s} {'threads':>7s} {'busy':>4s} {'step ms':>8s} {'vs idle':>8s}")
    for pol, t, b in configs:
        ms = statistics.median(runs[(pol, t, b)])
        idle = runs.get((pol, t, 0))
        ratio = f"{ms / statistics.median(idle):7.2f}x" if idle else "-"
        print(f"{pol:8s} {t:7d} {b:4d} {ms:8.1f} {ratio:>8s}")
    return 0


if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = main(sys.argv[1:])
    print(f"({time.perf_counter() - t0:.0f} s)")
    sys.exit(rc)
