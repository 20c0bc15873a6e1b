"""Language modelling on held-out text, scored by perplexity (lower is better): whole plays (shakespeare-lm) and the
plays' speeches by speaking role (shakespeare-roles, the federated clients of LEAF)."""
from __future__ import annotations

import math
import random
import re
import time
from dataclasses import dataclass

import torch

from lorabench.config import option
from lorabench.tasks.base import SPLIT_SEED, EvalResult, Metric, Split, Task, TaskConfig

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


# A speech opens with its speaker on a line of its own: "Ham." / "KING HENRY." (most plays), or "THESEUS" in
# capitals without the full stop (A Midsummer Night's Dream); the speech's lines follow.
SPEAKER = re.compile(r"^(?:([A-Z][A-Za-z' ]{0,30}[A-Za-z])\.|([A-Z][A-Z' ]{0,30}[A-Z]))$")
NOT_SPEAKERS = ("ACT", "SCENE", "PROLOGUE", "EPILOGUE", "THE END", "FINIS", "DRAMATIS PERSONAE")


def speeches(title: str, text: str) -> list[dict]:
    """The speeches of one play in order: {"role": "PLAY/SPEAKER", "text": the speech's lines}. The role is the
    speaker in that play, as LEAF's Shakespeare clients are (arXiv 1812.01097, sec. 3); stage directions
    ("[Exit.]") are dropped from a speech, and a paragraph without a speaker line is no speech."""
    out = []
    for para in text.split("\n\n"):
        lines = para.strip("\n").split("\n")
        head = lines[0].strip()
        m = SPEAKER.match(head)
        if len(lines) < 2 or not m or head.rstrip(".").upper().startswith(NOT_SPEAKERS):
            continue
        body = "\n".join(ln.strip() for ln in lines[1:] if ln.strip() and not ln.strip().startswith("["))
        if body:
            out.append({"role": f"{title}/{head.rstrip('.')}", "text": body})
    return out


@dataclass
class RolesConfig(TaskConfig):
    n_roles: int = option(10, "the speaking roles kept: those with the most speeches in the plays (one federated "
                              "client each at partition `role`)", low=2, high=500)
    eval_share: float = option(0.2, "share of each role's speeches held out, its last ones in the play's order",
                               low=0.05, high=0.5)


class ShakespeareRoles(Task):
    """The plays' speeches by speaking role: the natural federated benchmark of LEAF and FedAvg (each client is a
    speaking role; McMahan et al., arXiv 1602.05629, sec. 3; Caldas et al., arXiv 1812.01097). The `n_roles`
    roles with the most speeches; each role's last `eval_share` of its speeches (in the play's order, so no
    held-out line sits between two trained ones of the same scene) form the eval part, the rest the train part;
    both parts are shuffled with the fixed split seed, so `n_train` / `n_eval` prefixes keep every role. An example
    is one speech ({"role", "text"}); it is trained and scored as its own sequence (at most max_length tokens),
    by perplexity over its next tokens (lower is better) and next-token accuracy."""
    name = "shakespeare-roles"
    kind = "perplexity"
    head = "causal-lm"
    default_model = "smollm2-135m"
    dataset = "shakespeare"
    metric = PPL
    description = "Shakespeare's speeches by speaking role (the 10 roles with the most speeches); held-out last 20% of each role's"
    sizes = "train 1,819 / eval 454 speeches of the 10 roles with the most (n_roles); no validation part"
    default_max_length = 64
    partition_tags = ("role",)
    config_cls = RolesConfig
    default_eval_windows = 64  # the lm-eval export's rolling windows (ShakespeareLM.windows)
    windows = ShakespeareLM.windows

    def build_split(self) -> Split:
        from lorabench import assets
        by_role: dict[str, list[dict]] = {}
        for play in sorted(assets.load_dataset("shakespeare"), key=lambda p: p["title"]):
            for s in speeches(play["title"], play["text"]):
                by_role.setdefault(s["role"], []).append(s)
        roles = sorted(by_role, key=lambda r: (-len(by_role[r]), r))[: self.config.n_roles]
        train, ev = [], []
        for r in roles:
            n_eval = max(1, round(self.config.eval_share * len(by_role[r])))
            train += by_role[r][:-n_eval]
            ev += by_role[r][-n_eval:]
        rng = random.Random(SPLIT_SEED)
        rng.shuffle(train)
        rng.shuffle(ev)
        return Split(train, ev)

    def roles(self) -> list[str]:
        return sorted({e["role"] for e in self.split().train + self.split().eval})

    def encode(self, examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
        """Each speech alone, cut to max_length tokens and right-padded; `labels` are the input ids with -100 on
        the padding, so the model's loss is the mean next-token NLL over the speeches' own tokens."""
        ids = [tokenizer(e["text"], add_special_tokens=False)["input_ids"][: self.max_length] for e in examples]
        width = max(len(x) for x in ids)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": input_ids.masked_fill(mask == 0, -100)}

    def collate(self, examples, tokenizer):
        return self.encode(examples, tokenizer)

    @torch.no_grad()
    def evaluate(self, model, tokenizer, batch_size: int, part: str = "eval") -> EvalResult:
        if part != "eval":
            raise ValueError(f"task {self.name} is scored on its eval split only (it has no validation part)")
        examples = self.examples(part)
        nll, count, hits, t0 = 0.0, 0, 0, time.perf_counter()
        for s in range(0, len(examples), batch_size):
            batch = self.encode(examples[s:s + batch_size], tokenizer)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            target = batch["labels"][:, 1:]  # (B, T-1): token t+1 predicted from tokens <= t
            keep = target != -100
            logp = torch.log_softmax(logits[:, :-1], -1)
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= float(picked[keep].sum())
            count += int(keep.sum())
            hits += int((logits[:, :-1].argmax(-1) == target)[keep].sum())
        return EvalResult({"perplexity": math.exp(nll / count), "nll": nll / count,
                           "token_accuracy": hits / count}, count, time.perf_counter() - t0)
