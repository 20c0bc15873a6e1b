#!/bin/bash
# issue 21: one board part (claims, rt-sentiment, head + lora, seeds 1-2, the seed-0 grid already recorded) on the
# local backend (--jobs 2) and on a two-node loopback Ray cluster (2 nodes x 1 CPU), one after the other, idle machine
cd "$(dirname "$0")/../.."
D=results/scale/tmp
cp $D/seed.jsonl $D/local.jsonl; cp $D/seed.jsonl $D/ray.jsonl
uptime > $D/uptime.txt
t0=$(date +%s)
.venv/bin/python -m lorabench run claims tasks=rt-sentiment methods=head,lora seeds=1,2 --records $D/local.jsonl --jobs 2 --no-progress > $D/local.log 2>&1
t1=$(date +%s)
echo "local $((t1-t0))" > $D/times.txt
uptime >> $D/uptime.txt
.venv/bin/python - > $D/ray.log 2>&1 <<'PY'
import subprocess, sys, time
from lorabench.runner.ray_cluster import LoopbackCluster
t0 = time.time()
with LoopbackCluster(nodes=2, cpus_per_node=1) as c:
    t1 = time.time()
    print("cluster start", round(t1 - t0, 1), c.address, flush=True)
    rc = subprocess.call([sys.executable, "-m", "lorabench", "run", "claims", "tasks=rt-sentiment", "methods=head,lora",
                          "seeds=1,2", "--records", "results/scale/tmp/ray.jsonl", "--backend", "ray", "--address", c.address,
                          "--no-progress"])
    t2 = time.time()
    print("suite", round(t2 - t1, 1), "rc", rc, flush=True)
print("stop", round(time.time() - t2, 1), flush=True)
PY
t2=$(date +%s)
echo "ray_total $((t2-t1))" >> $D/times.txt
uptime >> $D/uptime.txt
