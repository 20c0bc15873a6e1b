"""PILLOW (arXiv 2312.05621) through the harness on real tasks with the tiny test models: LoRA first,
then the matcher's RL with LoRA frozen, its rewards and choices in the record, demonstrations prepended
at evaluation (so the model's outputs differ from LoRA's at the same seed), and the pool and matcher
saved with the adapter."""
import pytest
import torch

from lorabench import assets
from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from lorabench.methods.base import ApplyContext, load_adapter
from lorabench.methods.combining.pillow import prepend, sample_without_replacement
from lorabench.tasks import get_task


def setup(task_name, model_name, method_name, options, steps=8):
    task = get_task(task_name).from_options({"n_train": 64, "n_eval": 8})
    torch.manual_seed(0)
    loaded = assets.load_model(model_name, head=task.head, num_labels=task.num_labels, seed=0)
    head = ["classifier"] if task.head == "seq-cls" else []
    ctx = ApplyContext(loaded.model.config.model_type, head, 0)
    method = get_method(method_name).from_options(options)
    model = method.apply(loaded.model, ctx)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train(model, method, task, loaded.tokenizer, cfg, seed=0, progress=False)
    return task, loaded.tokenizer, model, method, result, before, ctx


@pytest.mark.parametrize("task_name,model_name", [("quartz", "tiny-llama"), ("rt-sentiment", "tiny-bert")])
def test_pillow_trains_the_matcher_with_lora_frozen_and_prompts_at_evaluation(task_name, model_name, tmp_path):
    task, tok, model, method, result, before, ctx = setup(
        task_name, model_name, "pillow", {"rank": 4, "pool_size": 6, "policy_ratio": 0.5, "policy_lr": 0.1})
    m = result.method_metrics
    assert m["prompt_matching"] is True and m["pool_size"] == 6 and m["rl_steps"] == 4
    assert sum(m["selected_counts"]) == 4 * 4                      # one demonstration per query, 4 queries a step
    assert m["policy_entropy_first"] <= m["max_entropy"] + 1e-6
    assert "reward_greedy" in m and "reward_random" in m
    matcher = model.pillow_matcher
    assert matcher.active and int(matcher.pool_len.min()) > 0
    assert not torch.equal(matcher.W.detach(), torch.zeros_like(matcher.W))    # the policy learnt
    # LoRA changed in stage 1 only: a second run with the RL stage's LoRA updates would differ; here we check
    # that the matcher's steps left every LoRA tensor as it was after stage 1
    lora_model = setup(task_name, model_name, "lora", {"rank": 4}, steps=4)[2]
    for (n, p), (_, q) in zip(method.trainable_parameters(model), get_method("lora").from_options({}).
                              trainable_parameters(lora_model)):
        if "lora_" in n or "classifier" in n:
            torch.testing.assert_close(p.detach(), q.detach(), msg=n)
    # evaluation prepends the matcher's demonstrations: the outputs differ from the same LoRA's without them
    batch = task.collate(task.split().eval[:3], tok)
    batch.pop("labels")
    with torch.no_grad():
        prompted = model(**batch).logits
        matcher.active = False
        plain = model(**batch).logits
        matcher.active = True
    assert prompted.shape == plain.shape and not torch.allclose(prompted, plain, atol=1e-5)
    # the pool and the matcher travel with the adapter
    path = str(tmp_path / "pillow.safetensors")
    method.save_adapter(model, path)
    fresh = assets.load_model(model_name, head=task.head, num_labels=task.num_labels, seed=0).model
    loaded, _ = load_adapter(fresh, path, ctx)
    if task.head == "seq-cls":  # the head is trained too; the tiny model's fresh head differs
        loaded.classifier.load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, prompted, atol=1e-5, rtol=1e-5)


def test_prepend_and_sequential_choice():
    # a causal row: [pad.., demo, x] with positions following the mask and the prefix ignored by the loss
    batch = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
             "labels": torch.tensor([[-100, 6, 7], [-100, 9, -100]])}
    out, P = prepend(batch, [torch.tensor([1, 2]), torch.tensor([3])], causal=True)
    assert P == 2
    assert out["input_ids"].tolist() == [[1, 2, 5, 6, 7], [0, 3, 8, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 0]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 2]]
    assert out["labels"].tolist() == [[-100, -100, -100, 6, 7], [-100, -100, -100, 9, -100]]
    # a classifier keeps [CLS] first
    out, _ = prepend({"input_ids": torch.tensor([[101, 7, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)},
                     [torch.tensor([4, 102])], causal=False)
    assert out["input_ids"].tolist() == [[101, 4, 102, 7, 102]]
    # k choices without replacement; log π is the sum of the sequential log-softmaxes
    logits = torch.tensor([[3.0, 1.0, 0.0]])
    idx, logp, ent = sample_without_replacement(logits, 2, greedy=True)
    assert idx.tolist() == [[0, 1]]
    expected = torch.log_softmax(logits, -1)[0, 0] + torch.log_softmax(torch.tensor([1.0, 0.0]), -1)[0]
    torch.testing.assert_close(logp[0], expected)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(ent[0], -(p * p.log()).sum())
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx, _, _ = sample_without_replacement(torch.zeros(1, 4), 3, g)
        assert len(set(idx[0].tolist())) == 3


def test_pillow_rejects_generation_tasks():
    from types import SimpleNamespace
    task = get_task("arith").from_options({"n_train": 64, "n_eval": 8})
    state = SimpleNamespace(model=None, metrics={}, total_steps=4)
    with pytest.raises(ValueError, match="pillow supports tasks of kind classification, multiple-choice"):
        next(get_method("pillow").from_options({}).train_batches(state, task, None, 4, 0))
