"""The clients scenario (issue 19): partitions, the federated methods' rules on real client updates, the suite.

Fast tests run clients' rounds in this process (`client_round`: tiny BERT on real Rotten Tomatoes
reviews, the real training loop) and aggregate them with each method's rule; the slow tests run
the same through Flower's simulation engine on Ray: a client that raises and one that is killed,
and the `federated` suite end to end with its report.
"""
from __future__ import annotations

import copy
import math
import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from lorabench.errors import UserError
from lorabench.harness import partitions
from lorabench.harness.clients import FederatedConfig, aggregation_error, apply_method, client_round
from lorabench.harness.trial import TrialSpec
from lorabench.methods import METHODS, get_method
from lorabench.config import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FED_METHODS = [n for n in METHODS.names() if METHODS.meta(n)["family"] == "federated"]


# -- partitions ------------------------------------------------------------------------------------

def labelled(n=200, classes=2):
    return [{"text": f"t{i}", "label": i % classes} for i in range(n)]


def test_iid_partition_is_disjoint_covering_and_balanced():
    parts = partitions.partition_indices([e["label"] for e in labelled()], 10, "iid")
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(200))
    assert {len(p) for p in parts} == {20}
    assert parts == partitions.partition_indices([e["label"] for e in labelled()], 10, "iid"), "not deterministic"


def test_dirichlet_skew_grows_as_alpha_shrinks():
    ex = labelled(400)
    skew = {p: partitions.label_skew(partitions.client_parts(ex, 10, p, 0.2)) for p in
            ("iid", "dirichlet:100", "dirichlet:0.1")}
    assert skew["iid"] < 0.05
    assert skew["dirichlet:0.1"] > 0.3 > skew["dirichlet:100"], skew
    for p in ("dirichlet:0.1",):
        parts = partitions.client_parts(ex, 10, p, 0.2)
        assert sum(len(tr) + len(te) for tr, te in parts) == 400
        assert all(len(te) >= 1 and len(tr) >= 1 for tr, te in parts)


def test_domain_partition_gives_each_client_its_domain_on_the_real_movie_reviews():
    from lorabench.tasks import get_task
    train = get_task("movie-domains").from_options({"n_train": 400}).split().train
    assert {e["domain"] for e in train} == {"imdb", "rt"}
    parts = partitions.client_parts(train, 4, "domain", 0.2)
    doms = partitions.client_domains(parts)
    assert [set(d) for d in doms] == [{"imdb"}, {"rt"}, {"imdb"}, {"rt"}], doms  # client c: domain c mod 2, sorted
    assert sorted(id(e) for tr, te in parts for e in tr + te) == sorted(id(e) for e in train)  # disjoint, covering
    assert doms[0]["imdb"] + doms[2]["imdb"] == sum(e["domain"] == "imdb" for e in train)
    # a mix by domain: a share P of each client's examples from its home domain, the rest from the other
    # (of each domain, its 2 home clients take 0.75 / 2 each and the 2 others 0.25 / 2: a share 0.75 when the
    # domains are the same size)
    mixed = partitions.client_domains(partitions.client_parts(train, 4, "domain:0.75", 0.2))
    size = {d: sum(e["domain"] == d for e in train) for d in ("imdb", "rt")}
    for c, d in enumerate(mixed):
        home, other = ["imdb", "rt"][c % 2], ["rt", "imdb"][c % 2]
        assert abs(d[home] - 0.375 * size[home]) <= 1 and abs(d[other] - 0.125 * size[other]) <= 1, (c, d, size)
    assert partitions.client_domains(partitions.client_parts(labelled(), 4, "iid", 0.2)) is None
    with pytest.raises(UserError, match="needs a task whose examples carry a domain"):
        partitions.client_parts(labelled(), 4, "domain", 0.2)
    with pytest.raises(UserError, match=r"2 domains \(imdb, rt\) need at least as many clients"):
        partitions.partition_indices([0, 1, 0], 1, "domain", 1, domains=["imdb", "rt", "rt"])


def test_role_partition_gives_each_client_its_speaking_roles_lines():
    """shakespeare-roles at `role`: client c holds the speeches of role c (sorted), every one of them and only
    them; each speech is checked against the play's own text: a paragraph that opens with that speaker's line
    holds it. The eval part holds each role's last speeches, none of them a client's."""
    from lorabench import assets
    from lorabench.tasks import get_task
    task = get_task("shakespeare-roles").from_options({"n_roles": 3})
    split = task.split()
    roles = task.roles()
    assert roles == ["Hamlet/Ham", "Othello/IAGO", "Othello/OTHELLO"]  # the three with the most speeches
    parts = partitions.client_parts(split.train, 3, "role", 0.2)
    plays = {p["title"]: p["text"].split("\n\n") for p in assets.load_dataset("shakespeare")}
    for c, (tr, te) in enumerate(parts):
        assert tr and te and {e["role"] for e in tr + te} == {roles[c]}
        assert sorted(map(id, tr + te)) == sorted(id(e) for e in split.train if e["role"] == roles[c])
        play, speaker = roles[c].split("/")
        said = [p.strip() for p in plays[play] if p.strip().split("\n")[0].strip().rstrip(".") == speaker]
        for e in tr + te:
            assert any(e["text"].split("\n")[0] in p for p in said), (roles[c], e["text"][:80])
    assert partitions.client_domains(parts, "role") == [{r: sum(e["role"] == r for e in split.train)} for r in roles]
    assert {e["role"] for e in split.eval} == set(roles)
    assert not {id(e) for e in split.eval} & {id(e) for tr, te in parts for e in tr + te}
    # Othello's last held-out speech comes after every trained one of Othello's in the play
    text = "\n\n".join(plays["Othello"])
    last_train = max(text.find(e["text"]) for e in split.train if e["role"] == "Othello/OTHELLO")
    assert max(text.find(e["text"]) for e in split.eval if e["role"] == "Othello/OTHELLO") > last_train
    mixed = partitions.client_domains(partitions.client_parts(split.train, 3, "role:0.5", 0.2), "role")
    assert all(len(d) == 3 and max(d, key=d.get) == roles[c] for c, d in enumerate(mixed)), mixed
    with pytest.raises(UserError, match=r"3 roles \(Hamlet/Ham, .*\) need at least as many clients"):
        partitions.client_parts(split.train, 2, "role", 0.2)


def test_a_role_client_trains_and_scores_its_own_lines_by_perplexity():
    """One client's round on the role task, in this process (tiny random Llama, the real training loop): it
    trains on its role's speeches, scores perplexity on its own held-out ones, uploads its LoRA factors."""
    spec = TrialSpec(**{**asdict(spec_for("fedit", partition="role", local_steps=2)), "task": "shakespeare-roles",
                        "task_options": {"n_roles": 3, "n_eval": 8}, "model": "tiny-llama"})
    upload, metrics = client_round(asdict(spec), {}, {"slot": 1, "server-round": 1})
    assert metrics["num-examples"] == 171  # Othello/IAGO's 214 training speeches less its 43 test ones (20%)
    assert 1 < metrics["personal-score"] < 49152 * 10  # a perplexity over SmolLM2's vocabulary, finite
    assert upload and all(k.endswith((".lora_A", ".lora_B")) for k in upload), sorted(upload)[:4]


def test_client_majority_is_each_clients_trivial_personalised_score():
    def ex(*labels):
        return [{"text": "x", "label": y} for y in labels]
    parts = [(ex(0, 0, 1), ex(0, 1)), (ex(1, 1, 0), ex(1, 1, 1, 0)), (ex(0, 1), ex(1)), (ex(1), [])]
    assert partitions.client_majority(parts) == [0.5, 0.75, 0.0, None]  # a tie goes to the smaller label
    assert partitions.client_majority([([{"text": "a"}], [{"text": "b"}])]) is None  # no labels: no baseline
    reviews = labelled(400)
    skewed = partitions.client_majority(partitions.client_parts(reviews, 10, "dirichlet:0.1", 0.2))
    iid = partitions.client_majority(partitions.client_parts(reviews, 10, "iid", 0.2))
    assert sum(skewed) / 10 > 0.8 > 0.7 > sum(iid) / 10  # under skew a client's own majority class scores high


@pytest.mark.parametrize("bad", ["dirichlet", "dirichlet:0", "dirichlet:-1", "noniid", "Dirichlet:0.3", "domain:0",
                                 "domain:1.5", "domains"])
def test_bad_partition_names_say_what_is_valid(bad):
    with pytest.raises(UserError, match=r"use 'iid' or 'dirichlet:ALPHA'"):
        partitions.parse(bad)


def test_too_few_examples_for_the_clients():
    with pytest.raises(UserError, match="cannot give 10 clients"):
        partitions.partition_indices([0, 1] * 5, 10, "iid")


@pytest.mark.parametrize("options,pattern", [
    ({"clients": 10, "fraction": 0.1}, r"fewer than 2 per round"),
    ({"clients": 4, "kill_clients": [4]}, r"not clients 0\.\.3"),
    ({"partition": "skewed"}, r"use 'iid' or 'dirichlet:ALPHA'"),
    ({"rounds": 0}, r"rounds"),
])
def test_bad_federated_options(options, pattern):
    with pytest.raises(UserError, match=pattern):
        from_dict(FederatedConfig, options, "federated")


# -- the methods' rules on real client updates (no Ray) ---------------------------------------------

def spec_for(method: str, options: dict | None = None, **fed) -> TrialSpec:
    return TrialSpec(suite="t", suite_version=1, label=method, method=method, method_options=options or {},
                     task="rt-sentiment", task_options={"n_train": 60, "n_eval": 16}, model="tiny-bert", seed=0,
                     train={"batch_size": 4, "eval_batch_size": 16, "lr": 1e-2, "schedule": "constant",
                            "warmup_ratio": 0.0},
                     federated={"clients": 3, "rounds": 1, "fraction": 1.0, "local_steps": 3, **fed})


def server(spec: TrialSpec):
    """The server's method, pristine base model and applied model, as run_federated builds them."""
    from lorabench import assets
    from lorabench.harness.trial import seed_everything
    seed_everything(spec.seed)
    base = assets.load_model("tiny-bert", head="seq-cls", num_labels=2, seed=spec.seed).model
    method = get_method(spec.method).from_options(spec.method_options)
    model = apply_method(spec, copy.deepcopy(base), "seq-cls", method)
    return method, base, model


def one_round(spec: TrialSpec, clients=(0, 1, 2)):
    """Round 1 of `clients` through the method's download, client training, upload and aggregation."""
    method, base, model = server(spec)
    state = method.initial_state(model)
    uploads, weights, sent = [], [], []
    for slot in clients:
        down = method.download(state, slot, 3)
        sent.append(down)
        up, metrics = client_round(asdict(spec), down, {"slot": slot, "server-round": 1})
        assert metrics["slot"] == slot and metrics["num-examples"] > 0 and 0 <= metrics["personal-score"] <= 1
        uploads.append(up)
        weights.append(metrics["num-examples"])
    new, used = method.aggregate(state, uploads, weights, list(clients), 3)
    return method, base, state, uploads, used, new, sent


def merged_weights(spec, base, method, states):
    """W0 + ΔW of every adapted layer for each state, through the LoRA layers' own merge (an independent path)."""
    out = []
    for st in states:
        m = apply_method(spec, copy.deepcopy(base), "seq-cls", copy.deepcopy(method))
        method.load_global(m, st)
        method.merge(m)
        out.append({n: mod.base.weight.detach().clone() for n, mod in m.named_modules() if hasattr(mod, "lora_A")})
    return out


@pytest.mark.parametrize("name", ["fedit", "federa"])
def test_fedavg_of_factors_is_inexact_and_the_error_matches_the_merged_weights(name):
    spec = spec_for(name)
    method, base, before, uploads, w, new, _ = one_round(spec)
    err = aggregation_error(method, before, uploads, w, new)
    assert err > 1e-3, f"FedAvg of A and B separately should not equal the mean of B_i A_i (error {err})"
    # Independently: the mean of the clients' merged weights against the aggregated model's merged weight.
    clients = merged_weights(spec, base, method, [{**before, **u} for u in uploads])
    (glob,) = merged_weights(spec, base, method, [new])
    (w0,) = merged_weights(spec, base, method, [{k: torch.zeros_like(v) if k.endswith("lora_B") else v
                                                 for k, v in before.items()}])
    num = sum(float(((glob[n] - sum(wi * c[n] for wi, c in zip(w, clients))) ** 2).sum()) for n in glob)
    den = sum(float(((sum(wi * c[n] for wi, c in zip(w, clients)) - w0[n]) ** 2).sum()) for n in glob)
    assert abs((num / den) ** 0.5 - err) < 1e-3 * max(err, 1e-3), ((num / den) ** 0.5, err)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("threads", [1, 2])
def test_a_federated_trial_runs_on_its_train_threads(monkeypatch, threads):
    """run_federated sets torch's threads to train.threads (issue 15), before Ray starts: stopped there (at
    check_machine), the trial process runs on that many threads."""
    from lorabench.harness import clients
    seen = []

    def stop(fed):
        seen.append(torch.get_num_threads())
        raise _Stop

    monkeypatch.setattr(clients, "check_machine", stop)
    spec = spec_for("fedit")
    spec.train = {**spec.train, "threads": threads}
    before = torch.get_num_threads()
    torch.set_num_threads(3 - threads)  # neither what the trial asks for
    try:
        with pytest.raises(_Stop):
            clients.run_federated(spec, progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [threads]


@pytest.mark.parametrize("name", ["ffa-lora", "flexlora"])
def test_exact_aggregations_measure_zero_error(name):
    spec = spec_for(name)
    method, _, before, uploads, w, new, sent = one_round(spec)
    err = aggregation_error(method, before, uploads, w, new)
    assert err < 1e-5, f"{name} aggregates exactly, measured error {err}"
    if name == "ffa-lora":  # A is never sent, never trained, identical on every client
        assert not any(k.endswith("lora_A") for s in sent + uploads for k in s)
        fedit, _, model = server(spec_for("fedit"))
        assert sum(t.numel() for t in uploads[0].values()) < sum(
            p.numel() for _, p in fedit.trainable_parameters(model))


def test_ffa_lora_with_dp_sgd_through_opacus_and_its_privacy_budget():
    from lorabench.harness.clients import dp_epsilon
    spec = spec_for("ffa-lora", {"dp_noise_multiplier": 1.0, "dp_max_grad_norm": 0.5})
    plain = spec_for("ffa-lora")
    method, _, model = server(spec)
    state = method.initial_state(model)
    down = method.download(state, 0, 3)
    up_dp, m_dp = client_round(asdict(spec), down, {"slot": 0, "server-round": 1})
    up, m = client_round(asdict(plain), down, {"slot": 0, "server-round": 1})
    assert m_dp["method.dp_steps"] == 3 and m_dp["dp-sigma"] == 1.0 and 0 < m_dp["dp-sample-rate"] <= 1
    assert 0 <= m_dp["method.dp_clipped_fraction"] <= 1 and m["method.dp_steps"] == 0 and "dp-sigma" not in m
    assert any(not torch.equal(up_dp[k], up[k]) for k in up)  # clipped and noised: not the plain update
    q = m_dp["dp-sample-rate"]
    eps = dp_epsilon({0: [(1.0, q, 3)]}, 1e-5)
    assert 0 < eps < float("inf")
    assert dp_epsilon({0: [(1.0, q, 3)] * 5}, 1e-5) > eps > dp_epsilon({0: [(4.0, q, 3)]}, 1e-5)  # more steps, less noise
    assert dp_epsilon({0: [(1.0, q, 3)], 1: [(1.0, q, 3)] * 2}, 1e-5) == dp_epsilon({1: [(1.0, q, 3)] * 2}, 1e-5)


def test_flexlora_sends_each_client_its_rank_and_records_the_truncation():
    spec = spec_for("flexlora", {"rank": 8, "client_ranks": [2, 4, 8]})
    method, _, before, uploads, w, new, sent = one_round(spec)
    ranks = [s[next(k for k in s if k.endswith("lora_A"))].shape[0] for s in sent]
    assert ranks == [2, 4, 8]
    assert [u[next(k for k in u if k.endswith("lora_A"))].shape[0] for u in uploads] == [2, 4, 8]
    errs = []
    for slot in (0, 1, 2):  # round 2: the rank-r_i SVD of the exact aggregate, losing less as r_i grows
        method.download(new, slot, 3)
        errs.append(method.round_summary([slot])["truncation_error"])
    assert errs[0] > errs[1] > errs[2] > 0, errs


def test_each_round_samples_its_own_clients_whatever_reseeds_the_process(monkeypatch):
    """Who trains in a round comes from the trial's seed and the round alone. The server's evaluation re-seeds
    Python's `random` (apply_method's seed_everything) every eval_every rounds; with Flower's sampling, which draws
    from it, the rounds after an evaluation repeated one sample (suite federated v1: two alternating sets, 6 of 10
    clients ever trained). Here `random` is re-seeded before every round: the samples must still differ."""
    import random

    from flwr.app import ArrayRecord, ConfigRecord

    from flwr.supercore.task_identity import TaskIdentity

    from lorabench.harness.clients import _strategy_class, sample_clients
    for k in ("_run_id", "_node_id", "_task_id"):  # what Flower's ServerApp sets before the strategy runs
        monkeypatch.setattr(TaskIdentity, k, 1)
    spec = spec_for("fedit")
    method, _, model = server(spec)
    fed = FederatedConfig(clients=10, rounds=10, fraction=0.3)

    class Grid:  # ten connected nodes with Flower-like random ids, in no particular order
        def get_node_ids(self):
            return [9_123_456_789 - 104_729 * i * (-1) ** i for i in range(10)]

    def rounds(seed: int) -> list[list[int]]:
        strategy = _strategy_class()(method, fed, method.initial_state(model), lambda msg: None, seed)
        out = []
        for rnd in range(1, 11):
            random.seed(0)  # what the server's evaluation does between rounds
            msgs = strategy.configure_train(rnd, ArrayRecord({"round": torch.tensor([0])}), ConfigRecord({}), Grid())
            slots = sorted(strategy.slots[m.metadata.dst_node_id] for m in msgs)
            assert [int(m.content["config"]["slot"]) for m in sorted(msgs, key=lambda m: strategy.slots[
                m.metadata.dst_node_id])] == slots, "each message carries the slot of the node it goes to"
            out.append(slots)
        return out
    seed0 = rounds(0)
    assert seed0 == [sample_clients(0, r, 10, 3) for r in range(1, 11)] and all(len(s) == 3 for s in seed0)
    assert len({tuple(s) for s in seed0}) >= 8, seed0  # not one sample repeated (v1: 1 distinct sample here)
    assert len(set().union(*seed0)) >= 9, seed0  # (v1's runs: 6 of 10 clients ever trained)
    assert rounds(0) == seed0 and rounds(1) != seed0  # the same for a seed, another for another seed


def test_hetlora_pads_truncates_prunes_and_weights_by_update_norm():
    from lorabench.methods.federated.hetero import pad, truncate
    spec = spec_for("hetlora", {"rank": 8, "client_ranks": [2, 8, 8], "prune_threshold": 0.99})
    method, _, before, uploads, w, new, sent = one_round(spec)
    # self-pruning at a threshold of 0.99 always fires: every client dropped one rank component
    assert [u[next(k for k in u if k.endswith("lora_A"))].shape[0] for u in uploads] == [1, 7, 7]
    assert method.ranks == {0: 1, 1: 7, 2: 7} and method.rank_of(1) == 7
    norms = [sum(float(d.norm() ** 2) for d in method.delta_weights({**before, **u}).values()) ** 0.5 for u in uploads]
    assert w == pytest.approx([n / sum(norms) for n in norms])  # sparsity-weighted, not by data size
    assert aggregation_error(method, before, uploads, w, new) > 1e-3  # factor averaging stays inexact
    p = pad(uploads[0], 8)
    assert torch.allclose(method.delta_weights({**before, **p})["bert.encoder.layer.0.attention.self.query"],
                          method.delta_weights({**before, **uploads[0]})["bert.encoder.layer.0.attention.self.query"])
    assert truncate(p, 1).keys() == uploads[0].keys()
    # round 2: a pruned client gets its pruned rank and trains at it (its slot alone would give it its starting
    # rank: the Dirichlet partition's run raised "query.lora_A has shape (8, ...) here, (7, ...) sent")
    for slot, r in ((0, 1), (1, 7)):
        down = method.download(new, slot, 3)
        assert down["bert.encoder.layer.0.attention.self.query.lora_A"].shape[0] == r
        up, m = client_round(asdict(spec), down, {"slot": slot, "server-round": 2})
        assert m["method.rank_after_pruning"] == max(r - 1, 1)
        assert up["bert.encoder.layer.0.attention.self.query.lora_A"].shape[0] == max(r - 1, 1)
        assert not torch.equal(up["bert.encoder.layer.0.attention.self.query.lora_B"][:, :max(r - 1, 1)],
                               down["bert.encoder.layer.0.attention.self.query.lora_B"][:, :max(r - 1, 1)])


def test_slora_sparse_stage_then_lora_from_the_svd_of_the_aggregated_sparse_update():
    spec = spec_for("slora", {"stage1_rounds": 1, "density": 0.05})
    method, _, before, uploads, w, new, sent = one_round(spec)
    # stage 1: only the masked entries (and the head) travel, the mask never does
    for st in sent + uploads:
        assert any(k.endswith(".sparse_values") for k in st) and not any(k.endswith(("lora_A", "lora_B")) for k in st)
    q = "bert.encoder.layer.0.attention.self.query"
    assert uploads[0][f"{q}.sparse_values"].numel() == len(method.masks[q]) == round(0.05 * method.shapes[q][0] * method.shapes[q][1])
    assert any(not torch.equal(u[f"{q}.sparse_values"], uploads[0][f"{q}.sparse_values"]) for u in uploads[1:])
    summary = method.round_summary([0, 1, 2])
    assert summary["stage"] == 1 and summary["switch_round"] == 1 and 0.04 < summary["mask_density"] < 0.06
    assert 0 < summary["energy_retained"] < 1
    # the switch: s B A is the rank-r SVD of the exact FedAvg of the clients' sparse updates, W0 unchanged
    mean = sum(wi * method.sparse_deltas({**before, **u})[q] for wi, u in zip(w, uploads))
    U, S, Vh = torch.linalg.svd(mean)
    r = method.config.rank
    got = method.delta_scale() * new[f"{q}.lora_B"] @ new[f"{q}.lora_A"]
    torch.testing.assert_close(got, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-3)
    assert not any(k.endswith(".sparse_values") for k in new)
    # the round's aggregation error is what the SVD dropped of the sparse update: sqrt(1 - energy retained)
    err = aggregation_error(method, before, uploads, w, new)
    assert err == pytest.approx((1 - method.energy) ** 0.5, rel=1e-4)
    # stage 2: clients train and send the LoRA factors from that start
    up, m = client_round(asdict(spec), method.download(new, 1, 3), {"slot": 1, "server-round": 2})
    assert m["method.stage"] == 2 and not any(k.endswith(".sparse_values") for k in up)
    assert not torch.equal(up[f"{q}.lora_A"], new[f"{q}.lora_A"])
    method.aggregate(new, [up], [1.0], [1], 3)
    assert method.round_summary([1])["stage"] == 2 and method.switch_round == 1


def test_pfedlora_shares_the_homogeneous_adapter_and_keeps_each_local_model_on_its_client():
    from lorabench.harness.clients import stateful_client_round
    spec = spec_for("pfedlora", {"rank": 4, "local_ranks": [2, 8]})
    method, _, model = server(spec)
    state = method.initial_state(model)
    assert state and all(k.endswith(("lora_A", "lora_B")) for k in state)  # only the shared adapter exists globally
    q = "bert.encoder.layer.0.attention.self.query"
    uploads, kept = [], []
    for slot in (0, 1):
        up, m, personal = stateful_client_round(asdict(spec), method.download(state, slot, 3),
                                                {"slot": slot, "server-round": 1}, None)
        assert set(up) == set(state), "only the homogeneous adapter travels"
        assert personal[f"{q}.local_A"].shape[0] == [2, 8][slot] == m["method.local_rank"]  # local models differ
        assert "classifier.weight" in personal and not any(k.startswith("classifier") for k in up)
        assert 0 < m["method.local_share"] < 1 and 0 <= m["personal-score"] <= 1
        uploads.append(up)
        kept.append(personal)
    # iterative training: the global adapter moved in the second phase, the local model in the first
    assert not torch.equal(uploads[0][f"{q}.lora_B"], state[f"{q}.lora_B"])
    assert float(kept[0][f"{q}.local_B"].abs().sum()) > 0
    new, w = method.aggregate(state, uploads, [1.0, 1.0], [0, 1], 3)
    torch.testing.assert_close(new[f"{q}.lora_B"], (uploads[0][f"{q}.lora_B"] + uploads[1][f"{q}.lora_B"]) / 2)
    assert method.round_summary([0, 1]) == {"local_ranks": [2, 8]} and m["method.resumed_local"] == 0.0
    # round 2: client 0 starts from the local model it kept; without it, from scratch: different models
    down = method.download(new, 0, 3)
    _, m2, again = stateful_client_round(asdict(spec), down, {"slot": 0, "server-round": 2}, kept[0])
    assert m2["method.resumed_local"] == 1.0
    _, _, fresh = stateful_client_round(asdict(spec), down, {"slot": 0, "server-round": 2}, None)
    assert not torch.equal(again[f"{q}.local_B"], fresh[f"{q}.local_B"])
    # the phases: with local_ratio 1 the global adapter is frozen throughout, with 0 the local model is
    only_local = spec_for("pfedlora", {"rank": 4, "local_ranks": [2, 8], "local_ratio": 1.0})
    up, _, personal = stateful_client_round(asdict(only_local), down, {"slot": 0, "server-round": 2}, kept[0])
    assert all(torch.equal(up[k], down[k]) for k in down) and not torch.equal(personal[f"{q}.local_B"], kept[0][f"{q}.local_B"])
    only_global = spec_for("pfedlora", {"rank": 4, "local_ranks": [2, 8], "local_ratio": 0.0})
    up, _, personal = stateful_client_round(asdict(only_global), down, {"slot": 0, "server-round": 2}, kept[0])
    assert all(torch.equal(personal[k], kept[0][k]) for k in kept[0]) and not torch.equal(up[f"{q}.lora_B"], down[f"{q}.lora_B"])


def test_fedms_global_expert_then_a_gated_mixture_whose_gate_alone_is_aggregated():
    from lorabench.harness.clients import stateful_client_round
    spec = spec_for("fedms", {"stage1_rounds": 1, "local_experts": 2, "top_k": 1})
    method, _, model = server(spec)
    state = method.initial_state(model)
    gate = {k for k in state if k.startswith("fedms_gate.")}
    assert gate == {"fedms_gate.weight", "fedms_gate.bias"} and not any(".local" in k for k in state)
    # stage 1: the global expert (LoRA and head) is trained and FedAvg'd; the gate is not sent yet
    ups = []
    for slot in (0, 1):
        down = method.download(state, slot, 3)
        assert not set(down) & gate
        up, m, personal = stateful_client_round(asdict(spec), down, {"slot": slot, "server-round": 1}, None)
        assert set(up) == set(down) and not personal and m["method.stage"] == 1
        ups.append(up)
    new, w = method.aggregate(state, ups, [1.0, 1.0], [0, 1], 3)
    assert method.round_summary([0, 1]) == {"stage": 1, "switch_round": 1}
    assert aggregation_error(method, state, ups, w, new) > 1e-3  # the global expert's factors: FedAvg, inexact
    # stage 2: the frozen global expert and the gate go down, the gate alone comes back; local experts stay home
    ups, kept = [], []
    for slot in (0, 1):
        down = method.download(new, slot, 3)
        assert gate <= set(down)
        up, m, personal = stateful_client_round(asdict(spec), down, {"slot": slot, "server-round": 2}, None)
        assert set(up) == gate and not torch.equal(up["fedms_gate.weight"], down["fedms_gate.weight"])
        assert personal and all(".local" in k for k in personal)
        assert m["method.stage"] == 2 and 0 < m["method.local_routed"] < 1, m  # the gate routes inputs both ways
        assert 0 < m["method.gate_entropy"] <= float(torch.log(torch.tensor(3.0))) + 1e-6
        assert any(float(v.abs().sum()) > 0 for k, v in personal.items() if k.endswith("_B"))  # a local expert trained
        ups.append(up)
        kept.append(personal)
    after, w = method.aggregate(new, ups, [1.0, 3.0], [0, 1], 3)
    torch.testing.assert_close(after["fedms_gate.weight"], 0.25 * ups[0]["fedms_gate.weight"] + 0.75 * ups[1]["fedms_gate.weight"])
    assert all(torch.equal(after[k], new[k]) for k in new if not k.startswith("fedms_gate."))  # global expert frozen
    assert method.round_summary([0, 1])["stage"] == 2 and aggregation_error(method, new, ups, w, after) == 0.0


def test_privatelora_sends_only_the_device_matrices_and_aggregates_them_exactly():
    from lorabench.harness.clients import _nbytes
    spec = spec_for("privatelora")
    method, _, before, uploads, w, new, sent = one_round(spec)
    for st in sent + uploads:  # A and B stay on the cloud (rebuilt from the seed): only M and the head travel
        assert not any(k.endswith(("lora_A", "lora_B")) for k in st) and any(k.endswith("lora_M") for k in st)
    q = "bert.encoder.layer.0.attention.self.query"
    r = method.config.rank
    assert uploads[0][f"{q}.lora_M"].shape == (r, r)
    fedit, _, model = server(spec_for("fedit"))
    assert _nbytes(uploads[0]) < _nbytes(fedit.upload(model)) / 2
    assert aggregation_error(method, before, uploads, w, new) < 1e-5  # s B (Σ w_i M_i) A = Σ w_i s B M_i A
    got = method.delta_weights(new)[q]
    want = method.delta_scale() * before[f"{q}.lora_B"] @ sum(wi * u[f"{q}.lora_M"] for wi, u in zip(w, uploads)) \
        @ before[f"{q}.lora_A"]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_otp_lora_sends_ciphertext_of_the_same_size_and_aggregates_as_fedit():
    from lorabench.harness.clients import _nbytes
    from lorabench.methods.federated.otp_lora import NONCE, decrypt, encrypt
    spec = spec_for("otp-lora")
    method, _, before, uploads, w, new, sent = one_round(spec)
    key = method.enclave_key()
    for msg in sent + uploads:  # both ways: int32 words and a nonce, the plaintext's size plus 8 bytes
        assert NONCE in msg and all(v.dtype == torch.int32 for k, v in msg.items() if k != NONCE)
        assert _nbytes(msg) == _nbytes(decrypt(msg, key)) + 8
    assert method.round_summary([0, 1, 2])["wire_equal_bytes"] < 0.01  # a uniform pad leaves ~1/256 in the clear
    plain = [decrypt(u, key) for u in uploads]
    fedit = get_method("fedit")()
    expected, _ = fedit.aggregate(before, plain, w, [0, 1, 2], 3)
    assert all(torch.equal(new[k], expected[k]) for k in expected)  # the enclave's aggregation is FedIT's, exactly
    assert aggregation_error(method, before, uploads, w, new) == pytest.approx(
        aggregation_error(fedit, before, plain, w, expected), rel=1e-6)
    one, two = encrypt(plain[0], key), encrypt(plain[0], key)
    assert not torch.equal(one[NONCE], two[NONCE])  # a fresh pad per message
    assert all(torch.equal(decrypt(one, key)[k], plain[0][k]) for k in plain[0])  # decrypts bit for bit
    wrong = decrypt(one, key + 1)
    assert not any(torch.equal(wrong[k], plain[0][k]) for k in plain[0])


def test_every_federated_method_is_registered_with_its_paper():
    assert set(FED_METHODS) >= {"fedit", "ffa-lora", "flexlora", "hetlora", "federa", "slora", "pfedlora", "fedms",
                                "privatelora", "otp-lora"}
    for n in FED_METHODS:
        cls = get_method(n)
        assert cls.family == "federated" and cls.paper


# -- the suite ------------------------------------------------------------------------------------

FED_SUITE = """suite: fed
version: 1
seeds: [0]
federated: {clients: 4, rounds: 2}
partitions: [iid, "dirichlet:0.5"]
tasks: [rt-sentiment]
methods: [fedit, ffa-lora]
"""


def write(tmp_path, text, name="fed"):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def test_a_federated_suite_runs_each_method_on_each_partition():
    from lorabench.runner.suite import load_suite, trial_id
    s = load_suite("federated")
    trials = s.trials()
    by_task = {t.name: t.partitions or s.partitions for t in s.tasks}
    assert by_task == {"rt-sentiment": ["iid", "dirichlet:1.0", "dirichlet:0.3"], "movie-domains": ["domain"]}
    for task, parts in by_task.items():
        mine = [t for t in trials if t.task == task]
        assert {t.label for t in mine} == {f"{m.label}@{p}" for m in s.methods for p in parts}
        assert len(mine) == len(s.methods) * len(parts) * len(s.seeds)
    assert all(t.federated["partition"] == t.label.split("@")[1] for t in trials)
    assert len({trial_id(t) for t in trials}) == len(trials)


def test_the_suites_trial_ids_are_stable():
    """A trial's id (and so its record) changes only with its suite's version or its config: adding movie-domains at
    `domain` kept the rt-sentiment trials' ids (v1: 06bdf077d0b571c7 and 0376fa5632498790 below); v2, whose clients
    are sampled by the trial's own generator, gave every trial a new one. Computed when v2 was made."""
    from lorabench.runner.suite import load_suite, trial_id
    ids = {trial_id(t): (t.task, t.label, t.seed) for t in load_suite("federated").trials()}
    assert ids.get("31c086404c6ccb95") == ("rt-sentiment", "fedit@dirichlet:0.3", 0)
    assert ids.get("2b542058749648db") == ("rt-sentiment", "flexlora@iid", 1)
    assert sum(task == "rt-sentiment" for task, _, _ in ids.values()) == 90  # 3 partitions (dirichlet:1.0 added)


TASK_PARTS_SUITE = FED_SUITE.replace("tasks: [rt-sentiment]", "tasks:\n  - rt-sentiment\n"
                                     "  - {name: movie-domains, partitions: [domain, \"domain:0.75\"]}")


def test_a_task_may_list_its_own_partitions_and_overrides_select_from_them(tmp_path):
    from lorabench.runner.suite import load_suite
    runs = lambda ov: sorted({(t.task, t.federated["partition"]) for t in load_suite(  # noqa: E731
        write(tmp_path, TASK_PARTS_SUITE), ov).trials()})
    assert runs([]) == [("movie-domains", "domain"), ("movie-domains", "domain:0.75"),
                        ("rt-sentiment", "dirichlet:0.5"), ("rt-sentiment", "iid")]
    assert runs(["partitions=domain:0.75"]) == [("movie-domains", "domain:0.75")]  # from the task's own list
    assert runs(["partitions=dirichlet:0.1,domain"]) == [("movie-domains", "domain"), ("rt-sentiment", "dirichlet:0.1")]
    with pytest.raises(UserError, match=r"partitions=domain:0\.5: no task of suite fed runs domain:0\.5 "
                                        r"\(tasks with their own partitions: movie-domains: domain, domain:0\.75"):
        load_suite(write(tmp_path, TASK_PARTS_SUITE), ["partitions=domain:0.5"])


@pytest.mark.parametrize("text,pattern", [
    (FED_SUITE.replace("partitions: [iid, \"dirichlet:0.5\"]", "partitions: [iid, domain]"),
     r"fed\.yaml:5: task rt-sentiment: partition domain needs a task whose examples carry a domain \(movie-domains\)"
     r".*give the task its own list"),
    (TASK_PARTS_SUITE.replace("[domain, \"domain:0.75\"]", "[role]"),
     r"fed\.yaml:8: task movie-domains: partition role needs a task whose examples carry a role \(shakespeare-roles\)"),
    (TASK_PARTS_SUITE.replace("[domain, \"domain:0.75\"]", "[domain, domain]"), r"fed\.yaml:8: partitions must be"),
    (TASK_PARTS_SUITE.replace("federated: {clients: 4, rounds: 2}\npartitions: [iid, \"dirichlet:0.5\"]\n", ""),
     r"fed\.yaml:6: partitions needs a `federated:`"),
])
def test_a_partition_that_does_not_fit_its_task_is_refused_at_load(tmp_path, text, pattern):
    from lorabench.runner.suite import load_suite
    with pytest.raises(UserError, match=pattern):
        load_suite(write(tmp_path, text))


@pytest.mark.parametrize("text,pattern", [
    (FED_SUITE.replace("methods: [fedit, ffa-lora]", "methods: [fedit, lora]"), r"fed\.yaml:7: method 'lora' is not a federated"),
    (FED_SUITE.replace('"dirichlet:0.5"', '"dirichlet:x"'), r"fed\.yaml:5: partition 'dirichlet:x' is not valid"),
    (FED_SUITE.replace("rounds: 2}", "rounds: 2, clientz: 3}"), r"federated.*unknown key 'clientz'"),
    (FED_SUITE.replace("federated: {clients: 4, rounds: 2}\n", ""), r"partitions needs a `federated:`"),
])
def test_bad_federated_suites(tmp_path, text, pattern):
    from lorabench.runner.suite import load_suite
    with pytest.raises(UserError, match=pattern):
        load_suite(write(tmp_path, text))


def test_federated_overrides(tmp_path):
    from lorabench.runner.suite import load_suite
    s = load_suite(write(tmp_path, FED_SUITE), ["partitions=iid", "federated.rounds=3"])
    assert [t.federated for t in s.trials()] == [{"clients": 4, "rounds": 3, "partition": "iid"}] * 2
    with pytest.raises(UserError, match=r"command line: federated.roundz=3: federated.*unknown key"):
        load_suite(write(tmp_path, FED_SUITE), ["federated.roundz=3"])


# -- Flower's simulation on Ray (slow: each run starts Ray and a client actor that imports torch) ---

def ray_leftovers() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "lorabench-flwr-" in ln]


def test_the_client_actors_run_at_the_trials_niceness(monkeypatch):
    """Flower starts its Ray instance with the backend config the trial gives it; a Ray worker makes itself 15
    nicer than the trial by default (RAY_worker_niceness), and the client actors starved on a shared core
    (issues 19 and 21: a federated trial took 3,653 s beside the tests, 589 s alone). Ray started as Flower starts
    it (its RayBackend's ray.init) must run its workers, the client actors' kind, at this process's niceness."""
    pytest.importorskip("flwr", reason="the clients scenario needs Flower: pip install -e '.[federated]'")
    import shutil
    import tempfile

    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    from lorabench.harness.clients import simulation_backend
    if os.nice(0) >= 19:
        pytest.skip("at niceness 19 a worker cannot be nicer: the check cannot fail")
    monkeypatch.delenv("RAY_worker_niceness", raising=False)  # the setting's default (a value set there wins)
    ray_tmp = tempfile.mkdtemp(prefix="lbnice-", dir="/tmp")  # short: Ray's socket paths
    config = simulation_backend(FederatedConfig(), progress=False, ray_tmp=ray_tmp)
    try:
        RayBackend(config)  # ray.init(**config["init_args"]), as Flower's simulation starts Ray

        def niceness() -> int:
            import os
            return os.nice(0)
        resources = {k: config["client_resources"][k] for k in ("num_cpus", "num_gpus")}
        worker = ray.get(ray.remote(niceness).options(**resources).remote(), timeout=300)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert worker == os.nice(0), f"a Ray worker of the simulation runs at niceness {worker}, the trial at {os.nice(0)}"


@pytest.mark.slow
def test_a_client_that_raises_and_one_that_is_killed_do_not_stop_the_run():
    from lorabench.harness.trial import run_trial
    spec = spec_for("fedit", clients=4, rounds=2, fraction=1.0, local_steps=2, fail_clients=[2], kill_clients=[1])
    out = run_trial(spec, progress=False)
    fed = out["federated"]
    r1, r2 = fed["rounds"]
    assert 2 in r1["failed"] and 1 in r1["failed"], r1
    reasons = {f["client"]: f["reason"] for f in fed["failures"] if f["round"] == 1}
    assert "fault injection" in reasons[2]
    assert r1["clients"] and set(r1["clients"]).isdisjoint({1, 2})  # the round completed with the others
    assert 1 in r2["clients"] and 2 in r2["clients"], r2  # Ray restarted the killed actor; both are back
    assert r1["aggregation_error"] > 0 and r2["aggregation_error"] > 0  # FedAvg of the factors: inexact
    assert fed["mb_total"] > 0 and len(fed["score_curve"]) == 2
    assert out["outcomes"]["n"] == 16
    # the personalised score's trivial baseline: the replying clients' own majority-class shares
    share = fed["client_majority"]
    assert len(share) == 4 and all(0 <= x <= 1 for x in share)
    for r in (r1, r2):
        assert r["personal_majority"] == pytest.approx(sum(share[c] for c in r["clients"]) / len(r["clients"]))
    assert fed["personal_majority"] == r2["personal_majority"] and fed["personal_score"] == r2["personal_score"]
    assert not ray_leftovers(), "Ray processes left behind"


@pytest.mark.slow
def test_pfedlora_keeps_each_local_model_on_its_flower_node_across_rounds_on_domain_clients():
    """Through Flower's simulation: each client resumes the local model it kept in its node's Context.state,
    on the natural partition by domain (movie-domains: client c holds domain c mod 2)."""
    from lorabench.harness.trial import run_trial
    spec = TrialSpec(**{**asdict(spec_for("pfedlora", {"rank": 4, "local_ranks": [2, 4]}, clients=2, rounds=2,
                                          fraction=1.0, local_steps=2, partition="domain")),
                        "task": "movie-domains", "label": "pfedlora@domain"})
    out = run_trial(spec, progress=False)
    fed = out["federated"]
    assert [set(d) for d in fed["client_domains"]] == [{"imdb"}, {"rt"}]
    r1, r2 = fed["rounds"]
    assert not fed["failures"] and sorted(r1["clients"]) == sorted(r2["clients"]) == [0, 1]
    assert r1["method"]["resumed_local"] == 0.0 and r2["method"]["resumed_local"] == 1.0  # kept between rounds
    assert sorted(r2["method"]["local_ranks"]) == [2, 4] and r2["personal_score"] is not None
    assert not ray_leftovers(), "Ray processes left behind"


@pytest.mark.slow
def test_fedit_on_speaking_role_clients_through_flower():
    """The LEAF-style partition through Flower's simulation: 3 clients, each one speaking role, FedIT for 2
    rounds on a tiny random Llama; the global and personalised scores are perplexities."""
    from lorabench.harness.trial import run_trial
    spec = TrialSpec(**{**asdict(spec_for("fedit", clients=3, rounds=2, fraction=1.0, local_steps=2, partition="role")),
                        "task": "shakespeare-roles", "task_options": {"n_roles": 3, "n_eval": 12},
                        "model": "tiny-llama", "label": "fedit@role"})
    out = run_trial(spec, progress=False)
    fed = out["federated"]
    assert [list(d) for d in fed["client_roles"]] == [["Hamlet/Ham"], ["Othello/IAGO"], ["Othello/OTHELLO"]]
    assert fed["client_domains"] is None and fed["label_skew"] is None
    assert out["metric"] == "perplexity" and out["higher_is_better"] is False and out["score"] > 1
    r1, r2 = fed["rounds"]
    assert not fed["failures"] and sorted(r2["clients"]) == [0, 1, 2]
    assert r1["aggregation_error"] > 0 and r2["personal_score"] > 1  # FedAvg of the factors: inexact
    assert not ray_leftovers(), "Ray processes left behind"


def run_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`python -m lorabench ARGS` in its own session: on a timeout the whole group goes (the runner's fork
    server, the trial, its Ray instance), not only the CLI process."""
    import signal
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "lorabench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"lorabench {' '.join(args[:2])} did not finish in {timeout:.0f} s: {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_the_federated_suite_end_to_end_with_its_report(tmp_path):
    """`run federated` at a tiny size (FFA-LoRA on a Dirichlet partition, 2 rounds), then `report`."""
    records = tmp_path / "fed.jsonl"
    args = ["tasks=rt-sentiment", "model=tiny-bert", "methods=ffa-lora", "partitions=dirichlet:0.3", "seeds=0",
            "federated.rounds=2", "federated.clients=4", "federated.fraction=0.5", "federated.local_steps=2",
            "federated.eval_every=1", "task.n_train=80", "task.n_eval=32", "train.batch_size=4", "train.lr=0.01"]
    proc = run_cli(["run", "federated", "--records", str(records), "--no-progress", *args], timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (rec,) = [json.loads(x) for x in records.read_text().splitlines()]
    assert rec["status"] == "ok", rec.get("error")
    fed = rec["federated"]
    assert rec["label"] == "ffa-lora@dirichlet:0.3" and fed["config"]["partition"] == "dirichlet:0.3"
    assert fed["aggregation_error_max"] < 1e-5  # exact through Flower, measured
    assert fed["mb_total"] > 0 and fed["label_skew"] > 0.1 and len(fed["score_curve"]) == 2
    out = tmp_path / "report"
    rep = run_cli(["report", str(records), "--out", str(out)], timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    md = (out / "LEADERBOARD.md").read_text()
    assert "## Federated (the clients scenario)" in md and "client majority" in md
    assert "| rt-sentiment | dirichlet:0.3 | ffa-lora | accuracy (higher is better) | 1 |" in md
    assert fed["personal_majority"] is not None and len(fed["client_majority"]) == 4
    assert (out / "federated.csv").read_text().count("\n") == 2  # header and the one row
    assert (out / "plots" / "federated-rt-sentiment-rounds.png").exists()
    assert (out / "plots" / "federated-rt-sentiment-mb.png").exists()
    assert not ray_leftovers(), "Ray processes left behind"


@pytest.mark.slow
def test_a_stopped_federated_run_leaves_no_ray_process(tmp_path):
    """`kill` (SIGTERM) of a federated run mid-simulation: the runner killed the trial process alone, and its Ray
    instance's agents (ray::DashboardAgent, ray::RuntimeEnvAgent: children of the raylet, their command lines
    without the trial's Ray folder, so ray_leftovers() missed them) ran on for minutes. Every process below the
    runner must be gone soon after the stop."""
    import signal
    import time

    from tests.conftest import alive, cmdline, descendants
    args = ["tasks=rt-sentiment", "model=tiny-bert", "methods=fedit", "partitions=iid", "seeds=0",
            "federated.rounds=1000", "federated.clients=4", "federated.fraction=0.5", "federated.local_steps=2",
            "task.n_train=80", "task.n_eval=32", "train.batch_size=4"]
    err_path = tmp_path / "err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lorabench", "run", "federated", "--records",
                                 str(tmp_path / "r.jsonl"), "--no-progress", *args], stdout=err, stderr=err,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not any(b"ray::DashboardAgent" in c or b"ray::RuntimeEnvAgent" in c
                      for c in map(cmdline, descendants(proc.pid))):
            assert proc.poll() is None, err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "no Ray agent started in 600 s"
            time.sleep(0.5)
        time.sleep(2.0)
        below = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in below) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: cmdline(p)[:80] for p in below if alive(p)}
        assert not left, f"processes outlived the stopped run: {left}"
        assert "stopped by SIGTERM" in err_path.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


# -- the report's federated section ------------------------------------------------------------------

def fed_record(label, seed, score, personal, err, failures=0):
    method, part = label.split("@")
    return {"status": "ok", "task": "rt-sentiment", "label": label, "method": method, "seed": seed,
            "metric": "accuracy", "score": score, "outcomes": None,
            "federated": {"config": {"partition": part}, "initial_score": 0.5, "mb_per_round": 1.5, "mb_total": 3.0,
                          "aggregation_error_mean": err, "aggregation_error_max": 2 * err, "label_skew": 0.4,
                          "personal_score": personal, "simulation_seconds": 10.0,
                          "failures": [{"round": 1, "client": 0, "reason": "x"}] * failures,
                          "score_curve": [[1, score - 0.1, 1.5], [2, score, 3.0]]}}


def test_report_shows_the_personalised_baseline_and_one_class_global_models():
    """The clients' majority-class baseline beside the personalised score, also for a record from before it was
    recorded (the shares come from a record of the same clients); and seeds whose global model predicted one class."""
    from lorabench.report import federated as F

    def rec(label, seed, pred, clients, shares=None, majority=None):
        r = fed_record(label, seed, 0.5, 0.9, 0.05)
        label = "0110"
        r.update(task_options={"n_train": 2000}, outcomes={"n": len(pred), "pred": pred, "label": label, "correct": "".join(
            str(int(p == y)) for p, y in zip(pred, label))})
        f = r["federated"]
        f["config"].update(clients=4, test_fraction=0.2)
        f.update(client_train_sizes=[40, 30, 20, 10], rounds=[{"clients": [0, 1], "personal_score": 0.8},
                                                              {"clients": clients, "personal_score": 0.9}])
        if shares is not None:
            f.update(client_majority=shares, personal_majority=majority)
        return r
    shares = [1.0, 0.5, 0.75, 0.25]
    recs = [rec("fedit@dirichlet:0.3", 0, "0000", [0, 2], shares, 0.875),   # recorded: (1.0 + 0.75) / 2
            rec("fedit@dirichlet:0.3", 1, "0101", [1, 3]),                  # older record: (0.5 + 0.25) / 2
            rec("ffa-lora@dirichlet:0.3", 0, "1111", [1, 2])]               # older record: (0.5 + 0.75) / 2
    frame = F.federated_frame(recs).set_index("label")
    assert frame.loc["fedit@dirichlet:0.3", "personal_majority"] == pytest.approx((0.875 + 0.375) / 2)
    assert frame.loc["ffa-lora@dirichlet:0.3", "personal_majority"] == pytest.approx(0.625)
    assert frame.loc["fedit@dirichlet:0.3", "one_class_seeds"] == 1 and frame.loc["ffa-lora@dirichlet:0.3",
                                                                                "one_class_seeds"] == 1
    other = rec("fedit@dirichlet:1.0", 0, "0101", [0, 1])  # another partition: no shares to borrow
    other["federated"]["config"]["partition"] = "dirichlet:1.0"
    assert math.isnan(F.federated_frame([other]).iloc[0]["personal_majority"])
    md = "\n".join(F.markdown(F.federated_frame(recs), []))
    assert "| 1 | 0.900 ± " in md and "| 0.625 |" in md and "client majority" in md


def test_report_section_aggregates_seeds_per_method_and_partition():
    from lorabench.report import federated as F
    recs = [fed_record("fedit@iid", 0, 0.70, 0.8, 0.05, failures=1), fed_record("fedit@iid", 1, 0.74, 0.9, 0.07),
            fed_record("ffa-lora@iid", 0, 0.72, 0.85, 0.0), {"status": "failed", "label": "x@iid"}]
    frame = F.federated_frame(recs)
    assert list(frame["label"]) == ["fedit@iid", "ffa-lora@iid"]
    fedit = frame.iloc[0]
    assert fedit["n_seeds"] == 2 and fedit["score"] == pytest.approx(0.72) and fedit["score_ci95"] > 0
    assert fedit["aggregation_error"] == pytest.approx(0.06) and fedit["aggregation_error_max"] == pytest.approx(0.14)
    assert fedit["failed_client_rounds"] == 1 and fedit["personal_score"] == pytest.approx(0.85)
    md = "\n".join(F.markdown(frame, ["federated-rt-sentiment-rounds.png"]))
    assert "| rt-sentiment | iid | fedit | accuracy (higher is better) | 2 | 0.720 ± " in md
    assert "0.00e+00 / 0.00e+00" in md
    # a perplexity task (the speaking roles) says its scores are lower-is-better
    ppl = [dict(fed_record("fedit@role", 0, 90.0, 85.0, 0.05), task="shakespeare-roles", metric="perplexity",
                higher_is_better=False)]
    assert "| shakespeare-roles | role | fedit | perplexity (lower is better) | 1 |" in "\n".join(
        F.markdown(F.federated_frame(ppl), []))
    assert "![rt-sentiment-rounds](plots/federated-rt-sentiment-rounds.png)" in md
    pngs = F.plots(recs)
    assert set(pngs) == {"federated-rt-sentiment-rounds.png", "federated-rt-sentiment-mb.png"}
    assert all(p.png.startswith(b"\x89PNG") for p in pngs.values())
    assert F.plots(recs)["federated-rt-sentiment-mb.png"].png == pngs["federated-rt-sentiment-mb.png"].png  # same bytes
