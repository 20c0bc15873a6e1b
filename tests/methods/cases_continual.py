"""Methods-table rows of the continual family (issue 18). A continual method's single-task trial is a
sequence of one task; what it does across tasks (fresh adapters, replay, orthogonality, designed subspaces)
is tested through the sequence scenario in tests/test_continual.py."""
import torch

from tests.methods.tester import Case, batch_for


def o_lora_equations(model, method):
    """O-LoRA (arXiv 2310.14152, sec. 3.2): extra loss = λ1 Σ_{s<t} Σ_{j,k} (A_s A_t^T)[j,k]^2 + λ2 Σ ||θ_t||_2."""
    from lorabench.methods.base import TrainState
    layers = method.lora_named(model)
    assert method.extra_loss(TrainState(model, None, None, 0, 1)) is None  # no past task: plain LoRA
    g = torch.Generator().manual_seed(3)
    method.past_A = {n: [torch.randn(l.lora_A.shape, generator=g), torch.randn(l.lora_A.shape, generator=g)]
                     for n, l in layers}
    expected = sum(((a_s @ l.lora_A.detach().T) ** 2).sum() for n, l in layers for a_s in method.past_A[n])
    got = method.extra_loss(TrainState(model, None, None, 0, 1))
    torch.testing.assert_close(got.detach(), method.config.ortho_lambda * expected)
    method.config.l2_lambda = 0.1
    l2 = sum(torch.linalg.vector_norm(p.detach()) for _, l in layers for p in (l.lora_A, l.lora_B))
    torch.testing.assert_close(method.extra_loss(TrainState(model, None, None, 0, 1)).detach(),
                               method.config.ortho_lambda * expected + 0.1 * l2)
    method.past_A, method.config.l2_lambda = {}, 0.0


def inflora_equations(model, method):
    """InfLoRA (arXiv 2404.00228): without past tasks, B_t^T = the top-r eigenvectors of the layer's input
    covariance H H^T; with M, of (I - M M^T) H H^T (I - M M^T): B_t M = 0."""
    batch = batch_for("llama", seed=5)
    cov = method.input_covariance(model, [batch])
    method.design(model, [batch])
    name, layer = method.lora_named(model)[0]
    vals, vecs = torch.linalg.eigh(cov[name])
    top = vecs[:, -layer.rank:]
    a = layer.lora_A.float()
    torch.testing.assert_close(a @ a.T, torch.eye(layer.rank), atol=1e-4, rtol=0)
    # the same subspace as the top eigenvectors (up to sign and order): projecting one onto the other keeps it
    torch.testing.assert_close((a @ top).norm() ** 2, torch.tensor(float(layer.rank)), atol=1e-3, rtol=0)
    method.M = {n: torch.linalg.qr(torch.randn(l.in_features, 3)).Q for n, l in method.lora_named(model)}
    method.design(model, [batch])
    assert method.interference(model) < 1e-5
    method.M = {}


CASES = [
    Case("seq-lora", {"rank": 4, "alpha": 8}),
    Case("per-task-lora", {"rank": 4, "alpha": 8}),
    Case("replay-lora", {"rank": 4, "alpha": 8, "buffer_per_task": 4}),
    Case("multitask-lora", {"rank": 4, "alpha": 8}),
    Case("o-lora", {"rank": 4, "alpha": 8, "ortho_lambda": 0.5}, equations=o_lora_equations),
    Case("inflora", {"rank": 4, "alpha": 8}, models=("llama",), equations=inflora_equations),
    Case("i-lora", {"rank": 4, "alpha": 8, "buffer_per_task": 4}),
    Case("task-arithmetic", {"rank": 4, "alpha": 8, "buffer_per_task": 4}),
    Case("inflora", {"rank": 2, "alpha": 4}, id="inflora-bert", models=("bert",)),
    # GS-LoRA (arXiv 2403.11530): a single-task trial trains its block groups under the group lasso; the
    # forgetting protocol itself is tested in tests/test_forgetting.py
    Case("gs-lora", {"rank": 4, "alpha": 8}),
    # MoRAL in the lifelong setting (arXiv 2402.11260): moral's top-2 FFN experts, trained task after task; its
    # layer is tested in tests/test_mixture_moral.py, its stages in tests/test_continual.py
    Case("moral-cl", {"experts": 3, "rank": 2}),
]
