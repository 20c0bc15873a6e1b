"""The adapter library's fused training (lorabench/harness/multitask.py, issue 17): several LoRA adapters
trained in one job through the SGMV kernels follow, step by step, the losses of training each alone with
the single-task loop (lorabench/harness/train.py). On the tiny random Llama of the methods table."""
from __future__ import annotations

import copy

import pytest
import torch

from lorabench.harness.multitask import (FusedLibrary, LibraryConfig, SgmvLoRA, adapter_id, causal_lm_loss, plan_jobs,
                                         stack_rows, train_fused)
from lorabench.harness.train import TrainConfig, train
from lorabench.methods import get_method
from lorabench.methods.lora import LoraLinear
from tests.methods.tester import VOCAB, tiny_model

# Stated tolerance: the fused and the single-adapter paths compute the same sums in different orders
# (one GEMM over all rows vs one per adapter, SGMV vs F.linear), fp32 throughout.
LOSS_RTOL = 1e-4


class RaggedTask:
    """Random causal-LM batches with rows of different lengths (right-padded, loss on a continuation only);
    `offset` makes each task's data its own."""

    def __init__(self, offset: int, width: int):
        self.offset, self.width, self.name = offset, width, f"ragged{offset}"

    def train_batches(self, tokenizer, batch_size, seed):
        g = torch.Generator().manual_seed(1000 * self.offset + seed)
        while True:
            lengths = torch.randint(4, self.width + 1, (batch_size,), generator=g)
            ids = torch.zeros(batch_size, int(lengths.max()), dtype=torch.long)
            mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
            for i, n in enumerate(lengths.tolist()):
                ids[i, :n] = (torch.randint(1, VOCAB // 2, (n,), generator=g) + self.offset) % (VOCAB - 1) + 1
                mask[i, :n] = 1
                labels[i, n - 2:n] = ids[i, n - 2:n]   # the "answer": the last two tokens
            yield {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_sgmv_lora_matches_autograd_of_the_formula():
    """SgmvLoRA's forward and backward equal autograd through s B_l A_l x per segment (float64 truth)."""
    torch.manual_seed(0)
    L, R, d_in, d_out, T = 3, 4, 10, 7, 11
    x = torch.randn(T, d_in, requires_grad=True)
    A = torch.randn(L, R, d_in, requires_grad=True)
    B = torch.randn(L, d_out, R, requires_grad=True)
    seg_starts, seg_idx = torch.tensor([0, 4, 4, 9, 11]), torch.tensor([2, 0, 1, -1])  # an empty and a no-adapter one
    ranks, scales = torch.tensor([4, 2, 3]), torch.tensor([0.5, 2.0, 1.5])
    out = SgmvLoRA.apply(x, A, B, seg_starts, seg_idx, ranks, scales)
    g = torch.randn_like(out)
    dx, dA, dB = torch.autograd.grad(out, (x, A, B), g)

    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    rows = []
    for s, l in enumerate(seg_idx.tolist()):
        seg = x64[seg_starts[s]:seg_starts[s + 1]]
        if l < 0:
            rows.append(torch.zeros(seg.shape[0], d_out, dtype=torch.float64))
            continue
        r = int(ranks[l])
        rows.append(scales[l].double() * seg @ A64[l, :r].T @ B64[l, :, :r].T)  # eq. (3) of LoRA
    ref = torch.cat(rows)
    ref_grads = torch.autograd.grad(ref, (x64, A64, B64), g.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip((dx, dA, dB), ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert dA[1, 2:].abs().max() == 0 and dB[1, :, 2:].abs().max() == 0  # nothing past a slot's rank


@pytest.mark.parametrize("clip", [1.0, 0.05], ids=["clip-1", "clip-tight"])
def test_fused_training_equals_training_each_alone(clip):
    """3 adapters, 6 steps, AdamW with warm-up and decay: every step's loss of every adapter in the fused
    job equals that adapter's loss trained alone by the single-task loop, and so do the final weights.
    The tight clip makes per-adapter clipping bind (a global clip over the job would not match)."""
    cfg = TrainConfig(steps=6, batch_size=3, lr=2e-2, warmup_ratio=0.2, schedule="linear", max_grad_norm=clip,
                      warmup_steps_for_throughput=0, loss_curve_every=1)
    tasks = [RaggedTask(o, w) for o, w in ((0, 9), (17, 12), (40, 6))]
    base, ctx = tiny_model("llama")
    fused = FusedLibrary(copy.deepcopy(base), n_adapters=3, rank=4, alpha=8.0)
    init = [fused.adapter_state(l) for l in range(3)]
    res = train_fused(fused, tasks, None, cfg, seeds=[0, 1, 2], pad_id=0)

    for l, task in enumerate(tasks):
        method = get_method("lora").from_options({"rank": 4, "alpha": 8.0})
        solo = method.apply(copy.deepcopy(base), ctx)
        method.load_adapter_state_dict(solo, init[l])
        alone = train(solo, method, task, None, cfg, seed=l, progress=False)
        assert alone.loss_curve, "the single-task loop recorded no loss"
        torch.testing.assert_close(torch.tensor(res.losses[l]), torch.tensor(alone.loss_curve),
                                   rtol=LOSS_RTOL, atol=1e-6, msg=lambda m: f"adapter {l}: {m}")
        trained = fused.adapter_state(l)
        for name, p in method.adapter_state_dict(solo).items():
            torch.testing.assert_close(trained[name], p, rtol=1e-3, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # the adapters learnt different things (each its own data)
    a0, a1 = fused.adapter_state(0), fused.adapter_state(1)
    assert any(not torch.allclose(a0[k], a1[k]) for k in a0 if k.endswith("lora_B"))


def test_fused_training_is_not_a_global_clip():
    """The check above can fail: clipping the whole job's gradient at once (not per adapter) changes the
    trajectory once the clip binds."""
    cfg = TrainConfig(steps=3, batch_size=3, lr=2e-2, warmup_ratio=0.0, schedule="constant", max_grad_norm=0.05,
                      warmup_steps_for_throughput=0, loss_curve_every=1)
    tasks = [RaggedTask(o, 8) for o in (0, 17)]
    base, _ = tiny_model("llama")
    per_adapter = FusedLibrary(copy.deepcopy(base), 2, 4, 8.0)
    global_clip = FusedLibrary(copy.deepcopy(base), 2, 4, 8.0)
    for l in range(2):
        global_clip.load_adapter_state(l, per_adapter.adapter_state(l))
    global_clip.clip_per_adapter = lambda m: torch.nn.utils.clip_grad_norm_(global_clip.parameters(), m)
    a = train_fused(per_adapter, tasks, None, cfg, [0, 1], 0)
    b = train_fused(global_clip, tasks, None, cfg, [0, 1], 0)
    assert a.losses[0][0] == pytest.approx(b.losses[0][0], rel=1e-6)    # same start
    assert abs(a.losses[0][-1] - b.losses[0][-1]) > 1e-4


def test_library_adapter_loads_as_a_lora_adapter(tmp_path):
    """A library slot saved to safetensors loads back through load_adapter as a plain `lora` adapter whose
    outputs equal the fused model's on that slot's rows."""
    from lorabench.harness.multitask import save_library_adapter
    from lorabench.methods.base import load_adapter
    base, ctx = tiny_model("llama")
    fused = FusedLibrary(copy.deepcopy(base), 2, 4, 8.0)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "a.safetensors"
    save_library_adapter(path, fused.adapter_state(1), LibraryConfig(rank=4, alpha=8.0), {"task": "x"})
    model, method = load_adapter(copy.deepcopy(base), str(path), ctx)
    assert method.name == "lora" and any(isinstance(m, LoraLinear) for m in model.modules())
    ids = torch.randint(1, VOCAB, (2, 7))
    fused.set_rows([0, 2], 7)   # both rows use slot 1
    with torch.no_grad():
        want = fused.model(input_ids=ids).logits
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_adapter_id_depends_on_what_defines_the_adapter():
    lib, cfg = LibraryConfig(), TrainConfig(steps=10)
    a = adapter_id("quartz", "smollm2-135m", "h", lib, cfg, 0)
    assert a == adapter_id("quartz", "smollm2-135m", "h", LibraryConfig(adapters_per_job=2), cfg, 0)
    assert a == adapter_id("quartz", "smollm2-135m", "h", LibraryConfig(tokens_per_job=64), cfg, 0)
    assert a != adapter_id("quartz", "smollm2-135m", "h", lib, cfg, 1)
    assert a != adapter_id("quartz", "smollm2-135m", "h", lib, TrainConfig(steps=11), 0)
    assert a != adapter_id("socialiqa", "smollm2-135m", "h", lib, cfg, 0)
    assert a != adapter_id("quartz", "smollm2-135m", "h2", lib, cfg, 0)


def test_an_adapters_init_depends_on_its_seed_not_its_slot():
    """build_library seeds each adapter's init from its id: the same adapter in another slot or job starts
    from the same factors (so the cache key need not name the job)."""
    base, _ = tiny_model("llama")
    a = FusedLibrary(copy.deepcopy(base), 2, 4, 8.0, init_seeds=[11, 22])
    b = FusedLibrary(copy.deepcopy(base), 3, 4, 8.0, init_seeds=[33, 22, 11])
    for name, t in a.adapter_state(0).items():
        assert torch.equal(t, b.adapter_state(2)[name])
    assert not torch.equal(a.adapter_state(0)[next(iter(a.adapter_state(0)))],
                           a.adapter_state(1)[next(iter(a.adapter_state(1)))])


def test_library_jobs_group_tasks_by_length_within_the_token_bound():
    """plan_jobs: 4 adapters of 8 rows x 256 tokens in one fused job grew past 21 GB on SmolLM2 (OOM-killed); jobs
    hold at most tokens_per_job padded tokens a step, short tasks together, long ones alone, every task once."""
    lengths = {"quartz": 96, "socialiqa": 128, "rt-mc": 64, "imdb-mc": 256, "sarcasm-mc": 64, "corr2cause": 448,
               "tomi": 512, "crepe": 128, "pararule-plus": 320, "abstract-causal": 224}
    tasks = list(lengths)
    jobs = plan_jobs(tasks, lengths, 8, LibraryConfig(adapters_per_job=4, tokens_per_job=2048))
    assert sorted(t for j in jobs for t in j) == sorted(tasks)
    assert jobs[:3] == [["rt-mc", "sarcasm-mc"],                  # with quartz: 3 x 8 x 96 = 2,304 > 2,048
                        ["quartz", "socialiqa"], ["crepe"]]        # 2 x 8 x 128 = 2,048 fits; 3 x 8 x 128 does not
    for job in jobs:
        assert len(job) == 1 or len(job) * 8 * max(lengths[t] for t in job) <= 2048, job
    assert ["tomi"] in jobs and ["corr2cause"] in jobs           # above the bound: alone
    # without a binding token bound, adapters_per_job alone decides (in order of length)
    assert plan_jobs(tasks, lengths, 8, LibraryConfig(adapters_per_job=4, tokens_per_job=10**6)) == [
        ["rt-mc", "sarcasm-mc", "quartz", "socialiqa"], ["crepe", "abstract-causal", "imdb-mc", "pararule-plus"],
        ["corr2cause", "tomi"]]


def test_fused_loss_on_target_positions_equals_the_loss_over_full_logits():
    """FusedLibrary.losses applies the output layer only where a target follows; each adapter's loss equals
    causal_lm_loss over the whole (rows x length x vocabulary) logits, and so do the gradients."""
    tasks = [RaggedTask(o, w) for o, w in ((0, 9), (17, 12))]
    base, _ = tiny_model("llama")
    fused = FusedLibrary(copy.deepcopy(base), n_adapters=2, rank=4, alpha=8.0, init_seeds=[1, 2])
    with torch.no_grad():
        for layer in fused.layers:
            layer.lora_B.normal_()   # B = 0 would leave A without gradient
    batches = [next(t.train_batches(None, 3, 0)) for t in tasks]
    got = fused.losses(batches, 0)
    sum(got).backward()
    g_got = [p.grad.clone() for p in fused.parameters()]
    for p in fused.parameters():
        p.grad = None
    batch, rows = stack_rows(batches, 0)
    fused.set_rows(rows, batch["input_ids"].shape[1])
    logits = fused.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = [causal_lm_loss(logits[:3], batch["labels"][:3]), causal_lm_loss(logits[3:], batch["labels"][3:])]
    sum(want).backward()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, p in zip(g_got, fused.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)
