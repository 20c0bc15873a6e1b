"""Methods-table rows of Methods II (issue 8), each with a check of its paper's defining equations."""
import math

import torch

from lorabench.methods.base import TrainState
from tests.methods.tester import Case


def adapted_layers(model):
    from lorabench.methods.lora import LoraLinear
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def randomize_(*tensors, std=0.3):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * std)


def stepped_state(model, method, total_steps=10, step=0):
    """A TrainState whose AdamW has taken one step on the method's parameters (so it has moments)."""
    params = [p for _, p in method.trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return TrainState(model=model, optimizer=opt, scheduler=None, step=step, total_steps=total_steps)


# -- breaking the low-rank bottleneck --------------------------------------------------------------

def restart_keeps_function(model, method, do_restart):
    """Merge-and-restart (ReLoRA Algorithm 1, CoLA's knot): W <- W + s B A, then B = 0 and a fresh A:
    the layer's function is unchanged and ΔW_acc holds exactly the merged product."""
    layer = adapted_layers(model)[0]
    state = stepped_state(model, method)
    randomize_(layer.lora_B)
    x = torch.randn(5, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        merged = layer.scale * layer.lora_B @ layer.lora_A
    a_old = layer.lora_A.detach().clone()
    do_restart(state)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight_delta, merged)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.lora_A, a_old), "A was not re-initialised"
    return state, layer


def relora_equations(model, method):
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    state, layer = restart_keeps_function(model, method, lambda s: method.restart(s, 0.9))
    for key in ("exp_avg", "exp_avg_sq"):  # 90% of each moment pruned by magnitude
        t = state.optimizer.state[layer.lora_A][key]
        assert int((t == 0).sum()) >= round(0.9 * t.numel())
    # the restart fires after every `restart_every` steps, never after the last one
    n = method.every
    count = method.restarts
    method.on_step_end(TrainState(model, state.optimizer, None, n - 1, 10 * n))
    assert method.restarts == count + 1
    method.on_step_end(TrainState(model, state.optimizer, None, n * 10 - 1, 10 * n))
    assert method.restarts == count + 1
    # jagged schedule: the learning rate re-warms linearly after a restart
    g = state.optimizer.param_groups[0]
    g["lr"] = 1.0
    method.on_step_begin(TrainState(model, state.optimizer, None, method.last_restart, 10 * n))
    assert g["lr"] == 1.0 / (method.warmup + 1)


def cola_equations(model, method):
    from lorabench.methods.low_rank_bottleneck.cola import knot_steps
    assert knot_steps(9, 3) == {3, 6} and knot_steps(10, 1) == set()
    method.on_train_begin(TrainState(model, None, None, 0, 9))

    def tie(state):
        state.step = 2  # the third step ends the first of three phases of 9 steps
        method.on_step_end(state)
    state, layer = restart_keeps_function(model, method, tie)
    assert method.tied == 1
    assert not torch.any(state.optimizer.state[layer.lora_A]["exp_avg"]), "a new link starts a fresh optimizer state"


def delta_lora_equations(model, method):
    """Eq. (8) of Delta-LoRA: W <- W + lambda * s * (B' A' - B A) after the optimizer step."""
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    layer = adapted_layers(model)[0]
    randomize_(layer.lora_B)
    state = TrainState(model, None, None, method.start, 10)
    method.on_after_backward(state)
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    randomize_(layer.lora_A, layer.lora_B)  # stands in for the optimizer's step
    method.on_step_end(state)
    expected = method.config.delta_lambda * layer.scale * (layer.lora_B @ layer.lora_A - b @ a)
    torch.testing.assert_close(layer.weight_delta, expected)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():  # h = (W0 + ΔW_acc) x + b + s B A x
        want = x @ (layer.base.weight + expected).T + layer.base.bias + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def flora_equations(model, method):
    """Sec. 3 of FLoRA: with A frozen, dL/dB = s G A^T where G = dL/dW; resampling merges s B A,
    draws a new A and carries the momentum over as M A_old A_new^T (Algorithm 2)."""
    layer = adapted_layers(model)[0]
    assert not isinstance(layer.lora_A, torch.nn.Parameter) and layer.lora_B.requires_grad
    randomize_(layer.lora_B)
    x = torch.randn(6, layer.in_features)
    layer(x).pow(2).sum().backward()
    w = (layer.base.weight + layer.weight_delta + layer.scale * layer.lora_B @ layer.lora_A).detach().requires_grad_()
    torch.nn.functional.linear(x, w, layer.base.bias).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_B.grad, layer.scale * w.grad @ layer.lora_A.T, atol=1e-4, rtol=1e-4)
    layer.lora_B.grad = None
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    state = stepped_state(model, method)
    a_old, b_old = layer.lora_A.clone(), layer.lora_B.detach().clone()
    m_old = state.optimizer.state[layer.lora_B]["exp_avg"].clone()
    method.resample(state)
    torch.testing.assert_close(layer.weight_delta, layer.scale * b_old @ a_old)
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, a_old)
    torch.testing.assert_close(state.optimizer.state[layer.lora_B]["exp_avg"], m_old @ a_old @ layer.lora_A.T)
    # E[A^T A] = I_k for A ~ N(0, 1/r): the compressed update G A^T A is unbiased
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g) / math.sqrt(4000)
    torch.testing.assert_close(a.T @ a, torch.eye(3), atol=0.1, rtol=0)


def melora_equations(model, method):
    """Eq. (5) of MELoRA: ΔW = diag(B_1 A_1, ..., B_n A_n), rank up to n r with r (d + k) parameters."""
    layer = adapted_layers(model)[0]
    n, r = method.config.n_mini, method.config.rank
    assert sum(p.numel() for p in (layer.lora_A, layer.lora_B)) == r * (layer.in_features + layer.out_features)
    randomize_(layer.lora_B)
    dw = layer.delta_weight()
    d, k = layer.out_features // n, layer.in_features // n
    for i in range(n):
        for j in range(n):
            block = dw[i * d:(i + 1) * d, j * k:(j + 1) * k]
            want = layer.scale * layer.lora_B[i] @ layer.lora_A[i] if i == j else torch.zeros_like(block)
            torch.testing.assert_close(block, want)
    assert torch.linalg.matrix_rank(dw) == min(n * r, layer.out_features, layer.in_features)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)


def mora_equations(model, method):
    """Eq. (2) of MoRA with the sharing operators: r_hat = round(sqrt((d + k) r)); ΔW x = repeat(M sum_g x_g)."""
    layer = adapted_layers(model)[0]
    d, k, r = layer.out_features, layer.in_features, method.config.rank
    rh = int(math.sqrt((d + k) * r) + 0.5)
    assert layer.mora_M.shape == (rh, rh)
    randomize_(layer.mora_M)
    x = torch.randn(3, k)
    padded = torch.cat([x, x], dim=-1)[:, : math.ceil(k / rh) * rh]
    comp = sum(padded[:, g * rh:(g + 1) * rh] for g in range(math.ceil(k / rh)))
    out = comp @ layer.mora_M.T
    delta = torch.cat([out] * math.ceil(d / rh), dim=-1)[:, :d]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x @ layer.delta_weight().T, delta, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(layer.delta_weight()) > r  # high rank: beyond a rank-r LoRA


CASES = [
    Case("relora", {"rank": 4, "restart_every": 2, "restart_warmup_steps": 1}, equations=relora_equations),
    Case("cola", {"rank": 4, "chain_length": 3}, equations=cola_equations),
    Case("delta-lora", {"rank": 4, "update_start_ratio": 0.0}, equations=delta_lora_equations),
    Case("flora", {"rank": 4, "resample_every": 1}, equations=flora_equations),
    Case("melora", {"rank": 2, "n_mini": 4}, equations=melora_equations),
    Case("mora", {"rank": 4}, equations=mora_equations),
]


# -- learning procedure ----------------------------------------------------------------------------

def lora_dropout_equations(model, method):
    """Sec. 3.1 of LoRA Dropout: h = W0 x + s (m_B ⊙ B)(A ⊙ m_A) x, one inverted mask pair per pass."""
    from lorabench.methods.learning_procedure.lora_dropout import column_mask
    layer = adapted_layers(model)[0]
    randomize_(layer.lora_B)
    x = torch.randn(7, layer.in_features)
    layer.train()
    with torch.no_grad():
        torch.manual_seed(3)
        out = layer(x)
        torch.manual_seed(3)
        m_a = column_mask(layer.in_features, method.config.p_in, x)
        m_b = column_mask(layer.out_features, method.config.p_out, x)
        want = layer.base(x) + layer.scale * x @ (layer.lora_A * m_a).T @ (layer.lora_B * m_b[:, None]).T
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        assert (m_a == 0).any() and (m_b == 0).any(), "p is large enough in this case to drop something"
        layer.eval()  # evaluation: the expected update s B A
        torch.testing.assert_close(layer(x), layer.base(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T,
                                   atol=1e-5, rtol=1e-5)


def sibo_equations(model, method):
    """LoRA-SIBO: h = W0 x + s B A ((1 - lambda) x + lambda h0), h0 the input embedding of the token."""
    from lorabench.methods.learning_procedure.sibo import SiboVariant
    layers = adapted_layers(model)
    hidden = model.get_input_embeddings().embedding_dim
    assert all(not isinstance(m.variant, SiboVariant) for m in layers if m.in_features != hidden)
    assert any(m.in_features != hidden for m in layers), "the MLP's down projection stays plain LoRA"
    layer = layers[0]
    assert isinstance(layer.variant, SiboVariant)
    randomize_(layer.lora_B)
    seen = {}
    layer.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0], y=out))
    ids = torch.randint(1, 90, (2, 6))
    with torch.no_grad():
        model(input_ids=ids)
        h0 = method.holder.h0
        lam = method.config.lam
        want = layer.base(seen["x"]) + layer.scale * ((1 - lam) * seen["x"] + lam * h0) @ layer.lora_A.T @ layer.lora_B.T
        torch.testing.assert_close(seen["y"], want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(seen["y"], layer.base(seen["x"]) + layer.scale * seen["x"] @ layer.lora_A.T @ layer.lora_B.T)


# -- parameter reduction ---------------------------------------------------------------------------

def lora_sp_equations(model, method):
    """LoRA-SP: a fixed random half of A's and B's entries never changes, even under weight decay."""
    state = TrainState(model, None, None, 0, 10)
    method.on_train_begin(state)
    assert abs(state.metrics["updated_params"] / state.metrics["adapter_params"] - 0.5) < 0.1
    params = list(method.masks)
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    method.on_after_backward(state)
    opt.step()
    method.on_step_end(state)
    for p, b in zip(params, before):
        m = method.masks[p]
        assert torch.equal(p[~m], b[~m]), "a frozen entry moved"
        assert not torch.equal(p[m], b[m]), "no selected entry moved"


def aflora_equations(model, method):
    """AFLoRA: ΔW = s diag(b) B diag(d) A (eq. (1)); sensitivity EMA (eqs. (2)-(4)); cubic freezing (eq. (5))."""
    from lorabench.methods.efficiency_freezing_sharing.aflora import frozen_fraction
    layer = adapted_layers(model)[0]
    randomize_(layer.lora_b, layer.lora_d)
    x = torch.randn(3, layer.in_features)
    dw = layer.scale * torch.diag(layer.lora_b) @ layer.lora_B @ torch.diag(layer.lora_d) @ layer.lora_A
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    assert frozen_fraction(5, 100, 10, 30) == 0.0 and frozen_fraction(70, 100, 10, 30) == 1.0
    assert abs(frozen_fraction(40, 100, 10, 30) - (1 - 0.5 ** 3)) < 1e-9
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    proj = method.projections(model)
    for p in proj:
        p.grad = torch.randn_like(p)
    method.on_after_backward(TrainState(model, None, None, 0, 10))
    b1, b2 = method.config.beta1, method.config.beta2
    i = (proj[0] * proj[0].grad).abs()
    torch.testing.assert_close(method.ibar[proj[0]], (1 - b1) * i)
    torch.testing.assert_close(method.ubar[proj[0]], (1 - b2) * (i - (1 - b1) * i).abs())
    # after 40 of 100 steps the lowest-score projections freeze, as many as the cubic schedule says
    c = method.config
    method.on_step_end(TrainState(model, None, None, 39, 100))
    frozen = [p for p in proj if not p.requires_grad]
    want = math.floor(frozen_fraction(40, 100, round(100 * c.warmup_ratio), round(100 * c.final_ratio)) * len(proj))
    assert 0 < len(frozen) == want < len(proj)
    assert max(method.score[p] for p in frozen) <= min(method.score[p] for p in proj if p.requires_grad)


def dropbp_equations(model, method):
    """Eq. (2) of DropBP: y = x + f(x).detach() for a dropped sublayer: the forward is unchanged and
    only the dropped sublayer's parameters get no gradient."""
    model.train()
    ids = torch.randint(1, 90, (2, 6))

    def run(dropped):
        method.dropped = dropped
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks in both passes
        out = model(input_ids=ids).logits
        out.pow(2).mean().backward()
        return out.detach()
    inside = [{id(p) for p in m.parameters() if p.requires_grad} for m in method.sublayers]
    full = run(set())
    dropped = run({0})
    torch.testing.assert_close(dropped, full)
    trained = {id(p): p for p in model.parameters() if p.requires_grad}
    assert all(trained[i].grad is None for i in inside[0]), "a dropped sublayer got gradients"
    assert all(trained[i].grad is not None for i in inside[1]), "a kept sublayer lost its gradients"
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    for _ in range(200):
        method.on_step_begin(TrainState(model, None, None, 0, 10))
        assert len(method.dropped) < len(method.sublayers)
    assert abs(method.n_dropped / method.n_total - method.config.drop_rate) < 0.1


CASES += [
    Case("lora-dropout", {"rank": 4, "p_in": 0.3, "p_out": 0.3}, equations=lora_dropout_equations),
    Case("sibo", {"rank": 4, "lam": 0.3}, equations=sibo_equations),
    Case("lora-sp", {"rank": 4}, equations=lora_sp_equations),
    Case("aflora", {"rank": 4, "warmup_ratio": 0.0, "final_ratio": 0.0}, equations=aflora_equations),
    Case("dropbp", {"rank": 4, "drop_rate": 0.5}, equations=dropbp_equations),
]


def lte_equations(model, method):
    """LTE: training step t uses head t mod N; evaluation uses W + (s/N) sum_n B_n A_n, which the
    periodic merge (eq. (4)) folds into W without changing the evaluated function."""
    layer = adapted_layers(model)[0]
    n = method.config.heads
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    with torch.no_grad():
        for step in range(2 * n):
            method.on_step_begin(TrainState(model, None, None, step, 10))
            i = step % n
            layer.train()
            torch.testing.assert_close(layer(x), layer.base(x) + layer.scale * x @ layer.lora_A[i].T @ layer.lora_B[i].T,
                                       atol=1e-5, rtol=1e-5)
        layer.eval()
        mean = sum(layer.lora_B[j] @ layer.lora_A[j] for j in range(n)) / n
        evaluated = layer(x)
        torch.testing.assert_close(evaluated, layer.base(x) + layer.scale * x @ mean.T, atol=1e-5, rtol=1e-5)
    state = stepped_state(model, method, total_steps=100, step=method.every - 1)
    with torch.no_grad():
        mean = layer.scale * sum(layer.lora_B[j] @ layer.lora_A[j] for j in range(n)) / n
        evaluated = layer(x)
    method.on_step_end(state)
    assert method.merges == 1 and torch.count_nonzero(layer.lora_B) == 0
    torch.testing.assert_close(layer.weight_delta, mean)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), evaluated, atol=1e-5, rtol=1e-5)


CASES += [
    Case("lte", {"rank": 2, "heads": 2, "merge_every": 2}, equations=lte_equations),
]


def reslora_equations(model, method):
    """Input-shortcut ResLoRA (sec. 3.1): h_l = W0 x_l + s B_l A_l (x_l + x_{l-1}) while training; merged
    form s (1 + alpha_l) B_l A_l with alpha_l the running ||x_{l-1}|| / ||x_l|| (sec. 3.2)."""
    layers = [m for m in adapted_layers(model) if m.variant.prev is not None]
    upper = layers[0]
    lower = upper.variant.prev
    assert lower is not upper and lower.in_features == upper.in_features
    randomize_(upper.lora_B, lower.lora_B)
    seen = {}
    lower.register_forward_hook(lambda mod, inp, out: seen.update(x0=inp[0]))
    upper.register_forward_hook(lambda mod, inp, out: seen.update(x1=inp[0], y=out))
    model.train()
    with torch.no_grad():
        model(input_ids=torch.randint(1, 90, (2, 6)))
        x0, x1 = seen["x0"], seen["x1"]
        want = upper.base(x1) + upper.scale * (x1 + x0) @ upper.lora_A.T @ upper.lora_B.T
        torch.testing.assert_close(seen["y"], want, atol=1e-5, rtol=1e-5)
        ratio = (x0.norm(dim=-1) / x1.norm(dim=-1)).mean()
        torch.testing.assert_close(upper.reslora_alpha, (1 - method.config.alpha_momentum) * ratio)
        model.eval()
        x = torch.randn(3, upper.in_features)
        merged = upper.base(x) + upper.scale * (1 + upper.reslora_alpha) * x @ upper.lora_A.T @ upper.lora_B.T
        torch.testing.assert_close(upper(x), merged, atol=1e-5, rtol=1e-5)


CASES += [
    Case("reslora", {"rank": 4, "alpha_momentum": 0.5}, equations=reslora_equations),
]


def laplace_lora_equations(model, method):
    """Laplace-LoRA: P = F + λ I with F = Σ_i g_i² (diagonal empirical Fisher); λ maximises the Laplace
    evidence; the predictive averages softmax over θ ~ N(θ*, P^-1); ECE/NLL computed as defined."""
    from lorabench.methods.combining.laplace_lora import LaplaceLoRA, calibration
    # calibration: two predictions at confidence 0.9 (one right) and one at 0.6 (right) in 15 bins
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]]))
    c = calibration(logits, torch.tensor([0, 1, 1]))
    assert abs(c["ece"] - (2 / 3 * abs(0.5 - 0.9) + 1 / 3 * abs(1 - 0.6))) < 1e-6
    assert abs(c["nll"] - (-(math.log(0.9) + math.log(0.1) + math.log(0.6)) / 3)) < 1e-6
    # the evidence's maximiser: for F >> λ it is d / ||θ||² (d/dλ: -||θ||²/2 + d/(2λ) - Σ 1/(2(F_i + λ)) = 0)
    theta = torch.full((100,), 0.1)
    lam = LaplaceLoRA.prior_precision(theta, torch.full((100,), 1e6))
    assert abs(math.log10(lam) - math.log10(100 / 1.0)) <= 0.05 + 1e-9
    # Fisher on per-example gradients, scaled to the examples trained on
    from tests.methods.tester import batch_for
    kind = "bert" if hasattr(model, "bert") else "llama"
    batch = batch_for(kind, n=3)
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    method.recent, method.n_trained = [batch], 6
    factors = method.factors(model)
    randomize_(*[p for p, _ in factors], std=0.1)
    fisher = method.fisher(model, factors)
    want = [torch.zeros_like(p) for p, _ in factors]
    model.eval()
    for i in range(3):
        model.zero_grad(set_to_none=True)
        ex = {k: v[i:i + 1] for k, v in batch.items()}
        n_obs = 1 if ex["labels"].dim() == 1 else int((ex["labels"][:, 1:] != -100).sum())
        (model(**ex).loss * n_obs).backward()
        for w, (p, _) in zip(want, factors):
            w += p.grad ** 2
    model.zero_grad(set_to_none=True)
    for f, w in zip(fisher, want):
        torch.testing.assert_close(f, w * 2.0)  # 6 examples trained, 3 used
    # predictive: with P = F + λ, the eval forward is the linearised Laplace predictive, the Monte Carlo
    # average of softmax(f_θ*(x) + J(x) ε) over ε ~ N(0, P^-1)
    with torch.no_grad():
        for (_, prec), f in zip(factors, fisher):
            prec.copy_(f + 50.0)
    ids = batch["input_ids"][:2]
    plain = model.forward.__wrapped_plain__
    method.generator.manual_seed(7)
    out = model(input_ids=ids).logits
    # J ε exactly, by the double-backward trick: J ε = d/du <J^T u, ε> (eager attention: SDPA has no double backward)
    model.set_attn_implementation("eager")
    params = [p for p, _ in factors]
    with torch.enable_grad():
        f0 = plain(input_ids=ids).logits
        u = torch.zeros_like(f0, requires_grad=True)
        jt_u = torch.autograd.grad(f0, params, u, create_graph=True)   # J^T u, linear in u
    method.generator.manual_seed(7)
    jvps = []
    for _ in range(method.config.samples):
        eps = [torch.randn(p.shape, generator=method.generator) * prec.rsqrt() for p, prec in factors]
        with torch.enable_grad():
            jvps.append(torch.autograd.grad(sum((g * e).sum() for g, e in zip(jt_u, eps)), u, retain_graph=True)[0])
    assert jvps[0].abs().max() > 1e-3  # the posterior moves the logits: the check below is not vacuous
    probs = [(f0.detach() + jvp).softmax(-1) for jvp in jvps]
    want = torch.stack(probs).mean(0).log()
    torch.testing.assert_close(out, want, atol=2e-3, rtol=2e-3)


CASES += [
    Case("laplace-lora", {"rank": 4, "samples": 3, "fisher_examples": 4, "holdout_every": 2},
         equations=laplace_lora_equations),
]


def hiddenkey_equations(model, method):
    """HiddenKey: column-wise dropout of the attention logits (a dropped key is hidden from every query
    of a head, never a query's own key) and the bidirectional KL (KL(p1||p2) + KL(p2||p1)) / 2."""
    from lorabench.methods.learning_procedure.hiddenkey import hiddenkey_attention, symmetric_kl
    attn = next(m for m in model.modules() if hasattr(m, "hiddenkey_p"))
    assert attn.hiddenkey_p == method.config.p_column
    attn.train()
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    full = torch.zeros(2, 1, 5, 5)  # an additive mask that masks nothing (no causal default for a decoder)
    attn.hiddenkey_p = 1.0  # every other key dropped: each query sees only itself
    out, w = hiddenkey_attention(attn, q, k, v, full, 0.5)
    torch.testing.assert_close(out, v.transpose(1, 2))
    attn.hiddenkey_p = 0.5
    torch.manual_seed(5)
    out, w = hiddenkey_attention(attn, q, k, v, full, 0.5)
    torch.manual_seed(5)
    drop = (torch.rand(2, 2, 1, 5) < 0.5) & ~torch.eye(5, dtype=torch.bool)
    logits = (q @ k.transpose(2, 3) * 0.5).masked_fill(drop, torch.finfo(torch.float32).min)
    torch.testing.assert_close(w, logits.softmax(-1))
    assert ((w == 0) == drop).all() and drop.any(), "dropped columns get exactly zero weight"
    a, b = torch.randn(3, 4, 7), torch.randn(3, 4, 7)
    pa, pb = a.softmax(-1), b.softmax(-1)
    want = 0.5 * ((pa * (pa.log() - pb.log())).sum(-1) + (pb * (pb.log() - pa.log())).sum(-1)).mean()
    torch.testing.assert_close(symmetric_kl(a, b, None), want)
    assert float(symmetric_kl(a, a, None)) == 0.0
    # the second pass of extra_loss samples new masks: the consistency loss is positive while training
    model.train()
    batch = {"input_ids": torch.randint(1, 90, (2, 6))}
    model(**batch)
    assert method.extra_loss(TrainState(model, None, None, 0, 1, batch=batch)).item() > 0


CASES += [
    Case("hiddenkey", {"rank": 4, "p_column": 0.3, "p_hidden": 0.2}, equations=hiddenkey_equations),
]


def lora_drop_equations(model, method):
    """LoRA-Drop: importance I_i = mean ||ΔW_i x||² (eq. (2)), normalised; the most important layers up to
    the cumulative keep_ratio keep their LoRA, the others share one per shape (eq. (3))."""
    from lorabench.methods.lora import LoraLinear
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear))
    first = next(iter(layers.values()))
    randomize_(first.lora_B)
    first.train()
    x = torch.randn(2, 3, first.in_features)
    with torch.no_grad():
        first(x)
        want = (first.scale * x @ first.lora_A.T @ first.lora_B.T).pow(2).sum(-1)
    assert abs(first.importance_sum - float(want.sum())) < 1e-3 * max(1.0, float(want.sum()))
    assert first.importance_count == 6
    # crafted importances: layer i gets 2^-i, so the first few layers carry most of the total
    names = list(layers)
    for i, n in enumerate(names):
        layers[n].importance_sum, layers[n].importance_count = 2.0 ** -i, 1
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    metrics = {}
    method.prune(model, metrics)
    total = sum(2.0 ** -i for i in range(len(names)))
    n_keep, cum = 0, 0.0
    while cum < method.config.keep_ratio:
        cum += 2.0 ** -n_keep / total
        n_keep += 1
    assert metrics["kept_layer_fraction"] == round(n_keep / len(names), 4)
    pruned = [layers[n] for n in names[n_keep:]]
    tied = {id(m) for _, ms in method.ties for m in ms}
    for owner, members in method.ties:
        assert owner in pruned and all(m in pruned for m in members)
        for m in members:
            assert (m.in_features, m.out_features) == (owner.in_features, owner.out_features)
            assert torch.equal(m.lora_A, owner.lora_A) and torch.equal(m.lora_B, owner.lora_B)
    assert tied, "with these importances some pruned layers share a LoRA"
    owner, members = method.ties[0]
    for p in (owner.lora_A, members[0].lora_A):
        p.grad = torch.ones_like(p)
    method.on_after_backward(TrainState(model, None, None, 1, 10))
    assert torch.equal(owner.lora_A.grad, torch.full_like(owner.lora_A, 2.0)) and members[0].lora_A.grad is None


CASES += [
    Case("lora-drop", {"rank": 4, "keep_ratio": 0.5}, equations=lora_drop_equations),
]


def bilevel_split_check(model, method, upper_ids):
    """Each batch trains exactly one level: upper-level tensors on every upper_every-th step, the rest otherwise."""
    trainable = [p for _, p in method.trainable_parameters(model)]
    k = method.config.upper_every
    for step in (k - 1, k):
        for p in trainable:
            p.grad = torch.ones_like(p)
        method.on_after_backward(TrainState(model, None, None, step, 100))
        upper_step = step == k - 1
        for p in trainable:
            assert (p.grad is not None) == ((id(p) in upper_ids) == upper_step)


def bilora_equations(model, method):
    """BiLoRA: ΔW = s P diag(Λ) Q (eq. (1)), R = ||PᵀP - I||² + ||QQᵀ - I||² (eq. (2)), Λ on validation steps."""
    from lorabench.methods.learning_procedure.bilora import orthogonality
    layer = adapted_layers(model)[0]
    assert torch.count_nonzero(layer.lora_E) == 0 and torch.count_nonzero(layer.lora_B) > 0
    # P and Q start semi-orthogonal: the regulariser starts at its minimum, whatever the layer's width
    assert all(orthogonality(m).item() < 1e-8 for m in adapted_layers(model))
    randomize_(layer.lora_E)
    x = torch.randn(3, layer.in_features)
    dw = layer.scale * layer.lora_B @ torch.diag(layer.lora_E) @ layer.lora_A
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), dw)
    eye = torch.eye(layer.rank)
    want = ((layer.lora_B.T @ layer.lora_B - eye) ** 2).sum() + ((layer.lora_A @ layer.lora_A.T - eye) ** 2).sum()
    torch.testing.assert_close(orthogonality(layer), want)
    with torch.no_grad():  # orthonormal P and Q: no penalty
        q = torch.linalg.qr(torch.randn(layer.in_features, layer.rank))[0]
        p = torch.linalg.qr(torch.randn(layer.out_features, layer.rank))[0]
        layer.lora_A.copy_(q.T), layer.lora_B.copy_(p)
    assert orthogonality(layer).item() < 1e-8
    reg = method.extra_loss(TrainState(model, None, None, 0, 100))
    assert reg is not None and method.extra_loss(TrainState(model, None, None, method.config.upper_every - 1, 100)) is None
    bilevel_split_check(model, method, {id(m.lora_E) for m in adapted_layers(model)})


def autolora_equations(model, method):
    """AutoLoRA: ΔW = s B diag(softmax(logits)) A (eq. (1)); α learns on validation steps during the search;
    afterwards components with α_j < threshold are removed and α is frozen."""
    layer = adapted_layers(model)[0]
    randomize_(layer.lora_B, layer.lora_alpha_logits)
    x = torch.randn(3, layer.in_features)
    a = layer.lora_alpha_logits.softmax(-1)
    dw = layer.scale * layer.lora_B @ torch.diag(a) @ layer.lora_A
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    method.on_train_begin(TrainState(model, None, None, 0, 100))
    bilevel_split_check(model, method, {id(m.lora_alpha_logits) for m in adapted_layers(model)})
    metrics = {}
    method.fix_ranks(model, metrics)
    keep = a >= 1.0 / layer.rank
    assert torch.equal(layer.rank_mask.bool(), keep) and not layer.lora_alpha_logits.requires_grad
    assert metrics["rank_min"] >= 1 and metrics["rank_max"] <= layer.rank
    dw = layer.scale * layer.lora_B @ torch.diag(a * keep) @ layer.lora_A
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)


CASES += [
    Case("bilora", {"rank": 4, "upper_every": 2}, equations=bilora_equations),
    Case("autolora", {"rank": 4, "upper_every": 2, "search_ratio": 0.7}, equations=autolora_equations),
]


def salora_equations(model, method):
    """SaLoRA: ΔW = s B diag(g) A with hard-concrete gates g; expected density
    sigmoid(log_alpha - beta log(-gamma/zeta)); Lagrangian lambda1 (d - t) + lambda2 (d - t)^2 with
    multipliers ascended (their gradients negated)."""
    from lorabench.methods.dynamic_rank.salora import BETA, GAMMA, ZETA
    layer = adapted_layers(model)[0]
    randomize_(layer.lora_B)
    with torch.no_grad():
        layer.lora_gate.copy_(torch.linspace(-3, 3, layer.rank))
    la = layer.lora_gate.detach()
    g_eval = (torch.sigmoid(la) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
    x = torch.randn(3, layer.in_features)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + layer.scale * x @ (layer.lora_B * g_eval @ layer.lora_A).T,
                                   atol=1e-5, rtol=1e-5)
        layer.train()
        torch.manual_seed(11)
        y = layer(x)
        torch.manual_seed(11)
        u = torch.rand(layer.rank).clamp(1e-6, 1 - 1e-6)
        g = (torch.sigmoid((u.log() - (1 - u).log() + la) / BETA) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        torch.testing.assert_close(y, layer.base(x) + layer.scale * x @ (layer.lora_B * g @ layer.lora_A).T,
                                   atol=1e-5, rtol=1e-5)
    from lorabench.methods.dynamic_rank.salora import expected_density
    torch.testing.assert_close(expected_density(la), torch.sigmoid(la - BETA * math.log(-GAMMA / ZETA)).mean())
    state = TrainState(model, None, None, 0, 10)
    with torch.no_grad():
        method.multipliers.copy_(torch.tensor([0.5, 2.0]))
    method.multipliers.grad = None
    loss = method.extra_loss(state)
    loss.backward()
    gap = method.density(model).item() - method.config.target_density
    method.on_after_backward(state)
    torch.testing.assert_close(method.multipliers.grad, -torch.tensor([gap, gap ** 2]), atol=1e-6, rtol=1e-5)


CASES += [
    Case("salora", {"rank": 4, "target_density": 0.5}, equations=salora_equations),
]


def increlora_equations(model, method):
    """IncreLoRA: ΔW = s P diag(λ ⊙ m) Q (eq. (3)); growth activates the next component of the
    highest-scoring layers with λ = 0, so the function does not change; budget spent over the events."""
    layers = adapted_layers(model)
    layer = layers[0]
    c = method.config
    assert int(layer.rank_mask.sum()) == c.init_rank and layer.lora_A.shape[0] == c.rank
    randomize_(layer.lora_E)
    x = torch.randn(3, layer.in_features)
    dw = layer.scale * layer.lora_B @ torch.diag(layer.lora_E * layer.rank_mask) @ layer.lora_A
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + x @ dw.T, atol=1e-5, rtol=1e-5)
    method.on_train_begin(TrainState(model, None, None, 0, 100))
    assert sum(method.per_event) == round((c.target_rank - c.init_rank) * len(layers))
    for i, m in enumerate(layers):
        method.score[id(m)] = float(i)      # the last layers score highest
    with torch.no_grad():
        before = layer(x)
    chosen = method.grow(model, 2)
    assert chosen == layers[::-1][:2]
    assert all(int(m.rank_mask.sum()) == c.init_rank + 1 for m in chosen)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), before)
    # the sensitivity EMA (eqs. (4)-(6)) after one backward
    for m in layers:
        for p in (m.lora_A, m.lora_B, m.lora_E):
            p.grad = torch.randn_like(p)
    method.ibar, method.ubar = {}, {}
    method.on_after_backward(TrainState(model, None, None, 0, 100))
    i = (layer.lora_A * layer.lora_A.grad).abs()
    torch.testing.assert_close(method.ibar[layer.lora_A], (1 - c.beta1) * i)


CASES += [
    Case("increlora", {"rank": 6, "init_rank": 2, "target_rank": 3, "grow_every": 1, "warmup_ratio": 0.0,
                       "final_ratio": 0.0}, equations=increlora_equations),
]


def loraprune_equations(model, method):
    """LoRAPrune: importance |(W + s B A) ⊙ s (∇B A + B ∇A)| summed per channel (eq. (8)) with an EMA
    (eq. (9)); the lowest channels are masked to a cubic sparsity schedule; masked channels output 0."""
    from lorabench.methods.efficiency_pruning.loraprune import cubic_sparsity
    assert cubic_sparsity(5, 10, 70, 0.2) == 0.0 and cubic_sparsity(80, 10, 70, 0.2) == 0.2
    assert abs(cubic_sparsity(40, 10, 70, 0.2) - 0.2 * (1 - 0.5 ** 3)) < 1e-12
    group = method.groups[0]
    m = group[0]
    randomize_(m.lora_B)
    method.on_train_begin(TrainState(model, None, None, 0, 10))
    for layers in method.groups:
        for layer in layers:
            layer.lora_A.grad, layer.lora_B.grad = torch.randn_like(layer.lora_A), torch.randn_like(layer.lora_B)
    method.on_after_backward(TrainState(model, None, None, 0, 10))
    want = 0
    for layer in group:
        w = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
        g = layer.scale * (layer.lora_B.grad @ layer.lora_A + layer.lora_B @ layer.lora_A.grad)
        want = want + (w * g).abs().sum(1)
    torch.testing.assert_close(method.importance[0], want)
    first = method.importance[0].clone()
    method.on_after_backward(TrainState(model, None, None, 1, 10))   # same gradients: the EMA is a fixed point
    torch.testing.assert_close(method.importance[0], first)
    # crafted importances: channel c of group g scores g * 1000 + c; 25% sparsity masks the lowest quarter
    for g, layers in enumerate(method.groups):
        method.importance[g] = torch.arange(layers[0].out_features, dtype=torch.float32) + 1000.0 * g
    method.prune_to(0.25)
    flat = torch.cat([layers[0].channel_mask for layers in method.groups])
    assert int((flat == 0).sum()) == int(0.25 * flat.numel())
    assert flat[: int(0.25 * flat.numel())].eq(0).all(), "the lowest-importance channels go first"
    assert all(torch.equal(layer.channel_mask, layers[0].channel_mask) for layers in method.groups for layer in layers)
    x = torch.randn(3, m.in_features)
    with torch.no_grad():
        full = m.base(x) + m.scale * x @ m.lora_A.T @ m.lora_B.T
        torch.testing.assert_close(m(x), full * m.channel_mask, atol=1e-5, rtol=1e-5)


CASES += [
    Case("loraprune", {"rank": 4, "sparsity": 0.5, "prune_start_ratio": 0.0, "prune_end_ratio": 0.5},
         equations=loraprune_equations),
]


def layer_pruning_equations(model, method):
    """Layer pruning: the chosen layers are gone, the rest keep their order and weights, re-indexed."""
    from lorabench.methods.efficiency_pruning.lora_layer_pruning import layer_stack, layers_to_keep
    assert layers_to_keep(8, 0.25, "top") == [0, 1, 2, 3, 4, 5]
    assert layers_to_keep(8, 0.25, "alternate") == [0, 1, 2, 3, 4, 6]
    assert layers_to_keep(2, 0.95, "top") == [0]
    from tests.methods.tester import tiny_model
    kind = "bert" if hasattr(model, "bert") else "llama"
    original, _ = tiny_model(kind)
    stack, orig = layer_stack(model), layer_stack(original)
    keep = layers_to_keep(len(orig), method.config.prune_ratio, method.config.which)
    assert len(stack) == len(keep) == model.config.num_hidden_layers < len(orig)
    for new, old in enumerate(keep):
        w_new = dict(stack[new].named_parameters())
        for n, p in orig[old].named_parameters():
            key = n if n in w_new else n.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
            assert torch.equal(w_new[key], p), f"layer {new} is not the original layer {old} ({n})"
        for m in stack[new].modules():
            if hasattr(m, "layer_idx"):
                assert m.layer_idx == new


CASES += [
    Case("lora-layer-pruning", {"rank": 4, "prune_ratio": 0.5}, identity_at_init=False,
         equations=layer_pruning_equations),
]


def alora_equations(model, method):
    """ALoRA: ΔW = s B diag(g) A; a component's ablation score is the first-order loss increase when its
    gate goes 1 -> 0, -∂L/∂g_j; reallocation prunes the lowest-scoring components and gives as many new
    ones (B column 0: no jump) to the layers with the most important components, keeping the budget."""
    layers = adapted_layers(model)
    layer = layers[0]
    c = method.config
    assert int(layer.rank_gate.sum()) == c.init_rank
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    layer.train()
    method.on_train_begin(TrainState(model, None, None, 0, 100))
    out = layer(x)
    loss = out.pow(2).sum()
    loss.backward()
    method.on_after_backward(TrainState(model, None, None, 0, 100))
    g = layer.rank_gate.clone().requires_grad_(True)
    ref = (layer.base(x) + ((x @ layer.lora_A.T) * g) @ layer.lora_B.T * layer.scale).pow(2).sum()
    (dg,) = torch.autograd.grad(ref, g)
    torch.testing.assert_close(method.ablation[id(layer)], -dg.detach())
    layer.eval()
    budget = sum(int(m.rank_gate.sum()) for m in layers)
    for i, m in enumerate(layers):   # layer i's active components score i + j/100
        method.ablation[id(m)] = torch.tensor([i + j / 100 for j in range(m.rank)])
    lowest = (0, 0)
    n = method.reallocate(model)
    assert n > 0 and sum(int(m.rank_gate.sum()) for m in layers) == budget
    assert layers[lowest[0]].rank_gate[lowest[1]] == 0 or int(layers[-1].rank_gate.sum()) > c.init_rank
    assert int(layers[-1].rank_gate.sum()) > c.init_rank, "the most important layer gained a component"
    newest = int(layers[-1].rank_gate.nonzero()[-1])
    assert torch.count_nonzero(layers[-1].lora_B[:, newest]) == 0


CASES += [
    Case("alora", {"rank": 6, "init_rank": 4, "realloc_every": 1, "realloc_fraction": 0.25, "final_ratio": 0.0},
         equations=alora_equations),
]
