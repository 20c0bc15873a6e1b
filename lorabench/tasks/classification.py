"""Sequence classification with an encoder and a classification head (accuracy)."""
from __future__ import annotations

import time

import torch

from lorabench.tasks.base import EvalResult, Metric, Split, Task, seeded_split

ACCURACY = Metric("accuracy", True, "fraction of eval examples whose argmax label is correct")


class ClassificationTask(Task):
    kind = "classification"
    head = "seq-cls"
    default_model = "minilm-l6"
    metric = ACCURACY
    num_labels = 2
    eval_size: int

    def build_split(self) -> Split:
        from lorabench import assets
        items = [{"text": r["text"], "label": int(r["label"])} for r in assets.load_dataset(self.dataset)]
        return seeded_split(items, self.eval_size)

    def encode(self, examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        return dict(tokenizer([e["text"] for e in examples], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt"))

    def collate(self, examples, tokenizer):
        batch = self.encode(examples, tokenizer)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int) -> EvalResult:
        # Batches of similar lengths pad less; the metric does not depend on the order.
        examples = sorted(self.split().eval, key=lambda e: len(e["text"]))
        correct, n_tokens, t0 = 0, 0, time.perf_counter()
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = self.encode(chunk, tokenizer)
            logits = model(**batch).logits  # (B, num_labels)
            correct += (logits.argmax(-1) == torch.tensor([e["label"] for e in chunk])).sum().item()
            n_tokens += int(batch["attention_mask"].sum())
        return EvalResult({"accuracy": correct / len(examples)}, n_tokens, time.perf_counter() - t0)


class RTSentiment(ClassificationTask):
    name = "rt-sentiment"
    dataset = "rotten-tomatoes"
    description = "Rotten Tomatoes movie-review sentences (Pang & Lee 2005), positive vs negative"
    eval_size = 1000
    sizes = "train 7,530 / eval 1,000 (of 8,530; balanced classes)"
    default_max_length = 64


class Sarcasm(ClassificationTask):
    name = "sarcasm"
    dataset = "sarcasm"
    description = "News headlines, sarcastic (The Onion) or not (HuffPost) (Misra 2018, via OpenAI evals)"
    eval_size = 2000
    sizes = "train 26,498 / eval 2,000 (of 28,614; 116 exact duplicates dropped)"
    default_max_length = 48
