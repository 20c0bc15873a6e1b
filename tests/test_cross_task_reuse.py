"""PERU-LoRA (arXiv 2310.01886; lorabench/methods/cross_task/peru_lora.py) and the cross-task reuse protocol
(lorabench/harness/reuse.py, suites/reuse.yaml): the merged model is task arithmetic over the library, each task adds
the best rank-q approximation of its own update; a tiny-llama trial scores every pool task with its own reuse beside
the baselines; the suite's keys are validated; the report's table reads the records."""
from __future__ import annotations

import pytest
import torch

from lorabench.errors import UserError
from lorabench.methods import get_method
from lorabench.methods.cross_task.base import delta_weights
from lorabench.methods.cross_task.merging import exact_delta, merge_error
from tests.test_cross_task import LAYERS, SCALE, library, tiny_library  # noqa: F401 (a fixture)


def test_peru_is_the_merged_model_plus_each_tasks_best_rank_q_update():
    states = library(n=3, rank=3, out=7, inp=6, seed=4)
    method = get_method("peru-lora").from_options({"keep_rank": 2, "merge_lambda": 0.4})
    built = method.reuse(states, SCALE)
    merged = exact_delta(states, [0.4] * 3, SCALE)                   # θ* − θ0 = λ Σ_t s B_t A_t
    assert merge_error(built["merged"], merged) < 1e-6
    for t, s in enumerate(states):
        got = delta_weights(built["per_task"][t])
        own = delta_weights(s, SCALE)
        for p in LAYERS:
            U, S, Vh = torch.linalg.svd(own[p].double(), full_matrices=False)
            low = (U[:, :2] * S[:2]) @ Vh[:2]                          # Eckart-Young: the best rank-2 approximation
            torch.testing.assert_close(got[p].double(), merged[p] + low, atol=1e-5, rtol=1e-5)
            assert float((got[p].double() - merged[p] - own[p].double()).norm()) > 1e-3   # rank 2 < 3: not the whole update
        energy = sum(float((torch.linalg.svdvals(own[p].double())[:2] ** 2).sum() / own[p].double().pow(2).sum())
                     for p in LAYERS) / len(LAYERS)
        assert built["stats"][t]["energy_kept"] == pytest.approx(energy, abs=1e-5)
        assert 0 < built["stats"][t]["rel_err"] < 1
    with pytest.raises(ValueError, match="lower rank q < 3"):
        get_method("peru-lora").from_options({"keep_rank": 3}).reuse(states, SCALE)


def reuse_spec(method="peru-lora", options=None, seed=0, **cfg):
    from lorabench.harness.trial import TrialSpec
    cfg = {"library_rank": 2, "library_alpha": 4.0, "library_steps": 2, "library_batch_size": 2,
           "adapters_per_job": 3, **cfg}
    tasks = [{"name": t, "options": {"n_eval": 6}} for t in ("quartz", "sarcasm-mc", "rt-mc")]
    return TrialSpec(suite="t", suite_version=1, label=f"{method}@reuse", method=method,
                     method_options=options or {"keep_rank": 1}, task="quartz", task_options={"n_eval": 6},
                     model="tiny-llama", seed=seed, train={"eval_batch_size": 16},
                     reuse={"config": cfg, "tasks": tasks})


def test_a_reuse_trial_scores_every_pool_task_with_its_own_reuse(tiny_library):  # noqa: F811 (the fixture)
    from lorabench.harness.trial import run_trial
    from lorabench.report.reuse import markdown, reuse_frame
    rec = run_trial(reuse_spec(), progress=False)
    ru = rec["reuse"]
    assert list(ru["tasks"]) == ["quartz", "sarcasm-mc", "rt-mc"]
    assert sorted(p.stem for p in tiny_library.iterdir()) == sorted(ru["library"].values())   # one adapter per task
    for task, e in ru["tasks"].items():
        hashes = {e[r]["outcomes"]["hash"] for r in ("peru", "merged", "own", "zero-shot")}
        assert len(hashes) == 1   # every rule on the same eval examples
        assert e["adapter"] == ru["library"][task] and 0 < e["energy_kept"] <= 1
    assert rec["score"] == pytest.approx(sum(e["peru"]["score"] for e in ru["tasks"].values()) / 3, abs=1e-6)
    assert ru["task_params"]["peru"] * 2 == ru["task_params"]["own"]    # q = 1 of r = 2
    assert ru["merged_rank"] == 6 and ru["library_seed"] == 0
    # λ = 0: the merged model is the base model, so it predicts what zero-shot predicts, example by example
    rec0 = run_trial(reuse_spec(options={"keep_rank": 1, "merge_lambda": 0.0}), progress=False)
    for e in rec0["reuse"]["tasks"].values():
        assert e["merged"]["outcomes"] == e["zero-shot"]["outcomes"]
    assert rec0["reuse"]["library"] == ru["library"]   # the cached library, not trained again
    frame = reuse_frame([{**rec, "label": "peru-lora@reuse", "seed": 0, "status": "ok"}])
    rules = set(frame["rule"])
    assert rules == {"zero-shot", "merged (λ=0.3)", "peru-lora (q=1)", "own adapter (r=2)"}
    avg = frame[frame["task"] == "average (3)"].set_index("rule")
    assert avg.loc["peru-lora (q=1)", "score"] == pytest.approx(rec["score"], abs=1e-6)
    md = "\n".join(markdown(frame))
    assert "## Reusing fine-tuned adapters" in md and "| quartz | peru-lora (q=1) | 1 |" in md
    # resuming a reuse suite over this record: its split hash is the pool's, as the runner recomputes it
    from lorabench.runner.run import check_splits
    from lorabench.runner.suite import trial_id
    spec = reuse_spec()
    check_splits([{**rec, "trial_id": trial_id(spec), "status": "ok"}], {trial_id(spec): spec},
                 tiny_library.parent / "records.jsonl")
    with pytest.raises(UserError, match="another split"):
        check_splits([{**rec, "trial_id": trial_id(spec), "status": "ok", "split_hash": "0" * 16}],
                     {trial_id(spec): spec}, tiny_library.parent / "records.jsonl")
    # the report writes its section and reuse.csv; a reuse record is no single-task row
    from lorabench.report.build import write_report
    files = write_report([{**rec, "label": "peru-lora@reuse", "seed": 0, "status": "ok", "method": "peru-lora",
                           "task": "quartz", "suite": "t"}], tiny_library.parent / "report", ["md", "csv"])
    assert "reuse.csv" in {p.name for p in files}
    board = (tiny_library.parent / "report" / "LEADERBOARD.md").read_text()
    assert "peru-lora" in board.split("## Reusing fine-tuned adapters")[1]
    assert "peru-lora" not in board.split("## Reusing fine-tuned adapters")[0], "a reuse record is not a single-task row"


def write(tmp_path, text: str):
    p = tmp_path / "r.yaml"
    p.write_text("suite: r\nversion: 1\ndescription: d\nseeds: [0, 1]\n" + text)
    return p


def test_the_reuse_suite_loads_and_refuses_what_it_cannot_run(tmp_path):
    from lorabench.runner.suite import load_suite, trial_id
    s = load_suite("reuse")
    trials = s.trials()
    assert len(trials) == 2 * 3 and {t.label for t in trials} == {"peru-lora@reuse", "peru-lora-q2@reuse"}
    assert all(len(t.reuse["tasks"]) == 13 for t in trials)
    assert len({trial_id(t) for t in trials}) == 6
    s2 = load_suite("reuse", ["reuse.library_steps=3", "seeds=0"])
    assert {t.reuse["config"]["library_steps"] for t in s2.trials()} == {3} and len(s2.trials()) == 2
    with pytest.raises(UserError, match="reuse.*unknown"):
        load_suite("reuse", ["reuse.k_shots=3"])
    base = "tasks: [quartz, rt-mc]\n"
    with pytest.raises(UserError, match="has no reuse rule"):
        load_suite(str(write(tmp_path, base + "methods: [lorahub]\nreuse: {}\n")))
    with pytest.raises(UserError, match="cannot be combined"):
        load_suite(str(write(tmp_path, base + "methods: [peru-lora]\nreuse: {}\ncross_task: {}\n")))
    with pytest.raises(UserError, match="multiple-choice"):
        load_suite(str(write(tmp_path, "tasks: [quartz, rt-sentiment]\nmethods: [peru-lora]\nreuse: {}\n")))
    with pytest.raises(UserError, match="nothing is trained per trial"):
        load_suite(str(write(tmp_path, base + "methods: [peru-lora]\nreuse: {}\nlr_grid: [1, 3]\n")))
    # a reuse method is no composition rule: the leave-one-task-out protocol refuses it clearly
    from lorabench.harness.trial import run_trial
    from tests.test_cross_task import cross_task_spec
    with pytest.raises(UserError, match="not a composition method"):
        run_trial(cross_task_spec("peru-lora", {"keep_rank": 1}), progress=False)
