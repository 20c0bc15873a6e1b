"""Methods-table rows of Methods I (issue 6): the core LoRA family, each with its paper's equations."""
import math

import torch

from tests.methods.tester import Case


def first_layer(model, cls=None):
    from lorabench.methods.lora import LoraLinear
    cls = cls or LoraLinear
    return next(m for m in model.modules() if isinstance(m, cls))


def bias_of(layer):
    """The base layer's bias, 0 where it has none (Llama)."""
    return 0.0 if layer.base.bias is None else layer.base.bias


def randomize_(*tensors, std=0.3):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn_like(t) * std)


def lora_out(layer, x, scale):
    return x @ layer.base.weight.T + bias_of(layer) + scale * (x @ layer.lora_A.T @ layer.lora_B.T)


def rslora_equations(model, method):
    """Theorem 3.2 of rsLoRA: gamma_r = alpha / sqrt(r)."""
    layer = first_layer(model)
    c = method.config
    assert layer.scale == c.alpha / math.sqrt(c.rank)
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lora_out(layer, x, c.alpha / math.sqrt(c.rank)), atol=1e-5, rtol=1e-5)


def init_b_equations(model, method):
    """Init[B] of arXiv 2406.08447: A = 0 and B random, so B A = 0 at init; then eq. (3) of LoRA."""
    layer = first_layer(model)
    assert torch.count_nonzero(layer.lora_A) == 0 and torch.count_nonzero(layer.lora_B) > 0
    randomize_(layer.lora_A)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lora_out(layer, x, layer.scale), atol=1e-5, rtol=1e-5)


def dora_equations(model, method):
    """DoRA eq. (2): m = ||W0||_c at init; eq. (5): W' = m (W0 + sBA) / ||W0 + sBA||_c."""
    layer = first_layer(model)
    W0 = layer.base.weight.detach().clone()
    torch.testing.assert_close(layer.lora_magnitude.detach(), W0.norm(dim=1))
    randomize_(layer.lora_B)
    with torch.no_grad():
        layer.lora_magnitude.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude))
        V = W0 + layer.scale * layer.lora_B @ layer.lora_A
        W = layer.lora_magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
        x = torch.randn(3, layer.in_features)
        torch.testing.assert_close(layer(x), x @ W.T + bias_of(layer), atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer.base.weight, W, atol=1e-5, rtol=1e-5)


def svd_equations(minor):
    def check(model, method):
        """PiSSA eqs. (2)-(4) / MiLoRA sec. 3: s B A = U_r S_r V_r^T of the r principal (minor) components
        and W_res = W - s B A, so W_res + s B A = W."""
        from tests.methods.tester import tiny_model
        layer = first_layer(model)
        name = next(n for n, m in model.named_modules() if m is layer)
        original, _ = tiny_model("bert" if "bert" in name else "llama")
        W = original.get_submodule(name).weight.detach()
        r = layer.rank
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        sl = slice(-r, None) if minor else slice(0, r)
        expected = U[:, sl] @ torch.diag(S[sl]) @ Vh[sl]
        with torch.no_grad():
            torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.base.weight + layer.delta_weight(), W, atol=1e-5, rtol=1e-4)
            # the residual keeps the other singular values
            rest = torch.linalg.svdvals(layer.base.weight)
            kept = S[:-r] if minor else S[r:]
            torch.testing.assert_close(rest[: kept.numel()], kept, atol=1e-4, rtol=1e-4)
    return check


def lora_fa_equations(model, method):
    """LoRA-FA sec. 3: A frozen (random), B trainable and zero at init."""
    layer = first_layer(model)
    assert not layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) == 0
    names = {n for n, _ in method.trainable_parameters(model)}
    assert not any(n.endswith("lora_A") for n in names)


def lora_plus_equations(model, method):
    """LoRA+ sec. 4: eta_B = lambda eta_A; every other trained tensor keeps eta_A."""
    groups = method.param_groups(model, 1e-3, 0.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for n, p in method.trainable_parameters(model):
        want = 1e-3 * method.config.lr_ratio if n.endswith("lora_B") else 1e-3
        assert lr_of[id(p)] == want, (n, lr_of[id(p)], want)


def vera_equations(model, method):
    """VeRA eq. (1): h = W0 x + Λ_b B Λ_d A x, with A, B shared by every layer, b = 0 and d = d_initial at init."""
    from lorabench.methods.efficiency_freezing_sharing.vera import VeraLinear
    layers = [m for m in model.modules() if isinstance(m, VeraLinear)]
    assert len(layers) > 2
    a0 = layers[0].vera_A
    assert all(m.vera_A.data_ptr() == a0.data_ptr() for m in layers), "A is not shared"
    assert not any(n.endswith(("vera_A", "vera_B")) for n, _ in method.trainable_parameters(model))
    layer = layers[0]
    assert torch.count_nonzero(layer.vera_lambda_b) == 0
    assert torch.all(layer.vera_lambda_d == method.config.d_initial)
    randomize_(layer.vera_lambda_b, layer.vera_lambda_d)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        dW = torch.diag(layer.vera_lambda_b) @ layer.vera_B @ torch.diag(layer.vera_lambda_d) @ layer.vera_A
        torch.testing.assert_close(layer(x), x @ (layer.base.weight + dW).T + bias_of(layer), atol=1e-5, rtol=1e-5)


def original_weight(model, layer):
    from tests.methods.tester import tiny_model
    name = next(n for n, m in model.named_modules() if m is layer)
    original, _ = tiny_model("bert" if "bert" in name else "llama")
    return original.get_submodule(name).weight.detach()


def qlora_equations(model, method):
    """QLoRA eq. (5): Y = X dequant(W_NF4) + s X A^T B^T; NF4 error within half the widest code gap x absmax."""
    from lorabench.ops.modules import NF4Linear
    layer = first_layer(model)
    assert isinstance(layer.base, NF4Linear)
    W = original_weight(model, layer)
    Wq = layer.base.dequantize()
    absmax = W.reshape(-1, method.config.blocksize).abs().amax(1).repeat_interleave(method.config.blocksize)
    err = (W.reshape(-1) - Wq.reshape(-1)).abs()
    # widest NF4 gap: -0.6962 - (-1); 5% slack for the double-quantized absmax
    assert torch.all(err <= absmax * (1 - 0.6961928009986877) / 2 * 1.05)
    assert err.max() > 0
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = x @ Wq.T + bias_of(layer) + layer.scale * (x @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def nf4_of(W):
    from lorabench.ops.modules import NF4Linear
    lin = torch.nn.Linear(W.shape[1], W.shape[0])
    with torch.no_grad():
        lin.weight.copy_(W)
    return NF4Linear.from_linear(lin).dequantize()


def loftq_equations(model, method):
    """LoftQ Algorithm 1: after T alternating steps ||W - Q - s B A||_F is below QLoRA's initial error ||W - q_N(W)||_F."""
    layer = first_layer(model)
    W = original_weight(model, layer)
    with torch.no_grad():
        loftq_err = torch.linalg.norm(W - layer.base.dequantize() - layer.delta_weight())
        qlora_err = torch.linalg.norm(W - nf4_of(W))
    assert loftq_err < 0.95 * qlora_err, (loftq_err, qlora_err)


def qa_lora_equations(model, method):
    """QA-LoRA sec. 3.3: y = W_int4 x + s B A pool(x), A: (r, in/g); merging moves only the zero points."""
    layer = first_layer(model)
    g = method.config.group_size
    assert layer.lora_A.shape == (method.config.rank, layer.in_features // g)
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        pooled = x.reshape(3, -1, g).mean(-1)
        expected = x @ layer.base.dequantize().T + bias_of(layer) + layer.scale * (pooled @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        packed, scales = layer.base.packed.clone(), layer.base.scales.clone()
        layer.merge()
        assert torch.equal(layer.base.packed, packed) and torch.equal(layer.base.scales, scales)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def adalora_equations(model, method):
    """AdaLoRA eq. (3): ΔW = P Λ Q scaled by alpha/r; eq. (4) regulariser; eqs. (7), (12): pruning to the budget."""
    from lorabench.methods.dynamic_rank.adalora import SVDLinear, budget_schedule
    from lorabench.methods.base import TrainState
    layers = [m for m in model.modules() if isinstance(m, SVDLinear)]
    layer = layers[0]
    assert torch.count_nonzero(layer.lora_E) == 0
    randomize_(layer.lora_E)
    x = torch.randn(3, layer.in_features)
    c = method.config
    with torch.no_grad():
        dW = layer.lora_B @ torch.diag(layer.lora_E.view(-1)) @ layer.lora_A * (c.alpha / c.init_rank)
        torch.testing.assert_close(layer(x), x @ (layer.base.weight + dW).T + bias_of(layer), atol=1e-5, rtol=1e-4)
    state = TrainState(model=model, optimizer=None, scheduler=None, step=0, total_steps=100)
    reg = method.extra_loss(state)
    eye = torch.eye(c.init_rank)
    want = torch.stack([torch.linalg.norm(t, "fro") for m in layers for t in
                        (m.lora_A @ m.lora_A.T - eye, m.lora_B.T @ m.lora_B - eye)]).mean() * c.orth_reg_weight
    torch.testing.assert_close(reg, want)
    # the schedule: full budget during warm-up, cubic decrease, target budget at the end
    assert budget_schedule(5, 100, 10, 20, 120, 80, 1) == (120, False)
    assert budget_schedule(10 + 35, 100, 10, 20, 120, 80, 5)[0] == int(40 * (1 - 35 / 70) ** 3 + 80)
    assert budget_schedule(90, 100, 10, 20, 120, 80, 7) == (80, True)
    # pruning keeps exactly the budget of triplets with the highest scores
    method.on_train_begin(state)
    for m in layers:
        for p in (m.lora_A, m.lora_E, m.lora_B):
            p.grad = torch.randn_like(p)
    randomize_(*[m.lora_E for m in layers])
    method.update_importance(layers)
    budget = method.init_bgt - 5
    method.mask_to_budget(layers, budget)
    assert sum(int(torch.count_nonzero(m.lora_E)) for m in layers) == budget


def fourierft_equations(model, method):
    """FourierFT eqs. (2)-(4): ΔW = alpha Re(IDFT2(F)), F zero except the n coefficients at the seeded entries E."""
    from lorabench.methods.efficiency_freezing_sharing.fourierft import FourierLinear
    layers = [m for m in model.modules() if isinstance(m, FourierLinear)]
    layer = layers[0]
    assert layer.fourierft_spectrum.numel() == min(method.config.n_frequency, layer.in_features * layer.out_features)
    same_shape = [m for m in layers if (m.in_features, m.out_features) == (layer.in_features, layer.out_features)]
    assert all(torch.equal(m.indices, layer.indices) for m in same_shape)  # one E for the model
    d, k = layer.out_features, layer.in_features
    Fm = torch.zeros(d, k, dtype=torch.complex64)
    Fm[layer.indices[0], layer.indices[1]] = layer.fourierft_spectrum.detach().to(torch.complex64)
    # the inverse DFT written out: ΔW[p,q] = 1/(dk) Σ_uv F[u,v] exp(2πi (up/d + vq/k))
    p_, u = torch.arange(d), torch.arange(d)
    q_, v = torch.arange(k), torch.arange(k)
    Ed = torch.exp(2j * torch.pi * torch.outer(p_, u).double() / d)
    Ek = torch.exp(2j * torch.pi * torch.outer(v, q_).double() / k)
    dW = (Ed @ Fm.to(torch.complex128) @ Ek).real / (d * k) * method.config.scaling
    torch.testing.assert_close(layer.delta_weight().double(), dW, atol=1e-4, rtol=1e-4)
    x = torch.randn(3, k)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base.weight + dW.float()).T + bias_of(layer), atol=1e-4, rtol=1e-4)


def vb_lora_equations(model, method):
    """VB-LoRA eq. (3): each sub-vector of A and B = softmax(top-k logits) · chosen bank vectors; one bank per model."""
    from lorabench.methods.efficiency_freezing_sharing.vb_lora import VBLoraLinear
    layers = [m for m in model.modules() if isinstance(m, VBLoraLinear)]
    assert all(m.bank is layers[0].bank for m in layers)
    assert sum(1 for n, _ in method.trainable_parameters(model) if n.endswith(".bank")) == 1
    layer, c = layers[0], method.config
    A, B = layer.factors()
    la = layer.vblora_logits_A.detach()
    i, j = 1, 0  # sub-vector j of row i of A
    top, idx = la[i, j].topk(c.topk)
    w = torch.softmax(top, 0)
    want = sum(w[t] * layer.bank[idx[t]] for t in range(c.topk))
    b = c.vector_length
    torch.testing.assert_close(A[i, j * b:(j + 1) * b], want)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.base.weight + B @ A).T + bias_of(layer), atol=1e-5, rtol=1e-5)


def riemannian_equations(model, method):
    """Riemannian preconditioned LoRA eq. (4): ∇A <- (BᵀB + δI)⁻¹ ∇A, ∇B <- ∇B (AAᵀ + δI)⁻¹."""
    from lorabench.methods.learning_procedure.riemannian import precondition_
    layer = first_layer(model)
    randomize_(layer.lora_B)
    A, B = layer.lora_A, layer.lora_B
    gA, gB = torch.randn_like(A), torch.randn_like(B)
    A.grad, B.grad = gA.clone(), gB.clone()
    d = method.config.delta
    precondition_(A, B, d)
    eye = torch.eye(A.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(A.grad, torch.linalg.inv(B.T @ B + d * eye) @ gA, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(B.grad, gB @ torch.linalg.inv(A @ A.T + d * eye), atol=1e-4, rtol=1e-4)


def lora_xs_equations(model, method):
    """LoRA-XS eq. (2): h = W0 x + s B R A x with B = U_r Σ_r, A = V_r^T frozen, only R (r x r) trained."""
    layer = first_layer(model)
    W = layer.base.weight.detach()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = layer.rank
    torch.testing.assert_close((layer.lora_B @ layer.lora_A).detach(), U[:, :r] @ torch.diag(S[:r]) @ Vh[:r],
                               atol=1e-5, rtol=1e-4)
    trained = {n.rsplit(".", 1)[-1] for n, _ in method.trainable_parameters(model) if "lora_" in n}
    assert trained == {"lora_R"}
    assert set(k.rsplit(".", 1)[-1] for k in method.adapter_state_dict(model) if "lora_" in k) == {"lora_R"}
    randomize_(layer.lora_R)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        want = x @ W.T + bias_of(layer) + layer.scale * x @ (layer.lora_B @ layer.lora_R @ layer.lora_A).T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def sora_equations(model, method):
    """SoRA eq. (4): h = W0 x + s B diag(g) A x; eq. (6): g <- sign(g) max(|g| - ηλ, 0)."""
    from lorabench.methods.dynamic_rank.sora import soft_threshold_
    layer = first_layer(model)
    gates = torch.cat([m.lora_gate.detach() for m in model.modules() if hasattr(m, "lora_gate")])
    assert gates.unique().numel() == gates.numel() and 0.5 < gates.std() < 1.5   # g ~ N(0, I), official init
    randomize_(layer.lora_B, layer.lora_gate)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        want = x @ layer.base.weight.T + bias_of(layer) + layer.scale * x @ (
            layer.lora_B @ torch.diag(layer.lora_gate) @ layer.lora_A).T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    g = torch.tensor([0.5, -0.05, 0.02, -0.9])
    soft_threshold_(g, 0.1)
    torch.testing.assert_close(g, torch.tensor([0.4, 0.0, 0.0, -0.8]))


def dylora_equations(model, method):
    """DyLoRA eq. (3): at sampled rank b, h = W0 x + (alpha/b) B_{:,1:b} A_{1:b} x; eqs. (5)-(6): only row b learns."""
    from lorabench.methods.base import TrainState
    layer = first_layer(model)
    assert layer.active_rank == method.config.rank
    randomize_(layer.lora_B)
    x = torch.randn(3, layer.in_features)
    state = TrainState(model=model, optimizer=None, scheduler=None, step=0, total_steps=10)
    seen = set()
    for _ in range(12):
        method.on_step_begin(state)
        b = method.sampled
        seen.add(b)
        assert 1 <= b <= method.config.rank and layer.active_rank == b
        with torch.no_grad():
            want = x @ layer.base.weight.T + bias_of(layer) + (method.config.alpha / b) * (
                x @ layer.lora_A[:b].T @ layer.lora_B[:, :b].T)
            torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert len(seen) > 1, "the rank is not sampled"
    layer.lora_A.grad, layer.lora_B.grad = torch.ones_like(layer.lora_A), torch.ones_like(layer.lora_B)
    method.on_after_backward(state)
    b = method.sampled
    rows = layer.lora_A.grad.abs().sum(1)
    assert torch.all(rows[: b - 1] == 0) and torch.all(rows[b - 1:] > 0)
    method.on_train_end(state)
    assert layer.active_rank == method.config.rank


def dora_rank_equations(model, method):
    """arXiv 2405.17357: ΔW = s Σ c_i b_i a_i with c = 0 at init; importance s_i = ||c_i b_i a_i||_F / ||ΔW||_F; the
    lowest-scoring components of the whole model are pruned (c_i = 0) on the cubic schedule."""
    from lorabench.methods.base import TrainState
    from lorabench.methods.dynamic_rank.dora_rank import component_scores
    layers = method.lora_layers(model)
    layer = layers[0]
    assert torch.count_nonzero(layer.lora_gate) == 0 and torch.count_nonzero(layer.lora_B) > 0
    randomize_(*[m.lora_gate for m in layers])
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        dW = sum(layer.lora_gate[i] * torch.outer(layer.lora_B[:, i], layer.lora_A[i]) for i in range(layer.rank))
        torch.testing.assert_close(layer(x), x @ (layer.base.weight + layer.scale * dW).T + bias_of(layer),
                                   atol=1e-5, rtol=1e-5)
        want = torch.stack([(layer.lora_gate[i] * torch.outer(layer.lora_B[:, i], layer.lora_A[i])).norm()
                            for i in range(layer.rank)]) / dW.norm()
        torch.testing.assert_close(component_scores(layer, 0.0), want, atol=1e-5, rtol=1e-4)
    c = method.config
    state = TrainState(model=model, optimizer=None, scheduler=None, step=0, total_steps=20)
    method.on_train_begin(state)
    assert method.extra_loss(state) is not None
    for step in range(20):
        state.step = step
        method.on_step_end(state)
    n = sum(m.rank for m in layers)
    alive = sum(int(torch.count_nonzero(m.lora_gate)) for m in layers)
    assert alive == n - int(n * (c.rank - c.target_rank) / c.rank), (alive, n)
    state.step = 20
    assert method.extra_loss(state) is None  # the modulator is off after pruning


CASES = [
    Case("rslora", {"rank": 4, "alpha": 8}, models=("llama",), equations=rslora_equations),
    Case("lora-init-b", {"rank": 4, "alpha": 8}, models=("bert", "llama"),
         equations=init_b_equations),
    Case("dora", {"rank": 4, "alpha": 8}, equations=dora_equations),
    Case("dora", {"rank": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["query", "v_proj"]},
         id="dora-dropout", models=("bert",)),
    Case("dora", {"rank": 4, "alpha": 8, "kernel": "fused"}, id="dora-fused", models=("llama",)),
    Case("pissa", {"rank": 4, "alpha": 4}, models=("bert",), equations=svd_equations(minor=False)),
    Case("pissa", {"rank": 2, "alpha": 8, "svd": "lowrank", "target_modules": ["value", "v_proj"]},
         id="pissa-lowrank", models=("llama",)),
    Case("milora", {"rank": 4, "alpha": 4}, models=("llama",), equations=svd_equations(minor=True)),
    Case("lora-fa", {"rank": 4, "alpha": 8}, models=("bert",), equations=lora_fa_equations),
    Case("lora-plus", {"rank": 4, "alpha": 8, "lr_ratio": 16}, models=("bert",), equations=lora_plus_equations),
    Case("vera", {"rank": 16}, equations=vera_equations),
    Case("qlora", {"rank": 4, "alpha": 8}, identity_at_init=False, equations=qlora_equations),
    Case("loftq", {"rank": 4, "alpha": 8, "iterations": 3}, identity_at_init=False, models=("llama",),
         equations=loftq_equations),
    Case("qa-lora", {"rank": 4, "alpha": 8, "group_size": 32}, identity_at_init=False, models=("bert",), equations=qa_lora_equations),
    Case("fourierft", {"n_frequency": 64, "scaling": 10.0}, identity_at_init=False, models=("bert",), equations=fourierft_equations),
    Case("fourierft", {"n_frequency": 32, "init_zero": True}, id="fourierft-zero-init", models=("llama",)),
    Case("vb-lora", {"rank": 2, "num_vectors": 16, "vector_length": 8, "topk": 2}, identity_at_init=False, models=("llama",),
         equations=vb_lora_equations),
    Case("riemannian", {"rank": 4, "alpha": 8}, models=("bert",), equations=riemannian_equations),
    Case("lora-xs", {"rank": 4, "alpha": 4}, models=("llama",), equations=lora_xs_equations),
    Case("sora", {"rank": 4, "alpha": 8, "sparse_lambda": 0.5}, models=("bert",), equations=sora_equations),
    Case("dylora", {"rank": 4, "alpha": 8}, models=("llama",), equations=dylora_equations),
    Case("dylora", {"rank": 4, "alpha": 8, "eval_rank": 2, "update_all_ranks": True}, id="dylora-eval-rank-2",
         models=("bert",)),
    Case("dora-rank", {"rank": 6, "target_rank": 3, "tinit": 0.0, "tfinal": 0.0, "delta_t": 1},
         models=("bert",), equations=dora_rank_equations),
    Case("adalora", {"init_rank": 6, "target_rank": 3, "tinit": 0.0, "tfinal": 0.0, "delta_t": 1}, models=("llama",),
         equations=adalora_equations),
]
