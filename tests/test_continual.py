"""The sequence scenario (issue 18): the metrics' definitions, the continual methods' mechanisms, the suite,
a tiny sequence run twice through the runner (identical R), and the report's continual section.

The mechanism tests train tiny random Llama models through the real training loop (fast); the runner
test runs a 2-task sequence of real multiple-choice tasks on the smoke suite's random tiny-llama.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from lorabench.errors import UserError
from lorabench.harness.sequence import average_accuracy, backward_transfer, forward_transfer
from lorabench.harness.train import TrainConfig, train
from lorabench.methods import METHODS, get_method
from lorabench.methods.continual.base import Stage
from tests.methods.tester import RandomTask, tiny_model

CONTINUAL = [n for n in METHODS.names() if METHODS.meta(n)["family"] == "continual"]


# -- the metrics (docs/continual.md) ------------------------------------------------------------------

def test_acc_bwt_fwt_follow_gems_definitions():
    R = [[0.9, 0.4, 0.5],
         [0.7, 0.8, 0.6],
         [0.6, 0.7, 0.9]]
    b = [0.5, 0.5, 0.5]
    assert average_accuracy(R) == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)  # forgetting: negative
    assert forward_transfer(R, b) == pytest.approx(((0.4 - 0.5) + (0.6 - 0.5)) / 2)
    assert backward_transfer([[0.8]]) is None and forward_transfer([[0.8]], [0.5]) is None
    R[0][1] = None  # the unseen tasks not scored: FWT is not measured
    assert forward_transfer(R, b) is None


# -- the methods' mechanisms (tiny Llama, the real training loop) -----------------------------------

def _train(model, method, steps: int, lr: float, seed: int) -> dict:
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    return train(model, method, RandomTask("llama"), None, cfg, seed=seed, progress=False).method_metrics


def _two_stages(name: str, options: dict, steps: int = 30, lr: float = 1e-2):
    model, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method(name).from_options(options)
    model = method.apply(model, ctx)
    tasks = [RandomTask("llama"), RandomTask("llama")]
    first = Stage(t=0, tasks=tasks, seed=0, batch_size=4)
    method.begin_task(model, first)
    _train(model, method, steps, lr, seed=0)
    method.end_task(model, first)
    second = Stage(t=1, tasks=tasks, seed=0, batch_size=4)
    method.begin_task(model, second)
    return model, method, second


def test_o_lora_overlap_with_the_past_adapter_falls_under_its_loss_and_not_without_it():
    ratios = {}
    for lam in (0.0, 1.0):
        model, method, _ = _two_stages("o-lora", {"rank": 4, "ortho_lambda": lam})
        m = _train(model, method, 30, 1e-2, seed=1)
        assert m["past_adapters"] == 1 and m["orth_overlap_first"] > 0
        ratios[lam] = m["orth_overlap_last"] / m["orth_overlap_first"]
    assert ratios[1.0] < 0.5, ratios       # ||A_s A_t^T||_F^2 pushed down by λ1 L_orth
    assert ratios[0.0] > 0.8, ratios       # plain training leaves the overlap where the init put it


def test_o_lora_keeps_the_past_update_folded_and_trains_a_new_adapter():
    model, method, _ = _two_stages("o-lora", {"rank": 4})
    layers = method.lora_named(model)
    assert all(float(layer.lora_B.detach().abs().max()) == 0 for _, layer in layers), "the new B_t starts at 0"
    assert all(len(method.past_A[n]) == 1 for n, _ in layers)
    original, _ = tiny_model("llama")
    moved = [n for n, layer in layers if not torch.equal(layer.base.weight, original.get_submodule(n).weight)]
    assert moved, "the first task's B_1 A_1 was not folded into the frozen weights"


def test_inflora_designs_the_new_input_subspace_orthogonal_to_the_past_tasks():
    model, method, _ = _two_stages("inflora", {"rank": 4, "epsilon": 0.5})
    assert any(m.shape[1] > 0 for m in method.M.values()), "GPM kept no direction of the first task"
    assert method.interference(model) < 1e-5  # ||B_t M|| / ||B_t||: interference-free by design
    for name, layer in method.lora_named(model):
        a = layer.lora_A.float()
        kept = a[a.abs().sum(1) > 0]
        torch.testing.assert_close(kept @ kept.T, torch.eye(len(kept)), atol=1e-4, rtol=0)  # orthonormal rows
        assert not layer.lora_A.requires_grad and float(layer.lora_B.detach().abs().max()) == 0
    # the same projection on a random matrix of the same shape interferes: the design is what removes it
    name, layer = method.lora_named(model)[0]
    rand = torch.randn_like(layer.lora_A.float())
    assert float((rand @ method.M[name]).norm() / rand.norm()) > 0.3
    m = _train(model, method, 5, 1e-2, seed=1)
    assert m["designed"] == 1 and m["interference"] < 1e-5  # training A_t leaves B_t as designed


def test_per_task_lora_scores_each_task_with_its_own_adapter():
    model, method, second = _two_stages("per-task-lora", {"rank": 4})
    _train(model, method, 5, 1e-2, seed=1)
    method.end_task(model, second)
    current = method.adapter_state(model)
    first = method.adapters[0]
    assert any(not torch.equal(first[k], current[k]) for k in current)
    with method.scoring(model, 0, second) as m:
        assert all(torch.equal(method.adapter_state(m)[k], first[k]) for k in first)
    assert all(torch.equal(method.adapter_state(model)[k], current[k]) for k in current), "not restored"


class _MC:
    """A stand-in multiple-choice task: the prompt and option text of the pool's tasks, its own examples."""

    def __init__(self, tag: str, n: int):
        from lorabench.tasks.multiple_choice import MultipleChoiceTask
        self.name = tag
        self.prompt, self.option_text, self.max_length = MultipleChoiceTask.prompt, MultipleChoiceTask.option_text, 32
        self.examples = [{"question": f"{tag} {i}", "choices": ["a", "b"], "label": i % 2} for i in range(n)]

    def split(self):
        from lorabench.tasks.base import Split
        return Split(train=self.examples, eval=[])

    def train_batches(self, tokenizer, batch_size, seed):
        from lorabench.methods.continual.base import mixed_batches
        return mixed_batches([([(self, e) for e in self.examples], batch_size)], tokenizer, seed)


class _Tok:
    pad_token_id, bos_token_id = 0, None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + (ord(c) % 90) for c in text]}


def test_replay_and_multitask_batches_hold_the_past_tasks_examples():
    old, new = _MC("old", 20), _MC("new", 20)
    tok = _Tok()
    replay = get_method("replay-lora").from_options({"buffer_per_task": 4, "replay_fraction": 0.25})
    replay.end_task(None, Stage(t=0, tasks=[old, new], seed=0))
    assert len(replay.buffer) == 4 and all(task is old for task, _ in replay.buffer)
    import lorabench.methods.continual.base as base
    seen = []
    orig = base.collate_mixed
    try:
        base.collate_mixed = lambda items, tokenizer: seen.append([t for t, _ in items]) or orig(items, tokenizer)
        batches = replay.stage_batches(Stage(t=1, tasks=[old, new], seed=0), tok, 8, seed=0)
        next(batches)
        assert seen[-1].count(old) == 2 and seen[-1].count(new) == 6  # round(0.25 x 8) from the memory
        import lorabench.methods.continual.multitask_lora as mt
        mt.collate_mixed = base.collate_mixed
        batches = get_method("multitask-lora")().stage_batches(Stage(t=1, tasks=[old, new], seed=0), tok, 8, seed=0)
        next(batches)
        assert seen[-1].count(old) == 4 and seen[-1].count(new) == 4  # equal shares of every task seen
    finally:
        base.collate_mixed = orig
        import lorabench.methods.continual.multitask_lora as mt
        mt.collate_mixed = orig


def test_i_lora_slow_learner_is_the_moving_average_and_the_consistency_acts_on_replayed_rows():
    from lorabench.harness.sequence import StageTask
    from lorabench.methods.base import TrainState
    model, ctx = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("i-lora").from_options({"rank": 4, "buffer_per_task": 4, "ema": 0.9})
    model = method.apply(model, ctx)
    old, new, tok = _MC("old", 20), _MC("new", 20), _Tok()
    cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    first = Stage(t=0, tasks=[old, new], seed=0, tokenizer=tok, batch_size=4)
    m0 = train(model, method, StageTask(first, method), tok, cfg, seed=0, progress=False).method_metrics
    assert m0["consistency_loss_mean"] == 0 and m0["ema_updates"] == 5 and m0["slow_fast_distance"] > 0
    method.end_task(model, first)
    second = Stage(t=1, tasks=[old, new], seed=0, tokenizer=tok, batch_size=4)
    m1 = train(model, method, StageTask(second, method), tok, cfg, seed=1, progress=False).method_metrics
    assert m1["consistency_loss_mean"] > 0  # the memory's rows: fast and slow hidden states differ
    # θ_slow <- λ θ_slow + (1 - λ) θ_fast after a step
    before = {k: v.clone() for k, v in method.slow.items()}
    fast = {k: v.detach().clone() for k, v in method._fast(model).items()}
    method.on_step_end(TrainState(model, None, None, 0, 1))
    for k in before:
        torch.testing.assert_close(method.slow[k], 0.9 * before[k] + 0.1 * fast[k])
    with method.scoring(model, 0, second) as m:  # every task is scored with the slow learner
        assert all(torch.equal(method.adapter_state(m)[k], method.slow[k]) for k in method.slow)
    assert all(torch.equal(method._fast(model)[k].detach(), fast[k]) for k in fast), "the fast learner not restored"


def test_task_arithmetic_merges_the_task_vectors_then_restores_the_pretrained_weights():
    from lorabench.harness.sequence import StageTask
    model, ctx = tiny_model("llama")
    original, _ = tiny_model("llama")
    torch.manual_seed(0)
    method = get_method("task-arithmetic").from_options({"rank": 4, "buffer_per_task": 4, "merge_scale": 0.5,
                                                         "memory_steps": 3})
    model = method.apply(model, ctx)
    tasks, tok = [_MC("a", 20), _MC("b", 20), _MC("c", 20)], _Tok()
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    for t in (0, 1):
        stage = Stage(t=t, tasks=tasks, seed=0, tokenizer=tok, batch_size=4, lr=1e-2)
        method.begin_task(model, stage)
        train(model, method, StageTask(stage, method), tok, cfg, seed=t, progress=False)
        m = method.end_task(model, stage)
    assert m["task_vectors_merged"] == 2 and m["memory_loss_last"] is not None and len(method.vectors) == 2
    for name, layer in method.lora_named(model):
        w0 = original.get_submodule(name).weight
        expected = w0 + 0.5 * sum(layer.scale * v[f"{name}.lora_B"] @ v[f"{name}.lora_A"] for v in method.vectors)
        torch.testing.assert_close(layer.base.weight, expected, atol=1e-5, rtol=1e-5)  # W0 + λ Σ ΔW_s
    assert any(float(layer.lora_B.detach().abs().max()) > 0 for _, layer in method.lora_named(model)), \
        "the memory fine-tuning trained no adapter on the merged model"
    assert not torch.equal(method.vectors[0][f"{name}.lora_B"], method.vectors[1][f"{name}.lora_B"])
    method.begin_task(model, Stage(t=2, tasks=tasks, seed=0, tokenizer=tok, batch_size=4))
    for name, layer in method.lora_named(model):  # the next task vector trains from W0
        torch.testing.assert_close(layer.base.weight, original.get_submodule(name).weight, atol=1e-5, rtol=0)
        assert float(layer.lora_B.detach().abs().max()) == 0


def test_every_continual_method_is_registered_with_its_paper():
    from lorabench.methods.continual.base import StageHooks
    assert {"seq-lora", "per-task-lora", "replay-lora", "multitask-lora", "o-lora", "inflora", "i-lora",
            "task-arithmetic", "moral-cl"} <= set(CONTINUAL)
    for name in CONTINUAL:
        cls = get_method(name)
        assert cls.family == "continual" and cls.paper == METHODS.meta(name)["paper"]
        assert issubclass(cls, StageHooks)   # what the sequence scenario runs


# -- the suite ----------------------------------------------------------------------------------------

def test_the_continual_suite_runs_each_method_on_each_order():
    from lorabench.cli import suite_size
    from lorabench.runner.suite import load_suite, trial_id
    import yaml
    s = load_suite("continual")
    trials = s.trials()
    assert len(trials) == len(s.methods) * len(s.orders) * len(s.seeds) == s.size()
    assert suite_size(yaml.safe_load(open(s.path))) == len(trials)
    assert len({trial_id(t) for t in trials}) == len(trials)
    assert {len(v) for k, v in s.orders.items() if k.startswith("order-")} == {4} and len(s.orders["long"]) == 13
    t = next(t for t in trials if t.label == "o-lora-l0.5@order-2")
    assert [e["name"] for e in t.continual["tasks"]] == s.orders["order-2"] and t.task == s.orders["order-2"][0]
    sub = load_suite("continual", ["orders=order-1", "methods=seq-lora", "seeds=0"]).trials()
    assert [x.label for x in sub] == ["seq-lora@order-1"] and trial_id(sub[0]) in {trial_id(t) for t in trials}


BASE = """suite: {name}
version: 1
train: {{steps: 2, batch_size: 4}}
"""


@pytest.mark.parametrize("body,pattern", [
    ("continual: {}\norders: {a: [quartz, nope]}\ntasks: [quartz]\nmethods: [seq-lora]\n", r"names nope, not in this suite"),
    ("continual: {}\norders: {a: [quartz]}\ntasks: [quartz]\nmethods: [lora]\n", r"not a continual method"),
    ("continual: {}\norders: {a: [rt-sentiment]}\ntasks: [rt-sentiment]\nmethods: [seq-lora]\n", r"multiple-choice"),
    ("orders: {a: [quartz]}\ntasks: [quartz]\nmethods: [seq-lora]\n", r"orders needs a `continual:`"),
    ("continual: {}\ntasks: [quartz]\nmethods: [seq-lora]\n", r"needs `orders:`"),
    ("continual: {}\norders: {a: [quartz, quartz]}\ntasks: [quartz]\nmethods: [seq-lora]\n", r"lists a task twice"),
    ("continual: {score_unsen: true}\norders: {a: [quartz]}\ntasks: [quartz]\nmethods: [seq-lora]\n", r"score_unseen"),
])
def test_bad_continual_suites(tmp_path, body, pattern):
    from lorabench.runner.suite import load_suite
    p = tmp_path / "bad.yaml"
    p.write_text(BASE.format(name="bad") + body)
    with pytest.raises(UserError, match=pattern):
        load_suite(str(p))


def test_continual_overrides(tmp_path):
    from lorabench.runner.suite import load_suite
    s = load_suite("continual", ["orders=order-3", "continual.validate=false"])
    assert list(s.orders) == ["order-3"] and s.continual["validate"] is False
    with pytest.raises(UserError, match=r"orders=: order-9 not in suite continual"):
        load_suite("continual", ["orders=order-9"])
    with pytest.raises(UserError, match=r"continual"):
        load_suite("continual", ["continual.nope=1"])


# -- a tiny sequence through the runner, twice: identical R (determinism) ------------------------------

TINY = """suite: tinyseq
version: 1
description: "a 2-task sequence on the smoke suite's random tiny-llama"
seeds: [0]
train: {steps: 3, batch_size: 4, eval_batch_size: 16, warmup_steps_for_throughput: 1, lr: 1.0e-2}
continual: {validate: true}
orders:
  a: [socialiqa, quartz]
tasks:
  - {name: socialiqa, model: tiny-llama, options: {n_train: 24, n_eval: 12, n_val: 6}}
  - {name: quartz, model: tiny-llama, options: {n_train: 24, n_eval: 12, n_val: 6}}
methods: [seq-lora, per-task-lora]
"""


def test_the_same_tiny_sequence_twice_in_one_process_gives_identical_R(tmp_path):
    from lorabench.harness.sequence import run_sequence
    from lorabench.runner.suite import load_suite
    path = tmp_path / "tinyseq.yaml"
    path.write_text(TINY.replace("n_eval: 12", "n_eval: 6").replace("continual: {validate: true}", "continual: {}"))
    spec = load_suite(str(path), ["methods=seq-lora"]).trials()[0]
    a, b = (run_sequence(spec, progress=False)["continual"] for _ in range(2))
    assert a["R"] == b["R"] and a["outcomes"] == b["outcomes"] and a["adapter_norms"] == b["adapter_norms"]
    assert a["adapter_norms"][1] > a["adapter_norms"][0] > 0  # one adapter, trained on and on


# -- MoRAL in the lifelong setting: one mixture of experts through the sequence ------------------------------

MORAL = {"experts": 3, "rank": 2}


def test_moral_cl_keeps_one_mixture_through_the_stages_and_reads_each_tasks_routing_while_it_is_scored():
    """Nothing is reset, frozen or added between stages (the paper trains experts and router on the new data);
    scoring task j reads the routing of task j's tokens alone."""
    from lorabench.methods.cross_task.mixture import MixtureLinear
    model, method, second = _two_stages("moral-cl", MORAL, steps=10)
    layers = [m for m in model.modules() if isinstance(m, MixtureLinear)]
    assert layers and all(m.lora_A.requires_grad and m.lora_B.requires_grad and m.router.weight.requires_grad
                          for m in layers)   # every expert and the router train again in stage 2
    trained = {id(p): p.detach().clone() for m in layers for p in (m.lora_A, m.lora_B, m.router.weight)}
    assert method.adapter_norm(model) > 0   # stage 1 trained the experts (B = 0 at init)
    before = method.adapter_norm(model)
    metrics = _train(model, method, 10, 1e-2, seed=1)
    assert method.adapter_norm(model) != before
    assert len(metrics["expert_update"]) == 3 and sum(x > 0 for x in metrics["expert_update"]) >= 2
    assert all(not torch.equal(trained[id(p)], p.detach()) for m in layers for p in (m.lora_A, m.lora_B))
    # scoring: a task's routing from its own tokens only (the stats reset on entry, read on exit)
    from tests.methods.tester import batch_for

    def scored(noise: bool) -> dict:
        with torch.no_grad():
            if noise:   # tokens seen outside the scoring do not count
                model(**batch_for("llama", seed=7, n=4))
            with method.scoring(model, 0, second) as m:
                m(**batch_for("llama", seed=5, n=4))
        return method.stage_scored(model, second)["task_routing"]

    alone, after_noise = scored(False), scored(True)
    assert alone == after_noise and list(alone) == [second.tasks[0].name]
    r = alone[second.tasks[0].name]
    assert len(r["expert_load"]) == 3 and abs(sum(r["expert_load"]) - 1) < 1e-3 and r["router_entropy"] > 0
    assert method.stage_scored(model, second) == {"task_routing": {}}   # consumed: the next stage starts empty


def test_moral_cl_records_its_routing_per_stage_in_a_tiny_sequence_and_two_runs_agree(tmp_path):
    from lorabench.harness.sequence import run_sequence
    from lorabench.runner.suite import load_suite
    path = tmp_path / "tinyseq.yaml"
    path.write_text(TINY.replace("n_eval: 12", "n_eval: 6").replace("continual: {validate: true}", "continual: {}")
                    .replace("methods: [seq-lora, per-task-lora]", "methods: [{name: moral-cl, options: "
                             "{experts: 3, rank: 2}}]"))
    spec = load_suite(str(path), ["train.steps=6"]).trials()[0]
    assert spec.method == "moral-cl"
    a, b = (run_sequence(spec, progress=False) for _ in range(2))
    ca, cb = a["continual"], b["continual"]
    assert ca["R"] == cb["R"] and ca["outcomes"] == cb["outcomes"] and ca["adapter_norms"] == cb["adapter_norms"]
    assert [s["method_metrics"] for s in ca["stages"]] == [s["method_metrics"] for s in cb["stages"]]
    assert a["family"] == "continual" and all(x is not None for row in ca["R"] for x in row)
    s0, s1 = (s["method_metrics"] for s in ca["stages"])
    for m in (s0, s1):
        assert len(m["expert_load"]) == 3 and abs(sum(m["expert_load"]) - 1) < 1e-3 and m["router_entropy"] > 0
        assert set(m["task_routing"]) == {"socialiqa", "quartz"}   # every task's routing after every stage
        assert all(abs(sum(r["expert_load"]) - 1) < 1e-3 for r in m["task_routing"].values())
        assert sum(x > 0 for x in m["expert_update"]) >= 2   # each stage writes into the experts it routes to
    # the mixture acts across stages: the training load moved between the two tasks' stages, and training the
    # router on quartz moved socialiqa's routing on its own eval examples
    assert s0["expert_load"] != s1["expert_load"]
    assert s0["task_routing"]["socialiqa"]["expert_load"] != s1["task_routing"]["socialiqa"]["expert_load"]
    assert ca["adapter_norms"][1] != ca["adapter_norms"][0] > 0
    assert a["method_metrics"] == s1   # the record's method_metrics are the last stage's


@pytest.mark.slow  # two runs of the runner (fork server, a process per trial): ~3 minutes on a shared core
def test_a_tiny_sequence_run_twice_gives_identical_R_and_the_report_section(tmp_path):
    from lorabench.report.build import write_report
    from lorabench.runner.records import read_records
    from lorabench.runner.run import run_suite
    from lorabench.runner.suite import load_suite
    path = tmp_path / "tinyseq.yaml"
    path.write_text(TINY)
    runs = []
    for k in (1, 2):
        out = tmp_path / f"run{k}.jsonl"
        run_suite(load_suite(str(path)), out, [], progress=False, log=lambda m: None)
        runs.append({r["label"]: r for r in read_records(out)})
    for label in ("seq-lora@a", "per-task-lora@a"):
        a, b = runs[0][label], runs[1][label]
        assert a["status"] == b["status"] == "ok", (a.get("error"), b.get("error"))
        assert a["continual"]["R"] == b["continual"]["R"] and a["continual"]["outcomes"] == b["continual"]["outcomes"]
        assert a["continual"]["zero_shot"] == b["continual"]["zero_shot"]
        assert a["continual"]["adapter_norms"] == b["continual"]["adapter_norms"]
        R = a["continual"]["R"]
        assert len(R) == 2 and all(x is not None for row in R for x in row)  # the unseen task scored too
        assert a["score"] == pytest.approx(sum(R[-1]) / 2, abs=1e-6)
        assert a["continual"]["val_acc"] is not None and len(a["continual"]["outcomes"][1][0]) == 12
    per = runs[0]["per-task-lora@a"]["continual"]
    assert per["bwt"] == 0.0 and per["R"][1][0] == per["R"][0][0]  # its own adapter: nothing forgotten
    files = write_report(list(runs[0].values()), tmp_path / "report", ["md", "csv", "html", "png"])
    names = {f.name for f in files}
    assert {"continual.csv", "continual-a.png"} <= names
    md = (tmp_path / "report" / "LEADERBOARD.md").read_text()
    assert "## Continual learning (the sequence scenario)" in md and "per-task-lora@a" in md
    assert "![a](plots/continual-a.png)" in md
    assert "continual-a" in (tmp_path / "report" / "leaderboard.html").read_text()
    assert "seq-lora@a" not in md.split("## Continual learning")[0], "a sequence's score is not a task's"


# -- the report on hand-made records --------------------------------------------------------------------

def _record(label: str, method: str, seed: int, R_bits: list[list[str]], zero: list[str], options=None, val=None,
            norms=(1.0, 1.0)):
    T = len(R_bits)
    R = [[sum(map(int, s)) / len(s) for s in row] for row in R_bits]
    from lorabench.harness.sequence import average_accuracy, backward_transfer, forward_transfer
    b = [sum(map(int, s)) / len(s) for s in zero]
    return {"status": "ok", "label": label, "method": method, "seed": seed, "method_options": options or {},
            "continual": {"order": "o", "tasks": [f"t{j}" for j in range(T)], "R": R, "outcomes": R_bits,
                          "zero_shot": b, "zero_shot_outcomes": zero, "acc": average_accuracy(R),
                          "bwt": backward_transfer(R), "fwt": forward_transfer(R, b), "val_acc": val,
                          "adapter_norms": list(norms)}}


def test_report_section_pairs_each_method_with_seq_lora_by_seed_and_example():
    from lorabench.report import continual
    zero = ["0000", "0000"]
    recs = [
        _record("seq-lora@o", "seq-lora", 0, [["1111", "0000"], ["0011", "1111"]], zero),
        _record("seq-lora@o", "seq-lora", 1, [["1110", "0000"], ["0001", "1110"]], zero),
        _record("o-lora-a@o", "o-lora", 0, [["1111", "1000"], ["1111", "1111"]], zero, {"ortho_lambda": 0.1}, 0.5, (1.0, 0.9)),
        _record("o-lora-a@o", "o-lora", 1, [["1110", "0000"], ["1110", "1110"]], zero, {"ortho_lambda": 0.1}, 0.5, (1.0, 0.8)),
        _record("o-lora-b@o", "o-lora", 0, [["1111", "0000"], ["1100", "1111"]], zero, {"ortho_lambda": 2.0}, 0.75, (1.0, 0.01)),
        _record("o-lora-b@o", "o-lora", 1, [["1111", "0000"], ["1100", "1111"]], zero, {"ortho_lambda": 2.0}, 0.75, (1.0, 0.02)),
    ]
    f = continual.continual_frame(recs).set_index("label")
    seq = f.loc["seq-lora@o"]
    assert seq["bwt"] == pytest.approx(((0.5 - 1.0) + (0.25 - 0.75)) / 2)
    assert seq["acc"] == pytest.approx(((0.5 + 1.0) + (0.25 + 0.75)) / 4)
    assert seq["fwt"] == pytest.approx(0.0 + 0.0)
    assert seq["ci_kind"] == "seeds x examples" and seq["acc_ci95"] > 0
    a = f.loc["o-lora-a@o"]
    assert a["bwt"] == pytest.approx(0.0) and a["d_bwt"] == pytest.approx(a["bwt"] - seq["bwt"])
    assert a["d_acc"] == pytest.approx(a["acc"] - seq["acc"]) and a["d_acc_ci95"] > 0
    assert math.isnan(seq["d_bwt"])
    assert f.loc["o-lora-b@o"]["adapter_norm_last"] == pytest.approx(0.015)
    sw = continual.sweeps(recs)
    assert list(sw["value"]) == [0.1, 2.0] and list(sw["chosen"]) == [False, True]  # the best validation ACC
    md = "\n".join(continual.markdown(recs, []))
    assert "Penalty weights swept" in md and "ortho_lambda" in md
    json.dumps(continual.continual_frame(recs).to_dict())  # plain values
    pngs = continual.plots(recs)
    assert pngs["continual-o.png"].png[:4] == b"\x89PNG" and "continual-sweep-o-o-lora.png" in pngs


def test_a_sweep_counts_a_label_without_the_option_at_the_methods_default():
    """`i-lora` (ema left at its default 0.99) beside `i-lora-e0.9` (ema 0.9) is a sweep over ema with two values."""
    from lorabench.methods import get_method
    from lorabench.report import continual
    zero = ["0000", "0000"]
    recs = [_record("i-lora@o", "i-lora", 0, [["1111", "0000"], ["0011", "1111"]], zero, None, 0.25),
            _record("i-lora-e0.9@o", "i-lora", 0, [["1111", "0000"], ["1111", "1111"]], zero, {"ema": 0.9}, 0.75)]
    sw = continual.sweeps(recs)
    assert list(sw["option"]) == ["ema", "ema"]
    assert list(sw["value"]) == [0.9, get_method("i-lora").config_cls().ema] == [0.9, 0.99]
    assert list(sw["chosen"]) == [True, False]
