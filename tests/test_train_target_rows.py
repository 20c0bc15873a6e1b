"""The training loop's output layer at target positions only (lorabench/harness/train.py, target_rows_head): a causal
LM's loss reads the logits of the positions whose next token is a target, so the loop computes the output layer
there alone. It must change nothing: for every method of the methods table on the tiny Llama, training on batches
whose targets are a few answer tokens (as a multiple-choice task's) gives the same losses and the same trained
tensors, bit for bit, with the shortcut and without it. A method that reads the training logits elsewhere must say
so (Method.logits_everywhere_in_training), or this test names it."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lorabench.harness import train as train_mod
from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from tests.methods import tester
from tests.methods.test_methods_table import CASES

LLAMA_CASES = [c for c in CASES if "llama" in c.models]


class AnswerTask(tester.RandomTask):
    """RandomTask's batches with targets on each row's last two real tokens only (an answer after a prompt)."""
    name = "answers"

    def train_batches(self, tokenizer, batch_size, seed):
        for b in super().train_batches(tokenizer, batch_size, seed):
            labels = torch.full_like(b["input_ids"], -100)
            for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
                labels[i, n - 2:n] = b["input_ids"][i, n - 2:n]
            yield {**b, "labels": labels}


def run(case, shortcut: bool, steps: int = 4):
    model, ctx = tester.tiny_model("llama")
    torch.manual_seed(0)
    method = get_method(case.method).from_options(case.options)
    model = method.apply(model, ctx)
    calls = []
    head = model.get_output_embeddings()
    # each training call of the output layer: how many of its output rows were computed (not left at zero)
    hook = head.register_forward_hook(
        lambda m, i, o: calls.append(int((o.detach() != 0).any(-1).sum()))) if head is not None else None
    cfg = TrainConfig(steps=steps, batch_size=4, lr=case.lr, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0, loss_curve_every=1)
    with (contextlib.nullcontext() if shortcut else pytest.MonkeyPatch.context()) as mp:
        if mp is not None:
            mp.setattr(train_mod, "target_rows_head", lambda *a: contextlib.nullcontext())
        result = train(model, method, AnswerTask("llama"), None, cfg, seed=0, progress=False)
    if hook is not None:
        hook.remove()
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return result, state, calls


@pytest.mark.parametrize("case", LLAMA_CASES, ids=lambda c: c.name)
def test_training_is_the_same_with_the_output_layer_at_target_positions_only(case):
    with_shortcut, trained, _ = run(case, shortcut=True)
    without, reference, _ = run(case, shortcut=False)
    assert with_shortcut.loss_curve == without.loss_curve and with_shortcut.final_loss == without.final_loss, (
        f"{case.name}: losses differ with the output layer at target positions only; if the method reads the "
        f"training logits elsewhere, set logits_everywhere_in_training = True on its class")
    assert trained.keys() == reference.keys()
    for name, t in trained.items():
        assert torch.equal(t, reference[name]), f"{case.name}: {name} differs after training with the shortcut"


def test_the_shortcut_computes_the_answer_positions_only_and_steps_aside_where_it_must():
    lora = next(c for c in LLAMA_CASES if c.method == "lora")
    _, _, calls = run(lora, shortcut=True, steps=2)
    # 4 rows x 2 answer tokens, each predicted from the position before it: 8 of the 48 positions a step
    assert calls == [8, 8], calls
    _, _, calls = run(lora, shortcut=False, steps=2)
    assert calls == [48, 48], calls       # 4 rows x 12 positions
    # a trainable output layer (full fine-tuning trains the tied embedding) and a method that reads the logits
    for name in ("full", "hiddenkey"):
        case = next(c for c in LLAMA_CASES if c.method == name)
        _, _, calls = run(case, shortcut=True, steps=2)
        assert calls and all(n == 48 for n in calls), (name, calls)
