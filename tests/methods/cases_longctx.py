"""Methods-table rows of the long-context methods (issue 8): longlora and sinklora.

The equation checks compare the dense masked attention of lorabench.methods.beyond_fine_tuning.attention with
independent references on small tensors: LongLoRA's Algorithm 1 (roll half the heads by -G/2,
reshape into groups, attend per group, roll back), an explicit per-query loop for SinkLoRA's
SF-Attn, and full attention when the group is at least the sequence length.
"""
import torch
import torch.nn.functional as F
from torch import nn

from lorabench.methods.base import TrainState
from lorabench.methods.beyond_fine_tuning.attention import (
    SPEC_ATTR, LongCtxSpec, attention_pattern, longctx_attention, rotary_modules)
from lorabench.methods.lora import LoraLinear
from tests.methods.tester import Case, RandomTask, batch_for


def hidden(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=True).hidden_states[-1]


class Attn(nn.Module):
    """The smallest module the attention function accepts."""

    def __init__(self, spec, causal):
        super().__init__()
        setattr(self, SPEC_ATTR, spec)
        self.is_causal = causal


def qkv(B=2, H=4, T=16, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3)]


def ours(spec, q, k, v, causal):
    out, _ = longctx_attention(Attn(spec, causal).train(), q, k, v, None, scaling=q.shape[-1] ** -0.5)
    return out.transpose(1, 2)   # back to (B, H, T, D)


def full_attention(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def algorithm1(q, k, v, G, causal):
    """LongLoRA's Algorithm 1 (sec. 3.2): shift heads [H/2, H) by -G/2, attend within groups of G,
    shift back. Causal: the mask is taken on the tokens' original positions (no wrap-around leak)."""
    B, H, T, D = q.shape
    s = G // 2
    pos = torch.arange(T).expand(H, T).clone()
    q, k, v = q.clone(), k.clone(), v.clone()
    for t in (q, k, v):
        t[:, H // 2:] = t[:, H // 2:].roll(-s, dims=2)                 # shift
    pos[H // 2:] = pos[H // 2:].roll(-s, dims=1)
    n = T // G
    gq, gk, gv = (t.reshape(B, H, n, G, D) for t in (q, k, v))          # split into groups
    gpos = pos.reshape(H, n, G)
    logits = gq @ gk.transpose(-1, -2) * D ** -0.5                       # (B, H, n, G, G)
    if causal:
        allowed = gpos[:, :, None, :] <= gpos[:, :, :, None]             # key position <= query position
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ gv).reshape(B, H, T, D)
    out[:, H // 2:] = out[:, H // 2:].roll(s, dims=2)                   # shift back
    return out


def sf_reference(q, k, v, G, n_sink, causal):
    """SinkLoRA's SF-Attn by an explicit loop: heads [0, H/2) attend in groups [0,G), [G,2G), ...;
    heads [H/2, H) in groups shifted by G/2 and not wrapped (segments [0, G/2), [G/2, 3G/2), ...);
    the first n_sink tokens are attended by every token and attend to every token."""
    B, H, T, D = q.shape
    s = G // 2
    out = torch.zeros_like(q)
    for h in range(H):
        seg = [i // G for i in range(T)] if h < H // 2 else [(i - s) // G for i in range(T)]
        for i in range(T):
            keys = [j for j in range(T) if seg[j] == seg[i] or j < n_sink or i < n_sink]
            if causal:
                keys = [j for j in keys if j <= i]
            idx = torch.tensor(keys)
            w = (q[:, h, i, None] @ k[:, h, idx].transpose(-1, -2) * D ** -0.5).softmax(-1)   # (B, 1, n)
            out[:, h, i] = (w @ v[:, h, idx])[:, 0]
    return out


def training_logits(model, batch):
    """Training-mode last hidden states without dropout (train and eval differ only by the attention;
    every token's, since a tiny random BERT's [CLS] logits barely move)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.train()
    with torch.no_grad():
        out = hidden(model, batch)
    model.eval()
    return out


def check_model_behaviour(model, method):
    c = method.config
    kind = model.config.model_type
    # LoRA on the attention projections only; embeddings and norms trainable (LongLoRA sec. 3.3)
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    ends = ("q_proj", "k_proj", "v_proj", "o_proj") if kind == "llama" else ("query", "key", "value", "output.dense")
    assert adapted and all(n.endswith(ends) for n in adapted), adapted
    assert not any("mlp" in n or "intermediate" in n for n in adapted)
    trainable = {n for n, _ in method.trainable_parameters(model)}
    emb = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    assert all(f"{n}.weight" in trainable for n in emb)
    norms = [n for n, p in model.named_parameters() if "norm" in n.lower()]
    assert norms and all(n in trainable for n in norms)
    assert not any(n.endswith("base.weight") for n in trainable)
    # S²-Attn / SF-Attn while training, full attention at evaluation
    b = batch_for(kind, t=16)
    with torch.no_grad():
        ev = hidden(model, b)
    tr = training_logits(model, b)
    assert not torch.allclose(tr, ev, atol=1e-6), "the training-time attention pattern changed nothing"
    spec = getattr(next(m for n, m in model.named_modules() if n.endswith(("self_attn", "attention.self"))), SPEC_ATTR)
    old = spec.train_length
    spec.train_length = 10 ** 6   # group >= sequence length: S²-Attn degenerates to full attention
    try:
        torch.testing.assert_close(training_logits(model, b), ev, atol=1e-5, rtol=1e-5)
    finally:
        spec.train_length = old
    # the record's measurements, through the harness's hooks
    from lorabench.harness.train import TrainConfig, train
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_ratio=0.0, schedule="constant",
                      warmup_steps_for_throughput=0)
    mm = train(model, method, RandomTask(kind), None, cfg, seed=0, progress=False).method_metrics
    T = 12  # RandomTask's batches
    assert mm["train_length_max"] == T and mm["group_size"] == int(c.group_size_ratio * T)
    assert mm["base_context"] == 64 and mm["extended_context"] == int(64 * c.context_factor)
    assert 0 < mm["attn_pairs_fraction"] < 1 and abs(mm["attn_flops_saved"] + mm["attn_pairs_fraction"] - 1) < 1e-6


def longlora_equations(model, method):
    q, k, v = qkv()
    spec = LongCtxSpec(0.25)                 # T = 16 -> G = 4
    for causal in (False, True):
        torch.testing.assert_close(ours(spec, q, k, v, causal), algorithm1(q, k, v, 4, causal))
        # group >= sequence length: full attention
        big = LongCtxSpec(1.0)
        torch.testing.assert_close(ours(big, q, k, v, causal), full_attention(q, k, v, causal))
        torch.testing.assert_close(ours(LongCtxSpec(0.25, train_length=64), q, k, v, causal),
                                   full_attention(q, k, v, causal))
    # the shifted half of the heads wraps around (Algorithm 1's roll): in a bidirectional model the
    # first and the last token share a group there, never in the un-shifted half
    p = attention_pattern(16, 4, 4)
    assert not p[0, 0, 15] and p[3, 0, 15] and p[3, 15, 0]
    # a sequence that is not a multiple of G: the last group is shorter
    p = attention_pattern(10, 2, 4)
    assert p[0, 8, 9] and not p[0, 7, 8]
    # eval mode: full attention whatever the spec
    out, _ = longctx_attention(Attn(spec, False).eval(), q, k, v, None, scaling=q.shape[-1] ** -0.5)
    torch.testing.assert_close(out.transpose(1, 2), full_attention(q, k, v, False))
    check_model_behaviour(model, method)


def sinklora_equations(model, method):
    q, k, v = qkv(T=16)
    for n_sink in (0, 2):
        spec = LongCtxSpec(0.25, n_sink=n_sink, wrap=False)
        for causal in (False, True):
            torch.testing.assert_close(ours(spec, q, k, v, causal), sf_reference(q, k, v, 4, n_sink, causal))
    # reassembly: no wrap-around, the first and last tokens never see each other
    p = attention_pattern(16, 4, 4, n_sink=0, wrap=False)
    assert not p[:, 0, 15].any() and not p[:, 15, 0].any()
    # sinks: the last query's output depends on the sink token's value, not on a value in another group
    for n_sink, sees_sink in ((0, False), (2, True)):
        vv = v.clone().requires_grad_(True)
        ours(LongCtxSpec(0.25, n_sink=n_sink, wrap=False), q, k, vv, True)[:, :, 15].sum().backward()
        assert (vv.grad[:, :, 0].abs().sum() > 0) == sees_sink
        assert vv.grad[:, :, 5].abs().sum() == 0          # position 5: another group in every head
    check_model_behaviour(model, method)


def position_interpolation_equations(model, method):
    """Position Interpolation (arXiv 2306.15595, eq. (2)): RoPE at position m*s after extension by
    s equals RoPE at position m before; the model's context becomes s times longer."""
    from tests.methods.tester import tiny_model
    s = method.config.context_factor
    base, _ = tiny_model("llama")
    rot, rot0 = rotary_modules(model)[0], rotary_modules(base)[0]
    x = torch.zeros(1, 1, 8)
    m = torch.arange(8)[None]
    cos, sin = rot(x, position_ids=(m * s).long())
    cos0, sin0 = rot0(x, position_ids=m)
    torch.testing.assert_close(cos, cos0)
    torch.testing.assert_close(sin, sin0)
    assert model.config.max_position_embeddings == int(64 * s)
    # training: the extended model's loss and gradients are finite at lengths beyond the base context
    b = batch_for("llama", n=2, t=80)
    model.train()
    loss = model(**b).loss
    loss.backward()
    assert torch.isfinite(loss)
    model.eval()
    state = TrainState(model, None, None, 0, 1, batch=b)
    method.on_train_begin(state)
    method.on_step_begin(state)
    assert state.metrics["extended_context"] == int(64 * s) and state.metrics["train_length_max"] == 80


CASES = [
    Case("longlora", equations=longlora_equations),
    Case("sinklora", {"n_sink": 2}, equations=sinklora_equations),
    Case("longlora", {"context_factor": 2.0}, id="longlora-pi", models=("llama",), identity_at_init=False,
         equations=position_interpolation_equations),
    Case("sinklora", {"rank": 4, "train_embeddings": False, "train_norms": False, "group_size_ratio": 0.5},
         id="sinklora-lora-only"),
]
