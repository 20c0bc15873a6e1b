"""LoraRetriever (arXiv 2402.09997, issue 17): retrieval by cosine similarity to each adapter's mean example
embedding, the two compositions of the retrieved adapters (mixture: the exact mean of their outputs; fusion: the
mean of their parameters), and the leave-one-task-out protocol scoring every input with its own retrieved set."""
from __future__ import annotations

import pytest
import torch

from lorabench.methods import get_method
from lorabench.methods.cross_task.base import factorwise
from lorabench.methods.cross_task.loraretriever import adapter_embeddings, retrieve
from lorabench.methods.cross_task.merging import exact_delta, merge_error
from tests.test_cross_task import SCALE, close, cross_task_spec, library, tiny_library  # noqa: F401 (fixture)


def test_retrieval_takes_the_top_k_adapters_by_cosine_similarity():
    adapters = torch.eye(3) * torch.tensor([[1.0], [5.0], [0.2]])      # scale does not matter: cosine
    queries = torch.tensor([[0.1, 1.0, 0.0], [0.9, 0.5, 0.1], [0.0, 0.1, 3.0]])
    assert retrieve(queries, adapters, 1) == [(1,), (0,), (2,)]
    assert retrieve(queries, adapters, 2) == [(0, 1), (0, 1), (1, 2)]
    with pytest.raises(ValueError, match="more than the 3 candidate adapters"):
        retrieve(queries, adapters, 4)


def test_an_adapter_is_embedded_as_the_mean_of_its_examples():
    ex = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 0.0]])]
    e = adapter_embeddings(ex)
    torch.testing.assert_close(e, torch.tensor([[2 ** -0.5, 2 ** -0.5], [1.0, 0.0]]))


def test_mixture_is_the_exact_mean_update_and_fusion_the_mean_of_the_factors():
    states = library(4)
    mix = get_method("loraretriever").from_options({"rank": 2})
    out = mix.compose_retrieved(states, (1, 3), SCALE)
    assert merge_error(out, exact_delta([states[1], states[3]], [0.5, 0.5], SCALE)) < 1e-6
    fus = get_method("loraretriever").from_options({"rank": 2, "composition": "fusion"})
    close(fus.compose_retrieved(states, (1, 3), SCALE), factorwise([states[1], states[3]], [0.5, 0.5], SCALE))
    assert merge_error(fus.compose_retrieved(states, (1, 3), SCALE),
                       exact_delta([states[1], states[3]], [0.5, 0.5], SCALE)) > 0.1   # cross terms B_1 A_3
    with pytest.raises(ValueError, match="not one of LoraRetriever's: mixture, fusion"):
        get_method("loraretriever").from_options({"composition": "average"})
    with pytest.raises(ValueError, match="composes per input"):
        mix.compose(states, SCALE, lambda s: 0.0, seed=0)


def test_every_input_is_scored_with_the_adapters_it_retrieved(tiny_library):
    """Held-out imdb-mc (movie reviews) on tiny-llama, candidates quartz, sarcasm-mc and rt-mc, real MiniLM
    embeddings, k = 2: most reviews retrieve rt-mc's adapter (movie reviews too), and each input's prediction is the
    one the mixture of its own two retrieved adapters makes on it."""
    from lorabench import assets
    from lorabench.harness.cross_task import Composer
    from lorabench.harness.multitask import load_library_adapter
    from lorabench.harness.trial import run_trial
    from lorabench.methods.cross_task.base import layer_prefixes
    from lorabench.methods.cross_task.uniform_average import concatenated
    from lorabench.tasks import get_task
    spec = cross_task_spec("loraretriever", {"top_k": 2, "adapter_examples": 6},
                           pool=["quartz", "sarcasm-mc", "rt-mc", "imdb-mc"])
    spec.task, spec.task_options = "imdb-mc", {"n_eval": 6, "max_length": 48}   # short rows: a fast tiny-llama eval
    rec = run_trial(spec, progress=False)
    ct = rec["cross_task"]
    assert ct["candidates"] == ["quartz", "sarcasm-mc", "rt-mc"] and ct["loss_evaluations"] == 0
    ret = ct["info"]["retrieval"]
    per_input = ret["per_input"]
    assert len(per_input) == rec["n_eval"] == 6 and all(len(s) == 2 for s in per_input)
    assert ret["retrieved_fraction"]["rt-mc"] > 0.5, ret
    assert sum(g["inputs"] for g in ret["sets"]) == 6
    assert ct["weights"] == pytest.approx([sum(i in s for s in per_input) / 12 for i in range(3)])   # 1/k per input
    assert ct["baselines"]["zero-shot"]["outcomes"]["hash"] == rec["outcomes"]["hash"]   # the same eval inputs
    # each input's prediction is the one of the mixture of its retrieved pair, scored on the whole eval part
    loaded = assets.load_model("tiny-llama", head="causal-lm", seed=0)
    task = get_task("imdb-mc").from_options(spec.task_options)
    states = [load_library_adapter(tiny_library / f"{ct['library'][t]}.safetensors") for t in ct["candidates"]]
    composer = Composer(loaded.model, layer_prefixes(states[0]), 4)
    preds = {}
    for pair in {tuple(s) for s in per_input}:
        mixture = concatenated([states[i] for i in pair], [0.5, 0.5], 2.0)   # scale alpha / rank = 4 / 2
        preds[pair] = task.evaluate(composer.load(mixture), loaded.tokenizer, 16).outcomes.pred
    assert rec["outcomes"]["pred"] == "".join(str(preds[tuple(s)][i]) for i, s in enumerate(per_input))
