"""Long-context key-value retrieval (`kv-retrieval`), for context-extension methods (longlora, sinklora).

Each input is a list of `n_pairs` random key-value pairs, then a query key; the answer is its
value, as the synthetic key-value retrieval of "Lost in the Middle" (Liu et al., arXiv 2307.03172),
with short keys and numbers instead of UUIDs so that a small model's context holds many pairs:

    Question: Key-value pairs:
    qwhzk: 4821
    mabdo: 1397
    ...
    What is the value of key mabdo?
    Answer: 1397

Keys are 5 random lowercase letters, values random integers 1000..9999, both distinct within an
input, and the queried pair's position is uniform over the list, so the answer occurs exactly
once in the context. Everything is generated from a fixed seed: exact, unlimited and in no
pretraining corpus. The input length grows with `n_pairs` (about 11 tokens a pair with SmolLM2's
tokenizer); `base_context` is the context the task treats as the base model's original one (the
model's real limit for pretrained models, a declared one for tiny random models): the evaluation
reports it with the input lengths and the share of inputs longer than it, so a record shows how
far beyond its base context the model was trained and evaluated.

The prompt, the greedy decoding and the scoring (the first integer of the first generated line
equals the value) are those of `arith` (lorabench.tasks.generation), so the lm-eval export of
generation tasks applies unchanged.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.tasks.base import EvalResult, Split, TaskConfig, seeded_split
from lorabench.tasks.causal import encode_pair
from lorabench.tasks.generation import Arith

KEY_LETTERS = 5
VALUE_RANGE = (1000, 9999)
DATA_SEED = 0        # the examples; the split then uses the fixed SPLIT_SEED like every task
N_EXAMPLES = 2200
N_EVAL = 200


def kv_retrieval(n: int, n_pairs: int, seed: int) -> list[dict]:
    """`n` examples [{"question", "answer", "position"}], the same for the same (n, n_pairs, seed),
    a prefix of a larger draw. `position` is the 0-based index of the queried pair."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"kv_retrieval: n must be an int >= 0, got {n!r}")
    n_values = VALUE_RANGE[1] - VALUE_RANGE[0] + 1
    if not isinstance(n_pairs, int) or not 1 <= n_pairs <= n_values:
        raise ValueError(f"kv_retrieval: n_pairs must be an int in 1..{n_values}, got {n_pairs!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < n_pairs:
            k = "".join(rng.choice(string.ascii_lowercase) for _ in range(KEY_LETTERS))
            if k not in seen:
                seen.add(k)
                keys.append(k)
        values = rng.sample(range(VALUE_RANGE[0], VALUE_RANGE[1] + 1), n_pairs)
        pos = rng.randrange(n_pairs)
        lines = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
        question = f"Key-value pairs:\n{lines}\nWhat is the value of key {keys[pos]}?"
        out.append({"question": question, "answer": str(values[pos]), "position": pos})
    return out


@dataclass
class KVRetrievalConfig(TaskConfig):
    n_pairs: int = option(
        24, "key-value pairs in each input: sets the context length (about 11 tokens a pair with SmolLM2's "
            "tokenizer, so 24 pairs are about 265 tokens)", low=1, high=4000)
    base_context: int = option(
        128, "the base model's original context in tokens as this task treats it (a declared limit for tiny "
             "random models): reported with the input lengths; choose n_pairs so that inputs exceed it",
        low=8)


class KVRetrieval(Arith):
    name = "kv-retrieval"
    kind = "generation"
    head = "causal-lm"
    default_model = "smollm2-135m"
    dataset = "synthetic (lorabench.tasks.longctx.kv_retrieval, seed 0)"
    description = ("Synthetic long-context key-value retrieval (as 'Lost in the Middle'): n_pairs random "
                   "'key: value' lines, then a query key; the answer is its value (exact match, greedy)")
    sizes = "train 2,000 / eval 200 (of 2,200 generated from seed 0; n_pairs sets the input length)"
    default_max_length = 4096   # no truncation at the default sizes; the eval reports any
    val_size = 0                # no validation part (Arith's is not inherited)
    max_new_tokens = 8
    config_cls = KVRetrievalConfig

    def build_split(self) -> Split:
        return seeded_split(kv_retrieval(N_EXAMPLES, self.config.n_pairs, DATA_SEED), N_EVAL)

    def input_lengths(self, examples: list[dict], tokenizer) -> list[int]:
        """Prompt lengths in tokens before truncation to max_length."""
        return [len(encode_pair(tokenizer, self.prompt(e), "", 10 ** 9)[0]) for e in examples]

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        result = super().evaluate(model, tokenizer, batch_size, part)
        lengths = self.input_lengths(self.examples(part), tokenizer)
        base = self.config.base_context
        result.metrics.update({
            "base_context": base,
            "mean_input_tokens": sum(lengths) / len(lengths),
            "max_input_tokens": max(lengths),
            "frac_over_base_context": sum(n > base for n in lengths) / len(lengths),
            "frac_truncated": sum(n > self.max_length for n in lengths) / len(lengths),
            "model_context": int(getattr(model.config, "max_position_embeddings", 0) or 0),
        })
        return result
