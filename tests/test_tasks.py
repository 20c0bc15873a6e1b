"""Every task: a fixed split with a stable hash, a training batch the model accepts, an evaluation
with the metric in range — run end to end on a tiny model through the real runner."""
import json
import warnings
import math

import pytest
import torch

from lorabench.runner.records import read_records
from lorabench.tasks import TASKS, get_task
from tests.conftest import run_cli


@pytest.mark.parametrize("name", TASKS.names())
def test_split_is_fixed_and_disjoint(name):
    task = get_task(name)()
    a, b = task.split(), get_task(name)().split()
    assert a.hash == b.hash and len(a.hash) == 16
    assert a.train and a.eval
    if task.kind != "perplexity":  # (perplexity splits whole plays)
        as_keys = lambda xs: {json.dumps(x, sort_keys=True) for x in xs}  # noqa: E731
        assert not as_keys(a.eval) & as_keys(a.train), "an eval example is also a training example"
        assert not as_keys(a.val) & as_keys(a.train), "a validation example is also a training example"
        assert not as_keys(a.val) & as_keys(a.eval), "a validation example is also an eval example"
    assert len(a.val) == task.val_size


def test_the_validation_part_comes_from_training_data_and_leaves_eval_where_it_was():
    from lorabench.tasks.base import seeded_split
    items = [{"x": i} for i in range(100)]
    two, three = seeded_split(items, 20), seeded_split(items, 20, 15)
    assert three.eval == two.eval and three.val == two.train[:15] and three.train == two.train[15:]
    assert three.hash != two.hash and two.hash == seeded_split(items, 20, 0).hash
    assert three.part_hash("eval") == two.part_hash("eval")
    with pytest.raises(ValueError, match="unknown split part 'test'; valid: eval, val"):
        three.part("test")


def test_tasks_without_a_validation_part_say_so():
    with pytest.raises(ValueError, match="kv-retrieval has no val examples .*no validation split"):
        get_task("kv-retrieval")().examples("val")


def test_majority_label_is_the_most_frequent_training_label():
    task = get_task("sarcasm")()
    labels = [e["label"] for e in task.split().train]
    counts = {k: labels.count(k) for k in set(labels)}
    assert counts[task.majority_label()] == max(counts.values())
    assert get_task("arith")().majority_label() is None


def test_n_train_and_n_eval_take_prefixes_and_change_the_hash():
    full = get_task("quartz")()
    small = get_task("quartz").from_options({"n_train": 10, "n_eval": 5})
    assert small.split().train == full.split().train[:10] and small.split().eval == full.split().eval[:5]
    assert small.split().hash != full.split().hash


def test_arith_eval_questions_never_appear_in_training():
    s = get_task("arith")().split()
    assert len(s.eval) == 500 and len(s.val) == 300
    assert not {e["question"] for e in s.eval + s.val} & {e["question"] for e in s.train}


SUITE = """suite: kinds
version: 1
seeds: [0]
train: {steps: 2, batch_size: 4, eval_batch_size: 8, warmup_steps_for_throughput: 0}
tasks:
  - {name: arith, model: tiny-llama, options: {n_train: 16, n_eval: 4, n_val: 3}}
  - {name: shakespeare-lm, model: tiny-llama, options: {n_train: 16, n_eval: 4, max_length: 32}}
  - {name: socialiqa, model: tiny-llama, options: {n_train: 16, n_eval: 4, n_val: 3}}
  - {name: sarcasm, model: tiny-bert, options: {n_train: 16, n_eval: 8, n_val: 4}}
methods:
  - lora
"""


def test_every_task_kind_runs_end_to_end(tmp_path):
    suite = tmp_path / "kinds.yaml"
    suite.write_text(SUITE)
    records = tmp_path / "r.jsonl"
    proc = run_cli("run", str(suite), "--records", str(records), "--no-progress")
    recs = {r["task"]: r for r in read_records(records)}
    assert proc.returncode == 0, [(t, r.get("error")) for t, r in recs.items()]
    assert 0 <= recs["arith"]["score"] <= 1 and recs["arith"]["metric"] == "exact_match"
    ppl = recs["shakespeare-lm"]["score"]
    # A random 49k-vocabulary model is close to uniform: perplexity near the vocabulary size.
    assert recs["shakespeare-lm"]["higher_is_better"] is False and 1 < ppl < 10 * 49152 and math.isfinite(ppl)
    assert 0 <= recs["socialiqa"]["metrics"]["accuracy_norm"] <= 1
    assert recs["sarcasm"]["n_eval"] == 8
    # per-example outcomes beside the score, tied to the eval examples by their hash
    for name in ("arith", "socialiqa", "sarcasm"):
        o = recs[name]["outcomes"]
        assert o["n"] == recs[name]["n_eval"] and len(o["correct"]) == o["n"] and len(o["hash"]) == 16
        assert sum(map(int, o["correct"])) / o["n"] == pytest.approx(recs[name]["score"])
    assert recs["sarcasm"]["outcomes"]["label"] is not None and recs["arith"]["outcomes"]["pred"] is None
    assert recs["shakespeare-lm"]["outcomes"] is None and recs["shakespeare-lm"]["val_score"] is None
    assert 0 <= recs["sarcasm"]["val_score"] <= 1 and recs["sarcasm"]["n_val"] == 4


def test_group_by_length_pads_less_and_keeps_each_epochs_examples():
    """group_by_length (transformers' LengthGroupedSampler): the batches of one epoch hold the same
    examples as without grouping, each batch of similar lengths, so rt-sentiment pads much less."""
    from itertools import islice
    from lorabench import assets
    tok = assets.load_tokenizer("minilm-l6")
    plain = TASKS.get("rt-sentiment").from_options({"n_train": 800})
    grouped = TASKS.get("rt-sentiment").from_options({"n_train": 800, "group_by_length": True})
    per_epoch = 800 // 16

    def ids_and_padding(task):
        seen, padded, real = [], 0, 0
        for b in islice(task.train_batches(tok, 16, seed=3), per_epoch):
            seen += [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])]
            padded += b["attention_mask"].numel()
            real += int(b["attention_mask"].sum())
        return sorted(seen), padded / real

    seen_plain, pad_plain = ids_and_padding(plain)
    seen_grouped, pad_grouped = ids_and_padding(grouped)
    assert seen_plain == seen_grouped
    assert pad_plain > 1.4 and pad_grouped < 1.15, (pad_plain, pad_grouped)
    # the same seed gives the same batches; another seed other batches
    first = lambda t, s: next(t.train_batches(tok, 16, seed=s))["input_ids"].tolist()
    assert first(grouped, 3) == first(grouped, 3) != first(grouped, 4)


def test_every_claims_method_trains_on_the_same_batches_for_a_seed():
    """The convergence findings (lorabench/report/findings.py) pair the early training loss of two methods by seed
    as a difference over the same batches: the order comes from the task and the seed alone, not from the
    method or from whatever its initialisation drew from the global generators."""
    import random as pyrandom
    from itertools import islice
    from lorabench import assets
    from lorabench.methods import get_method
    tok = assets.load_tokenizer("minilm-l6")
    task = TASKS.get("rt-sentiment").from_options({"n_train": 400})

    def first_batches(name: str, noise: int) -> list:
        pyrandom.seed(noise)
        torch.manual_seed(noise)  # another method's initialisation draws otherwise
        method = get_method(name).from_options({}, where=name)
        return [b["input_ids"].tolist() for b in islice(method.train_batches(None, task, tok, 16, 7), 5)]
    want = first_batches("lora", 0)
    assert all(first_batches(name, k) == want for k, name in enumerate(("pissa", "lora-plus", "dora", "full"), 1))
    assert [b["input_ids"].tolist() for b in islice(get_method("lora").from_options({}, where="lora").train_batches(
        None, task, tok, 16, 8), 5)] != want  # another seed: other batches


def _full_path_predictions(task, model, tok):
    """One padded full sequence per option, as the scoring did before the shared prompt cache."""
    from lorabench.tasks.causal import encode_pair
    from lorabench.tasks.multiple_choice import full_sequence_logprobs
    examples = task.examples("eval")
    pairs = [encode_pair(tok, task.prompt(e), task.option_text(c), task.max_length) for e in examples
             for c in e["choices"]]
    with torch.no_grad():
        flat = full_sequence_logprobs(model, pairs, tok.pad_token_id, 7)
    scores, k = [], 0
    for e in examples:
        scores.append(flat[k:k + len(e["choices"])])
        k += len(e["choices"])
    return scores


@pytest.mark.parametrize("name,max_length", [("socialiqa", 128), ("quartz", 24)])
def test_shared_prompt_scoring_equals_one_full_sequence_per_option(name, max_length):
    """Multi-token options (socialiqa; in one chunk with questions of fewer options) and prompts truncated per
    option (quartz at 24 tokens: those questions take the full path) score as one padded full sequence per
    option does, question by question."""
    from lorabench import assets
    from lorabench.tasks.multiple_choice import shared_prompt_logprobs
    from lorabench.tasks.causal import encode_pair
    torch.manual_seed(0)
    lm = assets.load_model("tiny-llama", "causal-lm")
    model, tok = lm.model.eval(), lm.tokenizer
    task = get_task(name).from_options({"n_eval": 24, "max_length": max_length})
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the shared path must not have fallen back
        ev = task.evaluate(model, tok, 7)
    want = _full_path_predictions(task, model, tok)
    assert ev.outcomes.pred == [int(s.argmax()) for s in want]
    examples = task.examples("eval")
    multi = [e for e in examples if max(len(tok(task.option_text(c), add_special_tokens=False)["input_ids"])
                                        for c in e["choices"]) > 1]
    if name == "socialiqa":
        assert multi, "the check needs options of several tokens"
    # and the scores themselves, on the shareable questions
    idx = [i for i, e in enumerate(examples)
           if len({tuple(encode_pair(tok, task.prompt(e), task.option_text(c), task.max_length)[0])
                   for c in e["choices"]}) == 1]
    if name == "quartz":
        assert 0 < len(idx) < len(examples), "at 24 tokens some prompts are truncated per option, some not"
    keep = {i: len(examples[i]["choices"]) - (k % 2) for k, i in enumerate(idx)}   # every other one loses its last
    got = shared_prompt_logprobs(
        model, [encode_pair(tok, task.prompt(examples[i]), task.option_text(examples[i]["choices"][0]),
                            task.max_length)[0] for i in idx],
        [[encode_pair(tok, task.prompt(examples[i]), task.option_text(c), task.max_length)[1]
          for c in examples[i]["choices"][:keep[i]]] for i in idx], tok.pad_token_id)
    for i, g in zip(idx, got):
        assert torch.allclose(g, want[i][:keep[i]], rtol=1e-4, atol=1e-3), (i, g, want[i])


@pytest.mark.parametrize("bf16", [False, True])
def test_a_model_that_rewrites_its_inputs_is_scored_on_full_sequences_with_a_warning(bf16):
    """A forward hook that shifts every input id (as Pillow's prompt prepending rewrites inputs) makes a
    cached prompt score differently from the whole sequence: the task notices on its first chunk, warns,
    and scores every question on full sequences, so the predictions equal the full path's. Under bf16 autocast
    too: the check runs in fp32 there (bf16's rounding moves the sums as much as this rewrite does)."""
    import contextlib

    from lorabench import assets
    precision = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(0)
    lm = assets.load_model("tiny-llama", "causal-lm")
    model, tok = lm.model.eval(), lm.tokenizer

    def shift(module, args, kwargs):
        if kwargs.get("cache") is not None:   # only the cached call: the prompt pass sees the real ids
            kwargs["input_ids"] = (kwargs["input_ids"] + 1) % model.config.vocab_size
        return args, kwargs

    model.register_forward_pre_hook(shift, with_kwargs=True)
    task = get_task("socialiqa").from_options({"n_eval": 24})
    with precision, pytest.warns(RuntimeWarning, match="shared prompt cache differs"):
        ev = task.evaluate(model, tok, 7)
    with precision:
        assert ev.outcomes.pred == [int(s.argmax()) for s in _full_path_predictions(task, model, tok)]


def test_under_bf16_autocast_an_honest_model_keeps_the_shared_prompt_path():
    """No false alarm from bf16's rounding: the agreement check runs in fp32, the scores at the trial's precision
    (bf16: within bf16's rounding of the fp32 scores, not equal to them)."""
    from lorabench import assets
    torch.manual_seed(0)
    lm = assets.load_model("tiny-llama", "causal-lm")
    model, tok = lm.model.eval(), lm.tokenizer
    task = get_task("socialiqa").from_options({"n_eval": 24})
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # the shared path must not have fallen back
        fp32 = task.evaluate(model, tok, 7)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = task.evaluate(model, tok, 7)
    a, b = torch.tensor(sum(fp32.option_scores, [])), torch.tensor(sum(bf16.option_scores, []))
    assert not torch.equal(a, b), "the bf16 scores should carry bf16's rounding"
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.5)
