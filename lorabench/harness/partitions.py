"""Partitions of a task's training data over federated clients: IID (the control) and Dirichlet label skew.

`dirichlet:ALPHA` draws, for every class c, the clients' shares of c's examples from
Dir(ALPHA, ..., ALPHA) (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", arXiv 1909.06335, sec. 3): small ALPHA gives each client
few classes, large ALPHA tends to IID. Draws are repeated until every client holds at least
`min_size` examples (as common implementations do), at most 1,000 times.

The partition never depends on the trial's seed (every method and seed sees the same clients),
and each client's examples are split into its own training and test parts (the test part
scores personalised models).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np

from lorabench.errors import UserError

PARTITION_SEED = 1234  # fixed, like the tasks' SPLIT_SEED
SPEC = re.compile(r"^(iid|dirichlet:(?P<alpha>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?))$")


def parse(partition: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.3' -> ('dirichlet', 0.3); anything else: UserError."""
    m = SPEC.match(str(partition))
    if not m or (m.group("alpha") is not None and float(m.group("alpha")) <= 0):
        raise UserError(f"partition {partition!r} is not valid: use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 "
                        f"(label skew; e.g. dirichlet:0.1 strongly skewed, dirichlet:10 close to iid)")
    return ("iid", None) if m.group(1) == "iid" else ("dirichlet", float(m.group("alpha")))


def _rng(partition: str, n_clients: int) -> np.random.Generator:
    tag = hashlib.sha256(f"{PARTITION_SEED}:{partition}:{n_clients}".encode()).digest()
    return np.random.default_rng(int.from_bytes(tag[:8], "little"))


def partition_indices(labels: list[int], n_clients: int, partition: str, min_size: int = 2) -> list[list[int]]:
    """Indices of the examples each of `n_clients` clients holds (disjoint, covering every example)."""
    kind, alpha = parse(partition)
    n = len(labels)
    if n < n_clients * min_size:
        raise UserError(f"{n} training examples cannot give {n_clients} clients {min_size} each; "
                        f"use fewer clients or more training examples (task option n_train)")
    rng = _rng(partition, n_clients)
    if kind == "iid":
        order = rng.permutation(n)
        return [sorted(part.tolist()) for part in np.array_split(order, n_clients)]
    y = np.asarray(labels)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(n_clients, alpha))  # client shares of class c
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise UserError(f"partition {partition}: no Dirichlet draw in 1,000 gave each of {n_clients} clients "
                    f"{min_size} examples; raise ALPHA or the number of training examples")


def client_parts(examples: list[dict], n_clients: int, partition: str, test_fraction: float) -> list[tuple[list[dict], list[dict]]]:
    """(train, test) examples of each client: its partition, the last `test_fraction` of it (at least one
    example) held out as its own test data."""
    parts = partition_indices([int(e["label"]) for e in examples], n_clients, partition,
                              min_size=2 if test_fraction > 0 else 1)
    out = []
    for idx in parts:
        n_test = max(1, int(round(test_fraction * len(idx)))) if test_fraction > 0 else 0
        mine = [examples[i] for i in idx]
        out.append((mine[: len(mine) - n_test], mine[len(mine) - n_test:]))
    return out


def label_skew(parts: list[tuple[list[dict], list[dict]]]) -> float:
    """Mean over clients of the total-variation distance between the client's label distribution and the
    pooled one: 0 for identical distributions, towards 1 for clients that hold one class each."""
    train = [[int(e["label"]) for e in tr + te] for tr, te in parts]
    classes = sorted({y for ys in train for y in ys})
    pooled = np.array([sum(ys.count(c) for ys in train) for c in classes], float)
    pooled /= pooled.sum()
    tv = []
    for ys in train:
        p = np.array([ys.count(c) for c in classes], float)
        tv.append(0.5 * np.abs(p / p.sum() - pooled).sum())
    return float(np.mean(tv))
