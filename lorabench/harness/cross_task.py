"""The cross-task scenario's leave-one-task-out protocol (issue 17; docs/cross-task.md), LoRAHub's protocol
(arXiv 2307.13269, sec. 4) scaled down to one core.

One trial = a composition method (family `cross-task`) x a held-out task x a seed:

1. the library: one LoRA per pool task (lorabench/harness/multitask.py, trained fused and cached by
   adapter id, shared by every trial); the candidates are the pool's adapters except the held-out task's;
2. the seed draws k examples (the "k shots") from the held-out task's training split;
3. the method composes the candidates (`CompositionMethod.compose`), scoring composed adapters by their
   loss on the k shots (LoRAHub's nevergrad search, arithmetic's λ grid; uniform averaging uses none);
4. the composed adapter is scored on the held-out task's eval split, as every trial is.

Each record carries, beside the method's score, the baselines of the same seed: zero-shot (the base model)
and the best single candidate chosen by k-shot loss, scored on the same eval examples; and what the
composition cost (k-shot loss evaluations, tokens). The uniform-average trial also records, on the real
library, the error of every weight-space merge against the exact weighted sum (methods/cross_task/merging.py).
"""
from __future__ import annotations

import copy
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from lorabench.config import from_dict, option
from lorabench.errors import UserError


@dataclass
class CrossTaskConfig:
    pool: list[str] | None = option(None, "the library's tasks (None: the 13 of lorabench/harness/task_pool.py); "
                                          "the held-out task's own adapter is never a candidate")
    k_shots: int = option(5, "examples of the held-out task the composition may see (LoRAHub: 5)", low=1, high=256)
    library_rank: int = option(8, "LoRA rank of every library adapter", low=1, high=256)
    library_alpha: float = option(16.0, "LoRA alpha of every library adapter", low=0.0)
    library_steps: int = option(100, "training steps of every library adapter", low=1)
    library_batch_size: int = option(8, "examples per step of every library adapter", low=1)
    library_lr: float = option(5e-4, "learning rate of every library adapter (AdamW, linear decay)", low=0.0)
    library_seed: int = option(0, "the library is trained once, at this seed, for every trial seed", low=0)
    adapters_per_job: int = option(4, "library adapters trained together in one fused job", low=1)
    library_tokens_per_job: int = option(2048, "a fused library job's padded tokens per step at most; longer tasks "
                                               "train fewer adapters at a time (multitask.plan_jobs)", low=1)
    merge_errors: bool = option(True, "uniform-average trials: record every weight-space merge's error on the library")
    merge_density: float = option(0.5, "density of peft's ties/dare/magnitude_prune merges", low=0.0, high=1.0)
    icl: bool = option(True, "baseline: k-shot in-context learning, the k shots (prompt and correct option) before "
                             "every eval prompt of the base model (lm-eval's few-shot format)")
    kshot_lora_steps: int = option(20, "baseline: a fresh LoRA (the library's rank, alpha and layers) trained on the k "
                                       "shots alone for this many full-batch steps; 0 leaves it out", low=0)
    kshot_lora_lr: float = option(1e-3, "learning rate of the k-shot LoRA baseline (AdamW, constant)", low=0.0)
    multitask_reference: bool = option(True, "baseline: the multi-task LoRA (one LoRA on round-robin batches of every "
                                             "pool task, the held-out one too; pool size x library_steps steps, "
                                             "the library's recipe), trained once and cached: the upper reference")
    merge_accuracy: list[str] = option(
        help="uniform-average trials: also score these peft merges of the candidates at equal weights on the eval "
             "split (their accuracy cost against the exact average); names of peft.LoraModel.add_weighted_adapter's "
             "combination types", default_factory=list)

    def __post_init__(self):
        from lorabench.methods.cross_task.merging import PEFT_TYPES
        bad = [t for t in self.merge_accuracy if t not in PEFT_TYPES]
        if bad:
            raise ValueError(f"merge_accuracy: unknown peft combination type(s) {bad}; valid: {', '.join(PEFT_TYPES)}")


def library_train(c: CrossTaskConfig):
    from lorabench.harness.train import TrainConfig
    return TrainConfig(steps=c.library_steps, batch_size=c.library_batch_size, lr=c.library_lr,
                       warmup_steps_for_throughput=0)


def kshot_examples(task, k: int, seed: int) -> list[dict]:
    train = task.split().train
    if len(train) < k:
        raise UserError(f"task {task.name} has {len(train)} training examples, fewer than k_shots={k}")
    return random.Random(seed).sample(train, k)


class Composer:
    """The base model with a LoRA layer on every library layer, into which composed adapters are loaded."""

    def __init__(self, base: torch.nn.Module, layers: list[str], rank: int):
        from lorabench.methods import get_method
        from lorabench.methods.base import ApplyContext
        self.rank, self.layers = rank, layers
        self.method = get_method("lora").from_options({"rank": rank, "alpha": float(rank), "target_modules": layers})
        self.model = self.method.apply(copy.deepcopy(base), ApplyContext(base.config.model_type, []))
        self.model.eval()

    def load(self, state: dict) -> torch.nn.Module:
        """`state` (scale folded into B) at scale 1: alpha = rank."""
        self.method.load_adapter_state_dict(self.model, state)
        return self.model


def composer_for(base, state: dict, cache: dict) -> torch.nn.Module:
    from lorabench.methods.cross_task.base import layer_prefixes
    layers = layer_prefixes(state)
    rank = state[f"{layers[0]}.lora_A"].shape[0]
    if rank not in cache:
        cache[rank] = Composer(base, layers, rank)
    return cache[rank].load(state)


def eval_cache_dir():
    from lorabench.assets.specs import home
    return home() / "cross-task-evals"


def cached_eval(key: dict, run) -> dict:
    """{"score", "outcomes"} of a baseline's evaluation (the base model, a library adapter), computed once per
    key and kept as JSON in $LORABENCH_HOME/cross-task-evals: the same evaluation recurs in every method's
    trial at a seed, and across seeds. The key names everything the result depends on."""
    import hashlib
    import json
    import os
    path = eval_cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".json")
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    out = run()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return out


def icl_task(task, shots: list[dict], tokenizer):
    """The held-out task with the k shots as demonstrations before every prompt, in lm-eval's few-shot format
    (each shot's prompt and its correct option, a blank line after each): the in-context baseline of LoRAHub's
    comparison (arXiv 2307.13269, sec. 4: "in-context learning" with the same 5 examples). The task is copied with
    its prompt prefixed and its max_length raised by the prefix's tokens, so no eval prompt loses its own text.
    Returns the copy and the prefix's length in tokens (read again for every eval example)."""
    import dataclasses
    prefix = "".join(task.prompt(e) + task.option_text(e["choices"][e["label"]]) + "\n\n" for e in shots)
    n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    own = task.prompt
    icl = copy.copy(task)
    icl.prompt = lambda e: prefix + own(e)
    icl.config = dataclasses.replace(task.config, max_length=task.max_length + n_prefix + 2)
    return icl, n_prefix


def train_kshot_lora(base, layers: list[str], batch: dict, c: CrossTaskConfig, seed: int, train_cfg):
    """The k-shot LoRA baseline: a fresh LoRA on the library's layers, rank and alpha, trained on the k shots
    alone (one full batch per step, AdamW at a constant rate; LoRA, arXiv 2106.09685, eq. (3)). Returns the model
    and its loss curve."""
    from lorabench.harness.train import precision
    from lorabench.methods import get_method
    from lorabench.methods.base import ApplyContext
    torch.manual_seed(seed)
    method = get_method("lora").from_options({"rank": c.library_rank, "alpha": c.library_alpha,
                                              "target_modules": layers})
    model = method.apply(copy.deepcopy(base), ApplyContext(base.config.model_type, []))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.kshot_lora_lr, weight_decay=0.0)
    model.train()
    curve = []
    for _ in range(c.kshot_lora_steps):
        with precision(train_cfg):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(float(loss.detach()), 6))
    model.eval()
    return model, curve, sum(p.numel() for p in params)


@torch.no_grad()
def kshot_loss(model, batch) -> float:
    return float(model(**batch).loss)


def run_cross_task(spec, progress: bool = True) -> dict:
    """One leave-one-task-out trial; returns the result part of its record."""
    import transformers

    from lorabench import assets
    from lorabench.harness import task_pool
    from lorabench.harness.multitask import LibraryConfig, build_library, load_library_adapter
    from lorabench.harness.train import TrainConfig, precision
    from lorabench.harness.trial import composition_record_fields, scored_fields, seed_everything
    from lorabench.measure.memory import peak_rss_mb
    from lorabench.methods import get_method
    from lorabench.methods.cross_task.base import CompositionMethod
    from lorabench.tasks import get_task

    t_start = time.perf_counter()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    c = from_dict(CrossTaskConfig, spec.cross_task, "cross_task")
    train_cfg = from_dict(TrainConfig, spec.train, "train")
    method = get_method(spec.method).from_options(spec.method_options, where=f"method {spec.label}")
    if not isinstance(method, CompositionMethod):
        raise UserError(f"method {spec.method!r} is not a composition method (family 'cross-task'); the cross-task "
                        f"scenario needs its compose rule")
    task = get_task(spec.task).from_options(spec.task_options, where=f"task {spec.task}")
    if task.kind != "multiple-choice":
        raise UserError(f"task {spec.task}: the cross-task scenario composes adapters of multiple-choice tasks "
                        f"(one output space); {spec.task} is a {task.kind} task")
    pool = list(c.pool) if c.pool is not None else list(task_pool.POOL)
    candidates = [t for t in pool if t != spec.task]
    if not candidates:
        raise UserError(f"cross_task.pool={pool} leaves no candidate adapter once {spec.task} is held out")
    model_name = spec.model or task.default_model

    def log(msg: str) -> None:
        if progress:
            sys.stderr.write(f"[cross-task {spec.label} on {spec.task} seed {spec.seed}] {msg}\n")
            sys.stderr.flush()

    lib = LibraryConfig(rank=c.library_rank, alpha=c.library_alpha, adapters_per_job=c.adapters_per_job,
                        tokens_per_job=c.library_tokens_per_job)
    t_lib = time.perf_counter()
    if getattr(method, "linearized_library", False):   # L-LoRA: its own library, each adapter fine-tuned linearised
        from lorabench.harness.multitask import build_linearized_library
        paths = build_linearized_library(candidates, model_name, lib, library_train(c), seed=c.library_seed,
                                         progress=progress)
    else:
        paths = build_library(candidates, model_name, lib, library_train(c), seed=c.library_seed, progress=progress)
    library_seconds = time.perf_counter() - t_lib
    states = [load_library_adapter(paths[t]) for t in candidates]
    scale = c.library_alpha / c.library_rank

    seed_everything(spec.seed)
    # the library's base model: a random-init model (tiny-llama) is drawn from the seed it is loaded with
    loaded = assets.load_model(model_name, head="causal-lm", seed=c.library_seed)
    base, tok = loaded.model.eval(), loaded.tokenizer
    shots = kshot_examples(task, c.k_shots, spec.seed)
    batch = task.collate(shots, tok)
    kshot_tokens = int(batch["attention_mask"].sum())
    composers: dict = {}

    def loss_fn(state) -> float:
        with precision(train_cfg):
            return kshot_loss(composer_for(base, state, composers), batch)

    def evaluate(model):
        model.eval()
        with precision(train_cfg):
            return task.evaluate(model, tok, train_cfg.eval_batch_size)

    if getattr(method, "needs_initial_factors", False):   # ComPEFT: the update is the change from the init
        from lorabench.harness.multitask import initial_factors
        method.initial_states = [initial_factors(base, lib, int(paths[t].stem[:8], 16)) for t in candidates]
    t0 = time.perf_counter()
    if method.input_aware:   # LoraRetriever: each eval input retrieves and composes its own candidates
        comp, ev = retrieve_and_evaluate(method, task, candidates, states, scale, base, tok, composers, train_cfg)
        compose_seconds = time.perf_counter() - t0 - ev.seconds
        log(f"retrieved: {comp.info['retrieval']['retrieved_fraction']}")
    elif method.token_level:   # token-level adaptation: the weights follow the text, token by token
        comp, ev = token_level_evaluate(method, task, candidates, states, scale, base, tok, composers, train_cfg)
        compose_seconds = time.perf_counter() - t0 - ev.seconds
        log(f"token-level: mean weights {[round(w, 3) for w in comp.weights]}")
    else:
        comp = method.compose(states, scale, loss_fn, spec.seed)
        compose_seconds = time.perf_counter() - t0
        log(f"composed: weights {[round(w, 3) for w in comp.weights]} after {comp.loss_evaluations} k-shot evaluations")
        ev = evaluate(composer_for(base, comp.state, composers))

    # baselines of this seed, on the same eval examples
    split = task.split()

    def scored(model) -> dict:
        e = evaluate(model)
        return {"score": round(float(e.metrics[task.metric.name]), 6),
                "outcomes": e.outcomes.to_record(split.part_hash("eval")) if e.outcomes else None}
    key = {"model": model_name, "model_sha256": loaded.info.get("sha256"), "model_seed": c.library_seed,
           "task": spec.task,
           "task_options": spec.task_options, "eval_hash": split.part_hash("eval"),
           "eval_batch_size": train_cfg.eval_batch_size, "autocast": train_cfg.autocast}
    zero = cached_eval({**key, "adapter": None}, lambda: scored(base))
    single_losses = [loss_fn({k: (v * scale if k.endswith(".lora_B") else v) for k, v in s.items()}) for s in states]
    best = min(range(len(states)), key=lambda i: single_losses[i])
    best_state = {k: (v * scale if k.endswith(".lora_B") else v) for k, v in states[best].items()}
    best_ev = cached_eval({**key, "adapter": paths[candidates[best]].stem},
                          lambda: scored(composer_for(base, best_state, composers)))
    baselines = {"zero-shot": zero,
                 "best-single": {**best_ev, "adapter": candidates[best],
                                 "kshot_losses": {t: round(x, 6) for t, x in zip(candidates, single_losses)}}}
    if c.multitask_reference:   # every pool task's data, the held-out one's too: what composing is measured against
        from lorabench.harness.multitask import build_multitask_adapter
        mt_path = build_multitask_adapter(sorted(set(pool) | {spec.task}), model_name, lib, library_train(c),
                                          seed=c.library_seed, progress=progress)
        mt_state = {k: (v * scale if k.endswith(".lora_B") else v) for k, v in load_library_adapter(mt_path).items()}
        baselines["multitask-lora"] = {**cached_eval({**key, "adapter": mt_path.stem},
                                                     lambda: scored(composer_for(base, mt_state, composers))),
                                       "adapter": mt_path.stem}
        log(f"multi-task LoRA reference: {baselines['multitask-lora']['score']}")
    shots_key = {"seed": spec.seed, "k": c.k_shots, "shots": [repr(sorted(e.items())) for e in shots]}
    if c.icl:   # the base model reading the k shots in its context, every eval prompt
        itask, n_prefix = icl_task(task, shots, tok)

        def icl_scored() -> dict:
            base.eval()
            with precision(train_cfg):
                e = itask.evaluate(base, tok, train_cfg.eval_batch_size)
            return {"score": round(float(e.metrics[task.metric.name]), 6),
                    "outcomes": e.outcomes.to_record(split.part_hash("eval")) if e.outcomes else None}
        baselines["icl"] = {**cached_eval({**key, **shots_key, "baseline": "icl"}, icl_scored),
                            "context_tokens": n_prefix}
        log(f"in-context ({c.k_shots} shots, {n_prefix} tokens before every prompt): {baselines['icl']['score']}")
    if c.kshot_lora_steps:   # a LoRA trained on the k shots alone
        from lorabench.methods.cross_task.base import layer_prefixes
        layers = layer_prefixes(states[0])
        def kshot_scored() -> dict:
            model, curve, n_params = train_kshot_lora(base, layers, batch, c, spec.seed, train_cfg)
            return {**scored(model), "loss_curve": curve, "trainable_params": n_params}
        baselines["kshot-lora"] = {**cached_eval({**key, **shots_key, "baseline": "kshot-lora",
                                                  "steps": c.kshot_lora_steps, "lr": c.kshot_lora_lr,
                                                  "rank": c.library_rank, "alpha": c.library_alpha,
                                                  "layers": layers}, kshot_scored),
                                   "steps": c.kshot_lora_steps, "train_tokens": c.kshot_lora_steps * kshot_tokens}
        log(f"k-shot LoRA ({c.kshot_lora_steps} steps on the {c.k_shots} shots): {baselines['kshot-lora']['score']}")
    block = {
        "config": asdict(c), "held_out": spec.task, "candidates": candidates,
        "library": {t: paths[t].stem for t in candidates}, "library_seconds": round(library_seconds, 3),
        "k_shots": c.k_shots, "kshot_tokens": kshot_tokens,
        "weights": [round(w, 6) for w in comp.weights], "loss_evaluations": comp.loss_evaluations,
        "compose_tokens": comp.loss_evaluations * kshot_tokens, "compose_seconds": round(compose_seconds, 3),
        "info": comp.info,
        "baselines": baselines,
    }
    if getattr(method, "needs_initial_factors", False):   # ComPEFT: the accuracy kept against the uncompressed mean
        from lorabench.methods.cross_task.uniform_average import concatenated
        full = evaluate(composer_for(base, concatenated(states, comp.weights, scale), composers))
        block["uncompressed"] = {"score": round(float(full.metrics[task.metric.name]), 6),
                                 "outcomes": full.outcomes.to_record(split.part_hash("eval")) if full.outcomes else None}
        block["accuracy_kept"] = (round(float(ev.metrics[task.metric.name]) / block["uncompressed"]["score"], 6)
                                  if block["uncompressed"]["score"] > 0 else None)
    if getattr(method, "linearized_library", False) and method.config.compare_plain:   # L-LoRA's disentanglement
        from lorabench.methods.cross_task.l_lora import task_vector_cosines
        plain = build_library(candidates, model_name, lib, library_train(c), seed=c.library_seed, progress=progress)
        block["disentanglement"] = {"linearized": task_vector_cosines(states, scale),
                                    "plain": task_vector_cosines([load_library_adapter(plain[t]) for t in candidates],
                                                                 scale)}
    if c.merge_errors and spec.method == "uniform-average":
        block["merge_errors"] = merge_errors(states, scale, c)
    if c.merge_accuracy and spec.method == "uniform-average":
        from lorabench.methods.cross_task.merging import peft_merge
        block["merges"] = {}
        w = [1.0 / len(states)] * len(states)
        for t in c.merge_accuracy:   # each peft merge of the same candidates, scored on the same examples
            merged = peft_merge(states, w, scale, t, density=c.merge_density, svd_rank=c.library_rank, seed=0)
            mev = evaluate(composer_for(base, merged, composers))
            block["merges"][f"peft-{t}"] = {
                "score": round(float(mev.metrics[task.metric.name]), 6),
                "outcomes": mev.outcomes.to_record(split.part_hash("eval")) if mev.outcomes else None}
        log(f"merges scored: { {k: v['score'] for k, v in block['merges'].items()} }")
    return {
        **scored_fields(task, split, ev),
        "cross_task": block,
        **composition_record_fields(loaded, method, train_cfg),
        "eval_tokens_per_s": round(ev.n_tokens / ev.seconds, 1) if ev.seconds > 0 else None,
        "eval_seconds": round(ev.seconds, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "trial_seconds": round(time.perf_counter() - t_start, 3),
        "threads": torch.get_num_threads(),
    }


def retrieve_and_evaluate(method, task, candidates: list[str], states: list[dict], scale: float, base, tok,
                          composers: dict, train_cfg):
    """An input-aware rule (LoraRetriever, methods/cross_task/loraretriever.py) on the held-out task's eval part:
    each candidate adapter is embedded from `adapter_examples` prompts of its task's training split (drawn with a
    fixed seed: the embeddings belong to the library, not to the trial), each eval input retrieves its top-k
    candidates, and the inputs that retrieved the same set are scored together with that set's composition.
    Returns the Composition (the mean weight of each candidate over the inputs, the retrieval in `info`) and the
    evaluation of the whole eval part, per-example outcomes in its order."""
    from lorabench.harness.train import precision
    from lorabench.methods.cross_task.base import Composition
    from lorabench.methods.cross_task.loraretriever import retrieve, sentence_embeddings
    from lorabench.tasks.base import EvalResult, Outcomes
    c = method.config
    enc, adapters = _embed_library(method, candidates)
    examples = task.examples("eval")
    queries = sentence_embeddings(enc.model, enc.tokenizer, [task.prompt(e) for e in examples])
    chosen = retrieve(queries, adapters, c.top_k)                                 # per input, sec. 4.1
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(chosen):
        groups.setdefault(s, []).append(i)
    n = len(examples)
    correct, pred, labels = [0] * n, [0] * n, [0] * n
    norm_hits, n_tokens, seconds = 0.0, 0, 0.0
    for s, idx in groups.items():   # one composition per retrieved set, scored on the inputs that retrieved it
        view = copy.copy(task)
        subset = [examples[i] for i in idx]
        view.examples = lambda part, subset=subset: subset
        model = composer_for(base, method.compose_retrieved(states, s, scale), composers)
        model.eval()
        with precision(train_cfg):
            e = view.evaluate(model, tok, train_cfg.eval_batch_size)
        for j, i in enumerate(idx):
            correct[i], pred[i], labels[i] = e.outcomes.correct[j], e.outcomes.pred[j], e.outcomes.label[j]
        norm_hits += e.metrics["accuracy_norm"] * len(idx)
        n_tokens += e.n_tokens
        seconds += e.seconds
    ev = EvalResult({"accuracy": sum(correct) / n, "accuracy_norm": norm_hits / n}, n_tokens, seconds,
                    Outcomes(correct, pred, labels))
    weights = [sum(1.0 / c.top_k for s in chosen if i in s) / n for i in range(len(candidates))]
    info = {"composition": c.composition, "top_k": c.top_k, "embedder": c.embedder,
            "adapter_examples": c.adapter_examples, "retrieval": method.retrieval_summary(candidates, chosen)}
    return Composition(None, weights, 0, info), ev


def _embed_library(method, candidates: list[str]):
    """The encoder of `method.config.embedder` and each candidate's mean embedding of `adapter_examples` training
    prompts of its task (drawn with a fixed seed: the embeddings belong to the library, not to the trial)."""
    from lorabench import assets
    from lorabench.methods.cross_task.loraretriever import adapter_embeddings, sentence_embeddings
    from lorabench.tasks import get_task
    c = method.config
    enc = assets.load_model(c.embedder, head="seq-cls", num_labels=1)
    per_adapter = []
    for t in candidates:
        lib_task = get_task(t).from_options({}, where=f"task {t}")
        train = lib_task.split().train
        shots = random.Random(0).sample(train, min(c.adapter_examples, len(train)))
        per_adapter.append(sentence_embeddings(enc.model, enc.tokenizer, [lib_task.prompt(e) for e in shots]))
    return enc, adapter_embeddings(per_adapter)


@torch.no_grad()
def token_level_evaluate(method, task, candidates: list[str], states: list[dict], scale: float, base, tok,
                         composers: dict, train_cfg):
    """Token-level adaptation (methods/cross_task/token_level.py) on the held-out task's eval part: each option
    token o_k is scored after the text prompt ⊕ o_<k has gone through the model under that text's weights
    w(prompt ⊕ o_<k) (one forward per distinct prefix; the options' first tokens share the prompt's). Returns the
    Composition (each candidate's mean weight over the prefixes, the routing in `info`) and the evaluation."""
    import math

    from lorabench.harness.train import precision
    from lorabench.methods.cross_task.base import Composition
    from lorabench.methods.cross_task.loraretriever import sentence_embeddings
    from lorabench.methods.cross_task.token_level import token_weights
    from lorabench.tasks.base import EvalResult, Outcomes
    from lorabench.tasks.causal import encode_pair
    c = method.config
    enc, centroids = _embed_library(method, candidates)
    examples = task.examples("eval")
    t0 = time.perf_counter()
    correct, pred, labels, norm_hits, n_tokens = [], [], [], 0, 0
    all_w, changed, forwards = [], 0, 0
    for e in examples:
        pairs = [encode_pair(tok, task.prompt(e), task.option_text(ch), task.max_length) for ch in e["choices"]]
        prefixes = sorted({tuple(ctx + cont[:k]) for ctx, cont in pairs for k in range(len(cont))}, key=len)
        texts = [tok.decode(list(p), skip_special_tokens=True) for p in prefixes]
        sim = sentence_embeddings(enc.model, enc.tokenizer, texts) @ centroids.T        # (P, N) cosines
        w = token_weights(sim, c.temperature)                                              # (P, N), sec. 3
        next_logp = {}
        for p, wp in zip(prefixes, w):   # one forward per prefix, under its own weights
            model = composer_for(base, method.combine(states, wp.tolist(), scale), composers)
            model.eval()
            with precision(train_cfg):
                logits = model(input_ids=torch.tensor([list(p)])).logits[0, -1].float()
            next_logp[p] = torch.log_softmax(logits, dim=-1)
            forwards += 1
            n_tokens += len(p)
        scores = [sum(float(next_logp[tuple(ctx + cont[:k])][cont[k]]) for k in range(len(cont))) for ctx, cont in pairs]
        all_w.append(w)
        changed += int(len({int(x) for x in w.argmax(1)}) > 1)
        p_i = max(range(len(scores)), key=lambda i: scores[i])
        lens = [len(task.option_text(ch).encode()) for ch in e["choices"]]
        norm_hits += int(max(range(len(scores)), key=lambda i: scores[i] / lens[i]) == e["label"])
        pred.append(p_i)
        labels.append(int(e["label"]))
        correct.append(int(p_i == e["label"]))
    n = len(examples)
    ev = EvalResult({"accuracy": sum(correct) / n, "accuracy_norm": norm_hits / n}, n_tokens,
                    time.perf_counter() - t0, Outcomes(correct, pred, labels))
    W = torch.cat(all_w)                                                                   # every prefix's weights
    entropy = float(-(W * W.clamp(min=1e-30).log()).sum(1).mean())
    top = W.argmax(1)
    info = {"combination": c.combination, "temperature": c.temperature, "embedder": c.embedder,
            "adapter_examples": c.adapter_examples, "prefixes": int(W.shape[0]), "forwards": forwards,
            "weight_entropy": round(entropy, 6), "uniform_entropy": round(math.log(len(candidates)), 6),
            "top_adapter_fraction": {t: round(float((top == i).float().mean()), 6) for i, t in enumerate(candidates)},
            "questions_whose_top_adapter_changes": round(changed / n, 6)}
    return Composition(None, [round(float(x), 6) for x in W.mean(0)], 0, info), ev


def merge_errors(states: list[dict], scale: float, c: CrossTaskConfig) -> dict:
    """Each merge of the candidates at equal weights against the exact weighted sum Σ (1/N) s B_i A_i:
    relative Frobenius error over all layers (methods/cross_task/merging.py)."""
    from lorabench.methods.cross_task.merging import PEFT_TYPES, exact_delta, exact_merge, merge_error, peft_merge
    from lorabench.methods.cross_task.uniform_average import concatenated
    n = len(states)
    w = [1.0 / n] * n
    exact = exact_delta(states, w, scale)
    out = {"exact-cat": merge_error(concatenated(states, w, scale), exact),
           f"exact-svd-r{c.library_rank}": merge_error(exact_merge(states, w, scale, c.library_rank), exact)}
    for t in PEFT_TYPES:
        out[f"peft-{t}"] = merge_error(peft_merge(states, w, scale, t, density=c.merge_density,
                                                  svd_rank=c.library_rank, seed=0), exact)
    return {k: float(f"{v:.4g}") for k, v in out.items()}   # 4 significant digits: an exact merge's ~1e-8 stays visible
