"""lm-eval integration (issue 9): LorabenchLM, the task export, `eval`, the suite option `lm_eval`.

Offline: tasks read local JSONL, the model is passed as an object. Agreement with lorabench's own
evaluator uses the real SmolLM2-135M on small subsets; everything else runs on tiny-llama.
"""
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported (it reads them once)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import json
import math
from dataclasses import asdict

import lm_eval
import pytest
import torch
import yaml
from lm_eval.api.instance import Instance

from lorabench import assets
from lorabench.errors import UserError
from lorabench.lmeval.export import export_task, export_tasks, get_decoder_task
from lorabench.lmeval.model import LorabenchLM
from lorabench.lmeval.run import evaluate
from lorabench.tasks import get_task
from lorabench.tasks.causal import continuation_logprobs, encode_pair, pad_pairs


def ll_request(context, continuation):
    return Instance("loglikelihood", {}, (context, continuation), 0)


def rolling_request(text):
    return Instance("loglikelihood_rolling", {}, (text,), 0)


@pytest.fixture(scope="module")
def tiny():
    lm = assets.load_model("tiny-llama", "causal-lm", seed=0)
    return lm.model.eval(), lm.tokenizer


@pytest.fixture(scope="module")
def smollm2():
    lm = assets.load_model("smollm2-135m", "causal-lm")
    return lm.model.eval(), lm.tokenizer


def test_registered_under_lorabench(tmp_path):
    """lm-eval builds the model itself from the registered name and a model_args string."""
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    assert get_model("lorabench") is LorabenchLM
    export_tasks(["quartz"], tmp_path, options={"n_eval": 3})
    res = lm_eval.simple_evaluate(model="lorabench", model_args="pretrained=tiny-llama,batch_size=4",
                                  tasks=["lorabench_quartz"], device="cpu",
                                  task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert res["results"]["lorabench_quartz"]["sample_len"] == 3


# -- agreement with lorabench's own evaluator -------------------------------------------------------

@pytest.mark.slow  # SmolLM2-135M (converted first with an empty cache) scored twice over QuaRTz
@pytest.mark.xdist_group("smollm2")  # with the other tests that load it (tests/test_assets.py)
def test_quartz_accuracy_equals_lorabench_evaluator_with_saved_adapter(tmp_path):
    """lm-eval (exported task, adapter loaded from disk) == MultipleChoiceTask.evaluate (adapter in memory)."""
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext

    loaded = assets.load_model("smollm2-135m", "causal-lm")
    model, tok = loaded.model, loaded.tokenizer
    method = get_method("lora").from_options({"rank": 4, "target_modules": ["q_proj", "v_proj"]})
    model = method.apply(model, ApplyContext(architecture="llama", head_modules=[]))
    ids = torch.tensor([tok("Question: Is ice cold?\nAnswer: yes")["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):  # B = 0 at init: a trained-looking adapter instead
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        assert (model(input_ids=ids).logits - before).abs().max() > 1e-2, "the adapter must change the model"
    path = tmp_path / "adapter.safetensors"
    method.save_adapter(model, str(path))
    model.eval()

    task = get_task("quartz").from_options({"n_eval": 50})
    ours = task.evaluate(model, tok, batch_size=16).metrics["accuracy"]
    del model

    lm = LorabenchLM(pretrained="smollm2-135m", adapter=str(path), batch_size=16, max_length=task.max_length)
    res = evaluate(lm, ["quartz"], task_options={"n_eval": 50})
    row = res["results"]["lorabench_quartz"]
    assert row["sample_len"] == 50
    assert row["acc,none"] == ours  # exactly: same prompts, same token ids, same sum of log-probabilities


def test_eval_command_prints_the_table_and_agrees(tiny, cli, tmp_path):
    """The must-show command (tiny-llama, 20 questions): lm-eval's table, acc == lorabench's accuracy."""
    model, tok = tiny
    ours = get_task("quartz").from_options({"n_eval": 20}).evaluate(model, tok, batch_size=16).metrics
    out = tmp_path / "results.json"
    r = cli("eval", "--lm-eval", "quartz", "--model", "tiny-llama", "--task-option", "n_eval=20",
            "--output", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "|lorabench_quartz|" in r.stdout and "|acc     |" in r.stdout
    row = json.loads(out.read_text())["results"]["lorabench_quartz"]
    assert row["acc,none"] == ours["accuracy"] and row["sample_len"] == 20


def test_loglikelihood_equals_evaluator_scores(tiny):
    """Per request, LorabenchLM.loglikelihood == continuation_logprobs, up to padding-width rounding."""
    model, tok = tiny
    task = get_task("quartz").from_options({"n_eval": 12})
    reqs = [ll_request(task.prompt(e), task.option_text(c)) for e in task.split().eval for c in e["choices"]]
    ours = []
    for s in range(0, len(reqs), 5):
        pairs = [encode_pair(tok, *r.args, task.max_length) for r in reqs[s:s + 5]]
        ours += continuation_logprobs(model, pad_pairs(pairs, tok.pad_token_id, train=False)).tolist()
    got = LorabenchLM(model=model, tokenizer=tok, batch_size=7, max_length=task.max_length).loglikelihood(reqs)
    # Batches differ (length-sorted, other widths): only float rounding may differ.
    assert max(abs(a - b) for (a, _), b in zip(got, ours)) < 1e-4
    assert all(isinstance(greedy, bool) for _, greedy in got)


def test_empty_context_conditions_on_prefix_token(tiny):
    model, tok = tiny
    lm = LorabenchLM(model=model, tokenizer=tok)
    cont = tok("Hello world", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[lm.prefix_token_id] + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    want = logp.gather(-1, ids[0, 1:, None]).sum().item()
    assert lm.loglikelihood([ll_request("", "Hello world")])[0][0] == pytest.approx(want, abs=1e-4)


def test_loglikelihood_rolling_scores_every_token_once(tiny):
    """lm-eval's contract, computed independently: chunks of max_length tokens, each token scored
    once; the first chunk conditioned on the prefix token, the others on the token before them; the
    last, shorter chunk gets a full max_length input (its tokens scored after as much context as fits)."""
    model, tok = tiny
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer " * 4
    ids = tok(text, add_special_tokens=False)["input_ids"]
    L = 16
    assert len(ids) > 3 * L
    lm = LorabenchLM(model=model, tokenizer=tok, max_length=L)
    want = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), L):
            end = min(start + L, len(ids))
            x = [lm.prefix_token_id] + ids[:end - 1] if start == 0 else ids[end - L - 1:end - 1]
            logp = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0].float(), -1)
            scored = torch.tensor(ids[start:end])
            want += logp[-len(scored):].gather(-1, scored[:, None]).sum().item()
    got = lm.loglikelihood_rolling([rolling_request(text), rolling_request(text[:40])])
    assert got[0] == pytest.approx(want, rel=1e-5)
    assert got[1] < 0 and got[1] > got[0]


@pytest.mark.slow  # SmolLM2-135M (converted first with an empty cache), rolling perplexity
@pytest.mark.xdist_group("smollm2")
def test_shakespeare_rolling_perplexity_vs_task(smollm2):
    """The exported shakespeare-lm documents are the task's own windows. Two conventions differ:
    lorabench never predicts a window's first token and feeds no prefix token; lm-eval predicts every
    token (the first from the prefix token) and re-tokenises the window's text (SmolLM2 splits a
    paragraph break "\\n\\n"+letter into two tokens where lorabench, tokenising paragraph by paragraph,
    has one). Removing the first tokens' term, the totals agree within 10% (docs/lm-eval.md)."""
    model, tok = smollm2
    task = get_task("shakespeare-lm").from_options({"n_eval": 4})
    ev = task.evaluate(model, tok, batch_size=4)
    ours_total = ev.metrics["nll"] * 4 * (task.max_length - 1)  # nats over the predicted tokens

    texts = [tok.decode(w) for w in task.windows(task.split().eval, tok, 4)]
    lm = LorabenchLM(model=model, tokenizer=tok, batch_size=4)
    rolling = lm.loglikelihood_rolling([rolling_request(t) for t in texts])
    firsts = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:1]) for t in texts]
    first = sum(ll for ll, _ in lm.loglikelihood([ll_request("", f) for f in firsts]))
    rest = -(sum(rolling) - first)
    assert abs(rest / ours_total - 1) < 0.10, (rest, ours_total)

    # The exported task through simple_evaluate reports lm-eval's bits per byte of those same calls.
    res = evaluate(lm, ["shakespeare-lm"], task_options={"n_eval": 4}, tokenizer=tok)
    row = res["results"]["lorabench_shakespeare_lm"]
    n_bytes = sum(len(t.encode()) for t in texts)
    assert row["bits_per_byte,none"] == pytest.approx(-sum(rolling) / n_bytes / math.log(2), rel=1e-5)
    assert row["byte_perplexity,none"] == pytest.approx(2 ** row["bits_per_byte,none"], rel=1e-5)


def test_generate_until_matches_arith_decoding(tiny):
    """Greedy, left-padded, cut at the first newline: the text Arith.evaluate compares."""
    model, tok = tiny
    task = get_task("arith").from_options({"n_eval": 6})
    prompts = [task.prompt(e) for e in task.split().eval]
    kwargs = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False}
    got = LorabenchLM(model=model, tokenizer=tok, batch_size=1).generate_until(
        [Instance("generate_until", {}, (p, kwargs), 0) for p in prompts])
    for p, text in zip(prompts, got):
        ids = torch.tensor([encode_pair(tok, p, "", task.max_length)[0]])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]


def test_arith_through_lm_eval_equals_evaluator(tiny):
    """The exported generate_until task (stop, length, first-integer filter) end to end."""
    model, tok = tiny
    task = get_task("arith").from_options({"n_eval": 4})
    ours = task.evaluate(model, tok, batch_size=4).metrics["exact_match"]
    lm = LorabenchLM(model=model, tokenizer=tok, batch_size=4, max_length=task.max_length)
    row = evaluate(lm, ["arith"], task_options={"n_eval": 4})["results"]["lorabench_arith"]
    assert row["sample_len"] == 4 and row["exact_match,first-integer"] == ours


def test_chat_template(tiny):
    model, tok = tiny
    lm = LorabenchLM(model=model, tokenizer=tok)
    text = lm.apply_chat_template([{"role": "user", "content": "2+2?"}])
    assert "2+2?" in text and text.endswith("assistant\n")
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        LorabenchLM(model=model, tokenizer=plain).apply_chat_template([{"role": "user", "content": "x"}])


# -- export ----------------------------------------------------------------------------------------

def test_export_writes_the_split_and_prompt(tmp_path):
    task = get_task("quartz").from_options({"n_eval": 5})
    path = export_task(task, tmp_path)
    cfg = yaml.safe_load(path.read_text())
    assert cfg["task"] == "lorabench_quartz" and cfg["dataset_path"] == "json"
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == " "
    assert cfg["metadata"]["split_hash"] == task.split().hash
    test_file = cfg["dataset_kwargs"]["data_files"]["test"]
    assert os.path.isabs(test_file)
    rows = [json.loads(line) for line in open(test_file)]
    assert rows == task.split().eval
    # lm-eval renders the same prompt and continuations as lorabench's evaluator
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm_task = tm.load_task_or_group(["lorabench_quartz"])["lorabench_quartz"]
    doc = lm_task.test_docs()[0]
    e = task.split().eval[0]
    assert lm_task.doc_to_text(doc) == task.prompt(e)
    assert lm_task.doc_to_choice(doc) == e["choices"] and lm_task.doc_to_target(doc) == e["label"]


def test_export_cli_and_encoder_tasks_refused(tmp_path, cli):
    r = cli("export", "lm-eval-tasks", str(tmp_path), "--tasks", "quartz,arith", "--task-option", "n_eval=3")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "quartz" / "lorabench_quartz.yaml").exists()
    assert sum(1 for _ in open(tmp_path / "arith" / "test.jsonl")) == 3
    with pytest.raises(UserError, match="classification task.*quartz"):
        export_tasks(["rt-sentiment"], tmp_path)


# -- errors ----------------------------------------------------------------------------------------

def test_unknown_task_name(tiny, cli):
    model, tok = tiny
    with pytest.raises(UserError, match=r"unknown lm-eval task 'quartzz'.*Did you mean: quartz"):
        evaluate(LorabenchLM(model=model, tokenizer=tok), ["quartzz"])
    r = cli("eval", "--lm-eval", "socialiqaa", "--model", "tiny-llama")
    assert r.returncode == 2 and "unknown lm-eval task 'socialiqaa'" in r.stderr and "socialiqa" in r.stderr


def test_missing_task_file(tiny, tmp_path):
    model, tok = tiny
    get_decoder_task("quartz")
    export_tasks(["quartz"], tmp_path, options={"n_eval": 4})
    (tmp_path / "quartz" / "test.jsonl").unlink()
    lm = LorabenchLM(model=model, tokenizer=tok)
    with pytest.raises(UserError, match=r"reads .*quartz/test.jsonl, which does not exist.*export"):
        evaluate(lm, ["quartz"], tasks_dir=tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        evaluate(lm, ["quartz"], tasks_dir=tmp_path / "nowhere")


# -- suite option ----------------------------------------------------------------------------------

def test_suite_lm_eval_option_validates_and_keeps_trial_ids(tmp_path):
    import hashlib

    from lorabench.runner.suite import load_suite, trial_id
    text = ("suite: {name}\nversion: 1\ntasks:\n  - {{name: {task}, model: tiny-llama, lm_eval: {flag}}}\n"
            "methods: [lora]\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.format(name="bad", task="rt-sentiment", flag="true"))
    with pytest.raises(UserError, match=r"bad.yaml:4: lm_eval: .*classification"):
        load_suite(str(bad))
    worse = tmp_path / "worse.yaml"
    worse.write_text(text.format(name="worse", task="quartz", flag="yes please"))
    with pytest.raises(UserError, match="lm_eval must be true or false"):
        load_suite(str(worse))
    plain = tmp_path / "plain.yaml"
    plain.write_text(text.format(name="plain", task="quartz", flag="false"))
    spec = load_suite(str(plain)).trials()[0]
    # the id before the option existed (and before the scenarios' `federated`, `cross_task`, `continual` and
    # `mixture`, and the reuse protocol's `reuse`, None here)
    legacy = {k: v for k, v in asdict(spec).items()
              if k not in ("lm_eval", "federated", "cross_task", "continual", "mixture", "reuse")}
    assert trial_id(spec) == hashlib.sha256(json.dumps(legacy, sort_keys=True, separators=(",", ":"))
                                            .encode()).hexdigest()[:16]
    on = tmp_path / "enabled.yaml"
    on.write_text(text.format(name="enabled", task="quartz", flag="true"))
    spec_on = load_suite(str(on)).trials()[0]
    assert spec_on.lm_eval and trial_id(spec_on) != trial_id(spec)


def test_trial_records_lm_eval_results():
    from lorabench.harness.trial import TrialSpec, run_trial
    spec = TrialSpec(suite="t", suite_version=1, label="lora", method="lora", task="quartz",
                     task_options={"n_train": 8, "n_eval": 8}, model="tiny-llama", seed=0,
                     train={"steps": 2, "batch_size": 4, "eval_batch_size": 8}, lm_eval=True)
    out = run_trial(spec, progress=False)
    row = out["lm_eval"]["results"]["lorabench_quartz"]
    assert row["sample_len"] == 8
    assert row["acc,none"] == out["metrics"]["accuracy"]
    json.dumps(out)  # goes into a JSONL record as is
