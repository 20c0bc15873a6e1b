"""Every method does what its paper says in a real run (issue 16).

One table of behaviours x one shared runner: each registered method trains a tiny model for a few
dozen steps through the real training loop (lorabench/harness/train.py) with its default schedule
options, and then

- its defining mechanism has fired, read from the record's `method_metrics` (ReLoRA restarted at
  least twice, SoRA pruned a rank, AdaLoRA's ranks differ across layers, ...);
- every mechanism metric the method declares (`Method.mechanism_metrics`) is in `method_metrics`;
- the trained model's outputs differ from plain LoRA's trained at the same seed, unless the
  method is LoRA by construction.

Schedules are left at their defaults on purpose: a default that cannot fire at a short budget is
the failure these tests exist to catch (the published rows of relora, sora and lora-drop were
plain LoRA for that reason).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from lorabench.harness.train import TrainConfig, train
from lorabench.methods import METHODS, get_method
from tests.methods.tester import VOCAB, RandomTask, batch_for, logits, tiny_model

STEPS = 30


def star_task(kind):
    """STAR acquires labels from a pool; LoRA, its reference, trains on the same pool in random order."""
    from tests.methods.test_star import PoolTask

    class Pool(PoolTask):
        def train_batches(self, tokenizer, batch_size, seed):
            g = torch.Generator().manual_seed(seed)
            while True:
                idx = torch.randperm(len(self.examples), generator=g)[:batch_size].tolist()
                yield self.collate([self.examples[i] for i in idx], tokenizer)
    return Pool(n=60)


class CharTokenizer:
    """Text -> ids inside the tiny models' vocabulary, one per character (PILLOW tokenizes the label it
    appends to a classifier's demonstration)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [1 + ord(ch) % (VOCAB - 1) for ch in text]}


def pillow_task(kind):
    """PILLOW draws its prompt pool from the task's labelled train split: STAR's pool task, with a tokenizer."""
    task = star_task(kind)
    task.tokenizer = CharTokenizer()
    return task


@dataclass
class Behaviour:
    method: str
    fires: Callable[[dict], bool] | None   # None: a static variant (init, scaling, forward), nothing to fire
    what: str = ""                          # the mechanism, for the failure message
    options: dict = field(default_factory=dict)
    kind: str = "bert"
    steps: int = STEPS
    lr: float = 5e-3
    task: Callable = RandomTask
    lora_by_construction: bool = False      # equal to LoRA's outputs is correct (only `lora` itself)


def ranks_vary(key):
    return lambda m: len(set(m[key])) > 1


B = Behaviour
BEHAVIOURS = [
    # baselines and LoRA
    B("full", None), B("head", None), B("lora", None, lora_by_construction=True),
    # static variants: they differ from LoRA by their init, scaling or forward, nothing fires
    B("rslora", None), B("pissa", None), B("milora", None), B("lora-fa", None),
    B("vera", None, options={"rank": 16}), B("riemannian", None),
    B("lora-xs", None, kind="llama"), B("melora", None, options={"rank": 2, "n_mini": 4}), B("mora", None),
    B("qlora", None, kind="llama"), B("loftq", None, kind="llama"), B("qa-lora", None, options={"group_size": 32}),
    B("fourierft", None, options={"n_frequency": 64}),
    B("vb-lora", None, options={"rank": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, kind="llama"),
    B("sibo", lambda m: m["residual_layers"] > 0, "h0 mixed into the LoRA input of the block layers"),
    # mechanisms that act during training
    B("dora", lambda m: m["magnitude_change_mean"] > 0 and m["direction_change_mean"] > 0,
      "magnitude and direction both move (ΔM, ΔD of eq. (6))"),
    B("lora-plus", lambda m: m["lr_ratio_B_to_A"] == 16.0, "B learns at lambda = 16 times A's rate"),
    B("relora", lambda m: m["restarts"] >= 2, "merge-and-restart at least twice"),
    B("cola", lambda m: m["knots_tied"] >= 2, "tie at least two knots of the chain"),
    B("delta-lora", lambda m: m["weight_update_steps"] > 0, "update W with the delta of B A"),
    B("flora", lambda m: m["resamples"] >= 1, "resample the projection at least once"),
    B("lte", lambda m: m["merges"] >= 1, "merge the heads' mean update at least once"),
    B("lora-dropout", lambda m: m["dropped_fraction_A"] > 0 and m["dropped_fraction_B"] > 0,
      "drop columns of A and rows of B"),
    B("hiddenkey", lambda m: m["key_columns_dropped_fraction"] > 0 and m["hidden_dropped_fraction"] > 0
      and m["kl_mean"] > 0, "drop key columns and FFN inputs, with a non-zero KL consistency term"),
    B("lora-sp", lambda m: m["updated_params"] < m["adapter_params"], "update only part of A and B"),
    B("aflora", lambda m: m["frozen_projection_fraction"] > 0, "freeze at least one projection"),
    B("dropbp", lambda m: m["backward_dropped_fraction"] > 0, "skip the backward of some layers"),
    B("reslora", lambda m: m["merge_alpha_mean"] > 0, "residual path from the previous block's LoRA"),
    B("laplace-lora", lambda m: m["fisher_examples"] > 0 and m["laplace_ece"] != m["map_ece"],
      "a Laplace posterior that changes the held-out predictions"),
    B("lora-drop", lambda m: m["kept_layer_fraction"] < 1.0, "share the LoRA of the least important layers"),
    B("bilora", lambda m: m["upper_steps"] > 0 and m["orthogonality_loss"] < m["task_loss"],
      "train Λ on held-out batches, with a regulariser smaller than the task loss"),
    B("autolora", lambda m: m["rank_min"] < m["rank_max"], "search ranks that differ across layers"),
    B("star", lambda m: m["active_learning"] and m["labels_used"] > 0 and len(m["lambda_per_round"]) > 0,
      "acquire labels in rounds", task=star_task),
    B("salora", lambda m: m["expected_density"] < 1.0, "close some gates"),
    B("increlora", lambda m: m["ranks_added"] > 0, "add ranks during training"),
    B("loraprune", lambda m: m["channel_sparsity"] > 0, "prune channels"),
    B("lorashear", lambda m: m["group_sparsity"] > 0, "zero some groups"),
    B("lora-layer-pruning", lambda m: m["layers_kept"] < m["layers_before"], "drop transformer layers"),
    B("alora", lambda m: m["rank_min"] < m["rank_max"], "reallocate ranks across layers"),
    B("longlora", lambda m: m["attn_flops_saved"] > 0, "shifted sparse attention", kind="llama"),
    B("sinklora", lambda m: m["attn_flops_saved"] > 0, "sink attention", kind="llama"),
    B("adalora", lambda m: len(set(m["adalora_ranks"])) > 1, "ranks that differ across layers", kind="llama"),
    B("sora", lambda m: sum(m["sora_ranks"]) < m["sora_initial_rank"] * len(m["sora_ranks"]),
      "prune at least one rank"),
    B("dylora", ranks_vary("dylora_sampled_ranks"), "sample different ranks"),
    B("dora-rank", lambda m: len(set(m["dora_rank_ranks"])) > 1, "ranks that differ across layers"),
    B("lora-init-b", lambda m: m["zero_factor_norm"] > 0 and m["random_factor_rel_change"] > 0,
      "A grows from its zero init while the random B moves (Init[B])"),
    B("apiq", lambda m: m["act_rel_err_after"] < m["act_rel_err_before"]
      and m["logit_rel_err_after"] < m["logit_rel_err_before"],
      "the activation-preserving init lowers the layers' and the logits' error against full precision",
      options={"group_size": 32}, kind="llama"),
    B("l4q", lambda m: m["step_size_rel_change"] > 0 and m["offset_change_in_steps"] > 0,
      "the LSQ step sizes and offsets are learnt", options={"group_size": 32}),
    B("byom-lora", lambda m: m["kept_rank"] < m["trained_rank"] and 0 < m["energy_kept"] < 1,
      "truncate the trained rank-r update to rank q < r, losing part of its energy"),
    # federated (issue 19): a single-task trial is the client-side training alone; the rules of a round are
    # tested on real client updates and through Flower in tests/test_federated.py
    B("fedit", None, lora_by_construction=True), B("flexlora", None, lora_by_construction=True),
    B("ffa-lora", lambda m: m["dp_steps"] > 0 and 0 <= m["dp_clipped_fraction"] <= 1,
      "DP-SGD through opacus at every step", options={"dp_noise_multiplier": 0.5}),
    B("federa", None),
    B("hetlora", lambda m: m["rank_after_pruning"] < 8 and 0 < m["tail_norm_ratio"] < 1,
      "rank self-pruning drops the weakest rank component", options={"prune_threshold": 0.99}),
    B("slora", lambda m: m["switch_step"] > 0 and m["stage"] == 2 and 0 < m["energy_retained"] <= 1
      and 0 < m["mask_density"] < 0.05, "sparse fine-tuning, then LoRA from the SVD of the sparse update"),
    B("pfedlora", lambda m: m["switch_step"] > 0 and 0 < m["local_share"] < 1,
      "iterative training: the local adapter, then the shared one; both move"),
    B("fedms", lambda m: m["stage"] == 2 and m["switch_step"] > 0 and 0 < m["local_routed"] < 1 and m["gate_entropy"] > 0,
      "the global expert, then a gated mixture that routes inputs to the local experts too"),
    B("privatelora", lambda m: 0 < m["activation_floats_per_token"] < m["hidden_floats_per_token"],
      "the split sends 2 r numbers per adapted layer and token, fewer than the layer's input and output"),
    # otp-lora: a single-task trial is FedIT's client; the one-time pad acts on what travels (tests/test_federated.py)
    B("otp-lora", None, lora_by_construction=True),
    # cross-task (issue 17): a single-task trial trains one library adapter (LoRA); the composition rules
    # are tested on library adapters in tests/test_cross_task.py
    B("lorahub", None, lora_by_construction=True), B("lora-arithmetic", None, lora_by_construction=True),
    B("uniform-average", None, lora_by_construction=True), B("loraretriever", None, lora_by_construction=True),
    B("token-level", None, lora_by_construction=True), B("compeft", None, lora_by_construction=True),
    # l-lora: a single-task trial fine-tunes one linearised LoRA: at B0 = 0 the Jacobian in A vanishes, only B moves
    B("l-lora", lambda m: m["a_grad_max"] == 0 and m["b_update_norm"] > 0 and m["linearization_gap"] == 0,
      "the module is linearised around its init: A gets no gradient (B0 = 0), B moves, LoRA at the trained factors "
      "equals the linearised module"),
    # peru-lora: a single-task trial trains the library adapter it reuses (a LoRA); the reuse is tested on library
    # adapters in tests/test_cross_task_reuse.py
    B("peru-lora", None, lora_by_construction=True),
    # lora-ensemble: a single-task trial trains one member; protocol (b) trains M and averages them
    # (tests/test_cross_task_ensemble.py)
    B("lora-ensemble", None, lora_by_construction=True),
    # mixtures of LoRA experts: the router acts (a single-task trial is task 0 for MOELoRA's gate); what each
    # router does across tasks is tested in tests/test_mixture.py
    B("mixlora", lambda m: m["aux_loss_last"] > 0 and m["router_entropy"] > 0, "top-2 routing with a balancing loss"),
    B("loramoe", lambda m: m["aux_loss_last"] > 0, "dense routing with the localized balancing constraint"),
    B("moelora", lambda m: m["router_entropy"] > 0 and len(m["expert_load"]) == 4, "a task-conditioned gate"),
    B("sira", lambda m: m["capacity_dropped_fraction"] > 0, "expert capacity drops over-capacity tokens"),
    B("mola", lambda m: m["experts_per_layer"][0] < m["experts_per_layer"][-1], "more experts in higher layers",
      kind="llama"),
    B("multilora", lambda m: m["load_cv"] > 0, "learnt per-module scales move apart"),
    B("llava-mole", lambda m: m["aux_loss_last"] > 0 and m["load_cv"] > 0, "top-1 routing"),
    B("octavius", lambda m: m["router_entropy"] > 0 and m["load_cv"] > 0, "one gate per example"),
    B("mtlora", lambda m: m["expert_load"][0] == m["expert_load"][1] == 0.5 and sum(m["expert_load"][2:]) == 0,
      "the shared module and task 0's own, no other task's"),
    B("mixture-of-loras", lambda m: 0 < m["teacher_forced_steps"] < STEPS and m["aux_loss_last"] > 0,
      "the experts first, teacher-forced by task, then the router supervised by the task label"),
    B("x-lora", lambda m: 0 < m["teacher_forced_steps"] < STEPS and m["frozen_expert_params"] > 0
      and m["router_entropy"] > 0 and len(m["scaling_entropy_by_depth"]) == 2 and m["tokens_per_s_head_stage"] > 0,
      "the experts first (teacher-forced by task), then frozen while the scaling head, reading the scaling pass's "
      "hidden states, trains", kind="llama"),
    B("mixlora-cfs", lambda m: m["factors_used_fraction"] > 4 / 16 and m["distinct_pairs"] > 4,
      "instances select different rank-1 factors of A and (given A's) of B"),
    B("mocle", lambda m: sum(s > 0 for s in m["cluster_sizes"]) > 1 and sum(s > 0 for s in m["cluster_share"]) > 1
      and m["expert_load"][0] > 0 and m["router_entropy"] > 0,
      "k-means clusters of the inputs route examples to cluster-conditional experts beside the universal expert"),
    B("moral", lambda m: m["router_entropy"] > 0 and m["load_cv"] > 0 and len(m["expert_load"]) == 4,
      "top-2 routing over LoRA experts in the feed-forward layers", kind="llama"),
    B("mlore", lambda m: m["router_entropy"] > 0 and m["load_cv"] > 0 and m["expert_ranks"] == [1, 2, 3]
      and set(m["expert_load_by_task"]) == {"0"} and m["specific_scale_by_task"]["0"] > 0
      and m["aux_loss_last"] > 0 and m["reparam_max_rel_diff"] < 1e-4,
      "task 0's router picks top-2 of experts of ranks 1, 2, 3 beside the generic path and task 0's own expert; "
      "the mixture equals its re-parameterised single linear"),
    B("fast-lora", lambda m: m["adapter_use"][0] == 1.0 and m["multiplier_deviation"] > 0,
      "task 0's element-wise adapter moves W0's multiplier away from 1"),
    # continual (issue 18): a single-task trial is a sequence of one task; what the methods do across tasks is
    # tested in tests/test_continual.py (O-LoRA's overlap falls, InfLoRA's subspace is interference-free)
    B("seq-lora", None, lora_by_construction=True), B("per-task-lora", None, lora_by_construction=True),
    B("replay-lora", None, lora_by_construction=True), B("multitask-lora", None, lora_by_construction=True),
    B("o-lora", None, lora_by_construction=True),
    B("task-arithmetic", None, lora_by_construction=True),
    # the group lasso's proximal step under the linear schedule: at α = 200 every block's group ends exactly zero
    # (||θ_g|| ~ 1.1 at init; the prox at the η of the step it follows, a zeroed group's Adam moments zeroed with it:
    # before, the last step's η was the next step's 0 and the moments revived the groups, so none read zero)
    B("gs-lora", lambda m: m["groups"] > 0 and m["zero_groups"] == m["groups"] and max(m["group_norms"]) == 0.0,
      "the group lasso's proximal step zeroes every block's LoRA group", options={"group_alpha": 200.0}),
    B("i-lora", lambda m: m["ema_updates"] > 0 and m["slow_fast_distance"] > 0,
      "the slow learner follows the fast one by a moving average", lora_by_construction=True, kind="llama"),
    B("moral-cl", lambda m: m["router_entropy"] > 0 and m["load_cv"] > 0 and len(m["expert_update"]) == 4
      and sum(x > 0 for x in m["expert_update"]) >= 2 and m["task_routing"] is None,
      "top-2 routing over FFN LoRA experts, the routed experts' updates moved", kind="llama"),
    B("inflora", lambda m: m["designed"] == 1 and m["designed_rank_mean"] > 0 and m["interference"] == 0,
      "B_t designed from the task's layer inputs and frozen, A_t trained"),
    B("pillow", lambda m: m["prompt_matching"] and m["rl_steps"] > 0 and sum(m["selected_counts"]) > 0
      and m["policy_entropy_last"] < m["policy_entropy_first"],
      "train the prompt matcher by REINFORCE: its policy moves away from uniform", task=pillow_task),
]


def test_every_registered_method_has_a_behaviour():
    missing = set(METHODS.names()) - {b.method for b in BEHAVIOURS}
    assert not missing, f"methods without a behaviour in tests/methods/test_behaviour.py: {sorted(missing)}"


def test_every_method_with_a_mechanism_declares_its_metrics():
    undeclared = [b.method for b in BEHAVIOURS if b.fires is not None and not get_method(b.method).mechanism_metrics]
    assert not undeclared, f"methods whose mechanism fires but declare no mechanism_metrics: {undeclared}"


def run(name: str, options: dict, kind: str, steps: int, lr: float, task) -> tuple[dict, torch.Tensor]:
    """Train `name` on the tiny `kind` model through the real loop; its method_metrics and its outputs."""
    model, ctx = tiny_model(kind)
    torch.manual_seed(0)
    method = get_method(name).from_options(options)
    model = method.apply(model, ctx)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, warmup_ratio=0.1, schedule="linear",
                      warmup_steps_for_throughput=0)
    t = task(kind)
    result = train(model, method, t, getattr(t, "tokenizer", None), cfg, seed=0, progress=False)
    assert result.steps == steps and result.final_loss is not None
    return result.method_metrics, logits(model, batch_for(kind, seed=99, n=8))


@functools.lru_cache(maxsize=None)
def lora_outputs(kind: str, steps: int, lr: float, rank: int | None, task) -> torch.Tensor:
    return run("lora", {} if rank is None else {"rank": rank}, kind, steps, lr, task)[1]


@pytest.mark.parametrize("b", BEHAVIOURS, ids=lambda b: b.method)
def test_mechanism_fires_in_a_real_run(b: Behaviour):
    metrics, out = run(b.method, b.options, b.kind, b.steps, b.lr, b.task)
    assert torch.isfinite(out).all()
    declared = get_method(b.method).mechanism_metrics
    absent = [k for k in declared if k not in metrics]
    assert not absent, \
        f"{b.method} declares mechanism metrics it did not record: {absent} (recorded: {sorted(metrics)})"
    if b.fires is not None:
        assert b.fires(metrics), f"{b.method}: its mechanism did not fire ({b.what}); method_metrics={metrics}"
    if not b.lora_by_construction:
        ref = lora_outputs(b.kind, b.steps, b.lr, b.options.get("rank"), b.task)
        assert not torch.allclose(out, ref, atol=1e-4, rtol=1e-4), \
            f"{b.method} trained to the same outputs as plain LoRA at the same seed: it is LoRA under another name"


SHORT = 10   # the QuaRTz budget of suites/standard.yaml (10 steps x 4 on SmolLM2)


@pytest.mark.parametrize("b", [b for b in BEHAVIOURS if b.fires is not None], ids=lambda b: b.method)
def test_mechanism_fires_at_a_short_budget(b: Behaviour):
    """Step schedules scale with the budget: the mechanism fires at 10 steps too (or the config is rejected)."""
    metrics, _ = run(b.method, b.options, b.kind, SHORT, b.lr, b.task)
    assert b.fires(metrics), \
        f"{b.method}: its mechanism did not fire in {SHORT} steps ({b.what}); method_metrics={metrics}"
