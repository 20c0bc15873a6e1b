"""STAR's active learning through the harness (arXiv 2403.01165): the pool, the labelling budget,
the rounds, the acquisition of the most uncertain candidates, labels hidden until acquired, and
the record's method_metrics. The equations are checked in cases_star.py."""
from types import SimpleNamespace

import pytest
import torch

from lorabench.errors import UserError
from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from lorabench.methods.combining.active_pool import predictive_probs
from tests.methods.tester import VOCAB, RandomTask, tiny_model


class PoolTask:
    """A classification task over random token ids whose collate records what it was given, and
    whose examples carry a known 'u' (so a test can fix their uncertainty)."""
    name, kind = "pool", "classification"

    def __init__(self, n: int = 40, t: int = 8):
        g = torch.Generator().manual_seed(7)
        self.examples = [{"ids": torch.randint(1, VOCAB, (t,), generator=g).tolist(), "label": i % 2, "u": i / n}
                         for i in range(n)]
        self.collated: list[list[int]] = []

    def split(self):
        return SimpleNamespace(train=self.examples, eval=[])

    def encode(self, examples, tokenizer):
        ids = torch.tensor([e["ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def collate(self, examples, tokenizer):
        self.collated.append([self.examples.index(e) for e in examples])
        batch = self.encode(examples, tokenizer)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch


def run(options, steps=6, batch_size=4, task=None, kind="bert"):
    model, ctx = tiny_model(kind)
    torch.manual_seed(0)
    method = get_method("star").from_options(options)
    model = method.apply(model, ctx)
    task = task or PoolTask()
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    result = train(model, method, task, None, cfg, seed=0, progress=False)
    return result, method, task, model


def test_trains_only_on_acquired_examples_within_the_budget():
    result, _, task, _ = run({"rank": 4, "rounds": 3, "label_budget": 9, "candidates": 12, "mc_samples": 2})
    m = result.method_metrics
    assert result.steps == 6 and result.final_loss is not None
    assert m["active_learning"] is True and m["pool_size"] == 40
    assert m["rounds"] == 3 and m["label_budget"] == 9 and m["labels_used"] == 9
    assert m["labels_fraction"] == pytest.approx(9 / 40)
    assert m["candidates_scored"] == 24 and len(m["lambda_per_round"]) == 2
    assert m["lambda_per_round"] == [pytest.approx(2 / 3, abs=1e-4), pytest.approx(1 / 3, abs=1e-4)]
    assert m["scoring_seconds"] >= 0
    assert len(task.collated) == 6
    trained = {i for batch in task.collated for i in batch}
    assert len(trained) <= 9, "trained on more examples than were labelled"
    # round 0 (3 labels) before step 0, round 1 before step 2, round 2 before step 4
    assert len({i for b in task.collated[:2] for i in b}) <= 3
    assert len({i for b in task.collated[:4] for i in b}) <= 6


def test_acquisition_queries_the_most_uncertain_candidates(monkeypatch):
    from lorabench.methods.combining.star import STAR
    # both the base and the adapted model rank the examples by their 'u': μ is min-max(u)
    monkeypatch.setattr(STAR, "uncertainty",
                        lambda self, task, model, tok, examples, samples: torch.tensor([e["u"] for e in examples]))
    result, _, task, _ = run({"rank": 4, "rounds": 2, "label_budget": 8, "candidates": 1000, "mc_samples": 1},
                             steps=4, batch_size=4)
    first = set(task.collated[0]) | set(task.collated[1])           # round 0: 4 random labels
    later = {i for b in task.collated[2:] for i in b} - first       # round 1: the 4 most uncertain of the rest
    expected = sorted((i for i in range(40) if i not in first), reverse=True)[:4]
    assert later == set(expected)
    m = result.method_metrics
    assert m["acquired_uncertainty_mean"][0] > m["candidate_uncertainty_mean"][0]


def test_the_base_model_uncertainty_is_the_untrained_model():
    """μ_b is scored with the tensors of step 0 swapped in (B = 0, the initial head), whatever training did."""
    from lorabench.methods.combining.star import swapped
    model, ctx = tiny_model("bert")
    method = get_method("star").from_options({"rank": 4, "mc_samples": 1})
    model = method.apply(model, ctx)
    named = dict(method.trainable_parameters(model))
    base = {n: p.detach().clone() for n, p in named.items()}
    task = PoolTask()
    before = method.uncertainty(task, model, None, task.examples[:6], 1)
    with torch.no_grad():
        for p in named.values():
            p.add_(torch.randn_like(p))
    moved = method.uncertainty(task, model, None, task.examples[:6], 1)
    assert not torch.allclose(moved, before)
    with swapped(named, base):
        torch.testing.assert_close(method.uncertainty(task, model, None, task.examples[:6], 1), before)
    torch.testing.assert_close(method.uncertainty(task, model, None, task.examples[:6], 1), moved)


def test_rounds_score_the_base_model_with_step_0_tensors_and_the_full_model_as_trained(monkeypatch):
    from lorabench.methods.lora import LoraLinear
    from lorabench.methods.combining.star import STAR
    calls = []
    original = STAR.uncertainty

    def spy(self, task, model, tok, examples, samples):
        b_zero = all(torch.count_nonzero(m.lora_B) == 0 for m in model.modules() if isinstance(m, LoraLinear))
        calls.append((samples, b_zero, len(examples)))
        return original(self, task, model, tok, examples, samples)

    monkeypatch.setattr(STAR, "uncertainty", spy)
    run({"rank": 4, "rounds": 3, "label_budget": 9, "candidates": 12, "mc_samples": 2})
    full = [c for c in calls if c[0] == 2]
    base = [c for c in calls if c[0] == 1]
    assert len(full) == 2 and all(n == 12 for *_, n in full) and not any(z for _, z, _ in full)
    assert base and all(z for _, z, _ in base), "the base model's uncertainty was scored with trained tensors"
    assert sum(n for *_, n in base) <= 24    # each example's base uncertainty is scored once (cached)


def test_default_budget_is_half_the_example_visits_and_candidates_four_per_label():
    result, *_ = run({"rank": 4, "mc_samples": 2}, steps=6, batch_size=4)
    m = result.method_metrics
    assert m["label_budget"] == 12 and m["labels_used"] == 12
    assert m["candidates_scored"] == 2 * 4 * 4          # rounds 1 and 2 each acquire 4 of 16 candidates
    result, *_ = run({"rank": 4, "label_budget": 9, "candidate_ratio": 2.5, "mc_samples": 2})
    assert result.method_metrics["candidates_scored"] == 2 * 8
    result, *_ = run({"rank": 4, "label_budget": 0.25, "candidates": 8, "mc_samples": 2})
    assert result.method_metrics["label_budget"] == 10


def test_without_a_pool_it_trains_on_the_task_batches_and_says_so():
    with pytest.warns(UserWarning, match="no active learning"):
        result, *_ = run({"rank": 4}, steps=2, task=RandomTask("bert"))
    assert result.method_metrics["active_learning"] is False and result.steps == 2


def test_runtime_errors_name_the_problem():
    with pytest.raises(ValueError, match="exceeds the pool of 40"):
        run({"rank": 4, "label_budget": 41})
    with pytest.raises(ValueError, match="need at least 8 steps"):
        run({"rank": 4, "rounds": 8, "label_budget": 16}, steps=6)


@pytest.mark.parametrize("options,message", [
    ({"label_budget": 2.5}, "whole number"),
    ({"label_budget": 2, "rounds": 3}, "smaller than rounds"),
    ({"mc_samples": 3, "dropout": 0.0}, "needs dropout > 0"),
    ({"zero_init": "A"}, "zero_init='B'"),
    ({"mc_samples": 0}, "below the minimum"),
    ({"rounds": 0}, "below the minimum"),
    ({"label_budget": -1}, "below the minimum"),
    ({"candidats": 5}, "Did you mean: candidates"),
])
def test_config_validation(options, message):
    with pytest.raises(UserError, match=message):
        get_method("star").from_options(options)


def test_labels_stay_hidden_on_the_real_tasks():
    """The pool is scored from the inputs only: examples without their label give the same scores."""
    from lorabench import assets
    from lorabench.tasks import get_task
    for name, model_name, head in [("rt-sentiment", "tiny-bert", "seq-cls"), ("quartz", "tiny-llama", "causal-lm"),
                                   ("arith", "tiny-llama", "causal-lm")]:
        task = get_task(name).from_options({"n_train": 6, "n_eval": 2})
        loaded = assets.load_model(model_name, head=head, num_labels=task.num_labels if head == "seq-cls" else None)
        loaded.model.eval()
        examples = task.split().train
        hidden = [{k: v for k, v in e.items() if k not in ("label", "answer")} for e in examples]
        probs = predictive_probs(task, loaded.model, loaded.tokenizer, hidden, 4)
        assert probs.shape[0] == 6 and torch.allclose(probs.sum(-1), torch.ones(6), atol=1e-4)
        torch.testing.assert_close(probs, predictive_probs(task, loaded.model, loaded.tokenizer, examples, 4))


def test_a_task_without_labels_to_hide_is_refused():
    from lorabench.methods.combining.active_pool import pool_of
    from lorabench.tasks import get_task
    with pytest.raises(ValueError, match="supported kinds: classification, multiple-choice, generation"):
        pool_of(get_task("shakespeare-lm")())
