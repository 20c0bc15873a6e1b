"""Language modelling on held-out text, scored by perplexity (lower is better)."""
from __future__ import annotations

import math
import random
import time

import torch

from lorabench.tasks.base import SPLIT_SEED, EvalResult, Metric, Split, Task

PPL = Metric("perplexity", False, "exp of the mean next-token negative log-likelihood on held-out windows")


class ShakespeareLM(Task):
    name = "shakespeare-lm"
    kind = "perplexity"
    head = "causal-lm"
    default_model = "smollm2-135m"
    dataset = "shakespeare"
    metric = PPL
    description = "Shakespeare's plays (public domain); 4 whole plays held out, windows of max_length tokens"
    sizes = "plays split 4 eval / the rest train; eval 64 windows (n_eval), train windows from every train play"
    default_max_length = 128
    n_eval_plays = 4
    default_eval_windows = 64

    def build_split(self) -> Split:
        from lorabench import assets
        plays = sorted(assets.load_dataset("shakespeare"), key=lambda p: p["title"])
        order = list(range(len(plays)))
        random.Random(SPLIT_SEED).shuffle(order)
        held = [plays[i] for i in order[: self.n_eval_plays]]
        rest = [plays[i] for i in order[self.n_eval_plays:]]
        # Text units are paragraphs (split on blank lines); windows are built at tokenisation time.
        def paragraphs(ps):
            return [{"title": p["title"], "text": t.strip()} for p in ps for t in p["text"].split("\n\n") if t.strip()]
        return Split(paragraphs(rest), paragraphs(held))

    def windows(self, examples: list[dict], tokenizer, limit: int | None) -> list[list[int]]:
        """Concatenate paragraphs and cut into non-overlapping windows of max_length tokens."""
        out, buf = [], []
        for e in examples:
            buf.extend(tokenizer(e["text"] + "\n\n", add_special_tokens=False)["input_ids"])
            while len(buf) >= self.max_length:
                out.append(buf[: self.max_length])
                buf = buf[self.max_length:]
                if limit is not None and len(out) >= limit:
                    return out
        return out

    def train_batches(self, tokenizer, batch_size: int, seed: int):
        # Batches of whole windows: tokenise the train plays once, then shuffle windows per epoch.
        windows = self.windows(self.split().train, tokenizer, self.config.n_train)
        rng = random.Random(seed)
        while True:
            rng.shuffle(windows)
            for i in range(0, len(windows) - batch_size + 1, batch_size):
                ids = torch.tensor(windows[i:i + batch_size])
                yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def split(self) -> Split:
        # n_train / n_eval count windows here, not paragraphs: applied in train_batches / evaluate.
        if self._split is None:
            self._split = self.build_split()
        return self._split

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        if part != "eval":
            raise ValueError(f"task {self.name} is scored on its eval split only (perplexity has no validation part)")
        windows = self.windows(self.split().eval, tokenizer, self.config.n_eval or self.default_eval_windows)
        nll, count, t0 = 0.0, 0, time.perf_counter()
        for s in range(0, len(windows), batch_size):
            ids = torch.tensor(windows[s:s + batch_size])
            logits = model(input_ids=ids).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                     ids[:, 1:].reshape(-1), reduction="sum")
            nll += loss.item()
            count += ids[:, 1:].numel()
        return EvalResult({"perplexity": math.exp(nll / count), "nll": nll / count},
                          len(windows) * self.max_length, time.perf_counter() - t0)
