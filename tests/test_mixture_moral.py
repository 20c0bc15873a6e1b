"""MoRAL (arXiv 2402.11260; lorabench/methods/cross_task/moral.py): top-2 LoRA experts in the feed-forward layers
only, on the shared mixture layer; a protocol (b) trial on tiny-llama records its routing per task."""
from __future__ import annotations

import torch

from lorabench.methods import get_method
from lorabench.methods.cross_task.mixture import MixtureLinear
from tests.methods.tester import batch_for, tiny_model


def test_moral_puts_top2_experts_in_the_feed_forward_layers_only():
    for kind, ffn in (("llama", (".mlp.gate_proj", ".mlp.up_proj", ".mlp.down_proj")),
                      ("bert", (".intermediate.dense", ".output.dense"))):
        model, ctx = tiny_model(kind)
        linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        method = get_method("moral").from_options({"experts": 4, "rank": 2})
        model = method.apply(model, ctx)
        adapted = {n for n, m in model.named_modules() if isinstance(m, MixtureLinear)}
        assert adapted and all(n.endswith(ffn) for n in adapted), (kind, sorted(adapted))
        assert not any("attention" in n or "self_attn" in n for n in adapted)   # attention stays unadapted
        want = {n for n in linears if n.endswith(ffn) and "attention" not in n}
        assert adapted == want, (kind, sorted(want - adapted))
        assert method.config.target_modules is None   # the record keeps the option as given
        layer = next(m for m in model.modules() if isinstance(m, MixtureLinear))
        with torch.no_grad():
            layer.lora_B.normal_()
        g, p, _ = layer.gates(torch.randn(2, 5, layer.in_features))
        assert ((g > 0).sum(-1) == 2).all()                                 # top-2 per token ...
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 5))            # ... renormalised
        assert torch.equal(g > 0, torch.zeros_like(g, dtype=torch.bool).scatter(-1, p.topk(2, -1).indices, True))
        with torch.no_grad():
            assert torch.isfinite(model(**batch_for(kind, seed=1, n=2)).logits).all()
    # target_modules given: those, not the FFN
    model, ctx = tiny_model("llama")
    model = get_method("moral").from_options({"target_modules": ["q_proj"]}).apply(model, ctx)
    assert all(n.endswith("q_proj") for n, m in model.named_modules() if isinstance(m, MixtureLinear))


def test_a_tiny_protocol_b_trial_of_moral_records_its_routing_per_task(tmp_path):
    from lorabench.harness.mixture import run_mixture
    from lorabench.runner.suite import load_suite
    from tests.test_mixture import TINY
    path = tmp_path / "tinymix.yaml"
    path.write_text(TINY.replace("  - {name: mixlora, options: {experts: 2, rank: 2}}",
                                 "  - {name: moral, options: {experts: 3, rank: 2}}"))
    spec = next(s for s in load_suite(str(path)).trials() if s.method == "moral")
    rec = run_mixture(spec, progress=False)
    tasks = rec["mixture"]["tasks"]
    assert set(tasks) == {"socialiqa", "quartz", "rt-mc"} and tasks["rt-mc"]["held_out"]
    for t in tasks.values():   # every task routed over the 3 experts (shares rounded to 4 digits)
        load = t["router"]["expert_load"]
        assert len(load) == 3 and abs(sum(load) - 1) < 1e-3 and t["router"]["router_entropy"] > 0
    assert rec["method_metrics"]["aux_loss_last"] == 0   # no balancing loss by default
