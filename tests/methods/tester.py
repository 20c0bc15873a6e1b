"""The shared methods tester: one table of cases (`cases_*.py`) crossed with these checks.

Every registered method must have at least one case. The checks run on tiny random BERT
(sequence classification) and Llama (causal LM) models built from configs, so they are fast
and need no download. A case may add `equations`: a callable checking the paper's defining
equations on small tensors (it receives the applied model and the method).
"""
from __future__ import annotations

import copy
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from lorabench.methods.base import ApplyContext, load_adapter

VOCAB = 96


@dataclass
class Case:
    method: str
    options: dict = field(default_factory=dict)
    id: str | None = None
    models: tuple[str, ...] = ("bert", "llama")   # which tiny models to run on
    identity_at_init: bool = True     # adapted model == base model before training (B = 0 and friends)
    lr: float = 1e-2                  # large enough that one step visibly moves every trained tensor
    equations: Callable | None = None  # paper-equation check on small tensors
    atol: float = 1e-5

    @property
    def name(self) -> str:
        return self.id or self.method


def tiny_model(kind: str, seed: int = 0) -> tuple[nn.Module, ApplyContext]:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
        model = BertForSequenceClassification(cfg)
        ctx = ApplyContext("bert", ["classifier"], seed)
    else:
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                          tie_word_embeddings=True, pad_token_id=0)
        model = LlamaForCausalLM(cfg)
        ctx = ApplyContext("llama", [], seed)
    return model.eval(), ctx


def batch_for(kind: str, seed: int = 1, n: int = 4, t: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 3:] = 0  # one padded row
    labels = torch.randint(0, 2, (n,), generator=g) if kind == "bert" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def logits(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


class RandomTask:
    """The smallest task the harness accepts: random batches, so the hooks run in a real loop."""
    name = "random"

    def __init__(self, kind: str):
        self.kind = kind

    def train_batches(self, tokenizer, batch_size, seed):
        s = seed
        while True:
            s += 1
            yield batch_for(self.kind, seed=s, n=batch_size)


def applied(case: Case, kind: str):
    base, ctx = tiny_model(kind)
    original = copy.deepcopy(base)
    torch.manual_seed(0)
    method = get_method(case.method).from_options(case.options)
    model = method.apply(base, ctx)
    return original, model, method, ctx


def check_forward(case: Case, kind: str) -> None:
    original, model, method, _ = applied(case, kind)
    b = batch_for(kind)
    out, ref = logits(model, b), logits(original, b)
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    if case.identity_at_init:
        torch.testing.assert_close(out, ref, atol=case.atol, rtol=1e-4)


def check_training_changes_only_trainable(case: Case, kind: str) -> None:
    _, model, method, _ = applied(case, kind)
    trainable = {n for n, _ in method.trainable_parameters(model)}
    assert trainable, "the method trains nothing"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(steps=3, batch_size=4, lr=case.lr, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    result = train(model, method, RandomTask(kind), None, cfg, seed=0, progress=False)
    assert result.steps == 3 and result.final_loss is not None
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    frozen_changed = changed - trainable
    assert not frozen_changed, f"frozen parameters changed: {sorted(frozen_changed)[:5]}"
    assert changed, "training changed no parameter"


def check_merge(case: Case, kind: str) -> None:
    _, model, method, _ = applied(case, kind)
    if not method.mergeable:
        return
    # Move the adapter away from its identity init so that merging is not trivially a no-op.
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    b = batch_for(kind)
    unmerged = logits(model, b)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    method.merge(model)
    torch.testing.assert_close(logits(model, b), unmerged, atol=1e-4, rtol=1e-4)
    assert any(not torch.equal(weights[n], p) for n, p in model.named_parameters() if n in weights), \
        "merge did not change any base weight"
    method.unmerge(model)
    torch.testing.assert_close(logits(model, b), unmerged, atol=1e-4, rtol=1e-4)
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p.detach(), weights[n], atol=1e-5, rtol=1e-5)


def check_save_load(case: Case, kind: str, tmp_path) -> None:
    _, model, method, _ = applied(case, kind)
    with torch.no_grad():
        for _, p in method.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.05)
    b = batch_for(kind)
    expected = logits(model, b)
    path = os.path.join(tmp_path, f"{case.name}-{kind}.safetensors")
    size = method.save_adapter(model, path)
    assert size == os.path.getsize(path) > 0
    fresh, ctx = tiny_model(kind)  # the same base weights (same seed)
    random.seed(123)
    torch.manual_seed(123)  # a different RNG state: loading must not depend on re-drawing the init
    loaded, _ = load_adapter(fresh, path, ctx)
    torch.testing.assert_close(logits(loaded, b), expected, atol=1e-5, rtol=1e-5)


def train_tiny(name: str, options: dict, steps: int = 20, kind: str = "llama"):
    """Apply method `name` to the tiny `kind` model (seed 0) and train it `steps` steps through the real
    loop (lorabench/harness/train.py) on RandomTask at a constant lr 5e-3: (model, method, TrainResult)."""
    model, ctx = tiny_model(kind)
    torch.manual_seed(0)
    method = get_method(name).from_options(options)
    model = method.apply(model, ctx)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=5e-3, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    result = train(model, method, RandomTask(kind), None, cfg, seed=0, progress=False)
    return model, method, result
