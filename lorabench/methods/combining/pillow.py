"""PILLOW: Enhancing Efficient Instruction Fine-tuning via Prompt Matching (Qi et al., EMNLP 2023
industry track, arXiv 2312.05621).

PILLOW puts a prompt-matching step in front of a LoRA-tuned model: from a user-defined pool of
prompts (in-context demonstrations), a matching network chooses the ones to prepend to each input,
and the LoRA model answers the concatenation. The matcher is trained by reinforcement learning with
the LoRA model frozen (sec. 3): the state is the input and the prompts chosen so far, an action picks
the next prompt from the pool, the reward scores the LoRA model's answer to the prompted input
against the reference, and policy gradient updates the matcher. LoRA itself is fine-tuned first.

Scaled down to this harness (one trial, a fixed step budget; the method chooses its train batches
through `train_batches`, as STAR does):

- the pool: `pool_size` labelled training examples drawn with the trial seed (the "user-defined"
  pool; the benchmark is the user), each rendered as a demonstration: the training sequence with its
  answer for a causal LM (prompt + correct option), the text followed by its label for a classifier;
  those examples are not used as queries, so the matcher cannot learn to copy an input's own answer;
- stage 1, the first (1 - policy_ratio) of the steps: LoRA on the task's own batches, as `lora`;
- stage 2, the rest: the matcher's RL with LoRA (and the head) frozen. Policy
  π(d | x) = softmax_d(e_x^T W e_d) over the pool, e = the unit-normalised mean input embedding of the
  first `query_tokens` tokens (of the frozen backbone; an input's prefix, which its answer options do
  not change), W (h, h) trained, zero at the start (uniform policy); `n_demos` demonstrations are drawn
  one after the other without replacement (the paper's sequential choice, the state being the input
  and the chosen set through the mask of chosen prompts). The reward is the frozen LoRA model's
  log-likelihood of the reference answer given the prompted input (teacher-forced: a generation-free
  stand-in for the paper's generation-quality reward, affordable on a CPU); REINFORCE with a running
  mean baseline b:  ∇J = E[(R - b) ∇ log π(d_1..d_k | x)];
- evaluation: the matcher picks the k highest-scoring demonstrations for each input (greedy) and they
  are prepended to it inside the model's forward (a pre-hook; positions follow the attention mask, and
  a causal LM's logits of the prefix are cut off, so the task's evaluation reads them unchanged).

Supported task kinds: classification and multiple-choice (a generation task decodes token by token
through a KV cache the prefix would have to enter; not supported, with an error saying so). Without a
train split to draw a pool from (the tester's random batches) the method is LoRA and says so in its
metrics (`prompt_matching: false`).

Mechanism metrics (method_metrics): `pool_size`, `rl_steps`, `reward_first` / `reward_last` (mean reward
of the first and last quarter of the RL steps), `policy_entropy_first` / `_last`, `reward_greedy` vs
`reward_random` (the matcher's choice against random demonstrations on the last RL batch), and
`selected_counts` (how often each pool prompt was drawn).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorabench.config import option
from lorabench.methods.base import ApplyContext, TrainState
from lorabench.methods.lora import LoRA, LoraConfig

IGNORE = -100
SUPPORTED_KINDS = ("classification", "multiple-choice")


@dataclass
class PillowConfig(LoraConfig):
    n_demos: int = option(1, "demonstrations prepended to each input, chosen one after the other", low=1, high=8)
    pool_size: int = option(16, "prompts in the pool (training examples drawn with the trial seed)", low=2, high=1024)
    demo_tokens: int = option(48, "tokens kept of each demonstration (a causal LM keeps the end, where the answer "
                                  "is; a classifier keeps the start of the text, then the label)", low=8, high=1024)
    query_tokens: int = option(32, "leading tokens of an input whose mean embedding the matcher reads", low=1, high=1024)
    policy_ratio: float = option(0.3, "fraction of the steps, at the end, spent training the matcher with LoRA "
                                      "frozen (stage 2); the rest fine-tune LoRA (stage 1)", low=0.05, high=0.95)
    policy_lr: float = option(1e-2, "Adam learning rate of the matcher W", low=0.0)
    baseline_momentum: float = option(0.9, "momentum of the running-mean reward baseline b", low=0.0, high=0.999)

    def __post_init__(self):
        super().__post_init__()
        if self.n_demos >= self.pool_size:
            raise ValueError(f"pillow: n_demos ({self.n_demos}) must be below pool_size ({self.pool_size})")


class PromptMatcher(nn.Module):
    """The prompt pool (token ids, lengths, embeddings) and the matching policy's W."""

    def __init__(self, hidden: int, pool_size: int, demo_tokens: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(hidden, hidden))      # zero: π uniform over the pool at the start
        self.register_buffer("pool_ids", torch.zeros(pool_size, demo_tokens, dtype=torch.long))
        self.register_buffer("pool_len", torch.zeros(pool_size, dtype=torch.long))
        self.register_buffer("pool_emb", torch.zeros(pool_size, hidden))
        self.active = False   # prepend the greedy choice in forward (after training / after loading)
        self.causal = True
        self.prefix = 0

    def scores(self, e_x: torch.Tensor) -> torch.Tensor:
        return e_x @ self.W @ self.pool_emb.T                    # e_x^T W e_d for every d, (B, N)

    def demo(self, i: int) -> torch.Tensor:
        return self.pool_ids[i, :self.pool_len[i]]


def sample_without_replacement(logits: torch.Tensor, k: int, generator: torch.Generator | None = None,
                               greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k choices per row, one after the other, each from softmax over the not-yet-chosen prompts.
    Returns (indices (B, k), log π of the sequence (B,), entropy of the first choice (B,))."""
    chosen, logp = [], torch.zeros(logits.shape[0], device=logits.device)
    masked = logits.clone()
    first_entropy = None
    for _ in range(k):
        lp = torch.log_softmax(masked, -1)
        if first_entropy is None:
            first_entropy = -(lp.exp() * lp).nan_to_num().sum(-1)
        idx = lp.argmax(-1) if greedy else torch.multinomial(lp.exp().detach(), 1, generator=generator).squeeze(1)
        logp = logp + lp.gather(1, idx[:, None]).squeeze(1)          # log π(d_j | x, d_<j)
        chosen.append(idx)
        masked = masked.scatter(1, idx[:, None], float("-inf"))       # without replacement
    return torch.stack(chosen, 1), logp, first_entropy


def prepend(batch: dict, demos: list[torch.Tensor], causal: bool, pad_id: int = 0) -> tuple[dict, int]:
    """Row i becomes demos[i] + input i (a classifier keeps its [CLS] first); shorter prefixes are
    padded on their left, masked out, and position ids follow the mask. Returns the batch, prefix width P."""
    ids, mask = batch["input_ids"], batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
    P = max(len(d) for d in demos)
    rows, masks = [], []
    for i, d in enumerate(demos):
        pad = torch.full((P - len(d),), pad_id, dtype=ids.dtype)
        one, zero = torch.ones(len(d), dtype=mask.dtype), torch.zeros(P - len(d), dtype=mask.dtype)
        if causal:
            rows.append(torch.cat([pad, d.to(ids.dtype), ids[i]]))
            masks.append(torch.cat([zero, one, mask[i]]))
        else:  # [CLS] pad.. demo x.. : the classifier still reads position 0
            rows.append(torch.cat([ids[i, :1], pad, d.to(ids.dtype), ids[i, 1:]]))
            masks.append(torch.cat([mask[i, :1], zero, one, mask[i, 1:]]))
    out = dict(batch)
    out["input_ids"], out["attention_mask"] = torch.stack(rows), torch.stack(masks)
    out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    if "token_type_ids" in out:
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])
    if causal and "labels" in out:
        out["labels"] = torch.cat([torch.full((ids.shape[0], P), IGNORE, dtype=out["labels"].dtype), out["labels"]], 1)
    return out, P


class Pillow(LoRA):
    name = "pillow"
    title = "PILLOW: Enhancing Efficient Instruction Fine-tuning via Prompt Matching"
    paper = "2312.05621"
    family = "combining"  # the survey's "combining with other learning paradigms" (in-context learning)
    config_cls = PillowConfig
    default_lr = 5e-4  # LoRA's, for stage 1
    mechanism_metrics = {
        "prompt_matching": "whether a prompt pool was built and the matcher trained (False: the task exposes no "
                           "train split, the method is LoRA)",
        "pool_size": "prompts in the pool",
        "rl_steps": "REINFORCE steps of the matcher, with LoRA frozen (stage 2)",
        "reward_first": "mean reward (log-likelihood of the reference) over the first quarter of the RL steps",
        "reward_last": "the same over the last quarter",
        "policy_entropy_first": "mean entropy of the matcher's first choice over the first quarter of the RL steps "
                                "(log pool_size at the start: W = 0 is uniform)",
        "policy_entropy_last": "the same over the last quarter",
        "reward_greedy": "reward of the matcher's greedy choice on the last RL batch",
        "reward_random": "reward of random demonstrations on the same batch",
        "selected_counts": "how often each pool prompt was drawn during the RL stage",
    }

    def __init__(self, config=None):
        super().__init__(config)
        self.rl_stage = False
        self._last = None

    def apply(self, model: nn.Module, ctx: ApplyContext) -> nn.Module:
        model = super().apply(model, ctx)
        c = self.config
        emb = model.get_input_embeddings()
        matcher = PromptMatcher(emb.embedding_dim, c.pool_size, c.demo_tokens).to(emb.weight.device)
        matcher.causal = model.get_output_embeddings() is not None   # a causal LM, not a classifier
        model.add_module("pillow_matcher", matcher)
        model.register_forward_pre_hook(self._prompt_inputs, with_kwargs=True)
        model.register_forward_hook(self._cut_prefix)
        return model

    # -- the matcher inside the model's forward (evaluation) ------------------------------------
    @staticmethod
    def query_embedding(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        with torch.no_grad():
            e = model.get_input_embeddings()(ids[:, :n]).float()          # (B, n, h), the frozen embedding
            m = mask[:, :n, None].float()
            mean = (e * m).sum(1) / m.sum(1).clamp(min=1)
            return F.normalize(mean, dim=-1)

    def _prompt_inputs(self, model, args, kwargs):
        matcher: PromptMatcher = model.pillow_matcher
        if not matcher.active:
            return None
        if args or "input_ids" not in kwargs:
            raise ValueError("pillow: call the model with keyword arguments (input_ids=..., attention_mask=...)")
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:   # (transformers 5: cache)
            raise ValueError("pillow does not support decoding with a KV cache (generation tasks)")
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask", torch.ones_like(ids))
        e_x = self.query_embedding(model, ids, mask, self.config.query_tokens)
        with torch.no_grad():
            idx = sample_without_replacement(matcher.scores(e_x), self.config.n_demos, greedy=True)[0]
        demos = [torch.cat([matcher.demo(j) for j in row]) for row in idx.tolist()]
        new, matcher.prefix = prepend(kwargs, demos, matcher.causal)
        return args, new

    @staticmethod
    def _cut_prefix(model, args, output):
        matcher: PromptMatcher = model.pillow_matcher
        if matcher.active and matcher.causal and matcher.prefix:
            output["logits"] = output["logits"][:, matcher.prefix:]     # the task reads the input's positions
        return output

    # -- the pool, stage 1 (LoRA) and stage 2 (the matcher's RL) --------------------------------
    def demonstration(self, task, tokenizer, example: dict, causal: bool) -> torch.Tensor:
        L = self.config.demo_tokens
        if causal:  # the training sequence: prompt and correct answer, then a line break
            b = task.collate([example], tokenizer)
            ids = b["input_ids"][0][b["attention_mask"][0] > 0]
            sep = torch.tensor(tokenizer("\n", add_special_tokens=False)["input_ids"], dtype=ids.dtype)
            return torch.cat([ids, sep])[-L:]
        ids = task.encode([example], tokenizer)["input_ids"][0]       # [CLS] text [SEP]
        names = getattr(task, "label_names", None)
        label = names[example["label"]] if names else str(example["label"])
        lab = torch.tensor(tokenizer(f" {label}", add_special_tokens=False)["input_ids"], dtype=ids.dtype)
        text = ids[1:-1][:max(1, L - len(lab) - 1)]
        return torch.cat([text, lab, ids[-1:]])                       # text, its label, [SEP]

    def train_batches(self, state: TrainState, task, tokenizer, batch_size: int, seed: int):
        model, c, m = state.model, self.config, state.metrics
        split = getattr(task, "split", None)
        if split is None or not hasattr(task, "collate"):
            m["prompt_matching"] = False  # no examples to build a pool from: LoRA on the given batches
            yield from task.train_batches(tokenizer, batch_size, seed)
            return
        if task.kind not in SUPPORTED_KINDS:
            raise ValueError(f"pillow supports tasks of kind {', '.join(SUPPORTED_KINDS)}; task {task.name!r} is "
                             f"{task.kind!r}")
        train = split().train
        if len(train) <= c.pool_size + batch_size:
            raise ValueError(f"pillow: the train split has {len(train)} examples; pool_size={c.pool_size} plus a batch "
                             f"of {batch_size} queries need more: lower pool_size")
        rng = random.Random(seed)
        order = list(range(len(train)))
        rng.shuffle(order)
        pool, queries = order[:c.pool_size], order[c.pool_size:]
        matcher: PromptMatcher = model.pillow_matcher
        with torch.no_grad():
            for j, i in enumerate(pool):
                d = self.demonstration(task, tokenizer, train[i], matcher.causal)
                matcher.pool_ids[j].zero_()
                matcher.pool_ids[j, :len(d)] = d
                matcher.pool_len[j] = len(d)
                matcher.pool_emb[j] = self.query_embedding(model, d[None], torch.ones(1, len(d), dtype=torch.long),
                                                           len(d))[0]
        m.update({"prompt_matching": True, "pool_size": c.pool_size, "pool_examples": pool})
        rl_start = min(state.total_steps - 1, round((1 - c.policy_ratio) * state.total_steps))
        stream = task.train_batches(tokenizer, batch_size, seed)
        for _ in range(rl_start):                                      # stage 1: LoRA, as `lora`
            yield next(stream)
        yield from self.rl_stage_batches(state, task, tokenizer, batch_size, [train[i] for i in queries], rng, seed)

    def rl_stage_batches(self, state, task, tokenizer, batch_size, queries, rng, seed):
        model, c, m = state.model, self.config, state.metrics
        matcher: PromptMatcher = model.pillow_matcher
        self.rl_stage = True
        opt = torch.optim.Adam([matcher.W], lr=c.policy_lr)
        gen = torch.Generator().manual_seed(seed)
        baseline, rewards, entropies = None, [], []
        counts = [0] * c.pool_size
        while True:
            batch = task.collate(rng.sample(queries, batch_size), tokenizer)
            e_x = self.query_embedding(model, batch["input_ids"], batch["attention_mask"], c.query_tokens)
            with torch.enable_grad():
                idx, logp, ent = sample_without_replacement(matcher.scores(e_x), c.n_demos, gen)
            prompted = self.prompted(batch, idx, matcher)
            r = self.reward(model, prompted, matcher.causal)              # R: log-likelihood of the reference
            baseline = r.mean() if baseline is None else \
                c.baseline_momentum * baseline + (1 - c.baseline_momentum) * r.mean()
            with torch.enable_grad():
                loss = -((r - baseline).detach() * logp).mean()            # REINFORCE: -(R - b) log π
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            matcher.W.grad = None
            for j in idx.flatten().tolist():
                counts[j] += 1
            rewards.append(r.mean().item())
            entropies.append(ent.mean().item())
            q = max(1, len(rewards) // 4)
            m.update({"rl_steps": len(rewards), "reward_first": sum(rewards[:q]) / q,
                      "reward_last": sum(rewards[-q:]) / q, "policy_entropy_first": sum(entropies[:q]) / q,
                      "policy_entropy_last": sum(entropies[-q:]) / q, "max_entropy": math.log(c.pool_size),
                      "selected_counts": counts})
            self._last = (batch, e_x, gen)
            yield prompted

    @staticmethod
    def prompted(batch: dict, idx: torch.Tensor, matcher: PromptMatcher) -> dict:
        demos = [torch.cat([matcher.demo(j) for j in row]) for row in idx.tolist()]
        return prepend(batch, demos, matcher.causal)[0]

    @staticmethod
    @torch.no_grad()
    def reward(model: nn.Module, batch: dict, causal: bool) -> torch.Tensor:
        """Per example: the mean log-probability of its reference (answer tokens, or label) under the frozen model."""
        was = model.training
        model.eval()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        model.train(was)
        labels = batch["labels"]
        if not causal:
            return torch.log_softmax(logits, -1).gather(1, labels[:, None]).squeeze(1)
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:]
        keep = tgt != IGNORE
        tok = lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1) * keep
        return tok.sum(-1) / keep.sum(-1).clamp(min=1)

    def on_after_backward(self, state: TrainState) -> None:
        if self.rl_stage:  # stage 2: the LoRA model (and its head) is frozen while the matcher learns
            for p in state.model.parameters():
                p.grad = None

    def on_train_end(self, state: TrainState) -> None:
        self.rl_stage = False
        if not state.metrics.get("prompt_matching"):
            return
        matcher: PromptMatcher = state.model.pillow_matcher
        if self._last is not None:  # the matcher's greedy choice against random prompts, on the last RL batch
            batch, e_x, gen = self._last
            k = self.config.n_demos
            greedy = sample_without_replacement(matcher.scores(e_x), k, greedy=True)[0]
            rand = torch.stack([torch.randperm(self.config.pool_size, generator=gen)[:k] for _ in range(len(e_x))])
            state.metrics["reward_greedy"] = self.reward(state.model, self.prompted(batch, greedy, matcher),
                                                         matcher.causal).mean().item()
            state.metrics["reward_random"] = self.reward(state.model, self.prompted(batch, rand, matcher),
                                                         matcher.causal).mean().item()
            self._last = None
        matcher.active = True   # evaluation prepends the matcher's choice

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(model)
        for b in ("pool_ids", "pool_len", "pool_emb"):
            out[f"pillow_matcher.{b}"] = getattr(model.pillow_matcher, b).detach()
        return out

    def load_adapter_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        super().load_adapter_state_dict(model, state)
        model.pillow_matcher.active = bool(model.pillow_matcher.pool_len.sum() > 0)
