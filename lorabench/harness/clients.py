"""The clients scenario: federated LoRA on Flower's simulation engine (Ray), one trial = method x partition x seed.

A trial whose spec carries `federated` options runs here instead of `trial.run_trial`'s single
task (docs/architecture.md, "Where things live"; suites/federated.yaml):

- the task's training split is partitioned over `clients` clients (`lorabench/harness/partitions.py`:
  IID, Dirichlet label skew, or a natural partition: by domain, by speaking role); each client keeps part
  of its examples as its own test data. The task is a labelled classification task, or a language-modelling
  one (shakespeare-roles: each client one speaking role, scored by perplexity, lower is better);
- Flower's `ServerApp` runs `rounds` rounds of a `FedAvg`-based strategy whose aggregation is the
  method's (`lorabench/methods/federated/base.py`): it samples `fraction` of the clients, sends each
  what the method downloads to it, and aggregates what they upload; each client is a Flower
  `ClientApp` that trains `local_steps` steps with the one training loop (`harness/train.py`);
- clients run in a bounded pool of Ray actors (`actors`, one CPU each, a private Ray instance with
  its own temp dir and ports, shut down on every path); a client that raises, or whose actor is
  killed (and killed again on Ray's retry, `task_retries`), becomes an error reply: the round
  completes with the others (Flower's strategy skips failed replies), the failure is recorded, and
  Ray restarts the killed actor (`max_restarts`) for the clients queued behind it; every round
  waits at most `round_timeout_s`, so nothing hangs;
- measured per round: the global model's score on the task's eval part, the clients' personalised
  score (each client's trained model on its own test data), megabytes down and up (the tensors'
  bytes), and the aggregation error ||ΔW_agg - Σ_i w_i ΔW_i||_F / ||Σ_i w_i ΔW_i||_F over all adapted
  layers (0 for an exact aggregation), plus the method's own `round_metrics`.

The record has the single-task fields (score = the final global model's; outcomes per example) and
a `federated` block with every round, every failure and the totals; the report reads both.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field

from lorabench.config import from_dict, option
from lorabench.errors import UserError
from lorabench.harness import partitions

MB = 1e6


@dataclass
class FederatedConfig:
    clients: int = option(10, "number of clients (Flower supernodes), each holding one partition of the train split",
                          low=2, high=1000)
    rounds: int = option(5, "federated rounds", low=1, high=10000)
    fraction: float = option(0.5, "fraction of the clients sampled for training in each round (at least 2)",
                             low=0.0, high=1.0)
    local_steps: int = option(5, "optimizer steps each sampled client takes per round (train.batch_size examples each)",
                              low=1)
    partition: str = option("iid", "'iid' (the control), 'dirichlet:ALPHA' (label skew; small ALPHA, strong skew), "
                                   "'domain' / 'domain:P' (each client one domain, or a share P from its home domain; "
                                   "a task whose examples carry a domain: movie-domains), or 'role' / 'role:P' (the "
                                   "same by speaking role: shakespeare-roles)")
    test_fraction: float = option(0.2, "share of each client's examples held out as its own test data "
                                       "(the personalised score)", low=0.0, high=0.9)
    actors: int = option(1, "Ray actors, i.e. clients trained at once (one CPU each); bounded by this machine's "
                            "cores and memory", low=1, high=64)
    actor_memory_mb: int = option(1500, "memory one actor is expected to need (model, optimizer, activations): "
                                        "actors x this must fit in the available memory, checked before Ray starts",
                                  low=100)
    round_timeout_s: float = option(900.0, "the most a round waits for its clients' replies; a client that has not "
                                           "replied by then counts as failed", low=1.0)
    max_restarts: int = option(4, "times Ray restarts a killed client actor (0: a killed actor stays dead and every "
                                  "later client sent to it fails)", low=0, high=100)
    task_retries: int = option(1, "times Ray retries a client whose actor died under it; the clients queued on a "
                                  "restarting actor wait for it instead of failing at once (Ray's max_task_retries)",
                               low=0, high=10)
    eval_every: int = option(1, "score the global model on the eval part every this many rounds (and after the last)",
                             low=1)
    fail_clients: list[int] = option(default_factory=list, help=(
        "fault injection (tests, chaos runs): these clients raise an exception in round fail_round"))
    kill_clients: list[int] = option(default_factory=list, help=(
        "fault injection: these clients' processes are killed (SIGKILL) in round fail_round"))
    fail_round: int = option(1, "the round in which fail_clients raise and kill_clients are killed", low=1)

    def __post_init__(self):
        partitions.parse(self.partition)
        if round(self.fraction * self.clients) < 2 and self.fraction > 0:
            raise ValueError(f"fraction={self.fraction} of {self.clients} clients samples fewer than 2 per round; "
                             f"Flower samples at least 2: raise fraction or clients")
        bad = [c for c in self.fail_clients + self.kill_clients if not 0 <= c < self.clients]
        if bad:
            raise ValueError(f"fail_clients/kill_clients {bad} are not clients 0..{self.clients - 1}")

    @property
    def per_round(self) -> int:
        return max(2, round(self.fraction * self.clients))


def sample_clients(seed: int, server_round: int, n_clients: int, k: int) -> list[int]:
    """The client slots trained in round `server_round` of a trial with seed `seed`: k of n_clients drawn uniformly
    without replacement (FedAvg's client sampling, McMahan et al., arXiv 1602.05629, Algorithm 1: S_t = random set
    of max(C K, 1) clients), from a generator of this trial and round alone, so that nothing else drawing random
    numbers in the process (the server's evaluation re-seeds Python's `random` to build its model) changes who
    trains. Flower's own `sample_nodes` draws from the global `random` over node ids, which made the rounds after an
    evaluation repeat one sample (two alternating sets of clients, 6 of 10 ever trained: records of suite federated
    v1)."""
    import random
    return sorted(random.Random(f"lorabench-clients/{seed}/{server_round}").sample(range(n_clients), k))


def _nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def aggregation_error(method, global_before: dict, uploads: list[dict], weights: list[float], global_after: dict) -> float:
    """||ΔW_agg - Σ_i w_i ΔW_i||_F / ||Σ_i w_i ΔW_i||_F over every adapted layer together, where ΔW_i is client
    i's update (its upload over the state it started from) and ΔW_agg the aggregated global model's."""
    import torch
    exact: dict = {}
    for u, w in zip(uploads, weights):
        for p, d in method.delta_weights({**global_before, **u}).items():
            exact[p] = exact.get(p, 0) + w * d
    agg = method.global_delta_weights(global_after)
    num = sum(float(torch.linalg.matrix_norm(agg[p] - exact[p]) ** 2) for p in exact)
    den = sum(float(torch.linalg.matrix_norm(exact[p]) ** 2) for p in exact)
    return (num / den) ** 0.5 if den > 0 else 0.0


class ClientTask:
    """The trial's task seen by one client: its own training examples, its own test examples as `eval`."""

    def __init__(self, task, train: list[dict], test: list[dict]):
        from lorabench.tasks.base import Split
        self._task = copy.copy(task)
        self._task._split = Split(train=train, eval=test, val=[])

    def __getattr__(self, name):
        return getattr(self._task, name)


# -- the client (runs in a Ray actor) ------------------------------------------------------------

_ACTOR_CACHE: dict = {}  # per actor process: the base model, tokenizer, task and client parts of the trial


def _cached(spec, fed: FederatedConfig):
    from lorabench import assets
    from lorabench.harness.trial import seed_everything
    from lorabench.tasks import get_task
    key = (spec.task, repr(spec.task_options), spec.model, spec.seed, fed.clients, fed.partition, fed.test_fraction)
    if key not in _ACTOR_CACHE:
        import transformers
        transformers.utils.logging.set_verbosity_error()  # the load report, once per actor, is noise here
        transformers.utils.logging.disable_progress_bar()
        _ACTOR_CACHE.clear()
        task = get_task(spec.task).from_options(spec.task_options, where=f"task {spec.task}")
        parts = partitions.client_parts(task.split().train, fed.clients, fed.partition, fed.test_fraction)
        seed_everything(spec.seed)  # the head's init: the same on the server and every client
        loaded = assets.load_model(spec.model or task.default_model, head=task.head, num_labels=task.num_labels,
                                   seed=spec.seed)
        _ACTOR_CACHE[key] = (task, parts, loaded.model, loaded.tokenizer)
    return _ACTOR_CACHE[key]


def apply_method(spec, model, head: str, method):
    from lorabench.harness.trial import head_modules, seed_everything
    from lorabench.methods.base import ApplyContext
    ctx = ApplyContext(architecture=model.config.model_type, head_modules=head_modules(model, head), seed=spec.seed)
    seed_everything(spec.seed)  # frozen random tensors (FFA-LoRA's A) come from the shared seed on every client
    return method.apply(model, ctx)


def client_round(spec_data: dict, arrays: dict, config: dict) -> tuple[dict, dict]:
    """One client's round: load the server's tensors, train `local_steps`, score on its own test data,
    return (upload, metrics)."""
    upload, metrics, _ = stateful_client_round(spec_data, arrays, config, None)
    return upload, metrics


def stateful_client_round(spec_data: dict, arrays: dict, config: dict, personal: dict | None) -> tuple[dict, dict, dict]:
    """`client_round` for a client that keeps tensors between rounds (pFedLoRA's local model): `personal` is what
    it kept after its last round (None before its first), loaded after the server's tensors; returns (upload,
    metrics, what it keeps now: the method's `personal_state`, empty for the methods that keep nothing)."""
    from lorabench.harness.train import TrainConfig, train
    from lorabench.harness.trial import TrialSpec, seed_everything
    from lorabench.methods import get_method
    spec = TrialSpec(**spec_data)
    fed = from_dict(FederatedConfig, spec.federated, "federated")
    slot, rnd = int(config["slot"]), int(config["server-round"])
    if rnd == fed.fail_round and slot in fed.kill_clients:
        os.kill(os.getpid(), signal.SIGKILL)  # fault injection: this client's process dies mid-round
    if rnd == fed.fail_round and slot in fed.fail_clients:
        raise RuntimeError(f"client {slot} failed in round {rnd} (fault injection: fail_clients)")
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(1)  # one CPU per actor (client_resources)
    task, parts, base, tokenizer = _cached(spec, fed)
    train_part, test_part = parts[slot]
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    method = method.for_client(slot, fed.clients)
    model = apply_method(spec, copy.deepcopy(base), task.head, method)
    method.load_state(model, arrays)
    if personal:
        method.load_state(model, personal)
    cfg = from_dict(TrainConfig, {**spec.train, "steps": fed.local_steps, "threads": None}, "train")
    client_task = ClientTask(task, train_part, test_part)
    seed = spec.seed * 1_000_003 + rnd * 1009 + slot  # each client and round its own batches
    seed_everything(seed)
    result = train(model, method, client_task, tokenizer, cfg, seed, progress=False)
    metrics = {"num-examples": len(train_part), "slot": slot, "train-loss": float(result.final_loss or 0.0),
               "train-seconds": round(result.train_seconds, 3)}
    if result.train_tokens_per_s is not None:
        metrics["train-tokens-per-s"] = float(result.train_tokens_per_s)
    if test_part:
        model.eval()
        ev = client_task.evaluate(model, tokenizer, cfg.eval_batch_size)
        metrics["personal-score"] = float(ev.metrics[task.metric.name])
    if result.method_metrics.get("dp_steps"):  # DP-SGD: what the server's privacy accountant needs
        metrics["dp-sample-rate"] = min(1.0, cfg.batch_size / len(train_part))
        metrics["dp-sigma"] = float(result.method_metrics["dp_noise_multiplier"])
    for k, v in result.method_metrics.items():  # the method's mechanism, as this client ran it
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            metrics[f"method.{k}"] = v
    kept = method.personal_state(model)
    if kept:  # share of the round's clients that resumed from the local model they kept (0 in their first round)
        metrics["method.resumed_local"] = 1.0 if personal else 0.0
    metrics["client-seconds"] = round(time.perf_counter() - t0, 3)
    return method.upload(model), metrics, kept


def make_client_app(spec_data: dict):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def _train(msg, context):
        import torch  # noqa: F401  (flwr's ArrayRecord.to_torch_state_dict needs torch imported)

        from lorabench.harness.clients import stateful_client_round
        arrays = msg.content["arrays"].to_torch_state_dict()
        kept = context.state["personal"].to_torch_state_dict() if "personal" in context.state else None
        upload, metrics, personal = stateful_client_round(spec_data, arrays, dict(msg.content["config"]), kept)
        if personal:  # stays on this node between rounds (Flower's per-node Context.state), never sent
            context.state["personal"] = ArrayRecord(personal)
        return Message(RecordDict({"arrays": ArrayRecord(upload), "metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


# -- the server (runs in the trial process) ------------------------------------------------------

@dataclass
class RoundLog:
    round: int
    clients: list[int] = field(default_factory=list)      # slots that replied with an update
    failed: list[int] = field(default_factory=list)       # slots whose reply was an error (or missing)
    mb_down: float = 0.0
    mb_up: float = 0.0
    aggregation_error: float | None = None
    global_score: float | None = None
    personal_score: float | None = None                   # mean over the clients that replied
    personal_majority: float | None = None                # the same clients' trivial score (partitions.client_majority)
    train_loss: float | None = None
    seconds: float = 0.0
    method: dict = field(default_factory=dict)            # the method's round_metrics


def _strategy_class():
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp.strategy import FedAvg

    class LoraStrategy(FedAvg):
        """Flower's FedAvg with the method's download and aggregation, measuring bytes and exactness."""

        def __init__(self, method, fed: FederatedConfig, global_state: dict, log, seed: int):
            super().__init__(fraction_train=fed.fraction, fraction_evaluate=0.0, min_train_nodes=fed.per_round,
                             min_available_nodes=fed.clients)
            self.method, self.fed, self.state, self.log, self.seed = method, fed, global_state, log, seed
            self.slots: dict[int, int] = {}
            self.dp_history: dict[int, list[tuple[float, float, int]]] = {}  # slot -> (sigma, q, steps) per round
            self.dp_epsilon: float | None = None
            self.tokens_per_s: list[float] = []  # each client's median training tokens/s, every round
            self.failures: list[dict] = []
            self.rounds: list[RoundLog] = []
            self.client_majority: list[float | None] | None = None  # each slot's trivial personalised score
            self._t = 0.0

        def configure_train(self, server_round, arrays, config, grid):
            self._t = time.perf_counter()
            list(super().configure_train(server_round, arrays, config, grid))  # waits for every node to connect
            if not self.slots:  # client slot = rank of the node id: fixed for the run (its data, its rank)
                self.slots = {nid: i for i, nid in enumerate(sorted(grid.get_node_ids()))}
            node_of = {slot: nid for nid, slot in self.slots.items()}
            # who trains: this trial's own draw (sample_clients), not the sample Flower's FedAvg just drew
            sampled = sample_clients(self.seed, server_round, self.fed.clients, self.fed.per_round)
            out, down = [], 0
            entry = RoundLog(round=server_round)
            for slot in sampled:
                state = self.method.download(self.state, slot, self.fed.clients)
                down += _nbytes(state)
                cfg = ConfigRecord({"server-round": server_round, "slot": slot})
                out.append(Message(RecordDict({"arrays": ArrayRecord(state), "config": cfg}),
                                   message_type=MessageType.TRAIN, dst_node_id=node_of[slot]))
            entry.mb_down = down / MB
            self.rounds.append(entry)
            self.log(f"round {server_round}/{self.fed.rounds}: {len(out)} clients sampled")
            return out

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            entry = self.rounds[-1]
            valid, errors = self._check_and_log_replies(replies, is_train=True, validate=False)
            for msg in errors:
                slot = self.slots.get(msg.metadata.src_node_id, -1)
                reason = str(msg.error.reason).strip().splitlines()
                reason = next((ln for ln in reversed(reason) if ln.strip()), "?")[:300]
                entry.failed.append(slot)
                self.failures.append({"round": server_round, "client": slot, "reason": reason})
                self.log(f"round {server_round}: client {slot} failed: {reason}")
            missing = self.fed.per_round - len(replies)
            for _ in range(max(0, missing)):  # no reply within round_timeout_s
                entry.failed.append(-1)
                self.failures.append({"round": server_round, "client": -1,
                                      "reason": f"no reply within round_timeout_s={self.fed.round_timeout_s:g}"})
            if not valid:
                self.log(f"round {server_round}: no client replied with an update; the global model is unchanged")
                entry.seconds = round(time.perf_counter() - self._t, 3)
                return None, None
            uploads, weights, slots, metrics = [], [], [], []
            for msg in valid:
                m = dict(next(iter(msg.content.metric_records.values())))
                uploads.append(msg.content["arrays"].to_torch_state_dict())
                weights.append(float(m["num-examples"]))
                slots.append(int(m["slot"]))
                metrics.append(m)
            before = self.state
            self.state, used = self.method.aggregate(before, uploads, weights, slots, self.fed.clients)
            entry.clients = slots
            entry.mb_up = sum(_nbytes(u) for u in uploads) / MB
            entry.aggregation_error = round(aggregation_error(self.method, before, uploads, used, self.state), 8)
            pers = [m["personal-score"] for m in metrics if "personal-score" in m]
            entry.personal_score = round(sum(pers) / len(pers), 6) if pers else None
            if pers and self.client_majority is not None:  # the trivial baseline of the same clients
                base = [self.client_majority[int(m["slot"])] for m in metrics if "personal-score" in m]
                entry.personal_majority = round(sum(base) / len(base), 6) if None not in base else None
            entry.train_loss = round(sum(m["train-loss"] for m in metrics) / len(metrics), 6)
            self.tokens_per_s += [m["train-tokens-per-s"] for m in metrics if "train-tokens-per-s" in m]
            entry.method = self.method.round_summary(slots)
            for key in sorted({k for m in metrics for k in m if k.startswith("method.")}):
                vals = [m[key] for m in metrics if key in m]  # the server's own summary wins a shared name
                entry.method.setdefault(key[len("method."):], round(sum(vals) / len(vals), 6))
            for m in metrics:
                if "dp-sigma" in m:
                    self.dp_history.setdefault(int(m["slot"]), []).append(
                        (float(m["dp-sigma"]), float(m["dp-sample-rate"]), int(m["method.dp_steps"])))
            if self.dp_history:
                self.dp_epsilon = dp_epsilon(self.dp_history, float(self.method.config.dp_delta))
                entry.method["dp_epsilon"] = round(self.dp_epsilon, 6)
            entry.seconds = round(time.perf_counter() - self._t, 3)
            return ArrayRecord({"round": torch.tensor([server_round])}), None  # the state lives in self.state

    return LoraStrategy


def dp_epsilon(history: dict[int, list[tuple[float, float, int]]], delta: float) -> float:
    """The privacy budget epsilon at `delta` of the client that spent the most: opacus' RDP accountant over
    every (noise multiplier, sample rate, steps) of each client's DP-SGD rounds (it assumes Poisson sampling
    of each batch at that rate; the training loop shuffles and takes fixed-size batches)."""
    from opacus.accountants import RDPAccountant
    worst = 0.0
    for steps in history.values():
        acc = RDPAccountant()
        acc.history = list(steps)
        worst = max(worst, float(acc.get_epsilon(delta)))
    return worst


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def simulation_backend(fed: FederatedConfig, progress: bool, ray_tmp: str) -> dict:
    """The backend config of Flower's simulation: the client actors' resources and the arguments of the
    `ray.init` with which Flower starts a private Ray instance (flwr's RayBackend.init_ray passes them on)."""
    from lorabench.runner.ray_cluster import same_niceness_config
    return {
        # one CPU per client actor: Flower's pool holds exactly `actors` actors; a killed actor is restarted
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0, "max_restarts": fed.max_restarts,
                             "max_task_retries": fed.task_retries},
        "init_args": {"address": "local",  # a private Ray instance, never a cluster someone else started
                      "num_cpus": fed.actors, "num_gpus": 0, "include_dashboard": False,
                      "dashboard_port": _free_port(),  # Ray's minimal dashboard head: not the default 8265
                      "object_store_memory": 100 * 2**20, "_temp_dir": ray_tmp,
                      "logging_level": logging.ERROR, "log_to_driver": bool(progress),
                      # Flower ends a simulation by sending each actor `terminate` (ray.actor.exit_actor()) and
                      # shutting Ray down at once; Ray counts that intentional exit as a failure of the terminate
                      # task, retries it (the actors' max_task_retries) and first pushes "will be retried" to this
                      # driver, which is shutting down: "task_manager.cc: Failed to push error to driver", once a
                      # trial. Only that note goes: a client task retried mid-round is still retried (and a
                      # client that fails for good is still recorded). And the client actors run at this
                      # process's niceness, not 15 nicer (Ray's default; ray_cluster.same_niceness_config).
                      "_system_config": {"enable_output_error_log_if_still_retry": False,
                                         **same_niceness_config()}},
    }


def check_machine(fed: FederatedConfig) -> None:
    """Refuse, before Ray starts, a pool of actors this machine cannot run (cores, memory): never hang."""
    cores = len(os.sched_getaffinity(0))
    if fed.actors > cores:
        raise UserError(f"federated.actors={fed.actors} is more than the {cores} core(s) this process may use: each "
                        f"actor takes one CPU, and Flower's pool would hold actors no core can run; use at most {cores}")
    try:
        with open("/proc/meminfo") as f:
            avail = int(next(ln for ln in f if ln.startswith("MemAvailable")).split()[1]) / 1024
    except (OSError, StopIteration):
        return
    need = fed.actors * fed.actor_memory_mb
    if need > 0.8 * avail:
        raise UserError(f"federated: {fed.actors} actor(s) x actor_memory_mb={fed.actor_memory_mb} = {need:.0f} MB is more "
                        f"than 80% of the {avail:.0f} MB available: Ray would kill clients for memory (or, with too "
                        f"many actors, hang); lower federated.actors")


def run_federated(spec, progress: bool = True) -> dict:
    """Run one federated trial through Flower's simulation; returns the result part of its record."""
    import sys

    import ray
    import torch
    import transformers
    from flwr.app import ArrayRecord
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from lorabench import assets
    from lorabench.harness.train import TrainConfig, precision
    from lorabench.harness.trial import seed_everything
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method
    from lorabench.methods.federated.base import FederatedLoRA
    from lorabench.tasks import get_task

    t_start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    fed = from_dict(FederatedConfig, spec.federated, "federated")
    train_cfg = from_dict(TrainConfig, spec.train, "train")
    if train_cfg.threads:  # the server's evaluations; each client actor trains on one thread, its one CPU
        torch.set_num_threads(train_cfg.threads)  # (client_resources, client_round), as a trial sets its own
    task = get_task(spec.task).from_options(spec.task_options, where=f"task {spec.task}")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    if not isinstance(method, FederatedLoRA):
        raise UserError(f"method {spec.method!r} is not a federated method (family 'federated'); the clients scenario "
                        f"needs its download and aggregation rules")
    if task.head != "seq-cls" and task.kind != "perplexity":
        raise UserError(f"task {spec.task}: the clients scenario partitions classification data (a seq-cls head) or "
                        f"language-modelling text (perplexity: shakespeare-roles); {spec.task} is a {task.kind} task")
    why = partitions.fits(fed.partition, type(task))
    if why:
        raise UserError(f"task {spec.task}: {why}")
    check_machine(fed)
    split = task.split()
    parts = partitions.client_parts(split.train, fed.clients, fed.partition, fed.test_fraction)

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[federated {spec.label} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    seed_everything(spec.seed)
    loaded = assets.load_model(spec.model or task.default_model, head=task.head, num_labels=task.num_labels,
                               seed=spec.seed)
    base, tokenizer = loaded.model, loaded.tokenizer
    server_model = apply_method(spec, copy.deepcopy(base), task.head, method)
    global_state = method.initial_state(server_model)
    trainable = sum(p.numel() for _, p in method.trainable_parameters(server_model))
    total = sum(p.numel() for p in server_model.parameters())
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # Flower's INFO lines per round: the trial logs its own
    strategy = _strategy_class()(method, fed, global_state, log, spec.seed)
    majority = partitions.client_majority(parts)
    strategy.client_majority = majority
    evals: dict[int, tuple[float, object]] = {}

    def evaluate_global(rnd: int) -> float:
        model = apply_method(spec, copy.deepcopy(base), task.head, copy.deepcopy(method))
        method.load_global(model, strategy.state)
        model.eval()
        with precision(train_cfg):
            ev = task.evaluate(model, tokenizer, train_cfg.eval_batch_size)
        evals[rnd] = (float(ev.metrics[task.metric.name]), ev)
        return evals[rnd][0]

    def evaluate_fn(rnd, arrays):
        if rnd > 0 and (rnd % fed.eval_every == 0 or rnd == fed.rounds):
            score = evaluate_global(rnd)
            strategy.rounds[-1].global_score = round(score, 6)
            r = strategy.rounds[-1]
            log(f"round {rnd}: global {task.metric.name} {score:.4f}, personalised {r.personal_score}, "
                f"aggregation error {r.aggregation_error}, {r.mb_down + r.mb_up:.2f} MB")
        return None

    server = ServerApp()

    @server.main()
    def _main(grid, context):
        strategy.start(grid=grid, initial_arrays=ArrayRecord({"round": torch.tensor([0])}), num_rounds=fed.rounds,
                       timeout=fed.round_timeout_s, evaluate_fn=evaluate_fn)

    score0 = evaluate_global(0)
    log(f"round 0: global {task.metric.name} {score0:.4f} (before training)")
    spec_data = asdict(spec)
    ray_tmp = tempfile.mkdtemp(prefix="lorabench-flwr-", dir="/tmp")  # short: Ray's socket paths stay under 107 bytes
    backend = simulation_backend(fed, progress, ray_tmp)
    t_sim = time.perf_counter()
    try:
        run_simulation(server_app=server, client_app=make_client_app(spec_data), num_supernodes=fed.clients,
                       backend_config=backend)
    finally:
        flwr_logger.setLevel(level)
        if ray.is_initialized():
            ray.shutdown()
        import shutil
        shutil.rmtree(ray_tmp, ignore_errors=True)
    sim_seconds = time.perf_counter() - t_sim
    rounds = strategy.rounds
    if len(rounds) < fed.rounds:
        raise RuntimeError(f"the simulation ended after {len(rounds)} of {fed.rounds} rounds")
    final_score, final_ev = evals[max(evals)]
    errors = [r.aggregation_error for r in rounds if r.aggregation_error is not None]
    personal = [r for r in rounds if r.personal_score is not None]
    mb_cum, curve = 0.0, []
    for r in rounds:
        mb_cum += r.mb_down + r.mb_up
        if r.global_score is not None:
            curve.append([r.round, r.global_score, round(mb_cum, 6)])
    sizes = [len(tr) for tr, _ in parts]
    skew = partitions.label_skew(parts)
    from lorabench.harness.trial import method_fields, scored_fields
    return {
        **scored_fields(task, split, final_ev),
        "val_score": None,
        "val_curve": [],
        "trained_steps": fed.local_steps * sum(len(r.clients) for r in rounds),
        "model_info": loaded.info,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": _nbytes(strategy.state),
        "train": asdict(train_cfg) | {"lr_used": train_cfg.lr if train_cfg.lr is not None else method.default_lr},
        **method_fields(method),
        "final_loss": rounds[-1].train_loss,
        "loss_curve": [r.train_loss for r in rounds if r.train_loss is not None],
        # the median over clients and rounds of each client's median tokens/s (its steps after warm-up)
        "train_tokens_per_s": round(statistics.median(strategy.tokens_per_s), 1) if strategy.tokens_per_s else None,
        "eval_tokens_per_s": round(final_ev.n_tokens / final_ev.seconds, 1) if final_ev.seconds > 0 else None,
        "train_seconds": round(sim_seconds, 3),
        "eval_seconds": round(final_ev.seconds, 3),
        "method_metrics": rounds[-1].method,
        "peak_rss_mb": round(peak_rss_mb(), 1),  # the server process; clients run in Ray actors
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
        "federated": {
            "config": asdict(fed),
            "engine": "flower-simulation (ray)",
            "client_train_sizes": sizes,
            "label_skew": None if skew is None else round(skew, 6),  # None: the examples have no labels
            "client_domains": partitions.client_domains(parts),  # examples per domain of each client (None: no domains)
            "client_roles": partitions.client_domains(parts, "role"),  # examples per speaking role (None: no roles)
            "initial_score": round(score0, 6),
            "rounds": [asdict(r) for r in rounds],
            "failures": strategy.failures,
            "score_curve": curve,  # [round, global score, cumulative MB]
            "mb_total": round(mb_cum, 6),
            "mb_per_round": round(mb_cum / len(rounds), 6),
            "aggregation_error_mean": round(sum(errors) / len(errors), 8) if errors else None,
            "aggregation_error_max": round(max(errors), 8) if errors else None,
            "personal_score": personal[-1].personal_score if personal else None,
            # the last personalised round's clients, each predicting its own majority class: the trivial baseline
            "personal_majority": personal[-1].personal_majority if personal else None,
            "client_majority": majority,  # per client: the share of its own test examples in its majority class
            "simulation_seconds": round(sim_seconds, 3),
            "dp_epsilon": None if strategy.dp_epsilon is None else round(strategy.dp_epsilon, 6),
            "dp_delta": float(method.config.dp_delta) if strategy.dp_epsilon is not None else None,
        },
    }
