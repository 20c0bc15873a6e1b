"""Continual forgetting (issue 18): GS-LoRA's groups, its loss terms and proximal step on small models, its protocol
through the real training loop on tiny BERT and the text-sources task, and the suite's checks."""
from __future__ import annotations

import copy

import pytest
import torch

from lorabench.errors import UserError
from lorabench.harness.forgetting import check_forget, h_mean
from lorabench.harness.trial import TrialSpec, head_modules, run_trial
from lorabench.methods import get_method
from lorabench.methods.base import ApplyContext, TrainState


def gs_model(model_name: str, **options):
    from lorabench import assets
    head = "seq-cls" if model_name == "tiny-bert" else "causal-lm"
    model = assets.load_model(model_name, head=head, num_labels=4 if head == "seq-cls" else None, seed=0).model
    method = get_method("gs-lora").from_options(options)
    heads = head_modules(model, head)
    torch.manual_seed(0)
    model = method.apply(model, ApplyContext(architecture=model.config.model_type, head_modules=heads, seed=0))
    return model, method, heads


@pytest.mark.parametrize("name,layers", [("tiny-bert", {"intermediate.dense", "output.dense"}),
                                         ("tiny-llama", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})])
def test_one_group_per_block_of_its_feed_forward_layers(name, layers):
    model, method, _ = gs_model(name)
    groups = method.groups(model)
    assert list(groups) == [0, 1]  # both tiny models have 2 blocks
    by_block = {b: {n for n, m in method.lora_named(model) if m in g} for b, g in groups.items()}
    for b, names in by_block.items():
        assert {n.split(f".{b}.", 1)[1] for n in names} == layers, names  # never attention.output.dense
    # ||θ_g||_2 is the norm of the group's A and B together
    g0 = groups[0]
    want = torch.sqrt(sum(l.lora_A.pow(2).sum() + l.lora_B.pow(2).sum() for l in g0))
    assert torch.allclose(method.group_norm(g0), want)


def test_the_proximal_step_shrinks_each_group_by_eta_alpha_and_zeroes_the_small_ones():
    model, method, _ = gs_model("tiny-bert", group_alpha=2.0)
    groups = list(method.groups(model).values())
    with torch.no_grad():
        for layer in groups[0]:
            layer.lora_A.mul_(1e-3)  # a small group: its norm below η α
            layer.lora_B.fill_(1e-4)
    before = method.group_norms(model)
    assert before[0] < 0.05 * 2.0 < before[1]
    opt = torch.optim.SGD([p for _, p in method.trainable_parameters(model)], lr=0.05)
    state = TrainState(model=model, optimizer=opt, scheduler=None, step=0, total_steps=1)
    direction = [l.lora_A.detach().clone() for l in groups[1]]
    method.on_step_end(state)
    after = method.group_norms(model)
    assert after[0] == 0.0  # prox of η α ||θ||: max(0, 1 - η α / ||θ||) θ = 0
    assert after[1] == pytest.approx(before[1] - 0.05 * 2.0, rel=1e-5)  # shrunk by η α, same direction
    assert all(torch.allclose(l.lora_A / after[1], d / before[1], atol=1e-6) for l, d in zip(groups[1], direction))
    # α = 0: nothing moves; without the proximal step the lasso is in the loss instead (the authors' code)
    model0, m0, _ = gs_model("tiny-bert", group_alpha=0.0)
    norms = m0.group_norms(model0)
    m0.on_step_end(TrainState(model=model0, optimizer=opt, scheduler=None, step=0, total_steps=1))
    assert m0.group_norms(model0) == norms
    model2, m2, _ = gs_model("tiny-bert", group_alpha=0.3, proximal=False, forget_beta=0.0)
    loss = m2.extra_loss(TrainState(model=model2, optimizer=opt, scheduler=None, step=0, total_steps=1))
    assert float(loss.detach()) == pytest.approx(0.3 * sum(m2.group_norms(model2)), rel=1e-5)


def test_a_zeroed_group_stays_zero_under_adamw_and_the_step_shrinks_by_its_own_learning_rate():
    """Issue 18's review: under a linear decay the last proximal step ran at the next step's learning rate, 0, and
    Adam's moments revived a zeroed group at the next step, so "zeroed groups" read 0 even at α = 200. The prox now
    uses the η of the optimizer step it follows, and a group it zeroes has its moments zeroed: at A = B = 0 the
    gradient is exactly zero, so further AdamW steps leave the group at exactly zero while the others train."""
    from lorabench import assets
    from lorabench.tasks import get_task
    model, method, _ = gs_model("tiny-bert", group_alpha=2.0)
    groups = list(method.groups(model).values())
    params = [q for _, q in method.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=0.05, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else 0.0)   # the last step: η -> 0
    state = TrainState(model=model, optimizer=opt, scheduler=sched, step=0, total_steps=1)
    task = get_task("text-sources").from_options({"n_train": 64, "max_length": 16})
    batch = task.collate(task.split().train[:8], assets.load_tokenizer("tiny-bert"))

    def step(small_group0: bool = False):
        method.on_step_begin(state)
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
        if small_group0:   # group 0 ends this update near zero with live moments; the prox zeroes it
            with torch.no_grad():
                for layer in groups[0]:
                    layer.lora_A.mul_(1e-4)
                    layer.lora_B.mul_(1e-4)
        sched.step()
        method.on_step_end(state)

    with torch.no_grad():
        for layer in groups[0] + groups[1]:
            layer.lora_B.normal_(0, 0.1)     # B away from zero: every A and B has a gradient
    before = method.group_norms(model)
    step(small_group0=True)
    after = method.group_norms(model)
    assert sched.get_last_lr()[0] == 0.0 and after[0] == 0.0   # shrunk by η α with η = 0.05, not the next step's 0
    moments = [v for layer in groups[0] for q in (layer.lora_A, layer.lora_B) for v in opt.state[q].values()
               if torch.is_tensor(v) and v.shape == q.shape]
    assert len(moments) == 2 * 2 * len(groups[0]) and all(not v.any() for v in moments)   # exp_avg, exp_avg_sq
    assert after[1] > 0 and after[1] != before[1]
    for g in opt.param_groups:
        g["lr"] = 0.05                      # more steps at a real learning rate: group 0 stays exactly zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state.scheduler = sched
    trained = [layer.lora_B.detach().clone() for layer in groups[1]]
    for _ in range(3):
        step()
    assert method.group_norms(model)[0] == 0.0
    assert any(not torch.equal(layer.lora_B, b) for layer, b in zip(groups[1], trained))


def test_the_forgetting_loss_is_bounded():
    """β · ReLU(BND - L_forget): the forget batch's cross-entropy, pushed up (the gradient raises it) and left alone
    once it is above the bound."""
    from lorabench import assets
    from lorabench.tasks import get_task
    model, method, heads = gs_model("tiny-bert", forget_beta=0.5, bound=50.0, group_alpha=0.0)
    task = get_task("text-sources").from_options({"n_train": 64, "max_length": 16})
    tok = assets.load_tokenizer("tiny-bert")
    batch = task.collate([e for e in task.split().train if e["label"] == 3][:8], tok)
    method.forget_batches = iter([batch, batch])
    state = TrainState(model=model, optimizer=None, scheduler=None, step=0, total_steps=1)
    ce = float(model(**batch).loss)
    loss = method.extra_loss(state)
    assert float(loss) == pytest.approx(0.5 * (50.0 - ce), rel=1e-5)
    loss.backward()  # descending this loss ascends the forget cross-entropy
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith(("lora_A", "lora_B")) or any(n.startswith(h + ".") for h in heads) for n in grads)
    method.config.bound = ce / 2  # already above the bound: no push
    assert float(method.extra_loss(state)) == 0.0


def test_h_mean_and_the_forget_lists():
    assert h_mean(0.8, 0.9) == pytest.approx(2 * 0.8 * 0.9 / 1.7)
    assert h_mean(0.0, 0.9) == 0.0 and h_mean(-0.1, 0.9) == 0.0  # nothing forgotten, or the accuracy rose
    check_forget([[3], [1, 2]], 4, "x")
    for bad, msg in [([[4]], r"class indices 0\.\.3"), ([[1], [1]], "again"), ([[0, 1], [2, 3]], "must be kept"),
                     ([[]], "non-empty")]:
        with pytest.raises(UserError, match=msg):
            check_forget(bad, 4, "x")


def forget_spec(alpha: float, **cfg) -> TrialSpec:
    options = {"n_train": 2000, "n_eval": 400, "max_length": 32}
    return TrialSpec(suite="t", suite_version=1, label="gs-lora@text-sources", method="gs-lora",
                     method_options={"group_alpha": alpha}, task="text-sources", task_options=options, model="tiny-bert",
                     seed=0, train={"steps": 30, "batch_size": 16, "eval_batch_size": 64, "lr": 1e-2,
                                    "schedule": "constant", "warmup_ratio": 0.0},
                     continual={"order": "text-sources", "tasks": [{"name": "text-sources", "options": options}],
                                "config": {"forget": [[3]], "learn_steps": 80, "learn_lr": 3e-3, **cfg}})


def test_gs_lora_forgets_a_class_keeps_the_others_and_zeroes_a_block_under_a_strong_penalty():
    """Through the runner's trial (tiny BERT learns the four text sources, then forgets Shakespeare): the forget
    class's accuracy falls near zero, the kept classes' stays within 0.1 of before, and under a strong group lasso
    one of the two blocks' groups is exactly zero while the other does the forgetting."""
    out = run_trial(forget_spec(18.0), progress=False)
    f = out["forgetting"]
    assert f["learned"]["accuracy"] > 0.45  # chance is 0.25: the model knows the classes before forgetting
    (st,) = f["stages"]
    assert st["forget"] == [3] and st["kept"] == [0, 1, 2]
    assert st["acc_forget_before"] > 0.5 and st["acc_forget"] < 0.1 * st["acc_forget_before"]
    assert st["acc_retain"] > st["acc_retain_before"] - 0.1
    assert st["groups"] == 2 and st["zero_groups"] == 1 and sorted(st["group_norms"])[0] == 0.0
    assert out["metric"] == "h_mean" and out["score"] == st["h_mean"] > 0.5


def test_the_forgetting_suite_and_its_checks(tmp_path):
    from lorabench.runner.suite import load_suite, trial_id
    s = load_suite("continual-forgetting")
    trials = s.trials()
    assert {t.label for t in trials} == {"gs-lora-a0@text-sources", "gs-lora-a40@text-sources",
                                         "gs-lora-a80@text-sources"}
    assert all(t.continual["config"]["forget"] == [[3], [2]] for t in trials)
    assert len({trial_id(t) for t in trials}) == len(trials) == 9
    base = (tmp_path / "f.yaml")
    text = ("suite: f\nversion: 1\ncontinual: {forget: [[3]]}\norders:\n  o: [text-sources]\n"
            "tasks: [text-sources]\nmethods: [gs-lora]\n")
    base.write_text(text)
    assert len(load_suite(str(base)).trials()) == 1
    for bad, msg in [(text.replace("methods: [gs-lora]", "methods: [seq-lora]"), "no continual-forgetting protocol"),
                     (text.replace("[[3]]", "[[4]]"), r"f\.yaml:3: task text-sources: forget\[0\] = \[4\] must be .*0\.\.3"),
                     (text.replace("tasks: [text-sources]", "tasks: [quartz]").replace("[text-sources]", "[quartz]"),
                      "quartz is a multiple-choice task; continual forgetting"),
                     (text.replace("continual: {forget: [[3]]}", "continual: {}").replace("text-sources", "quartz"),
                      "gs-lora' runs continual forgetting: set continual.forget")]:
        base.write_text(bad)
        with pytest.raises(UserError, match=msg):
            load_suite(str(base))


def test_report_section_means_each_forgetting_task_over_seeds(tmp_path):
    from lorabench.report import forgetting as F
    from lorabench.report.build import write_report

    def rec(seed, h, acc_f):
        stage = {"forget": [3], "h_mean": h, "acc_forget_before": 0.9, "acc_forget": acc_f, "acc_retain_before": 0.8,
                 "acc_retain": 0.78, "acc_forgotten_earlier": None, "zero_groups": 2, "groups": 6}
        return {"status": "ok", "task": "text-sources", "label": "gs-lora-a40@text-sources", "method": "gs-lora",
                "seed": seed, "metric": "h_mean", "score": h, "higher_is_better": True,
                "forgetting": {"task": "text-sources", "stages": [stage]}}
    frame = F.forgetting_frame([rec(0, 0.80, 0.05), rec(1, 0.84, 0.01), {"status": "ok", "task": "rt-sentiment"}])
    (row,) = frame.to_dict("records")
    assert row["n_seeds"] == 2 and row["h_mean"] == pytest.approx(0.82) and row["acc_forget"] == pytest.approx(0.03)
    assert row["h_mean_ci95"] > 0 and row["zero_groups"] == 2 and row["forget"] == "3"
    md = "\n".join(F.markdown(frame))
    assert "| text-sources | gs-lora-a40@text-sources | 1 | 3 | 2 | 0.820 ± " in md
    written = write_report([rec(0, 0.80, 0.05), rec(1, 0.84, 0.01)], tmp_path, ["md", "csv"])
    assert (tmp_path / "forgetting.csv") in written
    assert "## Continual forgetting (GS-LoRA's protocol)" in (tmp_path / "LEADERBOARD.md").read_text()
