"""Generation scored by exact match: greedy decoding, the answer compared after normalisation."""
from __future__ import annotations

import re
import time

import torch

from lorabench.tasks.base import EvalResult, Metric, Outcomes, Split, Task, seeded_split
from lorabench.tasks.causal import encode_pair, left_padded_prompts, pad_pairs

EXACT = Metric("exact_match", True, "fraction of eval questions whose greedy answer equals the reference")


def first_number(text: str) -> str | None:
    m = re.search(r"-?\d+", text)
    return m.group(0) if m else None


class Arith(Task):
    name = "arith"
    kind = "generation"
    head = "causal-lm"
    default_model = "smollm2-135m"
    dataset = "arith"
    metric = EXACT
    description = ("Synthetic arithmetic word problems (+, -, two steps), generated from a seed: exact, "
                   "unlimited and free of contamination")
    sizes = ("train 3,837 / validation 300 / eval 500 (of 5,000: duplicates and every question also in eval or "
             "validation dropped from train)")
    default_max_length = 64
    max_new_tokens = 8
    val_size = 300

    @staticmethod
    def prompt(example: dict) -> str:
        return f"Question: {example['question']}\nAnswer:"

    def build_split(self) -> Split:
        from lorabench import assets
        split = seeded_split([dict(r) for r in assets.load_dataset("arith")], 500, self.val_size)
        held_out = {e["question"] for e in split.eval + split.val}  # no held-out question is ever trained on
        return Split([e for e in split.train if e["question"] not in held_out], split.eval, split.val)

    def collate(self, examples, tokenizer):
        eos = tokenizer.eos_token or ""
        pairs = [encode_pair(tokenizer, self.prompt(e), f" {e['answer']}{eos}", self.max_length) for e in examples]
        return pad_pairs(pairs, tokenizer.pad_token_id, train=True)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        examples = self.examples(part)
        correct, n_tokens, t0 = [], 0, time.perf_counter()
        for s in range(0, len(examples), batch_size):
            chunk = examples[s:s + batch_size]
            ids, mask = left_padded_prompts(tokenizer, [self.prompt(e) for e in chunk], self.max_length)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            new = out[:, ids.shape[1]:]
            n_tokens += int(mask.sum()) + new.numel()
            for e, row in zip(chunk, new):
                text = tokenizer.decode(row, skip_special_tokens=True).split("\n")[0]
                correct.append(int(first_number(text) == e["answer"]))
        return EvalResult({"exact_match": sum(correct) / len(examples)}, n_tokens, time.perf_counter() - t0,
                          Outcomes(correct))
