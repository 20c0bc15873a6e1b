"""Methods-table rows of the federated family (issue 19). A federated method's single-task trial is its
client-side training alone; its rules of a round (download, aggregation, exactness) are tested with
real client updates in tests/test_federated.py."""
import torch

from tests.methods.tester import Case


def lora_layers(model):
    from lorabench.methods.lora import LoraLinear
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def ffa_equations(model, method):
    """FFA-LoRA: A is frozen on every client, only B (and the head) train; A stays out of the upload."""
    trained = {n for n, _ in method.trainable_parameters(model)}
    assert not any(n.endswith("lora_A") for n in trained) and any(n.endswith("lora_B") for n in trained)
    up = method.upload(model)
    assert set(up) == trained


def hetero_equations(model, method):
    """HetLoRA/FlexLoRA: client i trains rank client_ranks[i % n] at the global rank's scale alpha / rank."""
    client = method.for_client(0, 3)
    assert client.client_rank == method.config.client_ranks[0]
    for layer in lora_layers(model):
        assert layer.rank == method.config.rank and layer.scale == method.config.alpha / method.config.rank
    from lorabench.methods.federated.hetero import pad, svd_factors, truncate
    state = {"l.lora_A": torch.randn(2, 6), "l.lora_B": torch.randn(5, 2)}
    padded = pad(state, 4)
    assert padded["l.lora_A"].shape == (4, 6)
    torch.testing.assert_close(padded["l.lora_B"] @ padded["l.lora_A"], state["l.lora_B"] @ state["l.lora_A"])
    torch.testing.assert_close(truncate(padded, 2)["l.lora_A"], state["l.lora_A"])
    delta = torch.randn(5, 6)
    b, a, err = svd_factors(delta, 5, 0.5)  # full rank: exact
    torch.testing.assert_close(0.5 * b @ a, delta, atol=1e-5, rtol=1e-5)
    assert err < 1e-6
    assert svd_factors(delta, 2, 0.5)[2] > svd_factors(delta, 4, 0.5)[2] > 0


def federa_equations(model, method):
    """FeDeRA: s B A holds the r principal singular components of the pretrained W; W_res + s B A = W."""
    from tests.methods.tester import tiny_model
    original, _ = tiny_model("bert")
    layer = lora_layers(model)[0]
    name = next(n for n, m in model.named_modules() if m is layer)
    w = original.get_submodule(name).weight
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    r = layer.rank
    torch.testing.assert_close(layer.scale * layer.lora_B @ layer.lora_A, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A, w, atol=1e-5, rtol=1e-4)


def slora_equations(model, method):
    """SLoRA stage 1: only the masked entries of each weight train, ΔW_s is zero off the fixed random mask, and the
    mask is a function of the seed and the layer's name; the switch gives s B A = the rank-r SVD of ΔW_s."""
    from lorabench.methods.federated.slora import SparseDelta, mask_index
    trained = {n for n, _ in method.trainable_parameters(model)}
    assert any(n.endswith("sparse_values") for n in trained) and not any(n.endswith(("lora_A", "lora_B")) for n in trained)
    name, layer = next((n, m) for n, m in model.named_modules() if hasattr(m, "sparse_values"))
    numel = layer.out_features * layer.in_features
    assert torch.equal(layer.sparse_index, mask_index(0, name, numel, method.config.density))
    assert not torch.equal(mask_index(0, name, numel, 0.25), mask_index(1, name, numel, 0.25))
    with torch.no_grad():
        layer.sparse_values.normal_()
    dense = SparseDelta.dense(layer)
    assert int((dense != 0).sum()) == len(layer.sparse_index) == max(1, round(method.config.density * numel))
    factors, energy = method.svd_init({name: dense})
    U, S, Vh = torch.linalg.svd(dense)
    r = method.config.rank
    torch.testing.assert_close(method.scale() * factors[f"{name}.lora_B"] @ factors[f"{name}.lora_A"],
                               (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-4)
    assert abs(energy - float((S[:r] ** 2).sum() / (S ** 2).sum())) < 1e-5
    with torch.no_grad():
        layer.sparse_values.zero_()


def pfedlora_equations(model, method):
    """pFedLoRA: h = W0 x + s B A x + s_l B_l A_l x; only the shared (homogeneous) adapter is uploaded, the local
    adapter and the head are the client's own."""
    layer = lora_layers(model)[0]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.local_B.normal_()
        layer.lora_B.normal_()
        want = layer.base(x) + layer.scale * x @ (layer.lora_B @ layer.lora_A).T \
            + layer.local_scale * x @ (layer.local_B @ layer.local_A).T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-4)
        layer.local_B.zero_()
        layer.lora_B.zero_()
    assert layer.local_scale == method.config.alpha / 2 and layer.local_A.shape[0] == 2
    up, kept = method.upload(model), method.personal_state(model)
    assert up and all(k.endswith(("lora_A", "lora_B")) for k in up)
    assert any(k.endswith("local_A") for k in kept) and not set(up) & set(kept)


def fedms_equations(model, method):
    """FedMS's mixture: the gate's top-k experts, each the backbone with its own LoRA, mixed by the gate's weights
    renormalised over the top k; an expert outside the top k does not change the output."""
    from lorabench.methods.federated.fedms import set_expert
    if not hasattr(model, "classifier"):
        return  # the mixture of logits is checked on the classifier
    from tests.methods.tester import batch_for
    b = batch_for("bert")
    with torch.no_grad():
        for layer in lora_layers(model):
            for n in ("lora_B", "local1_B", "local2_B"):
                getattr(layer, n).normal_(std=0.5)
        method.set_stage(model, 2)
        got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        mask = b["attention_mask"]
        emb = model.get_input_embeddings()(b["input_ids"])
        probs = torch.softmax(model.fedms_gate((emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)), -1)
        top, idx = probs.topk(2, -1)
        experts = []
        for e in range(3):
            set_expert(model, e)
            experts.append(type(model).forward(model, input_ids=b["input_ids"], attention_mask=mask).logits)
        set_expert(model, 0)
        want = torch.stack([sum(top[i, j] / top[i].sum() * experts[int(idx[i, j])][i] for j in range(2))
                            for i in range(len(idx))])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        assert len(set(idx[:, 0].tolist()) | set(idx[:, 1].tolist())) >= 2
        method.set_stage(model, 1)
        for layer in lora_layers(model):
            for n in ("lora_B", "local1_B", "local2_B"):
                getattr(layer, n).zero_()
    up = method.upload(model)
    assert up and not any(k.startswith("fedms_gate") or ".local" in k for k in up)  # stage 1: the global expert


def privatelora_equations(model, method):
    """PrivateLoRA: h = W0 x + s B M A x with A and B frozen (the cloud's) and only M (r, r) trained (the device's)."""
    layer = lora_layers(model)[0]
    trained = {n for n, _ in method.trainable_parameters(model)}
    assert any(n.endswith("lora_M") for n in trained) and not any(n.endswith(("lora_A", "lora_B")) for n in trained)
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        layer.lora_M.normal_()
        want = layer.base(x) + layer.scale * x @ (layer.lora_B @ layer.lora_M @ layer.lora_A).T
        torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.delta_weight(), layer.scale * layer.lora_B @ layer.lora_M @ layer.lora_A)
        layer.lora_M.zero_()
    assert float(layer.lora_B.abs().sum()) > 0  # B random: M = 0 alone makes the update zero at step 0


CASES = [
    Case("federa", {"rank": 4, "alpha": 8}, models=("bert",), equations=federa_equations, atol=1e-4),
    Case("federa", {"rank": 2, "alpha": 4}, id="federa-llama", models=("llama",), atol=1e-4),
    Case("fedit", {"rank": 4, "alpha": 8}),
    Case("ffa-lora", {"rank": 4, "alpha": 8}, equations=ffa_equations),
    Case("ffa-lora", {"rank": 4, "alpha": 8, "dp_noise_multiplier": 1.0}, id="ffa-lora-dp", models=("bert",)),
    Case("flexlora", {"rank": 4, "alpha": 8, "client_ranks": [2, 4]}, equations=hetero_equations),
    Case("hetlora", {"rank": 4, "alpha": 8, "client_ranks": [2, 4]}, equations=hetero_equations),
    # stage 1 only (stage1_ratio 1): the switch makes A and B trainable mid-run, which the table's "only the
    # trainable tensors change" check cannot express; test_behaviour.py runs both stages and the switch
    Case("slora", {"rank": 4, "alpha": 8, "density": 0.25, "stage1_ratio": 1.0}, equations=slora_equations),
    Case("pfedlora", {"rank": 4, "alpha": 8, "local_ranks": [2]}, equations=pfedlora_equations),
    Case("privatelora", {"rank": 4, "alpha": 8}, equations=privatelora_equations),
    Case("otp-lora", {"rank": 4, "alpha": 8}),
    # stage 1 only in the table (the switch makes the gate and the local experts trainable mid-run); the mixture is
    # checked by fedms_equations, both stages run in test_behaviour.py and tests/test_federated.py
    Case("fedms", {"rank": 4, "alpha": 8, "local_experts": 2, "top_k": 2, "stage1_ratio": 1.0}, equations=fedms_equations),
]
