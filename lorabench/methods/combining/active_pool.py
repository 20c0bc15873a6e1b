"""An unlabelled pool for active learning, built from a task's training split (used by `star`).

The pool is the task's train split with its labels hidden: `predictive_probs` computes the
model's predictive distribution of each example from its inputs only (the text of a
classification example; the question and the options of a multiple-choice one; the prompt of a
generation one), never from its label. Labels are read only when the method acquires an example
and trains on it (`task.collate`).

Per task kind, the predictive distribution p(y | x) is:

- classification: softmax of the classification head's logits over the labels;
- multiple-choice: softmax over the options of their log-likelihoods log p(option | question)
  (the scores lorabench and lm-eval rank the options by);
- generation: the next-token distribution at the first answer position (a label-free proxy:
  the answer itself is not known before it is labelled).

Perplexity tasks (language modelling on raw text) have no labels to hide and are not supported.
"""
from __future__ import annotations

import torch

from lorabench.tasks.causal import continuation_logprobs, encode_pair, left_padded_prompts, pad_pairs

SUPPORTED_KINDS = ("classification", "multiple-choice", "generation")


def pool_of(task) -> list[dict] | None:
    """The task's training examples (the unlabelled pool), or None when the task has no split.

    A lorabench Task always has one; the tester's random-batch task does not."""
    split = getattr(task, "split", None)
    if split is None or not hasattr(task, "collate"):
        return None
    kind = getattr(task, "kind", None)
    if kind not in SUPPORTED_KINDS:
        raise ValueError(f"active learning needs a task whose examples have labels to hide; task "
                         f"{getattr(task, 'name', task)!r} is of kind {kind!r}; supported kinds: "
                         f"{', '.join(SUPPORTED_KINDS)}")
    pool = split().train
    if not pool:
        raise ValueError(f"task {task.name} has an empty train split: there is no pool to acquire labels from")
    return pool


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -Σ_c p_c log p_c per row (0 log 0 = 0, so padded classes with p = 0 do not count)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


@torch.no_grad()
def predictive_probs(task, model, tokenizer, examples: list[dict], batch_size: int) -> torch.Tensor:
    """p(y | x) of each example, (n, C), from its inputs only; rows of multiple-choice examples with
    fewer options than the widest are padded with zeros."""
    kind = task.kind
    out: list[torch.Tensor] = []
    if kind == "classification":
        for s in range(0, len(examples), batch_size):
            batch = task.encode(examples[s:s + batch_size], tokenizer)   # text only, no labels
            out.append(model(**batch).logits.float().softmax(-1))
        return torch.cat(out)
    if kind == "multiple-choice":
        flat = [(i, j) for i, e in enumerate(examples) for j in range(len(e["choices"]))]
        scores = torch.empty(len(flat))
        for s in range(0, len(flat), batch_size):
            chunk = flat[s:s + batch_size]
            pairs = [encode_pair(tokenizer, task.prompt(examples[i]), task.option_text(examples[i]["choices"][j]),
                                 task.max_length) for i, j in chunk]
            scores[s:s + len(chunk)] = continuation_logprobs(model, pad_pairs(pairs, tokenizer.pad_token_id,
                                                                              train=False))
        width = max(len(e["choices"]) for e in examples)
        probs = torch.zeros(len(examples), width)
        k = 0
        for i, e in enumerate(examples):
            n = len(e["choices"])
            probs[i, :n] = scores[k:k + n].softmax(-1)
            k += n
        return probs
    if kind == "generation":
        for s in range(0, len(examples), batch_size):
            ids, mask = left_padded_prompts(tokenizer, [task.prompt(e) for e in examples[s:s + batch_size]],
                                            task.max_length)
            out.append(model(input_ids=ids, attention_mask=mask).logits[:, -1].float().softmax(-1))
        return torch.cat(out)
    raise ValueError(f"no predictive distribution for task kind {kind!r}; "
                     f"supported kinds: {', '.join(SUPPORTED_KINDS)}")
