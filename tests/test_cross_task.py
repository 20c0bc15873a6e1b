"""The cross-task family's composition rules and merges (issue 17) on small library adapters: each rule's
defining equation (LoRAHub's COMPOSE and ADAPT, the arithmetic operators, the uniform average), the exact
merge's error (zero up to rounding), equality with peft's add_weighted_adapter where it computes the same
(svd, cat), and the error of peft's factor-wise merges."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.cross_task.base import delta_weights, factorwise
from lorabench.methods.cross_task.lora_arithmetic import negated
from lorabench.methods.cross_task.merging import PEFT_TYPES, exact_delta, exact_merge, merge_error, peft_merge
from lorabench.methods.cross_task.uniform_average import concatenated

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
SCALE = 2.0


def library(n=3, rank=2, out=6, inp=5, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{**{f"{p}.lora_A": torch.randn(rank, inp, generator=g) for p in LAYERS},
             **{f"{p}.lora_B": torch.randn(out, rank, generator=g) for p in LAYERS}} for _ in range(n)]


def close(a: dict, b: dict, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].double(), b[k].double(), **kw)


# -- LoRAHub (arXiv 2307.13269) --------------------------------------------------------------------------

def test_factorwise_is_lorahubs_compose_step():
    states, w = library(), [0.5, -1.0, 0.25]
    out = factorwise(states, w, SCALE)
    for p in LAYERS:
        A = sum(wi * s[f"{p}.lora_A"] for wi, s in zip(w, states))
        B = sum(wi * s[f"{p}.lora_B"] for wi, s in zip(w, states))
        torch.testing.assert_close(out[f"{p}.lora_A"], A)
        torch.testing.assert_close(out[f"{p}.lora_B"], SCALE * B)   # the scale s folded into B
    # factor-wise is not the weighted sum of the products: the cross terms B_i A_j stay
    assert merge_error(out, exact_delta(states, w, SCALE)) > 0.1


def target_loss(states, target_w):
    """A k-shot loss stand-in whose minimum is the composition at `target_w`: the distance of the composed
    update to that composition's update."""
    want = delta_weights(factorwise(states, target_w, SCALE))

    def loss(state):
        got = delta_weights(state)
        return float(sum((got[p] - want[p]).pow(2).sum() for p in want) / sum(want[p].pow(2).sum() for p in want))
    return loss


def test_lorahub_finds_weights_that_lower_the_kshot_loss():
    states, target_w = library(), [0.9, 0.0, -0.6]
    loss = target_loss(states, target_w)
    method = get_method("lorahub").from_options({"budget": 60})
    comp = method.compose(states, SCALE, loss, seed=0)
    assert comp.loss_evaluations == 60
    assert all(-1.5 <= x <= 1.5 for x in comp.weights)
    start = method.objective(np.zeros(3), states, SCALE, loss)     # LoRAHub starts at w = 0
    got = method.objective(np.asarray(comp.weights), states, SCALE, loss)
    assert got < 0.5 * start, (got, start, comp.weights)
    close(comp.state, factorwise(states, comp.weights, SCALE))     # the composed adapter is COMPOSE(w)
    assert comp.info["objective"] == pytest.approx(got, abs=1e-6)


def test_lorahub_objective_is_the_loss_plus_the_l1_term():
    states = library()
    method = get_method("lorahub").from_options({"l1": 0.05})
    w = np.array([0.3, -1.2, 0.0])
    loss = target_loss(states, [1.0, 0.0, 0.0])
    assert method.objective(w, states, SCALE, loss) == pytest.approx(
        loss(factorwise(states, w.tolist(), SCALE)) + 0.05 * np.abs(w).mean())
    # a heavy L1 term pulls the weights towards 0
    free = get_method("lorahub").from_options({"budget": 60, "l1": 0.0}).compose(states, SCALE, loss, seed=0)
    heavy = get_method("lorahub").from_options({"budget": 60, "l1": 50.0}).compose(states, SCALE, loss, seed=0)
    assert np.abs(heavy.weights).sum() < 0.5 * np.abs(free.weights).sum(), (heavy.weights, free.weights)


def test_lorahub_seeds_and_bad_options():
    states = library()
    loss = target_loss(states, [0.5, 0.5, 0.5])
    a = get_method("lorahub").from_options({"budget": 20}).compose(states, SCALE, loss, seed=0)
    b = get_method("lorahub").from_options({"budget": 20}).compose(states, SCALE, loss, seed=0)
    assert a.weights == b.weights   # seeded: reproducible
    with pytest.raises(ValueError, match="unknown nevergrad optimiser"):
        get_method("lorahub").from_options({"optimizer": "NoSuchOpt"}).compose(states, SCALE, loss, seed=0)


# -- adapter arithmetic (arXiv 2306.14870) ---------------------------------------------------------------

def test_negation_operator_negates_the_update():
    s = library(1)[0]
    close(delta_weights(negated(s)), {p: -d for p, d in delta_weights(s).items()})
    for p in LAYERS:   # (A, -B): A unchanged
        assert torch.equal(negated(s)[f"{p}.lora_A"], s[f"{p}.lora_A"])


def test_arithmetic_adds_with_designed_weights_and_picks_lambda_on_the_kshot_loss():
    states = library()
    # the loss is lowest at λ = 2 of the design (0.5, 0.25, -0.25 with adapter 2 negated)
    loss = target_loss([states[0], states[1], negated(states[2])], [1.0, 0.5, 0.5])
    method = get_method("lora-arithmetic").from_options({"weights": [0.5, 0.25, 0.25], "negate": [2],
                                                         "lambda_grid": [0.5, 1.0, 2.0]})
    comp = method.compose(states, SCALE, loss, seed=0)
    assert comp.info["lambda"] == 2.0 and comp.loss_evaluations == 3
    assert comp.weights == [1.0, 0.5, -0.5]
    close(comp.state, factorwise([states[0], states[1], negated(states[2])], [1.0, 0.5, 0.5], SCALE))
    assert comp.info["kshot_loss"] == pytest.approx(0.0, abs=1e-6)


def test_arithmetic_rejects_a_design_that_does_not_fit_the_library():
    states, loss = library(), (lambda s: 0.0)
    with pytest.raises(ValueError, match="weights has 2 entries for a library of 3"):
        get_method("lora-arithmetic").from_options({"weights": [0.5, 0.5]}).compose(states, SCALE, loss, 0)
    with pytest.raises(ValueError, match="outside the library"):
        get_method("lora-arithmetic").from_options({"negate": [3]}).compose(states, SCALE, loss, 0)


# -- uniform average -------------------------------------------------------------------------------------

def test_uniform_average_is_the_exact_mean_update():
    states = library(4)
    comp = get_method("uniform-average").from_options({"rank": 2}).compose(states, SCALE, lambda s: 1 / 0, seed=0)
    assert comp.loss_evaluations == 0 and comp.weights == [0.25] * 4
    assert comp.state[f"{LAYERS[0]}.lora_A"].shape == (8, 5)          # rank N r
    mean = exact_delta(states, [0.25] * 4, SCALE)
    assert merge_error(comp.state, mean) < 1e-6


# -- merging against the exact weighted sum and against peft ------------------------------------------------

def test_exact_merge_has_zero_error_up_to_rounding():
    states, w = library(3, rank=2, out=8, inp=7), [0.7, -0.2, 0.4]
    exact = exact_delta(states, w, SCALE)
    assert merge_error(exact_merge(states, w, SCALE, rank=6), exact) < 1e-6     # rank Σ r_i = 6: exact
    assert merge_error(concatenated(states, w, SCALE), exact) < 1e-6
    truncated = merge_error(exact_merge(states, w, SCALE, rank=2), exact)
    assert 1e-3 < truncated < 1                                                   # rank 2 of a rank-6 sum: lossy


@pytest.mark.parametrize("rank", [2, 6])
def test_exact_merge_equals_peft_svd(rank):
    states, w = library(3, rank=2, out=8, inp=7), [0.7, -0.2, 0.4]
    ours = delta_weights(exact_merge(states, w, SCALE, rank))
    theirs = delta_weights(peft_merge(states, w, SCALE, "svd", svd_rank=rank))
    close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_uniform_average_equals_peft_cat():
    states = library(3)
    w = [1 / 3] * 3
    close(delta_weights(concatenated(states, w, SCALE)), delta_weights(peft_merge(states, w, SCALE, "cat")),
          rtol=1e-5, atol=1e-6)


def test_peft_linear_is_factorwise_with_sqrt_weights():
    """peft's `linear`: Σ sqrt(w_i s) A_i and Σ sqrt(w_i s) B_i, hence cross terms; exact for one adapter."""
    states, w = library(3), [0.5, 0.3, 0.2]
    merged = peft_merge(states, w, SCALE, "linear")
    sq = [np.sqrt(x * SCALE) for x in w]
    for p in LAYERS:
        A = sum(c * s[f"{p}.lora_A"] for c, s in zip(sq, states))
        B = sum(c * s[f"{p}.lora_B"] for c, s in zip(sq, states))
        torch.testing.assert_close(merged[f"{p}.lora_B"] @ merged[f"{p}.lora_A"], B @ A, rtol=1e-4, atol=1e-5)
    assert merge_error(merged, exact_delta(states, w, SCALE)) > 0.1
    one = library(1)
    assert merge_error(peft_merge(one, [0.8], SCALE, "linear"), exact_delta(one, [0.8], SCALE)) < 1e-6


def test_every_peft_merge_error_is_measured():
    states, w = library(3, rank=2, out=8, inp=7), [0.5, 0.3, 0.2]
    exact = exact_delta(states, w, SCALE)
    errors = {t: merge_error(peft_merge(states, w, SCALE, t, density=0.5, svd_rank=6), exact) for t in PEFT_TYPES}
    assert all(np.isfinite(e) for e in errors.values()), errors
    assert errors["cat"] < 1e-6 and errors["svd"] < 1e-5             # exact types
    assert all(errors[t] > 1e-3 for t in PEFT_TYPES if t not in ("cat", "svd")), errors


def test_bad_merge_input():
    states = library(2)
    with pytest.raises(ValueError, match="unknown PEFT combination type"):
        peft_merge(states, [0.5, 0.5], SCALE, "average")
    with pytest.raises(ValueError, match="at least one library adapter"):
        exact_delta([], [], SCALE)
    other = library(1, rank=3)
    with pytest.raises(ValueError, match="needs one rank"):
        factorwise([states[0], other[0]], [0.5, 0.5], SCALE)


# -- the leave-one-task-out protocol (lorabench/harness/cross_task.py) ----------------------------------------

@pytest.fixture
def tiny_library(tmp_path, monkeypatch):
    """The library cache in a temporary folder (the models and data stay in LORABENCH_HOME)."""
    from lorabench.harness import cross_task, multitask
    monkeypatch.setattr(multitask, "library_dir", lambda: tmp_path / "library")
    monkeypatch.setattr(cross_task, "eval_cache_dir", lambda: tmp_path / "evals")
    return tmp_path / "library"


def cross_task_spec(method, options=None, seed=0, **ct):
    from lorabench.harness.trial import TrialSpec
    ct = {"pool": ["quartz", "sarcasm-mc", "rt-mc"], "k_shots": 3, "library_rank": 2, "library_alpha": 4.0,
          "library_steps": 2, "library_batch_size": 2, "adapters_per_job": 2, **ct}
    return TrialSpec(suite="t", suite_version=1, label=method, method=method, method_options=options or {},
                     task="quartz", task_options={"n_eval": 6}, model="tiny-llama", seed=seed,
                     train={"eval_batch_size": 16}, cross_task=ct)


def test_leave_one_task_out_trial_end_to_end(tiny_library):
    """A lorahub trial on tiny-llama: the library is trained (fused) and cached for the candidates only, the
    composition searches with its budget, and the record carries the method's score beside the baselines of
    the same seed, scored on the same eval examples."""
    from lorabench.harness.trial import run_trial
    rec = run_trial(cross_task_spec("lorahub", {"budget": 4}, kshot_lora_lr=0.02), progress=False)
    ct = rec["cross_task"]
    assert ct["held_out"] == "quartz" and ct["candidates"] == ["sarcasm-mc", "rt-mc"]
    mt = ct["baselines"]["multitask-lora"]   # the upper reference: one LoRA on every pool task, quartz's too
    # the held-out task's own adapter is not trained; the multi-task reference is, once
    assert sorted(p.stem for p in tiny_library.iterdir()) == sorted([*ct["library"].values(), mt["adapter"]])
    assert ct["loss_evaluations"] == 4 and len(ct["weights"]) == 2
    assert ct["compose_tokens"] == 4 * ct["kshot_tokens"] > 0
    assert rec["n_eval"] == 6 and 0 <= rec["score"] <= 1
    for name in ("zero-shot", "icl", "kshot-lora", "best-single", "multitask-lora"):
        b = ct["baselines"][name]
        assert 0 <= b["score"] <= 1 and b["outcomes"]["hash"] == rec["outcomes"]["hash"]
    best = ct["baselines"]["best-single"]
    assert best["adapter"] == min(best["kshot_losses"], key=best["kshot_losses"].get)
    # in context: the 3 shots before every prompt; the k-shot LoRA: 20 steps on them, its loss falling (slowly:
    # a random-init tiny-llama at rank 2; 10.89 -> 10.20 at lr 0.02)
    assert ct["baselines"]["icl"]["context_tokens"] >= ct["kshot_tokens"] > 0
    kl = ct["baselines"]["kshot-lora"]
    assert kl["steps"] == 20 and len(kl["loss_curve"]) == 20 and kl["loss_curve"][-1] < kl["loss_curve"][0] - 0.3, kl["loss_curve"]
    assert kl["train_tokens"] == 20 * ct["kshot_tokens"] and kl["trainable_params"] > 0
    # a second trial (another seed, another method) reuses the cached library: no training
    rec2 = run_trial(cross_task_spec("uniform-average", seed=1, merge_accuracy=["linear", "cat"]), progress=False)
    assert rec2["cross_task"]["library"] == ct["library"]
    assert rec2["cross_task"]["baselines"]["multitask-lora"] == mt   # trained and scored once
    assert rec2["cross_task"]["loss_evaluations"] == 0
    # the zero-shot evaluation is the same at every seed: computed once, read from the cache the second time
    assert rec2["cross_task"]["baselines"]["zero-shot"] == ct["baselines"]["zero-shot"]
    assert rec2["cross_task"]["baselines"]["icl"]["context_tokens"] > 0   # seed 1's shots: computed for it
    cached = list((tiny_library.parent / "evals").iterdir())
    # zero-shot once, the best single adapter per distinct choice, in-context and k-shot LoRA per seed (their shots)
    assert 7 <= len(cached) <= 8   # and the multi-task reference once
    again = run_trial(cross_task_spec("lorahub", {"budget": 4}, kshot_lora_lr=0.02), progress=False)["cross_task"]["baselines"]
    assert again["icl"] == ct["baselines"]["icl"] and again["kshot-lora"] == ct["baselines"]["kshot-lora"]
    assert len(list((tiny_library.parent / "evals").iterdir())) == len(cached)   # read back, not recomputed
    merges = rec2["cross_task"]["merges"]
    assert set(merges) == {"peft-linear", "peft-cat"}
    assert merges["peft-cat"]["score"] == rec2["score"]   # cat at equal weights is the exact average: same predictions
    assert merges["peft-cat"]["outcomes"]["hash"] == rec2["outcomes"]["hash"]
    errors = rec2["cross_task"]["merge_errors"]
    assert errors["exact-cat"] < 1e-6 and errors["peft-cat"] < 1e-6 and errors["peft-linear"] > 1e-3
    # the report reads them (the runner adds identity and status)
    from lorabench.report.cross_task import cross_task_frame, markdown, merge_frame
    records = [{**r, "task": "quartz", "label": m, "method": m, "seed": seed, "status": "ok"}
               for r, m, seed in ((rec, "lorahub", 0), (rec2, "uniform-average", 1))]
    frame = cross_task_frame(records)
    assert set(frame["rule"]) == {"zero-shot", "icl", "kshot-lora", "best-single", "multitask-lora", "lorahub",
                                  "uniform-average", "merge:peft-linear", "merge:peft-cat"}
    assert frame.set_index("rule").loc["zero-shot", "n_seeds"] == 2     # a baseline from every seed's record
    md = "\n".join(markdown(frame, merge_frame(records)))
    assert "| quartz | lorahub | 1 |" in md and "peft-linear" in md


def test_in_context_baseline_puts_the_shots_before_every_prompt():
    """k-shot in-context learning (LoRAHub's ICL baseline): each shot's prompt and its correct option, a blank line
    after each, then the eval prompt; the eval prompt keeps all its tokens (max_length raised by the prefix)."""
    from lorabench import assets
    from lorabench.harness.cross_task import icl_task, kshot_examples
    from lorabench.tasks import get_task
    task = get_task("quartz").from_options({"n_eval": 4}, where="t")
    tok = assets.load_model("tiny-llama", head="causal-lm").tokenizer
    shots = kshot_examples(task, 2, seed=0)
    icl, n_prefix = icl_task(task, shots, tok)
    e = task.examples("eval")[0]
    want = "".join(f"{task.prompt(s)} {s['choices'][s['label']]}\n\n" for s in shots) + task.prompt(e)
    assert icl.prompt(e) == want and task.prompt(e) != want          # the original task is untouched
    assert n_prefix == len(tok(want[:-len(task.prompt(e))], add_special_tokens=False)["input_ids"])
    assert icl.max_length == task.max_length + n_prefix + 2
    assert icl.examples("eval") == task.examples("eval")              # the same eval questions


def test_composition_table_intervals_and_average():
    """Synthetic records, 2 held-out tasks x 3 seeds: mean, interval over seeds, and the average row
    (per seed, the mean over tasks, then the interval)."""
    from lorabench.report.cross_task import cross_task_frame
    scores = {("a", 0): 0.5, ("a", 1): 0.6, ("a", 2): 0.7, ("b", 0): 0.3, ("b", 1): 0.3, ("b", 2): 0.6}
    recs = [{"status": "ok", "task": t, "label": "lorahub", "method": "lorahub", "seed": s, "score": v,
             "cross_task": {"compose_tokens": 100, "kshot_tokens": 10, "candidates": ["x", "y"],
                            "baselines": {"zero-shot": {"score": 0.25}, "best-single": {"score": 0.4}}}}
            for (t, s), v in scores.items()]
    f = cross_task_frame(recs).set_index(["held_out", "rule"])
    assert f.loc[("a", "lorahub"), "score"] == pytest.approx(0.6)
    assert f.loc[("a", "lorahub"), "best"] == pytest.approx(0.7)
    assert f.loc[("a", "lorahub"), "spread"] == pytest.approx(0.1)
    from scipy import stats as sps
    per_seed = [0.4, 0.45, 0.65]
    half = sps.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3)
    avg = f.loc[("average (2 tasks)", "lorahub")]
    assert avg["score"] == pytest.approx(np.mean(per_seed)) and avg["score_ci95"] == pytest.approx(half)
    assert f.loc[("a", "zero-shot"), "score"] == pytest.approx(0.25) and f.loc[("a", "zero-shot"), "score_ci95"] == 0
    assert f.loc[("a", "best-single"), "compose_tokens"] == 20    # k-shot tokens x candidates


def test_cross_task_suite_loads_and_refuses_what_it_cannot_run(tmp_path):
    from lorabench.errors import UserError
    from lorabench.runner.suite import load_suite, trial_id
    suite = load_suite("cross-task")
    from lorabench.methods.cross_task.base import CompositionMethod
    assert suite.cross_task is not None and {m.name for m in suite.methods} == {   # the mixtures: suites/mixture.yaml
        n for n in __import__("lorabench.methods", fromlist=["METHODS"]).METHODS.names()
        if get_method(n).family == "cross-task" and issubclass(get_method(n), CompositionMethod)}
    trials = suite.trials()
    assert len(trials) == len(suite.tasks) * len(suite.methods) * len(suite.seeds)
    assert all(t.cross_task == suite.cross_task for t in trials)
    assert len({trial_id(t) for t in trials}) == len(trials)
    bad = tmp_path / "bad.yaml"
    bad.write_text("suite: bad\nversion: 1\ntasks: [quartz]\nmethods: [lora]\ncross_task: {k_shots: 5}\n")
    with pytest.raises(UserError, match="not a cross-task method"):
        load_suite(str(bad))
    bad.write_text("suite: bad\nversion: 1\ntasks: [quartz]\nmethods: [lorahub]\ncross_task: {k_shots: 0}\n")
    with pytest.raises(UserError, match="k_shots"):
        load_suite(str(bad))
    bad.write_text("suite: bad\nversion: 1\ntasks: [quartz]\nmethods: [lorahub]\ncross_task: {merge_accuracy: [mean]}\n")
    with pytest.raises(UserError, match="unknown peft combination type"):
        load_suite(str(bad))


def test_the_multitask_reference_trains_one_lora_on_every_pool_task(tmp_path):
    """build_multitask_adapter: one LoRA on the library's layers, rank and alpha, len(tasks) x the library's steps on
    round-robin batches of every task; cached (a second call trains nothing); its id differs from every library
    adapter's and from another pool's."""
    from lorabench.harness.multitask import LibraryConfig, build_library, build_multitask_adapter, load_library_adapter
    from lorabench.harness.train import TrainConfig
    lib, cfg = LibraryConfig(rank=2, alpha=4.0), TrainConfig(steps=2, batch_size=2, lr=1e-2)
    tasks = ["quartz", "sarcasm-mc"]
    path = build_multitask_adapter(tasks, "tiny-llama", lib, cfg, root=tmp_path, progress=False)
    state = load_library_adapter(path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["library"])
    assert info["steps"] == 4 and info["tasks"] == tasks and info["variant"] == "multitask"
    library = build_library(tasks, "tiny-llama", lib, cfg, root=tmp_path / "lib")
    one = load_library_adapter(library["quartz"])
    assert sorted(state) == sorted(one)                                  # the library's layers exactly
    assert all(state[k].shape == one[k].shape for k in state)
    assert any(float(v.abs().sum()) > 0 for k, v in state.items() if k.endswith(".lora_B"))   # it trained
    mtime = path.stat().st_mtime_ns
    assert build_multitask_adapter(tasks, "tiny-llama", lib, cfg, root=tmp_path, progress=False) == path
    assert path.stat().st_mtime_ns == mtime                              # cached: not trained again
    other = build_multitask_adapter(["quartz"], "tiny-llama", lib, cfg, root=tmp_path, progress=False)
    assert other != path and path.stem not in {p.stem for p in library.values()}
