"""Partitions of a task's training data over federated clients: IID (the control), Dirichlet label skew, and
the natural partition by domain.

`dirichlet:ALPHA` draws, for every class c, the clients' shares of c's examples from
Dir(ALPHA, ..., ALPHA) (Hsu et al., "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", arXiv 1909.06335, sec. 3): small ALPHA gives each client
few classes, large ALPHA tends to IID. Draws are repeated until every client holds at least
`min_size` examples (as common implementations do), at most 1,000 times.

`domain` gives each client the examples of one domain (client c holds domain c mod D of the D domains, in
sorted order; each domain's examples are dealt IID among its clients): for a task whose examples carry a
`domain` (movie-domains: Rotten Tomatoes sentences and IMDB reviews), the clients differ as real data
sources do. `domain:P` mixes: each domain's examples go to its home clients in a share P and to the other
clients in the rest, so a client's examples come a share P from its home domain when the domains are the
same size (P = 1 is `domain`; P = 1/D is IID by domain).

`role` / `role:P` is the same natural partition by the examples' `role`: the speaking roles of Shakespeare's
plays (`shakespeare-roles`, one client per role, as LEAF's Shakespeare benchmark and FedAvg's, McMahan et al.,
arXiv 1602.05629, sec. 3).

Which partitions a task can take: `iid` any; `dirichlet:ALPHA` a task with class labels; `domain` / `role` a task
whose examples carry that tag (its class's `partition_tags`); `fits` says why not.

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
NATURAL = ("domain", "role")  # natural partitions: by the example key of the same name
SPEC = re.compile(r"^(iid|dirichlet:(?P<alpha>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?)|(?P<tag>domain|role)"
                  r"(?::(?P<home>[0-9]*\.?[0-9]+))?)$")


def parse(partition: str) -> tuple[str, float | None]:
    """'iid' -> ('iid', None); 'dirichlet:0.3' -> ('dirichlet', 0.3); 'domain' -> ('domain', 1.0);
    'domain:0.8' -> ('domain', 0.8); 'role' / 'role:P' likewise -> ('role', P); anything else: UserError."""
    m = SPEC.match(str(partition))
    bad = not m or (m.group("alpha") is not None and float(m.group("alpha")) <= 0) or \
        (m.group("home") is not None and not 0 < float(m.group("home")) <= 1)
    if bad:
        raise UserError(f"partition {partition!r} is not valid: use 'iid' or 'dirichlet:ALPHA' with ALPHA > 0 "
                        f"(label skew; e.g. dirichlet:0.1 strongly skewed, dirichlet:10 close to iid), or 'domain' / "
                        f"'domain:P' with 0 < P <= 1 (each client's examples from one domain, or a share P from it), "
                        f"or 'role' / 'role:P' (the same by speaking role: shakespeare-roles)")
    if m.group(1) == "iid":
        return "iid", None
    if m.group("tag"):
        return m.group("tag"), float(m.group("home")) if m.group("home") else 1.0
    return "dirichlet", float(m.group("alpha"))


def fits(partition: str, task_cls) -> str | None:
    """Why the task (its class) cannot be partitioned by `partition`; None when it can."""
    kind, _ = parse(partition)
    if kind == "dirichlet" and task_cls.head != "seq-cls":
        return (f"partition {partition} skews class labels; task {task_cls.name} has none (a {task_cls.kind} task): "
                f"use iid" + "".join(f" or {t}" for t in task_cls.partition_tags))
    if kind in NATURAL and kind not in task_cls.partition_tags:
        have = {"domain": "movie-domains", "role": "shakespeare-roles"}[kind]
        return (f"partition {partition} needs a task whose examples carry a {kind} ({have}); task {task_cls.name}'s "
                f"examples have none: use iid" + (" or dirichlet:ALPHA" if task_cls.head == "seq-cls" else "")
                + "".join(f" or {t}" for t in task_cls.partition_tags))
    return None


def domain_indices(domains: list[str], n_clients: int, partition: str, home: float) -> list[list[int]]:
    """Client c's home domain (or role) is c mod D; it holds a share `home` of its examples from it and the rest
    evenly from the other domains (each domain's examples dealt without replacement, so clients are disjoint)."""
    names = sorted(set(domains))
    if len(names) > n_clients:
        what = parse(partition)[0]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise UserError(f"partition {partition}: {len(names)} {what}s ({shown}) need at least as many "
                        f"clients; use clients >= {len(names)}")
    rng = _rng(partition, n_clients)
    pools = {d: rng.permutation([i for i, x in enumerate(domains) if x == d]).tolist() for d in names}
    homes = [names[c % len(names)] for c in range(n_clients)]
    # how many examples client c takes from domain d: its home share, or an even part of the rest
    want = np.zeros((n_clients, len(names)))
    for c, h in enumerate(homes):
        for j, d in enumerate(names):
            want[c, j] = home if d == h else (1 - home) / max(1, len(names) - 1)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for j, d in enumerate(names):
        shares = want[:, j] / want[:, j].sum()
        cuts = (np.cumsum(shares)[:-1] * len(pools[d])).round().astype(int)
        for c, chunk in enumerate(np.split(np.asarray(pools[d], dtype=int), cuts)):
            parts[c].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def _rng(partition: str, n_clients: int) -> np.random.Generator:
    tag = hashlib.sha256(f"{PARTITION_SEED}:{partition}:{n_clients}".encode()).digest()
    return np.random.default_rng(int.from_bytes(tag[:8], "little"))


def partition_indices(labels: list[int], n_clients: int, partition: str, min_size: int = 2,
                      domains: list[str] | None = None) -> list[list[int]]:
    """Indices of the examples each of `n_clients` clients holds (disjoint, covering every example)."""
    kind, alpha = parse(partition)
    n = len(labels)
    if n < n_clients * min_size:
        raise UserError(f"{n} training examples cannot give {n_clients} clients {min_size} each; "
                        f"use fewer clients or more training examples (task option n_train)")
    if kind in NATURAL:
        if domains is None or any(d is None for d in domains):
            have = {"domain": "movie-domains: Rotten Tomatoes and IMDB reviews",
                    "role": "shakespeare-roles: the plays' lines by speaking role"}[kind]
            raise UserError(f"partition {partition!r} needs a task whose examples carry a {kind} ({have}); this "
                            f"task's examples have none: use iid or dirichlet")
        parts = domain_indices(domains, n_clients, partition, alpha)
        if min(len(p) for p in parts) < min_size:
            raise UserError(f"partition {partition}: a client gets fewer than {min_size} examples; use fewer clients "
                            f"or more training examples (task option n_train)")
        return parts
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
    kind = parse(partition)[0]
    domains = [e.get(kind) for e in examples] if kind in NATURAL else None
    labels = [int(e["label"]) for e in examples] if kind == "dirichlet" else [0] * len(examples)
    parts = partition_indices(labels, n_clients, partition, min_size=2 if test_fraction > 0 else 1, domains=domains)
    out = []
    for idx in parts:
        n_test = max(1, int(round(test_fraction * len(idx)))) if test_fraction > 0 else 0
        mine = [examples[i] for i in idx]
        out.append((mine[: len(mine) - n_test], mine[len(mine) - n_test:]))
    return out


def label_skew(parts: list[tuple[list[dict], list[dict]]]) -> float:
    """Mean over clients of the total-variation distance between the client's label distribution and the
    pooled one: 0 for identical distributions, towards 1 for clients that hold one class each; None for
    examples without labels (a language-modelling task)."""
    if not parts or "label" not in (parts[0][0] + parts[0][1] or [{}])[0]:
        return None
    train = [[int(e["label"]) for e in tr + te] for tr, te in parts]
    classes = sorted({y for ys in train for y in ys})
    pooled = np.array([sum(ys.count(c) for ys in train) for c in classes], float)
    pooled /= pooled.sum()
    tv = []
    for ys in train:
        p = np.array([ys.count(c) for c in classes], float)
        tv.append(0.5 * np.abs(p / p.sum() - pooled).sum())
    return float(np.mean(tv))


def client_majority(parts: list[tuple[list[dict], list[dict]]]) -> list[float | None] | None:
    """Each client's trivial personalised score: the share of its own test examples whose label is the most
    frequent label of its own training examples (ties: the smaller label), the score of a local model that
    predicts its client's majority class. Under label skew it is high (a client holding one class scores ~1
    by predicting it), so a personalised score means something only above it. None for examples without
    labels; a client without test examples gets None."""
    if not parts or "label" not in (parts[0][0] + parts[0][1] or [{}])[0]:
        return None
    out: list[float | None] = []
    for train, test in parts:
        ys = [int(e["label"]) for e in train] or [int(e["label"]) for e in test]
        top = min(set(ys), key=lambda c: (-ys.count(c), c))
        out.append(round(sum(int(e["label"]) == top for e in test) / len(test), 6) if test else None)
    return out


def client_domains(parts: list[tuple[list[dict], list[dict]]], key: str = "domain") -> list[dict[str, int]] | None:
    """Each client's number of examples (train and test) per domain (or per `key`: "role"); None when the
    examples carry no such key."""
    if not parts or key not in (parts[0][0] + parts[0][1] or [{}])[0]:
        return None
    out = []
    for tr, te in parts:
        counts: dict[str, int] = {}
        for e in tr + te:
            counts[e[key]] = counts.get(e[key], 0) + 1
        out.append(dict(sorted(counts.items())))
    return out
