"""Tasks for decoder language models: prompt + target, the loss on the target tokens only.

Tokenisation follows lm-evaluation-harness: the context and the continuation are encoded
separately and concatenated, so training, log-likelihood scoring and lm-eval see the same ids.
"""
from __future__ import annotations

import torch

IGNORE = -100  # label value ignored by the cross-entropy of transformers' causal-LM loss


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int]]:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ctx = [tokenizer.bos_token_id] + ctx
    # Truncate the context from the left: the continuation is what is scored.
    keep = max(1, max_length - len(cont))
    return ctx[-keep:], cont[:max_length - 1]


def pad_pairs(pairs: list[tuple[list[int], list[int]]], pad_id: int, train: bool) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask, and labels = continuation ids (context and pad ignored)."""
    n = max(len(c) + len(t) for c, t in pairs)
    ids = torch.full((len(pairs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), n), dtype=torch.long)
    labels = torch.full((len(pairs), n), IGNORE, dtype=torch.long)
    for i, (c, t) in enumerate(pairs):
        seq = c + t
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        labels[i, len(c):len(seq)] = torch.tensor(t)
    out = {"input_ids": ids, "attention_mask": mask}
    if train:
        out["labels"] = labels
    else:
        out["target_mask"] = labels != IGNORE
    return out


def left_padded_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded prompts, left-padded (input_ids, attention_mask): every row's next token is predicted
    (or generated) at the same, last position."""
    encoded = [encode_pair(tokenizer, p, "", max_length)[0] for p in prompts]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(encoded):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    return ids, mask


def continuation_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(continuation token | prefix) per row: the lm-eval `loglikelihood`."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)             # predicts token t+1 from position t
    targets = batch["input_ids"][:, 1:]
    tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)     # (B, T-1)
    return (tok * batch["target_mask"][:, 1:]).sum(-1)
