"""Suite files (YAML): load strictly, validate everything up front, expand into trials.

```yaml
suite: quick                 # must equal the file name
version: 1
description: what this suite is for
seeds: [0]
model: null                  # optional: run every task on this model instead of its default
train: {steps: 150, batch_size: 32}          # TrainConfig options (lorabench/harness/train.py)
tasks:
  - rt-sentiment
  - {name: quartz, options: {n_eval: 200}, train: {steps: 50}}
  - {name: socialiqa, lm_eval: true}     # also scored by lm-evaluation-harness (record key lm_eval)
  - {name: sarcasm, jobs: 2, train: {threads: 1}}  # two trials at a time (default: the suite's jobs, else 1)
  - {name: quartz, seeds: [0, 1]}   # a subset of the suite's seeds for this task (a costly one); a seeds= override
                                    # on the command line keeps the task's seeds that it lists
methods:
  - head
  - {name: lora, label: lora-r8, options: {rank: 8}, train: {lr: 1.0e-3}}
lr_grid: [0.3, 1, 3]         # optional, also per task or per method (the most specific wins): one trial per
                             # factor x the trial's learning rate (train.lr, else the method's default_lr);
                             # the report keeps, per task and method, the rate with the best validation score
tune_seeds: [0]              # optional, with lr_grid: only these seeds run the grid; every other seed runs
                             # once, at the rate they chose (read from the records: lorabench/runner/tuning.py)
tune_task: rt-sentiment      # optional, with lr_grid: only this task runs the grid; on every other task each
                             # seed runs once at the factor of the grid chosen there (the factor, not the rate:
                             # a method's scale comes from its train.lr or default_lr, as on the tuning task);
                             # a tasks= override that leaves the tuning task out still reads its choice
federated: {clients: 10, rounds: 5}   # optional: the clients scenario (lorabench/harness/clients.py options);
partitions: [iid, dirichlet:0.3]      # with federated: one trial per method x partition x seed, labelled
                                      # METHOD@PARTITION; every method must be of the federated family; a task
                                      # may list its own (`{name: movie-domains, partitions: [domain]}`), which
                                      # replace the suite's for it; a partitions= override selects from a task's
                                      # own list, and replaces the suite's list for the tasks it fits
cross_task: {k_shots: 5}     # optional: the cross-task scenario's leave-one-task-out protocol
                             # (lorabench/harness/cross_task.py options); each task is held out in turn, one
                             # trial per method x held-out task x seed; every method must be of the cross-task family
continual: {validate: true}           # optional: the sequence scenario (lorabench/harness/sequence.py options);
orders:                               # with continual: named task orders (names from tasks:), one trial per
  order-1: [rt-mc, sarcasm-mc, crepe] # method x order x seed, labelled METHOD@ORDER, train.steps steps per
                                      # task; every method must be of the continual family
mixture: {knowledge_tasks: []}        # optional: the cross-task protocol (b) (lorabench/harness/mixture.py options);
splits:                               # with mixture: named splits of the pool (names from tasks:), one trial per
  split-a: {train: [quartz, rt-mc], held_out: [tomi]}  # method x split x seed, labelled METHOD@SPLIT; every method
                                      # is a mixture of LoRA experts (cross-task family), lora or lora-ensemble
reuse: {library_steps: 100}           # optional: the cross-task reuse protocol (lorabench/harness/reuse.py options):
                                      # one trial per method x seed over every task of tasks: (the pool), labelled
                                      # METHOD@reuse; every method has a reuse rule (peru-lora)
```

Every error names the file and line and what is valid. YAML is read with safe_load semantics:
no code is ever executed from a suite file.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lorabench.config import from_dict, merge, unknown_key_message
from lorabench.errors import UserError

if TYPE_CHECKING:  # imported where used: both import torch, and a wrong suite name or a malformed
    # file must get its error at once (issue 22), not after seconds of imports
    from lorabench.harness.trial import TrialSpec

SUITES_DIR = Path(__file__).resolve().parent.parent.parent / "suites"
TOP_KEYS = {"suite", "version", "description", "seeds", "model", "train", "tasks", "methods", "jobs", "lr_grid",
            "tune_seeds", "tune_task", "federated", "partitions", "cross_task", "continual", "orders", "mixture",
            "splits", "reuse"}
TASK_KEYS = {"name", "model", "options", "train", "lm_eval", "jobs", "lr_grid", "seeds", "partitions"}
METHOD_KEYS = {"name", "label", "options", "train", "lr_grid"}


def _to_python(node, path: tuple, lines: dict):
    """Build Python objects from a YAML node tree, remembering each path's line (1-based)."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = {}
        for k, v in node.value:
            key = _to_python(k, path + ("<key>",), {})
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise UserError(f"line {k.start_mark.line + 1}: mapping keys must be plain names, got {key!r}")
            if key in out:
                raise UserError(f"line {k.start_mark.line + 1}: duplicate key {key!r}")
            out[key] = _to_python(v, path + (key,), lines)
            lines[path + (key,)] = k.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, path + (i,), lines) for i, v in enumerate(node.value)]
    return _scalar(node)


def _scalar(node):
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


@dataclass
class MethodEntry:
    name: str
    label: str
    options: dict
    train: dict
    lr_grid: list[float] | None = None  # factors of the trial's learning rate (None = the task's or suite's)


@dataclass
class TaskEntry:
    name: str
    model: str | None
    options: dict
    train: dict
    lm_eval: bool = False  # decoder tasks only: also score through lm-eval (lorabench.lmeval)
    jobs: int | None = None  # trials of this task run at once (None = the suite's jobs); not part of trial ids
    lr_grid: list[float] | None = None  # factors of the trial's learning rate (None = the suite's)
    seeds: list[int] | None = None  # a subset of the suite's seeds for this task (None = all of them)
    partitions: list[str] | None = None  # with federated: this task's partitions (None = the suite's); not part
    # of trial ids (each trial's partition is, in its federated options)


@dataclass
class Suite:
    name: str
    version: int
    description: str
    seeds: list[int]
    model: str | None
    train: dict
    tasks: list[TaskEntry]
    methods: list[MethodEntry]
    path: str
    jobs: int = 1  # trials run at once (not part of a trial's identity)
    lr_grid: list[float] | None = None  # factors of each trial's learning rate (None = one rate)
    tune_seeds: list[int] | None = None  # with lr_grid: the seeds that run the grid (None = every seed)
    tune_task: TaskEntry | None = None  # with lr_grid: the one task that runs the grid (None = every task);
    # its entry is kept even when a tasks= override leaves it out, so its choice can still be read
    federated: dict | None = None  # the clients scenario's options (None: single-task trials)
    partitions: list[str] | None = None  # with federated: the partitions each method runs on
    cross_task: dict | None = None  # the cross-task scenario's options (None: single-task trials)
    continual: dict | None = None  # the sequence scenario's options (None: no sequences)
    orders: dict[str, list[str]] | None = None  # with continual: order name -> task names, in training order
    mixture: dict | None = None  # protocol (b)'s options (None: no multi-task mixture training)
    splits: dict[str, dict] | None = None  # with mixture: split name -> {train: [...], held_out: [...]}
    reuse: dict | None = None  # the reuse protocol's options (None: no reuse trials)

    def jobs_for(self, spec: TrialSpec) -> int:
        """Trials run at once while this trial's task runs (the task's `jobs`, else the suite's)."""
        for task in self.tasks:
            if task.name == spec.task and task.jobs is not None:
                return task.jobs
        return self.jobs

    def trials(self, records: list[dict] | None = None) -> list[TrialSpec]:
        """Every trial of the suite. With `tune_seeds`, the other seeds' trials of a grid method exist only
        once the tuning trials are in `records` (their rate is chosen from them); without records they are
        left out (`pending` lists them)."""
        return self._expand(records)[0]

    def size(self) -> int:
        """Trials the whole suite runs, those waiting for a tuned learning rate included."""
        trials, waiting = self._expand(None)
        return len(trials) + sum(len(seeds) for _, _, seeds in waiting)

    def pending(self, records: list[dict] | None = None) -> list[tuple[str, str, list[int]]]:
        """(task, label, seeds) waiting for their learning rate: the tuning trials are not all recorded."""
        return self._expand(records)[1]

    def _expand(self, records: list[dict] | None) -> tuple[list[TrialSpec], list[tuple[str, str, list[int]]]]:
        from lorabench.harness.trial import TrialSpec
        out, waiting = [], []
        by_id = {r.get("trial_id"): r for r in records or [] if r.get("status") == "ok"}
        if self.continual is not None:  # the sequence scenario: method x order x seed
            return self._sequences(), []
        if self.mixture is not None:  # the cross-task protocol (b): method x split x seed
            return self._splits(), []
        if self.reuse is not None:  # the cross-task reuse protocol: method x seed over the pool
            return self._reuse_trials(), []
        for task in self.tasks:
            seeds = [s for s in self.seeds if task.seeds is None or s in task.seeds]
            for method in self.methods:
                train = merge(merge(self.train, task.train), method.train)
                grid = method.lr_grid or task.lr_grid or self.lr_grid

                def spec(seed: int, t: dict) -> TrialSpec:
                    return self._spec(task, method, seed, t)

                if self.cross_task is not None:  # the cross-task scenario: method x held-out task x seed
                    for seed in seeds:
                        sp = spec(seed, train)
                        sp.cross_task = dict(self.cross_task)
                        out.append(sp)
                    continue
                if self.federated is not None:  # the clients scenario: method x partition x seed
                    for part in task.partitions or self.partitions or ["iid"]:
                        for seed in seeds:
                            sp = spec(seed, train)
                            sp.label = f"{method.label}@{part}"
                            sp.federated = {**self.federated, "partition": part}
                            out.append(sp)
                    continue
                if not grid:
                    out += [spec(seed, train) for seed in seeds]
                    continue
                # one trial per rate; the label stays, the rate is chosen on validation
                base = method_scale(method, train)
                rates = [float(f"{base * f:.6g}") for f in grid]
                if len(rates) == 1:  # one rate: nothing to tune, every seed runs it
                    out += [spec(seed, merge(train, {"lr": rates[0]})) for seed in seeds]
                    continue
                if self.tune_task is not None and task.name != self.tune_task.name:
                    # the grid runs on the tuning task only: every seed here runs at the factor chosen there
                    factor = self._tuned_factor(method, by_id)
                    if factor is None:
                        waiting.append((task.name, method.label, seeds))
                    else:
                        out += [spec(seed, merge(train, {"lr": float(f"{base * factor:.6g}")})) for seed in seeds]
                    continue
                tuning = {lr: [spec(seed, merge(train, {"lr": lr})) for seed in self._tune_seeds(task)] for lr in rates}
                out += [sp for lr in rates for sp in tuning[lr]]  # needed by the other seeds, whatever seeds= selects
                rest = [seed for seed in seeds if seed not in self._tune_seeds(task)]
                if not rest:
                    continue
                chosen = chosen_rate(task.name, tuning, by_id)
                if chosen is None:
                    waiting.append((task.name, method.label, rest))
                    continue
                out += [spec(seed, merge(train, {"lr": chosen})) for seed in rest]
        return out, waiting

    def _spec(self, task: TaskEntry, method: MethodEntry, seed: int, train: dict) -> TrialSpec:
        """A single-task trial of `method` on `task` at `seed` with the merged `train` options."""
        from lorabench.harness.trial import TrialSpec
        return TrialSpec(suite=self.name, suite_version=self.version, label=method.label, method=method.name,
                         method_options=method.options, task=task.name, task_options=task.options,
                         model=task.model or self.model, seed=seed, train=train, lm_eval=task.lm_eval)

    def grid_rates(self, task: str, label: str) -> list[float] | None:
        """The learning rates of the grid the method labelled `label` runs on `task`, as its trials carry them (the
        rates its tuning trials compare); None where it runs no grid there: no lr_grid or a one-rate grid, a scenario
        suite, a task that takes its rate from the tune_task's grid, or a task or label the suite does not have."""
        if any(x is not None for x in (self.cross_task, self.federated, self.continual, self.mixture)):
            return None
        t = next((x for x in self.tasks if x.name == task), None)
        m = next((x for x in self.methods if x.label == label), None)
        if t is None or m is None or (self.tune_task is not None and task != self.tune_task.name):
            return None
        grid = m.lr_grid or t.lr_grid or self.lr_grid
        if not grid or len(grid) < 2:
            return None
        base = method_scale(m, merge(merge(self.train, t.train), m.train))
        return [float(f"{base * f:.6g}") for f in grid]

    def _tune_seeds(self, task: TaskEntry) -> list[int]:
        tune = self.tune_seeds if self.tune_seeds is not None else self.seeds
        return [seed for seed in tune if task.seeds is None or seed in task.seeds]

    def _tuned_factor(self, method: MethodEntry, by_id: dict) -> float | None:
        """The factor of the grid that the tuning task's trials chose for `method` (None until they are all
        recorded with validation scores)."""
        task = self.tune_task
        train = merge(merge(self.train, task.train), method.train)
        grid = method.lr_grid or task.lr_grid or self.lr_grid
        base = method_scale(method, train)
        by_rate = {float(f"{base * f:.6g}"): f for f in grid}
        tuning = {lr: [self._spec(task, method, seed, merge(train, {"lr": lr})) for seed in self._tune_seeds(task)]
                  for lr in by_rate}
        chosen = chosen_rate(task.name, tuning, by_id)
        return None if chosen is None else by_rate[chosen]


    def _sequences(self) -> list[TrialSpec]:
        from lorabench.harness.trial import TrialSpec
        entries = {t.name: t for t in self.tasks}
        out = []
        for method in self.methods:
            for order, names in (self.orders or {}).items():
                first = entries[names[0]]
                train = merge(merge(self.train, first.train), method.train)
                tasks = [{"name": n, "options": dict(entries[n].options)} for n in names]
                for seed in self.seeds:
                    out.append(TrialSpec(suite=self.name, suite_version=self.version, label=f"{method.label}@{order}",
                                         method=method.name, method_options=method.options, task=first.name,
                                         task_options=first.options, model=first.model or self.model, seed=seed,
                                         train=train, continual={"order": order, "tasks": tasks,
                                                                 "config": dict(self.continual)}))
        return out


    def _splits(self) -> list[TrialSpec]:
        from lorabench.harness.trial import TrialSpec
        entries = {t.name: t for t in self.tasks}
        out = []
        for method in self.methods:
            for name, sp in (self.splits or {}).items():
                first = entries[sp["train"][0]]
                train = merge(merge(self.train, first.train), method.train)
                block = {"split": name, "config": dict(self.mixture),
                         "train": [{"name": n, "options": dict(entries[n].options)} for n in sp["train"]],
                         "held_out": [{"name": n, "options": dict(entries[n].options)} for n in sp["held_out"]]}
                for seed in self.seeds:
                    out.append(TrialSpec(suite=self.name, suite_version=self.version, label=f"{method.label}@{name}",
                                         method=method.name, method_options=method.options, task=first.name,
                                         task_options=first.options, model=first.model or self.model, seed=seed,
                                         train=train, mixture=copy.deepcopy(block)))
        return out


    def _reuse_trials(self) -> list[TrialSpec]:
        from lorabench.harness.trial import TrialSpec
        first = self.tasks[0]
        tasks = [{"name": t.name, "options": dict(t.options)} for t in self.tasks]
        return [TrialSpec(suite=self.name, suite_version=self.version, label=f"{method.label}@reuse", method=method.name,
                          method_options=method.options, task=first.name, task_options=first.options,
                          model=first.model or self.model, seed=seed,
                          train=merge(merge(self.train, first.train), method.train),
                          reuse={"config": dict(self.reuse), "tasks": copy.deepcopy(tasks)})
                for method in self.methods for seed in self.seeds]


def method_scale(method: MethodEntry, train: dict) -> float:
    """The rate a method's grid multiplies: its train.lr (suite, task, method merged), else its default_lr."""
    if train.get("lr") is not None:
        return train["lr"]
    from lorabench.methods import get_method
    return get_method(method.name).default_lr


def chosen_rate(task: str, tuning: dict, by_id: dict) -> float | None:
    """The rate the recorded tuning trials (rate -> specs) choose on validation; None until all are recorded."""
    from lorabench.runner.tuning import choose_rate
    from lorabench.tasks import get_task
    scores = {lr: [by_id[trial_id(sp)].get("val_score") if trial_id(sp) in by_id else None for sp in specs]
              for lr, specs in tuning.items()}
    if not all(v is not None for vals in scores.values() for v in vals):
        return None
    return choose_rate(scores, get_task(task).metric.higher_is_better)


def trial_id(spec: TrialSpec) -> str:
    d = asdict(spec)
    if not d["lm_eval"]:
        del d["lm_eval"]  # trials without lm-eval keep the ids they had before the option existed
    if d["federated"] is None:
        del d["federated"]  # single-task trials keep the ids they had before the clients scenario
    if d.get("cross_task") is None:
        d.pop("cross_task", None)  # nor the cross-task scenario
    if d["continual"] is None:
        del d["continual"]  # ... and before the sequence scenario
    if d.get("mixture") is None:
        d.pop("mixture", None)  # ... and before protocol (b)
    if d.get("reuse") is None:
        d.pop("reuse", None)  # ... and before the reuse protocol
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_suite(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise UserError(f"suite file {p} does not exist")
        return p
    cand = SUITES_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        import difflib
        names = sorted(x.stem for x in SUITES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name_or_path, names, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(f"Unknown suite {name_or_path!r}.{hint} Valid suites: {', '.join(names)} "
                        f"(or a path to a .yaml file).")
    return cand


def list_suites() -> list[Path]:
    return sorted(SUITES_DIR.glob("*.yaml"))


def load_suite(name_or_path: str, overrides: list[str] | None = None) -> Suite:
    path = find_suite(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: malformed YAML: {getattr(e, 'problem', None) or e}") from None
    lines: dict = {}
    try:
        data = _to_python(node, (), lines) if node is not None else None
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    full = data
    data = apply_overrides(data, overrides or [], path)
    left_out = any(o.partition("=")[0].strip() == "tasks" for o in overrides or [])
    suite = validate(data, path, lines, tune_task_may_be_left_out=left_out)
    if left_out and suite.tune_task is None and isinstance(data, dict) and data.get("tune_task") is not None:
        # tasks= left the tuning task out: the other tasks' rates still come from its recorded grid, so its
        # entry is read from the suite with every other override applied
        rest = [o for o in overrides if o.partition("=")[0].strip() != "tasks"]
        suite.tune_task = validate(apply_overrides(full, rest, path), path, lines).tune_task
    return suite


def _where(path: Path, lines: dict, key: tuple) -> str:
    while key and key not in lines:
        key = key[:-1]
    return f"{path}:{lines[key]}" if key in lines else str(path)


def _check_keys(obj: dict, allowed: set, path: Path, lines: dict, key: tuple, what: str) -> None:
    for k in obj:
        if k not in allowed:
            raise UserError(unknown_key_message(str(k), sorted(allowed), f"{_where(path, lines, key + (k,))}: {what}"))


def validate(data: Any, path: Path, lines: dict, tune_task_may_be_left_out: bool = False) -> Suite:
    from lorabench.harness.train import TrainConfig
    from lorabench.methods import METHODS
    from lorabench.tasks import TASKS

    if not isinstance(data, dict):
        raise UserError(f"{path}: a suite file is a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    _check_keys(data, TOP_KEYS, path, lines, (), "suite")
    for req in ("suite", "version", "tasks", "methods"):
        if req not in data:
            raise UserError(f"{path}: missing required key {req!r}")
    if data["suite"] != path.stem:
        # The name is part of every trial id and names the default records file (runs/NAME/): a copied
        # suite that kept its original's name would write into, and resume from, the original's records.
        raise UserError(f"{_where(path, lines, ('suite',))}: suite name {data['suite']!r} must equal the file name "
                        f"{path.stem!r}: the name goes into every trial id and the default records file "
                        f"runs/{data['suite']}/records.jsonl, so a copy keeping it would mix its records with "
                        f"the original's. Write `suite: {path.stem}` (or rename the file to {data['suite']}.yaml)")
    if not isinstance(data["version"], int) or isinstance(data["version"], bool):
        raise UserError(f"{_where(path, lines, ('version',))}: version must be an integer, got {data['version']!r}")
    seeds = data.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"{_where(path, lines, ('seeds',))}: seeds must be a non-empty list of integers, got {seeds!r}")
    def check_jobs(value, key: tuple):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UserError(f"{_where(path, lines, key)}: jobs (trials run at once) must be an integer >= 1, got {value!r}")
        return value

    jobs = check_jobs(data.get("jobs", 1), ("jobs",))

    def check_grid(value, key: tuple):
        if value is None:
            return None
        ok = isinstance(value, list) and value and all(
            isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in value)
        if not ok or len(set(value)) != len(value):
            raise UserError(f"{_where(path, lines, key)}: lr_grid must be a non-empty list of distinct positive "
                            f"factors of the learning rate (e.g. [0.3, 1, 3]), got {value!r}")
        return [float(f) for f in value]

    lr_grid = check_grid(data.get("lr_grid"), ("lr_grid",))
    tune_seeds = data.get("tune_seeds")
    if tune_seeds is not None:
        if not isinstance(tune_seeds, list) or not tune_seeds or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in tune_seeds):
            raise UserError(f"{_where(path, lines, ('tune_seeds',))}: tune_seeds must be a non-empty list of integer "
                            f"seeds (the seeds that run the learning-rate grid), got {tune_seeds!r}")
        if lr_grid is None and not any(isinstance(e, dict) and e.get("lr_grid") for key in ("tasks", "methods")
                                       for e in data.get(key) or []):
            raise UserError(f"{_where(path, lines, ('tune_seeds',))}: tune_seeds needs an lr_grid (the seeds that "
                            f"tune a learning-rate grid); this suite has none")
    base_train = data.get("train") or {}
    from_dict(TrainConfig, base_train, f"{_where(path, lines, ('train',))}: train")

    def entries(key: str, keys: set, registry) -> list[tuple[dict, tuple]]:
        raw = data[key]
        if not isinstance(raw, list) or not raw:
            raise UserError(f"{_where(path, lines, (key,))}: {key} must be a non-empty list")
        out = []
        for i, e in enumerate(raw):
            k = (key, i)
            if isinstance(e, str):
                e = {"name": e}
            if not isinstance(e, dict) or "name" not in e:
                raise UserError(f"{_where(path, lines, k)}: each of {key} is a name or a mapping with 'name', got {e!r}")
            _check_keys(e, keys, path, lines, k, key[:-1])
            if e["name"] not in registry:
                raise UserError(f"{_where(path, lines, k + ('name',))}: {registry.unknown_message(str(e['name']))}")
            for sub in ("options", "train"):
                if e.get(sub) is not None and not isinstance(e[sub], dict):
                    raise UserError(f"{_where(path, lines, k + (sub,))}: {sub} must be a mapping, got {e[sub]!r}")
            out.append((e, k))
        return out

    tasks = []
    for e, k in entries("tasks", TASK_KEYS, TASKS):
        where = _where(path, lines, k)
        TASKS.get(e["name"]).from_options(e.get("options"), where=f"{where}: task {e['name']} options")
        from_dict(TrainConfig, merge(base_train, e.get("train") or {}), f"{where}: train")
        lm_eval = e.get("lm_eval", False)
        if not isinstance(lm_eval, bool):
            raise UserError(f"{_where(path, lines, k + ('lm_eval',))}: lm_eval must be true or false, got {lm_eval!r}")
        if lm_eval:
            from lorabench.lmeval.export import get_decoder_task
            try:
                get_decoder_task(e["name"])  # an encoder task gets the reason it has no lm-eval export
            except UserError as err:
                raise UserError(f"{where}: lm_eval: {err}") from None
            import importlib.util
            if importlib.util.find_spec("lm_eval") is None:
                raise UserError(f"{where}: lm_eval: true needs lm-evaluation-harness: pip install lm-eval")
        task_seeds = e.get("seeds")
        if task_seeds is not None:
            if isinstance(task_seeds, int) and not isinstance(task_seeds, bool):
                task_seeds = [task_seeds]
            ok = isinstance(task_seeds, list) and task_seeds and all(
                isinstance(s, int) and not isinstance(s, bool) for s in task_seeds)
            if not ok:
                raise UserError(f"{_where(path, lines, k + ('seeds',))}: a task's seeds must be a non-empty list of "
                                f"integer seeds (those of the suite's seeds {seeds} this task runs), got {task_seeds!r}")
            if tune_seeds is not None and not set(tune_seeds) <= set(task_seeds):
                raise UserError(f"{_where(path, lines, k + ('seeds',))}: task {e['name']} must run the tuning seeds "
                                f"{tune_seeds} (tune_seeds), got seeds {task_seeds!r}")
        tasks.append(TaskEntry(e["name"], e.get("model"), dict(e.get("options") or {}), dict(e.get("train") or {}),
                               lm_eval, check_jobs(e.get("jobs"), k + ("jobs",)), check_grid(e.get("lr_grid"), k + ("lr_grid",)),
                               task_seeds, e.get("partitions")))
    methods, labels = [], set()
    for e, k in entries("methods", METHOD_KEYS, METHODS):
        where = _where(path, lines, k)
        label = str(e.get("label") or e["name"])
        if label in labels:
            raise UserError(f"{where}: duplicate method label {label!r}; give each configuration its own 'label'")
        labels.add(label)
        METHODS.get(e["name"]).from_options(e.get("options"), where=f"{where}: method {label} options")
        from_dict(TrainConfig, merge(base_train, e.get("train") or {}), f"{where}: train")
        methods.append(MethodEntry(e["name"], label, dict(e.get("options") or {}), dict(e.get("train") or {}),
                                   check_grid(e.get("lr_grid"), k + ("lr_grid",))))
    federated, parts = _federated(data, path, lines, methods, tasks, lr_grid)
    cross_task = _cross_task(data, path, lines, methods, lr_grid)
    continual, orders = _continual(data, path, lines, methods, tasks, lr_grid)
    mixture, splits = _mixture(data, path, lines, methods, tasks, lr_grid)
    reuse = _reuse(data, path, lines, methods, tasks, lr_grid)
    tune_task = None
    if data.get("tune_task") is not None:
        name, where = data["tune_task"], _where(path, lines, ("tune_task",))
        names = [t.name for t in tasks]
        if not isinstance(name, str):
            raise UserError(f"{where}: tune_task must be the name of one of the suite's tasks ({', '.join(names)}), "
                            f"got {name!r}")
        if lr_grid is None and not any(t.lr_grid for t in tasks) and not any(m.lr_grid for m in methods):
            raise UserError(f"{where}: tune_task needs an lr_grid (the task that tunes a learning-rate grid); "
                            f"this suite has none")
        if any(x is not None for x in (federated, cross_task, continual, mixture, reuse)):
            raise UserError(f"{where}: tune_task is for single-task trials; this suite runs a scenario")
        if name in names:
            tune_task = tasks[names.index(name)]
        elif not tune_task_may_be_left_out:
            raise UserError(f"{where}: tune_task {name!r} is not one of the suite's tasks; valid: {', '.join(names)}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise UserError(f"{_where(path, lines, ('model',))}: model must be an asset name or path, got {model!r}")
    return Suite(name=data["suite"], version=data["version"], description=str(data.get("description", "")),
                 seeds=seeds, model=model, train=dict(base_train), tasks=tasks, methods=methods, path=str(path),
                 jobs=jobs, lr_grid=lr_grid, tune_seeds=tune_seeds, tune_task=tune_task, federated=federated,
                 partitions=parts, cross_task=cross_task, continual=continual, orders=orders, mixture=mixture,
                 splits=splits, reuse=reuse)


def _scenario_options(data: dict, path: Path, lines: dict, key: str, what: str, module: str, config_cls,
                      exclusive: tuple[str, ...] = ()) -> dict:
    """A scenario's options mapping `data[key]` (not None), checked: a mapping, not combined with another
    scenario's key (`exclusive`), and valid for `config_cls`."""
    value = data[key]
    where = _where(path, lines, (key,))
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be a mapping of {what} options ({module}), got {value!r}")
    other = [k for k in exclusive if data.get(k) is not None]
    if other:
        raise UserError(f"{where}: a suite runs one scenario: `{key}:` and `{other[0]}:` cannot be combined")
    from_dict(config_cls, value, f"{where}: {key}")
    return dict(value)


def _no_lr_grid(data: dict, path: Path, lines: dict, lr_grid, key: str, instead: str) -> None:
    if lr_grid is not None or data.get("tune_seeds") is not None:
        raise UserError(f"{_where(path, lines, ('lr_grid',))}: lr_grid/tune_seeds are not supported with {key}: "
                        f"{instead}")


def _family_methods(path: Path, lines: dict, methods: list[MethodEntry], valid: list[str], what: str) -> None:
    """Every method of a scenario suite is one of `valid`; `what` says what the others are not and which
    protocol the suite runs ("is not a federated method; a suite with `federated:` runs the clients scenario")."""
    for i, m in enumerate(methods):
        if m.name not in valid:
            raise UserError(f"{_where(path, lines, ('methods', i))}: method {m.name!r} {what}, whose methods are: "
                            f"{', '.join(valid)}")


def _family(name: str) -> list[str]:
    from lorabench.methods import METHODS
    return [n for n in METHODS.names() if METHODS.meta(n)["family"] == name]


def _pool_tasks(path: Path, lines: dict, tasks: list[TaskEntry], key: str, scenario: str,
                multiple_choice: bool = True) -> list[str]:
    """The task names of a scenario that trains one model on tasks sharing one output space: each listed
    once, every one multiple-choice (the cross-task pool) unless `multiple_choice` is False."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        per = {"continual": "order", "mixture": "split", "reuse": "trial"}[key]
        raise UserError(f"{_where(path, lines, ('tasks',))}: with {key}:, each task is listed once (its options are "
                        f"the same in every {per})")
    from lorabench.tasks import get_task
    for i, t in enumerate(tasks if multiple_choice else []):
        kind = get_task(t.name).kind
        if kind != "multiple-choice":
            raise UserError(f"{_where(path, lines, ('tasks', i))}: task {t.name} is a {kind} task; {scenario} trains "
                            f"one model on tasks sharing one output space: multiple-choice tasks (the cross-task "
                            f"pool, lorabench/harness/task_pool.py)")
    return names


def _task_list(where: str, what: str, seq, names: list[str], at_least_one: bool = True) -> list[str]:
    """A list of this suite's task names (an order, or one side of a split), each named once."""
    if not isinstance(seq, list) or not all(isinstance(x, str) for x in seq) or (at_least_one and not seq):
        raise UserError(f"{where}: {what} must be a {'non-empty ' if at_least_one else ''}list of task names, "
                        f"got {seq!r}")
    bad = [x for x in seq if x not in names]
    if bad:
        raise UserError(f"{where}: {what} names {', '.join(bad)}, not in this suite's tasks: {', '.join(names)}")
    if len(set(seq)) != len(seq):
        raise UserError(f"{where}: {what} lists a task twice: {seq}")
    return list(seq)


def _federated(data: dict, path: Path, lines: dict, methods: list[MethodEntry], tasks: list[TaskEntry],
               lr_grid) -> tuple[dict | None, list | None]:
    """The clients scenario's keys: `federated` options (checked against FederatedConfig), `partitions` (the
    suite's, and each task's own); every partition must fit its task (`partitions.fits`)."""
    fed, parts = data.get("federated"), data.get("partitions")
    if fed is None:
        own = [i for i, t in enumerate(tasks) if t.partitions is not None]
        if parts is not None or own:
            key = ('partitions',) if parts is not None else ('tasks', own[0], 'partitions')
            raise UserError(f"{_where(path, lines, key)}: partitions needs a `federated:` mapping (the "
                            f"clients scenario's options, e.g. {{clients: 10, rounds: 5}})")
        return None, None
    from lorabench.harness.clients import FederatedConfig, check_machine
    if isinstance(fed, dict) and "partition" in fed:
        raise UserError(f"{_where(path, lines, ('federated', 'partition'))}: list partitions under the top-level "
                        f"`partitions:` key (one trial per partition), not in federated:")
    fed = _scenario_options(data, path, lines, "federated", "the clients scenario's",
                            "lorabench/harness/clients.py", FederatedConfig)
    try:
        check_machine(from_dict(FederatedConfig, fed, "federated"))  # actors and memory, before any trial starts
    except UserError as e:
        raise UserError(f"{_where(path, lines, ('federated',))}: {e}") from None
    from lorabench.harness.partitions import fits, parse
    from lorabench.tasks import TASKS

    def check(value, key: tuple) -> list[str]:
        if not isinstance(value, list) or not value or len(set(map(str, value))) != len(value):
            raise UserError(f"{_where(path, lines, key)}: partitions must be a non-empty list of distinct "
                            f"partitions ('iid', 'dirichlet:ALPHA', 'domain', 'role'), got {value!r}")
        for i, p in enumerate(value):
            try:
                parse(str(p))
            except UserError as e:
                raise UserError(f"{_where(path, lines, key + (i,))}: {e}") from None
        return [str(p) for p in value]

    parts = check(parts if parts is not None else ["iid"], ("partitions",))
    for i, t in enumerate(tasks):
        key = ("tasks", i, "partitions") if t.partitions is not None else ("partitions",)
        if t.partitions is not None:
            t.partitions = check(t.partitions, key)
        for j, p in enumerate(t.partitions or parts):
            why = fits(p, TASKS.get(t.name))
            if why:
                raise UserError(f"{_where(path, lines, key + (j,))}: task {t.name}: {why}"
                                + ("" if t.partitions is not None else
                                   f"; or give the task its own list: {{name: {t.name}, partitions: [...]}}"))
    _family_methods(path, lines, methods, _family("federated"),
                    "is not a federated method; a suite with `federated:` runs the clients scenario")
    _no_lr_grid(data, path, lines, lr_grid, "federated", "set train.lr per method")
    return fed, parts


def _cross_task(data: dict, path: Path, lines: dict, methods: list[MethodEntry], lr_grid) -> dict | None:
    """The cross-task scenario's `cross_task` options (checked against CrossTaskConfig)."""
    if data.get("cross_task") is None:
        return None
    from lorabench.harness.cross_task import CrossTaskConfig
    ct = _scenario_options(data, path, lines, "cross_task", "the cross-task scenario's",
                           "lorabench/harness/cross_task.py", CrossTaskConfig, exclusive=("federated",))
    _family_methods(path, lines, methods, _family("cross-task"),
                    "is not a cross-task method; a suite with `cross_task:` runs the leave-one-task-out protocol")
    _no_lr_grid(data, path, lines, lr_grid, "cross_task", "nothing is trained per trial")
    return ct


def _continual(data: dict, path: Path, lines: dict, methods: list[MethodEntry], tasks: list[TaskEntry],
               lr_grid) -> tuple[dict | None, dict | None]:
    """The sequence scenario's keys: `continual` options (checked against ContinualConfig), `orders`."""
    orders = data.get("orders")
    if data.get("continual") is None:
        if orders is not None:
            raise UserError(f"{_where(path, lines, ('orders',))}: orders needs a `continual:` mapping (the sequence "
                            f"scenario's options; `continual: {{}}` for the defaults)")
        return None, None
    from lorabench.harness.sequence import ContinualConfig
    cont = _scenario_options(data, path, lines, "continual", "the sequence scenario's",
                             "lorabench/harness/sequence.py", ContinualConfig, exclusive=("federated", "cross_task"))
    names = [t.name for t in tasks]
    if not isinstance(orders, dict) or not orders:
        raise UserError(f"{_where(path, lines, ('orders',) if orders is not None else ('continual',))}: a continual "
                        f"suite needs `orders:`, a mapping of order names to lists of task names from tasks: "
                        f"({', '.join(names)}), e.g. {{order-1: [{', '.join(names[:3])}]}}")
    forget = cont.get("forget")
    names = _pool_tasks(path, lines, tasks, "continual", "the sequence scenario", multiple_choice=not forget)
    out = {str(name): _task_list(_where(path, lines, ('orders', name)), f"order {name!r}", seq, names)
           for name, seq in orders.items()}
    if forget:  # continual forgetting (GS-LoRA's protocol): each order is one classification task
        from lorabench.harness.forgetting import check_forget
        from lorabench.tasks import get_task
        for i, t in enumerate(tasks):
            cls = get_task(t.name)
            if cls.head != "seq-cls":
                raise UserError(f"{_where(path, lines, ('tasks', i))}: task {t.name} is a {cls.kind} task; continual "
                                f"forgetting (continual.forget) forgets classes of a classification task")
            check_forget(forget, cls.num_labels, f"{_where(path, lines, ('continual', 'forget'))}: task {t.name}")
        long = [n for n, seq in out.items() if len(seq) != 1]
        if long:
            raise UserError(f"{_where(path, lines, ('orders', long[0]))}: with continual.forget each order is one "
                            f"classification task (its classes are forgotten task after task), got {out[long[0]]}")
    _family_methods(path, lines, methods, _family("continual"),
                    "is not a continual method; a suite with `continual:` runs the sequence scenario")
    from lorabench.methods import METHODS
    forgetting = [n for n in _family("continual") if hasattr(METHODS.get(n), "begin_forgetting")]
    for i, m in enumerate(methods):
        if bool(forget) != (m.name in forgetting):
            raise UserError(f"{_where(path, lines, ('methods', i))}: method {m.name!r} "
                            + ("runs continual forgetting: set continual.forget (the classes each task forgets) on "
                               "a classification task" if m.name in forgetting else
                               "has no continual-forgetting protocol; with continual.forget the methods are: "
                               + ", ".join(forgetting)))
    _no_lr_grid(data, path, lines, lr_grid, "continual",
                "set train.lr per method, and sweep a penalty weight with one label per value")
    return cont, out


def _mixture(data: dict, path: Path, lines: dict, methods: list[MethodEntry], tasks: list[TaskEntry],
             lr_grid) -> tuple[dict | None, dict | None]:
    """The cross-task protocol (b)'s keys: `mixture` options (checked against MixtureProtocolConfig), `splits`."""
    splits = data.get("splits")
    if data.get("mixture") is None:
        if splits is not None:
            raise UserError(f"{_where(path, lines, ('splits',))}: splits needs a `mixture:` mapping (protocol (b)'s "
                            f"options; `mixture: {{}}` for the defaults)")
        return None, None
    from lorabench.harness.mixture import MixtureProtocolConfig
    mix = _scenario_options(data, path, lines, "mixture", "protocol (b)'s", "lorabench/harness/mixture.py",
                            MixtureProtocolConfig, exclusive=("federated", "cross_task", "continual"))
    names = _pool_tasks(path, lines, tasks, "mixture", "protocol (b)")
    if not isinstance(splits, dict) or not splits:
        raise UserError(f"{_where(path, lines, ('splits',) if splits is not None else ('mixture',))}: a mixture suite "
                        f"needs `splits:`, a mapping of split names to {{train: [...], held_out: [...]}} with task "
                        f"names from tasks: ({', '.join(names)})")
    out = {}
    for name, sp in splits.items():
        where = _where(path, lines, ('splits', name))
        if not isinstance(sp, dict) or set(sp) != {"train", "held_out"}:
            raise UserError(f"{where}: split {name!r} must be a mapping with exactly the keys train and held_out "
                            f"(lists of task names), got {sp!r}")
        tr = _task_list(where, f"train of split {name!r}", sp["train"], names)
        ho = _task_list(where, f"held_out of split {name!r}", sp["held_out"], names, at_least_one=False)
        both = sorted(set(tr) & set(ho))
        if both:
            raise UserError(f"{where}: split {name!r} lists a task twice (in train and held_out: {both})")
        bad = [t for t in mix.get("knowledge_tasks") or [] if t not in tr]
        if bad:
            raise UserError(f"{_where(path, lines, ('mixture', 'knowledge_tasks'))}: knowledge_tasks {bad} are not "
                            f"training tasks of split {name!r}: {tr}")
        out[str(name)] = {"train": tr, "held_out": ho}
    from lorabench.methods import METHODS
    from lorabench.methods.cross_task.mixture import MixtureMethod
    valid = ["lora", "lora-ensemble"] + [n for n in _family("cross-task")
                                         if issubclass(METHODS.get(n), MixtureMethod)]
    _family_methods(path, lines, methods, valid, "is neither a mixture of LoRA experts nor lora nor lora-ensemble; "
                    "a suite with `mixture:` runs the cross-task protocol (b)")
    _no_lr_grid(data, path, lines, lr_grid, "mixture", "set train.lr per method")
    return mix, out


def _reuse(data: dict, path: Path, lines: dict, methods: list[MethodEntry], tasks: list[TaskEntry],
           lr_grid) -> dict | None:
    """The cross-task reuse protocol's `reuse` options (checked against ReuseConfig): the suite's tasks are the pool,
    multiple-choice, each once; every method has a reuse rule (peru-lora)."""
    if data.get("reuse") is None:
        return None
    from lorabench.harness.reuse import ReuseConfig
    reuse = _scenario_options(data, path, lines, "reuse", "the reuse protocol's", "lorabench/harness/reuse.py",
                              ReuseConfig, exclusive=("federated", "cross_task", "continual", "mixture"))
    _pool_tasks(path, lines, tasks, "reuse", "the reuse protocol")
    from lorabench.methods import METHODS
    valid = [n for n in _family("cross-task") if hasattr(METHODS.get(n), "reuse")]
    _family_methods(path, lines, methods, valid, "has no reuse rule; a suite with `reuse:` runs the cross-task reuse "
                    "protocol")
    _no_lr_grid(data, path, lines, lr_grid, "reuse", "nothing is trained per trial")
    return reuse


OVERRIDE_HELP = ("valid override keys: seeds=0,1,2 | lr_grid=0.3,1,3 (multipliers; a subset runs part of a grid) | model=NAME | tasks=a,b (subset) | methods=a,b (subset, by label) | "
                 "partitions=iid,dirichlet:0.3 | federated.<option>=V (the clients scenario) | "
                 "cross_task.<option>=V (the cross-task scenario) | "
                 "orders=a,b (subset) | continual.<option>=V (the sequence scenario) | "
                 "splits=a,b (subset) | mixture.<option>=V (the cross-task protocol (b)) | "
                 "reuse.<option>=V (the cross-task reuse protocol) | "
                 "train.<option>=V | task.<option>=V (every task) | method.<option>=V (every method that has it) | "
                 "<method label>.<option>=V")


def _parse_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Any, overrides: list[str], path: Path) -> Any:
    """Apply CLI `key=value` overrides to the raw suite data; unknown keys are errors."""
    if not overrides:
        return data
    if not isinstance(data, dict):
        return data  # validate() reports the malformed file
    data = copy.deepcopy(data)

    def norm(entries):
        return [{"name": e} if isinstance(e, str) else e for e in entries or []]

    data["tasks"], data["methods"] = norm(data.get("tasks")), norm(data.get("methods"))
    labels = [str(m.get("label") or m.get("name")) for m in data["methods"] if isinstance(m, dict)]
    for ov in overrides:
        if "=" not in ov:
            raise UserError(f"command line: override {ov!r} is not key=value; {OVERRIDE_HELP}")
        key, _, raw = ov.partition("=")
        key, value = key.strip(), _parse_value(raw.strip())
        if key == "seeds":
            data["seeds"] = [value] if isinstance(value, int) else (
                [_parse_value(v) for v in raw.split(",")] if isinstance(value, str) else value)
        elif key == "lr_grid":
            if data.get("tune_seeds") or data.get("tune_task"):
                which = "tune_seeds" if data.get("tune_seeds") else "tune_task"
                raise UserError(f"command line: lr_grid= cannot be overridden in suite {path.stem}: it has {which}, "
                                "and its other seeds or tasks would then run at a rate chosen from part of the grid")
            data["lr_grid"] = [value] if isinstance(value, (int, float)) else (
                [_parse_value(v) for v in raw.split(",")] if isinstance(value, str) else value)
        elif key == "partitions":
            data["partitions"] = wanted = [v.strip() for v in str(raw).split(",") if v.strip()]
            if any(isinstance(t, dict) and t.get("partitions") is not None for t in data["tasks"]):
                _select_partitions(data, wanted, path)
        elif key.startswith("federated."):
            from lorabench.harness.clients import FederatedConfig
            from_dict(FederatedConfig, {key[10:]: value}, f"command line: {key}={raw.strip()}: federated")
            data["federated"] = merge(data.get("federated") or {}, {key[10:]: value})
        elif key.startswith("cross_task."):
            from lorabench.harness.cross_task import CrossTaskConfig
            from_dict(CrossTaskConfig, {key[11:]: value}, f"command line: {key}={raw.strip()}: cross_task")
            data["cross_task"] = merge(data.get("cross_task") or {}, {key[11:]: value})
        elif key == "orders":
            wanted = [v.strip() for v in str(raw).split(",") if v.strip()]
            have = list(data.get("orders") or {}) if isinstance(data.get("orders"), dict) else []
            bad = [w for w in wanted if w not in have]
            if bad:
                raise UserError(f"command line: override orders=: {', '.join(bad)} not in suite {path.stem}; its "
                                f"orders: {', '.join(have) or 'none (not a continual suite)'}")
            data["orders"] = {k: v for k, v in data["orders"].items() if k in wanted}
        elif key == "splits":
            wanted = [v.strip() for v in str(raw).split(",") if v.strip()]
            have = list(data.get("splits") or {}) if isinstance(data.get("splits"), dict) else []
            bad = [w for w in wanted if w not in have]
            if bad:
                raise UserError(f"command line: override splits=: {', '.join(bad)} not in suite {path.stem}; its "
                                f"splits: {', '.join(have) or 'none (not a mixture suite)'}")
            data["splits"] = {k: v for k, v in data["splits"].items() if k in wanted}
        elif key.startswith("mixture."):
            from lorabench.harness.mixture import MixtureProtocolConfig
            from_dict(MixtureProtocolConfig, {key[8:]: value}, f"command line: {key}={raw.strip()}: mixture")
            data["mixture"] = merge(data.get("mixture") or {}, {key[8:]: value})
        elif key.startswith("reuse."):
            from lorabench.harness.reuse import ReuseConfig
            from_dict(ReuseConfig, {key[6:]: value}, f"command line: {key}={raw.strip()}: reuse")
            data["reuse"] = merge(data.get("reuse") or {}, {key[6:]: value})
        elif key.startswith("continual."):
            from lorabench.harness.sequence import ContinualConfig
            from_dict(ContinualConfig, {key[10:]: value}, f"command line: {key}={raw.strip()}: continual")
            data["continual"] = merge(data.get("continual") or {}, {key[10:]: value})
        elif key == "model":
            data["model"] = str(value)
            for t in data["tasks"]:
                t.pop("model", None)
        elif key in ("tasks", "methods"):
            wanted = [v.strip() for v in str(raw).split(",") if v.strip()]
            have = [str(e.get("name")) for e in data["tasks"]] if key == "tasks" else labels
            bad = [w for w in wanted if w not in have]
            if bad:
                import difflib
                close = sorted({c for b in bad for c in difflib.get_close_matches(b, have, n=2, cutoff=0.6)})
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise UserError(f"command line: override {key}=: {', '.join(bad)} not in suite {path.stem}.{hint} "
                                f"Its {key}: {', '.join(have)}")
            field = "name" if key == "tasks" else None
            data[key] = [e for e in data[key] if (e.get("name") if field else str(e.get("label") or e.get("name"))) in wanted]
        elif key.startswith("train."):
            from lorabench.harness.train import TrainConfig
            # Checked here, alone, so that a typo is blamed on the command line, not on the suite file's
            # line that the merged value would later be validated at.
            from_dict(TrainConfig, {key[6:]: value}, f"command line: {key}={raw.strip()}: train")
            data["train"] = merge(data.get("train") or {}, {key[6:]: value})
        elif key.startswith("task."):
            from lorabench.tasks import TASKS
            for t in data["tasks"]:
                if str(t.get("name")) in TASKS:  # an unknown task name is the file's error, reported by validate()
                    TASKS.get(t["name"]).from_options({key[5:]: value}, where=f"command line: {key}={raw.strip()}: task")
                t["options"] = merge(t.get("options") or {}, {key[5:]: value})
        elif key.startswith("method."):
            _override_methods(data["methods"], None, key[7:], value, f"{key}={raw.strip()}")
        elif "." in key and key.split(".", 1)[0] in labels:
            label, opt = key.split(".", 1)
            _override_methods(data["methods"], label, opt, value, f"{key}={raw.strip()}")
        else:
            import difflib
            close = difflib.get_close_matches(key, ["seeds", "lr_grid", "model", "tasks", "methods"] +
                                              [f"{lab}." for lab in labels], n=2)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            raise UserError(f"command line: unknown override key {key!r}.{hint} {OVERRIDE_HELP}; method labels here: {', '.join(labels)}")
    return data


def _select_partitions(data: dict, wanted: list[str], path: Path) -> None:
    """`partitions=` on a suite whose tasks list their own: from a task's own list it keeps those named; a task
    without one runs those named that fit it (a natural partition needs its tag); a task left with none is
    left out. A partition that no task runs is an error."""
    from lorabench.harness.partitions import fits, parse
    from lorabench.tasks import TASKS
    for w in wanted:
        try:
            parse(w)
        except UserError as e:
            raise UserError(f"command line: partitions={','.join(wanted)}: {e}") from None
    kept = []
    for t in data["tasks"]:
        name = str(t.get("name"))
        if t.get("partitions") is not None:
            mine = [p for p in wanted if p in map(str, t["partitions"])]
        else:
            mine = [p for p in wanted if name not in TASKS or fits(p, TASKS.get(name)) is None]
        if mine:
            kept.append({**t, "partitions": mine})
    unused = [w for w in wanted if not any(w in t["partitions"] for t in kept)]
    if unused:
        lists = "; ".join(f"{t.get('name')}: {', '.join(map(str, t['partitions']))}" for t in data["tasks"]
                          if t.get("partitions") is not None)
        raise UserError(f"command line: partitions={','.join(wanted)}: no task of suite {path.stem} runs "
                        f"{', '.join(unused)} (tasks with their own partitions: {lists}; the others run the "
                        f"partitions named that fit them)")
    data["tasks"] = kept


def _override_methods(methods: list[dict], label: str | None, opt: str, value, given: str) -> None:
    import dataclasses

    from lorabench.methods import METHODS
    hit = False
    for m in methods:
        if label is not None and str(m.get("label") or m.get("name")) != label:
            continue
        if str(m.get("name")) not in METHODS:
            continue  # an unknown method name is the file's error, reported by validate()
        cls = METHODS.get(m["name"])
        fields = {f.name for f in dataclasses.fields(cls.config_cls)}
        if opt in fields or label is not None:
            # alone, so that a bad key or value is blamed on the command line (see train. above)
            cls.from_options({opt: value}, where=f"command line: {given}: method {m.get('label') or m['name']}")
            m["options"] = merge(m.get("options") or {}, {opt: value})
            hit = True
    if not hit:
        raise UserError(f"command line: override method.{opt}: no method in this suite has an option {opt!r}")
