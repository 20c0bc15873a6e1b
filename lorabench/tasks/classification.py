"""Sequence classification with an encoder and a classification head (accuracy)."""
from __future__ import annotations

import time

import torch

from lorabench.tasks.base import EvalResult, Metric, Outcomes, Split, Task, seeded_split

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
        return seeded_split(items, self.eval_size, self.val_size)

    def encode(self, examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        return dict(tokenizer([e["text"] for e in examples], padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt"))

    def collate(self, examples, tokenizer):
        batch = self.encode(examples, tokenizer)
        batch["labels"] = torch.tensor([e["label"] for e in examples])
        return batch

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        examples = self.examples(part)
        # Batches of similar lengths pad less; predictions go back to the part's own order.
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["text"]))
        pred = [0] * len(examples)
        n_tokens, t0 = 0, time.perf_counter()
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = self.encode([examples[i] for i in idx], tokenizer)
            logits = model(**batch).logits  # (B, num_labels)
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                pred[i] = int(p)
            n_tokens += int(batch["attention_mask"].sum())
        labels = [int(e["label"]) for e in examples]
        correct = [int(p == y) for p, y in zip(pred, labels)]
        return EvalResult({"accuracy": sum(correct) / len(examples)}, n_tokens, time.perf_counter() - t0,
                          Outcomes(correct, pred, labels))


class RTSentiment(ClassificationTask):
    name = "rt-sentiment"
    dataset = "rotten-tomatoes"
    description = "Rotten Tomatoes movie-review sentences (Pang & Lee 2005), positive vs negative"
    eval_size = 2500
    val_size = 500
    sizes = "train 5,530 / validation 500 / eval 2,500 (of 8,530; balanced classes)"
    default_max_length = 64


class Sarcasm(ClassificationTask):
    name = "sarcasm"
    dataset = "sarcasm"
    description = "News headlines, sarcastic (The Onion) or not (HuffPost) (Misra 2018, via OpenAI evals)"
    eval_size = 3000
    val_size = 1000
    sizes = "train 24,498 / validation 1,000 / eval 3,000 (of 28,614; 116 exact duplicates dropped)"
    default_max_length = 48
