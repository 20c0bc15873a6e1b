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


class MovieDomains(ClassificationTask):
    """Two review domains with one label space: Rotten Tomatoes sentences and IMDB reviews, each example tagged
    with its `domain` ("rt" or "imdb"); the natural partition of the clients scenario (`partition: domain`) gives
    each client one domain, or a mix by domain. IMDB's 24,904 unique reviews are subsampled (fixed seed) to the
    8,530 of Rotten Tomatoes, so the two domains weigh the same."""
    name = "movie-domains"
    dataset = "rotten-tomatoes+imdb"
    description = "Movie reviews from two domains, Rotten Tomatoes sentences and IMDB reviews, positive vs negative"
    eval_size = 2500
    val_size = 500
    sizes = "train 14,060 / validation 500 / eval 2,500 (of 17,060: 8,530 per domain)"
    default_max_length = 64
    partition_tags = ("domain",)

    def build_split(self) -> Split:
        import random

        from lorabench import assets
        rt = [{"text": r["text"], "label": int(r["label"]), "domain": "rt"} for r in assets.load_dataset("rotten-tomatoes")]
        imdb = [{"text": r["text"], "label": int(r["label"]), "domain": "imdb"} for r in assets.load_dataset("imdb")]
        imdb = random.Random(20261206).sample(imdb, len(rt))  # as many IMDB reviews as RT sentences
        return seeded_split(rt + imdb, self.eval_size, self.val_size)


class TextSources(ClassificationTask):
    """Which corpus a text comes from, four classes from four real corpora: a Rotten Tomatoes review sentence (0),
    an IMDB review (1, cut to max_length tokens like every input), a news headline (2: HuffPost or The Onion,
    from the sarcasm set), a speech from one of Shakespeare's plays (3). The assets hold no multi-class topic
    task with balanced classes (the evals wheel's event_categories has 852 / 17 / 10 examples per class), and
    continual forgetting (GS-LoRA, docs/continual.md) needs several classes a model learns well: 2,000 texts per
    class are drawn with a fixed seed, so the classes weigh the same."""
    name = "text-sources"
    dataset = "rotten-tomatoes+imdb+sarcasm+shakespeare"
    description = "Which of four corpora a text comes from: movie-review sentence, IMDB review, news headline, Shakespeare speech"
    num_labels = 4
    classes = ("rt-sentence", "imdb-review", "headline", "shakespeare")
    per_class = 2000
    eval_size = 800
    val_size = 400
    sizes = "train 6,800 / validation 400 / eval 800 (of 8,000: 2,000 per class, 4 classes)"
    default_max_length = 64

    def build_split(self) -> Split:
        import random

        from lorabench import assets
        from lorabench.tasks.lm import speeches
        plays = sorted(assets.load_dataset("shakespeare"), key=lambda p: p["title"])
        pools = [[r["text"] for r in assets.load_dataset("rotten-tomatoes")],
                 [r["text"] for r in assets.load_dataset("imdb")],
                 [r["text"] for r in assets.load_dataset("sarcasm")],
                 [s["text"] for p in plays for s in speeches(p["title"], p["text"])]]
        rng = random.Random(20261206)
        items = [{"text": t, "label": k} for k, pool in enumerate(pools)
                 for t in rng.sample(sorted(set(pool)), self.per_class)]
        return seeded_split(items, self.eval_size, self.val_size)
