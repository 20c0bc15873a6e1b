"""The long-context task `kv-retrieval` and the long-context methods run end to end on it."""
import re

import pytest
import torch

from lorabench.errors import UserError
from lorabench.harness.trial import TrialSpec, run_trial
from lorabench.tasks import get_task
from lorabench.tasks.longctx import kv_retrieval

SMALL = {"n_train": 16, "n_eval": 6, "n_pairs": 8, "base_context": 64}


def test_generation_is_deterministic_and_prefix_stable():
    a, b = kv_retrieval(20, 10, seed=3), kv_retrieval(20, 10, seed=3)
    assert a == b
    assert kv_retrieval(5, 10, seed=3) == a[:5]
    assert kv_retrieval(20, 10, seed=4) != a
    task = get_task("kv-retrieval")
    t1, t2 = task.from_options({"n_pairs": 6}), task.from_options({"n_pairs": 6})
    assert t1.split().hash == t2.split().hash
    assert t1.split().hash != task.from_options({"n_pairs": 7}).split().hash


def parse(question: str):
    lines = question.split("\n")
    pairs = [ln.split(": ") for ln in lines[1:-1]]
    query = re.fullmatch(r"What is the value of key (\w+)\?", lines[-1]).group(1)
    return pairs, query


def test_answer_occurs_exactly_once_and_is_the_value_of_the_query_key():
    positions = []
    for e in kv_retrieval(200, 12, seed=0):
        pairs, query = parse(e["question"])
        assert len(pairs) == 12
        keys, values = [k for k, _ in pairs], [v for _, v in pairs]
        assert len(set(keys)) == 12 and len(set(values)) == 12
        assert keys.count(query) == 1 and values[keys.index(query)] == e["answer"]
        assert keys.index(query) == e["position"]
        assert e["question"].count(e["answer"]) == 1
        positions.append(e["position"])
    assert set(positions) == set(range(12)), "the queried pair is not spread over the list"


def test_options_are_validated():
    with pytest.raises(UserError, match="n_pairs"):
        get_task("kv-retrieval").from_options({"n_pairs": 0})
    with pytest.raises(UserError, match="base_context"):
        get_task("kv-retrieval").from_options({"base_context": 2})
    with pytest.raises(UserError, match="n_pair"):
        get_task("kv-retrieval").from_options({"n_pair": 5})


class Oracle(torch.nn.Module):
    """Generates the value of the queried key (or of the key before it, `wrong=True`)."""

    def __init__(self, tokenizer, wrong=False):
        super().__init__()
        self.tok, self.wrong = tokenizer, wrong
        self.config = type("C", (), {"max_position_embeddings": 2048})()

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for ids, m in zip(input_ids, attention_mask):
            text = self.tok.decode(ids[m.bool()], skip_special_tokens=True)
            question = text[text.index("Key-value pairs:"): text.rindex("\nAnswer:")]
            pairs, query = parse(question)
            keys = [k for k, _ in pairs]
            i = keys.index(query) - (1 if self.wrong else 0)
            new = self.tok(f" {pairs[i][1]}\nQuestion", add_special_tokens=False)["input_ids"][:max_new_tokens]
            new = new + [self.tok.pad_token_id] * (max_new_tokens - len(new))
            rows.append(torch.cat([ids, torch.tensor(new)]))
        return torch.stack(rows)


def test_metric_on_an_oracle_and_a_wrong_model():
    from lorabench import assets
    tok = assets.load_tokenizer("tiny-llama")   # SmolLM2's tokenizer
    task = get_task("kv-retrieval").from_options({"n_eval": 10, "n_pairs": 8, "base_context": 64})
    good = task.evaluate(Oracle(tok), tok, batch_size=4).metrics
    assert good["exact_match"] == 1.0
    assert task.evaluate(Oracle(tok, wrong=True), tok, batch_size=4).metrics["exact_match"] == 0.0
    assert good["base_context"] == 64 and good["frac_over_base_context"] == 1.0   # ~100 tokens > 64
    assert good["mean_input_tokens"] > 64 and good["frac_truncated"] == 0.0


@pytest.mark.parametrize("method,options", [("longlora", {"context_factor": 2.0}), ("sinklora", {"n_sink": 2})])
def test_methods_run_end_to_end_on_kv_retrieval(method, options):
    spec = TrialSpec(suite="test", suite_version=1, label=method, method=method, method_options=options,
                     task="kv-retrieval", task_options=SMALL, model="tiny-llama", seed=0,
                     train={"steps": 2, "batch_size": 4, "eval_batch_size": 8, "warmup_steps_for_throughput": 0,
                            "threads": 1})
    rec = run_trial(spec, progress=False)
    assert rec["metric"] == "exact_match" and 0 <= rec["score"] <= 1
    assert rec["metrics"]["base_context"] == 64 and rec["metrics"]["frac_over_base_context"] == 1.0
    mm = rec["method_metrics"]
    factor = options.get("context_factor", 1.0)
    assert mm["extended_context"] == int(mm["base_context"] * factor)
    assert rec["metrics"]["model_context"] == mm["extended_context"]
    assert mm["train_length_max"] > SMALL["base_context"]
    assert mm["group_size"] == int(0.25 * mm["train_length_max"])
    assert 0 < mm["attn_pairs_fraction"] < 1 and mm["attn_flops_saved"] > 0
    assert mm["n_sink"] == options.get("n_sink", 0)
    assert rec["family"] == "beyond-fine-tuning" and rec["paper"] in ("2309.12307", "2406.05678")
