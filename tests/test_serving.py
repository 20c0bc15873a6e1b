"""Serving many adapters (lorabench/serving): adapter formats, the LRU store, and the multi-adapter
model, whose logits per request in a mixed batch must equal those of the base model with that
request's adapter merged alone (W + s B A)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorabench.ops import available_backends
from lorabench.serving import (AdapterStore, MultiLoraModel, load_adapter, random_adapter, save_lorabench_adapter,
                               save_peft_adapter)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not available_backends()[b][0],
                                                     reason=available_backends()[b][1]))
            for b in ("reference", "cpu")]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def shapes_of(model, targets):
    return {n: (m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets}


def merged(base, adapter):
    """The base model with `adapter` merged: W <- W + s B A (eq. (3) of LoRA, merged for inference)."""
    m = copy.deepcopy(base)
    with torch.no_grad():
        for p in adapter.weights:
            m.get_submodule(p).weight += adapter.delta(p).to(m.get_submodule(p).weight.dtype)
    return m


@pytest.fixture(scope="module")
def setup():
    base = tiny_llama()
    shapes = shapes_of(base, ALL_LINEAR)
    # heterogeneous ranks, also within one adapter (every module a different rank for "mixed")
    mixed = {p: 1 + (7 * i) % 32 for i, p in enumerate(shapes)}
    adapters = [random_adapter("r1", shapes, 1, 2.0, seed=1, std=0.3),
                random_adapter("r8", shapes, 8, 16.0, seed=2, std=0.3),
                random_adapter("r32", shapes, 32, 16.0, seed=3, std=0.3),
                random_adapter("mixed", shapes, mixed, 8.0, seed=4, std=0.3),
                random_adapter("qv", {p: s for p, s in shapes.items() if p.endswith(("q_proj", "v_proj"))}, 4, 8.0,
                               seed=5, std=0.3)]
    return base, adapters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq_len", [1, 6], ids=["decode-bgmv", "prefill-sgmv"])
def test_mixed_batch_equals_each_adapter_merged_alone(setup, backend, seq_len):
    base, adapters = setup
    model = MultiLoraModel(copy.deepcopy(base), target_modules=ALL_LINEAR, capacity=3, max_rank=32, backend=backend)
    for a in adapters:
        model.add_adapter(a)
    g = torch.Generator().manual_seed(seq_len)
    by_name = {a.name: a for a in adapters}
    # two batches, 3 slots: the second batch evicts adapters of the first
    for names in (["r8", None, "mixed", "r8", "r1"], ["qv", "r32", "qv", None, "r1", "r32"]):
        ids = torch.randint(0, 97, (len(names), seq_len), generator=g)
        with torch.no_grad():
            logits = model(ids, adapter_names=names).logits  # (B, S, vocab)
            for b, name in enumerate(names):
                alone = (merged(base, by_name[name]) if name else base)(ids[b:b + 1]).logits[0]
                torch.testing.assert_close(logits[b], alone, rtol=1e-4, atol=1e-4)
                if name:  # the adapter changes the output: the equality is not vacuous
                    assert (alone - base(ids[b:b + 1]).logits[0]).abs().max() > 1e-2
    assert model.store.evictions >= 2


def test_no_adapters_is_the_base_model(setup):
    base, adapters = setup
    model = MultiLoraModel(copy.deepcopy(base), target_modules=ALL_LINEAR, capacity=2, max_rank=32)
    model.add_adapter(adapters[0])
    ids = torch.randint(0, 97, (3, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=[None] * 3).logits, base(ids).logits)
        torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_both_formats_load_the_same_adapter(setup, tmp_path):
    base, adapters = setup
    a = adapters[1]
    save_lorabench_adapter(a, str(tmp_path / "a.safetensors"), alpha=16.0)
    save_peft_adapter(a, str(tmp_path / "peft_a"), alpha=16.0)
    for loaded in (load_adapter(str(tmp_path / "a.safetensors")), load_adapter(str(tmp_path / "peft_a"))):
        assert set(loaded.weights) == set(a.weights)
        for p in a.weights:
            torch.testing.assert_close(loaded.delta(p), a.delta(p))
    assert load_adapter(str(tmp_path / "a.safetensors")).name == "a"


def test_peft_adapter_matches_peft(setup, tmp_path):
    """A PEFT adapter with per-module ranks (rank_pattern) served by us gives PEFT's own logits."""
    from peft import PeftModel
    base, adapters = setup
    save_peft_adapter(adapters[3], str(tmp_path / "mixed"), alpha=8.0)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "mixed")).eval()
    model = MultiLoraModel(copy.deepcopy(base), target_modules=ALL_LINEAR, capacity=2, max_rank=32)
    name = model.load_adapter(str(tmp_path / "mixed"))
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, adapter_names=[name, None]).logits[0], peft_model(ids[:1]).logits[0],
                                   rtol=1e-4, atol=1e-4)


def test_adapter_saved_by_lorabench_lora_method(tmp_path):
    """The file `lora`'s save_adapter writes serves with the logits of that LoRA model."""
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    base = tiny_llama(1)
    method = get_method("lora").from_options({"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]})
    lora_model = method.apply(copy.deepcopy(base), ApplyContext(architecture="llama", head_modules=[]))
    with torch.no_grad():
        for n, p in lora_model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.3)  # B starts at 0: make the update visible
    method.save_adapter(lora_model, str(tmp_path / "trained.safetensors"))
    model = MultiLoraModel(copy.deepcopy(base), target_modules=("q_proj", "v_proj"), capacity=1, max_rank=8)
    model.load_adapter(str(tmp_path / "trained.safetensors"), name="trained")
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        expected = lora_model.eval()(ids).logits
        torch.testing.assert_close(model(ids, adapter_names=["trained"]).logits, expected, rtol=1e-4, atol=1e-4)
        assert (expected - base(ids).logits).abs().max() > 1e-2


def test_store_is_lru_and_bounded_by_host_memory(setup):
    base, adapters = setup
    store = AdapterStore(shapes_of(base, ALL_LINEAR), capacity=2, max_rank=32)
    for a in adapters:
        store.add(a)
    assert len(store) == 5  # more adapters than fast-memory slots
    s = store.slots(["r1", "r8", "r1"])
    assert s[0] == s[2] != s[1] and store.loads == 2
    store.slots(["r1"])                        # r1 becomes the most recently used
    store.slots(["r32", None])                 # evicts r8, the least recently used
    assert store.resident == ["r1", "r32"] and store.evictions == 1
    assert int(store.slots([None])[0]) == -1
    # a slot keeps the rows of its previous, larger adapter past the new rank: they must be ignored
    slot = int(store.slots(["mixed"])[0])
    p = next(iter(store.modules))
    assert int(store.ranks[p][slot]) == adapters[3].weights[p][0].shape[0]
    qv_only = [p for p in store.modules if not p.endswith(("q_proj", "v_proj"))][0]
    slot = int(store.slots(["qv"])[0])
    assert int(store.ranks[qv_only][slot]) == 0  # modules an adapter does not adapt get rank 0


def test_store_errors_name_the_problem(setup):
    base, adapters = setup
    store = AdapterStore(shapes_of(base, ALL_LINEAR), capacity=2, max_rank=8)
    with pytest.raises(ValueError, match="exceeds the store's max_rank 8"):
        store.add(adapters[2])
    for a in adapters[:2]:
        store.add(a)
    with pytest.raises(KeyError, match="unknown adapters"):
        store.slots(["r1", "nope"])
    store.add(random_adapter("third", shapes_of(base, ALL_LINEAR), 2, 4.0, seed=9))
    with pytest.raises(ValueError, match="3 distinct adapters but the store has 2"):
        store.slots(["r1", "r8", "third"])
    with pytest.raises(ValueError, match="does not target"):
        store.add(random_adapter("lm", {"lm_head": (64, 97)}, 2, 4.0, seed=0))
    with pytest.raises(ValueError, match="no nn.Linear named"):
        MultiLoraModel(tiny_llama(), target_modules=("qproj",))
    with pytest.raises(FileNotFoundError, match="no adapter at"):
        load_adapter("/nonexistent/adapter.safetensors")


def test_store_fills_free_slots_at_add_and_loads_a_batch_together(setup):
    base, adapters = setup
    store = AdapterStore(shapes_of(base, ALL_LINEAR), capacity=3, max_rank=32)
    for a in adapters:
        store.add(a)
    assert store.resident == ["r1", "r8", "r32"] and store.loads == 3  # free slots filled at add
    store.slots(["r32", "r1"])
    assert store.loads == 3 and store.hits == 2 and store.resident == ["r8", "r32", "r1"]
    slots = store.slots(["mixed", "qv", "r1", None])  # two misses in one batch: evict r8, then r32
    assert store.loads == 5 and store.evictions == 2 and store.resident == ["mixed", "qv", "r1"]
    for name, slot in zip(["mixed", "qv", "r1"], slots.tolist()):
        a = next(x for x in adapters if x.name == name)
        for p in store.modules:
            if p not in a.weights:
                assert int(store.ranks[p][slot]) == 0
                continue
            A, B = a.weights[p]
            r = A.shape[0]
            assert int(store.ranks[p][slot]) == r and float(store.scales[p][slot]) == pytest.approx(a.scales[p])
            torch.testing.assert_close(store.A[p][slot, :r], A, rtol=0, atol=0)
            torch.testing.assert_close(store.B[p][slot, :, :r], B, rtol=0, atol=0)
