"""The cross-task pool (lorabench/harness/task_pool.py): at least 12 distinct tasks on SmolLM2, all
scored the same way; each source parses as its file says; one example of each scored by hand."""
from collections import Counter

import pytest
import torch

from lorabench import assets
from lorabench.assets import datasets as ds
from lorabench.harness.task_pool import MODEL, POOL
from lorabench.tasks import TASKS, get_task
from lorabench.tasks.multiple_choice import MultipleChoiceTask


def test_the_pool_is_at_least_twelve_distinct_tasks_on_one_model_scored_alike():
    assert len(POOL) >= 12 and len(set(POOL)) == len(POOL)
    classes = [get_task(name) for name in POOL]
    assert len({cls.dataset for cls in classes}) == len(POOL), "two pool tasks read the same data"
    for cls in classes:
        assert issubclass(cls, MultipleChoiceTask) and cls.kind == "multiple-choice", cls.name
        assert cls.default_model == MODEL and cls.metric.name == "accuracy" and cls.metric.higher_is_better
        # one output space: nobody overrides the prompt, the option's form or the scoring
        for attr in ("prompt", "option_text", "evaluate", "collate"):
            assert getattr(cls, attr) is getattr(MultipleChoiceTask, attr), f"{cls.name} overrides {attr}"
        assert TASKS.meta(cls.name)["sizes"] == cls.sizes


# (dataset, rows, label counts, exact duplicates), counted from the evals wheel's files
SOURCES = [
    ("corr2cause", 2246, {0: 342, 1: 1192, 2: 712}, 724),
    ("pararule-plus", 2000, {0: 966, 1: 1034}, 0),
    ("crepe", 1520, {0: 230, 1: 114, 2: 1176}, 0),
    ("abstract-causal", 2000, {0: 730, 1: 761, 2: 509}, 19),
    ("logiqa", 1354, {0: 272, 1: 322, 2: 370, 3: 390}, 677),
    ("reclor", 500, {0: 134, 1: 131, 2: 107, 3: 128}, 0),
    ("parable-moral", 1632, {0: 332, 1: 303, 2: 354, 3: 323, 4: 320}, 0),
    ("tomi", 5993, {0: 2216, 1: 3683, 2: 94}, 0),
]


@pytest.mark.parametrize("name,size,labels,duplicates", SOURCES)
def test_every_source_row_parses_with_its_answer(name, size, labels, duplicates):
    import json
    rows = assets.load_dataset(name)
    assert len(rows) == size and Counter(r["label"] for r in rows) == labels
    assert len({json.dumps(r, sort_keys=True) for r in rows}) == size - duplicates
    for r in rows:
        assert r["question"].strip() and all(c.strip() for c in r["choices"]) and 0 <= r["label"] < len(r["choices"])
        assert "Answer:" not in r["question"][-20:], "the source's own answer cue is left in the question"


def test_first_rows_as_the_files_give_them():
    # the first sample of each file, read by eye from the wheel: options in order, the file's answer
    logiqa = assets.load_dataset("logiqa")[0]
    assert logiqa["choices"] == ["Zhao chose to travel by car.", "Zhao does not choose to travel by car.",
                                 "Li chose to travel by ship.", "Zhang chose to travel by plane."]
    assert logiqa["label"] == 2 and logiqa["question"].startswith("The company sent Zhang, Wang, Li and Zhao")
    parable = assets.load_dataset("parable-moral")[0]
    assert parable["choices"][1] == "Do not attempt the impossible." and parable["label"] == 1
    assert parable["question"].endswith("she burst.\nWhich moral is this story attempting to convey?")
    causal = assets.load_dataset("abstract-causal")[0]
    assert causal["question"].startswith("A red cube in metal is visible. The light is on. A gray cylinder")
    assert causal["question"].endswith("A yellow sphere in rubber is visible. The state of the light is")
    assert causal["choices"][causal["label"]] == "undetermined"
    assert assets.load_dataset("corr2cause")[0]["label"] == 2  # "Answer: neutral"
    rule = assets.load_dataset("pararule-plus")[0]
    assert rule["question"].endswith("Question: Fiona is not big. True or false?") and rule["label"] == 1
    assert assets.load_dataset("crepe")[0]["choices"][assets.load_dataset("crepe")[0]["label"]] == "less likely"


def test_malformed_rows_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="not 'Passage"):
        ds.parse_passage_mc("Passage: p Question: q\nA. x\nB. y\nC. z\nAnswer:")   # three options
    assert ds.parse_passage_mc("\nPassage: p.Question: q?\nA. A.x\nB. B.y \nC. z\nD. w\nAnswer: ") == \
        ("p.\nq?", ["x", "y", "z", "w"])
    story = "A fox.\nWhich moral is this story attempting to convey? Please respond.\n"
    tail = "\nThe output should look like ..."
    assert ds.parse_parable(story + "A) a B) b C) c D) d E) e" + tail) == \
        ("A fox.\nWhich moral is this story attempting to convey?", ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="one of each"):
        ds.parse_parable(story + "A) a B) b C) c D) d E) e B) f" + tail)


def test_verbalized_tasks_ask_their_label_as_words():
    for name, label_words in (("rt-mc", ["negative", "positive"]), ("imdb-mc", ["negative", "positive"]),
                              ("sarcasm-mc", ["no", "yes"])):
        task = get_task(name)()
        source = {r["text"]: r["label"] for r in assets.load_dataset(task.dataset)}
        prefix, suffix = task.template.split("{text}")
        for e in task.split().eval[:50]:
            assert e["question"].startswith(prefix) and e["question"].endswith(suffix)
            text = e["question"][len(prefix):len(e["question"]) - len(suffix)]
            assert e["choices"] == label_words and e["label"] == source[text], name


@pytest.fixture(scope="module")
def tiny_llama():
    loaded = assets.load_model("tiny-llama", head="causal-lm")
    return loaded.model.eval(), loaded.tokenizer


@pytest.mark.parametrize("name", POOL)
def test_one_example_is_scored_by_its_options_likelihood(name, tiny_llama):
    """The task's batched, padded scoring of its first eval example equals each option's log-likelihood
    computed alone, by hand; the prediction is their argmax."""
    model, tok = tiny_llama
    task = get_task(name).from_options({"n_eval": 1})
    e = task.examples("eval")[0]
    res = task.evaluate(model, tok, batch_size=2)
    by_hand = []
    with torch.no_grad():
        for choice in e["choices"]:
            ctx, cont = (tok(s, add_special_tokens=False)["input_ids"]
                         for s in (f"Question: {e['question']}\nAnswer:", f" {choice}"))
            if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
                ctx = [tok.bos_token_id] + ctx
            ctx = ctx[-max(1, task.max_length - len(cont)):]
            ids = torch.tensor([ctx + cont])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            by_hand.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
    pred = max(range(len(by_hand)), key=by_hand.__getitem__)
    assert res.outcomes.pred == [pred] and res.outcomes.label == [e["label"]]
    assert res.metrics["accuracy"] == float(pred == e["label"])


def test_tomi_splits_by_story_and_offers_the_containers_the_story_names():
    from lorabench.tasks.multiple_choice import ToMi
    split = ToMi().split()
    stories = [{ToMi.story(e) for e in part} for part in (split.train, split.val, split.eval)]
    assert len(stories[1]) == ToMi.val_stories and len(stories[2]) == ToMi.eval_stories
    assert not (stories[0] & stories[1] or stories[0] & stories[2] or stories[1] & stories[2])
    assert len(split.eval) == ToMi.eval_size
    first = assets.load_dataset("tomi")[0]  # "... The boots is in the bathtub. ... moved the boots to the pantry."
    assert first["choices"] == ["bathtub", "pantry"] and first["label"] == 0
    assert first["question"].endswith("Where was the boots at the beginning?")
