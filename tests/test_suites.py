"""Suite files: every shipped suite loads and validates; bad suites and overrides get one clear error."""
from pathlib import Path

import pytest

from lorabench.errors import UserError
from lorabench.runner.records import append_record, read_records
from lorabench.runner.suite import list_suites, load_suite, trial_id

SUITES = list_suites()


@pytest.mark.parametrize("path", SUITES, ids=[p.stem for p in SUITES])
def test_every_shipped_suite_validates_and_expands(path):
    suite = load_suite(str(path))
    trials = suite.trials()
    expected = 0
    if suite.orders is not None:  # the sequence scenario: one trial per method x order x seed
        expected = len(suite.methods) * len(suite.orders) * len(suite.seeds)
    if suite.splits is not None:  # the cross-task protocol (b): one trial per method x split x seed
        expected = len(suite.methods) * len(suite.splits) * len(suite.seeds)
    if suite.reuse is not None:  # the cross-task reuse protocol: one trial per method x seed over the pool
        expected = len(suite.methods) * len(suite.seeds)
    for task in suite.tasks if suite.orders is None and suite.splits is None and suite.reuse is None else []:
        for method in suite.methods:
            grid = method.lr_grid or task.lr_grid or suite.lr_grid or [1]
            if suite.tune_task is not None and task.name != suite.tune_task.name and len(grid) > 1:
                continue  # these wait for the tuning task's grid (pending, counted by size())
            tune = suite.tune_seeds if suite.tune_seeds is not None and len(grid) > 1 else suite.seeds
            parts = task.partitions or suite.partitions or [None]  # the clients scenario: x partitions (the task's own
            expected += len(grid) * len(tune) * len(parts)          # list, else the suite's)
    assert len(trials) == expected
    assert suite.size() == len(trials) + sum(len(seeds) for _, _, seeds in suite.pending())
    ids = [trial_id(t) for t in trials]
    assert len(set(ids)) == len(ids), "two trials of one suite share an id"


def test_quick_and_smoke_are_shipped():
    assert {"quick", "smoke"} <= {p.stem for p in SUITES}


def write(tmp_path: Path, text: str, name: str = "mine") -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


GOOD = """suite: mine
version: 1
seeds: [0, 1]
train: {steps: 2}
tasks:
  - rt-sentiment
methods:
  - head
  - {name: lora, label: lora-r4, options: {rank: 4}}
"""


def test_overrides_apply_and_change_trial_ids(tmp_path):
    p = write(tmp_path, GOOD)
    base = load_suite(p)
    s = load_suite(p, ["seeds=3", "train.steps=5", "lora-r4.rank=2", "methods=lora-r4"])
    assert s.seeds == [3] and [m.label for m in s.methods] == ["lora-r4"]
    (t,) = s.trials()
    assert t.train["steps"] == 5 and t.method_options["rank"] == 2
    assert trial_id(t) not in {trial_id(x) for x in base.trials()}


def test_lr_grid_gives_one_trial_per_rate_under_the_same_label(tmp_path):
    text = GOOD.replace("train: {steps: 2}", "train: {steps: 2, lr: 1.0e-3}\nlr_grid: [0.3, 1, 3]")
    text = text.replace("  - head", "  - {name: head, lr_grid: [1]}")
    s = load_suite(write(tmp_path, text))
    lora = [t for t in s.trials() if t.label == "lora-r4"]
    assert sorted({t.train["lr"] for t in lora}) == [3e-4, 1e-3, 3e-3] and len(lora) == 3 * 2
    assert {t.train["lr"] for t in s.trials() if t.label == "head"} == {1e-3}  # the method's grid wins
    assert len({trial_id(t) for t in s.trials()}) == len(s.trials())
    # without train.lr the grid is around the method's own default learning rate
    from lorabench.methods import get_method
    s = load_suite(write(tmp_path, GOOD.replace("train: {steps: 2}", "train: {steps: 2}\nlr_grid: [0.5, 2]")))
    base = get_method("lora").default_lr
    assert sorted({t.train["lr"] for t in s.trials() if t.label == "lora-r4"}) == pytest.approx([base / 2, base * 2])


def test_a_task_runs_its_own_subset_of_the_seeds_and_its_tuning_seed_is_kept(tmp_path):
    text = GOOD.replace("seeds: [0, 1]", "seeds: [0, 1, 2]\nlr_grid: [0.5, 2]\ntune_seeds: [0]")
    text = text.replace("  - rt-sentiment", "  - rt-sentiment\n  - {name: sarcasm, seeds: [0, 1]}")
    s = load_suite(write(tmp_path, text))
    seeds = lambda task: sorted({t.seed for t in s.trials() if t.task == task} |
                                {x for tk, _, ss in s.pending() if tk == task for x in ss})
    assert seeds("rt-sentiment") == [0, 1, 2] and seeds("sarcasm") == [0, 1]
    assert s.size() == 2 * (2 + 2) + 2 * (2 + 1)        # per method: 2 rates on seed 0, then the other seeds
    # a command-line seeds= keeps the task's seeds it lists: sarcasm runs none of seed 2
    s = load_suite(write(tmp_path, text), ["seeds=0,2"])
    assert {t.seed for t in s.trials() if t.task == "sarcasm"} == {0}
    assert [x for tk, _, ss in s.pending() if tk == "sarcasm" for x in ss] == []
    with pytest.raises(UserError, match=r"mine\.yaml:9: task sarcasm must run the tuning seeds \[0\]"):
        load_suite(write(tmp_path, text.replace("seeds: [0, 1]}", "seeds: [1, 2]}")))
    with pytest.raises(UserError, match=r"mine\.yaml:9: a task's seeds must be a non-empty list"):
        load_suite(write(tmp_path, text.replace("seeds: [0, 1]}", "seeds: []}")))


TUNED = """suite: tuned
version: 1
seeds: [0, 1, 2]
lr_grid: [0.5, 2]
tune_seeds: [0]
train: {steps: 3, batch_size: 4, eval_batch_size: 8, lr: 1.0e-2, warmup_steps_for_throughput: 0}
tasks:
  - {name: rt-sentiment, model: tiny-bert, options: {n_train: 32, n_eval: 16, n_val: 16, max_length: 16}}
methods:
  - lora
"""


def test_tune_seeds_run_the_grid_then_the_other_seeds_at_the_rate_validation_chose(tmp_path):
    from tests.conftest import run_cli
    path = write(tmp_path, TUNED, "tuned")
    s = load_suite(path)
    assert [(t.seed, t.train["lr"]) for t in s.trials()] == [(0, 5e-3), (0, 2e-2)]
    assert s.pending() == [("rt-sentiment", "lora", [1, 2])] and s.size() == 4
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", path, "--records", str(records), "--no-progress")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    recs = read_records(records)
    tune = {r["train"]["lr"]: r["val_score"] for r in recs if r["seed"] == 0}
    chosen = max(sorted(tune), key=lambda lr: tune[lr])   # ties: the smaller rate
    assert sorted((r["seed"], r["train"]["lr"]) for r in recs if r["seed"] != 0) == [(1, chosen), (2, chosen)]
    assert "running the other seeds" in proc.stdout
    assert load_suite(path).pending(recs) == [] and len(load_suite(path).trials(recs)) == 4
    # the report makes the same choice from the same records
    from lorabench.report import tables
    sel = tables.build(recs).lr_selection
    assert list(sel[sel["chosen"]]["lr"]) == [chosen]


TUNE_TASK = """suite: tunetask
version: 1
seeds: [0, 1, 2]
lr_grid: [0.5, 2]
tune_seeds: [0]
tune_task: rt-sentiment
train: {steps: 3, batch_size: 4, eval_batch_size: 8, lr: 1.0e-2, warmup_steps_for_throughput: 0}
tasks:
  - {name: rt-sentiment, model: tiny-bert, options: {n_train: 32, n_eval: 16, n_val: 16, max_length: 16}}
  - {name: sarcasm, model: tiny-bert, options: {n_train: 32, n_eval: 16, n_val: 16, max_length: 16}, seeds: [0, 1],
     train: {lr: 2.0e-2}}
methods:
  - lora
  - {name: head, train: {lr: 1.0e-1}}
"""


def test_tune_task_runs_the_grid_on_one_task_and_every_other_task_at_the_factor_chosen_there(tmp_path, monkeypatch,
                                                                                          capsys):
    """The runner's scheduling with tune_task, through `lorabench run` three times (in this process). The trials are
    stand-ins: `run_one` is replaced by a function of the spec whose validation score prefers factor 0.5 for lora and
    2 for head, so that the test takes seconds (it trained 12 real trials through the fork server, ~230 s on a
    loaded core) and the two methods' choices differ; a real trial through the runner with a tuned grid is
    test_tune_seeds_run_the_grid_then_the_other_seeds_at_the_rate_validation_chose's."""
    from lorabench.cli import main
    from lorabench.runner import run as runner
    path = write(tmp_path, TUNE_TASK, "tunetask")
    s = load_suite(path)
    assert s.tune_task.name == "rt-sentiment"
    # only the tuning task's grid on its tuning seed runs first; sarcasm waits for it, all its seeds
    assert sorted((t.task, t.label, t.seed, t.train["lr"]) for t in s.trials()) == [
        ("rt-sentiment", "head", 0, 5e-2), ("rt-sentiment", "head", 0, 2e-1),
        ("rt-sentiment", "lora", 0, 5e-3), ("rt-sentiment", "lora", 0, 2e-2)]
    assert sorted(s.pending()) == [("rt-sentiment", "head", [1, 2]), ("rt-sentiment", "lora", [1, 2]),
                                   ("sarcasm", "head", [0, 1]), ("sarcasm", "lora", [0, 1])]
    assert s.size() == 2 * (2 + 2) + 2 * 2
    from lorabench.cli import suite_size
    import yaml
    assert suite_size(yaml.safe_load(TUNE_TASK)) == s.size()

    scale = {("rt-sentiment", "lora"): 1e-2, ("rt-sentiment", "head"): 1e-1,   # each method's rate there: lora on
             ("sarcasm", "lora"): 2e-2, ("sarcasm", "head"): 1e-1}             # sarcasm its train.lr, head its own
    best = {"lora": 0.5, "head": 2.0}
    ran = []

    def stand_in(spec, timeout_s, progress, jobs=1, threads=None) -> dict:
        ran.append((spec.task, spec.label, spec.seed, spec.train["lr"]))
        factor = spec.train["lr"] / scale[(spec.task, spec.label)]
        return {"status": "ok", "metric": "accuracy", "higher_is_better": True, "score": 0.7,
                "val_score": 0.9 if factor == pytest.approx(best[spec.label]) else 0.6,
                "train": dict(spec.train, lr_used=spec.train["lr"]), "trained_steps": spec.train["steps"]}
    monkeypatch.setattr(runner, "run_one", stand_in)

    def run(*args: str) -> str:
        assert main(["run", path, *args, "--records", str(records), "--no-progress"]) == 0
        return capsys.readouterr().out

    records = tmp_path / "r.jsonl"
    # a part that leaves the tuning task out has nothing to run until the tuning task's grid is recorded
    out = run("tasks=sarcasm")
    assert ran == [] and not records.exists()
    assert "lora on sarcasm: seed(s) 0, 1 wait for a learning rate: its tuning trials on rt-sentiment" in out
    assert "run the grid on the tuning task: tasks=rt-sentiment" in out
    # the tuning task: its grid on seed 0, then its other seeds at each method's chosen rate
    out = run("tasks=rt-sentiment")
    assert sorted(ran[:4]) == sorted((t.task, t.label, t.seed, t.train["lr"]) for t in s.trials())
    assert sorted(ran[4:]) == [("rt-sentiment", "head", 1, pytest.approx(2e-1)),
                               ("rt-sentiment", "head", 2, pytest.approx(2e-1)),
                               ("rt-sentiment", "lora", 1, pytest.approx(5e-3)),
                               ("rt-sentiment", "lora", 2, pytest.approx(5e-3))]
    assert "running the other seeds and the tasks that take the factor chosen on rt-sentiment" in out
    recs = read_records(records)
    assert len(recs) == 8 and all(r["status"] == "ok" for r in recs)
    # the other part: sarcasm's seeds at each method's own scale there times the factor its grid chose on rt-sentiment
    want = sorted((label, seed, pytest.approx(scale[("sarcasm", label)] * best[label]))
                  for label in ("head", "lora") for seed in (0, 1))
    s = load_suite(path, ["tasks=sarcasm"])
    assert s.tune_task.name == "rt-sentiment" and s.pending(recs) == []
    assert sorted((t.label, t.seed, t.train["lr"]) for t in s.trials(recs)) == want
    del ran[:]
    run("tasks=sarcasm")
    assert sorted((label, seed, lr) for task, label, seed, lr in ran) == want and {t for t, *_ in ran} == {"sarcasm"}
    sar = [r for r in read_records(records) if r["task"] == "sarcasm"]
    assert sorted((r["label"], r["seed"], r["train"]["lr"]) for r in sar) == want


@pytest.mark.parametrize("edit,pattern", [
    (lambda t: t.replace("tune_task: rt-sentiment", "tune_task: rt-sentimnet"),
     r"tunetask\.yaml:6: tune_task 'rt-sentimnet' is not one of the suite's tasks; valid: rt-sentiment, sarcasm"),
    (lambda t: t.replace("tune_task: rt-sentiment", "tune_task: [rt-sentiment]"),
     r"tune_task must be the name of one of the suite's tasks"),
    (lambda t: t.replace("lr_grid: [0.5, 2]\n", "").replace("tune_seeds: [0]\n", ""),
     r"tune_task needs an lr_grid"),
])
def test_a_bad_tune_task_gets_one_clear_error(tmp_path, edit, pattern):
    with pytest.raises(UserError, match=pattern):
        load_suite(write(tmp_path, edit(TUNE_TASK), "tunetask"))


def test_an_lr_grid_override_is_refused_where_a_tuning_task_chooses_for_the_others(tmp_path):
    text = TUNE_TASK.replace("tune_seeds: [0]\n", "")
    with pytest.raises(UserError, match="it has tune_task"):
        load_suite(write(tmp_path, text, "tunetask"), ["lr_grid=0.5"])


@pytest.mark.parametrize("text,pattern", [
    (GOOD + "tune_seeds: [0]\n", r"mine\.yaml:10: tune_seeds needs an lr_grid"),
    (GOOD + "lr_grid: [1, 2]\ntune_seeds: 0\n", r"tune_seeds must be a non-empty list of integer seeds"),
    (GOOD + "lr_grid: [1, 1]\n", r"mine\.yaml:10: lr_grid must be a non-empty list of distinct positive factors"),
    (GOOD + "lr_grid: [0, 1]\n", r"lr_grid must be a non-empty list of distinct positive factors"),
    (GOOD.replace("  - head", "  - {name: head, lr_grid: fast}"), r"mine\.yaml:8: lr_grid must be"),
    (GOOD.replace("  - head", "  - haed"), r"mine\.yaml:8: Unknown method 'haed'\. Did you mean: head\?"),
    (GOOD.replace("train: {steps: 2}", "train: {stpes: 2}"), r"mine\.yaml:4: train: unknown key 'stpes'\. Did you mean: steps\?"),
    (GOOD.replace("rank: 4", "rank: four"), r"mine\.yaml:9: method lora-r4 options \(lora\)\.rank: expected an integer, got 'four'"),
    (GOOD.replace("seeds: [0, 1]", "seeds: [0, 1"), r"mine\.yaml:\d+: malformed YAML"),
    (GOOD.replace("suite: mine", "suite: other"), r"must equal the file name"),
    (GOOD + "extra: 1\n", r"mine\.yaml:10: suite: unknown key 'extra'"),
    (GOOD.replace("  - rt-sentiment", "  - rt-sentimnet"), r"Unknown task 'rt-sentimnet'\. Did you mean: rt-sentiment\?"),
    ("- just\n- a list\n", r"a suite file is a mapping"),
])
def test_bad_suite_files(tmp_path, text, pattern):
    with pytest.raises(UserError, match=pattern):
        load_suite(write(tmp_path, text))


@pytest.mark.parametrize("override,pattern", [
    ("trian.steps=3", r"unknown override key 'trian\.steps'"),
    ("train.steps=many", r"train: .*steps: expected an integer, got 'many'|train\.steps: expected an integer"),
    ("method.rnak=3", r"no method in this suite has an option 'rnak'"),
    ("methods=dora", r"dora not in suite mine"),
    ("steps", r"is not key=value"),
])
def test_bad_overrides(tmp_path, override, pattern):
    with pytest.raises(UserError, match=pattern):
        load_suite(write(tmp_path, GOOD), [override])


def test_unknown_suite_name_suggests():
    with pytest.raises(UserError, match=r"Unknown suite 'quik'\. Did you mean: quick\?"):
        load_suite("quik")


def test_records_append_is_line_atomic_and_survives_a_torn_line(tmp_path):
    p = tmp_path / "r.jsonl"
    append_record(p, {"trial_id": "a", "x": 1})
    with open(p, "a") as f:
        f.write('{"trial_id": "torn", "x":')  # a writer killed mid-line
    append_record(p, {"trial_id": "b", "x": 2})
    assert [r["trial_id"] for r in read_records(p, warn=False)] == ["a", "b"]
